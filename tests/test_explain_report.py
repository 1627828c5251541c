"""`npvlm IMAGE PROMPT --explain report.html` and `--explain-dir DIR` (npvlm/explain/report.py):
one self-contained page, written atomically and never over an input, that a real browser opens
without errors or network requests and whose heatmap follows a click on another answer token;
the maps as PNG files. The browser is headless Chromium (tests/browser.py; the Debian package
`chromium`, which .ci/run installs); without it those tests skip with the reason. A screenshot
of the page goes to $NPVLM_ARTIFACTS (.ci/run: ci-artifacts/) or the test's temporary folder."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from browser import Browser, find_chromium
from PIL import Image

import npvlm
from npvlm import cli
from npvlm.demo import SAMPLE_SCENE

PROMPT = "detect circle ; square ; triangle"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    path = folder / "why.html"
    assert cli.main([str(SAMPLE_SCENE), PROMPT, "--explain", str(path), "--explain-dir", str(folder / "maps")]) == 0
    return path


def page_data(path):
    html = path.read_text(encoding="utf-8")
    return html, json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S)
                            .group(1).replace("<\\/", "</"))


def test_the_page_is_self_contained_and_holds_the_explanation(report):
    html, data = page_data(report)
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", html), "the page loads something from a network"
    assert "default-src 'none'" in html                              # and its policy forbids it
    model = npvlm.load("demo")
    gen = model.generate(SAMPLE_SCENE, PROMPT)
    assert [t["id"] for t in data["tokens"]] == gen.tokens and data["answer"] == gen.text
    assert len(data["boxes"]) == 3 and {b["label"] for b in data["boxes"]} == {"circle", "square", "triangle"}
    n, L, H = len(gen.tokens), model.cfg.text.num_hidden_layers, model.cfg.text.num_attention_heads
    assert (data["layers"], data["heads"]) == (L, H)
    assert np.shape(data["maps"]["attention"]) == (n, L, H, model.cfg.num_image_tokens)
    assert np.shape(data["lens"]["top_text"]) == (n, L + 1, 5)
    assert not [p for p in report.parent.iterdir() if p.name.startswith(".")], "a temporary file was left"


def test_the_maps_folder(report):
    folder = report.parent / "maps"
    record = json.loads((folder / "explanation.json").read_text())
    n = len(record["tokens"])
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(f["file"] for f in record["files"])
    assert len(record["files"]) == 3 * n
    with Image.open(folder / "00_attention.png") as im:
        assert im.size[0] >= 256 and im.mode == "RGB"


def test_outputs_never_replace_what_the_user_has(tmp_path, capfd):
    image = tmp_path / "scene.png"
    image.write_bytes(Path(SAMPLE_SCENE).read_bytes())
    assert cli.main([str(image), "caption en", "--explain", str(image)]) == 1
    assert "refusing to overwrite the input file" in capfd.readouterr().err
    assert image.read_bytes() == Path(SAMPLE_SCENE).read_bytes()
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("keep")
    assert cli.main([str(image), "caption en", "--explain-dir", str(full)]) == 1
    assert "exists and is not an empty folder" in capfd.readouterr().err.strip().splitlines()[-1]
    assert [p.name for p in full.iterdir()] == ["mine.txt"]


@pytest.mark.skipif(find_chromium() is None, reason="no Chromium (apt-get install chromium): the page is not "
                                                    "opened in a browser")
def test_a_real_browser_opens_the_page_and_a_click_moves_the_heatmap(report, tmp_path):
    artifacts = Path(os.environ.get("NPVLM_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    heat = "document.getElementById('heat').dataset"
    with Browser() as b:
        b.open(report.as_uri())
        before = b.evaluate(f"({{...{heat}}})")
        assert before["token"] == "0" and before["signature"]
        b.click("#chips .chip:nth-child(5)")                   # "triangle"
        after = b.evaluate(f"({{...{heat}}})")
        assert after["token"] == "4" and after["signature"] != before["signature"]
        assert b.evaluate("document.querySelector('.chip.sel').dataset.index") == "4"
        b.evaluate("(() => { const k = document.getElementById('kind'); k.value = 'attention';"
                   " k.dispatchEvent(new Event('change')); })()")
        attention = b.evaluate(f"({{...{heat}}})")
        assert attention["kind"] == "attention" and attention["signature"] != after["signature"]
        assert b.evaluate("document.querySelectorAll('#boxes rect').length") == 3
        assert b.evaluate("document.querySelectorAll('#lens tr').length") == npvlm.load("demo").cfg.text.num_hidden_layers + 2
        b.screenshot(artifacts / "explain-report.png")
        assert not b.errors, b.errors
        assert all(u.startswith(("file:", "data:")) for u in b.requests), b.requests
    print(f"screenshot: {artifacts / 'explain-report.png'}")
