"""Benchmark npvlm against HF transformers and against the machine's limits.

    python tools/bench.py                      # 3B-224 shapes + the mid-size model, CPU, writes docs/performance.md
    python tools/bench.py --sizes mid --repeats 2 --no-write
    python tools/bench.py --backend cupy --hf-device cuda    # on a GPU machine (tools/gpu_check.sh)

1. Makes, once, random-weight checkpoints in the official hub layout (BF16, sharded) under
   --cache (default bench_cache/): `pg1-3b-224` with the exact PaliGemma 1 3B-224 shapes, and
   `pg1-mid` (~0.5 B parameters). Weights are random: speed does not depend on their values.
2. Runs npvlm and transformers (torch, eager, fp32, same thread count) on the same checkpoint,
   image and prompt ids, each in its own process: load time, image encode, prefill, time to
   first token, decode tokens/s over a fixed number of new tokens (eos ignored), peak RSS.
3. Measures the machine in the same run: GEMM GFLOP/s on the model's matmul shapes, memory
   bandwidth from a large matrix-vector product, and the time to read + widen the checkpoint.
4. Prints a markdown table (medians over --repeats, after one warm-up run) with each npvlm figure as a ratio to HF
   and as a fraction of its bound, and writes it into docs/performance.md.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

SIZES = {
    # PaliGemma 1 3B-224: SigLIP So400m/14 + Gemma 2B (docs/spec.md §2.1)
    "3b": {"name": "pg1-3b-224", "image_size": 224, "patch_size": 14,
           "vision": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16),
           "text": dict(hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
                        num_key_value_heads=1, head_dim=256)},
    "mid": {"name": "pg1-mid", "image_size": 224, "patch_size": 14,
            "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
            "text": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=1, head_dim=128)},
}
VOCAB, IMAGE_TOKEN, BOS, NEWLINE = 257216, 257152, 2, 108
TEXT_TOKENS = 12   # <bos> + 10 prompt ids + "\n": 256 image + 12 text = 268 prompt tokens at 224 px


# ---- checkpoints ------------------------------------------------------------------------------

def config_dict(size):
    s = SIZES[size]
    t = dict(s["text"], model_type="gemma", vocab_size=VOCAB, max_position_embeddings=8192,
             hidden_activation="gelu_pytorch_tanh", num_image_tokens=(s["image_size"] // s["patch_size"]) ** 2)
    v = dict(s["vision"], model_type="siglip_vision_model", image_size=s["image_size"],
             patch_size=s["patch_size"], projection_dim=t["hidden_size"], vision_use_head=False,
             hidden_act="gelu_pytorch_tanh")
    return {"architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma",
            "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "image_token_index": IMAGE_TOKEN,
            "hidden_size": t["hidden_size"], "projection_dim": t["hidden_size"], "vocab_size": VOCAB,
            "text_config": t, "vision_config": v, "torch_dtype": "bfloat16"}


def make_checkpoint(size, cache, shard_bytes=2_000_000_000):
    """Random BF16 weights in the hub layout, written shard by shard (bounded memory)."""
    import ml_dtypes
    from safetensors.numpy import save_file

    from npvlm.config import config_from_dict
    from npvlm.loading.weights import expected_shapes
    folder = cache / SIZES[size]["name"]
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    d = config_dict(size)
    shapes = expected_shapes(config_from_dict(d))
    groups, current, current_bytes = [], [], 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        if current and current_bytes + nbytes > shard_bytes:
            groups.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += nbytes
    groups.append(current)
    rng = np.random.default_rng(0)
    weight_map = {}
    for k, names in enumerate(groups, start=1):
        shard = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for n in names:
            if "norm" in n and n.endswith("weight") and "language_model" in n:
                tensors[n] = np.zeros(shapes[n], np.float32)            # Gemma RMSNorm: 1 + 0
            elif "layer_norm" in n or "post_layernorm" in n:
                tensors[n] = np.ones(shapes[n], np.float32) if n.endswith("weight") else np.zeros(shapes[n], np.float32)
            else:
                fan_in = shapes[n][-1] if len(shapes[n]) == 2 else int(np.prod(shapes[n][1:]))
                tensors[n] = rng.standard_normal(shapes[n], dtype=np.float32) * np.float32(fan_in ** -0.5)
        save_file({n: t.astype(ml_dtypes.bfloat16) for n, t in tensors.items()}, str(folder / shard),
                  metadata={"format": "pt"})
        weight_map.update({n: shard for n in names})
        print(f"  wrote {shard}", file=sys.stderr, flush=True)
        del tensors
    total = 2 * sum(int(np.prod(s)) for s in shapes.values())
    (folder / "config.json").write_text(json.dumps(d, indent=2))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return folder


def bench_inputs(size):
    s = SIZES[size]
    n_img = (s["image_size"] // s["patch_size"]) ** 2
    rng = np.random.default_rng(1)
    ids = [IMAGE_TOKEN] * n_img + [BOS] + rng.integers(1000, 200000, TEXT_TOKENS - 2).tolist() + [NEWLINE]
    pixels = rng.uniform(-1, 1, (1, 3, s["image_size"], s["image_size"])).astype(np.float32)
    return np.array([ids], np.int64), np.ones((1, len(ids)), np.int64), pixels


# ---- workers (each in its own process) --------------------------------------------------------

def peak_rss_gb():
    """Peak resident memory of this process (VmHWM; ru_maxrss would include the parent's peak,
    since it survives exec)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) * 1024 / 1e9
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def worker_npvlm(args):
    import npvlm
    from npvlm.backend import synchronize
    t0 = time.perf_counter()
    model = npvlm.load(args.model, backend=args.backend, weights=args.weights)
    synchronize(model.xp)
    out = {"load_s": time.perf_counter() - t0, "weights_gb": tree_nbytes(model.params) / 1e9}
    ids, mask, pixels = bench_inputs(args.size)
    runs = []
    for _ in range(args.repeats + 1):          # the first run warms up and is dropped
        xp = model.xp
        t0 = time.perf_counter()
        image_tokens = model.encode_images(pixels)
        synchronize(xp)
        t1 = time.perf_counter()
        cache = model.new_cache(1, ids.shape[1] + args.new_tokens)
        logits = model.prefill(ids, mask, image_tokens=image_tokens, cache=cache)
        token = np.asarray(npvlm.backend.to_host(logits.argmax(-1)))
        t2 = time.perf_counter()
        for _ in range(args.new_tokens - 1):
            logits = model.decode_step(token, cache)
            token = np.asarray(npvlm.backend.to_host(logits.argmax(-1)))
        t3 = time.perf_counter()
        runs.append({"encode_s": t1 - t0, "prefill_s": t2 - t1, "ttft_s": t2 - t0,
                     "decode_tok_s": (args.new_tokens - 1) / (t3 - t2)})
    out.update(median_runs(runs[1:]))
    out["peak_rss_gb"] = peak_rss_gb()
    if args.backend == "cupy":           # the memory pool keeps every block it ever needed at once
        out["device_peak_gb"] = model.xp.get_default_memory_pool().total_bytes() / 1e9
    if args.weights == "fp32":
        out.update(pure_blas_times(model, ids.shape[1], args.repeats))
    return out


def tree_nbytes(tree):
    if isinstance(tree, dict):
        return sum(tree_nbytes(v) for v in tree.values())
    if isinstance(tree, list):
        return sum(tree_nbytes(v) for v in tree)
    return tree.nbytes


def pure_blas_times(model, T, repeats):
    """The machine's limit for exactly this model's work, measured in the same process on the
    loaded weights: every weight matrix once through BLAS and nothing else.
    - decode: a 1-row product with every decoder weight and the tied lm_head (a pure
      memory-bound pass over the bytes a decode step must read) -> the decode bound;
    - prefill: a T-row product with every decoder weight (in the final layer only K/V: the
      other final-layer weights need the last row alone, 1-row products), an N-row product with
      every vision weight, one lm_head row -> the GEMM bound for time to first token.
    Returns seconds and the implied bandwidth (GB/s) and GEMM rate (GFLOP/s)."""
    p, cfg = model.params, model.cfg
    layers = p["text"]["layers"]
    text = [w for layer in layers for blk in ("self_attn", "mlp")
            for w in (v["weight"] for v in layer[blk].values())]
    # what a prefill for one next token must multiply: every layer over all T rows, except the
    # final layer, whose output is needed at the last position only (its K/V still over T rows)
    final = layers[-1]
    text_t = [w for layer in layers[:-1] for blk in ("self_attn", "mlp")
              for w in (v["weight"] for v in layer[blk].values())]
    text_t += [final["self_attn"]["k_proj"]["weight"], final["self_attn"]["v_proj"]["weight"]]
    text_1 = [final["self_attn"][k]["weight"] for k in ("q_proj", "o_proj")] + [
        v["weight"] for v in final["mlp"].values()]
    vision = [w for layer in p["vision"]["layers"] for blk in ("self_attn", "mlp")
              for w in (v["weight"] for v in layer[blk].values())]
    vision += [p["vision"]["patch_embedding"]["weight"], p["projector"]["weight"]]
    emb = p["text"]["embed_tokens"]["weight"]
    rng, xp = np.random.default_rng(0), model.xp
    widest = max(w.shape[1] for w in text + vision)
    x1 = xp.asarray(rng.standard_normal((1, 1, widest), dtype=np.float32))   # [B, T, D] as in a decode step
    xt = xp.asarray(rng.standard_normal((T, widest), dtype=np.float32))
    xn = xp.asarray(rng.standard_normal((cfg.num_image_tokens, widest), dtype=np.float32))

    def decode_pass():
        for w in text:
            x1[..., :w.shape[1]] @ w.T
        x1[0, :, :emb.shape[1]] @ emb.T           # lm_head runs on [B, D]

    def prefill_pass():
        for w in text_t:
            xt[:, :w.shape[1]] @ w.T
        for w in text_1:
            x1[..., :w.shape[1]] @ w.T
        for w in vision:
            xn[:, :w.shape[1]] @ w.T
        x1[0, :, :emb.shape[1]] @ emb.T

    decode_s = median_time(decode_pass, repeats, xp)
    prefill_s = median_time(prefill_pass, repeats, xp)
    decode_bytes = sum(w.nbytes for w in text) + emb.nbytes
    flops = 2 * (T * sum(w.size for w in text_t) + sum(w.size for w in text_1)
                 + cfg.num_image_tokens * sum(w.size for w in vision) + emb.size)
    return {"pure_decode_pass_s": decode_s, "pure_prefill_gemm_s": prefill_s,
            "pure_bandwidth_gbs": decode_bytes / decode_s / 1e9, "pure_gemm_gflops": flops / prefill_s / 1e9}


def worker_hf(args):
    import torch
    from transformers import PaliGemmaForConditionalGeneration
    torch.set_num_threads(args.threads)
    device = args.hf_device
    sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    model = PaliGemmaForConditionalGeneration.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="eager").to(device).eval()
    sync()
    out = {"load_s": time.perf_counter() - t0}
    ids, mask, pixels = (torch.from_numpy(a).to(device) for a in bench_inputs(args.size))
    types = torch.zeros_like(ids)
    model.generation_config.eos_token_id = None
    runs = []
    with torch.inference_mode():
        for _ in range(args.repeats + 1):      # the first run warms up and is dropped
            t0 = time.perf_counter()
            feats = model.model.get_image_features(pixels).pooler_output
            sync()
            t1 = time.perf_counter()
            # prefill exactly as generate() runs it: whole prompt, cache on, logits for the last position
            outputs = model(input_ids=ids, attention_mask=mask, token_type_ids=types, pixel_values=pixels,
                            position_ids=mask.cumsum(-1), use_cache=True, logits_to_keep=1)
            outputs.logits[:, -1].argmax(-1)
            sync()
            t2 = time.perf_counter()
            gen_t0 = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=mask, token_type_ids=types, pixel_values=pixels,
                           do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=0)
            sync()
            gen = time.perf_counter() - gen_t0
            ttft = t2 - t1   # one forward with pixels: image encode + prefill + first token, as generate's step 1
            runs.append({"encode_s": t1 - t0, "prefill_s": ttft - (t1 - t0), "ttft_s": ttft,
                         "decode_tok_s": (args.new_tokens - 1) / max(1e-9, gen - ttft)})
            del feats, outputs
    out.update(median_runs(runs[1:]))
    out["peak_rss_gb"] = peak_rss_gb()
    if device == "cuda":
        out["device_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def median_runs(runs):
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


# ---- machine limits ---------------------------------------------------------------------------

def median_time(f, repeats, xp=np):
    """Median wall time of f() over `repeats` calls, after one warm-up call (device work
    synchronized before each clock read)."""
    from npvlm.backend import synchronize
    f()
    synchronize(xp)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        synchronize(xp)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine_limits(size, xp=np, repeats=5):
    """GEMM GFLOP/s on the model's prefill shapes; bandwidth GB/s of a 1 GiB fp32 matrix-vector
    (on the array library `xp`: the CPU for numpy, the GPU for cupy)."""
    s = SIZES[size]
    T, D, F = 256 + TEXT_TOKENS, s["text"]["hidden_size"], s["text"]["intermediate_size"]
    Dv, Fv = s["vision"]["hidden_size"], s["vision"]["intermediate_size"]
    shapes = [(T, D, F), (T, F, D), (T, D, D), (256, Dv, Fv), (256, Fv, Dv)]
    rng = np.random.default_rng(0)
    flops, secs = 0.0, 0.0
    for m, k, n in shapes:
        a = xp.asarray(rng.standard_normal((m, k), dtype=np.float32))
        b = xp.asarray(rng.standard_normal((k, n), dtype=np.float32))
        flops += 2 * m * k * n
        secs += median_time(lambda a=a, b=b: a @ b, repeats, xp)
    gemm = flops / secs / 1e9
    w = xp.asarray(rng.standard_normal((16384, 16384), dtype=np.float32))     # 1 GiB
    x = xp.asarray(rng.standard_normal(16384, dtype=np.float32))
    bandwidth = w.nbytes / median_time(lambda: w @ x, repeats, xp) / 1e9
    return {"gemm_gflops": gemm, "bandwidth_gbs": bandwidth}


def warm_page_cache(folder):
    """Read the checkpoint once so that npvlm, transformers and the floor all load from the OS
    page cache (otherwise whichever runs first pays the disk)."""
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass


def worker_limits(args):
    """machine_limits on the benchmark's backend, in its own process (a GPU context and its
    memory pool end with it)."""
    from npvlm.backend import get_backend
    return machine_limits(args.size, get_backend(args.backend))


def worker_floor(args):
    """The floor for `load`, in its own process like the loaders: read every checkpoint byte and
    widen BF16 -> fp32 into arrays that are kept, as any loader must keep them (so the OS has
    to hold the fp32 weights and the file cache at once, exactly as during a real load)."""
    from npvlm.loading.safetensors_file import SafetensorsFile
    t0 = time.perf_counter()
    kept = []
    for path in sorted(Path(args.model).glob("*.safetensors")):
        with SafetensorsFile(path) as f:
            kept.extend(f.read(k) for k in f.keys())
    return {"read_widen_s": time.perf_counter() - t0, "bytes": sum(a.nbytes for a in kept)}


def model_costs(size):
    """(decode bytes per token: decoder + lm_head weights in fp32, prefill FLOPs)."""
    s = SIZES[size]
    t, v = s["text"], s["vision"]
    D, F, L, Hq, Hk, E = (t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"],
                          t["num_attention_heads"], t["num_key_value_heads"], t["head_dim"])
    per_layer = D * Hq * E * 2 + D * Hk * E * 2 + 3 * D * F
    decoder_params = L * per_layer + VOCAB * D
    T = 256 + TEXT_TOKENS
    Dv, Fv, Lv, N = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"], 256
    vision_flops = Lv * (2 * N * (4 * Dv * Dv + 2 * Dv * Fv) + 4 * N * N * Dv) + 2 * N * 3 * 14 * 14 * Dv
    # the final layer: K/V over all T rows (the cache), queries, attention and MLP for the last row
    final_layer = 2 * T * D * Hk * E * 2 + 2 * (D * Hq * E * 2 + 3 * D * F) + 4 * T * Hq * E
    text_flops = ((L - 1) * (2 * T * per_layer + 4 * T * T * Hq * E) + final_layer
                  + 2 * N * Dv * D + 2 * D * VOCAB)
    return decoder_params * 4, vision_flops + text_flops


# ---- driver -----------------------------------------------------------------------------------

def run_worker(kind, size, folder, args):
    if kind != "limits":              # the limits worker reads no checkpoint
        warm_page_cache(folder)
    cmd = [sys.executable, __file__, "--worker", kind, "--size", size, "--model", str(folder),
           "--threads", str(args.threads), "--new-tokens", str(args.new_tokens),
           "--repeats", str(args.repeats), "--backend", args.backend, "--hf-device", args.hf_device,
           "--weights", getattr(args, "weights", "fp32")]
    return run_json_worker(kind, cmd, args.threads)


def run_json_worker(kind, cmd, threads):
    """Run a worker process with every BLAS pinned to `threads`; its last stdout line is JSON."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), NPVLM_THREADS=str(threads))   # npvlm: no choice from the load
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def machine_info(args):
    import importlib.metadata as md
    info = {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
            "python": platform.python_version(), "numpy": np.__version__}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        from threadpoolctl import threadpool_info
        blas = [p for p in threadpool_info() if p.get("user_api") == "blas"]
        info["blas"] = ", ".join(f"{p['internal_api']} {p.get('version')} ({p.get('architecture')}, "
                                 f"{p['num_threads']} threads)" for p in blas)
    except ImportError:
        info["blas"] = "threadpoolctl not installed"
    for pkg in ("torch", "transformers"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return info


def table(size, npv, hf, limits, read_widen, info):
    bytes_per_token, flops = model_costs(size)
    decode_bound = limits["bandwidth_gbs"] * 1e9 / bytes_per_token          # tok/s
    prefill_bound_s = flops / (limits["gemm_gflops"] * 1e9)
    prompt = 256 + TEXT_TOKENS
    rows = [
        ("load (s)", npv["load_s"], hf["load_s"], f"read+widen floor {read_widen:.2f} s: {npv['load_s'] / read_widen:.2f}x"),
        ("image encode (s)", npv["encode_s"], hf["encode_s"], ""),
        ("text prefill (s)", npv["prefill_s"], hf["prefill_s"], ""),
        ("prefill tokens/s (image encode included)", prompt / npv["ttft_s"], prompt / hf["ttft_s"], ""),
        ("time to first token (s)", npv["ttft_s"], hf["ttft_s"], f"GEMM bound {prefill_bound_s:.2f} s: at {prefill_bound_s / npv['ttft_s']:.0%} of the bound"),
        ("decode tokens/s", npv["decode_tok_s"], hf["decode_tok_s"], f"bandwidth bound {decode_bound:.2f} tok/s: at {npv['decode_tok_s'] / decode_bound:.0%} of the bound"),
        ("decode vs its own pure-BLAS pass", npv["decode_tok_s"], hf["decode_tok_s"],
         f"every decode weight once through BLAS gemv: {npv['pure_decode_pass_s']:.3f} s "
         f"({npv['pure_bandwidth_gbs']:.1f} GB/s); npvlm decode at {npv['pure_decode_pass_s'] * npv['decode_tok_s']:.0%} of it"),
        ("TTFT vs its own pure-BLAS pass", npv["ttft_s"], hf["ttft_s"],
         f"every prefill matmul through BLAS: {npv['pure_prefill_gemm_s']:.2f} s "
         f"({npv['pure_gemm_gflops']:.0f} GFLOP/s); npvlm TTFT at {npv['pure_prefill_gemm_s'] / npv['ttft_s']:.0%} of it"),
        ("peak RSS (GB)", npv["peak_rss_gb"], hf["peak_rss_gb"], f"fp32 weights {model_params_bytes(size) / 1e9:.2f} GB; npvlm - weights = {npv['peak_rss_gb'] - model_params_bytes(size) / 1e9:.2f} GB"),
    ]
    if "device_peak_gb" in npv and "device_peak_gb" in hf:
        rows.append(("GPU memory peak (GB)", npv["device_peak_gb"], hf["device_peak_gb"],
                     "CuPy memory pool size / torch.cuda.max_memory_allocated"))
    lines = [f"### {SIZES[size]['name']}", "",
             "| metric | npvlm | transformers | npvlm / HF | vs the machine |", "|---|---|---|---|---|"]
    for name, a, b, note in rows:
        lines.append(f"| {name} | {a:.3g} | {b:.3g} | {a / b:.2f} | {note} |")
    return "\n".join(lines)


def model_params_bytes(size):
    from npvlm.config import config_from_dict
    from npvlm.loading.weights import expected_shapes
    return 4 * sum(int(np.prod(s)) for s in expected_shapes(config_from_dict(config_dict(size))).values())


def weights_table(args, info):
    """fp32 vs bf16 weight storage, npvlm only, each in its own process."""
    lines = ["Machine: " + ", ".join(f"{k} {v}" for k, v in info.items())
             + f". {args.new_tokens} new tokens, medians of {args.repeats} runs.", ""]
    for size in args.sizes:
        folder = make_checkpoint(size, args.cache)
        runs = {}
        for mode in ("fp32", "bf16"):
            print(f"[{size}] npvlm weights {mode}", file=sys.stderr, flush=True)
            args.weights = mode
            runs[mode] = run_worker("npvlm", size, folder, args)
        f, b = runs["fp32"], runs["bf16"]
        lines += [f"### {SIZES[size]['name']}", "",
                  "| weights | parameters in memory | peak RSS | load | time to first token | decode |",
                  "|---|---|---|---|---|---|"]
        for mode, r in runs.items():
            lines.append(f"| {mode} | {r['weights_gb']:.2f} GB | {r['peak_rss_gb']:.2f} GB | {r['load_s']:.1f} s | "
                         f"{r['ttft_s']:.2f} s | {r['decode_tok_s']:.2f} tok/s |")
        lines += [f"| bf16 / fp32 | {b['weights_gb'] / f['weights_gb']:.2f}x | {b['peak_rss_gb'] / f['peak_rss_gb']:.2f}x | "
                  f"{b['load_s'] / f['load_s']:.2f}x | {b['ttft_s'] / f['ttft_s']:.2f}x | "
                  f"{b['decode_tok_s'] / f['decode_tok_s']:.2f}x |", ""]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["3b", "mid"], choices=sorted(SIZES))
    p.add_argument("--cache", type=Path, default=ROOT / "bench_cache")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", default="numpy")
    p.add_argument("--hf-device", default="cpu")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--weights", choices=["fp32", "bf16"], default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--weights-table", action="store_true",
                   help="only npvlm, fp32 vs bf16 weights (npvlm.load(..., weights='bf16')): memory "
                        "and speed; prints a table, writes nothing")
    p.add_argument("--worker", choices=["npvlm", "hf", "floor", "limits"])
    p.add_argument("--size", choices=sorted(SIZES))
    p.add_argument("--model")
    args = p.parse_args()
    if args.worker:
        out = {"npvlm": worker_npvlm, "hf": worker_hf, "floor": worker_floor, "limits": worker_limits}[args.worker](args)
        print(json.dumps(out))
        return
    info = machine_info(args)
    if args.weights_table:
        print(weights_table(args, info))
        return
    sections = []
    for size in args.sizes:
        print(f"[{size}] checkpoint", file=sys.stderr, flush=True)
        folder = make_checkpoint(size, args.cache)
        limits = run_worker("limits", size, folder, args)
        read_widen = run_worker("floor", size, folder, args)["read_widen_s"]
        print(f"[{size}] npvlm", file=sys.stderr, flush=True)
        npv = run_worker("npvlm", size, folder, args)
        print(f"[{size}] transformers", file=sys.stderr, flush=True)
        hf = run_worker("hf", size, folder, args)
        sections.append(table(size, npv, hf, limits, read_widen, info) + "\n\n"
                        + f"Machine: GEMM {limits['gemm_gflops']:.0f} GFLOP/s on the model's prefill matmul shapes, "
                          f"memory bandwidth {limits['bandwidth_gbs']:.1f} GB/s (1 GiB fp32 matrix-vector).\n"
                        + "Raw: " + json.dumps({"npvlm": npv, "transformers": hf, "limits": limits,
                                                "read_widen_s": read_widen}, default=float))
    header = ("Machine: " + ", ".join(f"{k} {v}" for k, v in info.items())
              + f". {args.new_tokens} new tokens (eos ignored), medians of {args.repeats} runs, "
                f"backend {args.backend}, HF device {args.hf_device}, fp32, eager attention.")
    report = header + "\n\n" + "\n\n".join(sections)
    print(report)
    if not args.no_write:
        doc = ROOT / "docs" / "performance.md"
        text = doc.read_text() if doc.is_file() else ""
        start, end = "<!-- bench:start -->", "<!-- bench:end -->"
        if start in text and end in text:
            text = text[:text.index(start) + len(start)] + "\n" + report + "\n" + text[text.index(end):]
        else:
            text += f"\n{start}\n{report}\n{end}\n"
        from npvlm.saving.atomic import write_text_atomic
        write_text_atomic(doc, text)


if __name__ == "__main__":
    main()
