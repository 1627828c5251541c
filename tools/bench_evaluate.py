"""What an evaluation costs: seconds per example and peak memory of `python -m npvlm.evaluate`'s
work, npvlm against transformers' `generate` on the same inputs, each in its own process.

    python tools/bench_evaluate.py                         # demo command + 3B-224 npvlm / HF
    python tools/bench_evaluate.py --sizes demo

An evaluation is greedy generation in batches plus scoring. `demo`: the whole command on the
demo world's validation set (`python -m npvlm.demo.data`, 50 scenes, 522 lines: captions,
questions, detections), timed inside the process, with the share the scoring takes. `3b`: the
generation loop `evaluate` runs (`generate_ids`: image encode, prefill, decode) on tools/bench.py's
random-weight checkpoint with PaliGemma 1 3B-224's shapes (it has no tokenizer, so the prompts
are ids: 256 image tokens + a 12-token question, as a VQA line makes) for --examples examples in
batches of 1 and 8, --new-tokens tokens each (a short answer + <eos>; eos ignored), against
`PaliGemmaForConditionalGeneration.generate` (torch eager fp32, greedy, min_new_tokens =
max_new_tokens) on the same ids and pixels. Scoring is left out there: on the demo it is a few
percent of the time, and it does not grow with the model. Name the CPU and BLAS kernel with the numbers (printed first); measure on a
quiet machine.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from bench import BOS, IMAGE_TOKEN, NEWLINE, SIZES, TEXT_TOKENS, make_checkpoint, peak_rss_gb  # noqa: E402 (the tools folder on the path first)


def inputs(n, batch):
    """n examples of 3B-224 shape, in batches: (ids, mask, pixels) per batch."""
    s = SIZES["3b"]
    n_img = (s["image_size"] // s["patch_size"]) ** 2
    rng = np.random.default_rng(1)
    out = []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        ids = np.array([[IMAGE_TOKEN] * n_img + [BOS] + rng.integers(1000, 200000, TEXT_TOKENS - 2).tolist()
                        + [NEWLINE] for _ in range(b)], np.int64)
        out.append((ids, np.ones_like(ids), rng.uniform(-1, 1, (b, 3, 224, 224)).astype(np.float32)))
    return out


def worker_demo(args):
    import npvlm
    from npvlm.evaluation.run import evaluate
    from npvlm.inputs.examples import read_jsonl
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, "-m", "npvlm.demo.data", d, "--scenes", "1", "--val-scenes", "50"],
                       check=True, capture_output=True)
        examples = read_jsonl(Path(d) / "val.jsonl")
        model = npvlm.load("demo")
        evaluate(model, examples[:64], batch_size=args.batch, quiet=True)           # warm-up
        t0 = time.perf_counter()
        result = evaluate(model, examples, batch_size=args.batch, quiet=True)
        total = time.perf_counter() - t0
        from npvlm.evaluation import predict as p
        t1 = time.perf_counter()
        p.predict(model, examples, args.batch, 64, logprobs=True, quiet=True)
        generation = time.perf_counter() - t1
    return {"examples": len(examples), "total_s": total, "per_example_s": total / len(examples),
            "scoring_share": max(0.0, 1 - generation / total), "peak_rss_gb": peak_rss_gb(),
            "scores": {t: ts.metrics for t, ts in result.tasks.items()}}


def worker_npvlm(args):
    import npvlm
    from npvlm.generation.generate import generate_ids
    model = npvlm.load(args.model, weights=args.weights)
    batches = inputs(args.examples, args.batch)
    generate_ids(model, {"input_ids": batches[0][0][:1], "attention_mask": batches[0][1][:1],
                         "pixel_values": batches[0][2][:1]}, 2)                     # warm-up
    t0 = time.perf_counter()
    for ids, mask, pixels in batches:
        generate_ids(model, {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}, args.new_tokens)
    total = time.perf_counter() - t0
    return {"total_s": total, "per_example_s": total / args.examples, "peak_rss_gb": peak_rss_gb()}


def worker_hf(args):
    import torch
    from transformers import PaliGemmaForConditionalGeneration
    torch.set_num_threads(args.threads)
    model = PaliGemmaForConditionalGeneration.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    batches = inputs(args.examples, args.batch)
    with torch.no_grad():
        def run(ids, mask, pixels, n):
            t = torch.from_numpy
            model.generate(input_ids=t(ids), attention_mask=t(mask), token_type_ids=torch.zeros_like(t(ids)),
                           pixel_values=t(pixels), do_sample=False, max_new_tokens=n, min_new_tokens=n)
        run(batches[0][0][:1], batches[0][1][:1], batches[0][2][:1], 2)            # warm-up
        t0 = time.perf_counter()
        for ids, mask, pixels in batches:
            run(ids, mask, pixels, args.new_tokens)
        total = time.perf_counter() - t0
    return {"total_s": total, "per_example_s": total / args.examples, "peak_rss_gb": peak_rss_gb()}


def run_worker(kind, args, **over):
    argv = [sys.executable, __file__, "--worker", kind, "--model", args.model, "--examples", str(args.examples),
            "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
    for k, v in over.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["demo", "3b"], choices=["demo", "3b"])
    p.add_argument("--model", default=str(ROOT / "bench_cache" / "pg1-3b-224"))
    p.add_argument("--examples", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--weights", default="fp32")
    p.add_argument("--worker", choices=["demo", "npvlm", "hf"])
    args = p.parse_args()
    if args.worker:
        from threadpoolctl import threadpool_limits
        with threadpool_limits(args.threads):
            out = {"demo": worker_demo, "npvlm": worker_npvlm, "hf": worker_hf}[args.worker](args)
        print(json.dumps(out))
        return
    from bench_startup import machine_line
    print(f"{machine_line()}; {args.threads} threads in each worker\n")
    print("| model | implementation | batch | examples | new tokens | total | per example | peak RSS |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    if "demo" in args.sizes:
        for b in (64, 8):
            r = run_worker("demo", args, batch=b)
            print(f"| demo (validation set: captions, questions, detections) | npvlm evaluate | {b} | {r['examples']} "
                  f"| up to 64 | {r['total_s']:.1f} s | {1000 * r['per_example_s']:.1f} ms | {r['peak_rss_gb']:.2f} GB |"
                  f"  scoring {100 * r['scoring_share']:.1f}% of the time", flush=True)
    if "3b" in args.sizes:
        if not (Path(args.model) / "config.json").is_file():
            make_checkpoint("3b", Path(args.model).parent)
        for b in (1, args.batch):
            for kind, weights in (("npvlm", "fp32"), ("npvlm", "bf16"), ("hf", "fp32")):
                if weights == "bf16" and b != args.batch:
                    continue
                r = run_worker(kind, args, batch=b, weights=weights)
                name = "npvlm" + (", bf16 weights" if weights == "bf16" else " fp32") if kind == "npvlm" else \
                    "transformers generate, fp32"
                print(f"| 3B-224 (random weights, 268-token prompts) | {name} | {b} | {args.examples} | "
                      f"{args.new_tokens} | {r['total_s']:.1f} s | {r['per_example_s']:.2f} s | "
                      f"{r['peak_rss_gb']:.1f} GB |", flush=True)


if __name__ == "__main__":
    main()
