"""tools/convert_eval_data.py: tiny fake VQA v2, TextVQA, DocVQA, COCO captions and RefCOCO files
in, npvlm's JSONL out (checked line for line, and read back with npvlm's own fine-tuning reader);
image paths relative to the output's folder or absolute; --limit, --skip-missing, --force; bad
input is one `error:` line and exit status 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from npvlm.inputs.examples import read_jsonl

from helpers import ROOT


def tool(*args):
    return subprocess.run([sys.executable, "tools/convert_eval_data.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (200, 30, 30)).save(path)
    return path


def write_json(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def lines(path):
    return [json.loads(t) for t in path.read_text(encoding="utf-8").splitlines()]


def check_read_back(out, rows, folder):
    """npvlm's reader takes the file: each image resolves to the file under `folder`."""
    examples = read_jsonl(out)
    assert [(e.prefix, e.suffix) for e in examples] == [(r["prefix"], r["suffix"]) for r in rows]
    assert [e.image for e in examples] == [(folder / os.path.basename(r["image"])).resolve() for r in rows]


def relative(path):
    """`path` as given relative to the repository root (the tool's working folder)."""
    return os.path.relpath(path, ROOT)


def vqav2_inputs(tmp_path):
    q = write_json(tmp_path / "questions.json", {"questions": [
        {"image_id": 42, "question": "What color is it? ", "question_id": 420},
        {"image_id": 42, "question": "Is it red?", "question_id": 421},
        {"image_id": 7, "question": "How many?", "question_id": 70}]})
    answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
               for i, a in enumerate(["red", "red", "dark red", "red", "orange", "red", "red", "red", "pink", "red"])]
    a = write_json(tmp_path / "annotations.json", {"annotations": [
        {"question_id": 420, "image_id": 42, "answers": answers, "multiple_choice_answer": "red",
         "question_type": "what color is the", "answer_type": "other"},
        {"question_id": 421, "image_id": 42, "answers": [{"answer": "yes", "answer_confidence": "yes", "answer_id": 1}] * 10,
         "multiple_choice_answer": "yes", "question_type": "is it", "answer_type": "yes/no"},
        {"question_id": 70, "image_id": 7, "answers": [{"answer": "2", "answer_confidence": "maybe", "answer_id": 1}] * 10,
         "multiple_choice_answer": "2", "question_type": "how many", "answer_type": "number"}]})
    return q, a


def test_vqav2_relative_images(tmp_path):
    q, a = vqav2_inputs(tmp_path)
    images = tmp_path / "val2014"
    image(images / "COCO_val2014_000000000042.jpg")
    image(images / "COCO_val2014_000000000007.jpg")
    (tmp_path / "eval").mkdir()
    out = tmp_path / "eval" / "vqav2.jsonl"
    r = tool("vqav2", "--questions", q, "--annotations", a, "--images", relative(images), "--out", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"wrote 3 examples to {out}\n"
    rows = lines(out)
    assert rows == [
        {"image": "../val2014/COCO_val2014_000000000042.jpg", "prefix": "answer en What color is it?", "suffix": "red",
         "answers": ["red", "red", "dark red", "red", "orange", "red", "red", "red", "pink", "red"], "question_id": 420},
        {"image": "../val2014/COCO_val2014_000000000042.jpg", "prefix": "answer en Is it red?", "suffix": "yes",
         "answers": ["yes"] * 10, "question_id": 421},
        {"image": "../val2014/COCO_val2014_000000000007.jpg", "prefix": "answer en How many?", "suffix": "2",
         "answers": ["2"] * 10, "question_id": 70}]
    check_read_back(out, rows, images)


def test_limit_skip_missing_and_lang(tmp_path):
    q, a = vqav2_inputs(tmp_path)
    images = tmp_path / "val2014"
    image(images / "COCO_val2014_000000000007.jpg")          # image 42 is missing
    out = tmp_path / "out.jsonl"
    r = tool("vqav2", "--questions", q, "--annotations", a, "--images", images, "--out", out)
    assert r.returncode == 2 and not out.exists()
    assert r.stderr.splitlines() == [f"error: {images / 'COCO_val2014_000000000042.jpg'}: image not found; "
                                     "pass --skip-missing to leave its lines out"]
    r = tool("vqav2", "--questions", q, "--annotations", a, "--images", images, "--out", out, "--skip-missing",
             "--lang", "de")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"wrote 1 examples to {out} (1 images missing, skipped)\n"
    assert [(d["image"], d["prefix"]) for d in lines(out)] == [
        (str(images / "COCO_val2014_000000000007.jpg"), "answer de How many?")]
    image(images / "COCO_val2014_000000000042.jpg")
    r = tool("vqav2", "--questions", q, "--annotations", a, "--images", images, "--out", out, "--limit", 2, "--force")
    assert r.returncode == 0, r.stderr
    assert [d["question_id"] for d in lines(out)] == [420, 421]


def test_textvqa_absolute_images_and_ties(tmp_path):
    data = write_json(tmp_path / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
        {"question": "what brand is this?", "image_id": "003a8ae2ef43b901", "question_id": 34602,
         "answers": ["nokia", "toshiba", "toshiba", "nokia", "nokia", "toshiba", "dakota", "dakota", "dakota", "dakota"],
         "image_classes": ["Phone"], "set_name": "val"},
        {"question": "what is the time?", "image_id": "00c359f294f7dcd9", "question_id": 34603,
         "answers": ["5:41", "5:40", "5:41", "5:40", "5:41", "5:40", "unanswerable", "5:41", "5:40", "5:41"]}]})
    images = tmp_path / "train_images"
    for name in ("003a8ae2ef43b901", "00c359f294f7dcd9"):
        image(images / f"{name}.jpg")
    out = tmp_path / "textvqa.jsonl"
    r = tool("textvqa", "--data", data, "--images", images, "--out", out)
    assert r.returncode == 0, r.stderr
    rows = lines(out)
    assert rows == [
        {"image": str(images / "003a8ae2ef43b901.jpg"), "prefix": "answer en what brand is this?", "suffix": "dakota",
         "answers": ["nokia", "toshiba", "toshiba", "nokia", "nokia", "toshiba", "dakota", "dakota", "dakota", "dakota"],
         "question_id": 34602},
        {"image": str(images / "00c359f294f7dcd9.jpg"), "prefix": "answer en what is the time?", "suffix": "5:41",
         "answers": ["5:41", "5:40", "5:41", "5:40", "5:41", "5:40", "unanswerable", "5:41", "5:40", "5:41"],
         "question_id": 34603}]
    # a tie between the most common answers goes to the one listed first
    write_json(data, {"data": [{"question": "q", "image_id": "003a8ae2ef43b901", "question_id": 1,
                                "answers": ["b", "a", "a", "b", "c"]}]})
    assert tool("textvqa", "--data", data, "--images", images, "--out", out, "--force").returncode == 0
    assert lines(out)[0]["suffix"] == "b"
    check_read_back(out, lines(out), images)


def test_vqav2_train_images_take_the_files_split(tmp_path):
    q, a = vqav2_inputs(tmp_path)
    data = json.loads(Path(q).read_text())
    Path(q).write_text(json.dumps({**data, "data_subtype": "train2014"}))
    images = tmp_path / "train2014"
    image(images / "COCO_train2014_000000000042.jpg")
    image(images / "COCO_train2014_000000000007.jpg")
    out = tmp_path / "train.jsonl"
    r = tool("vqav2", "--questions", q, "--annotations", a, "--images", images, "--out", out)
    assert r.returncode == 0, r.stderr
    assert {Path(x["image"]).name for x in lines(out)} == {"COCO_train2014_000000000042.jpg",
                                                            "COCO_train2014_000000000007.jpg"}


def test_docvqa_both_layouts(tmp_path):
    data = write_json(tmp_path / "val_v1.0.json", {"dataset_name": "docvqa", "dataset_split": "val", "data": [
        {"questionId": 49153, "question": "What is the date?", "image": "documents/pybv0228_81.png",
         "docId": 14465, "answers": ["1/8/93", "01/08/93"]},
        {"questionId": 24580, "question": "Who sent it?", "image": "documents/nkbl0226_1.png",
         "docId": 4733, "answers": ["Dr. Smith"]}]})
    images = tmp_path / "docvqa"
    image(images / "documents" / "pybv0228_81.png")           # as the image field says
    image(images / "nkbl0226_1.png")                          # flat: the base name only
    out = tmp_path / "docvqa.jsonl"
    r = tool("docvqa", "--data", relative(data), "--images", relative(images), "--out", relative(out))
    assert r.returncode == 0, r.stderr
    assert lines(out) == [
        {"image": "docvqa/documents/pybv0228_81.png", "prefix": "answer en What is the date?", "suffix": "1/8/93",
         "answers": ["1/8/93", "01/08/93"], "question_id": 49153, "task": "anls"},
        {"image": "docvqa/nkbl0226_1.png", "prefix": "answer en Who sent it?", "suffix": "Dr. Smith",
         "answers": ["Dr. Smith"], "question_id": 24580, "task": "anls"}]
    assert [e.image for e in read_jsonl(out)] == [(images / "documents" / "pybv0228_81.png").resolve(),
                                                  (images / "nkbl0226_1.png").resolve()]


def test_coco_captions(tmp_path):
    ann = write_json(tmp_path / "captions_val2014.json", {
        "images": [{"id": 9, "file_name": "COCO_val2014_000000000009.jpg", "width": 640, "height": 480},
                   {"id": 3, "file_name": "COCO_val2014_000000000003.jpg", "width": 640, "height": 480},
                   {"id": 5, "file_name": "COCO_val2014_000000000005.jpg", "width": 640, "height": 480}],
        "annotations": [{"id": 1, "image_id": 3, "caption": "A dog on a couch. "},
                        {"id": 2, "image_id": 9, "caption": "Two plates of food.\n"},
                        {"id": 3, "image_id": 3, "caption": " a brown dog lying down"},
                        {"id": 4, "image_id": 9, "caption": "Food on a table."}]})
    images = tmp_path / "val2014"
    for i in (9, 3):                                          # image 5 has no captions: no line
        image(images / f"COCO_val2014_{i:012d}.jpg")
    out = tmp_path / "captions.jsonl"
    r = tool("coco-captions", "--annotations", ann, "--images", relative(images), "--out", out)
    assert r.returncode == 0, r.stderr
    rows = lines(out)
    assert rows == [
        {"image": "val2014/COCO_val2014_000000000009.jpg", "prefix": "caption en", "suffix": "Two plates of food.",
         "references": ["Two plates of food.", "Food on a table."], "image_id": 9},
        {"image": "val2014/COCO_val2014_000000000003.jpg", "prefix": "caption en", "suffix": "A dog on a couch.",
         "references": ["A dog on a couch.", "a brown dog lying down"], "image_id": 3}]
    check_read_back(out, rows, images)


def test_refcoco(tmp_path):
    refs = write_json(tmp_path / "refs.json", [
        {"ref_id": 0, "image_id": 1, "ann_id": 10, "split": "train", "sentences": [{"sent": "the cat"}]},
        {"ref_id": 1, "image_id": 1, "ann_id": 11, "split": "val", "category_id": 1,
         "sentences": [{"sent": "man on left", "raw": "Man on left", "sent_id": 5}, {"sent": "guy in red "}]},
        {"ref_id": 2, "image_id": 2, "ann_id": 12, "split": "val", "sentences": [{"sent": "whole picture"}]}])
    instances = write_json(tmp_path / "instances.json", {
        "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 640, "height": 480},
                   {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "width": 100, "height": 50}],
        "annotations": [{"id": 10, "image_id": 1, "bbox": [0, 0, 10, 10], "category_id": 2},
                        {"id": 11, "image_id": 1, "bbox": [64, 48, 320, 240], "category_id": 1},
                        {"id": 12, "image_id": 2, "bbox": [0.0, 0.0, 100.0, 50.0], "category_id": 1}],
        "categories": [{"id": 1, "name": "person"}]})
    images = tmp_path / "train2014"
    for i in (1, 2):
        image(images / f"COCO_train2014_{i:012d}.jpg")
    out = tmp_path / "refcoco_val.jsonl"
    r = tool("refcoco", "--refs", refs, "--instances", instances, "--split", "val", "--images", images, "--out", out)
    assert r.returncode == 0, r.stderr
    im1, im2 = str(images / "COCO_train2014_000000000001.jpg"), str(images / "COCO_train2014_000000000002.jpg")
    # y 48/480*1023 = 102.3, x 64/640*1023 = 102.3, y 288/480*1023 = 613.8, x 384/640*1023 = 613.8
    rows = lines(out)
    assert rows == [
        {"image": im1, "prefix": "detect man on left", "suffix": "<loc0102><loc0102><loc0614><loc0614> man on left",
         "box_yxyx": [48.0, 64.0, 288.0, 384.0], "ref_id": 1, "ann_id": 11},
        {"image": im1, "prefix": "detect guy in red", "suffix": "<loc0102><loc0102><loc0614><loc0614> guy in red",
         "box_yxyx": [48.0, 64.0, 288.0, 384.0], "ref_id": 1, "ann_id": 11},
        {"image": im2, "prefix": "detect whole picture", "suffix": "<loc0000><loc0000><loc1023><loc1023> whole picture",
         "box_yxyx": [0.0, 0.0, 50.0, 100.0], "ref_id": 2, "ann_id": 12}]
    check_read_back(out, rows, images)


def error_of(r):
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: "), r.stderr
    return r.stderr.strip()


@pytest.mark.parametrize("case, fragment", [
    ("missing", "questions.json: file not found"),
    ("not json", "questions.json: not JSON (Expecting value at line 1 column 1)"),
    ("wrong layout", "questions.json: not the expected layout (no top-level 'questions')"),
    ("missing key", "annotations.json: an entry has no 'multiple_choice_answer'"),
    ("empty answer", "annotations.json: question_id 420 has an empty answer"),
    ("no images folder", "val2014: image folder not found"),
])
def test_bad_input_is_one_error_line(tmp_path, case, fragment):
    q, a = vqav2_inputs(tmp_path)
    images = tmp_path / "val2014"
    image(images / "COCO_val2014_000000000042.jpg")
    image(images / "COCO_val2014_000000000007.jpg")
    if case == "missing":
        q.unlink()
    elif case == "not json":
        q.write_text("not json", encoding="utf-8")
    elif case == "wrong layout":
        write_json(q, [1, 2])
    elif case in ("missing key", "empty answer"):
        d = json.loads(a.read_text(encoding="utf-8"))
        if case == "missing key":
            del d["annotations"][1]["multiple_choice_answer"]
        else:
            d["annotations"][0]["multiple_choice_answer"] = " "
        write_json(a, d)
    else:
        images = tmp_path / "nowhere" / "val2014"
    out = tmp_path / "out.jsonl"
    msg = error_of(tool("vqav2", "--questions", q, "--annotations", a, "--images", images, "--out", out))
    assert fragment in msg
    assert not out.exists()


def test_refs_pickle_is_refused(tmp_path):
    refs = tmp_path / "refs(unc).p"
    refs.write_bytes(b"\x80\x04\x95 not loaded")
    instances = write_json(tmp_path / "instances.json", {"images": [], "annotations": []})
    image(tmp_path / "train2014" / "x.jpg")
    msg = error_of(tool("refcoco", "--refs", refs, "--instances", instances, "--images", tmp_path / "train2014",
                        "--out", tmp_path / "out.jsonl"))
    assert msg == f"error: {refs}: a pickle, not JSON; export it to JSON first (see --help)"


def test_output_exists_needs_force(tmp_path):
    q, a = vqav2_inputs(tmp_path)
    images = tmp_path / "val2014"
    image(images / "COCO_val2014_000000000042.jpg")
    image(images / "COCO_val2014_000000000007.jpg")
    out = tmp_path / "out.jsonl"
    out.write_text("keep me\n", encoding="utf-8")
    msg = error_of(tool("vqav2", "--questions", q, "--annotations", a, "--images", images, "--out", out))
    assert msg == f"error: {out}: exists; pass --force to overwrite it"
    assert out.read_text(encoding="utf-8") == "keep me\n"
    r = tool("vqav2", "--questions", q, "--annotations", a, "--images", images, "--out", out, "--force")
    assert r.returncode == 0, r.stderr
    assert len(lines(out)) == 3
    # the output is never one of the inputs, even with --force
    msg = error_of(tool("vqav2", "--questions", q, "--annotations", a, "--images", images, "--out", q, "--force"))
    assert "refusing to overwrite the input file" in msg
    assert json.loads(q.read_text(encoding="utf-8"))["questions"][0]["question_id"] == 420
