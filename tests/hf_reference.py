"""Dev-only helpers that produce reference ("golden") data from Hugging Face transformers.

This module needs ``torch``, ``transformers`` and ``safetensors``; the ``npvlm`` package itself
does not. It is the tests' library (tests/ is on sys.path under pytest); the live tests skip when
torch is missing, and tests/make_goldens.py uses it to write the committed goldens.

Main entry points:

- :func:`build_tiny_model`  random tiny ``PaliGemmaForConditionalGeneration`` (fp32, eager, eval)
- :func:`make_inputs`       a two-row batch (row 1 left-padded) in NumPy
- :func:`capture_stages`    per-stage activations of one forward pass, as float32 NumPy arrays
- :func:`greedy_generate`   exactly ``n`` greedy tokens (eos disabled); also
                            :func:`greedy_generate_with_logits` and :func:`greedy_margins`
- :func:`save_hub_layout`, :func:`save_v5_layout`, :func:`save_v452_layout`
                            checkpoints in the three key-naming schemes (docs/spec.md §3), and
                            :func:`save_with_save_pretrained` (what ``save_pretrained`` writes)

Shape letters: B batch, T sequence, N image tokens, S image side, Dv vision width,
D text width, V vocabulary.

A *spec* is a plain dict (JSON-serialisable, stored in ``tests/goldens/meta.json``)::

    {
      "vision": {"image_size", "patch_size", "hidden_size", "intermediate_size",
                 "num_hidden_layers", "num_attention_heads"},
      "text":   {"model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
                 "max_position_embeddings"},
      "image_token_index": int,
      "newline_id": int,                       # 108 if < vocab else 5
      "init": {"weight_std", "bias_std", "norm_std", "embed_std"},   # optional
    }
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import numpy as np
import torch

PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
ACT = "gelu_pytorch_tanh"

# With tied embeddings a weak decoder just repeats the last input token (its own embedding dominates
# the residual stream). weight_std 0.2 with embed_std 0.05 makes the layers dominate, so greedy
# sequences vary, while activations stay O(10).
DEFAULT_INIT = {
    "weight_std": 0.2,  # Linear / Conv2d weights
    "bias_std": 0.05,  # every bias (SigLIP linears, LayerNorm, projector)
    "norm_std": 0.1,  # LayerNorm: weight = 1 + N(0, s); Gemma RMSNorm: weight = N(0, s) (used as 1 + w)
    "embed_std": 0.05,  # token and position embeddings
}


# ----------------------------------------------------------------------------- model


def num_image_tokens(spec: dict) -> int:
    """N = (image_size // patch_size) ** 2."""
    v = spec["vision"]
    return (v["image_size"] // v["patch_size"]) ** 2


# Gemma 2 text fields passed through from a spec (PaliGemma 2 tiny models)
GEMMA2_FIELDS = ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                 "sliding_window", "layer_types")


def make_config(spec: dict):
    """Build a ``PaliGemmaConfig`` (eager attention) from a spec dict."""
    from transformers import PaliGemmaConfig

    v, t = spec["vision"], spec["text"]
    special = dict(pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID)
    vision_config = dict(
        model_type="siglip_vision_model",
        hidden_size=v["hidden_size"],
        intermediate_size=v["intermediate_size"],
        num_hidden_layers=v["num_hidden_layers"],
        num_attention_heads=v["num_attention_heads"],
        image_size=v["image_size"],
        patch_size=v["patch_size"],
        hidden_act=ACT,
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )
    text_config = dict(
        model_type=t.get("model_type", "gemma"),
        hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"],
        num_hidden_layers=t["num_hidden_layers"],
        num_attention_heads=t["num_attention_heads"],
        num_key_value_heads=t["num_key_value_heads"],
        head_dim=t["head_dim"],
        vocab_size=t["vocab_size"],
        max_position_embeddings=t.get("max_position_embeddings", 128),
        rms_norm_eps=1e-6,
        hidden_act=ACT,
        hidden_activation=ACT,
        **{k: t[k] for k in GEMMA2_FIELDS if k in t},
        **special,
    )
    return PaliGemmaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=spec["image_token_index"],
        projection_dim=t["hidden_size"],
        hidden_size=t["hidden_size"],
        vocab_size=t["vocab_size"],
        attn_implementation="eager",
        **special,
    )


def _randomize_(model: torch.nn.Module, seed: int, init: dict) -> None:
    """Overwrite every parameter with seeded Gaussian noise, module by module.

    LayerNorm weights become ``1 + N(0, norm_std)``; Gemma RMSNorm weights (stored as an offset,
    applied as ``1 + w``) become ``N(0, norm_std)``; all biases become ``N(0, bias_std)``, so that a
    missing bias or a missing ``1 +`` shows up in the tests.
    """
    from torch import nn

    gen = torch.Generator().manual_seed(seed)

    def normal_(p: torch.Tensor, std: float, mean: float = 0.0) -> None:
        p.copy_(mean + std * torch.randn(p.shape, generator=gen, dtype=torch.float32))

    with torch.no_grad():
        for _, module in model.named_modules():
            if isinstance(module, nn.LayerNorm):
                normal_(module.weight, init["norm_std"], mean=1.0)
                normal_(module.bias, init["bias_std"])
            elif "RMSNorm" in type(module).__name__:
                normal_(module.weight, init["norm_std"])
            elif isinstance(module, nn.Embedding):
                normal_(module.weight, init["embed_std"])
            elif isinstance(module, (nn.Linear, nn.Conv2d)):
                if module is getattr(model, "lm_head", None):
                    continue  # tied to embed_tokens
                normal_(module.weight, init["weight_std"])
                if module.bias is not None:
                    normal_(module.bias, init["bias_std"])


def round_params_to_bf16_(model: torch.nn.Module) -> None:
    """Round every parameter to bfloat16 and back to float32, in place."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))


def build_tiny_model(spec: dict, seed: int, round_to_bf16: bool = False):
    """Random tiny ``PaliGemmaForConditionalGeneration``: fp32, eager attention, eval mode.

    ``round_to_bf16`` rounds all weights to bf16 (kept in fp32), so that a BF16 checkpoint holds
    exactly the weights that produced the goldens.
    """
    from transformers import PaliGemmaForConditionalGeneration

    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(make_config(spec)).to(torch.float32).eval()
    init = {**DEFAULT_INIT, **spec.get("init", {})}
    _randomize_(model, seed, init)
    if init.get("final_norm_gain"):
        # scales the final logits (RMSNorm multiplies by 1 + w): lets a small model's logits
        # reach a Gemma 2 final softcap without larger embeddings, which make it repeat tokens
        with torch.no_grad():
            model.model.language_model.norm.weight.add_(init["final_norm_gain"])
    if round_to_bf16:
        round_params_to_bf16_(model)
    lm = model.model.language_model
    assert model.lm_head.weight is lm.embed_tokens.weight, "lm_head is expected to be tied"
    assert model.config._attn_implementation == "eager"
    return model


# ----------------------------------------------------------------------------- inputs


def newline_id(spec: dict) -> int:
    """``spec["newline_id"]``; by default Gemma's "\\n" (108) when the vocabulary has it, else 5."""
    return spec.get("newline_id", 108 if 108 < spec["text"]["vocab_size"] else 5)


def make_inputs(spec: dict, seed: int) -> dict[str, np.ndarray]:
    """A two-row batch in the PaliGemma prompt layout (docs/spec.md §5).

    Row 0: ``[img]*N + [bos] + 6 text ids + [newline]``.
    Row 1: ``[pad]*3 + [img]*N + [bos] + 3 text ids + [newline]`` (left padded, mask 0 on pads).

    Returns ``input_ids`` int64 [2,T], ``attention_mask`` int64 [2,T], ``token_type_ids`` int64
    [2,T] (all zeros: the whole prompt is prefix; with ``spec["n_suffix"] = k`` the last k tokens
    of each row are 1, a causal suffix as in training), ``pixel_values`` float32 [2,3,S,S] in [-1, 1];
    T = N + 8.
    """
    rng = np.random.default_rng(seed)
    n_img = num_image_tokens(spec)
    vocab = spec["text"]["vocab_size"]
    img_id, nl_id = spec["image_token_index"], newline_id(spec)
    allowed = np.array([i for i in range(4, vocab) if i != img_id], dtype=np.int64)

    def prompt(n_text: int) -> list[int]:
        return [img_id] * n_img + [BOS_ID] + rng.choice(allowed, n_text).tolist() + [nl_id]

    row0 = prompt(6)
    row1 = [PAD_ID] * 3 + prompt(3)
    assert len(row0) == len(row1)
    input_ids = np.array([row0, row1], dtype=np.int64)
    attention_mask = np.ones_like(input_ids)
    attention_mask[1, :3] = 0
    s = spec["vision"]["image_size"]
    pixel_values = rng.uniform(-1.0, 1.0, size=(2, 3, s, s)).astype(np.float32)
    token_type_ids = np.zeros_like(input_ids)
    n_suffix = spec.get("n_suffix", 0)   # training-style inputs: the last tokens are a causal suffix
    if n_suffix:
        token_type_ids[:, -n_suffix:] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
        "pixel_values": pixel_values,
    }


def position_ids_from_mask(attention_mask) -> torch.Tensor:
    """HF's 1-indexed PaliGemma positions: ``cumsum(mask)``, pads set to 1 (docs/spec.md §7.3). [B,T] int64."""
    mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    pos = mask.cumsum(-1)
    return pos.masked_fill(mask == 0, 1)


def _tensors(input_ids, attention_mask, token_type_ids, pixel_values):
    def as_long(a):
        return torch.as_tensor(np.asarray(a), dtype=torch.long)
    return (
        as_long(input_ids),
        as_long(attention_mask),
        as_long(token_type_ids),
        torch.as_tensor(np.asarray(pixel_values), dtype=torch.float32),
    )


# ----------------------------------------------------------------------------- forward capture


def _first_tensor(out) -> torch.Tensor:
    """A module output that is a tensor, a tuple/list whose first item is one, or a ModelOutput."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    raise TypeError(f"cannot take a tensor from a {type(out).__name__}")


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy().copy()


def _towers(model):
    """(SigLIP vision transformer, Gemma decoder) of a PaliGemmaForConditionalGeneration."""
    vt = model.model.vision_tower
    return getattr(vt, "vision_model", vt), model.model.language_model  # transformers < 5 nests SigLIP


def stage_modules(model):
    """(npvlm stage name, module, "output" or "input") of every traced stage, in forward order:
    the stage is that module's output, or for text.embed the input of decoder layer 0 (the
    merged, scaled embeddings). The one list of hooked stages, for activations and gradients."""
    vt, lm = _towers(model)
    yield "vision.embed", vt.embeddings, "output"
    for i, layer in enumerate(vt.encoder.layers):
        yield f"vision.layer.{i:02d}", layer, "output"
    yield "vision.post_norm", vt.post_layernorm, "output"
    yield "projector", model.model.multi_modal_projector, "output"
    yield "text.embed", lm.layers[0], "input"
    for i, layer in enumerate(lm.layers):
        yield f"text.layer.{i:02d}", layer, "output"
    yield "text.final_norm", lm.norm, "output"


def hook_stages(model, on_tensor: Callable) -> list:
    """Forward hooks that call on_tensor(stage name, tensor) at every stage; -> their handles."""
    handles = []
    for name, module, where in stage_modules(model):
        if where == "output":
            handles.append(module.register_forward_hook(
                lambda _m, _inputs, output, name=name: on_tensor(name, _first_tensor(output))))
        else:
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, kwargs, name=name: on_tensor(name, args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True))
    return handles


def capture_stages(model, input_ids, attention_mask, token_type_ids, pixel_values,
                   attentions: bool = False) -> dict[str, np.ndarray]:
    """One fp32 forward pass with hooks; returns float32 arrays keyed by stage name.

    - ``vision.embed``       [B,N,Dv]  SigLIP patch + position embeddings
    - ``vision.layer.KK``    [B,N,Dv]  output of SigLIP encoder layer KK (two digits)
    - ``vision.post_norm``   [B,N,Dv]  post_layernorm output
    - ``projector``          [B,N,D]   multi_modal_projector output (unscaled image tokens)
    - ``text.embed``         [B,T,D]   merged, scaled embeddings entering decoder layer 0
    - ``text.layer.KK``      [B,T,D]   output of Gemma decoder layer KK
    - ``text.final_norm``    [B,T,D]   language_model.norm output
    - ``logits``             [B,T,V]   all positions
    - with ``attentions``: ``vision.attn.KK`` [B,H,N,N] and ``text.attn.KK`` [B,Hq,T,T], the
      eager attention modules' ``attn_weights`` (softmax probabilities, K/V heads repeated)

    Positions are passed explicitly (``cumsum(attention_mask)``, pads = 1) and ``token_type_ids``
    must be given (zeros over the prompt); without them transformers 5.x runs purely causal.
    Values at padded positions are whatever HF computes there and carry no meaning.
    The arrays are float32 whatever the model dtype (a float64 model gives a rounding-free oracle).
    """
    ids, mask, tti, pix = _tensors(input_ids, attention_mask, token_type_ids, pixel_values)
    pix = pix.to(model.dtype)  # float64 models are used to measure HF's own fp32 rounding noise
    out: dict[str, np.ndarray] = {}

    def record_weights(name: str) -> Callable:
        def hook(_module, _inputs, output):        # eager attention returns (out, attn_weights)
            out[name] = _to_numpy(output[1])

        return hook

    handles = hook_stages(model, lambda name, tensor: out.__setitem__(name, _to_numpy(tensor)))
    try:
        if attentions:
            vt, lm = _towers(model)
            for prefix, layers in (("vision", vt.encoder.layers), ("text", lm.layers)):
                for i, layer in enumerate(layers):
                    handles.append(layer.self_attn.register_forward_hook(
                        record_weights(f"{prefix}.attn.{i:02d}")))
        with torch.no_grad():
            result = model(
                input_ids=ids,
                attention_mask=mask,
                token_type_ids=tti,
                pixel_values=pix,
                position_ids=position_ids_from_mask(mask),
                use_cache=False,
            )
    finally:
        for h in handles:
            h.remove()
    out["logits"] = _to_numpy(result.logits)
    return out


# ----------------------------------------------------------------------------- training


def make_training_examples(spec: dict, seed: int, lengths=((6, 5), (3, 2), (4, 7))) -> list[dict]:
    """Training examples in the PaliGemma layout, each a batch of one without padding:
    ``[img]*N + [bos] + p prefix ids + [newline] + s suffix ids + [eos]`` for each (p, s) in
    ``lengths``; ``token_type_ids`` 1 on the suffix and eos, ``labels`` the ids there and -100
    elsewhere (as HF's processor gives them); pixel values uniform in [-1, 1]."""
    rng = np.random.default_rng(seed)
    n_img, vocab = num_image_tokens(spec), spec["text"]["vocab_size"]
    special = {PAD_ID, EOS_ID, BOS_ID, spec["image_token_index"], newline_id(spec)}
    pool = np.array([i for i in range(vocab) if i not in special])
    side = spec["vision"]["image_size"]
    out = []
    for p, s in lengths:
        prefix = [spec["image_token_index"]] * n_img + [BOS_ID] + rng.choice(pool, p).tolist() + [newline_id(spec)]
        suffix = rng.choice(pool, s).tolist() + [EOS_ID]
        ids = np.array([prefix + suffix])
        types = np.array([[0] * len(prefix) + [1] * len(suffix)])
        out.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": types,
                    "labels": np.where(types == 1, ids, -100),
                    "pixel_values": rng.uniform(-1, 1, (1, 3, side, side)).astype(np.float32)})
    return out


def left_padded(examples: list[dict]) -> dict[str, np.ndarray]:
    """The examples as one left-padded batch: pad id 0, attention mask 0, type 0, label -100."""
    T = max(e["input_ids"].shape[1] for e in examples)
    fill = {"input_ids": PAD_ID, "attention_mask": 0, "token_type_ids": 0, "labels": -100}
    batch = {k: np.full((len(examples), T), v, np.int64) for k, v in fill.items()}
    for b, e in enumerate(examples):
        n = e["input_ids"].shape[1]
        for k in fill:
            batch[k][b, T - n:] = e[k][0]
    batch["pixel_values"] = np.concatenate([e["pixel_values"] for e in examples])
    return batch


def example_weights(examples: list[dict], reduction: str) -> list[float]:
    """The weight of each example's mean suffix loss in the batch loss: 1/B for "example", its
    share of the batch's predicted tokens for "token"."""
    counts = [int((e["labels"][0, 1:] != -100).sum()) for e in examples]
    return [1 / len(examples)] * len(examples) if reduction == "example" else [c / sum(counts) for c in counts]


def _stage_gradient_hooks(model, got: dict) -> list:
    """Hooks that put the gradient arriving at each stage output into `got`, by npvlm's names
    with "grad." in front."""
    def keep(name, tensor):
        tensor.register_hook(lambda g: got.__setitem__(f"grad.{name}", _to_numpy(g)[0]))
    return hook_stages(model, keep)


def _backward_one(model, example: dict, weight: float):
    """w * (HF's labels= loss of one example), backward; -> (its loss, its stage gradients)."""
    got: dict[str, np.ndarray] = {}
    handles = _stage_gradient_hooks(model, got)
    try:
        ids, mask, tti, pix = _tensors(example["input_ids"], example["attention_mask"],
                                       example["token_type_ids"], example["pixel_values"])
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=tti, pixel_values=pix.to(model.dtype),
                    position_ids=position_ids_from_mask(mask), labels=torch.as_tensor(example["labels"]),
                    use_cache=False)
        out.logits.register_hook(lambda g: got.__setitem__("grad.logits", _to_numpy(g)[0]))
        (weight * out.loss).backward()
    finally:
        for h in handles:
            h.remove()
    return float(out.loss.detach()), got


def training_reference(model, examples: list[dict], reduction: str):
    """Torch autograd reference for npvlm's training loss: every example run alone (no padding,
    so its positions are what npvlm derives from the attention mask; HF numbers a padded row's
    positions from the padding), loss = sum_b w_b * (HF's ``labels=`` loss of example b), then
    ``loss.backward()``. Returns (loss, {HF parameter name: grad}, [per example: {stage: the
    gradient arriving at that stage's output}] with npvlm's stage names prefixed "grad.")."""
    model.zero_grad(set_to_none=True)
    total, stage_grads = 0.0, []
    for example, w in zip(examples, example_weights(examples, reduction)):
        loss, got = _backward_one(model, example, w)
        total += w * loss
        stage_grads.append(got)
    grads = {name: p.grad.detach().to(torch.float64).numpy().copy()
             for name, p in model.named_parameters() if p.grad is not None}
    return total, grads, stage_grads


# ----------------------------------------------------------------------------- generation


def greedy_generate(model, input_ids, attention_mask, token_type_ids, pixel_values, max_new_tokens: int) -> np.ndarray:
    """``model.generate(do_sample=False)`` with eos disabled; int64 [B, max_new_tokens], new tokens only.

    HF builds the positions itself (``cumsum(mask) - 1``, pads 0, then ``+1`` in PaliGemma) and
    uses the KV cache, so this also checks prefill + cached decode.
    """
    tokens, _ = greedy_generate_with_logits(model, input_ids, attention_mask, token_type_ids, pixel_values, max_new_tokens)
    return tokens


def greedy_margins(model, input_ids, attention_mask, token_type_ids, pixel_values, max_new_tokens: int) -> np.ndarray:
    """Top-1 minus top-2 logit at every greedy step, float32 [B, max_new_tokens].

    Small margins mean an implementation that differs by rounding may pick another token.
    """
    _, logits = greedy_generate_with_logits(model, input_ids, attention_mask, token_type_ids, pixel_values, max_new_tokens)
    top2 = np.sort(logits, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def greedy_generate_with_logits(model, input_ids, attention_mask, token_type_ids, pixel_values, max_new_tokens: int):
    """Greedy ``generate`` without eos: (new tokens int64 [B,n], logits of each step float32 [B,n,V]).

    Step 0's logits are the prefill logits at the last prompt position.
    """
    import copy

    ids, mask, tti, pix = _tensors(input_ids, attention_mask, token_type_ids, pixel_values)
    gen_config = copy.deepcopy(model.generation_config)
    gen_config.do_sample = False
    gen_config.num_beams = 1
    gen_config.max_new_tokens = max_new_tokens
    gen_config.min_new_tokens = None
    gen_config.max_length = None
    gen_config.eos_token_id = None  # never stop early; min_new_tokens would alter the logits instead
    gen_config.pad_token_id = PAD_ID
    gen_config.return_dict_in_generate = True
    gen_config.output_logits = True
    # generate() fills every None field of the passed config from model.generation_config, so
    # eos_token_id=None alone does not disable eos: clear it on the model for the call.
    saved_eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        with torch.no_grad():
            seq = model.generate(
                input_ids=ids,
                attention_mask=mask,
                token_type_ids=tti,
                pixel_values=pix,
                generation_config=gen_config,
            )
    finally:
        model.generation_config.eos_token_id = saved_eos
    new = seq.sequences[:, ids.shape[1] :].cpu().numpy().astype(np.int64)
    assert new.shape == (ids.shape[0], max_new_tokens), f"generate returned {new.shape}"
    logits = torch.stack([step.to(torch.float32) for step in seq.logits], dim=1)
    return new, logits.cpu().numpy()


# ----------------------------------------------------------------------------- checkpoints

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}

# 5.x in-memory prefix -> hub ("legacy", transformers <= 4.51) prefix.
HUB_RENAMES = (
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
)
# 5.x in-memory prefix -> 4.52-4.57 in-memory prefix.
V452_RENAMES = (
    ("model.vision_tower.", "model.vision_tower.vision_model."),
    ("model.multi_modal_projector.", "model.multi_modal_projector."),
    ("model.language_model.", "model.language_model."),
    ("lm_head.", "lm_head."),
)
TIED_KEY, EMBED_KEY = "lm_head.weight", "model.language_model.embed_tokens.weight"


def _rename(name: str, table) -> str | None:
    for old, new in table:
        if name.startswith(old):
            return new + name[len(old) :]
    return None


def _state_dict_v5(model) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with its 5.x names; asserts the layout we rename from."""
    sd = model.state_dict()
    assert EMBED_KEY in sd and not any(".vision_model." in k for k in sd), "expected transformers 5.x names"
    return sd


def _renamed(sd: dict, table, drop: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in sd.items():
        if name in drop:
            continue
        new = _rename(name, table)
        assert new is not None, f"no rename rule for {name!r}"
        out[new] = tensor
    return out


def _prepared(tensors: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Independent contiguous copies (safetensors refuses shared storage, e.g. tied weights)."""
    return {k: v.detach().to(dtype).contiguous().clone() for k, v in tensors.items()}


def _write_config(model, out_dir: str, dtype: torch.dtype) -> None:
    """``config.json`` with a top-level ``"dtype"`` naming the stored weight dtype (as save_pretrained does)."""
    import copy

    os.makedirs(out_dir, exist_ok=True)
    config = copy.deepcopy(model.config)
    config.dtype = dtype
    config.to_json_file(os.path.join(out_dir, "config.json"))


def _save_file(tensors: dict, path: str) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": "pt"})
    os.chmod(path, 0o644)  # safetensors creates files as 0600


def save_hub_layout(model, out_dir: str, dtype: str = "bf16", n_shards: int = 2) -> dict:
    """Official hub layout: ``config.json``, ``model-0000k-of-0000N.safetensors``, index json.

    Keys: ``vision_tower.vision_model.*``, ``multi_modal_projector.*``, ``language_model.model.*``;
    no ``lm_head`` (tied). Returns the index dict.
    """
    sd = _state_dict_v5(model)
    assert torch.equal(sd[TIED_KEY], sd[EMBED_KEY])
    tensors = _prepared(_renamed(sd, HUB_RENAMES, drop=(TIED_KEY,)), DTYPES[dtype])
    shards = _split_contiguous(list(tensors), [t.numel() * t.element_size() for t in tensors.values()], n_shards)
    _write_config(model, out_dir, DTYPES[dtype])
    weight_map = {}
    for k, names in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{n_shards:05d}.safetensors"
        _save_file({n: tensors[n] for n in names}, os.path.join(out_dir, fname))
        weight_map.update({n: fname for n in names})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    return index


def _split_contiguous(names: list[str], sizes: list[int], n: int) -> list[list[str]]:
    """Split ``names`` (kept in order) into ``n`` contiguous groups of roughly equal bytes."""
    total, acc, groups = sum(sizes), 0, [[]]
    for name, size in zip(names, sizes):
        if groups[-1] and len(groups) < n and acc >= total * len(groups) / n:
            groups.append([])
        groups[-1].append(name)
        acc += size
    assert len(groups) == n, f"could not split {len(names)} tensors into {n} shards"
    return groups


def save_v5_layout(model, out_dir: str) -> None:
    """``config.json`` + single F32 ``model.safetensors`` with the 5.x in-memory names, minus tied lm_head."""
    sd = _state_dict_v5(model)
    assert sd[TIED_KEY].data_ptr() == sd[EMBED_KEY].data_ptr(), "lm_head is not the embedding tensor"
    tensors = _prepared({k: v for k, v in sd.items() if k != TIED_KEY}, torch.float32)
    _write_config(model, out_dir, torch.float32)
    _save_file(tensors, os.path.join(out_dir, "model.safetensors"))


def save_v452_layout(model, out_dir: str) -> None:
    """``config.json`` + single F32 ``model.safetensors`` with 4.52-4.57 names (``lm_head.weight`` kept)."""
    tensors = _prepared(_renamed(_state_dict_v5(model), V452_RENAMES), torch.float32)
    _write_config(model, out_dir, torch.float32)
    _save_file(tensors, os.path.join(out_dir, "model.safetensors"))


def save_with_save_pretrained(model, out_dir: str) -> None:
    """Plain ``model.save_pretrained(out_dir)`` (F32, single ``model.safetensors``, no lm_head).

    In transformers 5.24 the key names depend on how the model was made: a model built from a
    config (as :func:`build_tiny_model` does) is saved with a *mixed* scheme, ``vision_tower.*``
    (no ``vision_model.``), ``multi_modal_projector.*``, ``language_model.model.*``; a model
    loaded with ``from_pretrained`` is saved back in the scheme it was loaded from.
    """
    model.save_pretrained(out_dir)


# ----------------------------------------------------------------------------- misc


def versions() -> dict[str, str]:
    """Versions of the packages that produced the goldens."""
    import safetensors
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
    }
