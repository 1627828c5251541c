"""Fine-tuning data: the examples of a JSONL file (read and checked line by line by
npvlm/inputs/examples.py) in the batches of each step.

Examples are taken in file order (or a seeded shuffle per epoch), in batches of `batch_size`;
`grad_accum` batches make one optimizer step. Every bad example is one `InputError` naming the
file and the line.
"""

import functools
import io
import math

import numpy as np
from PIL import Image

from ..errors import InputError
from ..inputs.image import load_image


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
