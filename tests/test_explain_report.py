"""`npvlm IMAGE PROMPT --explain report.html` and `--explain-dir DIR` (npvlm/explain/report.py):
one self-contained page, written atomically and never over an input, that a real browser opens
without errors or network requests and whose heatmap follows a click on another answer token;
the maps as PNG files. The browser is headless Chromium (tests/browser.py; the Debian package
`chromium`, which .ci/run installs); without it those tests skip with the reason. A screenshot
of the page goes to $NPVLM_ARTIFACTS (.ci/run: ci-artifacts/) or the test's temporary folder."""

import base64
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import npvlm
import npvlm.demo
from npvlm import cli
from npvlm.demo import SAMPLE_SCENE

from browser import Browser, find_chromium

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
    att = data["maps"]["attention"]
    assert att["shape"] == [n, L, H, model.cfg.num_image_tokens]
    q = np.frombuffer(base64.b64decode(att["q"]), np.uint8).reshape(att["shape"])
    exp = model.explain(SAMPLE_SCENE, PROMPT)
    np.testing.assert_allclose(q / 255 * np.asarray(att["scale"])[..., None], exp.image_attention, atol=1 / 255)
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
    image = tmp_path / "scene.html"                    # a PNG whatever its name: Pillow reads the content
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
        before = b.wait_until(f"{heat}.signature && ({{...{heat}}})")    # drawn (the pixel map loads async)
        assert before["token"] == "0"
        b.click("#chips .chip:nth-child(5)")                   # "triangle"
        after = b.wait_until(f"{heat}.token === '4' && ({{...{heat}}})")
        assert after["signature"] != before["signature"], "the heatmap's pixels did not change"
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


def test_outputs_are_checked_before_any_work(tmp_path, capfd):
    """Each output path: a name (not empty), an .html page, not inside the model folder, not the
    same place as another output, no symlink for the maps folder; one line each, nothing written."""
    page, maps = str(tmp_path / "why.html"), str(tmp_path / "maps")
    (tmp_path / "link").symlink_to(tmp_path)
    cases = [
        (["--explain", ""], "--explain needs a path, got an empty string"),
        (["--explain-dir", " "], "--explain-dir needs a path"),
        (["--explain", str(tmp_path / "why.png")], "give a file name ending in .html"),
        (["--explain", str(Path(npvlm.demo.MODEL_DIR) / "why.html")], "is inside the model folder"),
        (["--explain", page, "--explain-dir", page], "both write to"),
        (["--explain", str(tmp_path / "maps" / "why.html"), "--explain-dir", maps], "both write to"),
        (["--draw", str(tmp_path / "d.png"), "--explain-dir", str(tmp_path / "d.png")], "both write to"),
        (["--explain-dir", str(tmp_path / "link")], "exists and is not an empty folder"),
    ]
    for extra, message in cases:
        capfd.readouterr()
        assert cli.main([str(SAMPLE_SCENE), "caption en", *extra]) == 1, extra
        err = capfd.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error:") and message in err[-1], (extra, err)
        assert not any(line.startswith("loading") for line in err), "checked only after loading"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"]


def test_an_answer_with_the_image_token_is_refused(capfd):
    model = npvlm.load("demo")
    for answer in ("<image>", [model.cfg.image_token_index, 1]):
        with pytest.raises(npvlm.InputError, match="holds the <image> token"):
            model.explain(SAMPLE_SCENE, "caption en", answer=answer)


@pytest.mark.skipif(find_chromium() is None, reason="no Chromium (apt-get install chromium): the page is not "
                                                    "opened in a browser")
def test_no_text_breaks_the_page(tmp_path):
    """A prompt that tries to end the data, open a comment or fill a placeholder is shown as text."""
    prompt = "caption en <!--<script> __TITLE__ __DATA__ </script> & \"'"
    path = tmp_path / "odd.html"
    assert cli.main([str(SAMPLE_SCENE), prompt, "--explain", str(path), "--max-new-tokens", "4"]) == 0
    with Browser() as b:
        b.open(path.as_uri())
        assert b.wait_until("document.getElementById('subtitle').textContent") == "prompt: " + prompt \
            + "  \u00b7  model: demo"
        n = b.evaluate("JSON.parse(document.getElementById('data').textContent).tokens.length")
        assert n >= 1 and b.evaluate("document.querySelectorAll('.chip').length") == n
        assert not b.errors, b.errors
