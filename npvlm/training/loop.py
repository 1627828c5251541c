"""The fine-tuning loop: optimizer steps over a list of examples, with gradient accumulation,
validation, and a training state saved to resume from (what `python -m npvlm.finetune` runs).

    config = TrainConfig(train="attention", optimizer="sgd", lr=0.03, steps=64)
    log, finished = train(model, params, examples, val, config, work=Path("out.work"))

With batch_size equal to the number of examples, schedule "constant", warmup_steps 0 and SGD,
each step is exactly one full-batch gradient step at `lr` on the chosen loss. The defaults are
big_vision's fine-tuning notebook recipe: the decoder's attention projections, SGD at lr 0.03,
cosine with 10% warm-up, batch 8 (docs/training.md lists the other official recipes).

The state (the trained tensors, the optimizer, the step, the log) is saved in `work` every
`save_every` steps; resuming from it ends where an uninterrupted run ends.
"""

import json
import os
import sys
import time
import zipfile
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from .. import cpu
from ..backend import array_module, synchronize, to_host
from ..demo.evaluate import eval_items, predict, score
from ..errors import InputError
from ..evaluation.run import check_examples, evaluate
from ..evaluation.score import METRICS
from ..model.paligemma import forward_loss
from ..saving.atomic import write_text_atomic
from ..tree import flatten
from .data import make_batch, step_batches, total_steps
from .grads import check_finite, loss_and_grads, trained_arrays
from .optim import SGD, AdamW, clip_grad_norm, lr_at

OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class TrainConfig:
    """The loop's settings; the fine-tuning command's options of the same names take their
    defaults from here (`python -m npvlm.finetune --help`)."""
    train: str = "attention"          # a training set of npvlm/training/grads.py
    optimizer: str = "sgd"            # "sgd" or "adamw"
    lr: float = 0.03                  # peak learning rate
    steps: int = 0                    # optimizer steps (0: `epochs` passes over the examples)
    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 1               # batches per optimizer step
    schedule: str = "cosine"          # "constant" or "cosine", after a linear warm-up
    warmup_steps: int | None = None   # None: 10% of the steps
    weight_decay: float = 0.0
    momentum: float = 0.0             # SGD
    beta1: float = 0.9                # AdamW
    beta2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 0.0            # global gradient-norm clipping; 0 = off
    loss_reduction: str = "example"   # "example" or "token" (npvlm/model/loss.py)
    seed: int = 0                     # the shuffle (the command seeds the LoRA initialisation with it too)
    shuffle: bool = False             # a seeded shuffle of the examples each epoch
    eval_every: int = 50              # validation every N steps (and at the end)
    val_metric: bool = True           # also score the validation answers with their task's metric
    keep_best: str = ""               # "", "val_loss" or "TASK.METRIC": export the best validation's weights
    demo_scores: int = 0              # also score the demo world's tasks on this many scenes
    save_every: int = 100             # the training state every N steps; 0 = never

    def total_steps(self, n_examples):
        return total_steps(self.steps, self.epochs, n_examples, self.batch_size * self.grad_accum)


def make_optimizer(config):
    if config.optimizer == "sgd":
        return SGD(momentum=config.momentum, weight_decay=config.weight_decay)
    return AdamW(betas=(config.beta1, config.beta2), eps=config.eps, weight_decay=config.weight_decay)


def accumulate_grads(model, params, examples, micro_batches, config, step):
    """Optimizer step `step`'s loss and gradients: the mean over its micro-batches (lists of
    example indices) of each one's loss and gradients, so `grad_accum` batches of b equal one
    batch of grad_accum * b under the "example" reduction. A loss or gradient that is not
    finite is refused, naming the step. -> (loss, {name: gradient}, real tokens)"""
    n = len(micro_batches)
    loss, grads, tokens = 0.0, {}, 0
    for idx in micro_batches:
        batch = make_batch(model, [examples[i] for i in idx])
        micro_loss, g = loss_and_grads(batch, params, model.cfg, config.train, config.loss_reduction)
        try:
            check_finite(micro_loss, g)
        except InputError as e:
            raise InputError(f"step {step + 1}: {e}; lower --lr or set --clip-norm") from None
        loss += micro_loss / n
        tokens += int(batch["attention_mask"].sum())
        for name, v in flatten(g).items():
            if name in grads:
                grads[name] += v / n
            else:
                grads[name] = v / n
    return loss, grads, tokens


def validation_loss(model, params, examples, config):
    """The mean loss over the validation examples (batches of batch_size, weighted by size)."""
    losses, weights = [], []
    for start in range(0, len(examples), config.batch_size):
        chunk = examples[start:start + config.batch_size]
        losses.append(float(forward_loss(make_batch(model, chunk), params, model.cfg, config.loss_reduction)))
        weights.append(len(chunk))
    return float(np.average(losses, weights=weights))


def answer_budget(model, examples):
    """Tokens a validation answer may take: the longest suffix (+ <eos>) and a margin of 8."""
    return max(len(model.processor.tokenizer.encode(e.suffix)) for e in examples) + 9


def check_keep_best(name, has_val, val_tasks):
    """--keep-best names "val_loss" or a metric of a task the validation lines have (val_tasks:
    their tasks, empty when the metric is off)."""
    if not name:
        return
    if not has_val:
        raise InputError("--keep-best needs validation examples (--val)")
    choices = ["val_loss"] + [f"{t}.{m}" for t in dict.fromkeys(val_tasks) for m in METRICS[t]]
    if name not in choices:
        raise InputError(f"--keep-best {name!r} is not a validation score of this run; choose one of "
                         f"{', '.join(choices)}")


def best_value(entry, name):
    """The --keep-best score of a log entry (None if it has none), larger is better."""
    if name == "val_loss":
        return -entry["val_loss"] if "val_loss" in entry else None
    task, metric = name.split(".", 1)
    return entry.get("val_metrics", {}).get(task, {}).get(metric)


def demo_scores(model, n_scenes):
    """The demo world's task scores on held-out scenes (npvlm.demo.evaluate), current weights."""
    scenes, items = eval_items(n_scenes)
    return {k: v["score"] for k, v in score(items, predict(model, scenes, items)).items()}


# ---- the training state ---------------------------------------------------------------------------

def save_state(work, step, trained, optimizer, log, options, best=None):
    """The trained tensors, the optimizer state, the step, the log, the run's options (to
    refuse a resume with other ones), the best validation's tensors (--keep-best) and, on the
    CPU, BLAS's thread count, atomically."""
    work.mkdir(parents=True, exist_ok=True)
    arrays = {f"param.{k}": to_host(v) for k, v in trained.items()}
    arrays.update({f"best.{k}": v for k, v in (best or {}).items()})
    arrays.update({f"opt.{k}": to_host(v) if hasattr(v, "shape") else np.asarray(v)
                   for k, v in optimizer.state_dict().items()})
    tmp = work / f".state.{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, work / "state.npz")
    meta = {"step": step, "options": options, "log": log}
    if array_module(next(iter(trained.values()))) is np:
        meta["blas_threads"] = cpu.blas_threads()     # a resume uses the same: the same rounding
    write_text_atomic(work / "state.json", json.dumps(meta, indent=1))


STATE_FILES = ("state.json", "state.npz")
RESTART = "start over with --restart (it discards the saved state)"


def state_meta(work):
    """The saved state's step, options and log (state.json), or None when `work` holds no state.
    A state that cannot be read is one InputError naming the file and what to do."""
    path = work / "state.json"
    if not path.is_file():
        if (work / "state.npz").is_file():
            raise InputError(f"{path}: missing beside {work / 'state.npz'}: the saved training state is "
                             f"incomplete; {RESTART}")
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        meta = {"step": int(meta["step"]), "options": dict(meta["options"]), "log": list(meta["log"]),
                "blas_threads": None if meta.get("blas_threads") is None else int(meta["blas_threads"])}
        if meta["blas_threads"] is not None and meta["blas_threads"] < 1:
            raise ValueError("blas_threads")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path}: the saved training state is damaged ({type(e).__name__}); {RESTART}") from None
    return meta


def load_state(work, trained, optimizer, options, xp):
    """Restore a saved state into the trained arrays and the optimizer; -> (step, log, the best
    validation's tensors on the host or None). A state
    saved with other `options` is refused, naming them as the command's flags; a damaged or
    incomplete one is one InputError naming the file."""
    meta = state_meta(work)
    if meta is None:
        raise InputError(f"{work}: no saved training state to resume (state.json missing)")
    # an option the saved state does not record (it predates the option) is not compared
    changed = [k for k in options if k in meta["options"] and meta["options"][k] != options[k]]
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise InputError(f"{work}: the saved run used other options ({flags}); resume with the same "
                         "options or start a new --work")
    path = work / "state.npz"
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
        for k, v in trained.items():
            v[...] = xp.asarray(arrays[f"param.{k}"])
        state = {k[len("opt."):]: xp.asarray(v) for k, v in arrays.items() if k.startswith("opt.")}
        best = {k[len("best."):]: v for k, v in arrays.items() if k.startswith("best.")} or None
        state["step"] = int(state["step"])
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        why = "missing" if not path.is_file() else f"damaged or incomplete ({type(e).__name__})"
        raise InputError(f"{path}: the saved training state is {why}; {RESTART}") from None
    optimizer.load_state_dict(state)
    return meta["step"], meta["log"], best


def discard_state(work):
    """Remove the state files from `work` (and the folder, if nothing else is in it); -> whether
    there was a state."""
    found = False
    for name in STATE_FILES:
        if (work / name).is_file():
            (work / name).unlink()
            found = True
    if work.is_dir() and not any(work.iterdir()):
        work.rmdir()
    return found


# ---- the loop ---------------------------------------------------------------------------------------

def train(model, params, examples, val, config, work, *, resume=False, options=None, on_step=None,
          quiet=False, vae=None):
    """Train `params` (the model's tree, trained tensors as fp32 masters) in place for
    config.total_steps(len(examples)) optimizer steps. val: validation examples (may be empty).
    work: the folder of the training state; resume: continue from it; options: the run's
    settings as strings, saved with the state and compared on resume. on_step(entry) -> True
    stops after that step (not the last), its state saved, as an interrupted run leaves it.
    quiet: no progress bar. Each validation logs `val_loss` and (config.val_metric) each task's
    metrics, `val_metrics` (npvlm/evaluation; vae: the mask decoder, for segment lines), and
    prints them; with config.keep_best the trained tensors end as they were at the best
    validation by that score. -> (log: one dict per step, finished: False when on_step stopped it)"""
    options = options or {}
    trained = trained_arrays(params, config.train)
    optimizer = make_optimizer(config)
    steps = config.total_steps(len(examples))
    warmup = config.warmup_steps if config.warmup_steps is not None else round(0.1 * steps)
    start, log, best = load_state(work, trained, optimizer, options, model.xp) if resume else (0, [], None)
    checked = check_examples(val, vae=vae) if val and config.val_metric else None
    budget = answer_budget(model, val) if checked else 0
    bar = tqdm(total=steps, initial=start, desc="fine-tuning", unit="step", file=sys.stderr,
               dynamic_ncols=True, disable=quiet)
    try:                              # the bar ends its line however the loop ends (Ctrl-C too)
        for step in range(start, steps):
            lr = lr_at(step, steps, config.lr, config.schedule, warmup)
            t0 = time.perf_counter()
            micro = step_batches(step, len(examples), config.batch_size, config.grad_accum, config.seed,
                                 config.shuffle)
            loss, grads, tokens = accumulate_grads(model, params, examples, micro, config, step)
            norm = clip_grad_norm(grads, config.clip_norm)
            optimizer.step(trained, grads, lr)
            synchronize(model.xp)
            entry = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": norm,
                     "tokens_per_s": tokens / (time.perf_counter() - t0)}
            if (step + 1) % config.eval_every == 0 or step + 1 == steps:
                if val:
                    entry["val_loss"] = validation_loss(model, params, val, config)
                if checked:
                    result = evaluate(model, val, batch_size=config.batch_size, max_new_tokens=budget, vae=vae,
                                      quiet=True, checked=checked)
                    entry["val_metrics"] = {t: ts.metrics for t, ts in result.tasks.items()}
                if config.demo_scores:
                    entry["demo_scores"] = demo_scores(model, config.demo_scores)
                if val:
                    value = best_value(entry, config.keep_best) if config.keep_best else None
                    previous = max((best_value(e, config.keep_best) for e in log if e.get("best")), default=None)
                    if value is not None and (previous is None or value > previous):
                        entry["best"] = True
                        best = {k: to_host(v).copy() for k, v in trained.items()}
                    tqdm.write(validation_line(entry), file=sys.stderr)
            log.append(entry)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{entry['tokens_per_s']:.0f}",
                            **({"val": f"{entry['val_loss']:.4f}"} if "val_loss" in entry else {}))
            bar.update(1)
            stop = on_step is not None and bool(on_step(entry)) and step + 1 < steps
            if stop or (config.save_every and (step + 1) % config.save_every == 0 and step + 1 < steps):
                save_state(work, step + 1, trained, optimizer, log, options, best)
            if stop:
                return log, False
    finally:
        bar.close()
    if config.keep_best and best is not None:
        for k, v in trained.items():
            v[...] = model.xp.asarray(best[k])
    return log, True


def validation_line(entry):
    """One line per validation: `step 50: val loss 0.1234 · vqa accuracy 0.9846 · detect map 0.5140`."""
    parts = [f"step {entry['step']}: val loss {entry['val_loss']:.4f}"]
    for task, metrics in entry.get("val_metrics", {}).items():
        parts.append(f"{task} " + ", ".join(f"{m} {v:.4f}" for m, v in metrics.items()))
    return " · ".join(parts) + (" (best)" if entry.get("best") else "")
