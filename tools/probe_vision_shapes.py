"""How fast can a SigLIP tower alone learn shape identity at a given resolution and patch size?

Trains transformers' SiglipVisionModel from random init, mean-pooled into a 3-way linear head,
to name the shape of one-object demo scenes (npvlm.scenes), and prints held-out accuracy every
50 steps. Used to choose the demo model's image and patch size (docs/demo.md):

    python tools/probe_vision_shapes.py 128 16 192 6    # image px, patch px, width, layers
    python tools/probe_vision_shapes.py 64 8 192 6

Batch 32, AdamW 1e-3, 400 steps, one thread; 2-6 minutes on the 2-core machine.
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from npvlm.image import preprocess  # noqa: E402
from npvlm.scenes import SHAPES, make_scene  # noqa: E402


def main():
    from transformers import SiglipVisionConfig, SiglipVisionModel
    img, patch, width, layers = (int(v) for v in sys.argv[1:5])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = SiglipVisionConfig(image_size=img, patch_size=patch, hidden_size=width, intermediate_size=4 * width,
                             num_hidden_layers=layers, num_attention_heads=max(4, width // 32),
                             vision_use_head=False, hidden_act="gelu_pytorch_tanh")
    model, head = SiglipVisionModel(cfg), torch.nn.Linear(width, 3)
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=1e-3)

    def batch(rng, n):
        scenes = [make_scene(rng, n_objects=1) for _ in range(n)]
        x = torch.from_numpy(np.stack([preprocess(s.image, img) for s in scenes]))
        return x, torch.tensor([SHAPES.index(s.objects[0].shape) for s in scenes])

    def predict(x):
        return head(model(pixel_values=x).last_hidden_state.mean(1))

    val = batch(np.random.default_rng(99), 256)
    t0 = time.time()
    print("| step | train loss | held-out accuracy | seconds |\n|---|---|---|---|")
    for step in range(1, 401):
        x, y = batch(np.random.default_rng([1, step]), 32)
        loss = torch.nn.functional.cross_entropy(predict(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            with torch.no_grad():
                acc = float((predict(val[0]).argmax(1) == val[1]).float().mean())
            print(f"| {step} | {loss.item():.3f} | {acc:.1%} | {time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
