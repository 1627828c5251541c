"""PaliGemma configuration, read from a checkpoint's `config.json` into frozen dataclasses.

Only `config.json` is trusted. Values that official configs leave out are filled with the
defaults of the Hugging Face model classes that wrote them (docs/spec.md §2.1: Gemma `head_dim=256`,
`rms_norm_eps=1e-6`, `rope_theta=10000`, `max_position_embeddings=8192`; SigLIP
`image_size=224`, `layer_norm_eps=1e-6`, `num_channels=3`). The `PaliGemmaConfig()` class
defaults that the spec warns about (vision `intermediate_size=4096`, `image_token_index=256000`,
`vocab_size=257152`, top-level `hidden_size=2048`) are never used: those fields are required.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

# PaliGemma's token layout beyond the Gemma vocabulary (big_vision `get_extra_tokens`), and the
# label convention of its training batches
NUM_LOC = 1024              # <loc0000>..<loc1023>: a box coordinate, as a bin of the image side
NUM_SEG = 128               # <seg000>..<seg127>: a code of the segmentation VQ-VAE's codebook
SEG_CODES = 16              # the <seg> tokens of one mask: a 4x4 grid of codes
IGNORE_INDEX = -100         # the label of a position without loss (HF `ignore_index`): the
                            # processor writes it, the loss skips it

# Activation names that mean tanh-approximated GELU (HF `ACT2FN`): all PaliGemma towers use it.
# transformers 5.x rewrites a Gemma "gelu" to "gelu_pytorch_tanh", as the original Gemma does.
TANH_GELU_NAMES = ("gelu_pytorch_tanh", "gelu_fast", "gelu_new", "gelu")


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision tower (docs/spec.md §8)."""
    hidden_size: int          # D_v: 1152 for So400m
    intermediate_size: int    # F_v: 4304 for So400m
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int           # R: square input side in pixels (224 / 448 / 896)
    patch_size: int           # P: 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    @property
    def grid_size(self):
        """Patches per image side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self):
        """N: image tokens per image, (R // P)^2, as SigLIP computes it (not `num_positions`)."""
        return self.grid_size ** 2

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @property
    def attn_scale(self):
        """Multiplier of q.k: head_dim**-0.5 (HF `SiglipAttention.scale`)."""
        return self.head_dim ** -0.5

    attn_logit_softcapping = None   # SigLIP does not cap its attention logits


@dataclass(frozen=True)
class TextConfig:
    """Gemma (PaliGemma 1) or Gemma 2 (PaliGemma 2) decoder (docs/spec.md §9, §10)."""
    model_type: str           # "gemma" or "gemma2"
    vocab_size: int           # V: rows of embed_tokens (257216 for the real models)
    hidden_size: int          # D
    intermediate_size: int    # F
    num_hidden_layers: int
    num_attention_heads: int  # Hq
    num_key_value_heads: int  # Hk (1 = MQA, Hq = MHA, otherwise GQA)
    head_dim: int             # E
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    # Gemma 2 only (None for Gemma 1)
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: tuple = ()   # per layer "full_attention" / "sliding_attention" (Gemma 2)

    def layer_type(self, i):
        return self.layer_types[i] if self.layer_types else "full_attention"

    @property
    def attn_scale(self):
        """Multiplier of q.k: head_dim**-0.5 (Gemma 1), query_pre_attn_scalar**-0.5 (Gemma 2)."""
        if self.query_pre_attn_scalar is not None:
            return self.query_pre_attn_scalar ** -0.5
        return self.head_dim ** -0.5

    @property
    def embed_scale(self):
        """sqrt(D): text embeddings are multiplied by it (docs/spec.md §6); cast to fp32 where used."""
        return math.sqrt(self.hidden_size)


@dataclass(frozen=True)
class PaliGemmaConfig:
    vision: VisionConfig
    text: TextConfig
    image_token_index: int    # id of `<image>` (257152 in the real models)
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: int = 1

    @property
    def num_image_tokens(self):
        return self.vision.num_patches


def _require(d, key, where, kind=int):
    if key not in d or d[key] is None:
        raise ConfigError(f"config.json: required field '{where}{key}' is missing")
    value = d[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"config.json: field '{where}{key}' must be an integer, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"config.json: field '{where}{key}' must be a number, got {value!r}")
    if kind in (int, float) and value <= 0:
        raise ConfigError(f"config.json: field '{where}{key}' must be positive, got {value!r}")
    return value


def _optional(d, key, where, default, kind=int):
    if d.get(key) is None:
        return default
    return _require(d, key, where, kind)


def _check_activation(d, where, keys):
    for key in keys:
        act = d.get(key)
        if act is not None and act not in TANH_GELU_NAMES:
            raise ConfigError(f"config.json: field '{where}{key}' is {act!r}; PaliGemma uses "
                              f"tanh-approximated GELU ({', '.join(TANH_GELU_NAMES)})")


def _vision_from_dict(d):
    w = "vision_config."
    _check_activation(d, w, ("hidden_act",))
    cfg = VisionConfig(
        hidden_size=_require(d, "hidden_size", w),
        intermediate_size=_require(d, "intermediate_size", w),
        num_hidden_layers=_require(d, "num_hidden_layers", w),
        num_attention_heads=_require(d, "num_attention_heads", w),
        image_size=_optional(d, "image_size", w, 224),
        patch_size=_require(d, "patch_size", w),
        num_channels=_optional(d, "num_channels", w, 3),
        layer_norm_eps=_optional(d, "layer_norm_eps", w, 1e-6, float),
    )
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError(f"config.json: 'vision_config.hidden_size' ({cfg.hidden_size}) is not a "
                          f"multiple of 'vision_config.num_attention_heads' ({cfg.num_attention_heads})")
    if cfg.image_size % cfg.patch_size:
        raise ConfigError(f"config.json: 'vision_config.image_size' ({cfg.image_size}) is not a "
                          f"multiple of 'vision_config.patch_size' ({cfg.patch_size})")
    return cfg


def _text_from_dict(d):
    w = "text_config."
    model_type = d.get("model_type")
    if model_type not in ("gemma", "gemma2"):
        raise ConfigError(f"config.json: 'text_config.model_type' is {model_type!r}; "
                          "PaliGemma uses 'gemma' (PaliGemma 1) or 'gemma2' (PaliGemma 2)")
    _check_activation(d, w, ("hidden_act", "hidden_activation"))
    rope = d.get("rope_parameters") or {}  # transformers 5.x nests rope_theta here
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"config.json: 'text_config.rope_parameters.rope_type' is "
                          f"{rope['rope_type']!r}; PaliGemma uses plain RoPE ('default')")
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    heads = _require(d, "num_attention_heads", w)
    kv_heads = _optional(d, "num_key_value_heads", w, heads)
    if heads % kv_heads:
        raise ConfigError(f"config.json: 'text_config.num_attention_heads' ({heads}) is not a "
                          f"multiple of 'text_config.num_key_value_heads' ({kv_heads})")
    gemma2 = model_type == "gemma2"
    g2 = {}
    if gemma2:
        layers = _require(d, "num_hidden_layers", w)
        window = _optional(d, "sliding_window", w, None)
        # HF Gemma2Config: even layers (0, 2, ...) slide, odd layers see everything
        types = d.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                         for i in range(layers)]
        if len(types) != layers or not set(types) <= {"sliding_attention", "full_attention"}:
            raise ConfigError("config.json: 'text_config.layer_types' must list 'sliding_attention' "
                              f"or 'full_attention' for each of the {layers} layers")
        if window is None:
            types = ["full_attention"] * layers
        g2 = dict(
            query_pre_attn_scalar=_require(d, "query_pre_attn_scalar", w, float),
            attn_logit_softcapping=_optional(d, "attn_logit_softcapping", w, None, float),
            final_logit_softcapping=_optional(d, "final_logit_softcapping", w, None, float),
            sliding_window=window,
            layer_types=tuple(types),
        )
    return TextConfig(
        model_type=model_type,
        vocab_size=_require(d, "vocab_size", w),
        hidden_size=_require(d, "hidden_size", w),
        intermediate_size=_require(d, "intermediate_size", w),
        num_hidden_layers=_require(d, "num_hidden_layers", w),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=_optional(d, "head_dim", w, 256),
        rms_norm_eps=_optional(d, "rms_norm_eps", w, 1e-6, float),
        rope_theta=float(theta),
        max_position_embeddings=_optional(d, "max_position_embeddings", w, 8192),
        **g2,
    )


def config_from_dict(d):
    """Build a PaliGemmaConfig from the parsed `config.json` dict; ConfigError names the field."""
    if not isinstance(d, dict):
        raise ConfigError("config.json: the top level must be a JSON object")
    if d.get("model_type") != "paligemma":
        raise ConfigError(f"config.json: 'model_type' is {d.get('model_type')!r}, not 'paligemma'; "
                          "this folder does not hold a PaliGemma model")
    for key in ("vision_config", "text_config"):
        if not isinstance(d.get(key), dict):
            raise ConfigError(f"config.json: required section '{key}' is missing")
    vision = _vision_from_dict(d["vision_config"])
    text = _text_from_dict(d["text_config"])
    image_token = d.get("image_token_index", d.get("image_token_id"))
    if isinstance(image_token, bool) or not isinstance(image_token, int) or image_token < 0:
        raise ConfigError("config.json: required field 'image_token_index' is missing or not an "
                          "integer (the real models use 257152)")
    cfg = PaliGemmaConfig(
        vision=vision, text=text, image_token_index=image_token,
        pad_token_id=d.get("pad_token_id", d["text_config"].get("pad_token_id", 0)) or 0,
        bos_token_id=d.get("bos_token_id", d["text_config"].get("bos_token_id", 2)),
        eos_token_id=d.get("eos_token_id", d["text_config"].get("eos_token_id", 1)),
    )
    projection = d["vision_config"].get("projection_dim", d.get("projection_dim"))
    if projection is not None and projection != text.hidden_size:
        raise ConfigError(f"config.json: 'vision_config.projection_dim' ({projection}) differs from "
                          f"'text_config.hidden_size' ({text.hidden_size}); the projector maps "
                          "image features to the text width")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or not 0 <= value < text.vocab_size:
            raise ConfigError(f"config.json: '{name}' ({value!r}) is not a token id below "
                              f"'text_config.vocab_size' ({text.vocab_size})")
    return cfg


def load_config(model_dir):
    """Read `<model_dir>/config.json`."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: file not found; a model folder needs config.json next to "
                          "its .safetensors files")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    try:
        return config_from_dict(d)
    except ConfigError as e:   # name the file the user passed, not just "config.json"
        msg = str(e)
        raise ConfigError(f"{path}{msg[len('config.json'):]}" if msg.startswith("config.json:")
                          else f"{path}: {msg}") from None
