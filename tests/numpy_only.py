"""The model math in an environment with numpy alone: run by tests/test_layout.py with the python
of such an environment (a virtual environment holding numpy and npvlm, nothing else).

    python tests/numpy_only.py DIR      # reads DIR/config.json, params.npz, batch.npz; writes DIR/result.npz

It refuses to run where Pillow, sentencepiece, safetensors, ml_dtypes, tqdm, huggingface_hub,
torch or pytest can be imported (then the environment does not prove anything), runs a training
forward and backward pass and a prefill of the tiny model it is given, and writes the loss, the
logits, every gradient and the npvlm modules it imported.
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

NOT_HERE = ("PIL", "sentencepiece", "safetensors", "ml_dtypes", "tqdm", "huggingface_hub", "torch", "pytest")


def main(folder):
    present = [name for name in NOT_HERE if importlib.util.find_spec(name) is not None]
    if present:
        sys.exit(f"not a numpy-only environment: {', '.join(present)} can be imported")
    from npvlm.config import config_from_dict
    from npvlm.model import paligemma
    from npvlm.tree import flatten, unflatten

    cfg = config_from_dict(json.loads((folder / "config.json").read_text()))
    with np.load(folder / "params.npz") as data:
        params = unflatten({k: data[k] for k in data.files})
    with np.load(folder / "batch.npz") as data:
        batch = {k: data[k] for k in data.files}
    save = {}                                        # an empty plan: every parameter trains
    loss = paligemma.forward_loss(batch, params, cfg, save=save)
    grads = paligemma.backward(save, params, cfg)
    logits = paligemma.prefill({k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}, params, cfg)
    np.savez(folder / "result.npz", loss=loss, logits=logits,
             **{f"grad.{name}": g for name, g in flatten(grads).items()})
    imported = sorted(name for name in sys.modules if name.split(".")[0] == "npvlm")
    (folder / "modules.json").write_text(json.dumps(imported))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
