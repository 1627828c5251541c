"""Segmentation: the VQ-VAE mask decoder against PyTorch, its ops against formulas, strict loading,
pasting geometry, and drawing masks."""

import configparser
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from npvlm.backend import to_device, to_host
from npvlm.errors import CheckpointError, InputError
from npvlm.parity import compare
from npvlm.tasks.detection import DetectedObject, encode_box, parse_detections
from npvlm.tasks.draw import draw_objects
from npvlm.tasks.segmentation import (
    conv2d,
    conv_kernel,
    conv_transpose2d,
    conv_transpose_kernel,
    decode_masks,
    load_vae,
    object_masks,
    paste_mask,
)

from helpers import one_line_error

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "vae"
FORMAT_VERSION = 1
REGENERATE = "python tests/make_vae_fixture.py  (needs: pip install -e '.[reference]')"


@pytest.fixture(scope="module")
def vae():
    return load_vae(FIXTURE / "vae-tiny.npz")


@pytest.fixture(scope="module")
def golden():
    path = FIXTURE / "golden_masks.npz"
    if not path.is_file():
        pytest.fail(f"{path} missing; regenerate with: {REGENERATE}")
    with np.load(path, allow_pickle=False) as g:
        data = {k: g[k] for k in g.files}
    meta = json.loads(str(data["meta"]))
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    pin = next(line.split("==")[1] for line in cfg["options.extras_require"]["reference"].split()
               if line.startswith("torch=="))
    if meta["format_version"] != FORMAT_VERSION or meta["versions"]["torch"] != pin:
        pytest.fail(f"VAE goldens are stale (format {meta['format_version']}, torch "
                    f"{meta['versions']['torch']}; expected {FORMAT_VERSION}, {pin}); "
                    f"regenerate with: {REGENERATE}")
    return data


def _raw_fixture():
    with np.load(FIXTURE / "vae-tiny.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


# --- the decoder against PyTorch ---------------------------------------------------------------

def test_decoder_matches_torch_goldens(vae, golden):
    masks = decode_masks(golden["codes"], vae)
    d = compare("vae.mask", masks, golden["masks"])
    print(d)                                           # e.g. max|Δ| ~2e-6 on values up to ~2.4
    assert masks.dtype == np.float32 and masks.shape == (len(golden["codes"]), 64, 64)
    assert d.ok, d


def test_decoder_grid_is_row_major(vae, golden):
    """Transposing the 4x4 code grid must change the mask (guards the reshape order)."""
    codes = golden["codes"][:1]
    transposed = codes.reshape(1, 4, 4).transpose(0, 2, 1).reshape(1, 16)
    assert np.abs(decode_masks(transposed, vae) - golden["masks"][:1]).max() > 0.1


@pytest.mark.live
def test_live_torch_decoder_stage_by_stage(tmp_path):
    """A fresh Gaussian-weight PyTorch decoder (another D, another seed), saved as npz."""
    pytest.importorskip("torch", reason="torch not installed: pip install -e '.[reference]'")
    import make_vae_fixture as mk  # tests/make_vae_fixture.py
    model = mk.build(D=24, seed=7, ternary=False)
    mk.save_npz(tmp_path / "vae.npz", mk.state_arrays(model))
    codes = np.random.default_rng(3).integers(0, 128, size=(3, 16))
    ref = mk.torch_stages(model, codes)
    trace = {}
    decode_masks(codes, load_vae(tmp_path / "vae.npz"), trace=trace)
    assert list(trace) == list(ref)
    diffs = [compare(name, trace[name], ref[name]) for name in ref]
    for d in diffs:
        print(d)
    assert all(d.ok for d in diffs)


@pytest.mark.gpu
def test_cupy_decoder_matches_numpy(vae, golden):
    from npvlm.backend import get_backend
    cp = get_backend("cupy")
    masks = decode_masks(golden["codes"], to_device(vae, cp))
    assert type(masks).__module__.startswith("cupy")
    d = compare("vae.mask (cupy)", to_host(masks), golden["masks"])
    print(d)
    assert d.ok


# --- ops against direct formulas ---------------------------------------------------------------

def _scatter_add_conv_transpose(x, w, b, stride, padding):
    """Textbook transposed convolution: every input pixel adds x[b, y, x, :] @ w[:, :, :, :]
    (PyTorch layout [I, O, k, k]) into the output window at (y*stride, x*stride), then `padding`
    rows/columns are cut from each side."""
    B, Y, X, _ = x.shape
    k = w.shape[2]
    full = np.zeros((B, (Y - 1) * stride + k, (X - 1) * stride + k, w.shape[1]), np.float64)
    for y in range(Y):
        for xx in range(X):
            full[:, y * stride:y * stride + k, xx * stride:xx * stride + k, :] += np.einsum(
                "bi,iokl->bklo", x[:, y, xx, :], w)
    H, W = full.shape[1] - 2 * padding, full.shape[2] - 2 * padding
    return full[:, padding:padding + H, padding:padding + W, :] + b


@pytest.mark.parametrize("k, stride, padding, I, O",
                         [(4, 2, 1, 3, 5), (3, 1, 0, 2, 2), (5, 3, 2, 4, 1), (4, 2, 3, 2, 3)])
def test_conv_transpose_matches_scatter_add(k, stride, padding, I, O):
    rng = np.random.default_rng(k * 100 + stride)
    x = rng.standard_normal((2, 3, 4, I)).astype(np.float32)
    w = rng.standard_normal((I, O, k, k)).astype(np.float32)     # PyTorch ConvTranspose2d layout
    b = rng.standard_normal(O).astype(np.float32)
    ours = conv_transpose2d(x, conv_transpose_kernel(w), b, stride=stride, padding=padding)
    ref = _scatter_add_conv_transpose(x.astype(np.float64), w.astype(np.float64), b, stride, padding)
    def side(n):
        return (n - 1) * stride - 2 * padding + k
    assert ours.shape == ref.shape == (2, side(3), side(4), O)
    print(f"conv_transpose k={k} s={stride} p={padding}: max|Δ|={np.abs(ours - ref).max():.2e}")
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)


def test_conv_transpose_doubles_the_grid():
    x = np.zeros((1, 4, 4, 2), np.float32)
    out = conv_transpose2d(x, np.zeros((4, 4, 2, 3), np.float32), np.arange(3, dtype=np.float32))
    assert out.shape == (1, 8, 8, 3) and (out == np.arange(3)).all()


@pytest.mark.parametrize("k, padding", [(3, 1), (1, 0), (3, 0)])
def test_conv2d_matches_definition(k, padding):
    rng = np.random.default_rng(k + padding)
    x = rng.standard_normal((2, 5, 6, 3))
    w = rng.standard_normal((4, 3, k, k))                        # PyTorch Conv2d layout [O, I, k, k]
    b = rng.standard_normal(4)
    xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    Y, X = xp.shape[1] - k + 1, xp.shape[2] - k + 1
    ref = np.zeros((2, Y, X, 4))
    for y in range(Y):
        for xx in range(X):
            ref[:, y, xx] = np.einsum("bkli,oikl->bo", xp[:, y:y + k, xx:xx + k], w) + b
    np.testing.assert_allclose(conv2d(x, conv_kernel(w), b, padding=padding), ref, atol=1e-10)


# --- strict loading ----------------------------------------------------------------------------

def test_load_shapes_and_layouts(vae):
    raw = _raw_fixture()
    assert vae["_vq_vae._embedding"].shape == (128, 64)
    assert vae["decoder.0"]["w"].shape == (1, 1, 64, 128)
    assert vae["decoder.2.net.0"]["w"].shape == (3, 3, 128, 128)
    assert vae["decoder.6"]["w"].shape == (4, 4, 128, 64)
    np.testing.assert_array_equal(vae["decoder.6"]["w"][0, 1], raw["decoder.6.weight"][:, :, 3, 2])  # flipped
    np.testing.assert_array_equal(vae["decoder.12"]["w"][0, 0, :, 0], raw["decoder.12.weight"][0, :, 0, 0])


def _write(tmp_path, arrays, name="vae.npz"):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _vae_error(path, *fragments):
    """load_vae(path) must raise a one-line CheckpointError holding every fragment."""
    return one_line_error(CheckpointError, lambda: load_vae(path), *fragments)


def test_keys_outside_the_decoder_are_ignored(tmp_path):
    """The official file's non-decoder contents are not verified; the decoder reads only its keys."""
    arrays = _raw_fixture() | {"encoder.0.weight": np.zeros((8, 1, 3, 3), np.float32),
                               "_vq_vae._ema_w": np.zeros((128, 64), np.float32),
                               "_pre_vq_conv.weight": np.zeros((64, 8, 1, 1), np.float32)}
    loaded, reference = load_vae(_write(tmp_path, arrays)), load_vae(FIXTURE / "vae-tiny.npz")
    assert set(loaded) == set(reference)
    np.testing.assert_array_equal(loaded["decoder.4"]["w"], reference["decoder.4"]["w"])


def test_missing_key_is_named(tmp_path):
    arrays = _raw_fixture()
    del arrays["decoder.6.weight"]
    _vae_error(_write(tmp_path, arrays),
               "missing key 'decoder.6.weight' (expected shape [128, 64, 4, 4])")


def test_missing_codebook_is_named(tmp_path):
    arrays = _raw_fixture()
    del arrays["_vq_vae._embedding"]
    _vae_error(_write(tmp_path, arrays), "missing key '_vq_vae._embedding'")


def test_wrong_shape_is_named(tmp_path):
    arrays = _raw_fixture() | {"decoder.8.bias": np.zeros(31, np.float32)}
    _vae_error(_write(tmp_path, arrays), "'decoder.8.bias' has shape [31], expected [32]")
    arrays = _raw_fixture() | {"_vq_vae._embedding": np.zeros((100, 64), np.float32)}
    _vae_error(_write(tmp_path, arrays),
               "'_vq_vae._embedding' has shape [100, 64], expected [128, 64]")


def test_unknown_decoder_key_is_an_error(tmp_path):
    arrays = _raw_fixture() | {"decoder.14.weight": np.zeros((1, 1, 1, 1), np.float32)}
    _vae_error(_write(tmp_path, arrays), "unexpected decoder keys ['decoder.14.weight']")


def test_missing_file_says_where_to_download(tmp_path):
    msg = _vae_error(tmp_path / "vae-oid.npz", "not found")
    assert "gs://big_vision/paligemma/vae-oid.npz" in msg and "download" in msg


class _Sentinel:
    """Unpickling this creates a file: proof that a loader unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_npz_is_refused_without_unpickling(tmp_path):
    touched = tmp_path / "unpickled"
    obj = np.empty(1, dtype=object)
    obj[0] = _Sentinel(str(touched))
    path = _write(tmp_path, {"_vq_vae._embedding": obj})
    assert pickle.dumps(obj[0])                      # the file really holds a pickle
    msg = _vae_error(path, "pickled")
    assert "allow_pickle" not in msg                 # no hint to load it unsafely
    assert not touched.exists()


def test_not_an_npz(tmp_path):
    path = tmp_path / "vae.npz"
    path.write_bytes(b"not a zip")
    _vae_error(path, "not a readable .npz")


@pytest.mark.parametrize("codes, match", [
    (np.zeros((2, 15), int), r"\[B, 16\]"),
    (np.zeros(16, int), "pass \\[codes\\]"),
    (np.full((1, 16), 128), "0..127"),
    (np.full((1, 16), -1), "0..127"),
    (np.zeros((1, 16)), "dtype float64"),
])
def test_bad_codes(vae, codes, match):
    with pytest.raises(InputError, match=match):
        decode_masks(codes, vae)


def test_empty_batch(vae):
    assert decode_masks([], vae).shape == (0, 64, 64)


# --- pasting -----------------------------------------------------------------------------------

def _demo_paste(mask64, box, width, height):
    """The public PaliGemma demo's pasting, transcribed (docs/spec.md §13.2)."""
    y1, x1, y2, x2 = map(round, box)
    m64 = np.clip(mask64 * 0.5 + 0.5, 0, 1)
    m64 = Image.fromarray((m64 * 255).astype("uint8"))
    mask = np.zeros([height, width])
    mask[y1:y2, x1:x2] = np.array(m64.resize([x2 - x1, y2 - y1])) / 255.0
    return mask


def test_paste_box_region_only_and_size():
    out = paste_mask(np.ones((64, 64), np.float32), (10.4, 20.6, 30.5, 50.0), width=80, height=40,
                     threshold=None)
    assert out.shape == (40, 80) and out.dtype == np.float32
    expected = np.zeros((40, 80), np.float32)
    expected[10:30, 21:50] = 1.0                     # round(10.4)=10, round(20.6)=21, round(30.5)=30
    np.testing.assert_array_equal(out, expected)


def test_paste_equals_demo(golden):
    m = golden["masks"][3]
    for box in [(5.2, 7.7, 60.1, 33.3), (0, 0, 40, 100), (12, 3, 19, 90)]:
        np.testing.assert_allclose(paste_mask(m, box, 100, 40 if box[2] <= 40 else 64, threshold=None),
                                   _demo_paste(m, box, 100, 40 if box[2] <= 40 else 64), atol=1e-7)


def test_threshold_is_positive_raw_output(golden):
    m = golden["masks"][4]
    clear = np.abs(m) > 1 / 255                      # the uint8 step decides values closer to 0
    out = paste_mask(m, (0, 0, 64, 64), 64, 64)      # box of 64x64: PIL resize is the identity
    assert out.dtype == bool
    np.testing.assert_array_equal(out[clear], (m > 0)[clear])
    left = np.where(np.arange(64) < 32, 0.5, -0.5).astype(np.float32)[None, :].repeat(64, 0)
    out = paste_mask(left, (10, 10, 20, 30), 40, 30)
    assert out[10:20, 10:19].all() and not out[10:20, 21:30].any() and out.sum() == out[10:20, 10:30].sum()


def test_paste_clips_to_image():
    out = paste_mask(np.ones((64, 64), np.float32), (-5, 30, 12, 50), width=40, height=10, threshold=None)
    assert out.shape == (10, 40) and out[:10, 30:40].all() and out.sum() == 100
    assert not paste_mask(np.ones((64, 64), np.float32), (3, 3, 3, 9), 10, 10).any()   # empty box


def test_object_masks_from_parsed_text(vae, golden):
    codes = golden["codes"][1]
    segs = "".join(f"<seg{c:03d}>" for c in codes)
    box = (8, 4, 40, 28)
    text = f"{encode_box(box, 50, 60)}{segs} cat ; {encode_box((1, 1, 9, 9), 50, 60)} dog"
    objects = parse_detections(text, width=50, height=60, divisor=1023).objects
    masks = object_masks(objects, vae, width=50, height=60)
    assert masks[1] is None and masks[0].shape == (60, 50)
    np.testing.assert_array_equal(masks[0], paste_mask(golden["masks"][1], objects[0].box, 50, 60))
    assert masks[0].any() and not masks[0][:8].any() and not masks[0][:, 28:].any()


# --- drawing -----------------------------------------------------------------------------------

def test_draw_with_masks_tints_inside_the_mask_only():
    image = Image.new("RGB", (80, 60), (200, 200, 200))
    objects = [DetectedObject("cat", (10.0, 10.0, 50.0, 70.0), (0, 0, 0, 0)),
               DetectedObject("dog", (2.0, 2.0, 8.0, 8.0), (0, 0, 0, 0))]
    mask = np.zeros((60, 80), bool)
    mask[30:45, 20:60] = True                                  # inside the box, below its label
    plain = np.asarray(draw_objects(image, objects, scale=1))
    drawn = np.asarray(draw_objects(image, objects, [mask, None], scale=1))
    assert drawn.shape == plain.shape == (60, 80, 3)
    changed = np.any(drawn != plain, axis=2)
    assert changed[30:45, 20:60].all() and changed.sum() == mask.sum()
    tint = drawn[35, 30].astype(int) - plain[35, 30]           # toward the object's color
    assert np.abs(tint).max() > 20
    assert np.array_equal(np.asarray(draw_objects(image, objects, [None, None], scale=1)), plain)
    big = draw_objects(image, objects, [mask, None])          # default upscaling still applies
    assert big.size == (80 * 4, 60 * 4)


def test_draw_mask_errors():
    image = Image.new("RGB", (50, 40))
    objects = [DetectedObject("cat", (10.0, 10.0, 30.0, 40.0), (0, 0, 0, 0))]
    with pytest.raises(InputError, match="one \\[H, W\\] mask"):
        draw_objects(image, objects, [])
    with pytest.raises(InputError, match=r"needs \[40, 50\]"):
        draw_objects(image, objects, [np.zeros((50, 40), bool)])
