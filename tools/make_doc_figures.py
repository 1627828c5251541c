"""Render docs/images/detection_segmentation.png: the segmentation pipeline end to end.

    python tools/make_doc_figures.py [--out docs/images/detection_segmentation.png]

Needs only npvlm (NumPy + Pillow). Steps, all through the library:
1. a demo-world scene (`npvlm.demo.scenes.make_scene(22)`), 128 px;
2. segmentation text as the model would write it: each object's true box encoded with
   `npvlm.tasks.detection.encode_box` (round(v * 1023), y before x) plus 16 `<seg>` codes drawn at
   random (seeded), e.g. `<loc0508><loc0152><loc0750><loc0400><seg071>... circle ; ...`;
3. `parse_detections(text, 128, 128, divisor=1023)` -> objects with boxes and codes;
4. `object_masks` with the tiny test VAE (tests/fixtures/vae/vae-tiny.npz): decode the codes to
   64x64 masks, paste each into its box (demo resize, threshold 0.5);
5. `draw_objects(image, objects, masks)`; the raw 64x64 decoder outputs are shown on the right.

The fixture VAE has random weights, so the mask *shapes* are random: the picture shows the
geometry of the pipeline (grid -> 64x64 -> box), not what a trained decoder produces.
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from npvlm.demo.scenes import make_scene
from npvlm.saving.atomic import save_image_atomic
from npvlm.tasks.detection import encode_box, parse_detections
from npvlm.tasks.draw import draw_objects
from npvlm.tasks.segmentation import decode_masks, load_vae, object_masks

ROOT = Path(__file__).resolve().parent.parent

SCENE_SEED = 22
CODES_SEED = 7
VAE = ROOT / "tests" / "fixtures" / "vae" / "vae-tiny.npz"
OUT = ROOT / "docs" / "images" / "detection_segmentation.png"
PANEL = 120     # side of each raw-mask thumbnail


def segmentation_text(scene, rng):
    """What `segment circle ; square ; triangle` would answer for this scene (random seg codes)."""
    records = []
    for o in scene.objects:
        segs = "".join(f"<seg{c:03d}>" for c in rng.integers(0, 128, size=16))
        records.append(f"{encode_box(o.box, scene.size, scene.size)}{segs} {o.shape}")
    return " ; ".join(records)


def raw_mask_panel(masks64, labels, height):
    """The raw decoder outputs as gray thumbnails (white = +1, black = -1), labelled."""
    panel = Image.new("RGB", (PANEL + 16, height), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    font = ImageFont.load_default()
    step = height // len(masks64)
    for i, (m, label) in enumerate(zip(masks64, labels)):
        gray = (np.clip(m * 0.5 + 0.5, 0, 1) * 255).astype(np.uint8)
        thumb = Image.fromarray(gray).resize((PANEL - 16, PANEL - 16), Image.NEAREST)
        y = i * step
        draw.text((8, y + 2), f"{label}: 64x64 output", fill=(0, 0, 0), font=font)
        panel.paste(thumb, (16, y + 14))
    return panel


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    scene = make_scene(SCENE_SEED)
    text = segmentation_text(scene, np.random.default_rng(CODES_SEED))
    print(text)
    found = parse_detections(text, scene.size, scene.size, divisor=1023)
    assert not found.problems, found.problems
    vae = load_vae(VAE)
    masks = object_masks(found.objects, vae, scene.size, scene.size)
    drawn = draw_objects(Image.fromarray(scene.image), found.objects, masks)
    raw = decode_masks([o.seg for o in found.objects], vae)
    panel = raw_mask_panel(raw, [o.label for o in found.objects], drawn.height)
    figure = Image.new("RGB", (drawn.width + panel.width, drawn.height), (255, 255, 255))
    figure.paste(drawn, (0, 0))
    figure.paste(panel, (drawn.width, 0))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_image_atomic(figure, args.out)
    print(f"{args.out}: {figure.size[0]}x{figure.size[1]}, {Path(args.out).stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
