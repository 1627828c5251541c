"""`python -m npvlm.evaluate`: score a model on a JSONL file of examples with the metrics
PaliGemma is judged by.

    python -m npvlm.evaluate --model DIR|ORG/NAME --data test.jsonl [--task auto] [options]

The examples are the fine-tuning JSONL (`image`, `prefix`, `suffix`), with `answers`,
`references`, `box_yxyx` or `mask` where a task has more than one right answer or more than text
(npvlm/evaluation/score.py). Every line is checked before the model is loaded; the answers are
greedy, in batches; the summary is a table per task (or, with --json, one JSON object), and
--predictions writes each example's answer, ground truth and score, atomically. The metrics are
npvlm.metrics (docs/evaluation.md).
"""

import json
import sys
from pathlib import Path

from . import cpu
from .api import check_model_dir, check_weights_option, load
from .commands import ArgumentParser, add_run_options, run_main
from .config import load_config
from .errors import InputError
from .evaluation.predict import check_images
from .evaluation.run import check_examples, check_prompt_lengths, evaluate
from .evaluation.score import TASKS
from .inputs.examples import read_jsonl
from .inputs.processor import Processor
from .saving.atomic import check_outside, check_path_given, check_writable, write_text_atomic
from .tasks.segmentation import load_vae


def build_parser():
    parser = ArgumentParser(prog="python -m npvlm.evaluate",
                            description="Score a PaliGemma model on a JSONL file of (image, prefix, suffix) examples.")
    add = parser.add_argument
    add("--model", required=True, metavar="DIR|ORG/NAME", help="the model to score ('demo' too)")
    add("--data", required=True, metavar="test.jsonl", help='one {"image", "prefix", "suffix"} per line, '
        "plus answers / references / box_yxyx / mask where the task has them")
    add("--task", choices=("auto",) + TASKS, default="auto",
        help="the metric: auto chooses per line, from its 'task' key or else its prefix (caption, detect, "
             "segment, ocr -> anls, answer -> vqa, else exact)")
    add("--batch-size", type=int, default=8, help="prompts per generation batch")
    add("--max-new-tokens", type=int, default=64, metavar="N", help="the longest answer")
    add("--limit", type=int, metavar="N", help="read and score the first N examples only")
    add("--predictions", metavar="OUT.jsonl", help="also write each example's answer, ground truth and score")
    add("--json", action="store_true", help="print one JSON object (the scores) instead of the table")
    add("--loc-divisor", type=int, choices=[1024, 1023], default=1024,
        help="how <loc> bins map to pixels: 1024 (the public demo) or 1023 (big_vision)")
    add("--vae", metavar="vae-oid.npz", help="big_vision's VQ-VAE mask decoder (the segment task)")
    add("--weights", choices=("fp32", "bf16"), default="fp32", help="bf16: weights kept in bfloat16 (numpy only)")
    add_run_options(parser, "BLAS threads on the CPU (default: chosen from the machine's load; NPVLM_THREADS=N too)")
    return parser


def check_args(args):
    for name in ("batch_size", "max_new_tokens", "limit", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    check_weights_option(args.weights, args.backend)
    cpu.from_environment()


def input_files(examples):
    """The local files the examples read: their images and masks."""
    files = [e.image for e in examples if isinstance(e.image, Path)]
    return files + [Path(e.source).parent / e.fields["mask"] for e in examples if isinstance(e.fields.get("mask"), str)]


def summary_table(result, model_name, n):
    lines = [f"{model_name}: {n} example{'s' if n != 1 else ''}, {result.seconds:.1f} s", "",
             "| task | examples | metric | score |", "|---|---:|---|---:|"]
    for task, ts in result.tasks.items():
        for k, (name, value) in enumerate(ts.metrics.items()):
            shown = "n/a (no ground truth)" if value == -1.0 else f"{value:.4f}"
            lines.append(f"| {task if k == 0 else ''} | {len(ts.scores) if k == 0 else ''} | {name} | {shown} |")
    notes = [f"{task}: {ts.note}" for task, ts in result.tasks.items() if ts.note]
    return "\n".join(lines + ([""] + notes if notes else []))


def run(args):
    check_args(args)
    source = check_model_dir(args.model)
    if args.predictions is not None:
        check_path_given("--predictions", args.predictions)
        check_outside("--predictions", args.predictions, source)
        check_writable(args.predictions, inputs=[args.data, args.vae], example="predictions.jsonl")
    examples = read_jsonl(args.data, args.limit)
    if args.predictions is not None:        # nor any file the lines name (an image, a mask)
        check_writable(args.predictions, inputs=input_files(examples), example="predictions.jsonl")
    vae = load_vae(args.vae) if args.vae else None
    checked = check_examples(examples, args.task, args.loc_divisor, vae)     # every line, before the model
    check_images(examples)
    cfg = load_config(source)
    if (source / "tokenizer.model").is_file():
        check_prompt_lengths(examples, Processor.from_model_dir(source, cfg), cfg, args.max_new_tokens)
    with cpu.threads_fixed(args.threads or cpu.from_environment()):
        print(f"loading {args.model}", file=sys.stderr)
        model = load(source, backend=args.backend, weights=args.weights)
        result = evaluate(model, examples, args.task, args.batch_size, args.max_new_tokens, args.loc_divisor, vae,
                          quiet=args.quiet, checked=checked)
    scores = {task: {"examples": len(ts.scores), **ts.metrics} for task, ts in result.tasks.items()}
    if args.predictions:
        write_text_atomic(args.predictions, "".join(json.dumps(r) + "\n" for r in result.rows))
    if args.json:
        notes = {task: ts.note for task, ts in result.tasks.items() if ts.note}
        print(json.dumps({"model": args.model, "data": args.data, "task": args.task, "loc_divisor": args.loc_divisor,
                          "examples": len(examples), "seconds": round(result.seconds, 3), "scores": scores,
                          "notes": notes}))
    else:
        print(summary_table(result, args.model, len(examples)))
    if args.predictions:
        print(f"wrote {args.predictions}", file=sys.stderr)
    return 0


def main(argv=None):
    return run_main(run, build_parser().parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
