"""Benchmark one training step (forward + backward) of npvlm against PyTorch autograd.

    python tools/bench_train.py                    # mid (all trained), 3B-224 attention only, 3B-224 LoRA
    python tools/bench_train.py --cases 3b-lora     # needs `pip install peft` for the torch side
    python tools/bench_train.py --cases mid-all --repeats 2
    python tools/bench_train.py --backend cupy --hf-device cuda    # on a GPU machine

On the bench checkpoints of tools/bench.py (random weights, official hub layout, BF16): the
same batch (B examples of 256 image tokens + <bos> + a 10-token prefix + "\\n" + a 20-token
suffix + <eos>), the same trained parameters and the same thread count, each framework in its
own process: npvlm's `training.grads.loss_and_grads` against transformers' PaliGemma (eager, fp32,
`labels=` loss, `loss.backward()`, frozen parameters with requires_grad=False; PEFT's LoRA for
the LoRA case: r = 8, alpha = 8 on q/k/v/o/gate/up/down, which also matches SigLIP's q/k/v). Both use the
"token" reduction (HF's). Reports the median step time after one warm-up step and the peak RSS,
and npvlm with the frozen weights kept in bfloat16 (`weights="bf16"`, fp32 masters for the
trained ones). Prints a markdown table.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench import IMAGE_TOKEN, SIZES, machine_info, make_checkpoint, peak_rss_gb, run_json_worker, warm_page_cache

ROOT = Path(__file__).resolve().parent.parent
BOS, NEWLINE, EOS = 2, 108, 1
PREFIX, SUFFIX = 10, 20
CASES = {"mid-all": ("mid", "all"), "3b-attention": ("3b", "attention"), "3b-lora": ("3b", "lora")}
LORA = dict(rank=8, alpha=8)          # transformers' PaliGemma LoRA recipe: r = 8 on q/k/v/o/gate/up/down


def batch(size, B):
    """B training rows of the same length (no padding, so both frameworks run the same work)."""
    s = SIZES[size]
    n_img = (s["image_size"] // s["patch_size"]) ** 2
    rng = np.random.default_rng(2)
    rows, types = [], []
    for _ in range(B):
        prefix = [IMAGE_TOKEN] * n_img + [BOS] + rng.integers(1000, 200000, PREFIX).tolist() + [NEWLINE]
        suffix = rng.integers(1000, 200000, SUFFIX).tolist() + [EOS]
        rows.append(prefix + suffix)
        types.append([0] * len(prefix) + [1] * len(suffix))
    ids, types = np.array(rows), np.array(types)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": types,
            "labels": np.where(types == 1, ids, -100),
            "pixel_values": rng.uniform(-1, 1, (B, 3, s["image_size"], s["image_size"])).astype(np.float32)}


def worker_npvlm(args):
    import npvlm
    from npvlm.backend import synchronize
    from npvlm.training.grads import loss_and_grads, with_fp32_masters
    model = npvlm.load(args.model, backend=args.backend, weights=args.weights)
    if args.train == "lora":
        from npvlm.training.lora import add_lora
        model.params, _ = add_lora(model.params, **LORA)
    params = model.params = with_fp32_masters(model.params, args.train)   # no bf16 copy of the masters
    inputs = model.device_batch(batch(args.size, args.batch))
    times = []
    for _ in range(args.repeats + 1):
        t0 = time.perf_counter()
        loss, grads = loss_and_grads(inputs, params, model.cfg, args.train, "token")
        synchronize(model.xp)
        times.append(time.perf_counter() - t0)
        del grads
    out = {"step_s": statistics.median(times[1:]), "loss": float(loss), "peak_rss_gb": peak_rss_gb()}
    if args.backend == "cupy":
        out["device_peak_gb"] = model.xp.get_default_memory_pool().total_bytes() / 1e9
    return out


def worker_hf(args):
    import torch
    from transformers import PaliGemmaForConditionalGeneration
    torch.set_num_threads(args.threads)
    device = args.hf_device
    model = PaliGemmaForConditionalGeneration.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="eager").to(device).train()
    if args.train == "lora":                 # PEFT, as transformers' LoRA recipe uses it
        from peft import LoraConfig, get_peft_model

        from npvlm.training.lora import PEFT_RECIPE
        model = get_peft_model(model, LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                                 target_modules=list(PEFT_RECIPE)))
    else:
        from npvlm.loading.weights import canonical_name, tree_name
        from npvlm.training.grads import trainable
        wanted = trainable(args.train)                # the same parameters npvlm trains
        for name, p in model.named_parameters():
            p.requires_grad_(wanted(tree_name(canonical_name(name))))
    inputs = {k: torch.from_numpy(v).to(device) for k, v in batch(args.size, args.batch).items()}
    sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
    times = []
    for _ in range(args.repeats + 1):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        out = model(**inputs, position_ids=inputs["attention_mask"].cumsum(-1), use_cache=False)
        out.loss.backward()
        sync()
        times.append(time.perf_counter() - t0)
        loss = float(out.loss.detach())
        del out
    out = {"step_s": statistics.median(times[1:]), "loss": loss, "peak_rss_gb": peak_rss_gb()}
    if device == "cuda":
        out["device_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def run_worker(kind, case, folder, args, weights="fp32"):
    size, train = CASES[case]
    warm_page_cache(folder)
    cmd = [sys.executable, __file__, "--worker", kind, "--size", size, "--train", train, "--model", str(folder),
           "--threads", str(args.threads), "--repeats", str(args.repeats), "--batch", str(args.batch),
           "--backend", args.backend, "--hf-device", args.hf_device, "--weights", weights]
    return run_json_worker(kind, cmd, args.threads)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--cache", type=Path, default=ROOT / "bench_cache")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--backend", default="numpy")
    p.add_argument("--hf-device", default="cpu")
    p.add_argument("--no-bf16", action="store_true", help="skip the weights='bf16' npvlm run")
    p.add_argument("--worker", choices=["npvlm", "hf"])
    p.add_argument("--size", choices=sorted(SIZES))
    p.add_argument("--train")
    p.add_argument("--model")
    p.add_argument("--weights", default="fp32")
    args = p.parse_args()
    if args.worker:
        print(json.dumps({"npvlm": worker_npvlm, "hf": worker_hf}[args.worker](args)))
        return
    info = machine_info(args)
    lines = ["Machine: " + ", ".join(f"{k} {v}" for k, v in info.items())
             + f". Batch {args.batch} x (256 image + 12 prefix + 21 suffix tokens), 'token' loss, "
               f"median of {args.repeats} steps after a warm-up, backend {args.backend}, HF device {args.hf_device}.",
             "", "| case | npvlm step | torch step | npvlm / torch | npvlm peak RSS | torch peak RSS | "
                 "npvlm bf16-frozen step | bf16-frozen peak RSS | loss npvlm / torch |",
             "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for case in args.cases:
        size = CASES[case][0]
        folder = make_checkpoint(size, args.cache)
        print(f"[{case}] npvlm", file=sys.stderr, flush=True)
        ours = run_worker("npvlm", case, folder, args)
        print(f"[{case}] torch", file=sys.stderr, flush=True)
        torch_ = run_worker("hf", case, folder, args)
        low = None
        if not args.no_bf16 and args.backend == "numpy":
            print(f"[{case}] npvlm, bf16 frozen weights", file=sys.stderr, flush=True)
            low = run_worker("npvlm", case, folder, args, weights="bf16")
        lines.append(f"| {case} | {ours['step_s']:.2f} s | {torch_['step_s']:.2f} s | "
                     f"{ours['step_s'] / torch_['step_s']:.2f}x | {ours['peak_rss_gb']:.2f} GB | "
                     f"{torch_['peak_rss_gb']:.2f} GB | "
                     + (f"{low['step_s']:.2f} s | {low['peak_rss_gb']:.2f} GB | " if low else "- | - | ")
                     + f"{ours['loss']:.5f} / {torch_['loss']:.5f} |")
        print(lines[-1], file=sys.stderr, flush=True)
        if "device_peak_gb" in ours and "device_peak_gb" in torch_:
            notes.append(f"{case}: GPU memory peak npvlm {ours['device_peak_gb']:.2f} GB (CuPy pool), "
                         f"torch {torch_['device_peak_gb']:.2f} GB (max_memory_allocated)")
    print("\n".join(lines + ([""] + notes if notes else [])))


if __name__ == "__main__":
    main()
