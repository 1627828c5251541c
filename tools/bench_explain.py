"""What an explanation costs: time and peak memory of `PaliGemma.explain`'s computation, npvlm
against transformers + torch autograd doing the same work, each in its own process.

    python tools/bench_explain.py                       # demo, and 3B-224 fp32 / bf16 / HF fp32
    python tools/bench_explain.py --sizes demo --tokens 4

The work: one forward pass over prompt + answer (n answer tokens) keeping what the pixel
gradients need, the image attention and the logit lens, then one backward pass per answer token
to the pixels. npvlm: `explain_tokens` (every module frozen: no weight gradient, each module
keeps only what its input gradient needs). transformers: the same model in torch eager fp32
(`PaliGemmaForConditionalGeneration`, `pixel_values.requires_grad_()`, the attention weights
and every decoder layer's output kept, `torch.autograd.grad(log p_i, pixel_values,
retain_graph=True)` per token, the lens read from the layers' outputs), parameters frozen
(`requires_grad_(False)`).

Sizes: `demo` (the embedded demo model; its greedy answer to "detect circle ; square ;
triangle" on the sample scene, 20 tokens) and `3b` (tools/bench.py's random-weight checkpoint with
PaliGemma 1 3B-224's shapes, bench_cache/pg1-3b-224, made by `python tools/bench.py` if missing;
its 268-token prompt and --tokens random answer ids). Prints, per row: total seconds, seconds
per answer token, the resident memory after load and the peak (VmHWM), medians of --repeats
after a warm-up (3B: one run). Name the CPU and BLAS kernel with the numbers (printed first);
measure on a quiet machine.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from bench import bench_inputs, make_checkpoint, peak_rss_gb  # noqa: E402 (the tools folder on the path first)


def rss_gb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) * 1024 / 1e9


def answer_ids(n):
    return np.random.default_rng(3).integers(1000, 200000, n).tolist()


def worker_npvlm(args):
    import npvlm
    from npvlm.explain.attribute import explain_tokens
    if args.size == "demo":
        from npvlm.demo import SAMPLE_SCENE
        from npvlm.inputs.image import load_image
        model = npvlm.load("demo", weights=args.weights)
        prompt = "detect circle ; square ; triangle"
        inputs = model.processor([load_image(SAMPLE_SCENE)], [prompt])
        batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")}
        tokens = model.generate(SAMPLE_SCENE, prompt).tokens
    else:
        model = npvlm.load(args.model, weights=args.weights)
        ids, mask, pixels = bench_inputs("3b")
        batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
        tokens = answer_ids(args.tokens)
    loaded = rss_gb()
    batch = model.device_batch(batch)
    runs = []
    for _ in range(args.repeats + (args.size == "demo")):          # the demo: one warm-up run
        t0 = time.perf_counter()
        explain_tokens(batch, tokens, model.params, model.cfg)
        runs.append(time.perf_counter() - t0)
    runs = runs[1:] if args.size == "demo" else runs
    return {"total_s": float(np.median(runs)), "tokens": len(tokens), "rss_loaded_gb": loaded,
            "peak_rss_gb": peak_rss_gb()}


def worker_hf(args):
    import torch
    from transformers import PaliGemmaForConditionalGeneration
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    folder = str(ROOT / "npvlm" / "demo" / "model") if args.size == "demo" else args.model
    model = PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    model.requires_grad_(False)
    if args.size == "demo":
        import npvlm
        from npvlm.demo import SAMPLE_SCENE
        from npvlm.inputs.image import load_image
        ours = npvlm.load("demo")
        prompt = "detect circle ; square ; triangle"
        inputs = ours.processor([load_image(SAMPLE_SCENE)], [prompt])
        ids, pixels = inputs["input_ids"], inputs["pixel_values"]
        tokens = ours.generate(SAMPLE_SCENE, prompt).tokens
        del ours
    else:
        ids, _, pixels = bench_inputs("3b")
        tokens = answer_ids(args.tokens)
    loaded = rss_gb()
    T0, n = ids.shape[1], len(tokens)
    full = torch.as_tensor(np.concatenate([ids, [tokens]], axis=1))
    types = torch.as_tensor(np.concatenate([np.zeros_like(ids), np.ones((1, n), np.int64)], axis=1))
    mask = torch.ones_like(full)
    lm = model.model.language_model
    runs = []
    for _ in range(args.repeats + (args.size == "demo")):
        t0 = time.perf_counter()
        pix = torch.as_tensor(pixels).requires_grad_()
        out = model(input_ids=full, attention_mask=mask, token_type_ids=types, pixel_values=pix,
                    position_ids=mask.cumsum(-1), use_cache=False, output_attentions=True, output_hidden_states=True)
        positions = list(range(T0 - 1, T0 - 1 + n))
        logp = torch.log_softmax(out.logits[0, positions], dim=-1)[torch.arange(n), torch.as_tensor(tokens)]
        image = torch.as_tensor(np.concatenate([ids[0] == model.config.image_token_id, np.zeros(n, bool)]))
        [a[0][:, positions][..., image].detach() for a in out.attentions]              # the image attention
        with torch.no_grad():                                                           # the lens
            for h in out.hidden_states[:-1] + (None,):
                if h is not None:
                    torch.log_softmax(model.lm_head(lm.norm(h[0, positions])), dim=-1)
        for i in range(n):
            torch.autograd.grad(logp[i], pix, retain_graph=i < n - 1)
        runs.append(time.perf_counter() - t0)
        del out, logp
    runs = runs[1:] if args.size == "demo" else runs
    return {"total_s": float(np.median(runs)), "tokens": n, "rss_loaded_gb": loaded, "peak_rss_gb": peak_rss_gb()}


def run_worker(kind, size, weights, args):
    cmd = [sys.executable, __file__, "--worker", kind, "--size", size, "--weights", weights,
           "--tokens", str(args.tokens), "--repeats", str(args.repeats), "--model", str(args.model)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["demo", "3b"], choices=["demo", "3b"])
    p.add_argument("--tokens", type=int, default=8, help="answer tokens for 3B")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default=str(ROOT / "bench_cache" / "pg1-3b-224"))
    p.add_argument("--worker", choices=["npvlm", "hf"])
    p.add_argument("--size", choices=["demo", "3b"])
    p.add_argument("--weights", default="fp32", choices=["fp32", "bf16"])
    args = p.parse_args()
    if args.worker:
        print(json.dumps({"npvlm": worker_npvlm, "hf": worker_hf}[args.worker](args)))
        return
    from bench_startup import machine_line
    print(machine_line() + "\n")
    print("| model | implementation | answer tokens | total s | s per token | RSS after load GB | peak RSS GB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        if size == "3b":
            args.repeats = 1
            if not (Path(args.model) / "model.safetensors.index.json").is_file():
                make_checkpoint("3b", Path(args.model).parent)
        rows = [("npvlm fp32", "npvlm", "fp32"), ("npvlm bf16 weights", "npvlm", "bf16"),
                ("transformers + torch autograd, fp32", "hf", "fp32")]
        for label, kind, weights in rows:
            r = run_worker(kind, size, weights, args)
            if "error" in r:
                print(f"| {size} | {label} | | failed: {r['error']} | | | |", flush=True)
                continue
            print(f"| {size} | {label} | {r['tokens']} | {r['total_s']:.2f} | {r['total_s'] / r['tokens']:.3f} | "
                  f"{r['rss_loaded_gb']:.2f} | {r['peak_rss_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
