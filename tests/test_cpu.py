"""How npvlm runs on the CPU (npvlm/cpu.py). BLAS's thread count: all cores on a quiet machine,
fewer beside processes that keep cores busy, chosen once per load; NPVLM_THREADS, --threads and
set_threads fix it; a resumed fine-tune keeps the saved run's count. (The rest of the suite runs
at a fixed count: tests/conftest.py.) glibc's allocator: freed temporaries are reused, not
faulted in again, unless the user set glibc's own thresholds."""

import json
import os
import subprocess
import sys

import pytest

from npvlm import cpu, finetune
from npvlm.errors import InputError

from helpers import ROOT, make_data


@pytest.fixture
def unfixed():
    """cpu.py's choice from the load, as a user gets it; the suite's fixed count after."""
    saved = dict(cpu._state)
    cpu._state.update(fixed=None, settled=False)
    yield
    cpu._state.update(saved)
    cpu.set_threads(saved["fixed"])


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
    assert cpu.threads_for(others, cpus, default) == want


def fake_machine(monkeypatch, others_cores):
    """/proc/stat and the clocks of a machine where other processes use `others_cores` cores and
    this process none: each look advances time by 0.5 s."""
    clock = {"t": 100.0}

    def perf_counter():
        clock["t"] += 0.5
        return clock["t"]

    monkeypatch.setattr(cpu.time, "perf_counter", perf_counter)
    monkeypatch.setattr(cpu.time, "process_time", lambda: 1.0)
    monkeypatch.setattr(cpu.time, "sleep", lambda s: None)
    monkeypatch.setattr(cpu, "_busy_seconds", lambda: others_cores * clock["t"])
    monkeypatch.setattr(cpu, "_cpus", lambda: 2)
    monkeypatch.setattr(cpu, "default_threads", lambda: 2)
    cpu._state["look"] = None          # no look from before the fake clock


@pytest.mark.parametrize("others, want", [(0.0, 2), (1.0, 1), (2.0, 1)])
def test_the_choice_is_made_at_the_first_computation_and_kept(monkeypatch, unfixed, others, want):
    applied = []
    monkeypatch.setattr(cpu, "_apply", applied.append)
    fake_machine(monkeypatch, others)
    cpu.on_load()
    cpu.settle()
    cpu.settle()                       # kept: no second look, no second count
    assert applied == [want]
    fake_machine(monkeypatch, 2.0 - others)
    cpu.on_load()                      # a new load chooses again
    cpu.settle()
    assert applied == [want, cpu.threads_for(2.0 - others, 2, 2)]


def test_fixed_counts_win_and_none_chooses_again(monkeypatch, unfixed):
    applied = []
    monkeypatch.setattr(cpu, "_apply", applied.append)
    fake_machine(monkeypatch, 2.0)
    monkeypatch.setenv("NPVLM_THREADS", "2")
    cpu.on_load()
    cpu.settle()
    assert applied == [2]                  # the environment's count, not the load's
    monkeypatch.delenv("NPVLM_THREADS")
    cpu.set_threads(2)
    cpu.on_load()
    cpu.settle()
    assert applied == [2, 2]               # set_threads stays through loads
    cpu.set_threads(None)
    cpu.settle()
    assert applied == [2, 2, 1]            # None: chosen from the (busy) machine


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_set_threads_refuses_what_is_no_count(bad):
    with pytest.raises(InputError, match="threads must be an integer >= 1"):
        cpu.set_threads(bad)


def test_set_threads_sets_blas(unfixed):
    cpu.set_threads(1)
    assert cpu.blas_threads() == 1
    cpu.set_threads(cpu.default_threads())
    assert cpu.blas_threads() == cpu.default_threads()


def run_py(code, env=None, timeout=120):
    env = {**{k: v for k, v in os.environ.items() if k != "NPVLM_THREADS"}, **(env or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


CHOSEN = ("import npvlm\nfrom npvlm.demo import SAMPLE_SCENE\n"
          "from npvlm.cpu import blas_threads, default_threads\n"
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
    cpu.set_threads(None)                      # a new process: nothing fixed
    capfd.readouterr()
    assert finetune.main([*common, "--resume"]) == 0
    assert ", 1 BLAS thread\n" in capfd.readouterr().err
    assert json.loads((tmp_path / "o" / "npvlm_finetune.json").read_text())["blas_threads"] == 1


FAULTS = """
import resource, sys
import numpy as np
from npvlm import cpu
kept = cpu.keep_freed_memory() if sys.argv[1] == "keep" else None
def cycle():                          # what a prefill does: big temporaries made, then all freed
    temporaries = [np.ones(5_000_000, np.float32) for _ in range(3)]       # 20 MB each
    del temporaries
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    cycle()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(cpu._libc_name() != "glibc", reason="the allocator's thresholds are glibc's")
def test_freed_temporaries_are_reused_not_faulted_in_again():
    """glibc alone returns part of the freed 60 MB to the kernel and faults it in again (~5,000
    pages over 5 cycles here, glibc 2.36); with npvlm's thresholds there is no page fault."""
    kept, faults = run_py(FAULTS.replace("sys.argv[1]", "'keep'")).stdout.split()
    alone = run_py(FAULTS.replace("sys.argv[1]", "'no'")).stdout.split()
    print(f"page faults over 5 cycles: {faults} kept, {alone[1]} with glibc's own thresholds")
    assert kept == "True" and int(faults) < 100 and int(alone[1]) > 1_000


@pytest.mark.skipif(cpu._libc_name() != "glibc", reason="the allocator's thresholds are glibc's")
@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "131072"}, {"MALLOC_MMAP_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}])
def test_the_users_own_malloc_thresholds_are_left_alone(env):
    r = run_py(FAULTS.replace("sys.argv[1]", "'keep'"), env)
    assert r.stdout.split()[0] == "False", r.stdout + r.stderr
