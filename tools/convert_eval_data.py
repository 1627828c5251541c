"""Public evaluation sets -> npvlm's JSONL, one `{"image", "prefix", "suffix", ...}` object a line.

    python tools/convert_eval_data.py FORMAT INPUTS --images DIR --out OUT.jsonl
        [--limit N] [--lang en] [--skip-missing] [--force]

The lines are those `python -m npvlm.finetune --data/--val` reads (npvlm/training/data.py,
docs/training.md), plus what an evaluator needs beside the target (the reader ignores extra keys).
`image` is the image relative to OUT's folder when --images is relative (npvlm resolves it from
the JSONL's folder), else absolute. The files are downloaded by hand; nothing here fetches.

- `vqav2 --questions v2_OpenEnded_mscoco_val2014_questions.json --annotations
  v2_mscoco_val2014_annotations.json --images val2014/`: VQA v2 (https://visualqa.org/download.html),
  images `COCO_{split}_{image_id:012d}.jpg`, the split from the file's data_subtype (or its
  name). prefix `answer en {question}`, suffix the
  multiple_choice_answer, `answers` the ten raw answers (in order), `question_id`.
- `textvqa --data TextVQA_0.5.1_val.json --images train_images/`: TextVQA (https://textvqa.org/dataset/),
  images `{image_id}.jpg`. As VQA v2; suffix the most common answer (a tie: the first listed).
- `docvqa --data val_v1.0.json --images DIR`: DocVQA task 1 (https://rrc.cvc.uab.es/?ch=17), the
  image `DIR/<image field>` ("documents/x.png") or else `DIR/<its base name>`. As VQA v2; suffix
  the first answer, `question_id` the questionId, `task` "anls" (DocVQA is scored by ANLS).
- `coco-captions --annotations captions_val2014.json --images val2014/`: COCO captions
  (https://cocodataset.org/#download). One line per image with captions: prefix `caption en`,
  suffix the first caption, `references` all of them (stripped, in file order), `image_id`.
- `refcoco --refs refs.json --instances instances.json --split val --images train2014/`: RefCOCO,
  RefCOCO+, RefCOCOg (https://github.com/lichengunc/refer). One line per sentence of the split's
  refs: prefix `detect {sent}`, suffix the box as `<locY0><locX0><locY1><locX1> {sent}`
  (`npvlm.tasks.detection.encode_box`, big_vision's round(v / side * 1023)), `box_yxyx` the box in
  pixels of the original image, `ref_id`, `ann_id`. The official `refs(unc).p` is a pickle, which
  this tool does not load (a pickle can run code); export it once to JSON from a trusted copy:
  python -c "import json, pickle; json.dump(pickle.load(open('refs(unc).p', 'rb')), open('refs.json', 'w'))"

`--limit N` keeps the first N lines. A missing image is an error, unless `--skip-missing` (its
lines are left out and counted). OUT is written atomically and never overwritten without `--force`.
Bad input is one `error: ...` line naming the file, exit status 2.
"""

import argparse
import json
import os
import re
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from npvlm.errors import InputError
from npvlm.saving.atomic import check_writable, write_text_atomic
from npvlm.tasks.detection import encode_box


def read_json(path):
    """A JSON file's top-level value; one-line InputErrors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    data = path.read_bytes()
    if data[:1] == b"\x80":
        raise InputError(f"{path}: a pickle, not JSON; export it to JSON first (see --help)")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{path}: not JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def load_json(path, key):
    """A JSON file's top-level object, which must hold `key`."""
    obj = read_json(path)
    if not isinstance(obj, dict) or key not in obj:
        raise InputError(f"{path}: not the expected layout (no top-level {key!r})")
    return obj


@contextmanager
def fields_of(path):
    """A missing key or a value of the wrong type inside -> one line naming the file."""
    try:
        yield
    except InputError:
        raise
    except KeyError as e:
        raise InputError(f"{path}: an entry has no {e.args[0]!r}") from None
    except (TypeError, AttributeError, IndexError, ValueError) as e:
        raise InputError(f"{path}: an entry has an unexpected layout ({e})") from None


def answer(path, suffix, what):
    """A non-empty target: npvlm's reader refuses an empty suffix."""
    if not isinstance(suffix, str) or not suffix.strip():
        raise InputError(f"{path}: {what} has an empty answer; a JSONL line needs a non-empty suffix")
    return suffix


def vqav2(args):
    """VQA v2: --questions and --annotations, the official val (or train) files."""
    with fields_of(args.questions):
        data = load_json(args.questions, "questions")
        # the images' COCO split: the file's data_subtype ("val2014", "train2014"), else its name's
        subtype = data.get("data_subtype") or next(iter(re.findall(r"(?:train|val|test)20\d\d",
                                                                   Path(args.questions).name)), "val2014")
        questions = [(q["question_id"], f"COCO_{subtype}_{int(q['image_id']):012d}.jpg", q["question"].strip())
                     for q in data["questions"]]
    with fields_of(args.annotations):
        annotations = {a["question_id"]: (a["multiple_choice_answer"], [str(x["answer"]) for x in a["answers"]])
                       for a in load_json(args.annotations, "annotations")["annotations"]}
    for qid, image, question in questions:
        if qid not in annotations:
            raise InputError(f"{args.annotations}: no annotation for question_id {qid} of {args.questions}")
        best, answers = annotations[qid]
        yield [image], {
            "prefix": f"answer {args.lang} {question}", "suffix": answer(args.annotations, best, f"question_id {qid}"),
            "answers": answers, "question_id": qid}


def textvqa(args):
    """TextVQA: --data, TextVQA_0.5.1_val.json (or train)."""
    with fields_of(args.data):
        for d in load_json(args.data, "data")["data"]:
            answers = [str(a) for a in d["answers"]]
            best = Counter(answers).most_common(1)[0][0] if answers else ""   # ties: first listed
            yield [f"{d['image_id']}.jpg"], {
                "prefix": f"answer {args.lang} {d['question'].strip()}",
                "suffix": answer(args.data, best, f"question_id {d['question_id']}"),
                "answers": answers, "question_id": d["question_id"]}


def docvqa(args):
    """DocVQA task 1: --data, val_v1.0.json (or train)."""
    with fields_of(args.data):
        for d in load_json(args.data, "data")["data"]:
            answers = [str(a) for a in d["answers"]]
            yield [d["image"], Path(d["image"]).name], {
                "prefix": f"answer {args.lang} {d['question'].strip()}",
                "suffix": answer(args.data, answers[0] if answers else "", f"questionId {d['questionId']}"),
                "answers": answers, "question_id": d["questionId"], "task": "anls"}


def coco_captions(args):
    """COCO captions: --annotations, captions_val2014.json (or any split's)."""
    with fields_of(args.annotations):
        coco = load_json(args.annotations, "annotations")
        captions = {}
        for a in coco["annotations"]:
            captions.setdefault(a["image_id"], []).append(a["caption"].strip())
        for im in coco["images"]:
            refs = captions.get(im["id"])
            if refs:
                yield [im["file_name"]], {
                    "prefix": f"caption {args.lang}", "suffix": answer(args.annotations, refs[0], f"image {im['id']}"),
                    "references": refs, "image_id": im["id"]}


def refcoco(args):
    """RefCOCO, RefCOCO+, RefCOCOg: --refs (JSON export of refs(...).p), --instances, --split."""
    with fields_of(args.instances):
        instances = load_json(args.instances, "annotations")
        images = {im["id"]: (im["file_name"], float(im["width"]), float(im["height"])) for im in instances["images"]}
        boxes = {a["id"]: [float(v) for v in a["bbox"]] for a in instances["annotations"]}
    refs = read_json(args.refs)   # the usual export is a bare list of refs
    refs = refs.get("refs") if isinstance(refs, dict) else refs
    if not isinstance(refs, list):
        raise InputError(f"{args.refs}: not the expected layout (a list of refs)")
    with fields_of(args.refs):
        for r in refs:
            if r["split"] != args.split:
                continue
            if r["image_id"] not in images or r["ann_id"] not in boxes:
                raise InputError(f"{args.refs}: ref_id {r['ref_id']}: image {r['image_id']} or annotation "
                                 f"{r['ann_id']} is not in {args.instances}")
            file_name, width, height = images[r["image_id"]]
            x, y, w, h = boxes[r["ann_id"]]
            box = [y, x, y + h, x + w]
            for s in r["sentences"]:
                sent = s["sent"].strip()
                yield [file_name], {
                    "prefix": f"detect {sent}", "suffix": f"{encode_box(box, width, height)} {sent}",
                    "box_yxyx": box, "ref_id": r["ref_id"], "ann_id": r["ann_id"]}


FORMATS = {"vqav2": (vqav2, ["questions", "annotations"]), "textvqa": (textvqa, ["data"]),
           "docvqa": (docvqa, ["data"]), "coco-captions": (coco_captions, ["annotations"]),
           "refcoco": (refcoco, ["refs", "instances"])}


def positive(text):
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return n


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--images", required=True, help="the folder of the set's images")
    common.add_argument("--out", required=True, help="the JSONL file to write")
    common.add_argument("--limit", type=positive, help="keep the first N lines")
    common.add_argument("--lang", default="en", help="the prompts' language code (default en)")
    common.add_argument("--skip-missing", action="store_true", help="leave out the lines of missing images")
    common.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    sub = ap.add_subparsers(dest="format", required=True)
    for name, (fn, inputs) in FORMATS.items():
        p = sub.add_parser(name, parents=[common], help=fn.__doc__, description=fn.__doc__)
        for key in inputs:
            p.add_argument(f"--{key}", required=True)
        if name == "refcoco":
            p.add_argument("--split", default="val", help="the refs' split: train, val, testA, testB, test (default val)")
    return ap.parse_args(argv)


def convert(args):
    """Write OUT; -> (lines written, images missing)."""
    out, images = Path(args.out), Path(args.images)
    if out.exists() and not args.force:
        raise InputError(f"{out}: exists; pass --force to overwrite it")
    check_writable(out, [getattr(args, key) for key in FORMATS[args.format][1]])
    if not images.is_dir():
        raise InputError(f"{images}: image folder not found")
    base = str(images)
    if not images.is_absolute():   # as npvlm resolves it: from the JSONL's folder
        try:
            base = os.path.relpath(os.path.realpath(images), os.path.realpath(out.parent if str(out.parent) else "."))
        except ValueError:         # another drive (Windows): no relative path
            base = os.path.abspath(images)
    found, missing, lines = {}, set(), []
    for names, fields in FORMATS[args.format][0](args):
        for n in names:
            if n not in found:
                found[n] = (images / n).is_file()
        name = next((n for n in names if found[n]), None)
        if name is None:
            if not args.skip_missing:
                raise InputError(f"{images / names[0]}: image not found; pass --skip-missing to leave its lines out")
            missing.add(names[0])
            continue
        image = Path(base, name) if images.is_absolute() else Path(os.path.normpath(os.path.join(base, name)))
        lines.append(json.dumps({"image": image.as_posix(), **fields}, ensure_ascii=False))
        if args.limit and len(lines) == args.limit:
            break
    if not lines:
        raise InputError(f"{out}: no examples to write (none in the input, or {len(missing)} images missing)")
    write_text_atomic(out, "\n".join(lines) + "\n")
    return len(lines), len(missing)


def main(argv=None):
    args = parse_args(argv)
    try:
        n, missing = convert(args)
    except (InputError, OSError) as e:
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    print(f"wrote {n} examples to {args.out}" + (f" ({missing} images missing, skipped)" if missing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
