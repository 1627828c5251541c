"""`python -m npvlm.evaluate` and the evaluation library (npvlm/evaluation): every score it
prints recomputed from its --predictions file with npvlm.metrics, batched answers equal to one
at a time, the detection scores equal to the answer tokens' log-probabilities (checked against
`explain`, whose log-probabilities equal transformers'), the task rules, and fine-tuning's
validation metric and --keep-best."""

import json

import numpy as np
import pytest
from PIL import Image

import npvlm
from npvlm import evaluate as command
from npvlm import finetune
from npvlm.demo.evaluate import EVAL_SEED, SCENE_SIZE
from npvlm.demo.scenes import make_scene, tasks
from npvlm.evaluation.run import check_examples, evaluate
from npvlm.evaluation.score import TaskScore, score_task, scored_records, task_of
from npvlm.generation.generate import Generation
from npvlm.inputs.examples import read_jsonl
from npvlm.metrics import bleu, cider, detection_map, exact_match, mask_iou, refexp_accuracy
from npvlm.tasks.detection import parse_detections
from npvlm.tasks.segmentation import load_vae, object_masks

from helpers import ROOT

VAE = ROOT / "tests" / "fixtures" / "vae" / "vae-tiny.npz"


def demo_data(folder, n_scenes=6, seed=EVAL_SEED, extra=None):
    """Every task of n held-out demo scenes as an evaluation JSONL (images beside it)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n_scenes):
        scene = make_scene(np.random.default_rng([seed, i]), size=SCENE_SIZE)
        Image.fromarray(scene.image).save(folder / f"s{i}.png")
        for prompt, answer in tasks(scene):
            lines.append({"image": f"s{i}.png", "prefix": prompt, "suffix": answer, **(extra or {})})
    path = folder / "test.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def demo():
    return npvlm.load("demo")


def run_command(capsys, *argv):
    assert command.main([*argv, "--quiet"]) == 0
    return capsys.readouterr()


def test_every_printed_score_is_its_metric_on_the_predictions_file(tmp_path, capsys):
    data = demo_data(tmp_path / "d")
    out = run_command(capsys, "--model", "demo", "--data", str(data), "--predictions", str(tmp_path / "p.jsonl"),
                      "--json", "--batch-size", "5")
    scores = json.loads(out.out)["scores"]
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rows] == list(range(1, len(rows) + 1)) and set(scores) == {"caption", "vqa", "detect"}
    by = {t: [r for r in rows if r["task"] == t] for t in scores}
    assert scores["vqa"]["accuracy"] == np.mean([exact_match(r["prediction"], r["references"], lower=True)
                                                 for r in by["vqa"]])
    caps = by["caption"]
    assert scores["caption"]["cider"] == pytest.approx(cider([r["prediction"] for r in caps],
                                                             [r["references"] for r in caps], tokenize=True), abs=1e-12)
    assert scores["caption"]["bleu4"] == bleu([r["prediction"] for r in caps], [r["references"] for r in caps],
                                              tokenize=True)
    det = detection_map([r["objects"] for r in by["detect"]], [r["references"] for r in by["detect"]])
    assert all(scores["detect"][k] == det[k] for k in ("map", "ap50", "ap75"))
    assert 0 < scores["detect"]["map"] < 1 and scores["vqa"]["examples"] == len(by["vqa"])
    # the ground truth is the suffix's boxes, in the image's pixels
    line = by["detect"][0]
    truth = parse_detections(read_jsonl(data)[line["line"] - 1].suffix, SCENE_SIZE, SCENE_SIZE).objects
    assert [o["box_yxyx"] for o in line["references"]] == [list(o.box) for o in truth]
    # the table says the same
    table = run_command(capsys, "--model", "demo", "--data", str(data), "--batch-size", "5").out
    assert f"| vqa | {len(by['vqa'])} | accuracy | {scores['vqa']['accuracy']:.4f} |" in table
    assert f"map | {scores['detect']['map']:.4f} |" in table and "fewer than 4 answers" in table


def test_batched_answers_equal_one_at_a_time(tmp_path, demo):
    examples = read_jsonl(demo_data(tmp_path, n_scenes=2))
    result = evaluate(demo, examples, batch_size=7, quiet=True)
    for e, row in list(zip(examples, result.rows))[::3]:
        assert row["prediction"] == demo.generate(e.image, e.prefix).text


def test_logprobs_equal_explains(demo):
    """generate(logprobs=True) reads log p of each chosen token at each decode step; explain
    computes them in one forward pass with the answer forced (and equals transformers there)."""
    image = ROOT / "npvlm" / "demo" / "samples" / "scene.png"
    for prompt in ("detect circle ; square ; triangle", "caption en"):
        g = demo.generate(image, prompt, logprobs=True)
        exp = demo.explain(image, prompt, answer=g.tokens)
        np.testing.assert_allclose(g.logprobs, exp.logprobs, atol=2e-5)
    assert demo.generate(image, "caption en").logprobs is None


def test_a_detected_objects_score_is_its_tokens_mean_logprob(demo):
    image = ROOT / "npvlm" / "demo" / "samples" / "scene.png"
    g = demo.generate(image, "detect circle ; square ; triangle", logprobs=True)
    tok = demo.processor.tokenizer
    records = [[]]
    # independently: split the ids at the tokens whose text holds ';', leave out <eos> and the
    # tokens that are only a space (the records' tokens: 4 <loc> and the label's)
    for t, lp in zip(g.tokens, g.logprobs):
        piece = tok.piece(t)
        if t == tok.eos_id:
            break
        if ";" in piece:
            records.append([])
        elif piece.replace("\u2581", "").strip():
            records[-1].append(lp)
    assert [len(r) for r in records] == [5, 5, 5]
    got = scored_records(g, tok)
    assert len(got) == len(records) == 3
    assert [s for _, s in got] == pytest.approx([np.mean(r) for r in records], abs=1e-12)
    assert [t for t, _ in got] == [r.strip() for r in g.text.split(";")]


def test_task_rules(tmp_path):
    lines = [{"prefix": "caption en"}, {"prefix": "detect cat"}, {"prefix": "detect cat", "box_yxyx": [0, 0, 1, 1]},
             {"prefix": "segment cat"}, {"prefix": "ocr"}, {"prefix": "answer en why?"}, {"prefix": "question x"},
             {"prefix": "describe en"}]
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"image": "a.png", "suffix": "x", **x}) + "\n" for x in lines))
    examples = read_jsonl(tmp_path / "t.jsonl")
    assert [task_of(e) for e in examples] == ["caption", "detect", "refexp", "segment", "anls", "vqa", "vqa", "exact"]
    assert {task_of(e, "relaxed") for e in examples} == {"relaxed"}


def test_vqa_with_ten_answers_uses_vqa_accuracy_and_forced_tasks(tmp_path, demo):
    data = demo_data(tmp_path, n_scenes=3)
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    color = [r for r in rows if "what color" in r["prefix"]]
    for r in color:                                   # ten answers: 4 say the truth, 6 something else
        r["answers"] = [r["suffix"]] * 4 + ["purple"] * 6
    data.write_text("".join(json.dumps(r) + "\n" for r in color))
    examples = read_jsonl(data)
    result = evaluate(demo, examples, quiet=True)
    got = result.tasks["vqa"]
    # a right answer matches 4 of 10: each leaves 3 or 4 others -> 1.0; a wrong one 0
    assert got.scores == [float(p == r["suffix"]) for p, r in zip([x["prediction"] for x in result.rows], color)]
    assert got.note == ""
    forced = evaluate(demo, examples, task="anls", quiet=True)
    assert list(forced.tasks) == ["anls"] and forced.tasks["anls"].metrics["anls"] >= got.metrics["accuracy"]


def test_refexp_with_box_yxyx(tmp_path, demo):
    scene = make_scene(np.random.default_rng([EVAL_SEED, 1]), size=SCENE_SIZE)
    Image.fromarray(scene.image).save(tmp_path / "a.png")
    lines = [{"image": "a.png", "prefix": f"detect {o.shape}", "suffix": "x", "box_yxyx": list(map(float, o.box))}
             for o in scene.objects]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = evaluate(demo, read_jsonl(tmp_path / "r.jsonl"), quiet=True)
    ts = result.tasks["refexp"]
    for row, line in zip(result.rows, lines):
        first = parse_detections(row["prediction"], SCENE_SIZE, SCENE_SIZE).objects
        assert row["score"] == refexp_accuracy(list(first[0].box) if first else None, line["box_yxyx"])
    assert ts.metrics["accuracy"] == np.mean(ts.scores) > 0


def test_segment_scores_mask_iou(tmp_path, demo):
    """The demo writes no <seg> codes, so the scoring is checked on given answers: a mask from
    the answer's codes (the VAE), against a mask file and against the suffix's own codes."""
    vae = load_vae(VAE)
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    target = np.zeros((30, 40), bool)
    target[5:20, 10:30] = True
    Image.fromarray(target.astype(np.uint8) * 255).save(tmp_path / "m.png")
    segs = "".join(f"<seg{c:03d}>" for c in range(16))
    answer = f"<loc0100><loc0200><loc0700><loc0800>{segs} cat"
    lines = [{"image": "a.png", "prefix": "segment cat", "suffix": answer, "mask": "m.png"},
             {"image": "a.png", "prefix": "segment cat", "suffix": answer}]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    examples = read_jsonl(tmp_path / "s.jsonl")
    tasks_, truths = check_examples(examples, vae=vae)
    gens = [Generation(answer, [], "eos", image_size=(40, 30)), Generation("cat", [], "eos", image_size=(40, 30))]
    ts = score_task("segment", examples, gens, truths, demo.processor.tokenizer, vae=vae)
    predicted = object_masks(parse_detections(answer, 40, 30).objects, vae, 40, 30)[0]
    assert ts.scores == [mask_iou(predicted, target), 0.0]          # no mask in the second answer: 0
    assert ts.metrics["miou"] == np.mean(ts.scores) and isinstance(ts, TaskScore)
    assert 0 < ts.scores[0] < 1


def test_finetune_reports_the_val_metric_and_keeps_the_best(tmp_path):
    data = demo_data(tmp_path / "d", n_scenes=3, seed=5)
    val = demo_data(tmp_path / "v", n_scenes=2, seed=6)
    argv = ["--model", "demo", "--data", str(data), "--val", str(val), "--out", str(tmp_path / "out"), "--steps", "4",
            "--eval-every", "1", "--batch-size", "4", "--lr", "0.3", "--keep-best", "val_loss", "--quiet",
            "--save-dtype", "float32"]           # the demo is stored in bfloat16: kept exact here
    assert finetune.main(argv) == 0
    log = json.loads((tmp_path / "out" / "npvlm_finetune.json").read_text())["log"]
    assert all(set(e["val_metrics"]) == {"caption", "vqa", "detect"} for e in log)
    best = min(log, key=lambda e: e["val_loss"])
    assert best.get("best") and best["step"] != log[-1]["step"]      # so the weights must be restored
    # the exported weights are the best validation's: their validation loss is the logged one
    from npvlm.training.loop import TrainConfig, validation_loss
    model = npvlm.load(tmp_path / "out")
    loss = validation_loss(model, model.params, read_jsonl(val), TrainConfig(batch_size=4))
    assert loss == pytest.approx(best["val_loss"], abs=1e-5)


def test_keep_best_survives_a_resume(tmp_path):
    """Stopped after the best validation and resumed: the export is still the best step's."""
    data = demo_data(tmp_path / "d", n_scenes=3, seed=5)
    val = demo_data(tmp_path / "v", n_scenes=2, seed=6)
    argv = ["--model", "demo", "--data", str(data), "--val", str(val), "--out", str(tmp_path / "out"), "--steps", "4",
            "--eval-every", "1", "--batch-size", "4", "--lr", "0.3", "--keep-best", "val_loss", "--quiet",
            "--save-dtype", "float32", "--no-val-metric"]
    assert finetune.run(finetune.parse_args(argv), on_step=lambda e: e["step"] == 2) == 0     # stopped, state saved
    assert finetune.main([*argv, "--resume"]) == 0
    log = json.loads((tmp_path / "out" / "npvlm_finetune.json").read_text())["log"]
    best = min(log, key=lambda e: e["val_loss"])
    assert best["step"] <= 2 and "val_metrics" not in log[0]
    from npvlm.training.loop import TrainConfig, validation_loss
    model = npvlm.load(tmp_path / "out")
    assert validation_loss(model, model.params, read_jsonl(val), TrainConfig(batch_size=4)) == \
        pytest.approx(best["val_loss"], abs=1e-5)


def test_vqa_accuracy_needs_four_answers_and_a_line_may_name_its_task(tmp_path, demo):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    lines = [{"prefix": "answer en what?", "suffix": "x", "answers": ["yes"] * 3},
             {"prefix": "answer en what?", "suffix": "x", "answers": ["yes"] * 4},
             {"prefix": "answer en what?", "suffix": "x", "answers": ["abc"], "task": "anls"}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"image": "a.png", **x}) + "\n" for x in lines))
    examples = read_jsonl(tmp_path / "t.jsonl")
    assert [task_of(e) for e in examples] == ["vqa", "vqa", "anls"]
    gens = [Generation("yes", [], "eos", image_size=(8, 8))] * 2
    ts = score_task("vqa", examples[:2], gens, [["yes"] * 3, ["yes"] * 4], demo.processor.tokenizer)
    assert ts.scores == [1.0, 1.0] and "1 of 2 lines have fewer than 4 answers" in ts.note
    assert read_jsonl(tmp_path / "t.jsonl", limit=1) == examples[:1]


def test_jsonl_lines_end_at_newlines_only(tmp_path):
    """A JSON string may hold U+2028 (splitlines would cut it); a BOM on the first line is
    skipped; a line that is not UTF-8 is named; --limit stops reading (a bad line after it is
    never seen)."""
    from npvlm.errors import InputError
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    good = json.dumps({"image": "a.png", "prefix": "caption en", "suffix": "a\u2028b"}, ensure_ascii=False)
    (tmp_path / "t.jsonl").write_bytes(b"\xef\xbb\xbf" + good.encode() + b"\r\n" + b'{"image": \xff}\n')
    assert [e.suffix for e in read_jsonl(tmp_path / "t.jsonl", limit=1)] == ["a\u2028b"]
    with pytest.raises(InputError, match="t.jsonl line 2: not UTF-8 text"):
        read_jsonl(tmp_path / "t.jsonl")


def test_json_output_carries_the_options_and_notes(tmp_path, capsys):
    data = demo_data(tmp_path, n_scenes=1)
    out = json.loads(run_command(capsys, "--model", "demo", "--data", str(data), "--json", "--limit", "1").out)
    assert out["task"] == "auto" and out["loc_divisor"] == 1024 and out["examples"] == 1
    assert out["scores"]["caption"]["cider"] == 0.0 and "one caption" in out["notes"]["caption"]


def test_a_state_saved_before_val_and_keep_best_were_recorded_resumes(tmp_path):
    data = demo_data(tmp_path / "d", n_scenes=1, seed=5)
    argv = ["--model", "demo", "--data", str(data), "--out", str(tmp_path / "out"), "--steps", "2", "--batch-size", "4",
            "--quiet"]
    assert finetune.run(finetune.parse_args(argv), on_step=lambda e: True) == 0
    state = tmp_path / "out.work" / "state.json"
    meta = json.loads(state.read_text())
    del meta["options"]["val"], meta["options"]["keep_best"]            # as the previous version saved it
    state.write_text(json.dumps(meta))
    assert finetune.main([*argv, "--resume"]) == 0
    assert (tmp_path / "out" / "config.json").is_file()
