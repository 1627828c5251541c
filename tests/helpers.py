"""Helpers the tests share (conftest.py holds only fixtures and hooks): the live tests' tiny
configs, the one-line-error check, golden sets, safetensors files written with the `safetensors`
package, a random-weight model folder made without torch, and demo-world fine-tuning data."""

import configparser
import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import sentencepiece as spm
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import save_file

from npvlm.config import config_from_dict
from npvlm.demo.scenes import make_scene, tasks
from npvlm.loading.weights import canonical_name, expected_shapes, tree_name
from npvlm.model.record import stage_names

ROOT = Path(__file__).resolve().parent.parent
GOLDENS = ROOT / "tests" / "goldens"
GOLDEN_FORMAT_VERSION = 1
# the gradient goldens are keyed by npvlm's tree paths; 2: "vision.position_embedding.weight"
# (the position table became a module, as in HF, instead of a bare array)
GRAD_FORMAT_VERSION = 2
EXPLAIN_FORMAT_VERSION = 1
REGENERATE = "python tests/make_goldens.py  (needs: pip install -e '.[reference]')"
REGENERATE_GRADS = "python tests/make_grad_goldens.py  (needs: pip install -e '.[reference]')"
REGENERATE_EXPLAIN = "python tests/make_explain_goldens.py  (needs: pip install -e '.[reference]')"
GOLDEN_MODELS = ("pg1_mqa_hub", "pg1_gqa_v5", "pg2_gqa_hub", "pg2_gqa_v5")
FIXTURE_TOKENIZER = ROOT / "tests" / "fixtures" / "tokenizer" / "tokenizer.model"
BACKENDS = ["numpy", pytest.param("cupy", marks=pytest.mark.gpu)]   # parametrize ids for `backend`


# Tiny configs for the live tests (tests/hf_reference.py builds them with transformers), kept
# here so that test modules import them without torch. Shapes that differ from the committed goldens: MHA (kv heads = heads), an odd vision width,
# a 3x3 patch grid, a head_dim different from hidden/heads, more layers.
LIVE_SPECS = {
    "mha_42px": {
        "vision": {"image_size": 42, "patch_size": 14, "hidden_size": 24, "intermediate_size": 40,
                   "num_hidden_layers": 2, "num_attention_heads": 3},
        "text": {"model_type": "gemma", "hidden_size": 48, "intermediate_size": 80,
                 "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
                 "head_dim": 8, "vocab_size": 200, "max_position_embeddings": 96},
        "image_token_index": 199, "newline_id": 108,
    },
    "gqa_4to2_28px": {
        "vision": {"image_size": 28, "patch_size": 14, "hidden_size": 32, "intermediate_size": 64,
                   "num_hidden_layers": 3, "num_attention_heads": 2},
        "text": {"model_type": "gemma", "hidden_size": 32, "intermediate_size": 64,
                 "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "head_dim": 12, "vocab_size": 256, "max_position_embeddings": 96},
        "image_token_index": 255, "newline_id": 108,
    },
    # PaliGemma 2: Gemma 2 decoder, GQA 6->3, sliding window 5 < prompt, caps that bite
    "gemma2_gqa_42px": {
        "vision": {"image_size": 42, "patch_size": 14, "hidden_size": 24, "intermediate_size": 40,
                   "num_hidden_layers": 2, "num_attention_heads": 3},
        "text": {"model_type": "gemma2", "hidden_size": 48, "intermediate_size": 80,
                 "num_hidden_layers": 3, "num_attention_heads": 6, "num_key_value_heads": 3,
                 "head_dim": 8, "query_pre_attn_scalar": 10, "attn_logit_softcapping": 4.0,
                 "final_logit_softcapping": 2.5, "sliding_window": 5, "vocab_size": 200,
                 "max_position_embeddings": 96},
        "image_token_index": 199, "newline_id": 108, "n_suffix": 3,
        "init": {"final_norm_gain": 3.0},
    },
}


def one_line_error(exc_type, call, *fragments):
    """`call()` must raise `exc_type` with a one-line message holding every fragment."""
    with pytest.raises(exc_type) as info:
        call()
    msg = str(info.value)
    assert "\n" not in msg and all(f in msg for f in fragments), msg
    return msg


# ---- safetensors files (the official package; BF16 through ml_dtypes) ------------------------

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": ml_dtypes.bfloat16}


def save_safetensors(path, tensors, dtype=None, metadata=None):
    """Write {name: array} with `safetensors.numpy.save_file`; dtype "F32"/"F16"/"BF16" converts
    every float tensor (BF16 rounds to nearest even), None keeps each array's dtype."""
    out = {name: np.ascontiguousarray(np.asarray(a).astype(_DTYPES[dtype]) if dtype else a)
           for name, a in tensors.items()}
    save_file(out, str(path), metadata=metadata)


def read_safetensors(path):
    """{name: float32 array} of every tensor of a file."""
    with safe_open(str(path), framework="np") as f:
        return {k: f.get_tensor(k).astype(np.float32) for k in f.keys()}


# ---- golden sets (made by HF transformers: tests/make_goldens.py) --------------------------------

def pinned_transformers():
    """The transformers version that setup.cfg's [reference] extra pins."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    for line in cfg["options.extras_require"]["reference"].split():
        if line.startswith("transformers=="):
            return line.split("==")[1]
    raise AssertionError("setup.cfg: no transformers pin in the reference extra")


def golden_meta(file="meta.json", regenerate=REGENERATE, version=GOLDEN_FORMAT_VERSION):
    """A golden set's meta file, refused when missing or stale (another format version, or made
    with another transformers than setup.cfg pins). grad_meta.json: the gradient goldens'."""
    path = GOLDENS / file
    if not path.is_file():
        pytest.fail(f"golden files missing ({path}); regenerate with: {regenerate}")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != version:
        pytest.fail(f"golden files are stale (format {meta.get('format_version')}, tests expect "
                    f"{version}); regenerate with: {regenerate}")
    made_with = meta.get("versions", {}).get("transformers")
    if made_with != pinned_transformers():
        pytest.fail(f"golden files are stale (made with transformers {made_with}, setup.cfg pins "
                    f"{pinned_transformers()}); regenerate with: {regenerate}")
    return meta


class Golden:
    """One golden set: the checkpoint folder and the HF tensors."""

    def __init__(self, name):
        self.name = name
        self.dir = GOLDENS / name
        self.model_dir = self.dir / "model"
        npz = self.dir / "goldens.npz"
        if not npz.is_file() or not self.model_dir.is_dir():
            pytest.fail(f"golden set {name} missing; regenerate with: {REGENERATE}")
        with np.load(npz) as data:
            self.arrays = {k: data[k] for k in data.files}

    def __getitem__(self, key):
        return self.arrays[key]

    def stage_names(self):
        n_vision = sum(k.startswith("vision.layer.") for k in self.arrays)
        n_text = sum(k.startswith("text.layer.") for k in self.arrays)
        return stage_names(n_vision, n_text)

    def batch(self):
        """The golden inputs as a batch dict (npvlm.model.paligemma)."""
        return {k: self.arrays[k] for k in ("input_ids", "attention_mask", "token_type_ids", "pixel_values")}


def tree_path(hf_name):
    """The npvlm parameter-tree path of a transformers parameter name, of any transformers
    version ("model.vision_tower.embeddings.position_embedding.weight" ->
    "vision.position_embedding.weight"): the one mapping the gradient tests and recipes use."""
    return tree_name(canonical_name(hf_name))


class GradGolden:
    """One gradient golden set (tests/make_grad_goldens.py): the padded batch, losses, every
    parameter's gradient, the stage gradients and the fp32-vs-fp64 noise floors."""

    def __init__(self, name):
        golden_meta("grad_meta.json", REGENERATE_GRADS, GRAD_FORMAT_VERSION)
        path = GOLDENS / name / "grads.npz"
        if not path.is_file():
            pytest.fail(f"{path} missing; regenerate with: {REGENERATE_GRADS}")
        with np.load(path) as data:
            self.arrays = {k: data[k] for k in data.files}
        self.name = name
        self.batch = {k[len("batch."):]: v for k, v in self.arrays.items() if k.startswith("batch.")}
        self.grads = {k[len("grad."):]: v for k, v in self.arrays.items() if k.startswith("grad.")}
        self.stages = {k[len("stage."):]: v for k, v in self.arrays.items() if k.startswith("stage.")}

    def noise(self, key):
        return float(self.arrays.get(f"noise.{key}", 0.0))


# ---- a random-weight model folder, NumPy only (not a golden: nothing here claims an output) -----

def tiny_config(image_token_index, vocab_size, image_size=28, max_positions=64):
    return {
        "model_type": "paligemma", "architectures": ["PaliGemmaForConditionalGeneration"],
        "image_token_index": image_token_index, "pad_token_id": 0, "eos_token_id": 1,
        "bos_token_id": 2, "projection_dim": 32,
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 16,
                          "intermediate_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2,
                          "image_size": image_size, "patch_size": 14, "projection_dim": 32},
        "text_config": {"model_type": "gemma", "hidden_size": 32, "intermediate_size": 48,
                        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                        "head_dim": 16, "vocab_size": vocab_size,
                        "max_position_embeddings": max_positions},
    }


def write_random_model(folder, seed=0, image_size=28, max_positions=64, tokenizer=FIXTURE_TOKENIZER):
    """Write config.json, model.safetensors (hub names, F32) and tokenizer.model into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pieces = spm.SentencePieceProcessor(model_file=str(tokenizer)).get_piece_size()
    vocab = (pieces + 2 + 63) // 64 * 64           # HF: <image> + 1, padded to a multiple of 64
    d = tiny_config(pieces, vocab, image_size, max_positions)
    cfg = config_from_dict(d)
    rng = np.random.default_rng(seed)
    tensors = {name: (rng.normal(size=shape) * 0.3).astype(np.float32)
               for name, shape in expected_shapes(cfg).items()}
    (folder / "config.json").write_text(json.dumps(d, indent=2))
    save_safetensors(folder / "model.safetensors", tensors)
    shutil.copy(tokenizer, folder / "tokenizer.model")
    return folder


# ---- fine-tuning data -------------------------------------------------------------------------

def make_data(folder, n=4, seed=0):
    """n demo-world examples (image files + train.jsonl) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        scene = make_scene(np.random.default_rng([seed, i]))
        Image.fromarray(scene.image).save(folder / f"s{i}.png")
        prompt, answer = tasks(scene)[i % 2]
        lines.append(json.dumps({"image": f"s{i}.png", "prefix": prompt, "suffix": answer}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"
