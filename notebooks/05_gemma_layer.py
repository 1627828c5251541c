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
# # 05 · A Gemma layer: RMSNorm, RoPE, multi-query attention, GeGLU
#
# **Goal.** Take the merged sequence (image tokens + text, notebook 04) through one layer of the
# Gemma decoder, piece by piece, then through all layers to the logits.
#
# $$
# \begin{aligned}
# h &\leftarrow h + W_o\,\operatorname{Attn}\big(\operatorname{RoPE}(W_q x),\ \operatorname{RoPE}(W_k x),\ W_v x\big),
#   && x = \operatorname{RMSNorm}_1(h) \\
# h &\leftarrow h + W_{\text{down}}\big(\operatorname{gelu}_{\tanh}(W_{\text{gate}}\, x) \odot W_{\text{up}}\, x\big),
#   && x = \operatorname{RMSNorm}_2(h) \\
# \operatorname{RMSNorm}(x) &= \frac{x}{\sqrt{\operatorname{mean}(x^2) + \epsilon}} \odot (1 + w)
# \end{aligned}
# $$
#
# - **RMSNorm** has no mean and no bias, and its weight is stored as an offset from 1.
# - **RoPE** rotates each pair $(x_i, x_{i+E/2})$ of a query or key by the angle
#   $p\cdot\theta^{-2i/E}$ at position $p$ (the split-half layout; positions are 1-indexed in
#   PaliGemma), so that $q\cdot k$ depends on the positions only through their difference.
# - **Multi-query / grouped-query attention**: $H_q$ query heads share $H_k$ key/value heads; query
#   head $j$ reads K/V head $j // G$, $G = H_q / H_k$.
# - **GeGLU**: a gated MLP, one branch through GELU multiplies the other.
#
# No linear layer has a bias. Code: `npvlm/model/gemma.py`, `npvlm/model/rope.py`, `npvlm/model/attention.py`,
# `npvlm/model/masks.py`, `npvlm/model/layers.py`. Shapes: B batch, T tokens, S keys, D width, F MLP width,
# Hq/Hk query/key-value heads, E head dim, V vocab (the legend of `npvlm/model/layers.py`).

# %%
# The model these notebooks run on. "demo" is the small PaliGemma embedded in npvlm
# (npvlm/demo/model). Set MODEL to a real checkpoint folder instead, e.g. a downloaded
# google/paligemma-3b-mix-224 (docs/checkpoints.md): every size is read from model.cfg.
MODEL = "demo"


import matplotlib.pyplot as plt
import numpy as np

import npvlm
from npvlm.demo import SAMPLE_SCENE
from npvlm.model.attention import attention
from npvlm.model.gemma import geglu, gemma_layer, lm_head, self_attention
from npvlm.model.layers import gelu_tanh, linear, rms_norm, softmax
from npvlm.model.masks import prefill_masks, prefix_lm_mask
from npvlm.model.paligemma import encode_images, final_norm, merge_embeddings
from npvlm.model.record import text_stage_names
from npvlm.model.rope import apply_rope, prompt_positions, rope_tables
from npvlm.model.siglip import split_heads
from npvlm.parity import GOLDENS, compare, compare_stages

plt.rcParams.update({"figure.dpi": 72, "image.interpolation": "nearest"})

model = npvlm.load(MODEL)
cfg, tc = model.cfg, model.cfg.text
D, Hq, Hk, E = tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads, tc.head_dim
G = Hq // Hk
print(model)
print(f"Gemma: {tc.num_hidden_layers} layers, D = {D}, MLP F = {tc.intermediate_size}, Hq = {Hq}, Hk = {Hk} "
      f"(G = {G}), E = {E}, rope theta {tc.rope_theta:g}, rms eps {tc.rms_norm_eps}")

inputs = model.processor([SAMPLE_SCENE], ["answer en what color is the circle?"])
ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
h = merge_embeddings(ids, encode_images(inputs["pixel_values"], model.params, cfg), model.params["text"]["embed_tokens"], cfg)
B, T, _ = h.shape
layer = model.params["text"]["layers"][0]
print(f"h {list(h.shape)} (B, T, D); layer 0 holds {list(layer)}")

# %% [markdown]
# ## 1. RMSNorm with (1 + w)
#
# Divide each token by its root-mean-square, then scale by $1 + w$. The stored weight $w$ is an
# offset: a zero weight is the identity scale. Computed in float32.

# %%
w = layer["input_layernorm"]["weight"]                                  # [D]
eps = tc.rms_norm_eps
x = rms_norm(h, w, eps)                                                 # [B, T, D]
print(f"input_layernorm.weight: mean {w.mean():+.3f}, range [{w.min():+.3f}, {w.max():+.3f}]; "
      f"the scale 1 + w: mean {(1 + w).mean():.3f}")
print(f"RMS per token: before [{np.sqrt((h ** 2).mean(-1)).min():.2f}, {np.sqrt((h ** 2).mean(-1)).max():.2f}]")
print(compare("x / rms(x) * (1 + w)", x, h / np.sqrt((h ** 2).mean(-1, keepdims=True) + eps) * (1 + w)))

# %% [markdown]
# ## 2. RoPE: positions as rotations
#
# Positions are `cumsum(attention_mask)`: 1 for the first real token (HF PaliGemma counts from 1),
# so left padding does not shift them (`rope.prompt_positions`). `rope_tables` makes the tables
# `rope = (cos, sin)`, each `[B, 1, T, E]`: angle $= p\cdot\theta^{-2i/E}$ for frequency
# $i < E/2$, used twice (once per half). Every function that rotates takes the pair as one
# argument, `rope`.

# %%
positions = np.where(attention_mask > 0, np.cumsum(attention_mask, axis=1), 1)     # [B, T], 1-indexed
assert np.array_equal(positions, prompt_positions(attention_mask))
rope = rope_tables(positions, E, tc.rope_theta)                                    # (cos, sin)
cos, sin = rope                                                                    # each [B, 1, T, E]
print(f"positions {positions[0, :3].tolist()} ... {positions[0, -3:].tolist()}; cos, sin {list(cos.shape)}")

fig, ax = plt.subplots(figsize=(8, 2.6))
im = ax.imshow(cos[0, 0].T, aspect="auto", cmap="coolwarm", vmin=-1, vmax=1, interpolation="none")
ax.set_xlabel("position index t")
ax.set_ylabel("feature i (two halves)")
ax.set_title("cos(p · θ^(-2i/E)): fast rotations at the top of each half, slow at the bottom")
fig.colorbar(im, ax=ax)
plt.show()

# %% [markdown]
# What `apply_rope` does to one pair: put the vector $(x_i, x_{i+E/2}) = (1, 0)$ at every position
# and draw where it goes. Each pair turns on a circle at its own speed; the slowest pairs barely
# move over the whole sequence, so they carry position information over long distances.

# %%
unit = np.zeros((B, 1, T, E), np.float32)
unit[..., :E // 2] = 1.0                                      # (x_i, x_{i+E/2}) = (1, 0) for every i
rotated = apply_rope(unit, rope)[0, 0]                        # [T, E]
pairs = [0, 1, E // 8, E // 2 - 1]
fig, axes = plt.subplots(1, len(pairs), figsize=(11, 3.2))
for ax, i in zip(axes, pairs):
    ax.add_patch(plt.Circle((0, 0), 1, fill=False, color="lightgray"))
    sc = ax.scatter(rotated[:, i], rotated[:, i + E // 2], c=positions[0], cmap="viridis", s=12)
    ax.set_aspect("equal")
    ax.set_xlim(-1.2, 1.2)
    ax.set_ylim(-1.2, 1.2)
    ax.set_title(f"pair i = {i}\n{tc.rope_theta ** (-2 * i / E):.2g} rad per position", fontsize=9)
fig.colorbar(sc, ax=axes, label="position")
plt.show()

# %% [markdown]
# The point of rotating: a query at position $m$ and a key at position $n$ score
# $\langle R_m q, R_n k\rangle = \langle q, R_{n-m} k\rangle$, a function of $n - m$ only. Put one
# real query and key vector of layer 0 at every pair of positions: the score matrix is constant
# along its diagonals.

# %%
q_all = linear(x, layer["self_attn"]["q_proj"]["weight"]).reshape(B, T, Hq, E)
k_all = linear(x, layer["self_attn"]["k_proj"]["weight"]).reshape(B, T, Hk, E)
M = 32
pos_m = np.arange(1, M + 1)[None]                                            # [1, M]
rope_m = rope_tables(pos_m, E, tc.rope_theta)
qm = apply_rope(np.broadcast_to(q_all[0, -1, 0], (1, 1, M, E)), rope_m)[0, 0]   # the last token's query, at 1..M
kn = apply_rope(np.broadcast_to(k_all[0, cfg.num_image_tokens, 0], (1, 1, M, E)), rope_m)[0, 0]  # <bos> key
scores = qm @ kn.T                                                           # [M, M]
diag_spread = max(np.ptp(np.diagonal(scores, d)) for d in range(-M + 1, M))
print(f"largest spread along a diagonal: {diag_spread:.2e} (scores range {np.ptp(scores):.2f})")
fig, ax = plt.subplots(figsize=(3.4, 3))
ax.imshow(scores, cmap="coolwarm")
ax.set_xlabel("key position n")
ax.set_ylabel("query position m")
ax.set_title("q·k after RoPE", fontsize=10)
plt.show()

# %% [markdown]
# ## 3. Attention with shared K/V heads
#
# The model has $H_q$ = `Hq` query heads but only $H_k$ = `Hk` key/value heads (PaliGemma 1:
# one, multi-query attention). `npvlm.model.attention.attention` never copies K and V per head: it
# reshapes the queries to `[B, Hk, G·T, E]`, so one matmul per K/V head covers its G query heads.
# HF instead repeats K/V (`repeat_kv`); the results are equal. The KV cache stores only the Hk heads.
# `attention` reads the scale (and Gemma 2's cap) from the config, and given a dict `save` it
# keeps its probabilities `[B, Hq, T, S]` there, in HF's head order.

# %%
sa = layer["self_attn"]
q = apply_rope(q_all.transpose(0, 2, 1, 3), rope)                             # [B, Hq, T, E]
k = apply_rope(k_all.transpose(0, 2, 1, 3), rope)                             # [B, Hk, S, E] (S = T here)
v = split_heads(linear(x, sa["v_proj"]["weight"]), Hk)                        # [B, Hk, S, E]
mask = prefix_lm_mask(attention_mask, np.zeros_like(ids), np.float32)        # [B, 1, T, S] (notebook 06)
print(f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}; mask {list(mask.shape)}; scale {tc.attn_scale:.4f}")
saved = {}
grouped = attention(q, k, v, mask, tc, save=saved)                            # [B, T, Hq*E]

k_rep, v_rep = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)               # HF repeat_kv: [B, Hq, T, E]
probs = softmax(q @ k_rep.swapaxes(-1, -2) * tc.attn_scale + mask, axis=-1)   # [B, Hq, T, S]
repeated = (probs @ v_rep).transpose(0, 2, 1, 3).reshape(B, T, Hq * E)
print(compare("grouped == repeat_kv", grouped, repeated))
print(compare("saved probs == repeat_kv probs", saved["probs"], probs))
attn_out = linear(grouped, sa["o_proj"]["weight"])                            # [B, T, D]
print(compare("o_proj(attention) == gemma.self_attention", attn_out,
              self_attention(x, sa, tc, rope, mask)))
per_token = 2 * tc.num_hidden_layers * E * 4
print(f"KV cache per token: {Hk} K/V head(s) -> {Hk * per_token / 1024:.1f} KiB; "
      f"with one K/V head per query head it would be {Hq * per_token / 1024:.1f} KiB")

# %% [markdown]
# ## 4. GeGLU
#
# The second branch normalises again (`post_attention_layernorm`, which in Gemma 1 is the MLP's
# *input* norm), then gates: $\operatorname{gelu}_{\tanh}(\text{gate}) \odot \text{up}$, both of
# width F, projected back to D.

# %%
h1 = h + attn_out
x2 = rms_norm(h1, layer["post_attention_layernorm"]["weight"], eps)
mp = layer["mlp"]
gate, up = linear(x2, mp["gate_proj"]["weight"]), linear(x2, mp["up_proj"]["weight"])      # [B, T, F]
mlp_out = linear(gelu_tanh(gate) * up, mp["down_proj"]["weight"])                         # [B, T, D]
print(f"gate, up {list(gate.shape)} -> down {list(mlp_out.shape)}")
print(compare("down(gelu(gate) * up) == geglu", mlp_out, geglu(x2, mp)))

fig, axes = plt.subplots(1, 2, figsize=(8, 2.5))
axes[0].hist(gate[0].ravel(), bins=60, color="tab:gray")
axes[0].set_title("gate pre-activations")
axes[1].hist(gelu_tanh(gate[0]).ravel(), bins=60, color="tab:orange")
axes[1].set_title("gelu_tanh(gate)")
plt.show()

# %% [markdown]
# ## 5. The layer, and the whole decoder
#
# The two branches together are `gemma_layer(h, p, cfg, rope, mask)` (a fifth argument, the
# layer's KV cache slot, is notebook 06's). Run every layer, then the final RMSNorm
# (`paligemma.final_norm`) and the output layer, which is the embedding table again:
# `logits = RMSNorm(h) @ Eᵀ` (`gemma.lm_head`, given `params["text"]["embed_tokens"]`).

# %%
h2 = h1 + mlp_out
print(compare("h + attn + mlp == gemma_layer", h2, gemma_layer(h, layer, tc, rope, mask)))
hh = h
for p in model.params["text"]["layers"]:
    hh = gemma_layer(hh, p, tc, rope, mask)
final = final_norm(hh[:, -1], model.params["text"]["norm"], tc)                     # the last position only
logits = lm_head(final, model.params["text"]["embed_tokens"], tc)
print(f"after {tc.num_hidden_layers} layers: {list(hh.shape)} -> final norm {list(final.shape)} -> logits {list(logits.shape)}")
print(compare("== model.prefill", logits, model.prefill(ids, attention_mask, inputs["pixel_values"])))

# %% [markdown]
# ## Check against Hugging Face
#
# The golden model `pg1_gqa_v5` has grouped-query attention (4 query heads, 2 K/V heads). From
# HF's `text.embed`, build the positions, the RoPE tables and the mask, apply `gemma_layer` layer by
# layer, `final_norm` and `lm_head`, and compare every stage with HF's (on real tokens). The
# goldens are committed tensors: no torch needed.

# %%
golden = dict(np.load(GOLDENS / "pg1_gqa_v5" / "goldens.npz"))
gm = npvlm.load(GOLDENS / "pg1_gqa_v5" / "model")
gtc, am = gm.cfg.text, golden["attention_mask"]
print(f"golden: Hq = {gtc.num_attention_heads}, Hk = {gtc.num_key_value_heads}, E = {gtc.head_dim}")
grope = rope_tables(prompt_positions(am), gtc.head_dim, gtc.rope_theta)       # the cumsum above, as prefill does it
gmask = prefill_masks(am, golden["token_type_ids"], gtc, np.float32)["full_attention"]
ours, h = {}, golden["text.embed"]
for i, p in enumerate(gm.params["text"]["layers"]):
    h = ours[f"text.layer.{i:02d}"] = gemma_layer(h, p, gtc, grope, gmask)
ours["text.final_norm"] = final_norm(h, gm.params["text"]["norm"], gtc)
ours["logits"] = lm_head(ours["text.final_norm"], gm.params["text"]["embed_tokens"], gtc)
names = text_stage_names(gtc.num_hidden_layers)[1:]              # the layers, final norm, logits
results = compare_stages(ours, golden, names, where=am.astype(bool))
assert all(r.ok for r in results)

# %% [markdown]
# ## Exercises
#
# 1. In the RoPE score-matrix cell (end of section 2), shift every position by 100:
#    `pos_m = np.arange(101, M + 101)[None]`. Predict whether the score matrix and the printed
#    diagonal spread change; rerun the cell to see.
# 2. In section 3, replace `np.repeat(k, G, axis=1)` (and the same for `v`) with
#    `np.tile(k, (1, G, 1, 1))`. Predict which K/V head query head 1 now reads (with `Hk` and
#    `G` printed at the top) and whether `grouped == repeat_kv` still passes; the printed line
#    shows it.
# 3. In section 3, call `attention(q, k, v, None, tc, save=saved)`, without the mask. This prompt
#    is one row with no padding and no suffix: predict whether any printed line of the cell
#    changes; rerun it to see. (Notebook 06 shows the prompts where the mask matters.)
