"""Write the demo world's fine-tuning data as JSONL + images, for `python -m npvlm.finetune`.

    python tools/make_demo_finetune_data.py OUT_DIR [--scenes 12000] [--val-scenes 200]

Each training scene (seeds [FINETUNE_SEED, i], held apart from the evaluation's EVAL_SEED and
tools/train_demo.py's seeds) contributes every task of the three new skills (three-label
detection, per-shape counts, the shape of a color) and every task of the four the demo already
has (caption, color, count, detect), so old and new are mixed about half and half and nothing is
forgotten. Lines are written scene by scene; npvlm.finetune --shuffle mixes them. Images are the
128 px scenes as PNG under OUT_DIR/images/. NumPy + Pillow only.
"""

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from npvlm.demo.evaluate import SCENE_SIZE
from npvlm.demo.scenes import KINDS, make_scene, task_kind, tasks

FINETUNE_SEED = 20261201
VAL_SEED = 20261202


def write(out, name, seed, n_scenes):
    lines, kinds = [], {}
    for i in range(n_scenes):
        scene = make_scene(np.random.default_rng([seed, i]), size=SCENE_SIZE)
        image = f"images/{name}-{i:05d}.png"
        Image.fromarray(scene.image).save(out / image)
        for prompt, answer in tasks(scene, KINDS):
            lines.append(json.dumps({"image": image, "prefix": prompt, "suffix": answer}))
            kinds[task_kind(prompt)] = kinds.get(task_kind(prompt), 0) + 1
    (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    print(f"{name}.jsonl: {len(lines)} examples from {n_scenes} scenes: {kinds}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--scenes", type=int, default=12000)
    p.add_argument("--val-scenes", type=int, default=200)
    args = p.parse_args()
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    write(args.out, "train", FINETUNE_SEED, args.scenes)
    write(args.out, "val", VAL_SEED, args.val_scenes)


if __name__ == "__main__":
    main()
