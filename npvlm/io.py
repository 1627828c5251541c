"""Writing user-visible files atomically: a temp file in the same folder, then a rename, so a
crash or a full disk never leaves a half-written output (and never a truncated original)."""

import os
import tempfile
from pathlib import Path

from .errors import InputError


def check_writable(path, inputs=()):
    """Refuse, before any work, an output path that cannot be written or that is an input."""
    path = Path(path)
    for src in inputs:
        try:
            if src is not None and Path(src).exists() and path.exists() and os.path.samefile(path, src):
                raise InputError(f"{path}: refusing to overwrite the input file; choose another output path")
        except OSError:
            pass
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give a file name such as out.png")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{path}: folder {folder} is not writable")
    return path


def _write_atomic(path, write):
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_text_atomic(path, text):
    _write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def save_image_atomic(image, path):
    """Save a PIL image; the format comes from the file extension."""
    from PIL import Image  # noqa: PLC0415
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None:
        raise InputError(f"{path}: unknown image extension; use .png or .jpg")
    _write_atomic(path, lambda f: image.save(f, format=fmt))
