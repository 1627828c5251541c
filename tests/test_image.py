"""Image loading and preprocessing: equal to HF 5.24 `SiglipImageProcessorPil`, plus our documented
improvements (EXIF orientation, 16-bit scaling) and one-line InputErrors for every bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from npvlm.errors import InputError
from npvlm.inputs.image import load_image, preprocess, preprocess_batch

from helpers import one_line_error
from make_preprocess_goldens import (  # tests/make_preprocess_goldens.py (no torch needed): the goldens' images
    in_mode,
    random_rgba,
)

SIZES = [(1, 1), (17, 9), (300, 200), (10000, 10)]          # (width, height)
MODES = ["RGB", "RGBA", "LA", "L", "P", "P+transparency", "CMYK", "1"]


@pytest.fixture(scope="module")
def hf_pixels():
    """image -> HF float32[3, S, S]."""
    pytest.importorskip("transformers",
                        reason="transformers not installed: pip install -e '.[reference]'")
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    def run(image, size):
        proc = SiglipImageProcessorPil(size={"height": size, "width": size})
        return proc(images=image, return_tensors="np")["pixel_values"][0]
    return run


def assert_close(ours, ref, tol=1e-6):
    assert ours.shape == ref.shape and ours.dtype == np.float32
    diff = float(np.abs(ours - ref).max())
    print(f"max|diff| {diff:.2e}")
    assert diff <= tol


# ---- parity with HF: committed goldens (no torch needed) --------------------------------------

PREPROCESS_GOLDENS = Path(__file__).resolve().parent / "goldens" / "preprocess"
GOLDEN_CASES = json.loads((PREPROCESS_GOLDENS / "meta.json").read_text())["cases"]


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_preprocess_equals_hf_golden(name, tmp_path):
    """HF `SiglipImageProcessorPil` outputs written by tests/make_preprocess_goldens.py: PNG files
    in every PIL mode (read from disk by npvlm, as run.py does), HWC arrays, the sample scene at
    64 and 224 px."""
    case = GOLDEN_CASES[name]
    with np.load(PREPROCESS_GOLDENS / "goldens.npz") as g:
        data, ref = g[f"{name}.input"], g[f"{name}.pixels"]
    if case["kind"] == "png":
        path = tmp_path / "input.png"
        path.write_bytes(data.tobytes())
        assert Image.open(path).mode == case["mode"]
        data = path
    assert_close(preprocess(data, case["size"]), ref)


# ---- parity with HF, live -------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("wh", SIZES, ids=lambda wh: f"{wh[0]}x{wh[1]}")
def test_preprocess_equals_hf(hf_pixels, wh, mode):
    img = in_mode(random_rgba(*wh), mode)
    assert_close(preprocess(img, 28), hf_pixels(img, 28))


def test_preprocess_equals_hf_at_224(hf_pixels):
    img = random_rgba(300, 200, seed=3).convert("RGB")
    x = preprocess(img, 224)
    assert x.shape == (3, 224, 224) and -1 <= x.min() and x.max() <= 1
    assert_close(x, hf_pixels(img, 224))


@pytest.mark.parametrize("channels", [3, 4])
def test_array_input_equals_hf(hf_pixels, channels):
    """HWC uint8 arrays; RGBA is composited onto white with HF's numpy formula."""
    a = np.asarray(random_rgba(17, 9, seed=channels))[..., :channels].copy()
    assert_close(preprocess(a, 28), hf_pixels(a, 28))


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_transparent_palette_file_equals_hf(hf_pixels, tmp_path, fmt):
    path = tmp_path / f"t.{fmt.lower()}"
    in_mode(random_rgba(40, 30, seed=5), "P+transparency").save(path, transparency=3)
    opened = Image.open(path)
    assert opened.info.get("transparency") is not None
    assert_close(preprocess(path, 28), hf_pixels(opened, 28))


def test_alpha_is_composited_onto_white():
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(load_image(clear)).min() == 255
    assert (preprocess(clear, 14) == 1).all()
    half = np.zeros((4, 4, 4), np.uint8)
    half[..., 3] = 128                               # round(128/255 * 0 + 127/255 * 255) = 127
    assert (np.asarray(load_image(half)) == 127).all()


# ---- our own conversions --------------------------------------------------------------------

def test_gray_and_float_arrays():
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (9, 17), dtype=np.uint8)
    as_l = preprocess(Image.fromarray(gray, "L"), 28)
    np.testing.assert_array_equal(preprocess(gray, 28), as_l)
    np.testing.assert_array_equal(preprocess(gray[..., None], 28), as_l)
    rgb = rng.integers(0, 256, (9, 17, 3), dtype=np.uint8)
    # float in [0, 1] is rounded to uint8 (HF truncates, then rescales twice: see image.py)
    np.testing.assert_array_equal(preprocess(rgb / 255.0, 28), preprocess(rgb, 28))
    np.testing.assert_array_equal(preprocess((rgb / 255.0).astype(np.float32), 28),
                                  preprocess(rgb, 28))


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_is_scaled_not_clipped(tmp_path, mode):
    rng = np.random.default_rng(2)
    a16 = rng.integers(0, 65536, (9, 17)).astype(np.uint16)
    if mode == "I":
        img = Image.fromarray(a16.astype(np.int32), "I")
    else:   # (Pillow's own .convert("I;16B") clips, so build it from big-endian bytes)
        img = Image.fromarray(a16.astype(">u2" if mode == "I;16B" else "<u2"))
    assert img.mode == mode
    expected = np.round(a16 / 257).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(load_image(img))[..., 0], expected)
    np.testing.assert_array_equal(preprocess(img, 28), preprocess(Image.fromarray(expected, "L"), 28))
    path = tmp_path / "sixteen.png"          # a 16-bit PNG read back from disk (Pillow: I;16)
    Image.fromarray(a16).save(path)
    np.testing.assert_array_equal(np.asarray(load_image(path))[..., 0], expected)


@pytest.mark.parametrize("orientation,transpose", [
    (3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_270),
    (8, Image.Transpose.ROTATE_90), (2, Image.Transpose.FLIP_LEFT_RIGHT)])
def test_exif_orientation_is_applied(tmp_path, orientation, transpose):
    path = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation                                   # EXIF Orientation
    random_rgba(30, 20, seed=orientation).convert("RGB").save(path, exif=exif, quality=95)
    with Image.open(path) as stored:
        expected = np.asarray(stored.transpose(transpose).convert("RGB"))
        from_pil = np.asarray(load_image(stored))
        assert stored.getexif()[0x0112] == orientation   # the caller's image is left as it was
    np.testing.assert_array_equal(np.asarray(load_image(path)), expected)
    np.testing.assert_array_equal(from_pil, expected)
    np.testing.assert_array_equal(preprocess(path, 28), preprocess(Image.fromarray(expected), 28))


def test_animated_gif_gives_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (8, 6), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as check:
        assert getattr(check, "n_frames", 1) == 3
    assert np.asarray(load_image(path))[0, 0].tolist() == [255, 0, 0]


def test_path_types_and_batch(tmp_path):
    img = random_rgba(17, 9).convert("RGB")
    path = tmp_path / "a.png"
    img.save(path)
    ref = preprocess(img, 28)
    for src in (path, str(path), Image.open(path), np.asarray(img)):
        np.testing.assert_array_equal(preprocess(src, 28), ref)
    batch = preprocess_batch([img, path, np.asarray(img)], 28)
    assert batch.shape == (3, 3, 28, 28) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[1], ref)


# ---- errors ---------------------------------------------------------------------------------

def one_line_input_error(call, *fragments):
    return one_line_error(InputError, call, *fragments)


def _write_truncated(path, fmt):
    random_rgba(64, 48, seed=9).convert("RGB").save(path, fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_file_errors(tmp_path):
    one_line_input_error(lambda: load_image(tmp_path / "missing.png"), "missing.png", "not found")
    one_line_input_error(lambda: load_image(tmp_path), str(tmp_path), "directory")
    fake = tmp_path / "notes.png"
    fake.write_text("not an image at all")
    one_line_input_error(lambda: load_image(fake), "notes.png", "not an image")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    one_line_input_error(lambda: load_image(empty), "empty.jpg", "0 bytes")
    for fmt, name in [("PNG", "cut.png"), ("JPEG", "cut.jpg")]:
        _write_truncated(tmp_path / name, fmt)
        one_line_input_error(lambda path=tmp_path / name: load_image(path), name, "truncated")
    with Image.open(tmp_path / "cut.png") as lazy:      # a lazily opened PIL image too
        one_line_input_error(lambda: load_image(lazy), "truncated")


def test_decompression_bomb_refused_unless_allowed(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (20, 15)).save(path)
    for limit in (250, 100):      # over the limit (Pillow warns), over 2x the limit (Pillow raises)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        one_line_input_error(lambda: load_image(path), "big.png", "300 pixels", str(limit),
                             "allow_huge")
        assert load_image(path, allow_huge=True).size == (20, 15)
        assert Image.MAX_IMAGE_PIXELS == limit      # restored after the allow_huge open


def test_zero_size_and_bad_inputs():
    # Pillow cannot write a 0x0 image file, but it can make one in memory
    one_line_input_error(lambda: load_image(Image.new("RGB", (0, 5))), "zero size")
    one_line_input_error(lambda: load_image(np.zeros((0, 4, 3), np.uint8)), "zero size")
    one_line_input_error(lambda: load_image(np.zeros((4, 4, 2), np.uint8)), "shape")
    one_line_input_error(lambda: load_image(np.zeros((4, 4, 3), np.int32)), "dtype")
    one_line_input_error(lambda: load_image(np.full((4, 4, 3), 2.0)), "[0, 1]")
    one_line_input_error(lambda: load_image(np.full((4, 4, 3), np.nan)), "[0, 1]")
    one_line_input_error(lambda: load_image(42), "int")
    one_line_input_error(lambda: preprocess(Image.new("RGB", (4, 4)), 0), "size")
    one_line_input_error(lambda: preprocess_batch([], 28), "no images")
