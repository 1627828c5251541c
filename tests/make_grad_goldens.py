"""Gradient goldens: the training loss and every parameter's gradient from PyTorch autograd.

    python tests/make_grad_goldens.py          # writes tests/goldens/<model>/grads.npz + grad_meta.json

For each golden model (tests/goldens/<model>/model, made by tests/make_goldens.py) and a batch of
three training examples of different lengths (tests/hf_reference.py `make_training_examples`):
transformers 5.24 `PaliGemmaForConditionalGeneration` (eager, fp32) runs every example alone
(`training_reference`: positions from the mask, as npvlm derives them for a padded batch) with
the "example" reduction and `loss.backward()`. Written, in npvlm's layout (parameter tree names,
the padded batch's positions):

- the padded batch (`batch.*`), the "example" and "token" losses, and HF's own `labels=` loss
  on the padded batch with mask-derived positions (= the "token" reduction);
- `grad.<parameter>` for every parameter (fp32), and `noise.<parameter>`: max |fp32 - fp64|
  of torch's own gradient (the same model run in float64), the rounding floor a tensor's
  tolerance may rise to;
- `stage.grad.<stage>`: the gradient arriving at each stage output (zeros on left padding), with
  its `noise.stage.grad.<stage>` likewise.

Needs the reference extra: pip install -e '.[reference]'. Deterministic for fixed versions.
"""

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch
from transformers import PaliGemmaForConditionalGeneration

import npvlm
from npvlm.tree import flatten

import hf_reference as ref
from helpers import GOLDEN_MODELS, GOLDENS, GRAD_FORMAT_VERSION, tree_path

MODELS = GOLDEN_MODELS
EXAMPLES_SEED = 5
LENGTHS = ((6, 5), (3, 2), (4, 7))      # (prefix tokens, suffix tokens) of the three examples


def param_grads(grads, shapes):
    """{HF name: grad} -> {npvlm tree name: grad in npvlm's layout} (the tied lm_head skipped)."""
    out = {}
    for name, g in grads.items():
        path = tree_path(name)
        out[path] = g.reshape(shapes[path]).astype(np.float32) if path in shapes else g.astype(np.float32)
    return out


def padded_stages(stage_grads, examples, T):
    """Per-example stage gradients -> [B, ...] arrays in the padded batch's layout."""
    out = {}
    for name in stage_grads[0]:
        if name == "grad.logits":
            continue                      # npvlm's are at the loss positions only: checked through the loss
        rows = []
        for e, per_example in zip(examples, stage_grads):
            g = per_example[name]
            if name.startswith("grad.text."):
                full = np.zeros((T,) + g.shape[1:], np.float32)
                full[T - e["input_ids"].shape[1]:] = g
                g = full
            rows.append(g)
        out[f"stage.{name}"] = np.stack(rows)
    return out


def make(name, out_dir):
    folder = GOLDENS / name / "model"
    spec = json.loads((GOLDENS / "meta.json").read_text())["models"][name]["spec"]
    hf = PaliGemmaForConditionalGeneration.from_pretrained(folder, attn_implementation="eager",
                                                           dtype=torch.float32).eval()
    examples = ref.make_training_examples(spec, EXAMPLES_SEED, LENGTHS)
    batch = ref.left_padded(examples)
    loss, grads, stages = ref.training_reference(hf, examples, "example")
    token_loss, _, _ = ref.training_reference(hf, examples, "token")
    loss64, grads64, stages64 = ref.training_reference(copy.deepcopy(hf).double(), examples, "example")
    ids, mask, tti, pix = ref._tensors(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                                       batch["pixel_values"])
    with torch.no_grad():
        hf_labels_loss = float(hf(input_ids=ids, attention_mask=mask, token_type_ids=tti, pixel_values=pix,
                                  position_ids=ref.position_ids_from_mask(mask),
                                  labels=torch.as_tensor(batch["labels"]), use_cache=False).loss)
    # the shapes of npvlm's tree (the patch kernel is [D, C*P*P] there)
    shapes = {k: v.shape for k, v in flatten(npvlm.load(folder).params).items()}
    arrays = {f"batch.{k}": v for k, v in batch.items()}
    arrays.update({f"grad.{k}": v for k, v in param_grads(grads, shapes).items()})
    noise = {k: float(np.abs(g - grads64[k]).max()) for k, g in grads.items()}
    arrays.update({f"noise.{tree_path(k)}": np.float64(v) for k, v in noise.items()})
    T = batch["input_ids"].shape[1]
    arrays.update(padded_stages(stages, examples, T))
    fp64 = padded_stages(stages64, examples, T)
    arrays.update({f"noise.{k}": np.float64(np.abs(arrays[k] - v).max()) for k, v in fp64.items()})
    arrays.update({"loss.example": np.float64(loss), "loss.token": np.float64(token_loss),
                   "loss.example_fp64": np.float64(loss64), "loss.hf_labels": np.float64(hf_labels_loss)})
    path = out_dir / name / "grads.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    print(f"{name}: loss {loss:.6f} (fp64 {loss64:.6f}), token {token_loss:.6f}, HF labels= {hf_labels_loss:.6f}, "
          f"{len(grads)} gradients, largest fp32 noise {max(noise.values()):.1e}; {path.stat().st_size / 1e3:.0f} kB")
    return {"spec": spec, "examples_seed": EXAMPLES_SEED, "lengths": [list(x) for x in LENGTHS],
            "loss": {"example": loss, "token": token_loss, "hf_labels": hf_labels_loss, "example_fp64": loss64}}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=GOLDENS)
    args = p.parse_args()
    meta = {"format_version": GRAD_FORMAT_VERSION, "generated_by": "python tests/make_grad_goldens.py",
            "versions": ref.versions(), "models": {name: make(name, args.out) for name in MODELS}}
    (args.out / "grad_meta.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
