"""The demo world: synthetic scenes of 1-3 colored shapes, and PaliGemma-style tasks about them.

Used to train the embedded demo model (tools/train_demo.py), to evaluate it
(`python -m npvlm.demo.evaluate`), in tests and in the notebooks. NumPy + Pillow only, seeded.

The world:
- a square RGB image (default 128 px) with a plain light background (each channel 225-250);
- 1 to 3 filled shapes, none overlapping: circle, square (axis-aligned) or triangle (pointing up),
  each red, green, blue or yellow (each channel jittered by up to +-20 around a base color);
- each shape's size (its bounding box side) is 15% to 40% of the image side, at a random position.

Objects are listed left to right (by the x of the box center; ties by y). The tasks, in
PaliGemma's prompt style:
- `caption en` -> `a red circle`, `a red circle and a blue square`,
  `a red circle, a blue square and a green triangle` (objects left to right);
- `answer en what color is the circle?` -> `red` (asked only when exactly one circle exists);
- `answer en how many shapes are there?` -> `2`;
- `detect circle` / `detect square ; triangle` -> `<locY1><locX1><locY2><locX2> circle ; ...`
  for every object of the named shapes, left to right. Box corners are encoded as bins
  round(v / side * 1023) as big_vision does (docs/spec.md §13.1), y before x.
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ..tasks.detection import encode_box

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (215, 45, 40), "green": (45, 165, 65), "blue": (40, 85, 215), "yellow": (235, 200, 35)}
JITTER = 20
MIN_FRAC, MAX_FRAC = 0.15, 0.40


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    box: tuple          # (y_min, x_min, y_max, x_max) in pixels, the shape's tight bounding box


@dataclass(frozen=True)
class Scene:
    image: np.ndarray   # uint8 [S, S, 3]
    objects: tuple      # SceneObject, left to right

    @property
    def size(self):
        return self.image.shape[0]


def _rng(seed):
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _overlaps(a, b, gap):
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def make_scene(seed=None, size=128, n_objects=None):
    """A random scene. seed: int or np.random.Generator. Returns a Scene."""
    rng = _rng(seed)
    n = int(n_objects or rng.integers(1, 4))
    while True:                                   # rejection sampling of non-overlapping boxes
        boxes = []
        for _ in range(200):
            side = int(rng.integers(round(MIN_FRAC * size), round(MAX_FRAC * size) + 1))
            y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            box = (y, x, y + side, x + side)
            if all(not _overlaps(box, b, gap=2) for b in boxes):
                boxes.append(box)
                if len(boxes) == n:
                    break
        if len(boxes) == n:
            break
    background = tuple(int(v) for v in rng.integers(225, 251, size=3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    objects = []
    for box in boxes:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        fill = tuple(int(np.clip(c + rng.integers(-JITTER, JITTER + 1), 0, 255)) for c in COLORS[color])
        y1, x1, y2, x2 = box
        # PIL's shapes include their last pixel: a side-s box spans x1 .. x1+s-1
        if shape == "circle":
            draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=fill)
        elif shape == "square":
            draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=fill)
        else:
            draw.polygon([(x1, y2 - 1), (x2 - 1, y2 - 1), ((x1 + x2 - 1) / 2, y1)], fill=fill)
        objects.append(SceneObject(shape, color, box))
    objects.sort(key=lambda o: (o.box[1] + o.box[3], o.box[0] + o.box[2]))
    return Scene(np.asarray(image), tuple(objects))


def caption(scene):
    """`a red circle`, `a red circle and a blue square`, `a red circle, a blue square and ...`"""
    parts = [f"a {o.color} {o.shape}" for o in scene.objects]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def detection_text(scene, shapes):
    """PaliGemma detection output for every object whose shape is in `shapes`, left to right."""
    records = []
    for o in scene.objects:
        if o.shape in shapes:
            records.append(f"{encode_box(o.box, scene.size, scene.size)} {o.shape}")
    return " ; ".join(records)


# The tasks the demo model was first trained on (tools/train_demo.py), and three more skills
# taught to it afterwards by npvlm's own fine-tuning (docs/demo.md, "Fine-tuning").
BASE_KINDS = ("caption", "color", "count", "detect")
SKILLS = ("detect3", "shape_count", "color_shape")
KINDS = BASE_KINDS + SKILLS
# a skill the shipped demo has not learned, to teach it in a fine-tuning example (README,
# notebook 11): "how many red shapes are there?" -> 0 to 3
NEW_SKILLS = ("color_count",)
DETECT_ALL = "detect " + " ; ".join(SHAPES)


def tasks(scene, kinds=KINDS):
    """Every (prompt, answer) pair of the task kinds `kinds` the world defines for this scene."""
    out = []
    if "caption" in kinds:
        out.append(("caption en", caption(scene)))
    if "count" in kinds:
        out.append(("answer en how many shapes are there?", str(len(scene.objects))))
    present = sorted({o.shape for o in scene.objects}, key=SHAPES.index)
    for shape in present:
        same = [o for o in scene.objects if o.shape == shape]
        if len(same) == 1 and "color" in kinds:
            out.append((f"answer en what color is the {shape}?", same[0].color))
        if "detect" in kinds:
            out.append((f"detect {shape}", detection_text(scene, {shape})))
    if len(present) >= 2 and "detect" in kinds:
        pair = present[:2]
        out.append((f"detect {pair[0]} ; {pair[1]}", detection_text(scene, set(pair))))
    if "detect3" in kinds:                # all three labels: every object, left to right
        out.append((DETECT_ALL, detection_text(scene, set(SHAPES))))
    if "shape_count" in kinds:            # per shape, 0 to 3
        out += [(f"answer en how many {shape}s are there?", str(sum(o.shape == shape for o in scene.objects)))
                for shape in SHAPES]
    if "color_count" in kinds:            # per color, 0 to 3
        out += [(f"answer en how many {color} shapes are there?", str(sum(o.color == color for o in scene.objects)))
                for color in COLORS]
    if "color_shape" in kinds:            # asked when exactly one object has the color
        for color in COLORS:
            same = [o for o in scene.objects if o.color == color]
            if len(same) == 1:
                out.append((f"answer en what shape is {color}?", same[0].shape))
    return out


def prompts_of(kinds=KINDS):
    """Every prompt `tasks` can ask for these kinds."""
    by_kind = {
        "caption": ["caption en"],
        "count": ["answer en how many shapes are there?"],
        "color": [f"answer en what color is the {shape}?" for shape in SHAPES],
        "detect": [f"detect {shape}" for shape in SHAPES]
        + [f"detect {a} ; {b}" for i, a in enumerate(SHAPES) for b in SHAPES[i + 1:]],
        "detect3": [DETECT_ALL],
        "shape_count": [f"answer en how many {shape}s are there?" for shape in SHAPES],
        "color_shape": [f"answer en what shape is {color}?" for color in COLORS],
        "color_count": [f"answer en how many {color} shapes are there?" for color in COLORS],
    }
    return [p for kind in kinds for p in by_kind[kind]]


# the task kinds the embedded demo model (npvlm/demo/model) was trained on: the base four by
# tools/train_demo.py, the three skills by python -m npvlm.finetune (docs/demo.md)
SHIPPED_KINDS = KINDS


def trained_prompts():
    """Every prompt the embedded demo model was trained on."""
    return prompts_of(SHIPPED_KINDS)


def task_kind(prompt):
    """The kind of a task prompt: one of KINDS or NEW_SKILLS."""
    if prompt.startswith("caption"):
        return "caption"
    if prompt == DETECT_ALL:
        return "detect3"
    if prompt.startswith("detect"):
        return "detect"
    if prompt == "answer en how many shapes are there?":
        return "count"
    if any(f"how many {color} shapes" in prompt for color in COLORS):
        return "color_count"
    if "how many" in prompt:
        return "shape_count"
    return "color_shape" if prompt.startswith("answer en what shape is") else "color"
