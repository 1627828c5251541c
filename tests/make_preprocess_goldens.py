"""Write the Hugging Face image-preprocessing goldens (tests/goldens/preprocess/).

    python tests/make_preprocess_goldens.py [--out tests/goldens/preprocess]

Each case is an input (a PNG file's bytes, so the PIL mode, palette and transparency travel
with it, or an HWC uint8 array) and what transformers' `SiglipImageProcessorPil` (the image
processor of PaliGemma) makes of it at a given size: float32 [3, S, S]. With these files
`tests/test_image.py` checks npvlm's preprocessing against HF without torch or transformers
installed; with them installed it also compares live.

Needs transformers (dev only). Deterministic: seeded images, the same versions give the same arrays.
"""

import argparse
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent

SIZES = [(17, 9), (60, 40)]                                   # (width, height): up- and downscaling
MODES = ["RGB", "RGBA", "LA", "L", "P", "P+transparency", "1"]
TARGET = 28                                                   # output side for the synthetic cases


def random_rgba(w, h, seed=0):
    """Random RGBA noise: every channel value, and alpha from 0 to 255."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")


def in_mode(img, mode):
    if mode.startswith("P"):
        p = img.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        if mode == "P+transparency":
            p.info["transparency"] = 3        # palette entry 3 is transparent, as a GIF/PNG sets it
        return p
    return img.convert(mode)


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG", **({"transparency": img.info["transparency"]} if "transparency" in img.info else {}))
    return np.frombuffer(buf.getvalue(), np.uint8)


def cases():
    """name -> (kind, input array, size). kind "png": the array is a PNG file's bytes."""
    out = {}
    for i, (w, h) in enumerate(SIZES):
        for j, mode in enumerate(MODES):
            img = in_mode(random_rgba(w, h, seed=100 * i + j), mode)
            out[f"png_{mode.replace('+', '_')}_{w}x{h}"] = ("png", png_bytes(img), TARGET)
    for channels in (3, 4):
        a = np.asarray(random_rgba(17, 9, seed=channels))[..., :channels].copy()
        out[f"array_{channels}ch_17x9"] = ("array", a, TARGET)
    scene = np.fromfile(ROOT / "npvlm" / "demo" / "samples" / "scene.png", np.uint8)
    out["png_sample_scene_64"] = ("png", scene, 64)           # the demo model's input size
    out["png_sample_scene_224"] = ("png", scene, 224)         # PaliGemma-224's
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "tests" / "goldens" / "preprocess")
    args = p.parse_args(argv)
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    import hf_reference as ref

    arrays, meta = {}, {}
    for name, (kind, data, size) in cases().items():
        image = Image.open(io.BytesIO(data.tobytes())) if kind == "png" else data
        proc = SiglipImageProcessorPil(size={"height": size, "width": size})
        pixels = proc(images=image, return_tensors="np")["pixel_values"][0].astype(np.float32)
        arrays[f"{name}.input"], arrays[f"{name}.pixels"] = data, pixels
        meta[name] = {"kind": kind, "size": size, "mode": getattr(image, "mode", None),
                      "shape": list(pixels.shape)}
        print(f"{name:<32} {kind:<5} -> {list(pixels.shape)}")
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "goldens.npz", **arrays)
    (args.out / "meta.json").write_text(json.dumps(
        {"generated_by": "python tests/make_preprocess_goldens.py",
         "processor": "transformers SiglipImageProcessorPil (PaliGemma's), default settings",
         "versions": ref.versions(), "cases": meta}, indent=2) + "\n")
    print(f"wrote {args.out} ({(args.out / 'goldens.npz').stat().st_size / 1e3:.0f} KB)")


if __name__ == "__main__":
    main()
