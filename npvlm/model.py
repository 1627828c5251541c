"""`npvlm.load(path)`: a model folder -> a ready PaliGemma on the chosen backend."""

from pathlib import Path

from . import paligemma
from .backend import get_backend, to_device
from .config import load_config
from .errors import CheckpointError, ConfigError
from .weights import load_params


class PaliGemma:
    """A loaded model: its config, its parameter tree (on the backend's device) and `xp`.

    The math lives in plain functions (`npvlm.paligemma`, `npvlm.siglip`, `npvlm.gemma`); this
    object only holds what they need, so a notebook can call any of them on `model.params`.
    """

    def __init__(self, cfg, params, xp, path=None):
        self.cfg = cfg
        self.params = params
        self.xp = xp
        self.path = path

    @property
    def backend(self):
        return self.xp.__name__

    def asarray(self, x, dtype=None):
        """Move a host array to this model's device (the one host->device point for inputs)."""
        return self.xp.asarray(x, dtype=dtype)

    def new_cache(self, batch, capacity):
        return paligemma.new_cache(self.cfg, batch, capacity, self.params["text"]["norm"]["weight"])

    def prefill(self, input_ids, attention_mask, pixel_values=None, token_type_ids=None,
                cache=None, logits_for="last", trace=None):
        xp = self.xp
        return paligemma.prefill(
            self.params, self.cfg, xp.asarray(input_ids), xp.asarray(attention_mask),
            None if pixel_values is None else xp.asarray(pixel_values, dtype=xp.float32),
            None if token_type_ids is None else xp.asarray(token_type_ids),
            cache, logits_for, trace)

    def decode_step(self, token_ids, cache, trace=None):
        return paligemma.decode_step(self.params, self.cfg, self.xp.asarray(token_ids), cache, trace)

    def __repr__(self):
        v, t = self.cfg.vision, self.cfg.text
        return (f"PaliGemma({t.model_type}, image {v.image_size}px -> {v.num_patches} tokens, "
                f"text {t.num_hidden_layers}x{t.hidden_size}, vocab {t.vocab_size}, backend {self.backend})")


def load(path, backend="numpy"):
    """Load a PaliGemma model folder (config.json + safetensors) onto `backend` ("numpy" or
    "cupy"). Weights are checked strictly and widened to fp32 once."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: model folder not found")
    if not path.is_dir():
        raise ConfigError(f"{path}: not a folder; pass the folder that holds config.json and the "
                          ".safetensors files")
    xp = get_backend(backend)          # fail before reading gigabytes if the backend is unusable
    cfg = load_config(path)
    if cfg.text.model_type != "gemma":
        raise CheckpointError(f"{path}: text_config.model_type {cfg.text.model_type!r} (PaliGemma 2) "
                              "is not supported yet; npvlm currently runs PaliGemma 1 ('gemma')")
    params = load_params(path, cfg)
    if xp.__name__ != "numpy":
        params = to_device(params, xp)
    return PaliGemma(cfg, params, xp, path)
