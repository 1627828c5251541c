"""Checkpoint loading: safetensors files -> one strict, canonical parameter tree.

All checkpoint surgery happens here, once, through explicit tables:

1. `KEY_SCHEMES` rewrites the names of every transformers version (docs/spec.md §3) to the official hub
   names (`vision_tower.vision_model.*`, `multi_modal_projector.*`, `language_model.model.*`).
2. `SKIP_RULES` names every checkpoint key that is deliberately not used, with the reason.
3. `expected_shapes(cfg)` lists every tensor the config implies, with its shape; loading fails
   with one error listing every missing, unexpected or mis-shaped tensor (layer indices
   collapsed), before any tensor data is read.
4. Tensors are widened to fp32 (BF16 exactly) one at a time and kept in
   PyTorch's layout (Linear weights `[out, in]`; compute is `x @ w.T`, a free transposed view),
   so every array equals the checkpoint's tensor; only the patch-embedding kernel is reshaped.
   With weights="bf16" the multiplied matrices stay bfloat16 instead (`npvlm/loading/bf16.py`).

The result is a nested dict that mirrors the Hugging Face module tree:
`params["text"]["layers"][3]["self_attn"]["q_proj"]["weight"]` is `[Hq*E, D]`.
"""

import contextlib
import json
import re
import sys
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, InputError
from ..tree import unflatten
from .bf16 import BF16Matrix, bf16_to_f32, f32_to_bf16
from .safetensors_file import SafetensorsFile

VISION = "vision_tower.vision_model."
PROJECTOR = "multi_modal_projector."
TEXT = "language_model.model."
LM_HEAD = "language_model.lm_head.weight"

# (pattern, replacement, why): applied in order, the first that matches wins.
KEY_SCHEMES = [
    (r"^model\.vision_tower\.vision_model\.", VISION, "transformers 4.52-4.57 in-memory names"),
    (r"^model\.vision_tower\.", VISION, "transformers 5.x flattens SiglipVisionModel"),
    (r"^vision_tower\.(?!vision_model\.)", VISION,
     "transformers 5.x save_pretrained: legacy prefixes, but the vision tower stays flattened"),
    (r"^model\.multi_modal_projector\.", PROJECTOR, "transformers >= 4.52 nest it under model."),
    (r"^model\.language_model\.", TEXT, "transformers >= 4.52 use a bare GemmaModel"),
    (r"^lm_head\.weight$", LM_HEAD, "transformers >= 4.52 keep lm_head at the top"),
]

# (pattern on the canonical name, why it is not loaded)
SKIP_RULES = [
    (r"^vision_tower\.vision_model\.head\.",
     "SigLIP attention-pooling head: PaliGemma uses every patch token, never the pooled vector"),
    (r"\.rotary_emb\.inv_freq$", "RoPE frequencies are recomputed from rope_theta"),
]

def canonical_name(key):
    """The official hub name of a checkpoint key written by any transformers version."""
    for pattern, replacement, _ in KEY_SCHEMES:
        new, n = re.subn(pattern, replacement, key)
        if n:
            return new
    return key


# hub name prefix -> parameter tree path prefix: the tree drops the nesting that carries no
# meaning (`vision_tower.vision_model.embeddings`, `.encoder`, `multi_modal_projector.linear`)
TREE_PREFIXES = [
    (VISION + "embeddings.", "vision."),
    (VISION + "encoder.", "vision."),
    (VISION, "vision."),
    (PROJECTOR + "linear.", "projector."),
    (TEXT, "text."),
]


def tree_name(hub):
    """The dotted path in the parameter tree of a canonical (hub) tensor name:
    "language_model.model.layers.3.mlp.up_proj.weight" -> "text.layers.3.mlp.up_proj.weight"."""
    for prefix, path in TREE_PREFIXES:
        if hub.startswith(prefix):
            return path + hub[len(prefix):]
    raise KeyError(f"{hub!r} is not a PaliGemma parameter name")


def skip_reason(name):
    for pattern, why in SKIP_RULES:
        if re.search(pattern, name):
            return why
    return None


def expected_shapes(cfg):
    """Every tensor a checkpoint for `cfg` must hold: {canonical name: shape} (PyTorch layout)."""
    v, t = cfg.vision, cfg.text
    Dv, Fv, D, F, E = v.hidden_size, v.intermediate_size, t.hidden_size, t.intermediate_size, t.head_dim
    shapes = {
        VISION + "embeddings.patch_embedding.weight": (Dv, v.num_channels, v.patch_size, v.patch_size),
        VISION + "embeddings.patch_embedding.bias": (Dv,),
        VISION + "embeddings.position_embedding.weight": (v.num_patches, Dv),
        VISION + "post_layernorm.weight": (Dv,),
        VISION + "post_layernorm.bias": (Dv,),
        PROJECTOR + "linear.weight": (D, Dv),
        PROJECTOR + "linear.bias": (D,),
        TEXT + "embed_tokens.weight": (t.vocab_size, D),
        TEXT + "norm.weight": (D,),
    }
    for i in range(v.num_hidden_layers):
        layer = f"{VISION}encoder.layers.{i}."
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[layer + norm + ".weight"] = (Dv,)
            shapes[layer + norm + ".bias"] = (Dv,)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[layer + f"self_attn.{proj}.weight"] = (Dv, Dv)
            shapes[layer + f"self_attn.{proj}.bias"] = (Dv,)
        shapes[layer + "mlp.fc1.weight"] = (Fv, Dv)
        shapes[layer + "mlp.fc1.bias"] = (Fv,)
        shapes[layer + "mlp.fc2.weight"] = (Dv, Fv)
        shapes[layer + "mlp.fc2.bias"] = (Dv,)
    norms = ["input_layernorm", "post_attention_layernorm"]
    if t.model_type == "gemma2":
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for i in range(t.num_hidden_layers):
        layer = f"{TEXT}layers.{i}."
        for norm in norms:
            shapes[layer + norm + ".weight"] = (D,)
        shapes[layer + "self_attn.q_proj.weight"] = (t.num_attention_heads * E, D)
        shapes[layer + "self_attn.k_proj.weight"] = (t.num_key_value_heads * E, D)
        shapes[layer + "self_attn.v_proj.weight"] = (t.num_key_value_heads * E, D)
        shapes[layer + "self_attn.o_proj.weight"] = (D, t.num_attention_heads * E)
        shapes[layer + "mlp.gate_proj.weight"] = (F, D)
        shapes[layer + "mlp.up_proj.weight"] = (F, D)
        shapes[layer + "mlp.down_proj.weight"] = (D, F)
    return shapes


def collapse_layers(names):
    """Group names that differ only in layer index: `layers.{0..17}.mlp.up_proj.weight`."""
    groups = {}
    for name in names:
        indices = re.findall(r"\.layers\.(\d+)\.", name)
        pattern = re.sub(r"\.layers\.\d+\.", ".layers.{}.", name)
        groups.setdefault(pattern, []).append(int(indices[0]) if indices else None)
    out = []
    for pattern, idx in groups.items():
        if "{}" not in pattern:
            out.append(pattern)
            continue
        idx = sorted(set(idx))
        if len(idx) > 2 and idx == list(range(idx[0], idx[-1] + 1)):
            label = f"{{{idx[0]}..{idx[-1]}}}"
        elif len(idx) == 1:
            label = str(idx[0])
        else:
            label = "{" + ",".join(map(str, idx)) + "}"
        out.append(pattern.replace("{}", label, 1))
    return sorted(out)


def _listing(names, limit=10):
    """collapse_layers(names) joined for a message, at most `limit` entries, then a count."""
    items = collapse_layers(names)
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def checkpoint_files(model_dir):
    """The safetensors files of a model folder: `model.safetensors`, or the shards named by
    `model.safetensors.index.json` (its weight_map; the shard count is never assumed).
    Returns (files, weight_map or None)."""
    model_dir = Path(model_dir)
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if single.is_file():
        return [single], None
    if not index.is_file():
        others = sorted(f.name for f in model_dir.glob("*") if f.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = (f" (found {', '.join(others)}: pickle-based weights are not loaded, because loading "
                "them can run arbitrary code; convert them to safetensors)") if others else ""
        raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json"
                              f"{hint}")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise TypeError("weight_map must map tensor names to file names")
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if Path(shard).name != shard:
            raise CheckpointError(f"{index}: shard name {shard!r} is not a plain file name")
    missing = [s for s in shards if not (model_dir / s).is_file()]
    if missing:
        raise CheckpointError(f"{index}: shard file(s) missing from {model_dir}: {', '.join(missing)}; "
                              "the download is incomplete")
    return [model_dir / s for s in shards], weight_map


def _convert(name, array):
    """The one place where checkpoint layout becomes compute layout."""
    if name.endswith("patch_embedding.weight"):
        # Conv2d [Dv, C, P, P] -> Linear weight [Dv, C*P*P] (a view): patches flattened in
        # (C, P, P) order times its transpose are the stride-P convolution
        return array.reshape(array.shape[0], -1)
    return array


WEIGHT_MODES = ("fp32", "bf16")


def check_weights_mode(weights):
    if weights not in WEIGHT_MODES:
        raise InputError(f"weights must be one of {', '.join(WEIGHT_MODES)}, not {weights!r}")


def locate(files, weight_map):
    """Open every file and map each canonical name to (file, key). Returns (handles, located,
    problems): the index and the files must agree, and no tensor may appear twice."""
    handles, located, problems = [], {}, []
    try:
        for path in files:
            f = SafetensorsFile(path)
            handles.append(f)
            if weight_map is not None:
                stray = [k for k in f.keys() if weight_map.get(k) != path.name]
                if stray:
                    problems.append(f"{path.name} holds tensors the index does not assign to it: "
                                    + _listing(stray))
            for key in f.keys():
                name = canonical_name(key)
                if name in located:
                    problems.append(f"tensor {name} appears twice ({located[name][1]} and {key})")
                located[name] = (f, key)
    except BaseException:
        for f in handles:
            f.close()
        raise
    if weight_map is not None:
        present = {k for f in handles for k in f.keys()}
        absent = [k for k in weight_map if k not in present]
        if absent:
            problems.append("index names tensors that are in no shard: " + _listing(absent))
    return handles, located, problems


def mismatches(located, expected, cfg):
    """Every way the located tensors differ from what the config implies, as message parts."""
    shape = {n: f.shape(key) for n, (f, key) in located.items()}
    missing = [n for n in expected if n not in located]
    unexpected = [n for n in located if n not in expected and n != LM_HEAD and skip_reason(n) is None]
    mis_shaped = [f"{n} is {list(shape[n])}, expected {list(s)}"
                  for n, s in expected.items() if n in shape and shape[n] != s]
    embedding = expected[TEXT + "embed_tokens.weight"]
    if LM_HEAD in shape and shape[LM_HEAD] != embedding:
        mis_shaped.append(f"{LM_HEAD} is {list(shape[LM_HEAD])}, expected the embedding's {list(embedding)}")
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): " + _listing(missing))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) (not PaliGemma "
                        f"{cfg.text.model_type}, or a config that does not match the weights): "
                        + _listing(unexpected))
    if mis_shaped:
        more = f"; ... ({len(mis_shaped) - 10} more)" if len(mis_shaped) > 10 else ""
        problems.append("shape differs from config.json: " + "; ".join(mis_shaped[:10]) + more)
    return problems


def _kept_in_bf16(name, shape):
    """weights="bf16": the matrices that are multiplied (not the added position embedding, not
    the 1-D norms and biases) stay bfloat16."""
    return len(shape) >= 2 and not name.endswith("position_embedding.weight")


def read_tensor(f, key, name, shape, weights):
    """One tensor in compute form: fp32, or for weights="bf16" a BF16Matrix of a multiplied
    matrix (stored bits for BF16, rounded to nearest even for F32/F16)."""
    if weights == "bf16" and _kept_in_bf16(name, shape):
        bits = f.read_bits(key) if f.dtype(key) == "BF16" else f32_to_bf16(f.read(key))
        return BF16Matrix(_convert(name, bits))
    return _convert(name, f.read(key))


PROGRESS_BYTES = 1 << 28      # 256 MB: a smaller checkpoint loads in well under a second


def progress_bar(total):
    """A tqdm bar on stderr for reading `total` bytes, shown only when the load takes more than a
    few seconds; None (and no tqdm import) for a small checkpoint such as the demo's."""
    if total < PROGRESS_BYTES:
        return contextlib.nullcontext(None)
    from tqdm import tqdm  # noqa: PLC0415 (only large loads show a bar: the import costs ~35 ms)
    return tqdm(total=total, desc="loading weights", unit="B", unit_scale=True, delay=3, file=sys.stderr,
                leave=False)


def load_params(model_dir, cfg, weights="fp32"):
    """Read, check and convert every weight of a model folder. Returns the NumPy tree
    `{"vision": ..., "projector": ..., "text": ...}` (see module docstring): fp32 arrays, or with
    weights="bf16" the multiplied matrices as `bf16.BF16Matrix` (half the memory)."""
    check_weights_mode(weights)
    expected = expected_shapes(cfg)
    handles, located, problems = locate(*checkpoint_files(model_dir))
    try:
        problems += mismatches(located, expected, cfg)
        if problems:
            raise CheckpointError(f"{model_dir}: checkpoint does not match config.json: "
                                  + " | ".join(problems))
        flat = {}
        with progress_bar(sum(f.nbytes(key) for f, key in (located[n] for n in expected))) as bar:
            for name, shape in expected.items():
                f, key = located[name]
                flat[name] = read_tensor(f, key, name, shape, weights)
                if bar is not None:
                    bar.update(f.nbytes(key))
        if LM_HEAD in located:
            _check_tied(located[LM_HEAD], flat[TEXT + "embed_tokens.weight"])
    finally:
        for f in handles:
            f.close()
    return unflatten({tree_name(name): array for name, array in flat.items()})


def _check_tied(lm_head_entry, embedding):
    """PaliGemma ties lm_head to embed_tokens; a stored copy must equal it (checked on a sample
    of rows, so a multi-GB head is not read twice)."""
    f, key = lm_head_entry
    head = f.read(key)
    rows = np.linspace(0, embedding.shape[0] - 1, num=min(64, embedding.shape[0])).astype(int)
    head_rows = head[rows]
    if isinstance(embedding, BF16Matrix):     # weights="bf16": the embedding was rounded to bf16
        head_rows = bf16_to_f32(f32_to_bf16(head_rows))
    if not np.array_equal(head_rows, embedding[rows]):
        raise CheckpointError(f"{f.path}: '{key}' differs from the token embedding; PaliGemma ties "
                              "the output head to the embedding, so this is not a PaliGemma checkpoint")
