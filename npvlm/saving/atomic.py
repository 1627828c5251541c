"""Writing user-visible files atomically: a temp file in the same folder, then a rename, so a
crash or a full disk never leaves a half-written output (and never a truncated original)."""

import os
import secrets
from pathlib import Path

from PIL import Image

from ..errors import InputError


def check_path_given(flag, value):
    """A command-line output path that is not an empty string."""
    if value is not None and not value.strip():
        raise InputError(f"{flag} needs a path, got an empty string")


def check_outside(flag, path, model_dir):
    """An output path that is not the model folder or inside it."""
    path, model = Path(path).resolve(), Path(model_dir).resolve()
    if path == model or model in path.parents:
        raise InputError(f"{flag} {path}: is inside the model folder {model_dir}; write outputs elsewhere")


def check_writable(path, inputs=(), example="out.png"):
    """Refuse, before any work, an output path that cannot be written or that is an input
    (`example`: a file name to suggest when the path is a folder)."""
    path = Path(path)
    for src in inputs:
        try:
            if src is not None and Path(src).exists() and path.exists() and os.path.samefile(path, src):
                raise InputError(f"{path}: refusing to overwrite the input file; choose another output path")
        except OSError:
            pass
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give a file name such as {example}")
    folder = path.parent if str(path.parent) else Path(".")
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{path}: {folder} is a file, not a folder; choose an output path in an "
                         "existing folder")
    if not folder.is_dir():
        raise InputError(f"{path}: folder {folder} does not exist; create it or choose another path")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{path}: folder {folder} is not writable; choose another folder")
    return path


def check_new_folder(path):
    """Refuse, before any work, an output folder that exists with something in it (nothing the
    user owns is overwritten) or whose parent cannot be written."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and (not path.is_dir() or any(path.iterdir()))):
        raise InputError(f"{path}: exists and is not an empty folder; choose a new folder")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{path}: folder {parent} does not exist; create it or choose another path")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{path}: folder {parent} is not writable; choose another folder")
    return path


def image_format(path):
    """The Pillow format name for an output file's extension (.png -> "PNG"); InputError if none."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise InputError(f"{path}: unknown image extension {Path(path).suffix!r}; use .png or .jpg")
    return fmt


def _write_atomic(path, write):
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    # O_EXCL with mode 0o666: a fresh name, and the permissions a plain open() would give
    # (the umask applies), unlike tempfile.mkstemp's 0o600
    tmp = folder / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as e:
        raise InputError(f"{path}: cannot write in {folder} ({e.strerror or e})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):   # a full disk, a vanished folder: the old file is untouched
            raise InputError(f"{path}: cannot write ({e.strerror or e}); any previous file there "
                             "is unchanged") from None
        raise


def write_text_atomic(path, text):
    _write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def save_image_atomic(image, path):
    """Save a PIL image; the format comes from the file extension."""
    fmt = image_format(path)
    _write_atomic(path, lambda f: image.save(f, format=fmt))
