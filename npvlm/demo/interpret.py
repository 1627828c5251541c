"""Do the explanation maps mean anything? Measured on held-out scenes of the demo world, where
the asked-about object's box is known (npvlm only, no torch).

    python -m npvlm.demo.interpret                 # the embedded demo model, 200 scenes
    python -m npvlm.demo.interpret --scenes 50 --json out.json

On every held-out scene (npvlm.demo.evaluate's seeds) two questions whose answer lives in one
object, "what color is the SHAPE?" and "what shape is COLOR?" (each asked where exactly one
object fits), are explained for the model's own greedy answer (PaliGemma.explain). Each map
kind ranks the 8 x 8 image patches for the whole answer a (its tokens, <eos> included):

    gradient          per patch, the mean over its pixels of max_c |d log p(a) / dx_c|
    input_x_gradient  per patch, the sum of x_c d log p(a) / dx_c (the most supportive first)
    attention         the answer tokens' attention on the patch, mean over tokens, layers, heads
    attention_last    the same, the last decoder layer only
    random            a random order (mean of 5 draws)

(d log p(a) = the sum of the answer tokens' pixel gradients.) Two measurements:

- deletion: the top 5 / 10 / 25% patches by the map set to mid-grey (pixel value 0 after the
  model's normalisation), log p(a) scored again with the answer forced; the mean drop (larger:
  the map found what the answer depends on);
- pointing: how often the map's top patch overlaps the asked object's box (chance: the
  fraction of patches that do).

And the prefix effect: PaliGemma's prefix (image + prompt) is attended bidirectionally, so the
image tokens' decoder states depend on the prompt. For "caption en" against the scene's first
question above (the color question, or the shape question where no shape is alone), per
layer, the relative change ||h_a - h_b|| / ||h_a|| of the image positions' residual stream
(0 at the embeddings; in a causal model with the image first, such as LLaVA, it would stay 0
at every layer).
"""

import argparse
import json
import sys
import time

import numpy as np

from ..api import load
from ..model.paligemma import prefill
from ..saving.atomic import write_text_atomic
from .evaluate import EVAL_SEED, SCENE_SIZE
from .scenes import COLORS, SHAPES, make_scene

MAP_KINDS = ("gradient", "input_x_gradient", "attention", "attention_last", "random")
FRACTIONS = (0.05, 0.10, 0.25)
RANDOM_DRAWS = 5


def questions(scene):
    """(prompt, the object it is about) for the first shape alone of its kind and the first color
    alone of its kind in the scene."""
    out = []
    for shape in SHAPES:
        same = [o for o in scene.objects if o.shape == shape]
        if len(same) == 1:
            out.append((f"answer en what color is the {shape}?", same[0]))
            break
    for color in COLORS:
        same = [o for o in scene.objects if o.color == color]
        if len(same) == 1:
            out.append((f"answer en what shape is {color}?", same[0]))
            break
    return out


def answer_maps(exp, rng):
    """Each kind's patch scores for the whole answer. -> {kind: [N] float}"""
    N = exp.image_attention.shape[-1]
    side = int(round(N ** 0.5))
    R = exp.pixel_values.shape[-1]
    p = R // side
    grad = exp.pixel_grads.sum(axis=0)                                          # d log p(a) / dx

    def blocks(a):                                                              # [R, R] -> [side, p, side, p]
        return a[:side * p, :side * p].reshape(side, p, side, p)

    return {
        "gradient": blocks(np.abs(grad).max(axis=0)).mean(axis=(1, 3)).reshape(-1),
        "input_x_gradient": blocks((exp.pixel_values * grad).sum(axis=0)).sum(axis=(1, 3)).reshape(-1),
        "attention": exp.image_attention.mean(axis=(0, 1, 2)),
        "attention_last": exp.image_attention[:, -1].mean(axis=(0, 1)),
        "random": [rng.permutation(N)[::-1].astype(np.float64) for _ in range(RANDOM_DRAWS)],
    }


def greyed(pixels, patches, side):
    """pixel_values [C, R, R] with the given patches set to 0 (mid-grey)."""
    out = pixels.copy()
    p = pixels.shape[-1] // side
    for k in patches:
        r, c = divmod(int(k), side)
        out[:, r * p:(r + 1) * p, c * p:(c + 1) * p] = 0.0
    return out


def answer_logprobs(model, prompt_ids, tokens, pixel_batch):
    """log p(answer) for each image of a batch, the answer forced (one pass, prefix-LM mask).
    prompt_ids: int [T0]; tokens: the answer's ids; pixel_batch: float32 [B, C, R, R]."""
    B, n = len(pixel_batch), len(tokens)
    ids = np.tile(np.concatenate([prompt_ids, tokens])[None], (B, 1))
    types = np.tile(np.concatenate([np.zeros(len(prompt_ids), np.int64), np.ones(n, np.int64)])[None], (B, 1))
    batch = model.device_batch({"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": types,
                                "pixel_values": pixel_batch})
    xp = model.xp
    logits = prefill(batch, model.params, model.cfg, logits_for="all")                   # [B, T, V]
    z = logits[:, len(prompt_ids) - 1:len(prompt_ids) - 1 + n].astype(xp.float64)
    logp = z - (xp.log(xp.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) + z.max(-1, keepdims=True))
    picked = xp.take_along_axis(logp, xp.asarray(np.asarray(tokens))[None, :, None], axis=-1)[..., 0]
    return np.asarray(picked.sum(axis=1).get() if hasattr(picked, "get") else picked.sum(axis=1))


def patches_over(box, side, size):
    """The patches (row-major indices) that overlap a box (y0, x0, y1, x1) in scene pixels."""
    cell = size / side
    y0, x0, y1, x1 = box
    return {r * side + c for r in range(side) for c in range(side)
            if r * cell < y1 and (r + 1) * cell > y0 and c * cell < x1 and (c + 1) * cell > x0}


def measure(model, n_scenes=200, seed=EVAL_SEED):
    """Deletion, pointing and the prefix effect over n_scenes held-out scenes. -> dict of results"""
    rng = np.random.default_rng(0)
    processor = model.processor
    side = int(round(model.cfg.num_image_tokens ** 0.5))
    drops = {k: {f: [] for f in FRACTIONS} for k in MAP_KINDS}
    hits, chance, asked = {k: 0 for k in MAP_KINDS}, [], 0
    prefix = []
    for i in range(n_scenes):
        scene = make_scene(np.random.default_rng([seed, i]), size=SCENE_SIZE)
        for prompt, target in questions(scene):
            exp = model.explain(scene.image, prompt)
            inputs = processor([scene.image], [prompt])
            prompt_ids, pixels = inputs["input_ids"][0], inputs["pixel_values"][0]
            maps = answer_maps(exp, rng)
            variants, keys = [], []
            for kind, scores in maps.items():
                for draw, s in enumerate(scores if kind == "random" else [scores]):
                    order = np.argsort(-np.asarray(s), kind="stable")
                    for f in FRACTIONS:
                        variants.append(greyed(pixels, order[:max(1, round(f * side * side))], side))
                        keys.append((kind, f, draw))
            base = float(exp.logprobs.sum())
            scored = answer_logprobs(model, prompt_ids, exp.tokens, np.stack(variants))
            for (kind, f, _), lp in zip(keys, scored):
                drops[kind][f].append((base - float(lp)) / (RANDOM_DRAWS if kind == "random" else 1))
            inside = patches_over(target.box, side, scene.size)
            for kind in MAP_KINDS:                 # random: the mean over its draws
                draws = maps[kind] if kind == "random" else [maps[kind]]
                hits[kind] += np.mean([int(np.argmax(d)) in inside for d in draws])
            chance.append(len(inside) / side ** 2)
            asked += 1
        prefix.append(prefix_change(model, scene))
    return {"scenes": n_scenes, "questions": asked,
            "deletion": {k: {str(f): float(np.sum(v)) / asked for f, v in d.items()} for k, d in drops.items()},
            "pointing": {k: float(hits[k]) / asked for k in MAP_KINDS}, "pointing_chance": float(np.mean(chance)),
            "prefix_change": np.mean(prefix, axis=0).tolist()}


def prefix_change(model, scene):
    """||h_caption - h_question|| / ||h_caption|| at the image positions, for each residual
    stream r_0 (embeddings) .. r_L (after the last layer). -> [L + 1]"""
    prompt = questions(scene)[0][0] if questions(scene) else "answer en how many shapes are there?"
    states = []
    for p in ("caption en", prompt):
        inputs = model.processor([scene.image], [p])
        trace = {}
        model.prefill(inputs, logits_for="all", trace=trace)
        N = model.cfg.num_image_tokens
        L = model.cfg.text.num_hidden_layers
        states.append([trace["text.embed"][0, :N]] + [trace[f"text.layer.{l:02d}"][0, :N] for l in range(L)])
    return [float(np.linalg.norm(a - b) / np.linalg.norm(a)) for a, b in zip(*states)]


def format_results(r, title):
    lines = [title, "", "Deletion: mean drop of log p(answer) when the top patches by each map are greyed "
             f"({r['questions']} questions)", "",
             "| map | " + " | ".join(f"top {int(100 * float(f))}%" for f in FRACTIONS) + " | top patch on the object |",
             "|---|" + "---:|" * (len(FRACTIONS) + 1)]
    for kind in MAP_KINDS:
        lines.append(f"| {kind} | " + " | ".join(f"{r['deletion'][kind][str(f)]:.3f}" for f in FRACTIONS)
                     + f" | {100 * r['pointing'][kind]:.1f}% |")
    streams = ["embeddings"] + [f"layer {i}" for i in range(len(r["prefix_change"]) - 1)]
    lines += ["", f"(pointing by chance: {100 * r['pointing_chance']:.1f}% of patches overlap the asked object)", "",
              "Prefix effect: relative change of the image positions' residual stream between two prompts",
              "", "| stream | " + " | ".join(streams) + " |", "|---|" + "---:|" * len(streams),
              "| change | " + " | ".join(f"{v:.3f}" for v in r["prefix_change"]) + " |"]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Measure the explanation maps on held-out demo-world scenes.")
    p.add_argument("--model", default="demo")
    p.add_argument("--scenes", type=int, default=200)
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    args = p.parse_args(argv)
    model = load(args.model)
    t0 = time.perf_counter()
    results = measure(model, args.scenes)
    print(format_results(results, f"{args.model}: {args.scenes} held-out scenes, {time.perf_counter() - t0:.0f} s"))
    if args.json:
        write_text_atomic(args.json, json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
