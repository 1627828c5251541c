"""The model's greedy answers to a list of examples, in batches, with a progress bar."""

import io
import sys

from PIL import Image
from tqdm import tqdm

from ..errors import InputError
from ..inputs.image import load_image


def example_image(e):
    """An example's image, upright RGB; a bad one is one line naming the file and line."""
    try:
        return load_image(Image.open(io.BytesIO(e.fetched)) if e.fetched is not None else e.image)
    except InputError as err:
        raise InputError(f"{e.source} line {e.line}: {err}") from None


def check_images(examples):
    """Decode every distinct image once (and let it go), so an image damaged past its header is
    one line naming its file and line before any answer is made."""
    seen = set()
    for e in examples:
        key = e.image if e.fetched is None else id(e.fetched)
        if key not in seen:
            seen.add(key)
            example_image(e)


def predict(model, examples, batch_size=8, max_new_tokens=64, logprobs=False, quiet=False, desc="evaluating"):
    """Greedy answers (Generation objects, with token log-probabilities if asked) for the
    examples, in order, `batch_size` prompts per generate call."""
    out = []
    bar = tqdm(total=len(examples), desc=desc, unit="ex", file=sys.stderr, dynamic_ncols=True, disable=quiet)
    try:                              # the bar ends its line however the loop ends (Ctrl-C too)
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            out.extend(model.generate([example_image(e) for e in chunk], [e.prefix for e in chunk],
                                      max_new_tokens=max_new_tokens, logprobs=logprobs))
            bar.update(len(chunk))
    finally:
        bar.close()
    return out
