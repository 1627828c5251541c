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
# # 01 · Image preprocessing: resize, rescale, normalize
#
# **Goal.** Turn any image into the tensor SigLIP reads: `pixel_values`, float32
# `[B, 3, R, R]` in `[-1, 1]` (R: the model's image side), exactly as Hugging Face's
# `SiglipImageProcessorPil` makes it.
#
# For an image $x$ with 8-bit RGB values:
#
# $$
# \text{pixel\_values} = \frac{\operatorname{uint8}\big(\operatorname{bicubic}_{R\times R}(x)\big)\cdot\tfrac{1}{255} - 0.5}{0.5}
# \quad\text{laid out channels first, } [3, R, R].
# $$
#
# Three details matter for equality with HF: the resize is PIL's bicubic filter and its result is
# rounded back to uint8 before anything else; the aspect ratio is **not** kept (the image is
# squashed to a square, nothing is cropped); the rescale runs in float64 and is then cast to
# float32. Code: `npvlm/inputs/image.py` (`load_image`, `preprocess`).

# %%
# The model these notebooks run on. "demo" is the small PaliGemma embedded in npvlm
# (npvlm/demo/model). Set MODEL to a real checkpoint folder instead, e.g. a downloaded
# google/paligemma-3b-mix-224 (docs/checkpoints.md): the image side R is read from model.cfg, so
# the notebook runs unchanged.
MODEL = "demo"

import json
import tempfile
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

import npvlm
from npvlm.demo import SAMPLE_SCENE
from npvlm.inputs.image import MEAN, RESCALE, STD, load_image, preprocess
from npvlm.parity import compare

plt.rcParams.update({"figure.dpi": 72, "image.interpolation": "nearest"})

model = npvlm.load(MODEL)
R = model.cfg.vision.image_size
print(model)
print(f"the model reads R x R = {R} x {R} images")

# %% [markdown]
# ## 1. Load: any input becomes an upright RGB image
#
# `load_image` accepts a path, a PIL image or an array; it applies the EXIF orientation,
# composites transparency onto white and converts every mode (gray, palette, CMYK, 16-bit) to RGB.

# %%
image = load_image(SAMPLE_SCENE)
x = np.asarray(image)
print(f"{SAMPLE_SCENE.name}: PIL {image.mode} {image.size[0]}x{image.size[1]} -> array {x.dtype} {list(x.shape)} "
      f"(H, W, C), values {x.min()}..{x.max()}")

# %% [markdown]
# ## 2. Resize to R x R with PIL's bicubic filter
#
# The result is still uint8: PIL rounds and clips the filtered values. (`reducing_gap=None`
# asks PIL for the plain filter, with no faster two-step reduction for big downscales.) An image
# that is already R x R comes back unchanged.

# %%
resized = image.resize((R, R), resample=Image.Resampling.BICUBIC, reducing_gap=None)
r = np.asarray(resized)
print(f"resized: {r.dtype} {list(r.shape)}; unchanged: {r.shape == x.shape and np.array_equal(r, x)}")

fig, axes = plt.subplots(1, 2, figsize=(6, 3))
axes[0].imshow(x)
axes[0].set_title(f"file, {x.shape[1]}x{x.shape[0]}")
axes[1].imshow(r)
axes[1].set_title(f"resized, {R}x{R}")
for ax in axes:
    ax.axis("off")
plt.show()

# %% [markdown]
# The aspect ratio is not kept. A wide image (here the scene twice, side by side) is squashed
# horizontally, so circles become ellipses; models are trained on squashed images, so this is
# what they expect.

# %%
wide = Image.fromarray(np.concatenate([x, x], axis=1))
squashed = wide.resize((R, R), resample=Image.Resampling.BICUBIC, reducing_gap=None)
fig, axes = plt.subplots(1, 2, figsize=(7, 2.5), gridspec_kw={"width_ratios": [2, 1]})
axes[0].imshow(wide)
axes[0].set_title(f"{wide.size[0]}x{wide.size[1]}")
axes[1].imshow(squashed)
axes[1].set_title(f"{R}x{R}")
for ax in axes:
    ax.axis("off")
plt.show()

# %% [markdown]
# ## 3. Rescale to [0, 1] and normalize to [-1, 1]
#
# `x * (1/255)` in float64 (as HF's `rescale`), cast to float32, then `(x - 0.5) / 0.5` with
# mean and std 0.5 for every channel (HF's `IMAGENET_STANDARD_MEAN/STD`).

# %%
print(f"RESCALE = {RESCALE!r}, MEAN = {MEAN!r}, STD = {STD!r}")
rescaled = (r.astype(np.float64) * RESCALE).astype(np.float32)      # [R, R, C] in [0, 1]
normalized = (rescaled - MEAN) / STD                                 # [R, R, C] in [-1, 1]
pixel_values = np.ascontiguousarray(normalized.transpose(2, 0, 1))[None]   # [1, C, R, R]
print(f"rescaled   {rescaled.dtype} {list(rescaled.shape)} in [{rescaled.min():.3f}, {rescaled.max():.3f}]")
print(f"normalized {normalized.dtype} {list(normalized.shape)} in [{normalized.min():.3f}, {normalized.max():.3f}]")
print(f"pixel_values {pixel_values.dtype} {list(pixel_values.shape)} (B, C, R, R)")

# %% [markdown]
# The pixels before and after: the same picture, on a new scale. Each channel becomes one plane
# of `pixel_values`; the light background is near +1, a saturated color is near -1 in the channels
# it lacks.

# %%
fig, axes = plt.subplots(2, 3, figsize=(9, 5.5))
rgb = ["tab:red", "tab:green", "tab:blue"]
axes[0, 0].imshow(r)
axes[0, 0].set_title("before: uint8 RGB")
axes[0, 0].axis("off")
axes[0, 1].hist(r.reshape(-1, 3), bins=32, color=rgb, histtype="step")
axes[0, 1].set_title("before: values 0..255")
axes[0, 2].hist(pixel_values[0].reshape(3, -1).T, bins=32, color=rgb, histtype="step")
axes[0, 2].set_title("after: values -1..1")
for c, name in enumerate("RGB"):
    im = axes[1, c].imshow(pixel_values[0, c], cmap="coolwarm", vmin=-1, vmax=1)
    axes[1, c].set_title(f"after: channel {c} ({name})")
    axes[1, c].axis("off")
fig.colorbar(im, ax=axes[1], shrink=0.8)
plt.show()

# %% [markdown]
# ## 4. The same in one call, and in the processor
#
# `npvlm.inputs.image.preprocess(image, R)` is steps 1–3; the processor stacks one per prompt.

# %%
ours = preprocess(SAMPLE_SCENE, R)
batch = model.processor([SAMPLE_SCENE, SAMPLE_SCENE], ["caption en", "detect circle"])["pixel_values"]
print(f"preprocess -> {ours.dtype} {list(ours.shape)}; processor -> {list(batch.shape)}")

# %% [markdown]
# ## Check
#
# 1. The steps above equal `npvlm.inputs.image.preprocess`, and the processor's batch.
# 2. Hand values: a uniform color stays uniform under any resize, so every pixel must be
#    exactly `(c / 255 - 0.5) / 0.5`.
# 3. The committed Hugging Face golden `tests/goldens/preprocess/goldens.npz`, made by
#    `tests/make_preprocess_goldens.py` with transformers' `SiglipImageProcessorPil`: 18 cases,
#    each an input (the bytes of a PNG file, so its PIL mode, palette and transparency travel
#    with it, or an HWC array) and HF's `pixel_values` for it. They cover every PIL mode, up- and
#    downscaling, and the sample scene at 64 px (the demo model's side) and 224 px. Each PNG is
#    written to a file and read back by npvlm, as `tests/test_image.py` does; no torch or
#    transformers needed.
# 4. When transformers is installed (`pip install -e ".[reference]"`), also HF's processor live on
#    the sample scene at this model's side R.

# %%
checks = [compare("steps == preprocess", pixel_values, ours[None]),
          compare("processor row 0", batch[0], ours), compare("processor row 1", batch[1], ours)]

color = (255, 0, 128)
flat = preprocess(np.full((37, 53, 3), color, np.uint8), R)                  # [3, R, R]
expected = np.array([(c / 255 - 0.5) / 0.5 for c in color], np.float32)[:, None, None]
checks.append(compare("uniform color", flat, np.broadcast_to(expected, flat.shape)))

PREPROCESS = Path(npvlm.__file__).resolve().parent.parent / "tests" / "goldens" / "preprocess"
cases = json.loads((PREPROCESS / "meta.json").read_text())["cases"]
print(f"{len(cases)} golden cases, made by {json.loads((PREPROCESS / 'meta.json').read_text())['processor']}")
with np.load(PREPROCESS / "goldens.npz") as g, tempfile.TemporaryDirectory() as tmp:
    for name, case in cases.items():
        data, ref = g[f"{name}.input"], g[f"{name}.pixels"]            # input; HF float32 [3, size, size]
        if case["kind"] == "png":                                      # the file's bytes: read from disk
            path = Path(tmp) / f"{name}.png"
            path.write_bytes(data.tobytes())
            data = path
        checks.append(compare(f"golden {name}", preprocess(data, case["size"]), ref, atol=1e-6, rtol=0))

try:
    with warnings.catch_warnings():          # transformers' import warns about tqdm widgets
        warnings.simplefilter("ignore")
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
except ImportError:
    print("transformers not installed: skipping the live comparison with HF (pip install -e '.[reference]')")
else:
    hf = SiglipImageProcessorPil(size={"height": R, "width": R})(images=image, return_tensors="np")
    checks.append(compare("HF SiglipImageProcessorPil, live", ours, hf["pixel_values"][0]))
for c in checks:
    print(c)
assert all(c.ok for c in checks)

# %% [markdown]
# ## Exercises
#
# 1. In section 2, replace `Image.Resampling.BICUBIC` with `Image.Resampling.BILINEAR` in the
#    first resize and rerun sections 2–4 and the check. Predict which check lines turn to `FAIL`
#    (the hand-made steps no longer equal `preprocess`; the uniform-color check does not use
#    them) and roughly how large `max|Δ|` gets; the printed `steps == preprocess` line shows it.
# 2. In the check cell, pass `case["size"] // 2` instead of `case["size"]` to `preprocess`.
#    Predict what `compare` reports when the shapes differ (`max|Δ|=inf`, `FAIL`) and that the
#    final `assert` stops the cell; run it to see.
# 3. In section 3, replace `(rescaled - MEAN) / STD` with `rescaled` (skip the normalization).
#    Predict the range printed for `normalized`, and how the channel planes of the figure change
#    on their fixed -1..1 color scale (does anything stay blue?); rerun section 3, the figure and
#    the check (`steps == preprocess` fails) to see.
