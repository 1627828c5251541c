"""Robustness, images: unreadable, truncated, odd and huge images get one line through the API
and run.py, and the odd ones that should work do (the machinery: tests/robustness.py)."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from npvlm.errors import InputError
from npvlm.inputs.image import load_image

from robustness import IMAGE, Case, Inputs, check_api, check_cli, skip_reason


def png_bytes(width, height, bit_depth=8, color_type=2, rows=None):
    """A PNG written by hand: any IHDR, optionally no pixel data at all (rows=None -> empty IDAT)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(b"".join(b"\x00" + r for r in rows)) if rows is not None else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def image_case(make, **extra):
    """A builder: make(path_folder) -> image path; the base model."""
    def build(tmp, base):
        return Inputs(base.model, make(tmp), **extra)
    return build


def _noise(w, h, seed=0, mode="RGB"):
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)
    return Image.fromarray(a, "RGBA").convert(mode)


def _saved(name, img_fn, **save):
    def make(tmp):
        path = tmp / name
        img_fn().save(path, **save)
        return path
    return make


def _raw(name, data):
    def make(tmp):
        path = tmp / name
        path.write_bytes(data)
        return path
    return make


def _truncated(name, fmt):
    def make(tmp):
        path = tmp / name
        _noise(64, 48, seed=9).save(path, fmt)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path
    return make


def _directory(tmp):
    (tmp / "photos").mkdir()
    return tmp / "photos"


def _text_as_png(tmp):
    path = tmp / "notes.png"
    path.write_text("shopping list: milk, eggs\n")
    return path


def _sixteen_bit_rgba(tmp):
    rng = np.random.default_rng(4)
    rows = [rng.integers(0, 256, 12 * 8, dtype=np.uint8).tobytes() for _ in range(9)]
    path = tmp / "deep.png"
    path.write_bytes(png_bytes(12, 9, bit_depth=16, color_type=6, rows=rows))
    return path


def _palette_transparent(tmp):
    path = tmp / "palette.png"
    img = _noise(40, 30, seed=5).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    img.save(path, transparency=3)
    return path


FRAMES = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def _animated_gif(tmp):
    path = tmp / "anim.gif"
    frames = [Image.new("RGB", (16, 12), c) for c in FRAMES]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return path


def _first_frame_used(inp, tmp):
    with Image.open(inp.image) as check:
        assert check.n_frames == 3
    assert np.asarray(load_image(inp.image))[0, 0].tolist() == list(FRAMES[0])


def _small_over_lowered_limit(tmp):
    path = tmp / "big.png"
    _noise(40, 30, seed=6).save(path)          # 1200 pixels, over a limit lowered to 1000
    return path


CASES = [
    # -- image
    Case("image-missing", IMAGE, "image file does not exist",
         image_case(lambda tmp: tmp / "missing.png"), (InputError, "missing.png: image file not found"),
         (1, "image file not found"), "check the image path", before_load=True),
    Case("image-directory", IMAGE, "image path is a directory", image_case(_directory),
         (InputError, "is a directory, not an image file"), (1, "is a directory"),
         "pass an image file", before_load=True),
    Case("image-text-file", IMAGE, "a text file renamed .png", image_case(_text_as_png),
         (InputError, "notes.png: not an image file Pillow can read"),
         (1, "not an image file Pillow can read"), "pass a real image file", before_load=True),
    Case("image-truncated-jpeg", IMAGE, "truncated JPEG", image_case(_truncated("cut.jpg", "JPEG")),
         (InputError, "cut.jpg: truncated or corrupt image"), (1, "truncated or corrupt image"),
         "download or export the image again", before_load=True),
    Case("image-truncated-png", IMAGE, "truncated PNG", image_case(_truncated("cut.png", "PNG")),
         (InputError, "cut.png: truncated or corrupt image"), (1, "truncated or corrupt image"),
         "download or export the image again", before_load=True),
    Case("image-empty", IMAGE, "zero-byte file", image_case(_raw("empty.jpg", b"")),
         (InputError, "empty.jpg: empty file (0 bytes)"), (1, "empty file (0 bytes)"),
         "download or export the image again", before_load=True),
    Case("image-1x1", IMAGE, "1x1 image", image_case(_saved("dot.png", lambda: _noise(1, 1))),
         None, (0, None)),
    Case("image-10000x10", IMAGE, "extreme aspect ratio, 10000x10 (squashed to a square, as HF)",
         image_case(_saved("strip.png", lambda: _noise(10000, 10))), None, (0, None)),
    Case("image-16-bit-gray", IMAGE, "16-bit grayscale PNG (scaled to 8 bits)",
         image_case(_saved("gray16.png", lambda: Image.fromarray(
             np.random.default_rng(3).integers(0, 65536, (9, 17)).astype(np.uint16)))),
         None, (0, None)),
    Case("image-16-bit-rgba", IMAGE, "16-bit RGBA PNG with transparency",
         image_case(_sixteen_bit_rgba), None, (0, None)),
    Case("image-palette-transparency", IMAGE, "palette PNG with a transparent entry "
         "(composited onto white)", image_case(_palette_transparent), None, (0, None)),
    Case("image-animated-gif", IMAGE, "animated GIF (the first frame is used)",
         image_case(_animated_gif, check=_first_frame_used), None, (0, None)),
    Case("image-bomb-header", IMAGE, "PNG whose header declares 20000x20000 pixels (a decompression "
         "bomb; 57 bytes on disk)", image_case(_raw("bomb.png", png_bytes(20000, 20000))),
         (InputError, "20000x20000 = 400000000 pixels, over Pillow's decompression-bomb limit"),
         (1, "--allow-huge-image"), "only for a file you trust: --allow-huge-image / "
                                    "load_image(path, allow_huge=True)", before_load=True),
    Case("image-bomb-header-1x-2x", IMAGE, "PNG header declaring 9500x9500 (between Pillow's limit "
         "and twice it, where Pillow only warns)",
         image_case(_raw("bomb.png", png_bytes(9500, 9500))),
         (InputError, "9500x9500 = 90250000 pixels, over Pillow's decompression-bomb limit"),
         (1, "decompression-bomb limit of 89478485 pixels"), "as above", before_load=True),
    Case("image-over-lowered-limit", IMAGE, "a real 40x30 image over a limit lowered to 1000 "
         "pixels (`PIL.Image.MAX_IMAGE_PIXELS`)",
         image_case(_small_over_lowered_limit, pillow_limit=1000),
         (InputError, "40x30 = 1200 pixels, over Pillow's decompression-bomb limit of 1000"),
         (1, "allow_huge=True (run.py: --allow-huge-image)"), "as above", before_load=True),
    Case("image-over-limit-allowed", IMAGE, "the same with --allow-huge-image / "
         "load_image(allow_huge=True): accepted",
         image_case(_small_over_lowered_limit, pillow_limit=1000, allow_huge=True,
                    cli_args=["--allow-huge-image"]), None, (0, None)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_api(case, robust_base, tmp_path):
    if skip_reason(case):
        pytest.skip(skip_reason(case))
    check_api(case, robust_base, tmp_path)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cli(case, cli_results):
    if skip_reason(case):
        pytest.skip(skip_reason(case))
    check_cli(case, cli_results[case.id])
