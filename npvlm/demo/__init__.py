"""The demo world: synthetic scenes of colored shapes (`scenes`), the small PaliGemma trained on
them (`model/`, loaded by `npvlm.load("demo")`; docs/demo.md), a sample scene
(`samples/scene.png`), and the held-out evaluation (`python -m npvlm.demo.evaluate`)."""

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"
SAMPLE_SCENE = Path(__file__).resolve().parent / "samples" / "scene.png"
# the bundled sample is `scenes.make_scene(SAMPLE_SEED)`: a green triangle, a yellow circle and a
# blue square, left to right, which the demo answers right on every prompt it was trained on
SAMPLE_SEED = 2353
