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
# # 03 · The SigLIP encoder: LayerNorm, multi-head attention, MLP
#
# **Goal.** Follow the image tokens through one SigLIP encoder layer, then through all of them.
# Every layer is a pre-LN transformer layer: each branch reads a normalised copy of the residual
# stream $h$ and adds its result back.
#
# $$
# \begin{aligned}
# h &\leftarrow h + \operatorname{Attn}(\operatorname{LN}_1(h)), \qquad
# h \leftarrow h + \operatorname{MLP}(\operatorname{LN}_2(h)) \\
# \operatorname{LN}(x) &= \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \odot \gamma + \beta
#   \quad(\mu, \sigma^2 \text{ over the } D_v \text{ features of one token, biased variance}) \\
# \operatorname{Attn}(x) &= \big[\operatorname{softmax}\!\big(Q_h K_h^{\top} / \sqrt{E}\big) V_h\big]_{h=1..H_q} W_o^{\top} + b_o,
#   \quad Q_h, K_h, V_h = x W_{q,k,v}^{\top} + b \text{ split into } H_q \text{ heads of } E = D_v / H_q \\
# \operatorname{MLP}(x) &= \operatorname{gelu}_{\tanh}(x W_1^{\top} + b_1)\, W_2^{\top} + b_2
# \end{aligned}
# $$
#
# Attention has no mask: every patch sees every patch. SigLIP's attention is plain multi-head:
# every query head has its own key/value head ($H_q = H_k$). After the last layer, one more LayerNorm
# (`post_layernorm`). Code: `npvlm/model/siglip.py`, `npvlm/model/layers.py`, `npvlm/model/attention.py`.

# %%
# The model these notebooks run on. "demo" is the small PaliGemma embedded in npvlm
# (npvlm/demo/model). Set MODEL to a real checkpoint folder instead, e.g. a downloaded
# google/paligemma-3b-mix-224 (docs/checkpoints.md): every size is read from model.cfg.
MODEL = "demo"


import matplotlib.pyplot as plt
import numpy as np

import npvlm
from npvlm.demo import SAMPLE_SCENE, SAMPLE_SEED
from npvlm.demo.scenes import make_scene
from npvlm.model.attention import attention, split_heads
from npvlm.model.layers import gelu_tanh, layer_norm, linear, softmax
from npvlm.model.record import vision_stage_names
from npvlm.model.siglip import encoder_layer, mlp, patch_embed, self_attention, vision_tower
from npvlm.parity import GOLDENS, compare, compare_stages

plt.rcParams.update({"figure.dpi": 72, "image.interpolation": "nearest"})

model = npvlm.load(MODEL)
vcfg = model.cfg.vision
R, P, g, N = vcfg.image_size, vcfg.patch_size, vcfg.grid_size, vcfg.num_patches
Dv, Hq, E, L = vcfg.hidden_size, vcfg.num_attention_heads, vcfg.head_dim, vcfg.num_hidden_layers
print(model)
print(f"SigLIP: {L} layers, width D_v = {Dv}, Hq = {Hq} heads of E = {E}, MLP width {vcfg.intermediate_size}, "
      f"LayerNorm eps {vcfg.layer_norm_eps}")

pixel_values = model.processor([SAMPLE_SCENE], ["caption en"])["pixel_values"]   # [1, 3, R, R] (notebook 01)
h0 = patch_embed(pixel_values, model.params["vision"], vcfg)           # [1, N, D_v]  (notebook 02)
layer = model.params["vision"]["layers"][0]
print(f"input to layer 0: {list(h0.shape)}; layer parameters: {list(layer)}")

# %% [markdown]
# ## 1. LayerNorm
#
# Each token is centred and scaled to unit variance over its $D_v$ features, then gets a learned
# per-feature scale $\gamma$ and shift $\beta$.

# %%
ln1 = layer["layer_norm1"]
x = layer_norm(h0, **ln1, eps=vcfg.layer_norm_eps)                          # [1, N, D_v]
plain = layer_norm(h0, np.ones(Dv, np.float32), np.zeros(Dv, np.float32), eps=vcfg.layer_norm_eps)
print(f"before: per-token mean in [{h0.mean(-1).min():+.3f}, {h0.mean(-1).max():+.3f}], "
      f"std in [{h0.std(-1).min():.3f}, {h0.std(-1).max():.3f}]")
print(f"normalised (gamma=1, beta=0): mean {abs(plain.mean(-1)).max():.1e}, std in "
      f"[{plain.std(-1).min():.4f}, {plain.std(-1).max():.4f}]")
print(compare("LN = plain * gamma + beta", x, plain * ln1["weight"] + ln1["bias"]))

# %% [markdown]
# ## 2. Multi-head attention
#
# Project to queries, keys and values, split the width into $H_q$ heads (an array axis, never a
# Python loop, `attention.split_heads`), and let every patch attend to every patch. The attention
# weights are computed here by hand from the same parameters; `npvlm.model.attention.attention` keeps
# its own when given a dict `save` (it stores q, k, v and `probs` there), which is how a trace
# records them.

# %%
def attention_probs(x, p):
    """The attention weights of one SigLIP layer, by hand. x: [B, N, D_v] -> [B, Hq, N, N]"""
    q, k = split_heads(linear(x, **p["q_proj"]), Hq), split_heads(linear(x, **p["k_proj"]), Hq)
    return softmax(q @ k.swapaxes(-1, -2) * E ** -0.5, axis=-1)


sa = layer["self_attn"]
q, k, v = (split_heads(linear(x, **sa[name]), Hq) for name in ("q_proj", "k_proj", "v_proj"))
print(f"q, k, v: {list(q.shape)} (B, Hq, N, E)")
probs = attention_probs(x, sa)
print(f"attention weights: {list(probs.shape)} (B, Hq, query N, key N); rows sum to 1: "
      f"{np.allclose(probs.sum(-1), 1, atol=1e-5)}")
merged = (probs @ v).transpose(0, 2, 1, 3).reshape(1, N, Hq * E)              # [B, N, D_v]
out = linear(merged, **sa["out_proj"])
print(compare("softmax(QK^T/sqrt(E))V, out_proj", out, self_attention(x, sa, vcfg)))
saved = {}                                  # attention reads the scale (and cap) from the config
print(f"vcfg.attn_scale = {vcfg.attn_scale:.4f} = E**-0.5, vcfg.attn_logit_softcapping = {vcfg.attn_logit_softcapping}")
print(compare("npvlm.model.attention.attention", merged, attention(q, k, v, None, vcfg, save=saved)))
print(compare("its saved probs", probs, saved["probs"]))

# %% [markdown]
# ### Where a patch looks
#
# Take the patch at the center of the circle and draw, for every head of the **last** layer,
# its attention weights over the grid on top of the image (brighter = more weight). A trace
# (`trace={}`) records every layer's weights as `vision.attn.NN` (and the decoder's as
# `text.attn.NN`), the same probabilities HF returns with `output_attentions`. In a trained
# model heads specialise: some stay on the object, some look at the other shapes or the background.

# %%
h = h0
for p in model.params["vision"]["layers"][:-1]:                   # run up to the last layer's input
    h = encoder_layer(h, p, vcfg)
last = model.params["vision"]["layers"][-1]
probs_last = attention_probs(layer_norm(h, **last["layer_norm1"], eps=vcfg.layer_norm_eps), last["self_attn"])
traced = {}                                                       # a trace records them for every layer
vision_tower(pixel_values, model.params["vision"], vcfg, trace=traced)
print(compare(f"by hand == traced vision.attn.{L - 1:02d}", probs_last, traced[f"vision.attn.{L - 1:02d}"]))

scene = make_scene(SAMPLE_SEED)                                            # the sample scene's ground truth
circle = next(o for o in scene.objects if o.shape == "circle")
cy, cx = ((circle.box[0] + circle.box[2]) / 2, (circle.box[1] + circle.box[3]) / 2)
query = int(cy * R / scene.size // P) * g + int(cx * R / scene.size // P)
print(f"query: patch {query} (the circle's center); layer {L - 1}")

shown = (pixel_values[0].transpose(1, 2, 0) + 1) / 2
cols = min(Hq, 8)
rows = -(-Hq // cols)
fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
for hh, ax in enumerate(axes.flat):
    ax.axis("off")
    if hh >= Hq:
        continue
    ax.imshow(shown, extent=(0, R, R, 0))
    ax.imshow(probs_last[0, hh, query].reshape(g, g), extent=(0, R, R, 0), cmap="magma", alpha=0.7)
    qy, qx = divmod(query, g)
    ax.plot(qx * P + P / 2, qy * P + P / 2, "c+", ms=8)
    ax.set_title(f"head {hh}", fontsize=9)
plt.show()

# %% [markdown]
# ## 3. The MLP
#
# Two linear layers with the tanh approximation of GELU between them:
# $\operatorname{gelu}_{\tanh}(x) = \tfrac12 x\,(1 + \tanh(\sqrt{2/\pi}\,(x + 0.044715x^3)))$ (HF's
# `gelu_pytorch_tanh`). It differs from the exact, erf-based GELU by less than $10^{-3}$, which is
# still far above fp32 tolerances: the model must use the one it was trained with.

# %%
from math import erf

z = np.linspace(-4, 4, 401, dtype=np.float32)
exact = 0.5 * z * (1 + np.array([erf(t / np.sqrt(2)) for t in z]))
fig, axes = plt.subplots(1, 2, figsize=(8, 2.6))
axes[0].plot(z, gelu_tanh(z), label="gelu_tanh")
axes[0].plot(z, np.maximum(z, 0), "--", lw=0.8, label="relu")
axes[0].legend()
axes[0].set_title("GELU (tanh approximation)")
axes[1].plot(z, gelu_tanh(z) - exact)
axes[1].set_title("gelu_tanh - exact gelu")
plt.show()

ln2 = layer["layer_norm2"]
h1 = h0 + out                                                     # after the attention branch
hidden = gelu_tanh(linear(layer_norm(h1, **ln2, eps=vcfg.layer_norm_eps), **layer["mlp"]["fc1"]))
print(f"MLP: {list(h1.shape)} -> fc1 {list(hidden.shape)} -> fc2 {list(linear(hidden, **layer['mlp']['fc2']).shape)}")

# %% [markdown]
# ## 4. One layer, then the tower
#
# The two residual branches make `encoder_layer`. `vision_tower` runs all of them and the final
# LayerNorm, and records every stage in a trace under the names the goldens use. The residual
# stream's size per layer shows how much each layer adds.

# %%
h2 = h1 + mlp(layer_norm(h1, **ln2, eps=vcfg.layer_norm_eps), layer["mlp"])
print(compare("h + attn + mlp == encoder_layer", h2, encoder_layer(h0, layer, vcfg)))

trace = {}
features = vision_tower(pixel_values, model.params["vision"], vcfg, trace=trace)
stages = vision_stage_names(L)                                         # the residual stream
print(f"vision_tower: {list(pixel_values.shape)} -> {list(features.shape)}; stages: {stages} "
      f"(+ {len(trace) - len(stages)} attention maps)")
rms = [np.sqrt((trace[name] ** 2).mean()) for name in stages]
fig, ax = plt.subplots(figsize=(6, 2.4))
ax.plot(range(len(rms)), rms, "o-")
ax.set_xticks(range(len(rms)), [n.replace("vision.", "") for n in stages], rotation=45, fontsize=8)
ax.set_ylabel("RMS of h")
plt.show()

# %% [markdown]
# ## Check against Hugging Face
#
# Start from HF's `vision.embed` of the golden model `pg1_gqa_v5` (3 layers, 4 heads), apply
# `encoder_layer` layer by layer and the post-LayerNorm, and compare every stage with HF's
# (the committed tensors of `tests/goldens/`: no torch needed).

# %%
golden = dict(np.load(GOLDENS / "pg1_gqa_v5" / "goldens.npz"))
gm = npvlm.load(GOLDENS / "pg1_gqa_v5" / "model")
gp, gv = gm.params["vision"], gm.cfg.vision
ours, h = {}, golden["vision.embed"]
for i, p in enumerate(gp["layers"]):
    h = ours[f"vision.layer.{i:02d}"] = encoder_layer(h, p, gv)
ours["vision.post_norm"] = layer_norm(h, **gp["post_layernorm"], eps=gv.layer_norm_eps)
results = compare_stages(ours, golden, list(ours))
assert all(r.ok for r in results)

# %% [markdown]
# ## Exercises
#
# 1. In `attention_probs` (section 2), drop the scale: use `q @ k.swapaxes(-1, -2)` without
#    `* E ** -0.5`. Predict whether each row still sums to 1, whether the weights get sharper or
#    flatter, and which check lines fail; the printed lines of section 2 (and the
#    `by hand == traced` line below it) show it.
# 2. In the "Where a patch looks" cell, change `circle` to the square
#    (`o.shape == "square"`). Predict which patch number becomes the query and whether the
#    heads that stayed on the circle now stay on the square; the figure shows it.
# 3. In section 1, compute `plain` with `eps=1.0` instead of `vcfg.layer_norm_eps`. Predict the
#    printed std range of the normalised tokens (still 1, or below 1?) given the per-token std
#    printed just above it; rerun the cell to see.
