"""Drawing detections onto an image (masks, boxes and labels), for `run.py --draw` and notebooks."""

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import InputError

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (128, 128, 0)]
MASK_ALPHA = 0.45   # opacity of a mask pixel whose mask value is 1


def _mask_alpha(masks, n_objects, width, height):
    """Check `masks` and return float32 [H, W] alphas in [0, 1] (None where an object has none)."""
    if not isinstance(masks, (list, tuple)) or len(masks) != n_objects:
        got = len(masks) if isinstance(masks, (list, tuple)) else type(masks).__name__
        raise InputError(f"masks must be a list with one [H, W] mask (or None) per object: "
                         f"{n_objects} object(s), got {got}")
    out = []
    for i, m in enumerate(masks):
        if m is None:
            out.append(None)
            continue
        m = np.asarray(m)
        if m.shape != (height, width):
            raise InputError(f"mask {i} has shape {list(m.shape)}; "
                             f"the image needs [{height}, {width}] (H, W)")
        out.append(np.clip(m.astype(np.float32), 0.0, 1.0))   # bool -> 0/1, soft masks kept
    return out


def draw_objects(image, objects, masks=None, scale=None, alpha=MASK_ALPHA):
    """A copy of `image` (PIL, RGB) with each object's mask, box and label drawn, in that order
    (masks under the boxes, labels on top).

    objects: DetectedObject-like (.label, .box = (y_min, x_min, y_max, x_max) in the image's own
    pixels). masks: None, or one entry per object: None, or a full-image bool/float [H, W] mask
    (`segmentation.paste_mask`), tinted translucently in the object's color (opacity `alpha`
    times the mask value). Small images are upscaled first (nearest) so labels stay readable;
    `scale` overrides the factor. Label text and box lines grow with the image: text about 1/32
    of the longer side (at least 12 px), lines 1/200 of it."""
    image = image.convert("RGB")
    alphas = None if masks is None else _mask_alpha(masks, len(objects), image.width, image.height)
    if scale is None:
        scale = max(1, 384 // max(image.size))
    labels = sorted({o.label for o in objects})
    colors = [PALETTE[labels.index(o.label) % len(PALETTE)] for o in objects]
    if alphas is not None and any(a is not None for a in alphas):
        rgb = np.asarray(image, dtype=np.float32)                     # [H, W, 3]
        for a, color in zip(alphas, colors):
            if a is not None:
                a = (alpha * a)[..., None]                            # [H, W, 1]
                rgb = rgb * (1 - a) + np.asarray(color, np.float32) * a
        image = Image.fromarray(np.round(rgb).astype(np.uint8))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    out = image.copy()
    draw = ImageDraw.Draw(out)
    side = max(out.size)
    font = ImageFont.load_default(size=max(12, round(side / 32)))
    width = max(1, round(side / 200))
    pad = max(1, width)
    for o, color in zip(objects, colors):
        y1, x1, y2, x2 = (v * scale for v in o.box)
        draw.rectangle([x1, y1, x2, y2], outline=color, width=width)
        _, top, _, bottom = draw.textbbox((0, 0), o.label, font=font)
        height = bottom - top + 2 * pad
        # the label sits on the box's top edge, outside it where there is room, inside otherwise
        tx, ty = x1, (y1 - height if y1 >= height else y1)
        left, top, right, bottom = draw.textbbox((tx + pad, ty + pad), o.label, font=font)
        draw.rectangle([left - pad, top - pad, right + pad, bottom + pad], fill=color)
        draw.text((tx + pad, ty + pad), o.label, fill=(255, 255, 255), font=font)
    return out
