"""The checkpoint loader: every key scheme, dtypes, sharding, strictness, memory."""

import json
import shutil
import tracemalloc

import numpy as np
import pytest

import npvlm
from npvlm.errors import CheckpointError
from npvlm.loading.safetensors_file import SafetensorsFile
from npvlm.loading.weights import canonical_name, collapse_layers
from npvlm.tree import flatten

from helpers import GOLDENS, golden_meta, read_safetensors, save_safetensors

_read_all = read_safetensors


@pytest.fixture
def f32_folder(tmp_path):
    """A writable copy of the F32 single-file golden checkpoint (5.x key names)."""
    golden_meta()
    src = GOLDENS / "pg1_gqa_v5" / "model"
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def _rewrite(folder, change):
    tensors = _read_all(folder / "model.safetensors")
    change(tensors)
    save_safetensors(folder / "model.safetensors", tensors)




@pytest.mark.parametrize("key, canonical", [
    ("vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight",
     "vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight"),                  # hub
    ("model.vision_tower.vision_model.post_layernorm.bias",
     "vision_tower.vision_model.post_layernorm.bias"),                              # 4.52-4.57
    ("model.vision_tower.embeddings.patch_embedding.weight",
     "vision_tower.vision_model.embeddings.patch_embedding.weight"),                # 5.x
    ("vision_tower.encoder.layers.0.layer_norm1.weight",
     "vision_tower.vision_model.encoder.layers.0.layer_norm1.weight"),              # 5.x save_pretrained
    ("model.language_model.layers.0.self_attn.q_proj.weight",
     "language_model.model.layers.0.self_attn.q_proj.weight"),
    ("model.multi_modal_projector.linear.bias", "multi_modal_projector.linear.bias"),
    ("lm_head.weight", "language_model.lm_head.weight"),
])
def test_key_schemes_map_to_hub_names(key, canonical):
    assert canonical_name(key) == canonical


def test_collapse_layers():
    names = [f"a.layers.{i}.w" for i in range(18)] + ["a.layers.3.v", "a.layers.5.v", "b"]
    assert collapse_layers(names) == ["a.layers.{0..17}.w", "a.layers.{3,5}.v", "b"]


def test_bf16_sharded_hub_checkpoint_widens_exactly():
    """The hub-layout golden is BF16 in 2 shards: every loaded value is the exact fp32 widening."""
    golden_meta()
    folder = GOLDENS / "pg1_mqa_hub" / "model"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    model = npvlm.load(folder)
    emb = model.params["text"]["embed_tokens"]["weight"]
    shard = folder / index["weight_map"]["language_model.model.embed_tokens.weight"]
    with SafetensorsFile(shard) as f:
        assert f.dtype("language_model.model.embed_tokens.weight") == "BF16"
        raw = f.read_bits("language_model.model.embed_tokens.weight")
    np.testing.assert_array_equal(emb.view(np.uint32), raw.astype(np.uint32) << 16)


def test_f16_checkpoint_loads(f32_folder):
    ref = npvlm.load(f32_folder)
    tensors = _read_all(f32_folder / "model.safetensors")
    save_safetensors(f32_folder / "model.safetensors", {k: v.astype(np.float16) for k, v in tensors.items()})
    half = npvlm.load(f32_folder)
    for (name, a), (_, b) in zip(flatten(ref.params).items(), flatten(half.params).items()):
        np.testing.assert_array_equal(b, a.astype(np.float16).astype(np.float32), err_msg=name)


def test_missing_key_is_named(f32_folder):
    _rewrite(f32_folder, lambda t: t.pop("model.language_model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor.*language_model\.model\.layers\.1\.mlp\.up_proj\.weight"):
        npvlm.load(f32_folder)


def test_missing_key_in_every_layer_is_collapsed(f32_folder):
    def drop(t):
        for i in range(3):
            t.pop(f"model.language_model.layers.{i}.self_attn.k_proj.weight")
    _rewrite(f32_folder, drop)
    with pytest.raises(CheckpointError, match=r"layers\.\{0\.\.2\}\.self_attn\.k_proj\.weight"):
        npvlm.load(f32_folder)


def test_wrong_shape_is_named(f32_folder):
    key = "model.multi_modal_projector.linear.weight"
    _rewrite(f32_folder, lambda t: t.__setitem__(key, np.zeros((64, 7), np.float32)))
    with pytest.raises(CheckpointError, match=r"multi_modal_projector\.linear\.weight is \[64, 7\], expected \[64, 48\]"):
        npvlm.load(f32_folder)


def test_unexpected_key_is_named(f32_folder):
    _rewrite(f32_folder, lambda t: t.__setitem__("model.language_model.layers.0.extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(CheckpointError, match=r"1 unexpected tensor.*layers\.0\.extra\.weight"):
        npvlm.load(f32_folder)


def test_all_problems_in_one_error(f32_folder):
    def break_it(t):
        t.pop("model.language_model.norm.weight")
        t["surprise"] = np.zeros(1, np.float32)
        t["model.vision_tower.post_layernorm.bias"] = np.zeros(5, np.float32)
    _rewrite(f32_folder, break_it)
    with pytest.raises(CheckpointError) as e:
        npvlm.load(f32_folder)
    msg = str(e.value)
    assert "norm.weight" in msg and "surprise" in msg and "post_layernorm.bias is [5]" in msg
    assert "\n" not in msg


def test_siglip_head_is_skipped_by_a_named_rule(f32_folder):
    ref = npvlm.load(f32_folder)
    _rewrite(f32_folder, lambda t: t.update({
        "model.vision_tower.head.probe": np.zeros((1, 1, 48), np.float32),
        "model.vision_tower.head.mlp.fc1.weight": np.zeros((8, 48), np.float32)}))
    model = npvlm.load(f32_folder)
    assert "head" not in model.params["vision"]
    np.testing.assert_array_equal(model.params["projector"]["weight"], ref.params["projector"]["weight"])


def test_lm_head_must_equal_the_embedding(f32_folder):
    emb_key = "model.language_model.embed_tokens.weight"
    _rewrite(f32_folder, lambda t: t.__setitem__("lm_head.weight", t[emb_key].copy()))
    npvlm.load(f32_folder)                      # tied copy: accepted
    _rewrite(f32_folder, lambda t: t.__setitem__("lm_head.weight", t[emb_key] + 1))
    with pytest.raises(CheckpointError, match="ties the output head"):
        npvlm.load(f32_folder)


def test_sharded_index_problems(tmp_path):
    golden_meta()
    folder = tmp_path / "model"
    shutil.copytree(GOLDENS / "pg1_mqa_hub" / "model", folder)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]

    index["weight_map"]["language_model.model.ghost.weight"] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="index names tensors that are in no shard: language_model.model.ghost.weight"):
        npvlm.load(folder)

    del index["weight_map"]["language_model.model.ghost.weight"]
    index_path.write_text(json.dumps(index))
    (folder / shard).unlink()
    with pytest.raises(CheckpointError, match=f"shard file.*missing.*{shard}"):
        npvlm.load(folder)


def test_no_weights_at_all(tmp_path):
    shutil.copy(GOLDENS / "pg1_gqa_v5" / "model" / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pickle-based weights are not loaded"):
        npvlm.load(tmp_path)


def test_bf16_load_holds_fp32_weights_plus_one_tensor():
    """Peak traced memory while loading = the fp32 result + at most ~one tensor in flight
    (no whole-file copies). numpy reports its allocations to tracemalloc."""
    golden_meta()
    folder = GOLDENS / "pg1_mqa_hub" / "model"
    tracemalloc.start()
    model = npvlm.load(folder)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    sizes = [a.nbytes for a in flatten(model.params).values()]
    total, largest = sum(sizes), max(sizes)
    print(f"\nfp32 weights {total} B, largest tensor {largest} B, peak {peak} B")
    assert peak <= total + 2 * largest + 256 * 1024
