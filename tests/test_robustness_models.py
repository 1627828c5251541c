"""Robustness, model folders: every broken, mismatched or foreign model folder is refused with
one line, and nothing in a folder is ever executed (no pickle, no remote code), through the API
and through run.py (the machinery: tests/robustness.py)."""

import json
import pickle
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from npvlm.errors import CheckpointError, ConfigError

from helpers import read_safetensors, save_safetensors
from robustness import CODE, MARKER, MODEL, Case, Inputs, check_api, check_cli, skip_reason


def copy_model(tmp, base, name="model"):
    return Path(shutil.copytree(base.model, tmp / name))


def edit_config(folder, change):
    path = folder / "config.json"
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


def edit_header(path, change):
    """Rewrite a safetensors header with change(header_dict); the data bytes stay as they were."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def last_tensor(header):
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def shard_model(folder):
    """model.safetensors -> two shards + model.safetensors.index.json (the hub layout)."""
    tensors = read_safetensors(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = list(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_safetensors(folder / shard, {k: tensors[k] for k in keys})
        weight_map.update(dict.fromkeys(keys, shard))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return index, sorted(shards)


class _RunsCode:
    """Unpickling this calls open(marker, "w"): a stand-in for code in a malicious pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_pickle(tmp):
    return pickle.dumps(_RunsCode(tmp / MARKER))


def marker_absent(inp, tmp):
    assert not (tmp / MARKER).exists(), "something in the model folder was executed"


def model_case(change):
    """A builder: copy the base model, then change(folder, tmp) it."""
    def build(tmp, base):
        folder = copy_model(tmp, base)
        change(folder, tmp)
        return Inputs(folder, base.image)
    return build


def _missing_folder(tmp, base):
    return Inputs(tmp / "no-such-model", base.image)


def _file_not_folder(tmp, base):
    path = tmp / "model.safetensors"
    shutil.copy(base.model / "model.safetensors", path)
    return Inputs(path, base.image)


def _unlink(name):
    return lambda folder, tmp: (folder / name).unlink()


def _write(name, data):
    def change(folder, tmp):
        (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return change


def _llama_config(folder, tmp):
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32,
        "num_hidden_layers": 2, "vocab_size": 1856}))


def _missing_shard(folder, tmp):
    _, shards = shard_model(folder)
    (folder / shards[1]).unlink()


def _index_ghost_key(folder, tmp):
    index, shards = shard_model(folder)
    index["weight_map"]["language_model.model.layers.0.ghost.weight"] = shards[0]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _truncate(keep):
    def change(folder, tmp):
        path = folder / "model.safetensors"
        data = path.read_bytes()
        path.write_bytes(data[: keep if keep >= 1 else int(len(data) * keep)])
    return change


def _header_length(value):
    def change(folder, tmp):
        path = folder / "model.safetensors"
        data = bytearray(path.read_bytes())
        data[:8] = struct.pack("<Q", value(len(data)))
        path.write_bytes(bytes(data))
    return change


def _header_not_json(folder, tmp):
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    garbage = (b'{"vision_tower.vision_model.post_layernorm.weight": {"dtype": "F32", "shape": [16' +
               b" " * n)[:n]            # cut off mid-object: same length, no longer JSON
    path.write_bytes(raw[:8] + garbage + raw[8 + n:])


def _offsets_past_end(folder, tmp):
    def change(h):
        name = last_tensor(h)
        begin, end = h[name]["data_offsets"]
        h[name]["shape"] = [h[name]["shape"][0] * 2] + h[name]["shape"][1:]
        h[name]["data_offsets"] = [begin, begin + 2 * (end - begin)]
    edit_header(folder / "model.safetensors", change)


def _overlapping(folder, tmp):
    def change(h):
        p = "vision_tower.vision_model.encoder.layers.0.layer_norm1."
        h[p + "bias"]["data_offsets"] = list(h[p + "weight"]["data_offsets"])
    edit_header(folder / "model.safetensors", change)


def _dtype(dtype):
    """The projector bias stored (validly) as an integer or 8-bit float tensor."""
    def change(folder, tmp):
        import ml_dtypes
        tensors = read_safetensors(folder / "model.safetensors")
        kind = {"I64": np.int64, "F8_E4M3": ml_dtypes.float8_e4m3fn}[dtype]
        tensors["multi_modal_projector.linear.bias"] = tensors["multi_modal_projector.linear.bias"].astype(kind)
        save_safetensors(folder / "model.safetensors", tensors)
    return change


def _shape_vs_config(folder, tmp):
    edit_config(folder, lambda d: d["vision_config"].update(intermediate_size=20))


def _wider_config(folder, tmp):
    def change(d):
        d["text_config"]["hidden_size"] = d["projection_dim"] = d["vision_config"]["projection_dim"] = 64
    edit_config(folder, change)


def _llama_keys(folder, tmp):
    rng = np.random.default_rng(1)
    t = {"model.embed_tokens.weight": (1856, 32), "model.norm.weight": (32,), "lm_head.weight": (1856, 32)}
    for i in range(2):
        p = f"model.layers.{i}."
        t.update({p + "self_attn.q_proj.weight": (32, 32), p + "self_attn.k_proj.weight": (16, 32),
                  p + "self_attn.v_proj.weight": (16, 32), p + "self_attn.o_proj.weight": (32, 32),
                  p + "mlp.gate_proj.weight": (48, 32), p + "mlp.up_proj.weight": (48, 32),
                  p + "mlp.down_proj.weight": (32, 48), p + "input_layernorm.weight": (32,),
                  p + "post_attention_layernorm.weight": (32,)})
    save_safetensors(folder / "model.safetensors",
                     {k: rng.normal(size=s).astype(np.float32) for k, s in t.items()})


def _pickle_only(tmp, base):
    folder = tmp / "torch-model"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(evil_pickle(tmp))
    return Inputs(folder, base.image, check=marker_absent)


def _pickle_weights(tmp, base):
    folder = copy_model(tmp, base)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(evil_pickle(tmp))
    return Inputs(folder, base.image, check=marker_absent)


def _pickle_as_safetensors(tmp, base):
    folder = copy_model(tmp, base)
    (folder / "model.safetensors").write_bytes(evil_pickle(tmp))
    return Inputs(folder, base.image, check=marker_absent)


def _pickle_as_tokenizer(tmp, base):
    folder = copy_model(tmp, base)
    (folder / "tokenizer.model").write_bytes(evil_pickle(tmp))
    return Inputs(folder, base.image, check=marker_absent)


def _pickle_beside_safetensors(tmp, base):
    folder = copy_model(tmp, base)
    for name in ("pytorch_model.bin", "model.pt", "training_args.bin"):
        (folder / name).write_bytes(evil_pickle(tmp))
    return Inputs(folder, base.image, check=marker_absent)


def _remote_code(tmp, base):
    """HF trust_remote_code layout: auto_map naming Python files in the folder. Ignored."""
    folder = copy_model(tmp, base)
    code = f"open({str(tmp / MARKER)!r}, 'w').close()\n"
    for name in ("modeling_evil.py", "configuration_evil.py", "tokenization_evil.py", "__init__.py"):
        (folder / name).write_text(code)
    edit_config(folder, lambda d: d.update(
        trust_remote_code=True,
        auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                  "AutoModelForVision2Seq": "modeling_evil.EvilModel"}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"trust_remote_code": True, "auto_map": {"AutoTokenizer": ["tokenization_evil.Tok", None]}}))

    def check(inp, tmp):
        marker_absent(inp, tmp)
        assert not any("evil" in m for m in sys.modules)
    return Inputs(folder, base.image, check=check)


def _vae_raw_pickle(tmp, base):
    path = tmp / "vae-oid.npz"
    path.write_bytes(evil_pickle(tmp))
    return Inputs(base.model, base.image, vae=path, check=marker_absent)


def _vae_object_array(tmp, base):
    path = tmp / "vae-oid.npz"
    np.savez(path, **{"_vq_vae._embedding": np.array([_RunsCode(tmp / MARKER)], dtype=object)})
    return Inputs(base.model, base.image, vae=path, check=marker_absent)


CASES = [
    # -- model folder
    Case("model-missing", MODEL, "model folder does not exist", _missing_folder,
         (ConfigError, "model folder not found"), (1, "model folder not found"),
         "check the --model path"),
    Case("model-is-a-file", MODEL, "--model names a file (model.safetensors) instead of its folder",
         _file_not_folder, (ConfigError, "not a folder; pass the folder"), (1, "not a folder"),
         "pass the folder that holds config.json"),
    Case("no-config", MODEL, "no config.json", model_case(_unlink("config.json")),
         (ConfigError, "config.json: file not found"), (1, "config.json: file not found"),
         "download config.json from the model repository"),
    Case("config-invalid-json", MODEL, "config.json is not valid JSON",
         model_case(_write("config.json", '{"model_type": "paligemma",')),
         (ConfigError, "not valid JSON"), (1, "not valid JSON"), "download config.json again"),
    Case("config-not-paligemma", MODEL, "config.json of another model (Llama)",
         model_case(_llama_config), (ConfigError, "'model_type' is 'llama', not 'paligemma'"),
         (1, "not 'paligemma'"), "use a PaliGemma model folder"),
    Case("no-tokenizer", MODEL, "no tokenizer.model", model_case(_unlink("tokenizer.model")),
         (CheckpointError, "tokenizer.model: file not found"), (1, "tokenizer.model: file not found"),
         "download tokenizer.model from the model repository"),
    Case("shard-missing", MODEL, "a shard named in model.safetensors.index.json is missing",
         model_case(_missing_shard), (CheckpointError, "shard file(s) missing"),
         (1, "model-00002-of-00002.safetensors; the download is incomplete"),
         "download the missing shard"),
    Case("index-ghost-key", MODEL, "the index names a tensor that is in no shard",
         model_case(_index_ghost_key),
         (CheckpointError, "index names tensors that are in no shard: "
                           "language_model.model.layers.0.ghost.weight"),
         (1, "in no shard"), "download the index and the shards again (they are from different "
                             "revisions)"),
    Case("safetensors-truncated", MODEL, "model.safetensors cut short (an interrupted download)",
         model_case(_truncate(0.6)), (CheckpointError, "past the end of the file"),
         (1, "the file may be truncated"), "download the file again"),
    Case("safetensors-shorter-than-8-bytes", MODEL, "model.safetensors shorter than 8 bytes",
         model_case(_truncate(5)), (CheckpointError, "shorter than the 8-byte header length"),
         (1, "shorter than the 8-byte header length"), "download the file again"),
    Case("header-length-past-end", MODEL, "header length field larger than the file",
         model_case(_header_length(lambda size: size * 2)),
         (CheckpointError, "runs past the end of the file"), (1, "runs past the end of the file"),
         "download the file again"),
    Case("header-length-absurd", MODEL, "header length field over the 100 MB limit",
         model_case(_header_length(lambda size: 2**62)),
         (CheckpointError, "larger than the 100000000-byte limit"),
         (1, "larger than the 100000000-byte limit"), "download the file again"),
    Case("header-invalid-json", MODEL, "header is not valid JSON", model_case(_header_not_json),
         (CheckpointError, "header is not valid JSON"), (1, "header is not valid JSON"),
         "download the file again"),
    Case("offsets-past-end", MODEL, "a tensor's data_offsets run past the end of the data",
         model_case(_offsets_past_end), (CheckpointError, "past the end of the file"),
         (1, "run past the end of the file"), "download the file again"),
    Case("offsets-overlap", MODEL, "two tensors' data_offsets overlap", model_case(_overlapping),
         (CheckpointError, "data_offsets overlap another tensor"), (1, "overlap another tensor"),
         "the file is corrupt: download it again"),
    Case("dtype-i64", MODEL, "a tensor stored as I64", model_case(_dtype("I64")),
         (CheckpointError, "has unsupported dtype 'I64'; npvlm reads float weights only"),
         (1, "unsupported dtype 'I64'"), "use the float (F32/F16/BF16) checkpoint"),
    Case("dtype-f8", MODEL, "a tensor stored as F8_E4M3 (a quantized checkpoint)",
         model_case(_dtype("F8_E4M3")), (CheckpointError, "has unsupported dtype 'F8_E4M3'"),
         (1, "unsupported dtype 'F8_E4M3'"), "use the float (F32/F16/BF16) checkpoint"),
    Case("shape-vs-config", MODEL, "weights whose shapes disagree with config.json",
         model_case(_shape_vs_config),
         (CheckpointError, "shape differs from config.json: vision_tower.vision_model.encoder."
                           "layers.0.mlp.fc1.weight is [24, 16], expected [20, 16]"),
         (1, "shape differs from config.json"), "use the config.json that came with the weights"),
    Case("config-of-another-size", MODEL, "config.json of another size of the model (text width "
         "64, weights 32 wide): many shapes differ, the list is cut after 10",
         model_case(_wider_config), (CheckpointError, "expected [1856, 64]"),
         (1, "more)"), "use the config.json that came with the weights"),
    Case("llama-keys", MODEL, "weights of another model (Llama-style `model.layers.0.self_attn."
         "q_proj.weight` keys) with a PaliGemma config.json", model_case(_llama_keys),
         (CheckpointError, "20 unexpected tensor(s) (not PaliGemma gemma"),
         (1, "model.layers.{0,1}.input_layernorm.weight"), "use PaliGemma weights"),
    # -- never executing code
    Case("pickle-only-folder", CODE, "a folder with only pytorch_model.bin (a pickle that would "
         "create a file when unpickled)", _pickle_only,
         (ConfigError, "config.json: file not found"), (1, "config.json: file not found"),
         "use the safetensors release of the model"),
    Case("pickle-weights", CODE, "config.json + tokenizer.model + a malicious pytorch_model.bin, "
         "no safetensors", _pickle_weights,
         (CheckpointError, "pickle-based weights are not loaded, because loading them can run "
                           "arbitrary code"),
         (1, "found pytorch_model.bin: pickle-based weights are not loaded"),
         "convert the weights to safetensors, or download the safetensors files"),
    Case("pickle-as-safetensors", CODE, "a pickle renamed model.safetensors",
         _pickle_as_safetensors, (CheckpointError, "model.safetensors: header length"),
         (1, "it is not a safetensors file"), "use a real safetensors file"),
    Case("pickle-as-tokenizer", CODE, "a pickle renamed tokenizer.model", _pickle_as_tokenizer,
         (CheckpointError, "not a SentencePiece model"), (1, "not a SentencePiece model"),
         "download tokenizer.model again"),
    Case("pickle-beside-safetensors", CODE, "malicious pytorch_model.bin, model.pt and "
         "training_args.bin next to valid safetensors (never opened)", _pickle_beside_safetensors,
         None, (0, None)),
    Case("remote-code", CODE, "config.json and tokenizer_config.json with `auto_map` and "
         "`trust_remote_code: true`, Python files in the folder (ignored, never imported)",
         _remote_code, None, (0, None)),
    Case("vae-raw-pickle", CODE, "--vae / load_vae given a pickle renamed vae-oid.npz",
         _vae_raw_pickle, (CheckpointError, "not a readable .npz file (not a zip archive)"),
         (1, "not a zip archive"), "use the official vae-oid.npz", before_load=True),
    Case("vae-object-array", CODE, "--vae / load_vae given an .npz whose array is a pickled "
         "object", _vae_object_array, (CheckpointError, "holds pickled (object) arrays, which npvlm "
                                                        "refuses to load"),
         (1, "holds pickled (object) arrays"), "use the official vae-oid.npz", before_load=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_api(case, robust_base, tmp_path):
    if skip_reason(case):
        pytest.skip(skip_reason(case))
    check_api(case, robust_base, tmp_path)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cli(case, cli_results):
    if skip_reason(case):
        pytest.skip(skip_reason(case))
    check_cli(case, cli_results[case.id])


def test_the_pickle_payload_is_live(tmp_path):
    """The marker checks mean something: unpickling the payload really does create the file."""
    f = pickle.loads(evil_pickle(tmp_path))
    f.close()
    assert (tmp_path / MARKER).exists()
