"""Write the Hugging Face golden files used by the parity tests.

    python tests/make_goldens.py [--out tests/goldens]

For each tiny random PaliGemma model below this writes

    <out>/<name>/model/         the checkpoint (hub, 5.x or 4.52 key layout; see hf_reference)
    <out>/<name>/goldens.npz    inputs, per-stage activations, logits, greedy tokens
    <out>/meta.json             specs, seeds, layouts, package versions, sanity-check results

Needs torch + transformers (dev only). Deterministic: the same versions give the same arrays.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
import torch

import hf_reference as ref  # this folder (the script's own, so on sys.path)

FORMAT_VERSION = 1
MAX_NEW_TOKENS = 32
MIN_DISTINCT_TOKENS = 4  # per row of the 32 greedy tokens; a constant sequence makes a weak test
MIN_MARGIN = 1e-3  # smallest allowed top-1 minus top-2 logit over the greedy steps

# Spelled out (not ref.DEFAULT_INIT) so that the goldens only change when this file does.
INIT = {"weight_std": 0.2, "bias_std": 0.05, "norm_std": 0.1, "embed_std": 0.05}

GOLDENS = {
    # PaliGemma 1, multi-query attention (1 kv head), bf16 weights in the sharded hub layout.
    "pg1_mqa_hub": {
        "spec": {
            "vision": {
                "image_size": 28,
                "patch_size": 14,
                "hidden_size": 32,
                "intermediate_size": 48,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
            },
            "text": {
                "model_type": "gemma",
                "hidden_size": 64,
                "intermediate_size": 96,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 1,
                "head_dim": 16,
                "vocab_size": 320,
                "max_position_embeddings": 128,
            },
            "image_token_index": 300,
            "newline_id": 108,
            "init": INIT,
        },
        "seed": 0,
        "round_to_bf16": True,
        "layout": {"scheme": "hub", "dtype": "bf16", "n_shards": 2},
    },
    # PaliGemma 1, grouped-query attention (2 kv heads), f32 weights with 5.x names.
    "pg1_gqa_v5": {
        "spec": {
            "vision": {
                "image_size": 56,
                "patch_size": 14,
                "hidden_size": 48,
                "intermediate_size": 64,
                "num_hidden_layers": 3,
                "num_attention_heads": 4,
            },
            "text": {
                "model_type": "gemma",
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 3,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 16,
                "vocab_size": 320,
                "max_position_embeddings": 128,
            },
            "image_token_index": 300,
            "newline_id": 108,
            "init": INIT,
        },
        "seed": 1,
        "round_to_bf16": False,
        "layout": {"scheme": "v5", "dtype": "f32", "n_shards": 1},
    },
}


# PaliGemma 2 (Gemma 2 decoder): GQA, query_pre_attn_scalar != head_dim, >= 3 layers (sliding
# and full layers both occur), a sliding window smaller than the sequence, softcaps small enough
# for this init to push scores into tanh's curved part, and a 4-token causal suffix in the stage
# inputs so the window is exercised in prefill too (generation exercises it in decode).
GEMMA2_TEXT = {"model_type": "gemma2", "query_pre_attn_scalar": 12, "attn_logit_softcapping": 4.0,
               "final_logit_softcapping": 2.5, "sliding_window": 4}
GOLDENS["pg2_gqa_hub"] = {
    "spec": {
        "vision": {"image_size": 28, "patch_size": 14, "hidden_size": 32, "intermediate_size": 48,
                   "num_hidden_layers": 2, "num_attention_heads": 4},
        "text": {**GEMMA2_TEXT, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                 "vocab_size": 320, "max_position_embeddings": 128},
        "image_token_index": 300, "newline_id": 108, "n_suffix": 4, "init": {**INIT, "final_norm_gain": 3.0},
    },
    "seed": 4,
    "round_to_bf16": True,
    "layout": {"scheme": "hub", "dtype": "bf16", "n_shards": 2},
}
GOLDENS["pg2_gqa_v5"] = {
    "spec": {
        "vision": {"image_size": 42, "patch_size": 14, "hidden_size": 48, "intermediate_size": 64,
                   "num_hidden_layers": 2, "num_attention_heads": 4},
        "text": {**GEMMA2_TEXT, "sliding_window": 6, "hidden_size": 48, "intermediate_size": 96,
                 "num_hidden_layers": 4, "num_attention_heads": 6, "num_key_value_heads": 2,
                 "head_dim": 8, "query_pre_attn_scalar": 20, "vocab_size": 320,
                 "max_position_embeddings": 128},
        "image_token_index": 300, "newline_id": 108, "n_suffix": 4, "init": {**INIT, "final_norm_gain": 3.0},
    },
    "seed": 5,
    "round_to_bf16": False,
    "layout": {"scheme": "v5", "dtype": "f32", "n_shards": 1},
}


def generation_inputs(inputs: dict) -> dict:
    """The same prompts as plain inference inputs (every token prefix), as generate() sees them."""
    return {**inputs, "token_type_ids": np.zeros_like(inputs["token_type_ids"])}


def save_checkpoint(model, out_dir: str, layout: dict) -> None:
    """Write ``model`` to ``out_dir`` in the layout named by ``layout["scheme"]``."""
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    scheme = layout["scheme"]
    if scheme == "hub":
        ref.save_hub_layout(model, out_dir, dtype=layout["dtype"], n_shards=layout["n_shards"])
    elif scheme == "v5":
        ref.save_v5_layout(model, out_dir)
    elif scheme == "v452":
        ref.save_v452_layout(model, out_dir)
    else:
        raise ValueError(f"unknown layout scheme {scheme!r}")


def row_alone(inputs: dict, r: int) -> dict:
    """Row ``r`` as a batch of one, with its padding removed."""
    keep = inputs["attention_mask"][r] == 1
    out = {k: v[r : r + 1][:, keep] for k, v in inputs.items() if k != "pixel_values"}
    out["pixel_values"] = inputs["pixel_values"][r : r + 1]
    return out


def check_rows_alone(model, inputs: dict, stages: dict, batched: np.ndarray, gen_inputs: dict) -> tuple[dict, dict, list[str]]:
    """Run each row alone (no padding); compare its tokens and text stages with the batched run.

    Returns ({"greedy_tokens_row<r>": tokens}, {stage: max |diff|}, problems).
    """
    tokens, diffs, problems = {}, {}, []
    for r in range(inputs["input_ids"].shape[0]):
        single = row_alone(inputs, r)
        tokens[f"greedy_tokens_row{r}"] = ref.greedy_generate(
            model, **row_alone(gen_inputs, r), max_new_tokens=MAX_NEW_TOKENS)[0]
        if not np.array_equal(tokens[f"greedy_tokens_row{r}"], batched[r]):
            problems.append(f"row {r}: batched greedy tokens differ from the row run alone")
        keep = inputs["attention_mask"][r] == 1
        alone = ref.capture_stages(model, **single)
        for name, value in alone.items():
            batch_value = stages[name][r : r + 1]
            if name.startswith("text.") or name == "logits":
                batch_value = batch_value[:, keep]
            diff = float(np.max(np.abs(batch_value - value)))
            diffs[name] = max(diffs.get(name, 0.0), diff)
    return tokens, diffs, problems


def check_tokens(batched: np.ndarray, step_logits: np.ndarray, spec: dict) -> tuple[float, list[str]]:
    """Variety and margin checks on the batched greedy run; returns (min top-1/top-2 margin, problems)."""
    problems = []
    for r, row in enumerate(batched):
        if len(set(row.tolist())) < MIN_DISTINCT_TOKENS:
            problems.append(f"row {r}: only {len(set(row.tolist()))} distinct greedy tokens; raise the init scale")
        if spec["image_token_index"] in row:
            print(f"  note: row {r} generates the image token id {spec['image_token_index']}")
    top2 = np.sort(step_logits, axis=-1)[..., -2:]
    margin = float((top2[..., 1] - top2[..., 0]).min())
    if margin < MIN_MARGIN:
        problems.append(f"smallest greedy top-1/top-2 logit margin {margin:.2e} < {MIN_MARGIN}")
    return margin, problems


def check_stages(model, inputs: dict, stages: dict, step_logits: np.ndarray, spec: dict) -> tuple[dict, list[str]]:
    """Cross-checks that the hooks captured what their names say; returns ({check: max |diff|}, problems)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"].astype(bool)
    plain = stages if not spec.get("n_suffix") else ref.capture_stages(model, **generation_inputs(inputs))
    embed = model.model.language_model.embed_tokens.weight.detach().numpy()
    hidden = spec["text"]["hidden_size"]
    is_img = ids == spec["image_token_index"]
    text_pos = mask & ~is_img
    diffs = {
        # generate()'s prefill (its own positions) vs our forward with explicit positions
        "prefill_logits_vs_generate_step0": np.abs(plain["logits"][:, -1] - step_logits[:, 0]).max(),
        # image positions of the merged embeddings hold the projector output, unscaled
        "text_embed_image_vs_projector": np.abs(
            stages["text.embed"][is_img] - stages["projector"].reshape(-1, hidden)
        ).max(),
        # text positions hold embed_tokens * sqrt(hidden)
        "text_embed_tokens_vs_scaled_embedding": np.abs(
            stages["text.embed"][text_pos] - embed[ids[text_pos]] * np.float32(np.sqrt(hidden))
        ).max(),
        # tied lm_head
        "logits_vs_final_norm_at_embedding": np.abs(
            stages["logits"] - softcapped(stages["text.final_norm"] @ embed.T, spec)).max(),
    }
    diffs = {k: float(v) for k, v in diffs.items()}
    problems = [f"{k}: max |diff| {v:.3g}" for k, v in diffs.items() if v > 1e-4]
    return diffs, problems


def check_softcaps(model, inputs: dict, stages: dict, spec: dict) -> tuple[dict, list[str]]:
    """Gemma 2 only: the caps must change the outputs, or the goldens would not test them."""
    import copy

    t = spec["text"]
    if t.get("model_type") != "gemma2":
        return {}, []
    uncapped = copy.deepcopy(model)
    for layer in uncapped.model.language_model.layers:
        layer.self_attn.attn_logit_softcapping = None
    no_attn_cap = ref.capture_stages(uncapped, **inputs)
    keep = inputs["attention_mask"].astype(bool)
    effect = {
        "attn_softcap_effect_on_text.layer.00": float(np.abs(no_attn_cap["text.layer.00"] - stages["text.layer.00"])[keep].max()),
        "max_abs_logit_before_final_cap": float(np.abs(stages["text.final_norm"] @ uncapped.model.language_model.embed_tokens.weight.detach().numpy().T).max()),
        "final_cap": t["final_logit_softcapping"],
    }
    problems = []
    if effect["attn_softcap_effect_on_text.layer.00"] < 1e-2:
        problems.append(f"attention softcap barely changes layer 0 ({effect['attn_softcap_effect_on_text.layer.00']:.2e})")
    if effect["max_abs_logit_before_final_cap"] < t["final_logit_softcapping"]:
        problems.append("final logits never exceed the final softcap")
    return effect, problems


def softcapped(logits: np.ndarray, spec: dict) -> np.ndarray:
    cap = spec["text"].get("final_logit_softcapping")
    return logits if cap is None else cap * np.tanh(logits / cap)


def fp32_noise(model, inputs: dict, stages: dict) -> dict:
    """Max |HF fp32 - HF fp64| per stage on real tokens: the rounding noise floor of these goldens.

    An fp32 implementation cannot be expected to match HF more closely than this.
    """
    import copy

    exact = ref.capture_stages(copy.deepcopy(model).double(), **inputs)
    keep = inputs["attention_mask"].astype(bool)
    noise = {}
    for name, value in stages.items():
        a, b = (value[keep], exact[name][keep]) if name.startswith("text.") or name == "logits" else (value, exact[name])
        noise[name] = float(f"{float(np.abs(a - b).max()):.3g}")
    return noise


def check_reload(model, ckpt_dir: str) -> None:
    """HF itself must load the written checkpoint back to identical weights."""
    from transformers import PaliGemmaForConditionalGeneration

    loaded = PaliGemmaForConditionalGeneration.from_pretrained(
        ckpt_dir, dtype=torch.float32, attn_implementation="eager"
    )
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"weights changed on reload from {ckpt_dir}: {bad[:5]}"


def make_one(name: str, entry: dict, out_root: str) -> dict:
    """Build, check and write one golden set; returns its meta.json entry."""
    spec, seed = entry["spec"], entry["seed"]
    print(f"[{name}] building model")
    model = ref.build_tiny_model(spec, seed, round_to_bf16=entry["round_to_bf16"])
    inputs = ref.make_inputs(spec, seed)
    stages = ref.capture_stages(model, **inputs)
    gen_inputs = generation_inputs(inputs)
    batched, step_logits = ref.greedy_generate_with_logits(model, **gen_inputs, max_new_tokens=MAX_NEW_TOKENS)
    singles, diffs, problems = check_rows_alone(model, inputs, stages, batched, gen_inputs)
    margin, token_problems = check_tokens(batched, step_logits, spec)
    stage_diffs, stage_problems = check_stages(model, inputs, stages, step_logits, spec)
    cap_effect, cap_problems = check_softcaps(model, inputs, stages, spec)
    problems += token_problems + stage_problems + cap_problems
    if cap_effect:
        print(f"  softcap effect: {cap_effect}")
    print(f"  greedy row 0: {batched[0].tolist()}")
    print(f"  greedy row 1: {batched[1].tolist()}")
    print(f"  min greedy margin {margin:.3g}; max |batched - alone| {max(diffs.values()):.3g}")
    print(f"  stage cross-checks (max |diff|): {stage_diffs}")
    noise = fp32_noise(model, inputs, stages)
    print(f"  HF fp32 vs fp64 (max |diff|, real tokens): {noise}")
    if problems:
        raise SystemExit(f"[{name}] sanity checks failed:\n  " + "\n  ".join(problems))

    ckpt_dir = os.path.join(out_root, name, "model")
    save_checkpoint(model, ckpt_dir, entry["layout"])
    check_reload(model, ckpt_dir)
    arrays = {**inputs, **stages, "greedy_tokens": batched, **singles}
    np.savez_compressed(os.path.join(out_root, name, "goldens.npz"), **arrays)
    return {
        "spec": spec,
        "seed": seed,
        "round_to_bf16": entry["round_to_bf16"],
        "layout": entry["layout"],
        "max_new_tokens": MAX_NEW_TOKENS,
        "checks": {
            "batched_equals_alone_tokens": True,
            "max_abs_diff_batched_vs_alone": {k: float(f"{v:.3g}") for k, v in sorted(diffs.items())},
            "min_greedy_margin": float(f"{margin:.3g}"),
            "stage_cross_checks_max_abs_diff": {k: float(f"{v:.3g}") for k, v in stage_diffs.items()},
            "softcap_effect": cap_effect,
            "hf_fp32_vs_fp64_max_abs_diff": noise,
            "max_abs_value": {k: float(f"{float(np.abs(v).max()):.3g}") for k, v in stages.items()},
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="tests/goldens", help="output folder (default: tests/goldens)")
    parser.add_argument("--only", nargs="*", choices=sorted(GOLDENS), help="build only these sets")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # one reduction order, so reruns give identical arrays
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)
    meta_path = os.path.join(args.out, "meta.json")
    models = {}
    if args.only and os.path.exists(meta_path):
        with open(meta_path) as f:
            models = json.load(f).get("models", {})
    for name in args.only or GOLDENS:
        models[name] = make_one(name, GOLDENS[name], args.out)
    meta = {
        "format_version": FORMAT_VERSION,
        "generated_by": "python tests/make_goldens.py",
        "versions": ref.versions(),
        "models": {k: models[k] for k in sorted(models)},
    }
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(f"wrote {meta_path}")


if __name__ == "__main__":
    main()
