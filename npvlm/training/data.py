"""Fine-tuning data: a JSONL file of examples, checked line by line, and the batches of each step.

One JSONL line per example, the image path relative to the JSONL file or an http(s) URL (fetched
once, when the file is read), with big_vision's and transformers' prefix/suffix naming:

    {"image": "images/0001.png", "prefix": "caption en", "suffix": "a red circle"}

Examples are taken in file order (or a seeded shuffle per epoch), in batches of `batch_size`;
`grad_accum` batches make one optimizer step. Every bad example is one `InputError` naming the
file and the line.
"""

import functools
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InputError
from ..inputs.image import is_url, load_image
from ..inputs.web import fetch


@dataclass(frozen=True)
class Example:
    source: object      # the JSONL file, as given (for messages)
    line: int           # 1-based line in it
    image: object       # the image file's Path, or an http(s) URL
    prefix: str
    suffix: str
    fetched: bytes = None   # a URL's image file, fetched once when the JSONL is read


def read_jsonl(path):
    """Every example of a JSONL file, checked: one-line InputErrors naming file and line."""
    source, path = path, Path(path)
    if not path.is_file():
        raise InputError(f"{path}: data file not found")
    examples = []
    for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
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
                im.size  # noqa: B018 (the header is read: a file Pillow cannot open fails here)
        except Exception as e:  # noqa: BLE001 (Pillow raises several types; reported as one line)
            raise InputError(f"{where}: image {d['image']!r} cannot be read ({type(e).__name__})") from None
        examples.append(Example(source, n, image, d["prefix"], d["suffix"], fetched))
    if not examples:
        raise InputError(f"{path}: no examples")
    return examples


def check_lengths(examples, processor, cfg, max_len):
    """Refuse an example whose text (<bos> prefix "\\n" suffix <eos>) exceeds max_len tokens or
    whose whole sequence exceeds the model's positions."""
    N, limit = cfg.num_image_tokens, cfg.text.max_position_embeddings
    for e in examples:
        n = len(processor.tokenizer.prompt_ids(e.prefix, N, e.suffix)[0])
        if n - N > max_len:
            raise InputError(f"{e.source} line {e.line}: the example is {n - N} text tokens, over --max-len "
                             f"{max_len}; shorten it or raise --max-len")
        if n > limit:
            raise InputError(f"{e.source} line {e.line}: {n} tokens ({N} image tokens) exceed the model's "
                             f"{limit} positions")


def make_batch(model, examples):
    """The examples as a training batch on the model's backend (with labels: the suffix tokens)."""
    images = []
    for e in examples:
        try:
            images.append(load_image(Image.open(io.BytesIO(e.fetched)) if e.fetched is not None else e.image))
        except InputError as err:
            raise InputError(f"{e.source} line {e.line}: {err}") from None
    return model.device_batch(model.processor(images, [e.prefix for e in examples], [e.suffix for e in examples]))


def step_batches(step, n_examples, batch_size, grad_accum, seed=0, shuffle=False):
    """The example indices of each micro-batch of optimizer step `step` (0-based): epochs of the
    file order, or of a seeded shuffle per epoch. -> grad_accum lists of batch_size indices"""
    per_step = batch_size * grad_accum
    out = []
    for k in range(grad_accum):
        start = step * per_step + k * batch_size
        out.append([int(epoch_order(n_examples, i // n_examples, seed, shuffle)[i % n_examples])
                    for i in range(start, start + batch_size)])
    return out


@functools.lru_cache(maxsize=2)
def epoch_order(n_examples, epoch, seed, shuffle):
    """The example order of one epoch (computed once per epoch, not once per step)."""
    return np.random.default_rng([seed, epoch]).permutation(n_examples) if shuffle else np.arange(n_examples)


def total_steps(steps, epochs, n_examples, per_step):
    """`steps` if set, else the optimizer steps of `epochs` passes over the examples."""
    return steps if steps else epochs * math.ceil(n_examples / per_step)
