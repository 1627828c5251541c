"""Examples: a JSONL file of (image, prefix, suffix) lines, read and checked line by line, for
fine-tuning (npvlm/training) and evaluation (npvlm/evaluation).

One JSONL line per example, the image path relative to the JSONL file or an http(s) URL (fetched
once, when the file is read), with big_vision's and transformers' prefix/suffix naming:

    {"image": "images/0001.png", "prefix": "caption en", "suffix": "a red circle"}

Other keys are kept as they are (`Example.fields`): the evaluation reads its ground truth from
them (`answers`, `references`, `box_yxyx`, `mask`). Every bad example is one `InputError` naming
the file and the line.
"""

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..errors import InputError
from .image import is_url
from .web import fetch

ORIENTATION = 0x0112        # the EXIF orientation tag; 5-8 turn the image a quarter
TURNED = (5, 6, 7, 8)


@dataclass(frozen=True)
class Example:
    source: object      # the JSONL file, as given (for messages)
    line: int           # 1-based line in it
    image: object       # the image file's Path, or an http(s) URL
    prefix: str
    suffix: str
    fetched: bytes = None   # a URL's image file, fetched once when the JSONL is read
    size: tuple = None      # (width, height) of the image, read from its header
    fields: dict = field(default_factory=dict, compare=False)   # the line's other keys, as written


def _turned(im):
    """Whether the image's EXIF orientation turns it a quarter (a malformed EXIF block: no, as
    load_image keeps the stored pixels then)."""
    try:
        return im.getexif().get(ORIENTATION) in TURNED
    except Exception:  # noqa: BLE001 (Pillow's EXIF parser raises several types)
        return False


def read_jsonl(path, limit=None):
    """Every example of a JSONL file (the first `limit` only, the rest not read), checked:
    one-line InputErrors naming file and line."""
    source, path = path, Path(path)
    if not path.is_file():
        raise InputError(f"{path}: data file not found")
    examples = []
    with open(path, "rb") as f:                 # lines end at \n only (a JSON string may hold U+2028)
        for n, raw in enumerate(f, 1):
            if limit is not None and len(examples) >= limit:
                break
            if n == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")     # a byte-order mark some editors write
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{path} line {n}: not UTF-8 text") from None
            example = _example(source, path, n, text.rstrip("\r\n"))
            if example is not None:
                examples.append(example)
    if not examples:
        raise InputError(f"{path}: no examples")
    return examples


def _example(source, path, n, text):
    """One line -> Example, checked (None for a blank line)."""
    if not text.strip():
        return None
    where = f"{path} line {n}"
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(d, dict):
        raise InputError(f"{where}: an example must be a JSON object with image, prefix, suffix")
    for key in ("image", "prefix", "suffix"):
        if not isinstance(d.get(key), str):
            raise InputError(f"{where}: '{key}' is missing or not a string")
    if not d["suffix"].strip():
        raise InputError(f"{where}: 'suffix' is empty; an example needs an answer to learn")
    fetched = None
    if is_url(d["image"]):
        image = d["image"]
        try:
            fetched, _ = fetch(image)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
    else:
        image = (path.parent / d["image"]).resolve()
        if not image.is_file():
            raise InputError(f"{where}: image {d['image']!r} not found (looked for {image})")
    try:
        with Image.open(io.BytesIO(fetched) if fetched is not None else image) as im:
            size = im.size          # the header is read: a file Pillow cannot open fails here
            if _turned(im):         # upright, as load_image turns it
                size = size[::-1]
    except Exception as e:  # noqa: BLE001 (Pillow raises several types; reported as one line)
        raise InputError(f"{where}: image {d['image']!r} cannot be read ({type(e).__name__})") from None
    others = {k: v for k, v in d.items() if k not in ("image", "prefix", "suffix")}
    return Example(source, n, image, d["prefix"], d["suffix"], fetched, size, others)
