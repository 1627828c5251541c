# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · The prefix-LM mask, prefill, and the KV cache
#
# **Goal.** See which tokens may look at which, then generate with a KV cache — one prefill pass
# over the prompt, then one cheap step per new token — and prove the steps give exactly what
# recomputing the whole sequence would.
#
# PaliGemma's mask (big_vision `make_attn_mask`): with `token_type` 0 for the prefix (image,
# `<bos>`, prompt, `"\n"`) and 1 for the suffix (the answer),
#
# $$
# \text{query } i \text{ sees key } j \iff \text{real}_i \wedge \text{real}_j \wedge
# \textstyle\sum_{t \le j} \text{type}_t \;\le\; \sum_{t \le i} \text{type}_t .
# $$
#
# The prefix is one bidirectional block (the prompt sees the whole image and the image sees the
# prompt); each suffix token sees the prefix and the suffix tokens before it (causal). It is
# applied by adding 0 where visible and the most negative float32 elsewhere.
#
# Generation: **prefill** runs the prompt `[B, T]` once and stores every layer's keys (after
# RoPE) and values; each **decode** step runs one token `[B, 1]` against them. Code:
# `npvlm/model/masks.py` (`prefix_lm_mask`, `decode_mask`), `npvlm/model/kv_cache.py`,
# `npvlm/model/paligemma.py` (`prefill`, `decode_step`). Shapes: B batch, T queries (tokens of this
# pass), S keys (cached + new; S = T in a prefill), Hq/Hk query/key-value heads, E head dim.

# %%
# The model these notebooks run on. "demo" is the small PaliGemma embedded in npvlm
# (npvlm/demo/model). Set MODEL to a real checkpoint folder instead, e.g. a downloaded
# google/paligemma-3b-mix-224 (docs/checkpoints.md): every size is read from model.cfg.
MODEL = "demo"

import time

import matplotlib.pyplot as plt
import numpy as np

import npvlm
from npvlm.demo import SAMPLE_SCENE, SAMPLE_SEED
from npvlm.demo.scenes import caption, make_scene
from npvlm.model.masks import decode_mask, prefix_lm_mask
from npvlm.parity import GOLDENS, compare, compare_stages

plt.rcParams.update({"figure.dpi": 72, "image.interpolation": "nearest"})

model = npvlm.load(MODEL)
cfg, tok = model.cfg, model.tokenizer
N = cfg.num_image_tokens
print(model)

# %% [markdown]
# ## 1. The mask on a small example
#
# One left-padded row: a pad, two image tokens, `<bos>`, one prompt token, `"\n"`, and a
# two-token suffix `x y` (1 = visible).

# %%
labels = ["pad", "img", "img", "bos", "p", "\\n", "x", "y"]
toy_mask = np.array([[0, 1, 1, 1, 1, 1, 1, 1]])
toy_type = np.array([[0, 0, 0, 0, 0, 0, 1, 1]])
additive = prefix_lm_mask(toy_mask, toy_type, np.float32)          # [B, 1, T, S], S = T
print(f"additive mask {list(additive.shape)}: values {np.unique(additive).tolist()}")
allowed = additive[0, 0] == 0
print("        " + " ".join(f"{s:>4}" for s in labels))
for s, row in zip(labels, allowed):
    print(f"  {s:>4}  " + " ".join(f"{'1' if a else '.':>4}" for a in row))

# %% [markdown]
# The pad row sees nothing: every entry is the most negative float, a finite number, so its
# softmax is uniform instead of NaN — and its output is never used.
#
# ## 2. The mask on real prompts, with answers as suffixes
#
# This is the training layout: the processor appends each answer (and `<eos>`) as a suffix with
# token type 1. Two prompts of different lengths make the batch left-padded.

# %%
scene = make_scene(SAMPLE_SEED)                                            # the sample scene's ground truth
batch = model.processor([SAMPLE_SCENE, SAMPLE_SCENE], ["caption en", "answer en how many shapes are there?"],
                        suffixes=[caption(scene), str(len(scene.objects))])
am, types = batch["attention_mask"], batch["token_type_ids"]
mask = prefix_lm_mask(am, types, np.float32)
print(f"input_ids {list(batch['input_ids'].shape)}, token_type_ids per row: prefix {(types == 0).sum(1) - (am == 0).sum(1)}, "
      f"suffix {types.sum(1)}; mask {list(mask.shape)}")

fig, axes = plt.subplots(1, 3, figsize=(12, 4.3))
for b, ax in enumerate(axes[:2]):
    ax.imshow(mask[b, 0] == 0, cmap="Blues", vmin=0, vmax=1.4)
    first = int(np.argmax(am[b]))
    for edge in (first, first + N, int(np.argmax(types[b])) if types[b].any() else None):
        if edge is not None:
            ax.axvline(edge - 0.5, color="tab:red", lw=0.8)
            ax.axhline(edge - 0.5, color="tab:red", lw=0.8)
    ax.set_title(f"row {b}: pads | image | text | suffix", fontsize=10)
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
Tb, z = mask.shape[-1], 20                                        # zoom on row 0's last z tokens
axes[2].imshow(mask[0, 0, -z:, -z:] == 0, cmap="Blues", vmin=0, vmax=1.4, extent=(Tb - z - 0.5, Tb - 0.5, Tb - 0.5, Tb - z - 0.5))
axes[2].set_title("row 0, last tokens: the causal suffix", fontsize=10)
axes[2].set_xlabel("key j")
plt.show()

# %% [markdown]
# At inference there is no suffix yet: `prefill` is called without `token_type_ids`, so the
# whole prompt is one bidirectional block. Each generated token is a suffix token that arrives
# alone: it sees every real cached key and itself (`decode_mask`), which is exactly the suffix row
# of the matrix above — no causal triangle is needed, because no later token exists yet.

# %%
key_valid = np.concatenate([am[1:], np.ones((1, 1), am.dtype)], axis=1)      # row 1's keys + the new token
step_mask = decode_mask(key_valid, np.float32)
print(f"decode mask {list(step_mask.shape)} (B, 1, 1, S): {int((step_mask == 0).sum())} visible keys of {key_valid.shape[1]}")

# %% [markdown]
# ## 3. The KV cache
#
# `new_cache(B, capacity)` preallocates one slot per layer, `cache.layers[i]` (a `LayerKV`: keys
# and values `[B, Hk, capacity, E]` and how many positions it holds, `length`), plus `key_valid`
# (which positions hold real tokens), `next_position` (each row's next RoPE position) and
# `length` (positions filled in every layer). Layer i gets its slot and calls
# `slot.write(k, v)`, which stores the new keys and values in place (nothing is concatenated)
# and returns views of every filled position to attend to.

# %%
PROMPT, NEW = "caption en", 12
inputs = model.processor([SAMPLE_SCENE], [PROMPT])
ids, attention_mask, pixels = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
B, T = ids.shape
cache = model.new_cache(B, T + NEW)
slot = cache.layers[0]
print(f"{len(cache.layers)} layer slots x keys/values {list(slot.keys.shape)}; key_valid {list(cache.key_valid.shape)}; "
      f"next_position {cache.next_position.tolist()}; length {cache.length}")

t0 = time.perf_counter()
logits = model.prefill(ids, attention_mask, pixels, cache=cache)
prefill_s = time.perf_counter() - t0
print(f"prefill of {T} tokens in {1000 * prefill_s:.1f} ms -> logits {list(logits.shape)}; "
      f"length {cache.length} (each slot: {[s.length for s in cache.layers]}), next_position {cache.next_position.tolist()}")

# %% [markdown]
# Decode step by step (greedy). Each step embeds one token at position `next_position`, writes its
# keys and values into the next slot, attends to every filled slot, and returns the next logits.

# %%
step_logits, new_ids, step_s = [logits], [], []
for t in range(NEW):
    token = int(logits.argmax(-1)[0])
    new_ids.append(token)
    if t == NEW - 1:
        break
    position, t0 = int(cache.next_position[0]), time.perf_counter()
    logits = model.decode_step(np.array([token]), cache)                 # [1] -> [1, V]
    step_s.append(time.perf_counter() - t0)
    step_logits.append(logits)
    print(f"step {t + 1:2d}: token {tok.decode([token])!r:<12} at position {position:3d} -> cache length {cache.length}")
print(f"answer so far: {tok.decode(new_ids)!r}")

keys = cache.layers[0].keys[0, 0]                                          # layer 0, row 0, K/V head 0: [capacity, E]
fig, ax = plt.subplots(figsize=(8, 2.4))
ax.imshow(keys.T, aspect="auto", cmap="coolwarm")
ax.axvline(T - 0.5, color="black", lw=1)
ax.set_xlabel(f"cache slot (prompt 0..{T - 1} | generated | still empty)")
ax.set_ylabel("feature")
ax.set_title("layer 0 keys in the cache", fontsize=10)
plt.show()

# %% [markdown]
# ## 4. Equal to a full recompute
#
# Run the whole sequence — prompt plus the generated tokens, marked as a causal suffix — through
# `prefill` at once, with logits at every position. Position `T - 1 + t` must give step `t`'s
# logits. The cache only avoids recomputing the past: a decode step costs one token's work.

# %%
full_ids = np.concatenate([ids, np.array([new_ids[:-1]])], axis=1)
full_mask = np.ones_like(full_ids)
full_types = np.concatenate([np.zeros_like(ids), np.ones((B, NEW - 1), ids.dtype)], axis=1)
t0 = time.perf_counter()
full = model.prefill(full_ids, full_mask, pixels, full_types, logits_for="all")     # [B, T + NEW - 1, V]
full_s = time.perf_counter() - t0
diffs = [compare(f"step {t}", step_logits[t], full[:, T - 1 + t]) for t in range(NEW)]
for d in diffs:
    print(d)
print(f"one cached decode step: {1000 * np.median(step_s):.1f} ms; recomputing {full_ids.shape[1]} tokens: "
      f"{1000 * full_s:.1f} ms")

# %% [markdown]
# ## 5. What the answer looks at
#
# A trace also records every layer's attention probabilities (`text.attn.NN`, `[B, Hq, T, S]`,
# the same numbers HF returns with `output_attentions`). Rerun the recompute with a trace. Left:
# the last layer's weights averaged over heads (log scale): the mask of section 2, filled in:
# the prefix block (image + prompt, all to all) and the causal suffix. Right: for the query that
# writes each answer token, how its weight on the image tokens spreads over the patch grid.

# %%
trace = {}
model.prefill(full_ids, full_mask, pixels, full_types, logits_for="all", trace=trace)
L = len(model.params["text"]["layers"])
attn = trace[f"text.attn.{L - 1:02d}"][0].mean(0)                       # [T', S], S = T', heads averaged
g = cfg.vision.grid_size
R = pixels.shape[-1]                                                    # image side in pixels
shown = [t for t in range(NEW) if tok.decode([new_ids[t]]).strip().isalpha()][:6]   # the words
fig, axes = plt.subplots(1, 1 + len(shown), figsize=(2.6 * (1 + len(shown)), 2.8))
axes[0].imshow(np.log10(attn + 1e-6), cmap="viridis")
axes[0].set_title(f"layer {L - 1}, log10 weight", fontsize=9)
axes[0].set_xlabel("key")
axes[0].set_ylabel("query")
scene_img = (pixels[0].transpose(1, 2, 0) + 1) / 2
for ax, t in zip(axes[1:], shown):
    row = attn[T - 1 + t]                                               # the query that writes token t
    ax.imshow(scene_img, extent=(0, R, R, 0))
    ax.imshow(row[:N].reshape(g, g), extent=(0, R, R, 0), cmap="magma", alpha=0.7)
    ax.set_title(f"{tok.decode([new_ids[t]]).strip()!r}: {100 * row[:N].sum():.0f}% on image", fontsize=9)
    ax.axis("off")
plt.show()

# %% [markdown]
# ## Check against Hugging Face
#
# 1. `pg1_mqa_hub` (a left-padded batch of two): prefill + cached greedy decoding must give HF's
#    32 greedy tokens, and every step's logits must equal a full recompute.
# 2. `pg2_gqa_hub`'s golden inputs carry a 4-token causal suffix (`token_type_ids` = 1), so its
#    logits at every position test the prefix-LM mask with a suffix against HF. (It is a
#    PaliGemma 2 model, notebook 09; the mask is the same function.)
#
# The goldens are committed tensors: no torch needed.

# %%
golden = dict(np.load(GOLDENS / "pg1_mqa_hub" / "goldens.npz"))
gm = npvlm.load(GOLDENS / "pg1_mqa_hub" / "model")
gids, gmask, gpix = golden["input_ids"], golden["attention_mask"], golden["pixel_values"]
(GB, GT), n = gids.shape, golden["greedy_tokens"].shape[1]
cache = gm.new_cache(GB, GT + n)
logits, steps, tokens = gm.prefill(gids, gmask, gpix, cache=cache), [], []
for t in range(n):
    steps.append(logits)
    tokens.append(logits.argmax(-1))
    if t < n - 1:
        logits = gm.decode_step(tokens[-1], cache)
tokens = np.stack(tokens, axis=1)                                                # [B, n]
print("greedy tokens equal HF's:", np.array_equal(tokens, golden["greedy_tokens"]))

full = gm.prefill(np.concatenate([gids, tokens[:, :-1]], 1), np.concatenate([gmask, np.ones_like(tokens[:, :-1])], 1),
                  gpix, np.concatenate([np.zeros_like(gids), np.ones_like(tokens[:, :-1])], 1), logits_for="all")
recompute = [compare(f"step {t:2d} == recompute", steps[t], full[:, GT - 1 + t]) for t in range(n)]
print(f"{sum(r.ok for r in recompute)}/{n} steps equal the full recompute; worst: {max(recompute, key=lambda r: r.max_rel)}")

g2 = dict(np.load(GOLDENS / "pg2_gqa_hub" / "goldens.npz"))
m2 = npvlm.load(GOLDENS / "pg2_gqa_hub" / "model")
print("pg2_gqa_hub token_type_ids:", g2["token_type_ids"].tolist())
ours = {"logits": m2.prefill(g2["input_ids"], g2["attention_mask"], g2["pixel_values"], g2["token_type_ids"],
                             logits_for="all")}
results = compare_stages(ours, g2, ["logits"], where=g2["attention_mask"].astype(bool))
assert np.array_equal(tokens, golden["greedy_tokens"]) and all(r.ok for r in recompute + results)

# %% [markdown]
# ## Exercises
#
# 1. In section 1, make the suffix three tokens long: `toy_type = np.array([[0, 0, 0, 0, 0, 1, 1, 1]])`
#    (the `"\n"` becomes a suffix token). Predict the printed 1/. matrix: which rows turn causal,
#    and which keys the `"\n"` row still sees; rerun the cell to see.
# 2. In section 3, set `NEW = 4` and rerun sections 3 and 4. Predict the cache's keys/values
#    shape, the `length` after prefill and after the last step, and how many `step` lines the
#    recompute check prints; the printed lines and the keys figure (fewer empty slots) show it.
# 3. In section 4, mark the generated tokens as prefix: `full_types = np.zeros_like(full_ids)`.
#    Predict which steps' logits still equal the cached decode. (In a prefix every token sees
#    every other one, the later ones too, and the prompt's hidden states feed every step.) The
#    printed `step t` lines show it.
