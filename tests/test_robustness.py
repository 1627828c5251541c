"""Robustness: every bad input gets a clear one-line error, nothing is lost, nothing is trusted.

One table, `CASES`: each case builds its input in a temporary folder and is run twice,

- through the Python API (`npvlm.load(...).generate(...)`, `npvlm.inputs.image.load_image`,
  `npvlm.io`): the documented exception type from `npvlm.errors`, its one-line message checked;
- through `python run.py` in a subprocess: the last stderr line starts with `error:` and holds a
  specific fragment, the exit code is the documented one, stdout is empty, no "Traceback".

Cases that must work (a 1x1 image, an empty prompt, ...) check that both paths give an answer.
docs/errors.md is generated from this same table: `python tests/make_errors_doc.py`.
"""

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import npvlm
from npvlm.errors import BackendError, CheckpointError, ConfigError, InputError, NpvlmError
from npvlm.inputs.image import load_image
from npvlm.saving.atomic import check_writable, image_format, save_image_atomic

from helpers import ROOT, read_safetensors, save_safetensors, write_random_model

RUN_PY = ROOT / "run.py"
MARKER = "EXECUTED"        # a pickle in these cases creates this file if anything unpickles it


# ---- the inputs of one run --------------------------------------------------------------------

@dataclass
class Inputs:
    """What one case hands to the API and to run.py (each runner gets a fresh copy)."""
    model: object                      # model folder (or a path that is not one)
    image: object
    prompt: str = "caption en"
    cli_prompt: object = None          # argv form when it must differ (bytes that are not UTF-8)
    api_kwargs: dict = field(default_factory=dict)   # extra model.generate(...) arguments
    cli_args: list = field(default_factory=list)     # extra run.py arguments
    backend: str = "numpy"
    weights: str = "fp32"              # --weights / npvlm.load(weights=...)
    draw: Path = None                  # --draw OUT / npvlm.io.save_image_atomic
    allow_huge: bool = False           # --allow-huge-image / load_image(allow_huge=True)
    vae: Path = None                   # --vae FILE / npvlm.tasks.segmentation.load_vae
    pillow_limit: int = None           # lower PIL.Image.MAX_IMAGE_PIXELS for this run
    check: object = None               # check(inputs, tmp) after the run: nothing lost or run


@dataclass(frozen=True)
class Case:
    id: str
    group: str
    what: str                          # the case in words (the doc's first column)
    build: object                      # build(tmp, base) -> Inputs
    api: tuple                         # (exception type, fragment), or None: it works
    cli: tuple                         # (exit code, fragment); (0, None): it works
    todo: str = ""                     # what a user should do (the doc's last column)
    before_load: bool = False          # run.py must refuse before loading the model
    needs_no_gpu: bool = False         # only an error where CuPy cannot run


@dataclass
class Base:
    """A valid tiny model and image, made once; cases copy what they change."""
    model: Path
    image: Path


def make_base(folder):
    folder = Path(folder)
    model = write_random_model(folder / "model")
    image = folder / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(image)
    return Base(model, image)


# ---- builders: models -------------------------------------------------------------------------

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


# ---- builders: images -------------------------------------------------------------------------

def png_bytes(width, height, bit_depth=8, color_type=2, rows=None):
    """A PNG written by hand: any IHDR, optionally no pixel data at all (rows=None -> empty IDAT)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(b"".join(b"\x00" + r for r in rows)) if rows is not None else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def image_case(make, **extra):
    """A builder: make(path_folder) -> image path; the base model."""
    def build(tmp, base):
        return Inputs(base.model, make(tmp), **extra)
    return build


def _noise(w, h, seed=0, mode="RGB"):
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)
    return Image.fromarray(a, "RGBA").convert(mode)


def _saved(name, img_fn, **save):
    def make(tmp):
        path = tmp / name
        img_fn().save(path, **save)
        return path
    return make


def _raw(name, data):
    def make(tmp):
        path = tmp / name
        path.write_bytes(data)
        return path
    return make


def _truncated(name, fmt):
    def make(tmp):
        path = tmp / name
        _noise(64, 48, seed=9).save(path, fmt)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path
    return make


def _directory(tmp):
    (tmp / "photos").mkdir()
    return tmp / "photos"


def _text_as_png(tmp):
    path = tmp / "notes.png"
    path.write_text("shopping list: milk, eggs\n")
    return path


def _sixteen_bit_rgba(tmp):
    rng = np.random.default_rng(4)
    rows = [rng.integers(0, 256, 12 * 8, dtype=np.uint8).tobytes() for _ in range(9)]
    path = tmp / "deep.png"
    path.write_bytes(png_bytes(12, 9, bit_depth=16, color_type=6, rows=rows))
    return path


def _palette_transparent(tmp):
    path = tmp / "palette.png"
    img = _noise(40, 30, seed=5).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    img.save(path, transparency=3)
    return path


FRAMES = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def _animated_gif(tmp):
    path = tmp / "anim.gif"
    frames = [Image.new("RGB", (16, 12), c) for c in FRAMES]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return path


def _first_frame_used(inp, tmp):
    with Image.open(inp.image) as check:
        assert check.n_frames == 3
    assert np.asarray(load_image(inp.image))[0, 0].tolist() == list(FRAMES[0])


def _small_over_lowered_limit(tmp):
    path = tmp / "big.png"
    _noise(40, 30, seed=6).save(path)          # 1200 pixels, over a limit lowered to 1000
    return path


# ---- builders: prompts and options --------------------------------------------------------------

def options_case(**fields):
    def build(tmp, base):
        return Inputs(base.model, base.image, **fields)
    return build


# ---- builders: outputs ---------------------------------------------------------------------------

def draw_case(where):
    def build(tmp, base):
        return Inputs(base.model, base.image, draw=where(tmp, base))
    return build


def _under_a_file(tmp, base):
    (tmp / "results").write_text("I am a file, not a folder")
    return tmp / "results" / "out.png"


def _folder_as_output(tmp, base):
    (tmp / "out.png").mkdir()
    return tmp / "out.png"


def _replaces_existing(tmp, base):
    """--draw onto an unrelated existing file: replaced whole, by a rename, no temp file left."""
    out = tmp / "out.png"
    out.write_bytes(b"old contents " * 50_000)
    reference = tmp / "reference.txt"          # what a plain open() makes here (umask applied)
    reference.write_text("x")
    old_inode = out.stat().st_ino

    def check(inp, tmp):
        assert [p.name for p in tmp.iterdir() if p.name.endswith(".tmp")] == []
        assert out.stat().st_ino != old_inode, "the old file was rewritten in place, not replaced"
        with Image.open(out) as img:
            img.load()
            assert img.format == "PNG" and img.width >= 40
        assert out.stat().st_mode & 0o777 == reference.stat().st_mode & 0o777
    return Inputs(base.model, base.image, draw=out, check=check)


# ---- the table -------------------------------------------------------------------------------

MODEL, IMAGE, PROMPT, OUTPUT, CODE = ("Model folder", "Image", "Prompt and options", "Output",
                                      "Never executing code from the model folder")
POSITIONS = "exceeds the model's 64 positions"

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
    # -- image
    Case("image-missing", IMAGE, "image file does not exist",
         image_case(lambda tmp: tmp / "missing.png"), (InputError, "missing.png: image file not found"),
         (1, "image file not found"), "check the image path", before_load=True),
    Case("image-directory", IMAGE, "image path is a directory", image_case(_directory),
         (InputError, "is a directory, not an image file"), (1, "is a directory"),
         "pass an image file", before_load=True),
    Case("image-text-file", IMAGE, "a text file renamed .png", image_case(_text_as_png),
         (InputError, "notes.png: not an image file Pillow can read"),
         (1, "not an image file Pillow can read"), "pass a real image file", before_load=True),
    Case("image-truncated-jpeg", IMAGE, "truncated JPEG", image_case(_truncated("cut.jpg", "JPEG")),
         (InputError, "cut.jpg: truncated or corrupt image"), (1, "truncated or corrupt image"),
         "download or export the image again", before_load=True),
    Case("image-truncated-png", IMAGE, "truncated PNG", image_case(_truncated("cut.png", "PNG")),
         (InputError, "cut.png: truncated or corrupt image"), (1, "truncated or corrupt image"),
         "download or export the image again", before_load=True),
    Case("image-empty", IMAGE, "zero-byte file", image_case(_raw("empty.jpg", b"")),
         (InputError, "empty.jpg: empty file (0 bytes)"), (1, "empty file (0 bytes)"),
         "download or export the image again", before_load=True),
    Case("image-1x1", IMAGE, "1x1 image", image_case(_saved("dot.png", lambda: _noise(1, 1))),
         None, (0, None)),
    Case("image-10000x10", IMAGE, "extreme aspect ratio, 10000x10 (squashed to a square, as HF)",
         image_case(_saved("strip.png", lambda: _noise(10000, 10))), None, (0, None)),
    Case("image-16-bit-gray", IMAGE, "16-bit grayscale PNG (scaled to 8 bits)",
         image_case(_saved("gray16.png", lambda: Image.fromarray(
             np.random.default_rng(3).integers(0, 65536, (9, 17)).astype(np.uint16)))),
         None, (0, None)),
    Case("image-16-bit-rgba", IMAGE, "16-bit RGBA PNG with transparency",
         image_case(_sixteen_bit_rgba), None, (0, None)),
    Case("image-palette-transparency", IMAGE, "palette PNG with a transparent entry "
         "(composited onto white)", image_case(_palette_transparent), None, (0, None)),
    Case("image-animated-gif", IMAGE, "animated GIF (the first frame is used)",
         image_case(_animated_gif, check=_first_frame_used), None, (0, None)),
    Case("image-bomb-header", IMAGE, "PNG whose header declares 20000x20000 pixels (a decompression "
         "bomb; 57 bytes on disk)", image_case(_raw("bomb.png", png_bytes(20000, 20000))),
         (InputError, "20000x20000 = 400000000 pixels, over Pillow's decompression-bomb limit"),
         (1, "--allow-huge-image"), "only for a file you trust: --allow-huge-image / "
                                    "load_image(path, allow_huge=True)", before_load=True),
    Case("image-bomb-header-1x-2x", IMAGE, "PNG header declaring 9500x9500 (between Pillow's limit "
         "and twice it, where Pillow only warns)",
         image_case(_raw("bomb.png", png_bytes(9500, 9500))),
         (InputError, "9500x9500 = 90250000 pixels, over Pillow's decompression-bomb limit"),
         (1, "decompression-bomb limit of 89478485 pixels"), "as above", before_load=True),
    Case("image-over-lowered-limit", IMAGE, "a real 40x30 image over a limit lowered to 1000 "
         "pixels (`PIL.Image.MAX_IMAGE_PIXELS`)",
         image_case(_small_over_lowered_limit, pillow_limit=1000),
         (InputError, "40x30 = 1200 pixels, over Pillow's decompression-bomb limit of 1000"),
         (1, "allow_huge=True (run.py: --allow-huge-image)"), "as above", before_load=True),
    Case("image-over-limit-allowed", IMAGE, "the same with --allow-huge-image / "
         "load_image(allow_huge=True): accepted",
         image_case(_small_over_lowered_limit, pillow_limit=1000, allow_huge=True,
                    cli_args=["--allow-huge-image"]), None, (0, None)),
    # -- prompt and options
    Case("prompt-empty", PROMPT, "empty prompt (allowed, as in HF)", options_case(prompt=""),
         None, (0, None)),
    Case("prompt-too-long", PROMPT, "prompt + max_new_tokens longer than the model's positions",
         options_case(prompt="describe " * 40, api_kwargs=dict(max_new_tokens=30),
                      cli_args=["--max-new-tokens", "30"]),
         (InputError, POSITIONS), (1, POSITIONS), "shorten the prompt or lower max_new_tokens"),
    Case("prompt-not-utf8", PROMPT, "prompt that is not UTF-8 (CLI: argv bytes `caption \\xff`; "
         "API: a str with the lone surrogate `\\udcff`)",
         options_case(prompt="caption \udcff", cli_prompt=b"caption \xff"),
         (InputError, "is not valid UTF-8 text: it holds a lone surrogate"),
         (1, "the prompt is not valid UTF-8 text (byte 0xff at character 8)"),
         "pass UTF-8 text", before_load=True),
    Case("max-new-tokens-0", PROMPT, "max_new_tokens 0",
         options_case(api_kwargs=dict(max_new_tokens=0), cli_args=["--max-new-tokens", "0"]),
         (InputError, "max_new_tokens must be an integer >= 1, got 0"),
         (1, "--max-new-tokens must be >= 1, got 0"), "ask for at least 1 token", before_load=True),
    Case("max-new-tokens-negative", PROMPT, "max_new_tokens -5",
         options_case(api_kwargs=dict(max_new_tokens=-5), cli_args=["--max-new-tokens", "-5"]),
         (InputError, "max_new_tokens must be an integer >= 1, got -5"),
         (1, "--max-new-tokens must be >= 1, got -5"), "ask for at least 1 token", before_load=True),
    Case("max-new-tokens-not-a-number", PROMPT, "max_new_tokens not a number",
         options_case(api_kwargs=dict(max_new_tokens="many"), cli_args=["--max-new-tokens", "many"]),
         (InputError, "max_new_tokens must be an integer >= 1, got 'many'"),
         (2, "argument --max-new-tokens: invalid int value: 'many'"), "pass an integer",
         before_load=True),
    Case("temperature-negative", PROMPT, "temperature < 0",
         options_case(api_kwargs=dict(temperature=-0.5), cli_args=["--temperature", "-0.5"]),
         (InputError, "temperature must be a number >= 0"), (1, "temperature must be a number >= 0"),
         "use 0 (greedy) or a positive temperature", before_load=True),
    Case("top-p-zero", PROMPT, "top_p 0",
         options_case(api_kwargs=dict(top_p=0.0), cli_args=["--top-p", "0"]),
         (InputError, "top_p must be in (0, 1]"), (1, "top_p must be in (0, 1]"),
         "use a value in (0, 1]; 1 turns it off", before_load=True),
    Case("top-p-above-1", PROMPT, "top_p 1.5",
         options_case(api_kwargs=dict(top_p=1.5), cli_args=["--top-p", "1.5"]),
         (InputError, "top_p must be in (0, 1] (1 = off), got 1.5"), (1, "top_p must be in (0, 1] (1 = off), got 1.5"),
         "use a value in (0, 1]; 1 turns it off", before_load=True),
    Case("top-k-negative", PROMPT, "top_k < 0",
         options_case(api_kwargs=dict(top_k=-2), cli_args=["--top-k", "-2"]),
         (InputError, "top_k must be an integer >= 0"), (1, "top_k must be an integer >= 0"),
         "use 0 (off) or a positive k", before_load=True),
    Case("backend-unknown", PROMPT, "unknown backend", options_case(backend="tpu"),
         (BackendError, "unknown backend 'tpu'; choose one of: numpy, cupy"),
         (2, "argument --backend: invalid choice: 'tpu'"), "use numpy or cupy", before_load=True),
    Case("backend-cupy-no-gpu", PROMPT, "backend cupy without a usable GPU (or without cupy)",
         options_case(backend="cupy"), (BackendError, "backend 'cupy' is not usable"),
         (1, "backend 'cupy' is not usable"), "use --backend numpy, or install cupy on a GPU "
                                               "machine", needs_no_gpu=True),
    Case("weights-unknown", PROMPT, "unknown weight storage", options_case(weights="int8"),
         (InputError, "weights must be one of fp32, bf16, not 'int8'"),
         (2, "argument --weights: invalid choice: 'int8'"), "use fp32 (default) or bf16", before_load=True),
    Case("weights-bf16-on-cupy", PROMPT, "bf16 weights with the cupy backend",
         options_case(backend="cupy", weights="bf16"),
         (InputError, 'weights="bf16" is a CPU memory saving for the numpy backend'),
         (1, 'weights="bf16" is a CPU memory saving for the numpy backend'),
         "use the default fp32 weights on a GPU", before_load=True),
    Case("weights-bf16-works", PROMPT, "bf16 weights on the numpy backend (not an error)",
         options_case(weights="bf16"), None, (0, None)),
    # -- output
    Case("draw-missing-folder", OUTPUT, "--draw into a folder that does not exist",
         draw_case(lambda tmp, base: tmp / "nope" / "out.png"),
         (InputError, "does not exist; create it"), (1, "does not exist"),
         "create the folder first", before_load=True),
    Case("draw-under-a-file", OUTPUT, "--draw into a path under a file (`results/out.png`, "
         "results a file; also how the tests stand in for a read-only folder, since root ignores "
         "chmod)", draw_case(_under_a_file),
         (InputError, "is a file, not a folder"), (1, "is a file, not a folder"),
         "choose a path in an existing, writable folder", before_load=True),
    Case("draw-is-a-folder", OUTPUT, "--draw names an existing folder",
         draw_case(_folder_as_output), (InputError, "is a folder; give a file name"),
         (1, "is a folder"), "give a file name such as out.png", before_load=True),
    Case("draw-onto-input", OUTPUT, "--draw onto the input image itself",
         draw_case(lambda tmp, base: base.image),
         (InputError, "refusing to overwrite the input file"), (1, "refusing to overwrite the input"),
         "choose another output path", before_load=True),
    Case("draw-unknown-extension", OUTPUT, "--draw with an extension Pillow cannot write",
         draw_case(lambda tmp, base: tmp / "out.xyz"),
         (InputError, "unknown image extension '.xyz'"), (1, "unknown image extension"),
         "use .png or .jpg", before_load=True),
    Case("draw-replaces-existing", OUTPUT, "--draw onto an existing unrelated file: replaced whole "
         "(temp file + rename), no temp file left, normal permissions", _replaces_existing,
         None, (0, None)),
]

assert len({c.id for c in CASES}) == len(CASES)


# ---- the two runners ---------------------------------------------------------------------------

def run_api(inp):
    """The Python API, the way a user calls it. Returns the Generation (or raises)."""
    with pytest.MonkeyPatch.context() as mp:
        if inp.pillow_limit is not None:
            mp.setattr(Image, "MAX_IMAGE_PIXELS", inp.pillow_limit)
        if inp.draw is not None:
            check_writable(inp.draw, inputs=[inp.image])
            image_format(inp.draw)
        if inp.vae is not None:
            from npvlm.tasks.segmentation import load_vae
            load_vae(inp.vae)
        model = npvlm.load(inp.model, backend=inp.backend, weights=inp.weights)
        image = load_image(inp.image, allow_huge=True) if inp.allow_huge else inp.image
        out = model.generate(image, inp.prompt, **{"max_new_tokens": 2, **inp.api_kwargs})
        if inp.draw is not None:
            from npvlm.tasks.draw import draw_objects
            save_image_atomic(draw_objects(load_image(inp.image), out.detections().objects), inp.draw)
        return out


def cli_argv(inp):
    argv = [str(inp.image), inp.cli_prompt if inp.cli_prompt is not None else inp.prompt,
            "--model", str(inp.model), "--max-new-tokens", "2", "--backend", inp.backend,
            "--weights", inp.weights,
            *inp.cli_args]
    if inp.draw is not None:
        argv += ["--draw", str(inp.draw)]
    if inp.vae is not None:
        argv += ["--vae", str(inp.vae)]
    if inp.pillow_limit is None:
        return [sys.executable, str(RUN_PY), *argv]
    # run.py itself, in a fresh interpreter whose Pillow limit is lowered first (no test hook)
    boot = ("import runpy, sys, PIL.Image; PIL.Image.MAX_IMAGE_PIXELS = int(sys.argv.pop(1)); "
            f"sys.argv[0] = {str(RUN_PY)!r}; runpy.run_path(sys.argv[0], run_name='__main__')")
    return [sys.executable, "-c", boot, str(inp.pillow_limit), *argv]


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def last_line(self):
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else ""


def run_cli(inp, cwd):
    r = subprocess.run(cli_argv(inp), capture_output=True, cwd=cwd, timeout=120,
                       env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    return CliResult(r.returncode, r.stdout.decode("utf-8", "replace"),
                     r.stderr.decode("utf-8", "replace"))


def skip_reason(case):
    if case.needs_no_gpu:
        from npvlm.backend import cupy_usable
        if cupy_usable():
            return "a GPU is usable here, so the cupy backend is not an error"
    return None


# ---- the tests -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def cli_results(request, base, tmp_path_factory):
    """run.py for every selected case, a few subprocesses at a time (each is ~0.3 s of imports)."""
    wanted = {item.callspec.params["case"].id for item in request.session.items
              if getattr(item, "originalname", None) == "test_cli" and hasattr(item, "callspec")}
    todo = [c for c in CASES if c.id in wanted and skip_reason(c) is None]
    root = tmp_path_factory.mktemp("cli")

    def one(case):
        tmp = root / case.id
        tmp.mkdir()
        inp = case.build(tmp, base)
        return case.id, (inp, tmp, run_cli(inp, tmp))
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 2)) as pool:
        return dict(pool.map(one, todo))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_api(case, base, tmp_path):
    if skip_reason(case):
        pytest.skip(skip_reason(case))
    inp = case.build(tmp_path, base)
    if case.api is None:
        out = run_api(inp)
        assert isinstance(out.text, str) and 1 <= len(out.tokens) <= 2
    else:
        kind, fragment = case.api
        with pytest.raises(NpvlmError) as info:
            run_api(inp)
        assert type(info.value) is kind, f"{type(info.value).__name__}: {info.value}"
        msg = str(info.value)
        assert "\n" not in msg and fragment in msg, msg
    if inp.check is not None:
        inp.check(inp, tmp_path)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cli(case, cli_results):
    if skip_reason(case):
        pytest.skip(skip_reason(case))
    inp, tmp, r = cli_results[case.id]
    code, fragment = case.cli
    assert "Traceback" not in r.stderr, r.stderr
    if code == 0:
        assert r.returncode == 0, r.stderr
        assert r.stdout.endswith("\n"), r.stderr
        assert not any(line.startswith(("error", "internal error")) for line in r.stderr.splitlines())
    else:
        assert r.returncode == code, (r.returncode, r.stderr)
        assert r.stdout == ""
        assert r.last_line.startswith("error:") and fragment in r.last_line, r.stderr
        if case.before_load:
            assert "loading" not in r.stderr, "the model was loaded before the input was refused"
    if inp.check is not None:
        inp.check(inp, tmp)


# ---- what the table cannot express ---------------------------------------------------------------

def test_the_pickle_payload_is_live(tmp_path):
    """The marker checks mean something: unpickling the payload really does create the file."""
    f = pickle.loads(evil_pickle(tmp_path))
    f.close()
    assert (tmp_path / MARKER).exists()


def test_failed_write_keeps_the_old_file(tmp_path):
    """A write that fails half-way (a full disk) leaves the previous output intact and no temp file."""
    out = tmp_path / "out.png"
    out.write_bytes(b"previous result")

    class FailingImage:
        def save(self, f, format):
            f.write(b"\x89PNG partial")
            raise OSError(28, "No space left on device")
    with pytest.raises(InputError, match="No space left on device.*previous file there is unchanged"):
        save_image_atomic(FailingImage(), out)
    assert out.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_errors_doc_lists_every_case():
    """docs/errors.md is generated from CASES; a new case or fragment needs a regenerated doc."""
    doc = (ROOT / "docs" / "errors.md").read_text(encoding="utf-8")
    stale = [c.id for c in CASES if c.what not in doc
             or (c.api and not c.needs_no_gpu and c.api[1] not in doc)]
    stale += [c.id for c in FINETUNE_CASES if c.what not in doc or c.error[1] not in doc]
    assert not stale, f"docs/errors.md is stale for {stale}; run python tests/make_errors_doc.py"


# ---- fine-tuning (python -m npvlm.finetune): bad data and options ------------------------------

@dataclass(frozen=True)
class FinetuneCase:
    id: str
    what: str
    build: object                      # build(tmp, base) -> argv for npvlm.finetune (no --quiet)
    error: tuple                       # (exit code, fragment)
    todo: str


def _ft_data(tmp, lines, images=("a.png",)):
    folder = tmp / "data"
    folder.mkdir(exist_ok=True)
    for name in images:
        Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(folder / name)
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"


def _ft_argv(tmp, base, data, *extra):
    return ["--model", str(base.model), "--data", str(data), "--out", str(tmp / "out"), "--steps", "2",
            "--batch-size", "1", *extra]


def _example(image="a.png", prefix="caption en", suffix="a b"):
    return json.dumps({"image": image, "prefix": prefix, "suffix": suffix})


def _ft(lines, *extra, images=("a.png",)):
    return lambda tmp, base: _ft_argv(tmp, base, _ft_data(tmp, lines, images), *extra)


def _ft_text_image(tmp, base):
    data = _ft_data(tmp, [_example(), _example("notes.png")])
    (data.parent / "notes.png").write_text("not an image")
    return _ft_argv(tmp, base, data)


def _ft_out_is_input(tmp, base):
    return ["--model", str(base.model), "--data", str(_ft_data(tmp, [_example()])), "--out", str(base.model)]


def _ft_out_not_empty(tmp, base):
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")
    return _ft_argv(tmp, base, _ft_data(tmp, [_example()]))


FT = "Fine-tuning data and options (python -m npvlm.finetune)"
FINETUNE_CASES = [
    FinetuneCase("ft-data-missing", "the --data file does not exist",
                 lambda tmp, base: _ft_argv(tmp, base, tmp / "nope.jsonl"), (1, "nope.jsonl: data file not found"),
                 "check the --data path"),
    FinetuneCase("ft-not-json", "a line that is not JSON", _ft([_example(), "{image: a.png"]),
                 (1, "train.jsonl line 2: not valid JSON"), "fix that line"),
    FinetuneCase("ft-image-missing", "an example's image file does not exist", _ft([_example(), _example("b.png")]),
                 (1, "train.jsonl line 2: image 'b.png' not found"), "paths are relative to the JSONL file"),
    FinetuneCase("ft-image-unreadable", "an example's image is not an image (a text file named .png)",
                 _ft_text_image, (1, "train.jsonl line 2: image 'notes.png' cannot be read"), "replace the file"),
    FinetuneCase("ft-suffix-empty", "an empty suffix", _ft([_example(suffix="  ")]),
                 (1, "train.jsonl line 1: 'suffix' is empty"), "give every example its answer"),
    FinetuneCase("ft-suffix-missing", "no suffix", _ft([json.dumps({"image": "a.png", "prefix": "caption en"})]),
                 (1, "train.jsonl line 1: 'suffix' is missing or not a string"), "give every example its answer"),
    FinetuneCase("ft-too-long", "an example longer than --max-len text tokens",
                 _ft([_example(suffix="a b c d e f g h")], "--max-len", "5"),
                 (1, "train.jsonl line 1: the example is"), "shorten it or raise --max-len"),
    FinetuneCase("ft-over-positions", "an example longer than the model's positions (64 in the test model)",
                 _ft([_example(suffix=" ".join(["word"] * 80))], "--max-len", "1000"),
                 (1, "exceed the model's 64 positions"), "shorten the example"),
    FinetuneCase("ft-unknown-train", "an unknown --train value", _ft([_example()], "--train", "mlp"),
                 (2, "argument --train: invalid choice: 'mlp'"), "choose all, decoder, attention or lora"),
    FinetuneCase("ft-nan-loss", "a learning rate so large the loss overflows (NaN/inf)",
                 _ft([_example()], "--optimizer", "sgd", "--lr", "1e30", "--warmup-steps", "0", "--steps", "3"),
                 (1, "step 2: the loss is"), "lower --lr, or set --clip-norm"),
    FinetuneCase("ft-out-is-input", "--out is the input model's folder", _ft_out_is_input,
                 (1, "is the input model's folder"), "write the fine-tuned model elsewhere"),
    FinetuneCase("ft-out-not-empty", "--out is a folder that already holds files", _ft_out_not_empty,
                 (1, "already exists and is not an empty folder"), "choose a new output folder"),
    FinetuneCase("ft-resume-nothing", "--resume with no saved state", _ft([_example()], "--resume"),
                 (1, "no saved training state to resume"), "drop --resume, or point --work at the state"),
]


def run_finetune_cli(argv, cwd):
    r = subprocess.run([sys.executable, "-m", "npvlm.finetune", *argv, "--quiet"], capture_output=True, cwd=cwd,
                       timeout=300, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    return CliResult(r.returncode, r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace"))


@pytest.mark.parametrize("case", FINETUNE_CASES, ids=lambda c: c.id)
def test_finetune_bad_input(case, base, tmp_path):
    """One `error:` line, the documented exit code, no traceback, and nothing written to --out
    (what was there before stays as it was)."""
    argv = case.build(tmp_path, base)
    out = Path(argv[argv.index("--out") + 1])           # the input model itself, in ft-out-is-input

    def listing():
        return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in out.iterdir()) if out.is_dir() else None
    before = listing()
    r = run_finetune_cli(argv, tmp_path)
    code, fragment = case.error
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == code, (r.returncode, r.stderr)
    assert r.last_line.startswith("error:") and fragment in r.last_line, r.stderr
    assert listing() == before, "the output folder changed"
    assert not list(out.parent.glob(f".{out.name}.*.tmp")), "a temporary output folder was left behind"
