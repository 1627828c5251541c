"""BLAS's thread count (npvlm/threads.py): all cores on a quiet machine, fewer beside processes
that keep cores busy, chosen once per load; NPVLM_THREADS, --threads and set_threads fix it; a
resumed fine-tune keeps the saved run's count. (The rest of the suite runs at a fixed count:
tests/conftest.py.)"""

import json
import os
import subprocess
import sys

import pytest

from npvlm import finetune, threads
from npvlm.errors import InputError

from helpers import ROOT, make_data


@pytest.fixture
def unfixed():
    """threads.py's choice from the load, as a user gets it; the suite's fixed count after."""
    saved = dict(threads._state)
    threads._state.update(fixed=None, settled=False)
    yield
    threads._state.update(saved)
    threads.set_threads(saved["fixed"])


@pytest.mark.parametrize("others, cpus, default, want", [
    (0.0, 2, 2, 2),            # quiet: BLAS's own default
    (0.4, 2, 2, 2),            # under half a core: noise (an editor, a shell)
    (0.6, 2, 2, 1),            # half a core or more holds one
    (1.0, 2, 2, 1),
    (2.0, 2, 2, 1),            # every core busy: still one thread
    (3.5, 2, 2, 1),
    (1.0, 4, 4, 3),
    (2.4, 8, 8, 6),
    (0.0, 8, 1, 1),            # OPENBLAS_NUM_THREADS=1: never more than BLAS's own default
    (0.0, 8, 4, 4),
])
def test_the_count_for_a_load(others, cpus, default, want):
    assert threads.threads_for(others, cpus, default) == want


def fake_machine(monkeypatch, others_cores):
    """/proc/stat and the clocks of a machine where other processes use `others_cores` cores and
    this process none: each look advances time by 0.5 s."""
    clock = {"t": 100.0}

    def perf_counter():
        clock["t"] += 0.5
        return clock["t"]

    monkeypatch.setattr(threads.time, "perf_counter", perf_counter)
    monkeypatch.setattr(threads.time, "process_time", lambda: 1.0)
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    monkeypatch.setattr(threads, "_busy_seconds", lambda: others_cores * clock["t"])
    monkeypatch.setattr(threads, "_cpus", lambda: 2)
    monkeypatch.setattr(threads, "default_threads", lambda: 2)
    threads._state["look"] = None          # no look from before the fake clock


@pytest.mark.parametrize("others, want", [(0.0, 2), (1.0, 1), (2.0, 1)])
def test_the_choice_is_made_at_the_first_computation_and_kept(monkeypatch, unfixed, others, want):
    applied = []
    monkeypatch.setattr(threads, "_apply", applied.append)
    fake_machine(monkeypatch, others)
    threads.on_load()
    threads.settle()
    threads.settle()                       # kept: no second look, no second count
    assert applied == [want]
    fake_machine(monkeypatch, 2.0 - others)
    threads.on_load()                      # a new load chooses again
    threads.settle()
    assert applied == [want, threads.threads_for(2.0 - others, 2, 2)]


def test_fixed_counts_win_and_none_chooses_again(monkeypatch, unfixed):
    applied = []
    monkeypatch.setattr(threads, "_apply", applied.append)
    fake_machine(monkeypatch, 2.0)
    monkeypatch.setenv("NPVLM_THREADS", "2")
    threads.on_load()
    threads.settle()
    assert applied == [2]                  # the environment's count, not the load's
    monkeypatch.delenv("NPVLM_THREADS")
    threads.set_threads(2)
    threads.on_load()
    threads.settle()
    assert applied == [2, 2]               # set_threads stays through loads
    threads.set_threads(None)
    threads.settle()
    assert applied == [2, 2, 1]            # None: chosen from the (busy) machine


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_set_threads_refuses_what_is_no_count(bad):
    with pytest.raises(InputError, match="threads must be an integer >= 1"):
        threads.set_threads(bad)


def test_set_threads_sets_blas(unfixed):
    threads.set_threads(1)
    assert threads.blas_threads() == 1
    threads.set_threads(threads.default_threads())
    assert threads.blas_threads() == threads.default_threads()


def run_py(code, env=None, timeout=120):
    env = {**{k: v for k, v in os.environ.items() if k != "NPVLM_THREADS"}, **(env or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


CHOSEN = ("import npvlm\nfrom npvlm.demo import SAMPLE_SCENE\n"
          "from npvlm.threads import blas_threads, default_threads\n"
          "npvlm.load('demo').generate(SAMPLE_SCENE, 'caption en')\nprint(blas_threads(), default_threads())")


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or not os.path.exists("/proc/stat"),
                    reason="the load is read from Linux's /proc/stat")
def test_beside_processes_that_hold_every_core_the_demo_runs_one_thread():
    """A real busy machine: one spinning process per core, started before npvlm."""
    cpus = len(os.sched_getaffinity(0))
    if cpus > 16:
        pytest.skip(f"{cpus} cores: too many spinning processes to start")
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cpus)]
    try:
        r = run_py(CHOSEN)
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "1", r.stdout


def test_npvlm_threads_fixes_the_count_and_a_bad_value_is_one_line():
    r = run_py(CHOSEN, {"NPVLM_THREADS": "1"})
    assert r.returncode == 0 and r.stdout.split()[0] == "1", r.stdout + r.stderr
    for bad in ("0", "two", "-3"):
        r = subprocess.run([sys.executable, str(ROOT / "run.py")], capture_output=True, text=True,
                           env={**os.environ, "NPVLM_THREADS": bad}, timeout=120)
        assert r.returncode == 1 and r.stderr.strip().splitlines() == [
            f"error: NPVLM_THREADS must be an integer >= 1, got {bad!r}; unset it to let npvlm choose "
            "from the machine's load"], r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "run.py"), "--threads", "0"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == "error: --threads must be >= 1, got 0", r.stderr


def test_the_commands_take_threads():
    r = subprocess.run([sys.executable, str(ROOT / "run.py"), "--threads", "1", "--json"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout)["text"], r.stderr


def test_a_resumed_fine_tune_keeps_the_saved_runs_thread_count(tmp_path, capfd, unfixed):
    data = make_data(tmp_path / "d", n=4)
    common = ["--model", "demo", "--data", str(data), "--out", str(tmp_path / "o"), "--steps", "3",
              "--batch-size", "2", "--quiet"]
    assert finetune.run(finetune.parse_args([*common, "--threads", "1"]),
                        on_step=lambda entry: entry["step"] == 1) == 0
    assert json.loads((tmp_path / "o.work" / "state.json").read_text())["blas_threads"] == 1
    threads.set_threads(None)                      # a new process: nothing fixed
    capfd.readouterr()
    assert finetune.main([*common, "--resume"]) == 0
    assert ", 1 BLAS thread\n" in capfd.readouterr().err
    assert json.loads((tmp_path / "o" / "npvlm_finetune.json").read_text())["blas_threads"] == 1
