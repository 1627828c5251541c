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
# # 02 · Patch embedding: the convolution as reshape + matmul
#
# **Goal.** Cut the image into a grid of `P x P` patches and map each patch to one vector of the
# SigLIP width $D_v$, plus a learned position embedding. These $N = (R/P)^2$ vectors are the
# image's tokens from here on.
#
# SigLIP writes this as a `Conv2d(3, D_v, kernel=P, stride=P)`. Because the stride equals the
# kernel, the windows do not overlap, and the convolution is one matrix product over flattened
# patches:
#
# $$
# e_n = W\,\operatorname{vec}(x_{[:,\,P g_y : P g_y + P,\; P g_x : P g_x + P]}) + b + \text{pos}_n,
# \qquad n = g_y \cdot (R/P) + g_x,\quad W \in \mathbb{R}^{D_v \times 3P^2}.
# $$
#
# Code: `npvlm/model/siglip.py` (`patchify`, `patch_embed`). Shapes:
# `[B, C, R, R] -> [B, C, g, P, g, P] -> [B, g, g, C, P, P] -> [B, N, C·P·P] -> [B, N, D_v]`.

# %%
# The model these notebooks run on. "demo" is the small PaliGemma embedded in npvlm
# (npvlm/demo/model). Set MODEL to a real checkpoint folder instead, e.g. a downloaded
# google/paligemma-3b-mix-224 (docs/checkpoints.md): every size is read from model.cfg.
MODEL = "demo"


import matplotlib.pyplot as plt
import numpy as np

import npvlm
from npvlm.demo import SAMPLE_SCENE
from npvlm.model.siglip import patch_embed, patchify
from npvlm.parity import GOLDENS, compare, compare_stages

plt.rcParams.update({"figure.dpi": 72, "image.interpolation": "nearest"})

model = npvlm.load(MODEL)
vcfg = model.cfg.vision
R, P, g, N = vcfg.image_size, vcfg.patch_size, vcfg.grid_size, vcfg.num_patches
Dv = vcfg.hidden_size
print(model)
print(f"R = {R}, P = {P}: a {g} x {g} grid, N = {N} patches of C·P·P = {3 * P * P} values, width D_v = {Dv}")

pixel_values = model.processor([SAMPLE_SCENE], ["caption en"])["pixel_values"]   # [1, 3, R, R] (notebook 01)
print(f"pixel_values {list(pixel_values.shape)}")

# %% [markdown]
# ## 1. The patch grid
#
# Patches are numbered row-major over the grid: left to right, then top to bottom. There is no
# CLS token; every patch becomes one image token.

# %%
shown = (pixel_values[0].transpose(1, 2, 0) + 1) / 2          # back to [0, 1] for display
fig, ax = plt.subplots(figsize=(4, 4))
ax.imshow(shown, extent=(0, R, R, 0))
for k in range(g + 1):
    ax.axhline(k * P, color="white", lw=0.8)
    ax.axvline(k * P, color="white", lw=0.8)
if g <= 16:                                                   # numbers stay readable
    for n in range(N):
        gy, gx = divmod(n, g)
        ax.text(gx * P + P / 2, gy * P + P / 2, str(n), ha="center", va="center", fontsize=7, color="black")
ax.set_title(f"{g} x {g} patches of {P} x {P} px")
ax.set_xticks([])
ax.set_yticks([])
plt.show()

# %% [markdown]
# ## 2. Patchify: a reshape and a transpose
#
# `patchify` never copies pixels around one by one: a reshape splits each image axis into
# (grid, within-patch), a transpose brings the two grid axes to the front, a reshape flattens each
# patch in `(C, P, P)` order — the order of the Conv2d kernel's input axes.

# %%
patches = patchify(pixel_values, P)                            # [B, N, C*P*P]
print(f"patchify: {list(pixel_values.shape)} -> {list(patches.shape)}")

n = N // 2 + g // 2                                            # a patch near the center
gy, gx = divmod(n, g)
crop = pixel_values[0, :, gy * P:(gy + 1) * P, gx * P:(gx + 1) * P]     # [C, P, P]
print(f"patch {n} is grid cell (row {gy}, col {gx}); equal to the crop:",
      np.array_equal(patches[0, n].reshape(3, P, P), crop))

# %% [markdown]
# ## 3. The kernel
#
# The checkpoint stores the Conv2d weight as `[D_v, C, P, P]`; npvlm keeps it as `[D_v, C·P·P]`
# (the same numbers, reshaped once at load), so a patch times its transpose is the convolution.
# Each of the $D_v$ rows is a filter over one patch: drawn as a small `P x P` color image, it is
# the pattern that output feature responds to.

# %%
W = model.params["vision"]["patch_embedding"]["weight"]        # [D_v, C*P*P]
b = model.params["vision"]["patch_embedding"]["bias"]          # [D_v]
print(f"patch_embedding weight {list(W.shape)}, bias {list(b.shape)}")

filters = W[:16].reshape(-1, 3, P, P).transpose(0, 2, 3, 1)    # first 16 filters as [P, P, C] images
fig, axes = plt.subplots(2, 8, figsize=(8, 2.2))
for k, ax in enumerate(axes.flat):
    f = filters[k]
    ax.imshow((f - f.min()) / (np.ptp(f) + 1e-12))
    ax.set_title(str(k), fontsize=8)
    ax.axis("off")
fig.suptitle("patch filters (rows of W), each scaled to [0, 1]", fontsize=10)
plt.show()

# %% [markdown]
# ## 4. The matmul is the convolution
#
# Compute the convolution the slow, literal way — slide the `[D_v, C, P, P]` kernel over the
# image with stride P and sum the products — and compare it with `patches @ W.T + b`.

# %%
kernel = W.reshape(Dv, 3, P, P)                                             # the Conv2d weight
windows = np.lib.stride_tricks.sliding_window_view(pixel_values[0], (P, P), axis=(1, 2))[:, ::P, ::P]
print(f"stride-P windows {list(windows.shape)} (C, g, g, P, P)")
conv = np.einsum("cyxij,dcij->yxd", windows, kernel, optimize=True) + b     # [g, g, D_v]
matmul = patches[0] @ W.T + b                                               # [N, D_v]
print(compare("conv == patches @ W.T", matmul, conv.reshape(N, Dv)))

# %% [markdown]
# ## 5. Position embeddings
#
# A learned `[N, D_v]` table is added, one row per grid cell (SigLIP's are learned, not
# sinusoidal), so the model knows where each patch came from. The cosine similarity of a few
# cells' embeddings with every other cell, and its average over cells at the same grid distance,
# show what the model learned about the layout: if it learned the 2-D grid, near cells are more
# alike than far ones.

# %%
pos = model.params["vision"]["position_embedding"]["weight"] # [N, D_v]
unit = pos / np.linalg.norm(pos, axis=1, keepdims=True)
cos_sim = unit @ unit.T                                       # [N, N]
np.fill_diagonal(cos_sim, np.nan)                             # a cell with itself is always 1
cells = [0, g - 1, n, N - 1]
lim = np.nanmax(np.abs(cos_sim[cells]))
fig, axes = plt.subplots(1, len(cells) + 1, figsize=(12, 2.5))
for ax, c in zip(axes, cells):
    im = ax.imshow(cos_sim[c].reshape(g, g), cmap="coolwarm", vmin=-lim, vmax=lim)
    ax.plot(c % g, c // g, "k+", ms=10)
    ax.set_title(f"cos(pos[{c}], pos[n])", fontsize=9)
    ax.axis("off")
fig.colorbar(im, ax=axes[:-1], shrink=0.8)
gy, gx = np.divmod(np.arange(N), g)
distance = np.abs(gy[:, None] - gy[None]) + np.abs(gx[:, None] - gx[None])   # grid steps between cells
ks = np.arange(1, g + 1)                                       # far distances have few pairs
axes[-1].plot(ks, [np.nanmean(cos_sim[distance == k]) for k in ks], "o-", ms=3)
axes[-1].axhline(0, color="gray", lw=0.6)
axes[-1].set_xlabel("grid distance")
axes[-1].set_title("mean cos similarity", fontsize=9)
plt.show()

embedded = patch_embed(pixel_values, model.params["vision"], vcfg)   # [B, N, D_v]
print(f"patch_embed: {list(pixel_values.shape)} -> {list(embedded.shape)}  (traced as 'vision.embed')")
print(compare("patch_embed == matmul + pos", embedded[0], matmul + pos))

# %% [markdown]
# ## Check against Hugging Face
#
# `tests/goldens/pg1_gqa_v5` is a tiny random PaliGemma (image 56 px, patch 14: a 4 x 4 grid)
# with the tensors HF transformers computed for it (`tests/make_goldens.py`; committed, so no
# torch is needed here). Run its `pixel_values` through `patch_embed` and through the literal
# convolution, and compare both with HF's `vision.embed`.

# %%
golden = dict(np.load(GOLDENS / "pg1_gqa_v5" / "goldens.npz"))
gm = npvlm.load(GOLDENS / "pg1_gqa_v5" / "model")
gp, gv = gm.params["vision"], gm.cfg.vision
ours = {"vision.embed": patch_embed(golden["pixel_values"], gp, gv)}
results = compare_stages(ours, golden, ["vision.embed"])

P_, g_ = gv.patch_size, gv.grid_size
win = np.lib.stride_tricks.sliding_window_view(golden["pixel_values"], (P_, P_), axis=(2, 3))[:, :, ::P_, ::P_]
k_ = gp["patch_embedding"]["weight"].reshape(gv.hidden_size, 3, P_, P_)
conv = np.einsum("bcyxij,dcij->byxd", win, k_, optimize=True) + gp["patch_embedding"]["bias"]
literal = conv.reshape(conv.shape[0], g_ * g_, -1) + gp["position_embedding"]["weight"]
results.append(compare("literal convolution", literal, golden["vision.embed"]))
print(results[-1])
assert all(r.ok for r in results)

# %% [markdown]
# ## Exercises
#
# 1. In section 2, set `n = 0` (the top-left patch) and rerun it. Predict the printed grid cell
#    (row, col) and whether the patch still equals its crop; then try `n = g` (the first patch of
#    the second grid row).
# 2. In section 4, flatten the patches in the wrong order: replace `patches[0] @ W.T + b` with
#    `patches[0].reshape(N, 3, P, P).transpose(0, 2, 3, 1).reshape(N, -1) @ W.T + b`
#    (`(P, P, C)` instead of `(C, P, P)`). Predict whether `conv == patches @ W.T` still passes;
#    the printed line shows it.
# 3. In section 5, replace `pos` by a shuffled copy, `pos = pos[np.random.default_rng(0).permutation(N)]`,
#    right after it is read. Predict the shape of the mean-similarity-by-distance curve (does it
#    still fall with distance?); rerun the cell to see. (The last check line then fails too:
#    the model's own table is no longer the one added.)
