"""Evaluate a model on held-out scenes of the demo world (npvlm only, no torch).

    python -m npvlm.demo.evaluate                 # the embedded demo model, 300 scenes
    python -m npvlm.demo.evaluate --model DIR --scenes 300 --json scores.json

Scenes come from numpy.random.default_rng([EVAL_SEED, i]); training draws from a different
root seed (tools/train_demo.py), so evaluation scenes are held out. Every task the world defines
for a scene is asked (npvlm.demo.scenes.tasks), greedy decoding, and scored:
- caption, color, count, and the fine-tuned shape_count, color_shape: exact match of the answer
  (npvlm.metrics.exact_match);
- detect, and the fine-tuned detect3 (all three labels): the fraction of ground-truth objects
  found (npvlm.metrics.objects_found), i.e. matched one-to-one by a predicted box with the right
  label at IoU >= 0.5 (boxes decoded with divisor 1023, the encoding the demo world uses).
"""

import argparse
import json
import sys
import time
from dataclasses import dataclass

import numpy as np

from ..api import load
from ..metrics import exact_match, objects_found
from ..saving.atomic import write_text_atomic
from ..tasks.detection import parse_detections
from .scenes import KINDS, NEW_SKILLS, SHAPES, detection_text, make_scene, task_kind, tasks

EVAL_SEED = 777_000_001
SCENE_SIZE = 128
IOU_THRESHOLD = 0.5
DETECTION_KINDS = ("detect", "detect3")


@dataclass(frozen=True)
class Item:
    scene: int
    prompt: str
    answer: str
    kind: str


def eval_items(n_scenes=300, seed=EVAL_SEED, kinds=KINDS):
    """(scenes, items): the held-out scenes and every task of `kinds` on each."""
    scenes, items = [], []
    for i in range(n_scenes):
        scene = make_scene(np.random.default_rng([seed, i]), size=SCENE_SIZE)
        scenes.append(scene)
        items.extend(Item(i, p, a, task_kind(p)) for p, a in tasks(scene, kinds))
    return scenes, items


def prompt_items(n_scenes=300, seed=EVAL_SEED):
    """(scenes, items) for a per-prompt breakdown: every task of every kind on each held-out scene,
    and every two-label detection of two shapes the scene holds (`tasks` asks one pair a scene)."""
    scenes, items = eval_items(n_scenes, seed)
    for i, scene in enumerate(scenes):
        present = [s for s in SHAPES if any(o.shape == s for o in scene.objects)]
        asked = {it.prompt for it in items if it.scene == i}
        for a_i, a in enumerate(present):
            for b in present[a_i + 1:]:
                prompt = f"detect {a} ; {b}"
                if prompt not in asked:
                    items.append(Item(i, prompt, detection_text(scene, {a, b}), "detect"))
    return scenes, items


def detection_hits(predicted_text, answer_text, size):
    """(ground-truth objects found at IoU >= 0.5 with the right label, ground-truth objects):
    npvlm.metrics.objects_found on the boxes of both texts."""
    def objects(text):
        return [{"label": o.label, "box_yxyx": o.box} for o in parse_detections(text, size, size, divisor=1023).objects]
    truth = objects(answer_text)
    return objects_found(objects(predicted_text), truth, IOU_THRESHOLD), len(truth)


def score(items, predictions):
    """Per-task scores: {kind: {"correct": k, "total": n, "score": k/n}}."""
    tally = {}
    for item, pred in zip(items, predictions):
        if item.kind in DETECTION_KINDS:
            k, n = detection_hits(pred, item.answer, SCENE_SIZE)
        else:
            k, n = int(exact_match(pred, item.answer)), 1
        c = tally.setdefault(item.kind, [0, 0])
        c[0] += k
        c[1] += n
    return {kind: {"correct": k, "total": n, "score": k / n if n else 0.0}
            for kind, (k, n) in sorted(tally.items())}


def score_by_prompt(items, predictions):
    """Per prompt: {"asked": answers, "correct": objects found (detection) or exact answers,
    "total": objects or answers, "exact": answers exactly right (detection: every object found
    and no extra box)}."""
    tally = {}
    for item, pred in zip(items, predictions):
        if item.kind in DETECTION_KINDS:
            k, n = detection_hits(pred, item.answer, SCENE_SIZE)
            exact = k == n == len(parse_detections(pred, SCENE_SIZE, SCENE_SIZE, divisor=1023).objects)
        else:
            k = n = int(exact_match(pred, item.answer))
            n, exact = 1, bool(k)
        c = tally.setdefault(item.prompt, {"asked": 0, "correct": 0, "total": 0, "exact": 0})
        c["asked"] += 1
        c["correct"] += k
        c["total"] += n
        c["exact"] += int(exact)
    return dict(sorted(tally.items()))


def predict(model, scenes, items, batch_size=64, max_new_tokens=48):
    """Greedy answers of an npvlm model for every item, in order."""
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        results = model.generate([scenes[it.scene].image for it in chunk], [it.prompt for it in chunk],
                                 max_new_tokens=max_new_tokens)
        out.extend(r.text for r in results)
    return out


def format_scores(scores, title):
    lines = [f"{title}", "| task | correct | total | score |", "|---|---|---|---|"]
    for kind, s in scores.items():
        unit = " objects" if kind in DETECTION_KINDS else ""
        lines.append(f"| {kind} | {s['correct']} | {s['total']}{unit} | {100 * s['score']:.1f}% |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Score a model on held-out demo-world scenes.")
    p.add_argument("--model", default="demo")
    p.add_argument("--scenes", type=int, default=300)
    p.add_argument("--backend", default="numpy")
    p.add_argument("--json", metavar="OUT", help="also write scores and predictions as JSON")
    p.add_argument("--kinds", nargs="+", choices=KINDS + NEW_SKILLS, default=list(KINDS),
                   help="the task kinds to score (color_count: a skill the shipped demo has not learned)")
    p.add_argument("--by-prompt", action="store_true",
                   help="per prompt, every two-label pair included: objects found and exact answers")
    args = p.parse_args(argv)
    model = load(args.model, backend=args.backend)
    if args.by_prompt:
        scenes, items = prompt_items(args.scenes)
        rows = score_by_prompt(items, predict(model, scenes, items))
        print(f"{args.model}: {args.scenes} held-out scenes, by prompt\n")
        print("| prompt | asked | correct | exact answers |\n|---|---:|---:|---:|")
        for prompt, r in rows.items():
            unit = " objects" if prompt.startswith("detect") else ""
            print(f"| `{prompt}` | {r['asked']} | {r['correct']} / {r['total']}{unit} = "
                  f"{100 * r['correct'] / r['total']:.1f}% | {100 * r['exact'] / r['asked']:.1f}% |")
        return 0
    scenes, items = eval_items(args.scenes, kinds=args.kinds)
    t0 = time.perf_counter()
    predictions = predict(model, scenes, items)
    elapsed = time.perf_counter() - t0
    scores = score(items, predictions)
    print(format_scores(scores, f"{args.model}: {args.scenes} held-out scenes, {len(items)} prompts, "
                                f"{elapsed:.1f} s ({args.backend})"))
    if args.json:
        write_text_atomic(args.json, json.dumps({
            "scores": scores, "items": [vars(it) | {"prediction": pr} for it, pr in zip(items, predictions)]},
            indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
