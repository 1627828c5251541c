"""Images in: loading (any file Pillow reads, a PIL image, or an array) and SigLIP preprocessing.

Axes (npvlm/model/layers.py): H, W input height/width; R model image side (224/448/896); B batch;
C = 3 channels.

`preprocess` gives what HF transformers 5.24 `SiglipImageProcessorPil` gives (docs/spec.md §4.1):
PIL bicubic resize to R x R in uint8, then `x * (1/255)` in float64 -> float32, then
`(x - 0.5) / 0.5`, channels first. (HF's default `SiglipImageProcessor` in 5.x is the torchvision
backend, whose resize differs slightly; the PIL class is the one that matches the v4 pipeline.)

`load_image` turns every input into an RGB PIL image the way HF 5.24's image processor converts
PIL images and arrays (`image_transforms.convert_to_rgb`: alpha composited onto white), with
three deliberate differences, each documented below: EXIF orientation is applied to files and
PIL images, 16-bit gray is scaled rather than clipped, and float arrays are rounded to uint8
(HF truncates them and then rescales them twice). Every failure is a one-line `InputError`.
"""

import contextlib
import io
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError

RESCALE = 1 / 255          # HF rescale_factor (preprocessor_config.json: 0.00392156862745098)
MEAN = STD = np.float32(0.5)   # HF IMAGENET_STANDARD_MEAN / _STD, cast to the image dtype (fp32)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


# ---- opening files ---------------------------------------------------------------------------

def is_url(src):
    """Whether an image argument is an http(s) URL, fetched by npvlm/inputs/web.py (any other
    "scheme://" is refused; everything else is a file path)."""
    return isinstance(src, str) and src.lower().startswith(("http://", "https://"))


@contextlib.contextmanager
def _pixel_limit(allow_huge):
    """Lift Pillow's decompression-bomb check for one open. Image.MAX_IMAGE_PIXELS is a global,
    so this is done only when the caller asked (allow_huge) or to read a refused file's size."""
    if not allow_huge:
        yield
        return
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _reason(e):
    """An exception's text folded onto one line, to quote in a message (its type if empty)."""
    return " ".join(str(e).split()) or type(e).__name__


def _open_file(path, allow_huge):
    """Open and fully decode an image file (the first frame of an animation), apply its EXIF
    orientation -> a PIL image that no longer needs the file."""
    if not path.exists():
        raise InputError(f"{path}: image file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not an image file")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise InputError(f"{path}: cannot read ({_reason(e)})") from None
    if size == 0:
        raise InputError(f"{path}: empty file (0 bytes), not an image")
    return _decode(path, path, allow_huge, "not an image file Pillow can read")


def _open_url(url, allow_huge):
    """Fetch an http(s) URL (npvlm/inputs/web.py) and decode it as `_open_file` decodes a file."""
    from .web import fetch  # noqa: PLC0415 (urllib is imported only when a URL is given)
    body, content_type = fetch(url)
    if not body:
        raise InputError(f"{url}: the server sent an empty body ({content_type}), not an image")
    return _decode(io.BytesIO(body), url, allow_huge,
                   f"not an image (the server sent {content_type}, {len(body)} bytes); give the URL "
                   "of the image file itself")


def _decode(source, label, allow_huge, not_an_image):
    """Open and fully decode `source` (a path or a file object; `label` names it in messages)."""
    limit = Image.MAX_IMAGE_PIXELS
    with _pixel_limit(allow_huge), warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # we decide below
        try:
            img = Image.open(source)
        except UnidentifiedImageError:
            raise InputError(f"{label}: {not_an_image}") from None
        except Image.DecompressionBombError:     # Pillow refuses > 2x the limit at open
            raise _too_big(label, _header_size(source), limit) from None
        except OSError as e:
            raise InputError(f"{label}: cannot open ({_reason(e)})") from None
    with img:
        if not allow_huge and limit is not None and img.width * img.height > limit:
            raise _too_big(label, img.size, limit)
        try:
            img.load()   # decode everything now, so a truncated or corrupt file fails here
        except (OSError, SyntaxError, ValueError, EOFError) as e:   # Pillow's decoder errors
            raise InputError(f"{label}: truncated or corrupt image ({_reason(e)})") from None
        return _exif_upright(img)   # a new image (Pillow copies), so the file can be closed


def _exif_upright(img):
    """ImageOps.exif_transpose -> a new image; a malformed EXIF block keeps the stored pixels."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001  (Pillow raises several types on bad EXIF data)
        return img.copy()


def _header_size(source):
    """(width, height) from the header alone, the bomb check lifted (Image.open decodes nothing)."""
    try:
        if hasattr(source, "seek"):
            source.seek(0)
        with _pixel_limit(True), Image.open(source) as img:
            return img.size
    except Exception:  # noqa: BLE001  only for the message
        return None


def _too_big(path, size, limit):
    what = f"{size[0]}x{size[1]} = {size[0] * size[1]} pixels" if size else "too many pixels"
    return InputError(f"{path}: image has {what}, over Pillow's decompression-bomb limit of "
                      f"{limit} pixels; if you trust the file, pass allow_huge=True "
                      "(run.py: --allow-huge-image)")


# ---- arrays ---------------------------------------------------------------------------------

def _from_array(a):
    """HWC uint8 RGB/RGBA, HW or HW1 uint8 gray, or float HWC/HW in [0, 1] -> PIL image.

    Float arrays are scaled by 255 and *rounded*. (HF's `to_pil_image` truncates them, its resize
    divides by 255 again afterwards, and then `do_rescale` divides once more, so HF feeds a
    float image in [0, 1] to the model as values near -1; it warns about "already rescaled
    images".) RGBA alpha is composited onto white exactly as HF's numpy branch of
    `convert_to_rgb` does: round(alpha * rgb + (1 - alpha) * 255), alpha = A / 255.
    """
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise InputError(f"image array has shape {a.shape}; expected HxW (gray), HxWx3 (RGB) or "
                         "HxWx4 (RGBA), channels last")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise InputError(f"image array has zero size {a.shape}")
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise InputError("float image array holds NaN or infinity; expected values in [0, 1]")
        if a.min() < 0 or a.max() > 1:
            raise InputError(f"float image array must hold values in [0, 1], got "
                             f"[{a.min()}, {a.max()}]")
        a = np.round(a.astype(np.float64) * 255)
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        raise InputError(f"image array has dtype {a.dtype}; expected uint8, or float in [0, 1]")
    a = a.astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 4:
        alpha = a[..., 3:4] / 255
        a = np.round(alpha * a[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a))


# ---- modes ----------------------------------------------------------------------------------

def _sixteen_bit_to_l(img):
    """16-bit gray (I;16*, or I holding 0..65535) -> 8-bit L by round(v / 257), clipped first.

    HF's `.convert("RGB")` clips these to 255, so most 16-bit images come out nearly white;
    v / 257 maps 0..65535 onto 0..255 exactly (65535 = 255 * 257).
    """
    a = np.asarray(img, dtype=np.float64)
    a = np.round(np.clip(a, 0, 65535) / 257)
    return Image.fromarray(a.astype(np.uint8), mode="L")


def to_rgb(img):
    """PIL image of any mode -> mode "RGB", as HF 5.24 `convert_to_rgb` (PIL branch).

    Images with alpha (RGBA, LA, PA, or a palette/gray image with a `transparency` entry) are
    composited onto white: HF 5.x does this (`alpha_composite` on a white RGBA background);
    HF 4.x, and HF 5.x's own `load_image` for paths, simply drop the alpha channel. L, 1, P,
    CMYK, YCbCr, F (float, clipped to 0..255 by Pillow) go through Pillow's `.convert("RGB")`.
    16-bit gray is scaled, not clipped (see `_sixteen_bit_to_l`).
    """
    if img.mode in SIXTEEN_BIT_MODES:
        img = _sixteen_bit_to_l(img)
    try:
        if "A" in img.getbands() or img.info.get("transparency") is not None:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise InputError(f"cannot convert a {img.mode} image to RGB ({_reason(e)})") from None


def load_image(src, *, allow_huge=False):
    """A path (str/Path), an http(s) URL, a PIL image or a NumPy array -> RGB PIL image, EXIF
    orientation applied.

    - EXIF orientation is applied to files and PIL images (`ImageOps.exif_transpose`), so a
      photo taken sideways is seen upright. HF applies it only when *it* opens the file (a path
      or URL given to the processor); a PIL image handed to HF is used as stored.
    - Animated images (GIF, APNG, WebP): the first frame.
    - Alpha, palettes, CMYK, 16-bit: see `to_rgb`. Arrays: see `_from_array`.
    - Files over Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, ~89.5 M
      pixels) are refused with the pixel count, unless `allow_huge=True`.
    - URLs are fetched with a time limit and a size cap (npvlm/inputs/web.py), then decoded as
      a file is.
    Every failure (missing file, a directory, not an image, truncated, empty, too big, a bad
    array, a URL that cannot be fetched) raises a one-line InputError.
    """
    if is_url(src):
        img = _open_url(src, allow_huge)
    elif isinstance(src, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", src):
        raise InputError(f"{src}: only http:// and https:// URLs are read; download the file and "
                         "pass its path")
    elif isinstance(src, (str, Path)):
        img = _open_file(Path(src), allow_huge)
    elif isinstance(src, Image.Image):
        img = src
        try:
            img.load()   # a lazily opened PIL image may still hold a truncated file
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise InputError(f"truncated or corrupt image ({_reason(e)})") from None
    elif isinstance(src, np.ndarray):
        img = _from_array(src)
    else:
        raise InputError(f"an image must be a file path, an http(s) URL, a PIL image or a NumPy array, got "
                         f"{type(src).__name__}")
    if img.width == 0 or img.height == 0:
        raise InputError(f"image has zero size ({img.width}x{img.height})")
    if isinstance(src, Image.Image):
        img = _exif_upright(img)    # a copy: the caller's image is not changed
    return to_rgb(img)


# ---- preprocessing --------------------------------------------------------------------------

def preprocess(image, size):
    """One image (anything `load_image` takes) -> float32[3, R, R] in [-1, 1], R = `size`.

    Matches HF `SiglipImageProcessorPil` (PilBackend.resize/rescale/normalize): the aspect ratio
    is not kept (squashed to a square, no crop), and PIL rounds and clips the bicubic result
    to uint8 before the rescale.
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise InputError(f"image size must be a positive integer, got {size!r}")
    img = load_image(image)
    x = np.asarray(img.resize((size, size), resample=Image.Resampling.BICUBIC,
                              reducing_gap=None))                    # uint8 [R, R, C]
    x = (x.astype(np.float64) * RESCALE).astype(np.float32)         # HF rescale: fp64, then fp32
    x = (x - MEAN) / STD                                             # HF normalize, in fp32
    return np.ascontiguousarray(x.transpose(2, 0, 1))                # [R, R, C] -> [C, R, R]


def preprocess_batch(images, size):
    """A list of images -> float32[B, 3, R, R]."""
    if isinstance(images, (str, Path, Image.Image, np.ndarray)):
        images = [images]
    images = list(images)
    if not images:
        raise InputError("no images given")
    return np.stack([preprocess(img, size) for img in images])
