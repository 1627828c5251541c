"""Segmentation masks: PaliGemma's 16 `<seg>` codes -> a 64x64 mask -> a full-image mask (docs/spec.md §13.2).

Axis legend: B masks (objects), K codebook entries (128), D code width (read from the file),
Y, X grid rows and columns, I input channels, O output channels, k kernel side, H, W image
height and width in pixels.

A segmentation record carries 16 codebook indices (0..127): a 4x4 grid, row-major, of a VQ-VAE
(Ning et al. 2023, "All in Tokens", arXiv 2301.02229; trained on OpenImages). Its decoder turns
the grid into a 64x64 mask logit in about [-1, 1] for the object's box:

    codes [B, 16] -> codebook lookup        [B, 4, 4, D]
    decoder.0      conv 1x1, ReLU           [B, 4, 4, 128]
    decoder.2, .3  ResBlock x2              [B, 4, 4, 128]   x + conv1x1(relu(conv3x3(relu(conv3x3(x)))))
    decoder.4      conv-transpose 4x4/2, ReLU   [B, 8, 8, 128]
    decoder.6      conv-transpose 4x4/2, ReLU   [B, 16, 16, 64]
    decoder.8      conv-transpose 4x4/2, ReLU   [B, 32, 32, 32]
    decoder.10     conv-transpose 4x4/2, ReLU   [B, 64, 64, 16]
    decoder.12     conv 1x1                 [B, 64, 64, 1] -> [B, 64, 64]

This follows big_vision `evaluators/proj/paligemma/transfers/segmentation.py`
(`_get_params`, `ResBlock`, `Decoder`, `reconstruct_masks`). Activations are channels-last
([B, Y, X, C]) as there, so every convolution tap is one `x @ w`. The weights are the official
`vae-oid.npz` (`gs://big_vision/paligemma/vae-oid.npz`), PyTorch-named and PyTorch-laid-out;
`load_vae` checks and converts them once.

`paste_mask` then puts a 64x64 mask into its box of the original image as the public PaliGemma
demo does. `decode_masks` is backend-agnostic (`xp` from the weights: `to_device(vae, cupy)`);
loading and pasting run on the host.
"""

import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..backend import array_module, to_host
from ..config import NUM_SEG, SEG_CODES
from ..errors import CheckpointError, InputError
from ..model.record import record

GRID = 4                # the grid side
MASK_SIZE = 64          # decoder output side: 4 -> 8 -> 16 -> 32 -> 64
WIDTH = 128             # decoder width before the upsampling (big_vision `Decoder.dim`)
UP_STRIDE, UP_PADDING = 2, 1   # PyTorch ConvTranspose2d(k=4, stride=2, padding=1) = flax padding=2
WHERE_TO_GET = ("download vae-oid.npz from big_vision's public bucket "
                "gs://big_vision/paligemma/vae-oid.npz (e.g. `gsutil cp "
                "gs://big_vision/paligemma/vae-oid.npz .`)")

# name -> (kind, PyTorch weight shape as a function of D). "conv": Conv2d, weight [O, I, k, k];
# "convT": ConvTranspose2d, weight [I, O, k, k]. Every conv has a bias [O].
DECODER_LAYERS = {
    "decoder.0": ("conv", lambda D: (WIDTH, D, 1, 1)),
    **{f"decoder.{b}.net.{i}": ("conv", lambda D, k=k: (WIDTH, WIDTH, k, k))
       for b in (2, 3) for i, k in ((0, 3), (2, 3), (4, 1))},
    "decoder.4": ("convT", lambda D: (128, 128, 4, 4)),
    "decoder.6": ("convT", lambda D: (128, 64, 4, 4)),
    "decoder.8": ("convT", lambda D: (64, 32, 4, 4)),
    "decoder.10": ("convT", lambda D: (32, 16, 4, 4)),
    "decoder.12": ("conv", lambda D: (1, 16, 1, 1)),
}
CODEBOOK_KEY = "_vq_vae._embedding"
# Only the codebook and the `decoder.` keys are read: big_vision's `_get_params` reads exactly
# these names from vae-oid.npz. Everything else in the file (the VQ-VAE encoder, which only made
# the training targets, and quantizer state) is ignored, by rule rather than by a list: the full
# key list of the official file is not verified here, and a key the decoder cannot use must not
# make the real file unloadable. An unknown `decoder.` key does mean another decoder: an error.
DECODER_PREFIX = "decoder."


# ---------------------------------------------------------------------------------------------
# Loading (host): the official npz -> a parameter dict keyed by the official module names
# ---------------------------------------------------------------------------------------------

def conv_kernel(weight):
    """PyTorch Conv2d weight [O, I, k, k] -> [k, k, I, O], so that tap (dy, dx) is `x @ w[dy, dx]`."""
    return np.ascontiguousarray(weight.transpose(2, 3, 1, 0))


def conv_transpose_kernel(weight):
    """PyTorch ConvTranspose2d weight [I, O, k, k] -> the kernel of the equivalent *correlation*
    over the zero-dilated input: spatially flipped, laid out [k, k, I, O] (I = the transposed
    conv's input channels, i.e. in/out swapped relative to a Conv2d weight)."""
    return np.ascontiguousarray(weight[:, :, ::-1, ::-1].transpose(2, 3, 0, 1))


def _read_npz(path):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: VAE weights not found; {WHERE_TO_GET}")
    if not zipfile.is_zipfile(path):   # np.load would treat any other file as a pickle
        raise CheckpointError(f"{path}: not a readable .npz file (not a zip archive); {WHERE_TO_GET}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except ValueError as e:
        if "pickle" in str(e):   # an object array: refused, never unpickled
            raise CheckpointError(f"{path}: holds pickled (object) arrays, which npvlm refuses to "
                                  "load; vae-oid.npz has plain float arrays") from None
        raise CheckpointError(f"{path}: not a readable .npz file (ValueError: {e})") from None
    except Exception as e:    # truncated or corrupted archive
        raise CheckpointError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None


def _checked(path, arrays, key, shape):
    if key not in arrays:
        raise CheckpointError(f"{path}: missing key {key!r} (expected shape {list(shape)}); "
                              "is this the PaliGemma VQ-VAE (vae-oid.npz)?")
    a = arrays[key]
    if a.shape != tuple(shape):
        raise CheckpointError(f"{path}: {key!r} has shape {list(a.shape)}, expected {list(shape)}")
    if a.dtype.kind != "f":
        raise CheckpointError(f"{path}: {key!r} has dtype {a.dtype}, expected floating point")
    return a.astype(np.float32)


def load_vae(path):
    """Read and check `vae-oid.npz` (or a file with the same keys).

    Returns a dict keyed by the official names:
      "_vq_vae._embedding": float32[K, D]  the codebook (K = 128; D read from the file)
      "decoder.N" / "decoder.N.net.M": {"w": float32[k, k, I, O], "b": float32[O]}, the weights
        converted once (`conv_kernel`, `conv_transpose_kernel`) so every tap is `x @ w[dy, dx]`.
    Keys outside the decoder (encoder, quantizer state) are ignored; a missing decoder key, a
    wrong shape or an unknown `decoder.` key is a one-line CheckpointError.
    Never unpickles (`allow_pickle=False`). Move it to a GPU with `backend.to_device(vae, cupy)`.
    """
    arrays = _read_npz(path)
    if CODEBOOK_KEY not in arrays:
        raise CheckpointError(f"{path}: missing key {CODEBOOK_KEY!r} (the codebook, [{NUM_SEG}, D]); "
                              "is this the PaliGemma VQ-VAE (vae-oid.npz)?")
    codebook = arrays[CODEBOOK_KEY]
    if codebook.ndim != 2:
        raise CheckpointError(f"{path}: {CODEBOOK_KEY!r} has shape {list(codebook.shape)}, "
                              f"expected [{NUM_SEG}, D]")
    D = codebook.shape[1]
    vae = {CODEBOOK_KEY: _checked(path, arrays, CODEBOOK_KEY, (NUM_SEG, D))}
    used = {CODEBOOK_KEY}
    for name, (kind, torch_shape) in DECODER_LAYERS.items():
        w_shape = torch_shape(D)
        out_channels = w_shape[0] if kind == "conv" else w_shape[1]
        w = _checked(path, arrays, f"{name}.weight", w_shape)
        b = _checked(path, arrays, f"{name}.bias", (out_channels,))
        vae[name] = {"w": conv_kernel(w) if kind == "conv" else conv_transpose_kernel(w), "b": b}
        used |= {f"{name}.weight", f"{name}.bias"}
    unexpected = sorted(k for k in arrays if k not in used and k.startswith(DECODER_PREFIX))
    if unexpected:
        more = f" (+{len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
        raise CheckpointError(f"{path}: unexpected decoder keys {unexpected[:3]}{more}; "
                              "not the PaliGemma VQ-VAE decoder layout")
    return vae


# ---------------------------------------------------------------------------------------------
# The decoder (backend-agnostic array math, channels-last)
# ---------------------------------------------------------------------------------------------

def relu(x):
    xp = array_module(x)
    return xp.maximum(x, 0)


def conv2d(x, w, b, padding=0):
    """Cross-correlation (PyTorch Conv2d / flax nn.Conv), stride 1, zero padding on each side.

    x: float32[B, Y, X, I]; w: float32[k, k, I, O] (see `conv_kernel`); b: float32[O]
    -> float32[B, Y + 2p - k + 1, X + 2p - k + 1, O]

        out[b, y, x] = bias + sum_{dy, dx} x_pad[b, y + dy, x + dx] @ w[dy, dx]

    One matmul per kernel tap (9 for 3x3, 16 for 4x4), each over every pixel at once.
    """
    xp = array_module(x)
    k = w.shape[0]
    if padding:
        x = xp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    Y, X = x.shape[1] - k + 1, x.shape[2] - k + 1
    out = xp.zeros(x.shape[:1] + (Y, X, w.shape[3]), dtype=x.dtype)        # [B, Y, X, O]
    for dy in range(k):
        for dx in range(k):
            out += x[:, dy:dy + Y, dx:dx + X, :] @ w[dy, dx]              # [B, Y, X, I] @ [I, O]
    return out + b


def conv_transpose2d(x, w, b, stride=UP_STRIDE, padding=UP_PADDING):
    """PyTorch ConvTranspose2d(k, stride, padding) as a plain correlation (docs/spec.md §13.2):
    insert stride-1 zeros between input pixels, pad k-1-padding on each side, then correlate with
    the spatially flipped, in/out-swapped kernel (`conv_transpose_kernel` made it at load).

    x: float32[B, Y, X, I]; w: float32[k, k, I, O] (flipped); b: float32[O]
    -> float32[B, (Y-1)*stride - 2*padding + k, (X-1)*stride - 2*padding + k, O]
       (= [B, 2Y, 2X, O] for the decoder's k=4, stride=2, padding=1)

    The zero-insertion wastes 3/4 of the multiplies; at these sizes (<= 64x64x32) that is cheap
    and keeps the equivalence visible. Equals big_vision's flax
    `nn.ConvTranspose(k, strides=2, padding=k-1-padding, transpose_kernel=True)`.
    """
    xp = array_module(x)
    B, Y, X, I = x.shape
    k = w.shape[0]
    dilated = xp.zeros((B, (Y - 1) * stride + 1, (X - 1) * stride + 1, I), dtype=x.dtype)
    dilated[:, ::stride, ::stride, :] = x                  # [B, Y, X, I] -> [B, 2Y-1, 2X-1, I]
    return conv2d(dilated, w, b, padding=k - 1 - padding)


def resblock(x, vae, name):
    """big_vision `ResBlock`: x + conv1x1(relu(conv3x3(relu(conv3x3(x))))).
    [B, Y, X, 128] -> [B, Y, X, 128]"""
    h = relu(conv2d(x, **vae[f"{name}.net.0"], padding=1))
    h = relu(conv2d(h, **vae[f"{name}.net.2"], padding=1))
    return x + conv2d(h, **vae[f"{name}.net.4"])


def _check_codes(codes):
    """Host-side check (CuPy would wrap an out-of-range index silently instead of raising)."""
    codes = np.asarray(to_host(codes) if hasattr(codes, "shape") else codes)
    if codes.size == 0:
        return np.zeros((0, SEG_CODES), np.int64)
    if codes.ndim == 1 and codes.size == SEG_CODES:
        raise InputError(f"codes must be [B, {SEG_CODES}] (a batch); got one row of shape "
                         f"{list(codes.shape)}: pass [codes]")
    if codes.ndim != 2 or codes.shape[1] != SEG_CODES:
        raise InputError(f"codes must be [B, {SEG_CODES}] integers, got shape {list(codes.shape)}")
    if codes.size and (codes.dtype.kind not in "iu" or codes.min() < 0 or codes.max() >= NUM_SEG):
        raise InputError(f"codes must be integers in 0..{NUM_SEG - 1}, got dtype {codes.dtype}, "
                         f"range {codes.min()}..{codes.max()}")
    return codes


def decode_masks(codes, vae, *, trace=None):
    """<seg> codes -> 64x64 mask logits, big_vision `reconstruct_masks`.

    codes: int[B, 16] in 0..127 (a row is one object's `DetectedObject.seg`), host or device;
    vae: the dict from `load_vae` (its arrays set the backend). -> float32[B, 64, 64], about
    [-1, 1]; > 0 means "object". Row y of the result is row y of the object's box, top to bottom.
    trace: optional dict, filled with host copies of vae.embed, vae.conv_in, vae.res.{0,1},
    vae.up.{0..3}, vae.mask (channels-last).
    """
    codebook = vae[CODEBOOK_KEY]
    xp = array_module(codebook)
    codes = _check_codes(codes)
    B, D = codes.shape[0], codebook.shape[1]
    z = codebook[xp.asarray(codes.reshape(-1))]                   # [B*16, D]
    x = z.reshape(B, GRID, GRID, D)                                # [B, 4, 4, D], row-major grid
    record(trace, "vae.embed", x)
    x = relu(conv2d(x, **vae["decoder.0"]))                        # [B, 4, 4, D] -> [B, 4, 4, 128]
    record(trace, "vae.conv_in", x)
    for i, name in enumerate(("decoder.2", "decoder.3")):
        x = resblock(x, vae, name)                                 # [B, 4, 4, 128]
        record(trace, f"vae.res.{i}", x)
    for i, name in enumerate(("decoder.4", "decoder.6", "decoder.8", "decoder.10")):
        x = relu(conv_transpose2d(x, **vae[name]))                 # [B, Y, X, I] -> [B, 2Y, 2X, O]
        record(trace, f"vae.up.{i}", x)                            # 8x8x128, 16x16x64, 32x32x32, 64x64x16
    x = conv2d(x, **vae["decoder.12"])[..., 0]                     # [B, 64, 64, 16] -> [B, 64, 64]
    record(trace, "vae.mask", x)
    return x


# ---------------------------------------------------------------------------------------------
# Pasting into the image (host, PIL)
# ---------------------------------------------------------------------------------------------

def paste_mask(mask64, box, width, height, threshold=0.5):
    """One 64x64 mask -> a full-image mask, as the public PaliGemma demo pastes it.

    mask64: float32[64, 64] from `decode_masks` (raw, about [-1, 1]); box: (y_min, x_min,
    y_max, x_max) in image pixels (`DetectedObject.box`); width, height: the image size.
    -> bool[H, W] (`soft > threshold`), or float32[H, W] in [0, 1] when threshold is None.

    Demo recipe (docs/spec.md §13.2): m = clip(mask64 * 0.5 + 0.5, 0, 1) -> uint8 (m * 255, truncated)
    -> PIL image resized to the box size (x2 - x1, y2 - y1) with PIL's default filter (bicubic
    for 8-bit images since Pillow 7) -> / 255, written into mask[y1:y2, x1:x2]; zero elsewhere.
    Box corners are rounded to whole pixels (Python `round`, as the demo does). A box reaching
    outside the image is pasted at full size and cut at the border.

    Threshold 0.5 on this [0, 1] mask is `> 0` on the raw decoder output (up to the uint8 step:
    raw values in (0, 1/255) round down to background). big_vision's evaluator instead resizes the
    raw float mask bilinearly (`PIL.Image.fromarray(mask64).resize(..., BILINEAR)`), thresholds
    `> 0`, and takes box pixels as int(v * size) from bins / 1023; the two differ only along
    mask edges.
    """
    mask64 = np.asarray(to_host(mask64), dtype=np.float32)
    if mask64.shape != (MASK_SIZE, MASK_SIZE):
        raise InputError(f"mask64 must be [{MASK_SIZE}, {MASK_SIZE}], got {list(mask64.shape)}")
    y1, x1, y2, x2 = (round(v) for v in box)
    out = np.zeros((height, width), np.float32)
    if y2 > y1 and x2 > x1:
        m = np.clip(mask64 * 0.5 + 0.5, 0, 1)
        m = Image.fromarray((m * 255).astype(np.uint8)).resize((x2 - x1, y2 - y1))
        m = np.asarray(m, dtype=np.float32) / 255.0                 # [y2-y1, x2-x1] in [0, 1]
        cy1, cx1, cy2, cx2 = max(y1, 0), max(x1, 0), min(y2, height), min(x2, width)
        if cy2 > cy1 and cx2 > cx1:
            out[cy1:cy2, cx1:cx2] = m[cy1 - y1:cy2 - y1, cx1 - x1:cx2 - x1]
    return out if threshold is None else out > threshold


def object_masks(objects, vae, width, height, threshold=0.5):
    """Full-image masks for parsed objects (`parse_detections(...).objects`): one [H, W] mask per
    object with seg codes, None for a box-only (detection) record. All masks decode in one batch."""
    with_seg = [i for i, o in enumerate(objects) if o.seg is not None]
    masks = [None] * len(objects)
    if with_seg:
        m64 = to_host(decode_masks([objects[i].seg for i in with_seg], vae))   # [B, 64, 64]
        for j, i in enumerate(with_seg):
            masks[i] = paste_mask(m64[j], objects[i].box, width, height, threshold)
    return masks
