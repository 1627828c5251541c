"""The linter: `ruff check .` with the project's configuration (pyproject.toml, [tool.ruff])
passes, and every `# noqa` says why."""

import re
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT


def test_ruff_passes():
    ruff = shutil.which("ruff", path=str(ROOT / ".venv" / "bin")) or shutil.which("ruff")
    command = [ruff] if ruff else [sys.executable, "-m", "ruff"]
    r = subprocess.run([*command, "check", "."], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if "No module named ruff" in r.stderr:
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_noqa_gives_a_reason():
    bare = []
    for path in sorted(ROOT.glob("**/*.py")):
        if any(part.startswith(".") or part in ("build", "bench_cache") for part in path.relative_to(ROOT).parts):
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            m = re.search(r"#\s*noqa\b(:\s*[A-Z]+[0-9]+(\s*,\s*[A-Z]+[0-9]+)*)?(.*)$", line)
            if m and not m.group(3).strip():
                bare.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not bare, "a # noqa without a reason:\n" + "\n".join(bare)
