"""Writing a model back as a checkpoint in the layout it came from (npvlm.finetune's output).

The output folder has the input's files and names: the same safetensors file(s), one file or
the same shards with their `model.safetensors.index.json`, every tensor under its input key
(hub names in, hub names out; transformers 5.x names in, 5.x names out), `config.json` and
`tokenizer.model` and the folder's other small files copied. So transformers, vLLM or
big_vision's converters read it as they read the original. A weight that is not an array is
written as its `to_f32()`: a BF16Matrix widened, a LoRA weight merged (W + scale B A). Each
tensor is stored in the input's dtype ("same"), or all in F32 or BF16.

The folder is written next to its destination under a temporary name and renamed into place
when complete: a crash or a full disk never leaves a half-written model, and an existing
non-empty folder (the input model above all) is never written over.
"""

import json
import os
import secrets
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from ..backend import to_host
from ..errors import InputError
from ..loading.safetensors_file import SafetensorsFile
from ..loading.weights import LM_HEAD, TEXT, canonical_name, checkpoint_files, tree_name
from ..tree import flatten

SAVE_DTYPES = ("same", "float32", "bfloat16")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _stored(dtype):
    """The NumPy dtype of a safetensors dtype name (BF16 through ml_dtypes, imported only here)."""
    if dtype == "BF16":
        import ml_dtypes  # noqa: PLC0415 (a slow import, needed only to write BF16)
        return ml_dtypes.bfloat16
    return {"F32": np.float32, "F16": np.float16, "F64": np.float64}[dtype]


def _host_f32(w):
    """A weight as a host fp32 array (a BF16Matrix widened, a LoraWeight merged, on either backend)."""
    if hasattr(w, "to_f32"):                       # a BF16Matrix, a LoraWeight
        w = w.to_f32()
    return np.asarray(to_host(w), dtype=np.float32)


def _tensor(flat, key, shape):
    """The value of checkpoint key `key` from the flat parameter dict, in the stored shape."""
    name = canonical_name(key)
    if name == LM_HEAD:                            # a stored tied head: the embedding
        name = TEXT + "embed_tokens.weight"
    return _host_f32(flat[tree_name(name)]).reshape(shape)


def check_output(out, source):
    """Refuse, before any work, an output folder that is the input or that holds anything."""
    out, source = Path(out), Path(source)
    if out.exists() and source.exists() and os.path.samefile(out, source):
        raise InputError(f"{out}: is the input model's folder; write the fine-tuned model elsewhere")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: already exists and is not an empty folder; choose a new output folder")
    if not out.parent.is_dir():
        raise InputError(f"{out}: folder {out.parent} does not exist; create it first")
    if not os.access(out.parent, os.W_OK):
        raise InputError(f"{out}: folder {out.parent} is not writable")


def _plain_file_mode():
    """The permissions open() would give a new file: 0o666 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_checkpoint(params, source, out, dtype="same"):
    """Write `params` (the tree npvlm.load gave, possibly trained, possibly with LoRA adapters)
    to `out` in the layout of the checkpoint folder `source`. dtype: "same" (each tensor as the
    input stored it), "float32" or "bfloat16". Returns the output folder."""
    if dtype not in SAVE_DTYPES:
        raise InputError(f"save dtype must be one of {', '.join(SAVE_DTYPES)}, got {dtype!r}")
    source, out = Path(source), Path(out)
    check_output(out, source)
    flat = flatten(params)
    files, weight_map = checkpoint_files(source)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        total = 0
        for path in files:
            with SafetensorsFile(path) as f:
                meta = f.metadata
                tensors = {}
                for key in f.keys():
                    stored = {"same": f.dtype(key), "float32": "F32", "bfloat16": "BF16"}[dtype]
                    tensors[key] = np.ascontiguousarray(_tensor(flat, key, f.shape(key)).astype(_stored(stored)))
                    total += tensors[key].nbytes
            save_file(tensors, str(tmp / path.name), metadata=meta)
            os.chmod(tmp / path.name, _plain_file_mode())   # the package writes 0o600
            del tensors
        if weight_map is not None:
            index = json.loads((source / "model.safetensors.index.json").read_text())
            index.setdefault("metadata", {})["total_size"] = total
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for extra in sorted(source.iterdir()):
            if extra.is_file() and not extra.name.endswith(WEIGHT_SUFFIXES) and \
                    extra.name not in ("model.safetensors.index.json", "config.json"):
                shutil.copy2(extra, tmp / extra.name)
        config = json.loads((source / "config.json").read_text())
        if dtype != "same":                            # transformers 5 writes "dtype", 4.x "torch_dtype"
            config["dtype"] = dtype
            if "torch_dtype" in config:
                config["torch_dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if out.exists():
            out.rmdir()                                # empty: check_output made sure
        os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise InputError(f"{out}: cannot write the model ({e.strerror or e}); nothing was left "
                             "in its place") from None
        raise
    return out
