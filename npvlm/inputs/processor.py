"""Images + prompts -> model inputs, as HF 5.24 `PaliGemmaProcessor(..., padding="longest")` with
the tokenizer's `padding_side="left"` (docs/spec.md §5.2).

Axis letters: B batch (one image per prompt), T sequence (image tokens + bos + prompt + "\\n"
[+ suffix + eos]), R image side (npvlm/model/layers.py).
"""

from pathlib import Path

import numpy as np

from ..config import IGNORE_INDEX
from ..errors import CheckpointError, InputError
from .image import preprocess_batch
from .tokenizer import Tokenizer


def left_pad(rows, pad_value):
    """list of B int lists -> int64[B, T] right-aligned, T = the longest row, `pad_value` before."""
    T = max(len(r) for r in rows)
    out = np.full((len(rows), T), pad_value, dtype=np.int64)
    for b, r in enumerate(rows):
        if r:
            out[b, T - len(r):] = r
    return out


class Processor:
    """Tokenizer + image preprocessing for one PaliGemma config.

    `processor(images, prompts, suffixes=None)` returns NumPy arrays:
        input_ids       int64[B, T]   left-padded with the pad id (the convention for generation)
        attention_mask  int64[B, T]   1 on tokens (image tokens included), 0 on padding
        token_type_ids  int64[B, T]   1 on suffix + eos tokens, 0 elsewhere (padding included)
        pixel_values    float32[B, 3, R, R] in [-1, 1]
        labels          int64[B, T]   with suffixes (training): the ids of the suffix + eos
                                      tokens, -100 elsewhere (as HF's processor gives them)
    """

    def __init__(self, tokenizer, cfg):
        if tokenizer.image_token_id != cfg.image_token_index:
            raise CheckpointError(f"{tokenizer.source}: tokenizer <image> id {tokenizer.image_token_id} "
                                  f"differs from config.json image_token_index {cfg.image_token_index}")
        for name in ("bos", "eos"):
            ours, theirs = getattr(tokenizer, f"{name}_id"), getattr(cfg, f"{name}_token_id")
            if ours != theirs:
                raise CheckpointError(f"{tokenizer.source}: tokenizer <{name}> id {ours} differs from "
                                      f"config.json {name}_token_id {theirs}")
        self.tokenizer = tokenizer
        self.cfg = cfg

    @classmethod
    def from_model_dir(cls, path, cfg):
        """Read `<path>/tokenizer.model` (the SentencePiece model next to config.json)."""
        file = Path(path) / "tokenizer.model"
        if not file.is_file():
            raise CheckpointError(f"{file}: file not found; the model folder needs the SentencePiece "
                                  "tokenizer")
        return cls(Tokenizer.from_file(file, cfg.image_token_index), cfg)

    @property
    def image_size(self):
        return self.cfg.vision.image_size

    def __call__(self, images, prompts, suffixes=None):
        """One image per prompt; a single prompt (str) may come with a single image."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise InputError("prompts must be a string or a list of strings")
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if len(images) != len(prompts):
            raise InputError(f"{len(images)} image(s) for {len(prompts)} prompt(s); give one image "
                             "per prompt")
        if not prompts:
            raise InputError("no prompts given")
        if suffixes is None:
            suffixes = [None] * len(prompts)
        else:
            suffixes = [suffixes] if isinstance(suffixes, str) else list(suffixes)
            if len(suffixes) != len(prompts):
                raise InputError(f"{len(suffixes)} suffix(es) for {len(prompts)} prompt(s)")

        N = self.cfg.num_image_tokens
        rows = [self.tokenizer.prompt_ids(p, N, s) for p, s in zip(prompts, suffixes)]
        ids = [r[0] for r in rows]
        out = {
            "input_ids": left_pad(ids, self.tokenizer.pad_id),               # [B, T]
            "attention_mask": left_pad([[1] * len(r) for r in ids], 0),      # [B, T]
            "token_type_ids": left_pad([r[1] for r in rows], 0),             # [B, T]
            "pixel_values": preprocess_batch(images, self.image_size),       # [B, 3, R, R]
        }
        if any(s is not None for s in suffixes):
            out["labels"] = np.where(out["token_type_ids"] == 1, out["input_ids"], IGNORE_INDEX)
        return out

    def __repr__(self):
        return (f"Processor({self.tokenizer!r}, image {self.image_size}px, "
                f"{self.cfg.num_image_tokens} tokens)")
