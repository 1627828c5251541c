"""The demo world's fine-tuning data as JSONL + images, for `python -m npvlm.finetune`.

    python -m npvlm.demo.data OUT_DIR                            # the shipped demo's fine-tuning data
    python -m npvlm.demo.data OUT_DIR --kinds color_count --replay --scenes 600    # a new skill

Each scene (seeds [FINETUNE_SEED, i] for train.jsonl, [VAL_SEED, i] for val.jsonl: apart from
the evaluation's EVAL_SEED and tools/train_demo.py's seeds) contributes every task of `--kinds`
(default: the seven kinds the shipped demo knows, docs/demo.md "Fine-tuning": the data its
last three skills were taught with). `--replay` adds as many tasks of the kinds the demo
already knows, drawn at random from the scene's, so that a new skill is learned without the old
ones being forgotten (half new, half old). Lines are written scene by scene (npvlm.finetune
--shuffle mixes them); images are the 128 px scenes as PNG under OUT_DIR/images/. NumPy +
Pillow only.
"""

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from .evaluate import SCENE_SIZE
from .scenes import KINDS, NEW_SKILLS, SHIPPED_KINDS, make_scene, task_kind, tasks

FINETUNE_SEED = 20261201
VAL_SEED = 20261202


def examples(scene, kinds, replay, rng):
    """(prompt, answer) pairs of a scene: every task of `kinds`, and with `replay` as many tasks
    drawn from those of the shipped kinds."""
    new = tasks(scene, kinds)
    if not replay:
        return new
    old = tasks(scene, SHIPPED_KINDS)
    return new + [old[i] for i in rng.integers(len(old), size=len(new))]


def write(out, name, seed, n_scenes, kinds, replay):
    lines, counts = [], {}
    rng = np.random.default_rng([seed, 1])
    for i in range(n_scenes):
        scene = make_scene(np.random.default_rng([seed, i]), size=SCENE_SIZE)
        image = f"images/{name}-{i:05d}.png"
        Image.fromarray(scene.image).save(out / image)
        for prompt, answer in examples(scene, kinds, replay, rng):
            lines.append(json.dumps({"image": image, "prefix": prompt, "suffix": answer}))
            counts[task_kind(prompt)] = counts.get(task_kind(prompt), 0) + 1
    (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    print(f"{name}.jsonl: {len(lines)} examples from {n_scenes} scenes: {counts}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--kinds", nargs="+", choices=KINDS + NEW_SKILLS, default=list(KINDS),
                   help="task kinds whose every task goes in")
    p.add_argument("--replay", action="store_true", help="as many tasks of the kinds the demo knows")
    p.add_argument("--scenes", type=int, default=12000)
    p.add_argument("--val-scenes", type=int, default=200)
    args = p.parse_args(argv)
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    write(args.out, "train", FINETUNE_SEED, args.scenes, args.kinds, args.replay)
    write(args.out, "val", VAL_SEED, args.val_scenes, args.kinds, args.replay)


if __name__ == "__main__":
    main()
