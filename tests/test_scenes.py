"""The demo world: scenes obey its rules, and the task answers are what the rules say."""

import numpy as np
import pytest

from npvlm.demo.scenes import (
    BASE_KINDS,
    COLORS,
    KINDS,
    NEW_SKILLS,
    SHAPES,
    caption,
    make_scene,
    prompts_of,
    task_kind,
    tasks,
)
from npvlm.metrics import box_iou as iou
from npvlm.tasks.detection import parse_detections


@pytest.mark.parametrize("seed", range(40))
def test_scene_rules(seed):
    s = make_scene(seed)
    assert s.image.shape == (128, 128, 3) and s.image.dtype == np.uint8
    assert 1 <= len(s.objects) <= 3
    for o in s.objects:
        assert o.shape in SHAPES and o.color in COLORS
        side = o.box[2] - o.box[0]
        assert side == o.box[3] - o.box[1] and 0.15 * 128 - 1 <= side <= 0.40 * 128 + 1
        assert 0 <= o.box[0] and o.box[2] <= 128 and 0 <= o.box[1] and o.box[3] <= 128
        # the shape's pixels are in its box: the box center has the shape's color, not background
        cy, cx = (o.box[0] + o.box[2]) // 2, (o.box[1] + o.box[3]) // 2 + 1
        assert np.abs(s.image[cy, cx].astype(int) - COLORS[o.color]).max() <= 20
    for a in s.objects:
        for b in s.objects:
            assert a is b or iou(a.box, b.box) == 0
    xs = [o.box[1] + o.box[3] for o in s.objects]
    assert xs == sorted(xs)


def test_same_seed_same_scene():
    a, b = make_scene(5), make_scene(5)
    assert np.array_equal(a.image, b.image) and a.objects == b.objects


def test_tasks_answers():
    s = make_scene(22)      # a red circle, a blue square and a green triangle, left to right
    answers = dict(tasks(s))
    assert answers["caption en"] == caption(s) == "a red circle, a blue square and a green triangle"
    assert answers["answer en how many shapes are there?"] == "3"
    assert answers["answer en what color is the triangle?"] == "green"
    det = parse_detections(answers["detect circle"], 128, 128, divisor=1023)
    assert [o.label for o in det.objects] == ["circle"]
    assert np.allclose(det.objects[0].box, s.objects[0].box, atol=0.07)
    assert {task_kind(p) for p in answers} == set(KINDS)
    assert answers["detect circle ; square ; triangle"] == " ; ".join(answers[f"detect {s}"] for s in SHAPES)
    assert [answers[f"answer en how many {s}s are there?"] for s in SHAPES] == ["1", "1", "1"]
    assert answers["answer en what shape is red?"] == "circle" and "answer en what shape is yellow?" not in answers
    assert {task_kind(p) for p, _ in tasks(s, BASE_KINDS)} == set(BASE_KINDS)


def test_prompts_of_every_kind_are_what_the_tasks_ask():
    seen = {p for i in range(1500) for p, _ in tasks(make_scene(np.random.default_rng([9, i])))}
    assert seen == set(prompts_of(KINDS)) and len(prompts_of(BASE_KINDS)) == 11
    assert all(task_kind(p) in KINDS for p in seen)


def test_shape_counts_and_color_questions():
    for seed in range(100):
        s = make_scene(seed)
        for prompt, answer in tasks(s):
            if task_kind(prompt) == "shape_count":
                shape = prompt.split()[4][:-1]            # "circles" -> "circle"
                assert answer == str(sum(o.shape == shape for o in s.objects)) and answer in {"0", "1", "2", "3"}
            if task_kind(prompt) == "color_shape":
                color = prompt.split()[-1].rstrip("?")
                assert [o.shape for o in s.objects if o.color == color] == [answer]


def test_color_question_only_when_unique():
    for seed in range(200):
        s = make_scene(seed)
        for prompt, _ in tasks(s):
            if task_kind(prompt) == "color":
                shape = prompt.split()[-1].rstrip("?")
                assert sum(o.shape == shape for o in s.objects) == 1


def test_bundled_sample_is_the_sample_seed_s_scene():
    from PIL import Image

    from npvlm.demo import SAMPLE_SCENE, SAMPLE_SEED
    assert np.array_equal(np.asarray(Image.open(SAMPLE_SCENE).convert("RGB")), make_scene(SAMPLE_SEED).image)


def test_the_color_count_skill_the_demo_has_not_learned():
    s = make_scene(22)      # a red circle, a blue square and a green triangle
    answers = dict(tasks(s, NEW_SKILLS))
    assert answers == {f"answer en how many {c} shapes are there?": "0" if c == "yellow" else "1" for c in COLORS}
    assert {task_kind(p) for p in answers} == {"color_count"}
    assert set(prompts_of(NEW_SKILLS)) == set(answers)
    assert not set(answers) & set(prompts_of(KINDS))          # not among the shipped demo's prompts


def test_fine_tuning_data_half_new_half_replayed(tmp_path):
    from npvlm.demo.data import main
    from npvlm.inputs.examples import read_jsonl
    main([str(tmp_path), "--kinds", "color_count", "--replay", "--scenes", "6", "--val-scenes", "2"])
    train = read_jsonl(tmp_path / "train.jsonl")
    kinds = [task_kind(e.prefix) for e in train]
    assert len(train) == 6 * 2 * 4 and kinds.count("color_count") == 24
    assert set(kinds) - {"color_count"} <= set(KINDS)
    assert len(read_jsonl(tmp_path / "val.jsonl")) == 2 * 2 * 4
