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
# # 09 · PaliGemma 2: what changes in the decoder
#
# **Goal.** See the five differences between the Gemma decoder of PaliGemma 1 and the Gemma 2
# decoder of PaliGemma 2, and run a PaliGemma 2 model. The image side (SigLIP, the projector, the
# prompt format, the prefix-LM mask, 1-indexed RoPE) does not change.
#
# $$
# \begin{aligned}
# \text{Gemma 1:}\quad & h \leftarrow h + \operatorname{attn}(N_1 h), \qquad h \leftarrow h + \operatorname{mlp}(N_2 h) \\
# \text{Gemma 2:}\quad & h \leftarrow h + N_2\big(\operatorname{attn}(N_1 h)\big), \qquad h \leftarrow h + N_4\big(\operatorname{mlp}(N_3 h)\big) \\
# \text{soft cap:}\quad & \operatorname{softcap}(x, c) = c \tanh(x / c)
#   \quad\text{on attention scores } (c_a = 50) \text{ and on the final logits } (c_f = 30) \\
# \text{scale:}\quad & s = q\cdot k \,/\, \sqrt{\texttt{query\_pre\_attn\_scalar}} \quad(\text{not } \sqrt{E}) \\
# \text{sliding window:}\quad & \text{on every other layer, a generated token sees only the last } w \text{ keys } (w = 4096)
# \end{aligned}
# $$
#
# plus grouped-query attention with several K/V heads. See `docs/paligemma2.md`; code:
# `npvlm/model/gemma.py` (`gemma2_layer` next to `gemma_layer`), `npvlm/model/layers.py` (`softcap`),
# `npvlm/model/attention.py` (the cap and the scale, read from the config), `npvlm/model/masks.py` (the
# window in `prefix_lm_mask`, `decode_mask`).

# %%
# The model this notebook runs on: the tiny random-weight PaliGemma 2 golden model from
# tests/goldens (made by HF transformers, with caps small enough that its random weights reach
# them). Set MODEL to a real PaliGemma 2 checkpoint folder instead, e.g. a downloaded
# google/paligemma2-3b-pt-224 (docs/checkpoints.md): sizes are read from model.cfg, and with a
# tokenizer.model in the folder the notebook asks it about the sample scene.
import inspect
from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import npvlm
from npvlm.parity import GOLDENS

MODEL = GOLDENS / "pg2_gqa_v5" / "model"

from npvlm.demo import SAMPLE_SCENE
from npvlm.generation.generate import greedy_ids
from npvlm.model.gemma import gemma2_layer, gemma_layer, lm_head
from npvlm.model.layers import softcap
from npvlm.model.masks import decode_mask, prefill_masks
from npvlm.model.record import stage_names
from npvlm.model.rope import prompt_positions, rope_tables
from npvlm.parity import compare, compare_stages

plt.rcParams.update({"figure.dpi": 72, "image.interpolation": "nearest"})
model = npvlm.load(MODEL)
tc = model.cfg.text
print(model)
golden = dict(np.load(GOLDENS / "pg2_gqa_v5" / "goldens.npz"))
if (Path(model.path) / "tokenizer.model").is_file():        # a real checkpoint: ask about the sample scene
    inputs = model.processor([SAMPLE_SCENE], ["caption en"])
else:                                                       # the golden model has no tokenizer: HF's inputs
    inputs = {k: golden[k] for k in ("input_ids", "attention_mask", "token_type_ids", "pixel_values")}
print({k: list(v.shape) for k, v in inputs.items()})

# %% [markdown]
# ## 1. The config
#
# Gemma 2 adds four fields to the text config; compare with a PaliGemma 1 golden model.

# %%
g1 = npvlm.load_config(GOLDENS / "pg1_gqa_v5" / "model").text
fields = ["model_type", "num_attention_heads", "num_key_value_heads", "head_dim", "query_pre_attn_scalar",
          "attn_logit_softcapping", "final_logit_softcapping", "sliding_window"]
print(f"{'':<24} {'PaliGemma 1 golden':>20} {'this model':>20}")
for f in fields:
    print(f"{f:<24} {str(getattr(g1, f)):>20} {str(getattr(tc, f)):>20}")
print(f"{'attention scale':<24} {g1.attn_scale:>20.4f} {tc.attn_scale:>20.4f}")
print("layer types:", [tc.layer_type(i) for i in range(tc.num_hidden_layers)])

# %% [markdown]
# ## 2. The layer: two extra norms
#
# The two layouts are two short functions side by side, over the same attention, MLP, RMSNorm and
# RoPE. In Gemma 2, `post_attention_layernorm` is a real *post*-norm on the attention output (in
# Gemma 1 the same name normalises the MLP input), and the MLP gets a pre- and a post-norm.

# %%
print(inspect.getsource(gemma_layer))
print(inspect.getsource(gemma2_layer))
print("norms per layer:", [k for k in model.params["text"]["layers"][0] if k.endswith("layernorm")])

# %% [markdown]
# ## 3. Soft caps
#
# `softcap(x, c) = c·tanh(x/c)` is the identity for $|x| \ll c$ and bends smoothly towards $\pm c$.
# The real models cap attention scores at 50 and output logits at 30; the golden model uses 4 and
# 2.5 so that its random weights actually reach the curved part.

# %%
x = np.linspace(-100, 100, 401, dtype=np.float32)
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
for c in (50.0, 30.0):
    axes[0].plot(x, softcap(x, c), label=f"c = {c:g}")
axes[0].plot(x, x, "--", color="gray", lw=0.8, label="identity")
axes[0].set_ylim(-60, 60)
axes[0].set_title("PaliGemma 2's caps")
axes[0].legend(fontsize=8)
xs = np.linspace(-12, 12, 241, dtype=np.float32)
for name, c in (("attention", tc.attn_logit_softcapping), ("final", tc.final_logit_softcapping)):
    if c is not None:
        axes[1].plot(xs, softcap(xs, c), label=f"{name}: c = {c:g}")
axes[1].plot(xs, xs, "--", color="gray", lw=0.8)
axes[1].set_ylim(-6, 6)
axes[1].set_title("this model's caps")
axes[1].legend(fontsize=8)
plt.show()

# %% [markdown]
# On real logits: run a prefill with a trace, and compare the logits before the final cap
# (`final_norm @ Eᵀ`) with after. The points lie on the curve; `tanh` is monotonic, so the cap
# never changes the argmax (greedy tokens), only the probabilities that sampling uses.

# %%
trace = {}
logits = model.prefill(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                       inputs.get("token_type_ids"), logits_for="all", trace=trace)
print("stages:", list(trace))
pre = trace["text.final_norm"] @ model.params["text"]["embed_tokens"]["weight"].T        # [B, T, V]
print(compare("lm_head(final_norm) == traced logits", lm_head(trace["text.final_norm"],
              model.params["text"]["embed_tokens"], tc), logits))
c_f = tc.final_logit_softcapping
print(f"pre-cap logits in [{pre.min():.2f}, {pre.max():.2f}] -> capped in [{logits.min():.2f}, {logits.max():.2f}]")
if c_f is not None:
    print(compare("logits == softcap(pre, c_f)", logits, softcap(pre, c_f)))
print("argmax unchanged by the cap:", np.array_equal(pre.argmax(-1), logits.argmax(-1)))
fig, ax = plt.subplots(figsize=(4, 3))
ax.plot(pre.ravel()[::7], logits.ravel()[::7], ".", ms=2)
ax.set_xlabel("before the final cap")
ax.set_ylabel("after")
plt.show()

# %% [markdown]
# The attention cap acts inside `attention` (before the mask). How much it matters here: run the
# first layer with and without it on the same input.

# %%
am = inputs["attention_mask"]
types = inputs.get("token_type_ids")
types = np.zeros_like(am) if types is None else types
rope = rope_tables(prompt_positions(am), tc.head_dim, tc.rope_theta)            # (cos, sin)
masks = prefill_masks(am, types, tc, np.float32)     # {"full_attention", "sliding_attention"}: [B, 1, T, S]
layer0, mask0 = model.params["text"]["layers"][0], masks[tc.layer_type(0)]
capped = gemma2_layer(trace["text.embed"], layer0, tc, rope, mask0)
uncapped = gemma2_layer(trace["text.embed"], layer0, replace(tc, attn_logit_softcapping=None), rope, mask0)
print(compare("layer 0 == traced text.layer.00", capped, trace["text.layer.00"]))
print(f"removing the attention cap changes layer 0 by up to {np.abs(capped - uncapped).max():.3f}")

# %% [markdown]
# ## 4. The sliding window
#
# On sliding layers a query may see a key only if it lies within the last $w$ positions —
# unless both are prefix tokens (transformers 5.x): the prompt stays one bidirectional block, and
# the window only ever hides old keys from suffix / generated tokens. With $w = 4096$ that happens
# only past 4096 tokens (896-px models). The golden model's window is tiny, and its inputs carry a
# 4-token suffix, so the effect is visible.

# %%
row = int(np.argmin(am.sum(1)))                                  # a left-padded row, if any
fig, axes = plt.subplots(1, 2, figsize=(8, 4))
for ax, kind in zip(axes, ("full_attention", "sliding_attention")):
    ax.imshow(masks[kind][row, 0] == 0, cmap="Blues", vmin=0, vmax=1.4)
    ax.set_title(kind + (f" (w = {tc.sliding_window})" if kind.startswith("sliding") else ""), fontsize=10)
    ax.set_xlabel("key j")
axes[0].set_ylabel("query i")
plt.show()
key_valid = np.ones((1, 12), np.int32)
print(f"decode step at cache index 11, window {tc.sliding_window}: visible keys",
      np.flatnonzero(decode_mask(key_valid, np.float32, tc.sliding_window)[0, 0, 0] == 0).tolist())

# %% [markdown]
# ## 5. Generation
#
# Nothing else changes: prefill, the KV cache and decoding are the same code as for PaliGemma 1.

# %%
tokens = greedy_ids(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], max_new_tokens=16)
print(f"greedy tokens {list(tokens.shape)}:\n{tokens}")

# %% [markdown]
# ## Check against Hugging Face
#
# Both PaliGemma 2 goldens (`pg2_gqa_v5`: F32, transformers 5.x names; `pg2_gqa_hub`: BF16, two
# shards, hub names): every stage of a prefill with the 4-token causal suffix (the stages of
# `npvlm.model.record.stage_names`), and 32 greedy tokens. The goldens are committed tensors: no torch
# needed.

# %%
ok = True
for name in ("pg2_gqa_v5", "pg2_gqa_hub"):
    g = dict(np.load(GOLDENS / name / "goldens.npz"))
    gm = npvlm.load(GOLDENS / name / "model")
    trace = {}
    gm.prefill(g["input_ids"], g["attention_mask"], g["pixel_values"], g["token_type_ids"], logits_for="all", trace=trace)
    real = g["attention_mask"].astype(bool)
    print(f"{name}:")
    names = stage_names(gm.cfg.vision.num_hidden_layers, gm.cfg.text.num_hidden_layers)
    results = compare_stages(trace, g, names,
                             where=lambda n, real=real: real if n.startswith(("text.", "logits")) else None)
    gen = greedy_ids(gm, g["input_ids"], g["attention_mask"], g["pixel_values"], max_new_tokens=g["greedy_tokens"].shape[1])
    print("greedy tokens equal HF's:", np.array_equal(gen, g["greedy_tokens"]))
    ok &= all(r.ok for r in results) and np.array_equal(gen, g["greedy_tokens"])
assert ok

# %% [markdown]
# ## Exercises
#
# 1. In section 3's first cell, add a third curve with a small cap, `for c in (50.0, 30.0, 5.0)`.
#    Predict for which |x| the new curve leaves the identity line and the value it flattens at;
#    the left plot shows it.
# 2. In the attention-cap cell, compare against a model without the *final* cap instead:
#    `replace(tc, final_logit_softcapping=None)`. Predict the printed change of layer 0 (the
#    final cap acts after the last layer, on the logits only); rerun the cell to see.
# 3. In section 4, change the decode step's cache length: `key_valid = np.ones((1, 20), np.int32)`.
#    Predict which keys stay visible with this model's window (printed in section 1) — how many,
#    and which indices; the printed `visible keys` list shows it.
