"""Fine-tuning from a JSONL file of examples to a checkpoint in the input's layout.

    python -m npvlm.finetune --model DIR|ORG/NAME --data train.jsonl --out DIR [options]

One JSONL line per example, paths relative to the JSONL file (big_vision's and transformers'
prefix/suffix naming):

    {"image": "images/0001.png", "prefix": "caption en", "suffix": "a red circle"}

Examples are taken in file order (or shuffled with --shuffle, seeded), in batches of
--batch-size; --grad-accum batches make one optimizer step. So with --batch-size equal to the
number of examples, --schedule constant --warmup-steps 0 --optimizer sgd, each step is exactly
one full-batch gradient step at --lr on the chosen loss. The defaults are big_vision's
fine-tuning notebook recipe: the decoder's attention projections, SGD at lr 0.03, cosine with
10% warm-up, batch 8 (docs/training.md lists the other official recipes).

The training state (the trained tensors, the optimizer, the step, the log) is saved in
--work (default OUT.work) every --save-every steps; --resume continues from it and ends where
an uninterrupted run ends. The model is written to --out only at the end, atomically
(npvlm/checkpoint.py); every bad input is one `error:` line naming the JSONL line or the step.
"""

import argparse
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .api import check_model_dir, load
from .backend import synchronize, to_host
from .cli import _Help, _Parser
from .demo.evaluate import eval_items, predict, score
from .errors import InputError, one_line
from .inputs.image import load_image
from .model.paligemma import forward_loss
from .saving.atomic import write_text_atomic
from .saving.checkpoint import SAVE_DTYPES, check_output, save_checkpoint
from .training.grads import TRAIN_SETS, check_finite, flatten, loss_and_grads, trained_arrays, with_fp32_masters
from .training.lora import PEFT_RECIPE, add_lora
from .training.optim import SCHEDULES, SGD, AdamW, clip_grad_norm, lr_at

OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class Example:
    line: int           # 1-based line in the JSONL file
    image: Path
    prefix: str
    suffix: str


def read_jsonl(path):
    """Every example of a JSONL file, checked: one-line InputErrors naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: data file not found")
    examples = []
    for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        where = f"{path} line {n}"
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(d, dict):
            raise InputError(f"{where}: an example must be a JSON object with image, prefix, suffix")
        for key in ("image", "prefix", "suffix"):
            if not isinstance(d.get(key), str):
                raise InputError(f"{where}: '{key}' is missing or not a string")
        if not d["suffix"].strip():
            raise InputError(f"{where}: 'suffix' is empty; an example needs an answer to learn")
        image = (path.parent / d["image"]).resolve()
        if not image.is_file():
            raise InputError(f"{where}: image {d['image']!r} not found (looked for {image})")
        try:
            with Image.open(image) as im:
                im.size  # noqa: B018 (the header is read: a file Pillow cannot open fails here)
        except Exception as e:  # noqa: BLE001 (Pillow raises several types; reported as one line)
            raise InputError(f"{where}: image {d['image']!r} cannot be read ({type(e).__name__})") from None
        examples.append(Example(n, image, d["prefix"], d["suffix"]))
    if not examples:
        raise InputError(f"{path}: no examples")
    return examples


def check_lengths(examples, processor, cfg, max_len, source):
    """Refuse an example whose text (<bos> prefix "\\n" suffix <eos>) exceeds max_len tokens or
    whose whole sequence exceeds the model's positions."""
    N, limit = cfg.num_image_tokens, cfg.text.max_position_embeddings
    for e in examples:
        n = len(processor.tokenizer.prompt_ids(e.prefix, N, e.suffix)[0])
        if n - N > max_len:
            raise InputError(f"{source} line {e.line}: the example is {n - N} text tokens, over --max-len "
                             f"{max_len}; shorten it or raise --max-len")
        if n > limit:
            raise InputError(f"{source} line {e.line}: {n} tokens ({N} image tokens) exceed the model's "
                             f"{limit} positions")


def make_batch(model, examples, source):
    images = []
    for e in examples:
        try:
            images.append(load_image(e.image))
        except InputError as err:
            raise InputError(f"{source} line {e.line}: {err}") from None
    return model.device_batch(model.processor(images, [e.prefix for e in examples], [e.suffix for e in examples]))


def batches_for_step(step, n_examples, args):
    """The example indices of each micro-batch of optimizer step `step` (epochs of the file
    order, or of a seeded shuffle per epoch)."""
    per_step = args.batch_size * args.grad_accum
    out = []
    for k in range(args.grad_accum):
        start = step * per_step + k * args.batch_size
        idx = range(start, start + args.batch_size)
        out.append([int(epoch_order(n_examples, i // n_examples, args.seed, args.shuffle)[i % n_examples])
                    for i in idx])
    return out


@functools.lru_cache(maxsize=2)
def epoch_order(n_examples, epoch, seed, shuffle):
    """The example order of one epoch (computed once per epoch, not once per step)."""
    return np.random.default_rng([seed, epoch]).permutation(n_examples) if shuffle else np.arange(n_examples)


def total_steps(args, n_examples):
    if args.steps:
        return args.steps
    return args.epochs * math.ceil(n_examples / (args.batch_size * args.grad_accum))


def make_optimizer(args):
    if args.optimizer == "sgd":
        return SGD(momentum=args.momentum, weight_decay=args.weight_decay)
    return AdamW(betas=(args.beta1, args.beta2), eps=args.eps, weight_decay=args.weight_decay)


def validation_loss(model, params, examples, args, source):
    losses, weights = [], []
    for start in range(0, len(examples), args.batch_size):
        chunk = examples[start:start + args.batch_size]
        losses.append(float(forward_loss(make_batch(model, chunk, source), params, model.cfg, args.loss_reduction)))
        weights.append(len(chunk))
    return float(np.average(losses, weights=weights))


def demo_scores(model, n_scenes):
    """The demo world's task scores on held-out scenes (npvlm.demo.evaluate), current weights."""
    scenes, items = eval_items(n_scenes)
    return {k: v["score"] for k, v in score(items, predict(model, scenes, items)).items()}


# ---- the training state -------------------------------------------------------------------------

STATE_OPTIONS = ("model", "data", "train", "optimizer", "lr", "steps", "epochs", "batch_size", "grad_accum",
                 "schedule", "warmup_steps", "weight_decay", "momentum", "clip_norm", "loss_reduction", "seed",
                 "shuffle", "lora_rank", "lora_alpha", "lora_targets", "weights")


def save_state(work, step, trained, optimizer, log, args):
    """The trained tensors, the optimizer state, the step and the log, atomically."""
    work.mkdir(parents=True, exist_ok=True)
    arrays = {f"param.{k}": to_host(v) for k, v in trained.items()}
    arrays.update({f"opt.{k}": to_host(v) if hasattr(v, "shape") else np.asarray(v)
                   for k, v in optimizer.state_dict().items()})
    tmp = work / f".state.{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, work / "state.npz")
    options = {k: str(getattr(args, k)) for k in STATE_OPTIONS}
    write_text_atomic(work / "state.json", json.dumps({"step": step, "options": options, "log": log}, indent=1))


def load_state(work, trained, optimizer, args, xp):
    """Restore a saved state into the trained arrays and the optimizer; -> (step, log)."""
    if not (work / "state.json").is_file():
        raise InputError(f"{work}: no saved training state to resume (state.json missing)")
    meta = json.loads((work / "state.json").read_text())
    changed = [k for k in STATE_OPTIONS if meta["options"].get(k) != str(getattr(args, k))]
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise InputError(f"{work}: the saved run used other options ({flags}); resume with the same "
                         "options or start a new --work")
    with np.load(work / "state.npz") as data:
        for k, v in trained.items():
            v[...] = xp.asarray(data[f"param.{k}"])
        state = {k[len("opt."):]: xp.asarray(data[k]) for k in data.files if k.startswith("opt.")}
    state["step"] = int(state["step"])
    optimizer.load_state_dict(state)
    return meta["step"], meta["log"]


# ---- the loop ---------------------------------------------------------------------------------------

def train(model, params, examples, val, args, work, out):
    trained = trained_arrays(params, args.train)
    optimizer = make_optimizer(args)
    steps = total_steps(args, len(examples))
    warmup = args.warmup_steps if args.warmup_steps is not None else round(0.1 * steps)
    start, log = (load_state(work, trained, optimizer, args, model.xp) if args.resume else (0, []))
    bar = tqdm(total=steps, initial=start, desc="fine-tuning", unit="step", file=sys.stderr,
               dynamic_ncols=True, disable=args.quiet)
    for step in range(start, steps):
        lr = lr_at(step, steps, args.lr, args.schedule, warmup)
        t0 = time.perf_counter()
        grads, loss, tokens = None, 0.0, 0
        for idx in batches_for_step(step, len(examples), args):
            batch = make_batch(model, [examples[i] for i in idx], args.data)
            micro_loss, g = loss_and_grads(batch, params, model.cfg, args.train, args.loss_reduction)
            try:
                check_finite(micro_loss, g)
            except InputError as e:
                raise InputError(f"step {step + 1}: {e}; lower --lr or set --clip-norm") from None
            loss += micro_loss / args.grad_accum
            tokens += int(batch["attention_mask"].sum())
            g = flatten(g)
            if grads is None:
                grads = {k: v / args.grad_accum for k, v in g.items()}
            else:
                for k, v in g.items():
                    grads[k] += v / args.grad_accum
        norm = clip_grad_norm(grads, args.clip_norm)
        optimizer.step(trained, grads, lr)
        synchronize(model.xp)
        seconds = time.perf_counter() - t0
        entry = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": norm, "tokens_per_s": tokens / seconds}
        if (step + 1) % args.eval_every == 0 or step + 1 == steps:
            if val:
                entry["val_loss"] = validation_loss(model, params, val, args, args.val)
            if args.demo_scores:
                entry["demo_scores"] = demo_scores(model, args.demo_scores)
        log.append(entry)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{entry['tokens_per_s']:.0f}",
                        **({"val": f"{entry['val_loss']:.4f}"} if "val_loss" in entry else {}))
        bar.update(1)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < steps:
            save_state(work, step + 1, trained, optimizer, log, args)
        if args.stop_after and step + 1 >= args.stop_after:          # for tests: an interrupted run
            save_state(work, step + 1, trained, optimizer, log, args)
            bar.close()
            return log, False
    bar.close()
    return log, True


def parse_args(argv):
    p = _Parser(prog="python -m npvlm.finetune", formatter_class=_Help,
                description="Fine-tune PaliGemma on a JSONL file of (image, prefix, suffix) examples.")
    p.add_argument("--model", required=True, metavar="DIR|ORG/NAME", help="the model to start from ('demo' too)")
    p.add_argument("--data", required=True, metavar="train.jsonl", help='one {"image", "prefix", "suffix"} per line')
    p.add_argument("--out", required=True, metavar="DIR", help="the fine-tuned checkpoint, a new folder")
    p.add_argument("--val", metavar="val.jsonl", help="validation examples: their loss every --eval-every steps")
    p.add_argument("--train", choices=TRAIN_SETS, default="attention",
                   help="what is trained: all, decoder (all but the vision tower and projector), attention "
                        "(the decoder's q/k/v/o projections), lora (adapters on --lora-targets)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    p.add_argument("--lr", type=float, default=0.03, help="peak learning rate")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (0: use --epochs)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the data when --steps is 0")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step")
    p.add_argument("--schedule", choices=SCHEDULES, default="cosine")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up (default: 10%% of the steps)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    p.add_argument("--beta1", type=float, default=0.9, help="AdamW")
    p.add_argument("--beta2", type=float, default=0.999, help="AdamW")
    p.add_argument("--eps", type=float, default=1e-8, help="AdamW")
    p.add_argument("--clip-norm", type=float, default=0.0, help="global gradient-norm clipping; 0 = off")
    p.add_argument("--loss-reduction", choices=("example", "token"), default="example")
    p.add_argument("--max-len", type=int, default=128, help="most text tokens of an example (image tokens aside)")
    p.add_argument("--seed", type=int, default=0, help="LoRA init and --shuffle")
    p.add_argument("--shuffle", action="store_true", help="a seeded shuffle of the examples each epoch")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=8.0)
    p.add_argument("--lora-targets", default=",".join(PEFT_RECIPE), help="module names, as PEFT names them")
    p.add_argument("--weights", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: frozen weights kept in bfloat16 (trained ones fp32); numpy only")
    p.add_argument("--save-dtype", choices=SAVE_DTYPES, default="same", help="same: as the input stored them")
    p.add_argument("--eval-every", type=int, default=50, help="validation every N steps (and at the end)")
    p.add_argument("--demo-scores", type=int, default=0, metavar="SCENES",
                   help="also score the demo world's tasks on this many held-out scenes at each validation")
    p.add_argument("--save-every", type=int, default=100, help="training state every N steps; 0 = never")
    p.add_argument("--work", metavar="DIR", help="where the training state goes (default: OUT.work)")
    p.add_argument("--resume", action="store_true", help="continue from the state in --work")
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--stop-after", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def check_args(args):
    for name, low in (("batch_size", 1), ("grad_accum", 1), ("max_len", 1), ("epochs", 1), ("lora_rank", 1),
                      ("eval_every", 1), ("steps", 0), ("save_every", 0)):
        if getattr(args, name) < low:
            raise InputError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if not args.lr > 0 or not math.isfinite(args.lr):
        raise InputError(f"--lr must be a positive number, got {args.lr}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        raise InputError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if args.clip_norm < 0:
        raise InputError(f"--clip-norm must be >= 0 (0 = off), got {args.clip_norm}")


def run(args):
    check_args(args)
    source = check_model_dir(args.model)
    out = Path(args.out)
    check_output(out, source)
    work = Path(args.work) if args.work else out.with_name(out.name + ".work")
    examples = read_jsonl(args.data)
    val = read_jsonl(args.val) if args.val else []
    print(f"loading {args.model}", file=sys.stderr)
    model = load(source, backend=args.backend, weights=args.weights)
    for data, rows in ((args.data, examples), (args.val, val)):
        check_lengths(rows, model.processor, model.cfg, args.max_len, data)
    if args.train == "lora":
        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
        names = add_lora(model.params, args.lora_rank, args.lora_alpha, targets, seed=args.seed)
        if not names:
            raise InputError(f"--lora-targets {args.lora_targets!r} names no linear layer of the model")
    params = model.params = with_fp32_masters(model.params, args.train)
    steps = total_steps(args, len(examples))
    print(f"{len(examples)} examples, {steps} steps of {args.batch_size * args.grad_accum}, training "
          f"{args.train} ({sum(int(np.prod(a.shape)) for a in trained_arrays(params, args.train).values()):,} "
          f"parameters), {args.optimizer} lr {args.lr}", file=sys.stderr)
    log, finished = train(model, params, examples, val, args, work, out)
    if not finished:
        print(f"stopped after step {log[-1]['step']}; state in {work} (--resume to continue)", file=sys.stderr)
        return 0
    save_checkpoint(params, source, out, args.save_dtype)
    write_text_atomic(out / "npvlm_finetune.json", json.dumps({"options": vars(args), "log": log}, indent=1,
                                                               default=str) + "\n")
    print(f"wrote {out} (final loss {log[-1]['loss']:.4f})", file=sys.stderr)
    return 0


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted (the last saved state is in --work; --resume continues)", file=sys.stderr)
        return 130
    except Exception as e:  # one line, unless --debug
        if args.debug:
            raise
        print(one_line(e), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
