"""Hub ids (npvlm/loading/hub.py): `npvlm.load("google/paligemma-3b-mix-224")` and `--model ORG/NAME` find
the model in a local Hugging Face cache laid out as huggingface_hub writes it
(models--org--name/{blobs,refs,snapshots}), offline (HF_HUB_OFFLINE=1); the demo model stands in
for the real weights. No network is used."""

import hashlib
import os
import shutil
import subprocess
import sys

import pytest

import npvlm
from npvlm.demo import MODEL_DIR, SAMPLE_SCENE
from npvlm.errors import ConfigError
from npvlm.loading import hub

from helpers import ROOT, one_line_error, write_random_model

REPO = "google/paligemma-3b-mix-224"
REVISION = "0123456789abcdef0123456789abcdef01234567"
pytest.importorskip("huggingface_hub", reason="huggingface_hub not installed: pip install -e '.[hub]'")


def make_cache(cache, repo, source):
    """`source`'s files as a cached snapshot of `repo`: content-addressed blobs, refs/main, and a
    snapshot folder of symlinks (the huggingface_hub cache layout)."""
    org, name = repo.split("/")
    root = cache / f"models--{org}--{name}"
    snapshot = root / "snapshots" / REVISION
    for folder in (root / "blobs", root / "refs", snapshot):
        folder.mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(REVISION)
    for f in source.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, root / "blobs" / digest)
        os.symlink(f"../../blobs/{digest}", snapshot / f.name)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf" / "hub"
    snapshot = make_cache(cache, REPO, MODEL_DIR)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snapshot


def test_hub_id_loads_from_the_cache(offline_cache):
    model = npvlm.load(REPO)
    assert model.path == offline_cache
    demo = npvlm.load("demo")
    assert model.generate(SAMPLE_SCENE, "caption en").text == demo.generate(SAMPLE_SCENE, "caption en").text


def test_hf_home_is_honoured(tmp_path, monkeypatch):
    make_cache(tmp_path / "home" / "hub", REPO, MODEL_DIR)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert npvlm.load(REPO).path.parent.parent.name == "models--google--paligemma-3b-mix-224"


def test_offline_and_not_cached_is_one_line(offline_cache):
    msg = one_line_error(ConfigError, lambda: npvlm.load("google/paligemma2-3b-pt-224"),
                         "google/paligemma2-3b-pt-224: not in the Hugging Face cache",
                         "HF_HUB_OFFLINE is set", "hf download google/paligemma2-3b-pt-224",
                         "accept its license at https://huggingface.co/google/paligemma2-3b-pt-224")
    print(msg)


def test_a_local_folder_wins_over_a_hub_id(offline_cache, tmp_path, monkeypatch):
    local = write_random_model(tmp_path / "work" / "google" / "paligemma-3b-mix-224")
    monkeypatch.chdir(tmp_path / "work")
    assert npvlm.load(REPO).path.resolve() == local.resolve()


def test_cli_takes_a_hub_id(offline_cache):
    env = {**os.environ, "HF_HUB_CACHE": os.environ["HF_HUB_CACHE"], "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "run.py"), str(SAMPLE_SCENE), "caption en",
                        "--model", REPO], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "a green triangle, a yellow circle and a blue square\n"


def test_without_huggingface_hub_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)      # import fails
    one_line_error(ConfigError, lambda: hub.resolve(REPO), "pip install 'npvlm[hub]'")
    assert hub.resolve("demo") == MODEL_DIR                        # other names need no hub
