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
# # 08 · Detection and segmentation: from tokens to boxes and masks
#
# **Goal.** Read PaliGemma's structured answers. For `detect ...` the model writes, per object,
# four location tokens and a label; for `segment ...` it adds 16 codes of a small VQ-VAE that
# decodes to the object's mask:
#
# ```
# <locY1><locX1><locY2><locX2> label ; <loc...><loc...><loc...><loc...> label ; ...
# <locY1><locX1><locY2><locX2><segA>...<segP> label            (a segmentation record)
# ```
#
# - Corners come **y first**: `y_min, x_min, y_max, x_max`. Each is a bin `0..1023` along the image
#   height (y) or width (x) of the square the model saw, which is the whole image squashed, so a
#   bin maps straight back to the original image:
#   $$ y = \frac{\text{bin}}{1024}\cdot H, \qquad x = \frac{\text{bin}}{1024}\cdot W $$
#   (big_vision's evaluator divides by 1023; the two differ by under one bin.)
# - The 16 `<segNNN>` codes (0..127) are a 4 x 4 grid of codebook indices; the VQ-VAE decoder
#   turns them into a 64 x 64 mask for the inside of the box, which is then resized into the box.
#
# Code: `npvlm/tasks/detection.py` (`parse_detections`, `encode_box`), `npvlm/metrics` (`box_iou`), `npvlm/tasks/segmentation.py`
# (`load_vae`, `decode_masks`, `paste_mask`, `object_masks`), `npvlm/tasks/draw.py` (`draw_objects`).

# %%
# The model these notebooks run on. "demo" is the small PaliGemma embedded in npvlm
# (npvlm/demo/model). Set MODEL to a real checkpoint folder instead, e.g. a downloaded
# google/paligemma-3b-mix-224 (docs/checkpoints.md), and the notebook runs unchanged on it.
MODEL = "demo"

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import npvlm
from npvlm.demo import SAMPLE_SCENE, SAMPLE_SEED
from npvlm.demo.scenes import detection_text, make_scene
from npvlm.inputs.image import load_image
from npvlm.metrics import box_iou as iou
from npvlm.parity import compare
from npvlm.tasks.detection import encode_box, parse_detections
from npvlm.tasks.draw import draw_objects
from npvlm.tasks.segmentation import decode_masks, load_vae, object_masks, paste_mask

ROOT = Path(npvlm.__file__).resolve().parent.parent
# The mask decoder. tests/fixtures/vae/vae-tiny.npz has the official layout but RANDOM weights
# (a test fixture), so its masks are meaningless blobs; for real masks point VAE at the official
# vae-oid.npz (gs://big_vision/paligemma/vae-oid.npz).
VAE = ROOT / "tests" / "fixtures" / "vae" / "vae-tiny.npz"

plt.rcParams.update({"figure.dpi": 72, "image.interpolation": "nearest"})


def show_at_size(panels, gap=16, title_px=24):
    """Show (title, PIL image) panels side by side at one figure pixel per image pixel (dpi 72):
    a plot that shrinks the image would resample the labels of `draw_objects` into a blur."""
    width = sum(im.width for _, im in panels) + gap * (len(panels) - 1)
    height = max(im.height for _, im in panels) + title_px
    fig = plt.figure(figsize=(width / 72, height / 72))
    x = 0
    for title, im in panels:
        ax = fig.add_axes((x / width, 0, im.width / width, im.height / height))
        ax.imshow(im)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
        x += im.width + gap
    plt.show()


model = npvlm.load(MODEL)
tok = model.tokenizer
image = load_image(SAMPLE_SCENE)
W, H = image.size
scene = make_scene(SAMPLE_SEED)                                   # the sample scene's ground truth
print(model)
print(f"image {W}x{H}; objects: {[(o.color, o.shape, o.box) for o in scene.objects]}")

# %% [markdown]
# ## 1. A detection answer
#
# Ask for every kind of object at once (`;` separates the classes in the prompt, and the records
# in the answer). The demo learned this three-label prompt in its fine-tuning (docs/demo.md).

# %%
PROMPT = "detect circle ; square ; triangle"
out = model.generate(SAMPLE_SCENE, PROMPT, max_new_tokens=32)
print(f"{PROMPT!r} -> {out.text!r}")
print("tokens:", [tok.decode([i]) for i in out.tokens])

# %% [markdown]
# ## 2. Tokens to boxes
#
# `parse_detections` splits the records, reads the four bins, checks them, and maps them to
# pixels. Records that are malformed (a wrong number of tokens, an empty box, no label) come back
# as problems with the offending text — never dropped silently, never repaired.

# %%
found = parse_detections(out.text, W, H)
for o in found.objects:
    print(f"{o.label:<8} bins {o.bins} -> box (y1, x1, y2, x2) = {tuple(round(v, 1) for v in o.box)} px")
for pr in found.problems:
    print(f"problem: {pr.reason}: {pr.text!r}")

bins = (512, 152, 759, 400)
print(f"\nby hand: bins {bins} -> y = bin / 1024 * {H}, x = bin / 1024 * {W} ->",
      tuple(round(b / 1024 * s, 1) for b, s in zip(bins, (H, W, H, W))))
print("malformed:", parse_detections("<loc0100><loc0200><loc0050> circle ; <loc0300><loc0100><loc0200><loc0400> square",
                                     W, H).problems)

# %% [markdown]
# The ground truth goes the other way: `encode_box` writes a box as tokens, as the training data
# did (`round(v / size * 1023)`). Drawn side by side, with the IoU (intersection over union) of
# each predicted box with the true box of its label:

# %%
truth = parse_detections(detection_text(scene, {"circle", "square", "triangle"}), W, H, divisor=1023).objects
print("truth as tokens:", " ; ".join(f"{encode_box(o.box, W, H)} {o.label}" for o in truth))
for o in found.objects:
    best = max((iou(o.box, t.box) for t in truth if t.label == o.label), default=0.0)
    print(f"predicted {o.label:<7} IoU with the truth {best:.2f}")

show_at_size([(f"model: {PROMPT!r}", draw_objects(image, found.objects)),
              ("ground truth", draw_objects(image, truth))])

# %% [markdown]
# ## 3. Segmentation: 16 codes to a mask
#
# Ask for a segmentation. The demo model was never taught `segment` (its world has no masks), so
# if the answer holds no complete `<seg>` record we write one by hand: the circle's true box and
# 16 codes from the VQ-VAE test fixture.

# %%
seg_out = model.generate(SAMPLE_SCENE, "segment circle", max_new_tokens=32)
segmented = [o for o in parse_detections(seg_out.text, W, H).objects if o.seg is not None]
print(f"'segment circle' -> {seg_out.text!r}: {len(segmented)} segmentation record(s)")
if not segmented:
    codes = np.load(ROOT / "tests" / "fixtures" / "vae" / "golden_masks.npz")["codes"][3]
    circle = next(t for t in truth if t.label == "circle")
    record = encode_box(circle.box, W, H) + "".join(f"<seg{c:03d}>" for c in codes) + " circle"
    segmented = list(parse_detections(record, W, H, divisor=1023).objects)
    print(f"hand-made record: {record}")
obj = segmented[0]
print(f"{obj.label}: box {tuple(round(v, 1) for v in obj.box)}, seg codes {obj.seg}")

# %% [markdown]
# The decoder: look the 16 codes up in the codebook (a 4 x 4 grid of D-dim vectors), a 1x1
# convolution, two residual blocks, four stride-2 transposed convolutions (4 → 8 → 16 → 32 → 64)
# and a final 1x1 convolution to one channel: a 64 x 64 mask logit, > 0 inside the object.
# `paste_mask` resizes it into the box, as the public PaliGemma demo does.

# %%
vae = load_vae(VAE)
trace = {}
mask64 = decode_masks([obj.seg], vae, trace=trace)                          # [1, 64, 64]
for name, a in trace.items():
    print(f"{name:<12} {list(a.shape)}")
full = paste_mask(mask64[0], obj.box, W, H)                            # bool [H, W]
print(f"pasted: {full.dtype} {list(full.shape)}, {int(full.sum())} pixels inside the mask")

fig, axes = plt.subplots(1, 3, figsize=(9, 3))
axes[0].imshow(np.array(obj.seg).reshape(4, 4), cmap="tab20")
for (r, c), v in np.ndenumerate(np.array(obj.seg).reshape(4, 4)):
    axes[0].text(c, r, str(v), ha="center", va="center", fontsize=8)
axes[0].set_title("16 codes (4 x 4)")
axes[1].imshow(mask64[0], cmap="coolwarm", vmin=-1, vmax=1)
axes[1].set_title("decoded 64 x 64 logit")
axes[2].imshow(full, cmap="gray")
axes[2].set_title(f"pasted into the box, {W}x{H}")
for ax in axes:
    ax.axis("off")
fig.suptitle(f"VAE: {VAE.name}" + (" (random weights: the mask shape means nothing)" if VAE.name == "vae-tiny.npz" else ""),
             fontsize=10)
plt.show()
show_at_size([("drawn: mask, box and label", draw_objects(image, [obj], masks=object_masks([obj], vae, W, H)))])

# %% [markdown]
# ## Check
#
# - The mask decoder against its golden: masks that PyTorch computed for six code grids with the
#   fixture's weights (`tests/make_vae_fixture.py`, a `nn.Sequential` with the official layer
#   names; big_vision's `reconstruct_masks`). The golden is a committed file: no torch needed.
# - Boxes: every true box survives `encode_box` → `parse_detections` to within one bin, with
#   the labels in order.

# %%
fixture = np.load(ROOT / "tests" / "fixtures" / "vae" / "golden_masks.npz")
fixture_vae = load_vae(ROOT / "tests" / "fixtures" / "vae" / "vae-tiny.npz")
checks = [compare("vae.mask (PyTorch)", decode_masks(fixture["codes"], fixture_vae), fixture["masks"])]
print(checks[0])

all_truth = [(o.shape, o.box) for o in scene.objects]
text = " ; ".join(f"{encode_box(box, W, H)} {label}" for label, box in all_truth)
back = parse_detections(text, W, H, divisor=1023).objects
err = max(abs(a - b) for o, (_, box) in zip(back, all_truth) for a, b in zip(o.box, box))
print(f"{text}\n-> labels {[o.label for o in back]}, largest corner error {err:.2f} px (one bin = {max(W, H) / 1023:.2f} px)")
assert [o.label for o in back] == [s for s, _ in all_truth] and err <= max(W, H) / 1023
assert all(c.ok for c in checks)

# %% [markdown]
# ## Exercises
#
# 1. In section 2, change `bins` to `(0, 0, 1023, 1023)` and rerun it. Predict the printed box in
#    pixels: exactly the whole `W x H` image, or a little less (which divisor does the model's
#    side use)? The `by hand` line shows it.
# 2. In section 1, set `PROMPT = "detect triangle ; circle ; square"` and rerun sections 1 and 2.
#    The demo only ever saw the classes in the order circle, square, triangle: predict whether
#    the answer still holds three well-formed records, one per class; section 2 prints the
#    parsed boxes and a `problem:` line for each malformed record.
# 3. In the segmentation cell, replace `obj.seg` by `obj.seg[::-1]` (the 16 codes reversed) in
#    `decode_masks([obj.seg], ...)`. Predict whether the 64 x 64 logit is the old one flipped
#    (the codes are a 4 x 4 grid read row by row, then decoded by convolutions) or something
#    else; the decoded-logit panel shows it.
