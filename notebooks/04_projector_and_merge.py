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
# # 04 · The projector and the merge: image tokens in the text stream
#
# **Goal.** Bring the SigLIP features to the decoder's width and place them in the token
# sequence, where the `<image>` placeholders are.
#
# $$
# \text{img}_n = W_p\, f_n + b_p \quad (W_p \in \mathbb{R}^{D \times D_v}), \qquad
# h_t = \begin{cases} \text{img}_{n(t)} & \text{if } \text{id}_t = \texttt{<image>} \\
# \sqrt{D}\; E[\text{id}_t] & \text{otherwise} \end{cases}
# $$
#
# The projector is one linear layer, no activation. Text embeddings are multiplied by
# $\sqrt{D}$, with the constant first cast to float32 (Gemma's `GemmaTextScaledWordEmbedding`);
# image tokens are **not** scaled. (HF 4.x divided the image tokens by $\sqrt{D}$ and then scaled
# the whole sequence by $\sqrt{D}$: the same result.) Code: `npvlm/model/paligemma.py`
# (`encode_images`, `merge_embeddings`), `npvlm/model/gemma.py` (`embed_tokens`).

# %%
# The model these notebooks run on. "demo" is the small PaliGemma embedded in npvlm
# (npvlm/demo/model). Set MODEL to a real checkpoint folder instead, e.g. a downloaded
# google/paligemma-3b-mix-224 (docs/checkpoints.md): every size is read from model.cfg.
MODEL = "demo"


import matplotlib.pyplot as plt
import numpy as np

import npvlm
from npvlm.demo import SAMPLE_SCENE
from npvlm.errors import InputError
from npvlm.model.gemma import embed_tokens
from npvlm.model.layers import linear
from npvlm.model.paligemma import encode_images, merge_embeddings
from npvlm.model.siglip import vision_tower
from npvlm.parity import GOLDENS, compare, compare_stages

plt.rcParams.update({"figure.dpi": 72, "image.interpolation": "nearest"})

model = npvlm.load(MODEL)
cfg = model.cfg
N, Dv, D = cfg.num_image_tokens, cfg.vision.hidden_size, cfg.text.hidden_size
print(model)
print(f"N = {N} image tokens, SigLIP width D_v = {Dv}, decoder width D = {D}, <image> id {cfg.image_token_index}")

inputs = model.processor([SAMPLE_SCENE], ["answer en what color is the circle?"])
ids = inputs["input_ids"]
print({k: list(a.shape) for k, a in inputs.items()})

# %% [markdown]
# ## 1. The projector
#
# `[B, N, D_v] @ W_pᵀ + b_p -> [B, N, D]`. `encode_images` is the vision tower followed by this
# one layer.

# %%
features = vision_tower(inputs["pixel_values"], model.params["vision"], cfg.vision)     # [B, N, D_v]
W = model.params["projector"]["weight"]
print(f"features {list(features.shape)} @ W.T {list(W.T.shape)} + b {list(model.params['projector']['bias'].shape)}")
image_tokens = linear(features, **model.params["projector"])                          # [B, N, D]
print(f"image_tokens {list(image_tokens.shape)}")
print(compare("linear == encode_images", image_tokens, encode_images(inputs["pixel_values"], model.params, cfg)))

# %% [markdown]
# ## 2. Text embeddings and the sqrt(D) scale
#
# The embedding table `[V, D]` is also the output layer (tied weights), so its rows are sized
# for dot products with the final hidden state, not for the residual stream: its entries are
# small (roughly $1/\sqrt{D}$). Multiplying by $\sqrt{D}$ brings them to size $\sim 1$.
# The constant is rounded to float32 *before* the multiply, as HF does.

# %%
embed = model.params["text"]["embed_tokens"]                  # {"weight": [V, D]}: embed_tokens, merge_embeddings and lm_head take it
table = embed["weight"]                                                                # [V, D]
scale32 = np.float32(cfg.text.embed_scale)
print(f"embed_tokens {list(table.shape)}; sqrt({D}) = {cfg.text.embed_scale!r} -> float32 {scale32!r}")
text_ids = ids[:, N:]                                                                  # after the <image> run
text_h = embed_tokens(text_ids, embed, cfg.text)                                       # [B, T-N, D]
print(f"text ids {list(text_ids.shape)} -> {list(text_h.shape)}")
print(compare("table[ids] * float32(sqrt(D))", text_h, table[text_ids] * scale32))

# %% [markdown]
# ## 3. The merge
#
# `merge_embeddings` embeds every id (the `<image>` ids as a dummy row), then writes the image
# tokens, in order, over the `<image>` positions: image `b` fills row `b`'s `<image>` run.

# %%
h = merge_embeddings(ids, image_tokens, embed, cfg)                                    # [B, T, D]
is_image = ids == cfg.image_token_index
print(f"merged h {list(h.shape)}: {int(is_image.sum())} image positions, {int((~is_image).sum())} text positions")
print(compare("image positions hold the image tokens", h[is_image], image_tokens.reshape(-1, D)))
print(compare("text positions hold sqrt(D)-scaled rows", h[~is_image], (table[ids[~is_image]] * scale32)))

# %% [markdown]
# Per position, the size of what enters the decoder: image tokens on the left, text tokens on
# the right. Without the $\sqrt{D}$ scale (dashed) the text tokens would be $\sqrt{D}$ times
# smaller (log scale: a constant gap); the model was trained with the scale, and the image
# tokens were learned to sit next to scaled text.

# %%
rms = np.sqrt((h[0] ** 2).mean(-1))
unscaled = np.sqrt((table[ids[0]] ** 2).mean(-1))
fig, ax = plt.subplots(figsize=(8, 2.6))
ax.plot(np.arange(N), rms[:N], ".", label="image tokens (projector output)")
ax.plot(np.arange(N, len(rms)), rms[N:], "o", label="text tokens x sqrt(D)")
ax.plot(np.arange(N, len(rms)), unscaled[N:], "x--", label="text tokens unscaled")
ax.set_xlabel("position t")
ax.set_ylabel("RMS of h[t]")
ax.set_yscale("log")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 4. A batch: left padding
#
# Prompts of different lengths are left-padded, so every row ends at the same column and each
# row's `<image>` run starts after its padding. The merge fills each run with that row's image.

# %%
batch = model.processor([SAMPLE_SCENE, SAMPLE_SCENE], ["caption en", "answer en how many shapes are there?"])
bids = batch["input_ids"]
kind = np.where(batch["attention_mask"] == 0, 0, np.where(bids == cfg.image_token_index, 1, 2))
fig, ax = plt.subplots(figsize=(8, 1.2))
ax.imshow(kind, cmap=plt.matplotlib.colors.ListedColormap(["lightgray", "tab:orange", "tab:blue"]), aspect="auto")
ax.set_yticks([0, 1], ["row 0", "row 1"])
ax.set_xlabel("position: gray = padding, orange = <image>, blue = text")
plt.show()
bh = merge_embeddings(bids, encode_images(batch["pixel_values"], model.params, cfg), embed, cfg)
print(f"batch input_ids {list(bids.shape)} -> merged {list(bh.shape)}")

# %% [markdown]
# The counts are checked on the host, where the model takes a batch (`PaliGemma.device_batch`,
# before anything moves to the device; the math itself reads no device value to check them): a
# row must hold exactly one image's worth of `<image>` ids.

# %%
try:
    model.prefill(ids[:, 1:], inputs["attention_mask"][:, 1:], inputs["pixel_values"])   # one <image> id short
except InputError as e:
    print("InputError:", e)

# %% [markdown]
# ## Check against Hugging Face
#
# On the golden model `pg1_mqa_hub` (a left-padded batch of two), run the projector on HF's
# SigLIP output and merge with the golden `input_ids`; compare with HF's `projector` and
# `text.embed` (on real tokens: the pad rows are never used). The goldens are committed tensors:
# no torch needed.

# %%
golden = dict(np.load(GOLDENS / "pg1_mqa_hub" / "goldens.npz"))
gm = npvlm.load(GOLDENS / "pg1_mqa_hub" / "model")
ours = {"projector": linear(golden["vision.post_norm"], **gm.params["projector"])}
ours["text.embed"] = merge_embeddings(golden["input_ids"], ours["projector"], gm.params["text"]["embed_tokens"], gm.cfg)
real = golden["attention_mask"].astype(bool)
results = compare_stages(ours, golden, ["projector", "text.embed"],
                         where=lambda name: real if name == "text.embed" else None)
assert all(r.ok for r in results)

# %% [markdown]
# ## Exercises
#
# 1. In section 2, drop the scale: compare `text_h` with `table[text_ids]` instead of
#    `table[text_ids] * scale32`. Predict the printed `max rel` (the ratio is √D for every
#    entry) and whether the line passes; rerun the cell to see.
# 2. In section 4, ask a third, longer prompt: add `SAMPLE_SCENE` and
#    `"answer en what color is the triangle?"` to the two lists. Predict which rows get gray
#    padding and how many columns each one loses to it; the batch figure and the printed shape
#    show it.
# 3. In the count check cell, keep `ids` whole and pass the pixels of two images
#    (`np.concatenate([inputs["pixel_values"]] * 2)`). Predict whether the error message now
#    counts fewer `<image>` ids or more image features; the printed `InputError` shows it.
