"""`python -m npvlm.finetune`: fine-tune PaliGemma on a JSONL file of examples and write a
checkpoint in the input's layout.

    python -m npvlm.finetune --model DIR|ORG/NAME --data train.jsonl --out DIR [options]

The command: its options, their checks, and what it prints. The work is done by the library:
the examples and batches (npvlm/training/data.py), the loop, state and --resume
(npvlm/training/loop.py), the gradients (npvlm/training/grads.py), LoRA
(npvlm/training/lora.py) and the export (npvlm/saving/checkpoint.py). The training state is
saved in --work (default OUT.work) every --save-every steps; --resume continues from it, at the
saved run's BLAS thread count, and ends where an uninterrupted run ends, --restart discards it,
and without either a saved state is refused, never overwritten. The model is written to --out
only at the end, atomically, and the state is then removed; every bad input is one `error:`
line naming the JSONL line or the step.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np

from . import cpu
from .api import check_model_dir, load
from .commands import ArgumentParser, add_run_options, run_main
from .errors import InputError
from .evaluation.run import check_examples
from .evaluation.score import task_of
from .inputs.examples import read_jsonl
from .model.loss import REDUCTIONS
from .saving.atomic import write_text_atomic
from .saving.checkpoint import SAVE_DTYPES, check_output, save_checkpoint
from .tasks.segmentation import load_vae
from .training.data import check_lengths
from .training.grads import TRAIN_SETS, trained_arrays, with_fp32_masters
from .training.loop import OPTIMIZERS, TrainConfig, check_keep_best, discard_state, state_meta, train
from .training.lora import PEFT_RECIPE, add_lora
from .training.optim import SCHEDULES

# the options that identify a run: a saved state made with others is not resumed
STATE_OPTIONS = ("model", "data", "train", "optimizer", "lr", "steps", "epochs", "batch_size", "grad_accum",
                 "schedule", "warmup_steps", "weight_decay", "momentum", "clip_norm", "loss_reduction", "seed",
                 "shuffle", "lora_rank", "lora_alpha", "lora_targets", "weights", "keep_best", "val")
DEFAULTS = TrainConfig()


def build_parser():
    d = DEFAULTS
    parser = ArgumentParser(prog="python -m npvlm.finetune",
                            description="Fine-tune PaliGemma on a JSONL file of (image, prefix, suffix) examples.")
    add = parser.add_argument
    add("--model", required=True, metavar="DIR|ORG/NAME", help="the model to start from ('demo' too)")
    add("--data", required=True, metavar="train.jsonl", help='one {"image", "prefix", "suffix"} per line')
    add("--out", required=True, metavar="DIR", help="the fine-tuned checkpoint, a new folder")
    add("--val", metavar="val.jsonl", help="validation examples: their loss every --eval-every steps")
    add("--train", choices=TRAIN_SETS, default=d.train,
        help="what is trained: all, decoder (all but the vision tower and projector), attention "
             "(the decoder's q/k/v/o projections), lora (adapters on --lora-targets)")
    add("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help="SGD or AdamW, with torch's semantics")
    add("--lr", type=float, default=d.lr, help="peak learning rate")
    add("--steps", type=int, default=d.steps, help="optimizer steps (0: use --epochs)")
    add("--epochs", type=int, default=d.epochs, help="passes over the data when --steps is 0")
    add("--batch-size", type=int, default=d.batch_size, help="examples per batch")
    add("--grad-accum", type=int, default=d.grad_accum, help="batches per optimizer step")
    add("--schedule", choices=SCHEDULES, default=d.schedule, help="the learning rate after the warm-up")
    add("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up (default: 10%% of the steps)")
    add("--weight-decay", type=float, default=d.weight_decay, help="SGD: L2 on the gradient; AdamW: decoupled")
    add("--momentum", type=float, default=d.momentum, help="SGD momentum")
    add("--beta1", type=float, default=d.beta1, help="AdamW")
    add("--beta2", type=float, default=d.beta2, help="AdamW")
    add("--eps", type=float, default=d.eps, help="AdamW")
    add("--clip-norm", type=float, default=d.clip_norm, help="global gradient-norm clipping; 0 = off")
    add("--loss-reduction", choices=REDUCTIONS, default=d.loss_reduction,
        help="example: each example's mean, then the batch's; token: the mean over every suffix token")
    add("--max-len", type=int, default=128, help="most text tokens of an example (image tokens aside)")
    add("--seed", type=int, default=d.seed, help="LoRA init and --shuffle")
    add("--shuffle", action="store_true", help="a seeded shuffle of the examples each epoch")
    add("--lora-rank", type=int, default=8, help="rank r of the LoRA adapters")
    add("--lora-alpha", type=float, default=8.0, help="LoRA scale alpha (the update is alpha / r B A)")
    add("--lora-targets", default=",".join(PEFT_RECIPE), help="module names, as PEFT names them")
    add("--weights", choices=("fp32", "bf16"), default="fp32",
        help="bf16: frozen weights kept in bfloat16 (trained ones fp32); numpy only")
    add("--save-dtype", choices=SAVE_DTYPES, default="same", help="same: as the input stored them")
    add("--eval-every", type=int, default=d.eval_every, help="validation every N steps (and at the end)")
    add("--no-val-metric", dest="val_metric", action="store_false",
        help="validation reports the loss only, without answering the --val prompts and scoring them with "
             "their task's metric (npvlm.evaluate's)")
    add("--keep-best", default=d.keep_best, metavar="val_loss|TASK.METRIC",
        help="export the weights of the best validation by this score (e.g. vqa.accuracy, caption.cider) "
             "instead of the last step's")
    add("--vae", metavar="vae-oid.npz", help="the VQ-VAE mask decoder, to score segment lines of --val")
    add("--demo-scores", type=int, default=d.demo_scores, metavar="SCENES",
        help="also score the demo world's tasks on this many held-out scenes at each validation")
    add("--save-every", type=int, default=d.save_every, help="training state every N steps; 0 = never")
    add("--work", metavar="DIR", help="where the training state goes (default: OUT.work)")
    add("--resume", action="store_true", help="continue from the state in --work")
    add("--restart", action="store_true", help="discard a state saved in --work and start over")
    add_run_options(parser, "BLAS threads on the CPU (default: all cores on a quiet machine, fewer on a busy "
                    "one, chosen at the start; --resume: the saved run's; NPVLM_THREADS=N too)")
    return parser


def parse_args(argv):
    return build_parser().parse_args(argv)


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
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be >= 1, got {args.threads}")
    cpu.from_environment()


def check_saved_state(work, args):
    """Before any work: a state saved in --work is continued (--resume) or discarded (--restart),
    never silently overwritten; a damaged one is named."""
    if args.resume and args.restart:
        raise InputError("--resume and --restart cannot be combined: --resume continues the state "
                         "saved in --work, --restart discards it")
    meta = state_meta(work)
    if meta is not None and not (args.resume or args.restart):
        raise InputError(f"{work}: holds the saved state of a run at step {meta['step']}; continue it "
                         "with --resume, or discard it and start over with --restart")
    return meta


def choose_threads(args, meta):
    """BLAS's threads for the run -> (count or None, a note or None): --threads, else
    NPVLM_THREADS, else (--resume) the count the saved run used, so the resumed run rounds as an
    uninterrupted one would (at most the cores this process may use); None: chosen from the
    machine's load when the model first computes (npvlm/cpu.py)."""
    n = args.threads or cpu.from_environment()
    if n is not None:
        return n, cpu.more_than_cores(n)
    saved = meta["blas_threads"] if args.resume and meta is not None else None
    if saved is None:
        return None, None
    cores = cpu.usable_cores()
    if saved > cores:
        return cores, (f"the saved run used {saved} BLAS threads, more than the {cores} core(s) this process may "
                       f"use; resuming at {cores}, so the result may differ from an uninterrupted run in the "
                       "last bits")
    return saved, None


def train_config(args):
    """The loop's settings from the command's options of the same names."""
    return TrainConfig(**{name: getattr(args, name) for name in TrainConfig.__dataclass_fields__})


def run(args, on_step=None):
    """The command after its options are parsed; on_step: as `training.loop.train`'s."""
    check_args(args)
    source = check_model_dir(args.model)
    out = Path(args.out)
    check_output(out, source)
    work = Path(args.work) if args.work else out.with_name(out.name + ".work")
    meta = check_saved_state(work, args)
    examples = read_jsonl(args.data)
    val = read_jsonl(args.val) if args.val else []
    vae = load_vae(args.vae) if args.vae else None
    val_tasks = [task_of(e) for e in val] if args.val_metric else []
    if "segment" in val_tasks and vae is None:
        raise InputError(f"{args.val}: has segment lines, whose metric needs the VQ-VAE mask decoder: pass --vae "
                         "vae-oid.npz, or --no-val-metric to report the validation loss only")
    check_keep_best(args.keep_best, bool(val), check_examples(val, vae=vae)[0] if val_tasks else [])
    n, note = choose_threads(args, meta) if args.backend == "numpy" else (None, None)
    if note:
        print(f"note: {note}", file=sys.stderr)
    with cpu.threads_fixed(n):              # an in-process run leaves the session's setting as it was
        return train_and_export(args, source, out, work, examples, val, on_step, vae)


def train_and_export(args, source, out, work, examples, val, on_step, vae=None):
    print(f"loading {args.model}", file=sys.stderr)
    model = load(source, backend=args.backend, weights=args.weights)
    check_lengths(examples + val, model.processor, model.cfg, args.max_len)
    if args.train == "lora":
        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
        model.params, names = add_lora(model.params, args.lora_rank, args.lora_alpha, targets, seed=args.seed)
        if not names:
            raise InputError(f"--lora-targets {args.lora_targets!r} names no linear layer of the model")
    params = model.params = with_fp32_masters(model.params, args.train)
    config = train_config(args)
    trained = sum(int(np.prod(a.shape)) for a in trained_arrays(params, args.train).values())
    n = model.settle_threads()               # chosen now, kept for the run (and saved with its state)
    blas = "" if n is None else f", {n} BLAS thread{'s' if n != 1 else ''}"
    print(f"{len(examples)} examples, {config.total_steps(len(examples))} steps of "
          f"{args.batch_size * args.grad_accum}, training {args.train} ({trained:,} parameters), "
          f"{args.optimizer} lr {args.lr}{blas}", file=sys.stderr)
    options = {k: str(getattr(args, k)) for k in STATE_OPTIONS}
    if args.restart:
        discard_state(work)
    log, finished = train(model, params, examples, val, config, work, resume=args.resume, options=options,
                          on_step=on_step, quiet=args.quiet, vae=vae)
    if not finished:
        print(f"stopped after step {log[-1]['step']}; state in {work} (--resume to continue)", file=sys.stderr)
        return 0
    save_checkpoint(params, source, out, args.save_dtype)
    record = {"options": vars(args), "log": log, "blas_threads": n}
    write_text_atomic(out / "npvlm_finetune.json", json.dumps(record, indent=1, default=str) + "\n")
    state = f"; removed its training state from {work}" if discard_state(work) else ""
    kept = [e for e in log if e.get("best")]
    weights = (f", the weights of step {kept[-1]['step']}, the best {args.keep_best}" if args.keep_best and kept
               else "")
    if args.keep_best and not kept:
        print(f"note: no validation reported {args.keep_best}; the last step's weights were written", file=sys.stderr)
    print(f"wrote {out} (final loss {log[-1]['loss']:.4f}{weights}){state}", file=sys.stderr)
    return 0


def main(argv=None):
    return run_main(run, parse_args(sys.argv[1:] if argv is None else argv),
                    interrupted="interrupted (the last saved state is in --work; --resume continues)")


if __name__ == "__main__":
    sys.exit(main())
