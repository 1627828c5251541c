"""Parity on a trained model: the demo evaluation through npvlm and through transformers.

    python tools/eval_demo_hf.py [--model npvlm/demo/model] [--scenes 300]

Both run greedy decoding on the same held-out items (npvlm.demo.evaluate.eval_items) with the same
inputs (npvlm's processor, whose ids equal HF's PaliGemmaProcessor: tests/test_tokenizer.py).
Prints both score tables and how many predictions are identical; exits 1 if any differ.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

import npvlm
from npvlm.demo.evaluate import eval_items, format_scores, predict, score

ROOT = Path(__file__).resolve().parent.parent


def hf_predict(hf, processor, scenes, items, batch_size=64, max_new_tokens=48):
    tok = processor.tokenizer
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        inputs = processor([scenes[it.scene].image for it in chunk], [it.prompt for it in chunk])
        with torch.no_grad():
            gen = hf.generate(**{k: torch.from_numpy(v) for k, v in inputs.items()},
                              do_sample=False, max_new_tokens=max_new_tokens)
        new = gen[:, inputs["input_ids"].shape[1]:].numpy()
        for row in new:
            ids = row.tolist()
            if tok.eos_id in ids:
                ids = ids[:ids.index(tok.eos_id) + 1]
            out.append(tok.decode(ids))
    return out


def main():
    from transformers import PaliGemmaForConditionalGeneration
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=str(ROOT / "npvlm" / "demo" / "model"))
    p.add_argument("--scenes", type=int, default=300)
    args = p.parse_args()
    torch.set_num_threads(2)
    scenes, items = eval_items(args.scenes)
    model = npvlm.load(args.model)
    t0 = time.perf_counter()
    ours = predict(model, scenes, items)
    t_ours = time.perf_counter() - t0
    hf = PaliGemmaForConditionalGeneration.from_pretrained(args.model, attn_implementation="eager",
                                                           dtype=torch.float32).eval()
    t0 = time.perf_counter()
    theirs = hf_predict(hf, model.processor, scenes, items)
    t_hf = time.perf_counter() - t0
    print(format_scores(score(items, ours), f"npvlm (numpy): {len(items)} prompts, {t_ours:.1f} s"))
    print()
    print(format_scores(score(items, theirs), f"transformers (torch, eager fp32): {len(items)} prompts, {t_hf:.1f} s"))
    same = sum(a == b for a, b in zip(ours, theirs))
    print(f"\nidentical predictions: {same} / {len(items)}")
    for it, a, b in zip(items, ours, theirs):
        if a != b:
            print(f"  scene {it.scene} {it.prompt!r}: npvlm {a!r} vs HF {b!r}")
    return 0 if same == len(items) else 1


if __name__ == "__main__":
    sys.exit(main())
