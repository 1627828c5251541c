"""Drawing detections onto an image (boxes and labels), for `run.py --draw` and notebooks."""

from PIL import Image, ImageDraw, ImageFont

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (128, 128, 0)]


def draw_objects(image, objects, scale=None):
    """A copy of `image` (PIL, RGB) with each object's box and label drawn. Boxes are in the
    image's own pixels (y_min, x_min, y_max, x_max). Small images are upscaled first (nearest) so
    labels stay readable; `scale` overrides the factor."""
    image = image.convert("RGB")
    if scale is None:
        scale = max(1, 384 // max(image.size))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    out = image.copy()
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    width = max(1, round(max(out.size) / 200))
    labels = sorted({o.label for o in objects})
    for o in objects:
        color = PALETTE[labels.index(o.label) % len(PALETTE)]
        y1, x1, y2, x2 = (v * scale for v in o.box)
        draw.rectangle([x1, y1, x2, y2], outline=color, width=width)
        tx, ty = x1 + width, max(0, y1 - 12) if y1 >= 12 else y1 + width
        left, top, right, bottom = draw.textbbox((tx, ty), o.label, font=font)
        draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=color)
        draw.text((tx, ty), o.label, fill=(255, 255, 255), font=font)
    return out
