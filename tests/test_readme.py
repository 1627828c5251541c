"""The README shows what the program really does: every `$ npvlm ...` example in it is run, and
its output compared with what the README prints (numbers such as times may differ); the bundled
sample's detections hit the true boxes at IoU >= 0.5 (the project's own bar); the synopsis lists
every option."""

import json
import re
import subprocess
import sys

import pytest

from npvlm.cli import build_parser
from npvlm.demo import SAMPLE_SEED
from npvlm.demo.scenes import make_scene
from npvlm.metrics import box_iou as iou

from helpers import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
NUMBER = re.compile(r"\d+\.\d+")


def examples():
    """(command, printed output lines) of every `$ npvlm` line in the README's text blocks."""
    out = []
    for block in re.findall(r"```text\n(.*?)```", README, re.S):
        lines = block.rstrip("\n").split("\n")
        starts = [i for i, line in enumerate(lines) if line.startswith("$ npvlm")]
        for k, i in enumerate(starts):
            end = starts[k + 1] if k + 1 < len(starts) else len(lines)
            out.append((lines[i][2:], lines[i + 1:end]))
    return out


def run_example(command, cwd):
    """The README's command with `npvlm` as this checkout's run.py, stderr where the shell puts it."""
    argv = command.replace("npvlm ", f"{sys.executable} {ROOT / 'run.py'} ", 1) if command != "npvlm" \
        else f"{sys.executable} {ROOT / 'run.py'}"
    argv = argv.replace("npvlm/demo/samples/", f"{ROOT}/npvlm/demo/samples/")
    r = subprocess.run(argv + ("" if "2>" in argv else " 2>&1"), shell=True, capture_output=True, text=True,
                       cwd=cwd, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.rstrip("\n").split("\n")


def test_the_readme_has_examples():
    assert len(examples()) >= 2


@pytest.mark.parametrize("command, printed", examples(), ids=[c for c, _ in examples()])
def test_each_readme_example_prints_what_the_readme_shows(command, printed, tmp_path):
    got = run_example(command, tmp_path)
    if "--json" in command:                           # one object: all but the timings as printed
        want, have = json.loads(printed[0]), json.loads(got[0])
        assert set(have["timings"]) == set(want["timings"])
        want.pop("timings"), have.pop("timings")
        assert have == want
        truth = make_scene(SAMPLE_SEED).objects
        for obj in have["objects"]:                   # every box hits its object (IoU >= 0.5)
            best = max(iou(obj["box_yxyx"], t.box) for t in truth if t.shape == obj["label"])
            assert best >= 0.5, (obj, best)
        return
    assert len(got) == len(printed), got
    for have, want in zip(got, printed):
        assert NUMBER.sub("#", have) == NUMBER.sub("#", want), (have, want)


def test_the_synopsis_lists_every_option():
    synopsis = README[README.index("npvlm [IMAGE [PROMPT]]"):]
    synopsis = synopsis[:synopsis.index("```")]
    missing = [a.option_strings[0] for a in build_parser()._actions
               if a.option_strings and a.option_strings[0] != "-h" and a.option_strings[0] not in synopsis]
    assert not missing, f"the README's synopsis lacks {missing}"
