"""How npvlm runs on the CPU (npvlm/cpu.py). BLAS's thread count: all cores on a quiet machine,
fewer beside processes that keep cores busy (capped by a cgroup quota), chosen at each model's
first computation and kept with the model; NPVLM_THREADS, --threads and set_threads fix it, the
commands only while they run; a resumed fine-tune keeps the saved run's count. (The rest of the suite runs
at a fixed count: tests/conftest.py.) glibc's allocator: freed temporaries are reused, not
faulted in again, unless the user set glibc's own thresholds."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from npvlm import cpu, finetune
from npvlm.errors import InputError

from helpers import ROOT, make_data


@pytest.fixture
def unfixed(monkeypatch):
    """cpu.py's choice from the load, as a user gets it (no NPVLM_THREADS, nothing fixed); the
    suite's fixed count after."""
    monkeypatch.delenv("NPVLM_THREADS", raising=False)
    before = cpu._state["fixed"]
    cpu.set_threads(None)
    yield
    cpu.set_threads(before)


@pytest.mark.parametrize("others, cores, default, want", [
    (0.0, 2, 2, 2),            # quiet: BLAS's own default
    (0.4, 2, 2, 2),            # under half a core: noise (an editor, a shell)
    (0.6, 2, 2, 1),            # half a core or more holds one
    (1.0, 2, 2, 1),
    (2.0, 2, 2, 1),            # every core busy: still one thread
    (3.5, 2, 2, 1),
    (1.0, 4, 4, 3),
    (2.4, 8, 8, 6),
    (2.5, 8, 8, 5),            # halves hold the next core up
    (0.0, 8, 1, 1),            # OPENBLAS_NUM_THREADS=1: never more than BLAS's own default
    (0.0, 8, 4, 4),
])
def test_the_count_for_a_load(others, cores, default, want):
    assert cpu.threads_for(others, cores, default) == want


def fake_machine(monkeypatch, others):
    """/proc/stat and the clocks of a 2-core machine where other processes use `others` cores
    and this process none: each reading of the clock advances it by 0.5 s. -> what was applied."""
    clock = {"t": 100.0}

    def perf_counter():
        clock["t"] += 0.5
        return clock["t"]

    applied = []
    monkeypatch.setattr(cpu.time, "perf_counter", perf_counter)
    monkeypatch.setattr(cpu.time, "process_time", lambda: 1.0)
    monkeypatch.setattr(cpu.time, "sleep", lambda s: None)
    monkeypatch.setattr(cpu, "_busy_seconds", lambda: others["cores"] * clock["t"])
    monkeypatch.setattr(cpu, "usable_cores", lambda: 2)
    monkeypatch.setattr(cpu, "default_threads", lambda: 2)
    monkeypatch.setattr(cpu, "_apply", applied.append)
    monkeypatch.setitem(cpu._state, "look", None)          # no look from before the fake clock
    return applied


@pytest.mark.parametrize("busy, want", [(0.0, 2), (1.0, 1), (2.0, 1)])
def test_each_model_chooses_at_its_first_computation_and_keeps_its_count(monkeypatch, unfixed, busy, want):
    machine = {"cores": busy}
    applied = fake_machine(monkeypatch, machine)
    cpu.on_load()
    a = cpu.settle(cpu.FIRST)                         # model A's first computation
    a = cpu.settle(a)                                 # and its next
    assert applied == [want, want]
    machine["cores"] = 2.0 - busy                     # the load changes; model B is loaded
    cpu.on_load()
    cpu.settle(cpu.FIRST)
    other = cpu.threads_for(2.0 - busy, 2, 2)
    assert applied == [want, want, other]
    cpu.settle(a)                                     # A computes again: A's count, not B's
    assert applied[-1] == want
    assert cpu.settle() == a                          # bare parameters: the latest computation's count


def test_fixed_counts_win_and_none_chooses_again(monkeypatch, unfixed):
    applied = fake_machine(monkeypatch, {"cores": 2.0})
    monkeypatch.setenv("NPVLM_THREADS", "2")
    choice = cpu.settle(cpu.FIRST)
    assert applied == [2]                             # the environment's count, not the load's
    monkeypatch.delenv("NPVLM_THREADS")
    cpu.set_threads(2)
    cpu.settle(choice)
    cpu.settle(cpu.FIRST)
    assert applied == [2, 2, 2, 2]                    # set_threads applies, and wins for every model
    cpu.set_threads(None)
    cpu.settle(choice)
    assert applied == [2, 2, 2, 2, 1]                 # None: chosen again, from the (busy) machine


def test_a_stale_look_is_renewed_before_a_choice(monkeypatch, unfixed):
    """A model loaded long before its first computation chooses from the last WINDOW_S, not from
    the average since its load: quiet for 5 s after the load, then busy."""
    applied = fake_machine(monkeypatch, {"cores": 0.0})
    cpu.on_load()
    for _ in range(10):
        cpu.time.perf_counter()                       # 5 s pass, quiet
    busy_since = cpu.time.perf_counter()
    monkeypatch.setattr(cpu, "_busy_seconds", lambda: 2.0 * max(0.0, cpu.time.perf_counter() - busy_since))
    cpu.settle(cpu.FIRST)
    assert applied == [1]                             # the 5.5 s average would say 0.2 cores: 2 threads


def test_fixed_for_a_block_restores_the_setting(unfixed):
    with cpu.threads_fixed(1):
        assert cpu._state["fixed"] == 1 and cpu.blas_threads() == 1
    assert cpu._state["fixed"] is None
    with cpu.threads_fixed(None):
        assert cpu._state["fixed"] is None


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", np.int64(0)])
def test_set_threads_refuses_what_is_no_count(bad):
    with pytest.raises(InputError, match="threads must be an integer >= 1"):
        cpu.set_threads(bad)


def test_set_threads_sets_blas(unfixed):
    cpu.set_threads(np.int64(1))
    assert cpu.blas_threads() == 1
    cpu.set_threads(cpu.default_threads())
    assert cpu.blas_threads() == cpu.default_threads()


@pytest.mark.parametrize("files, want", [
    ({"proc": "0::/user.slice\n", "user.slice/cpu.max": "150000 100000\n"}, 2),
    ({"proc": "0::/\n", "cpu.max": "max 100000\n"}, None),
    ({"proc": "0::/\n", "cpu.max": "100000 100000\n"}, 1),
    ({"proc": "4:cpu,cpuacct:/docker/abc\n2:memory:/docker/abc\n",
      "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "250000\n", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"}, 3),
    ({"proc": "4:cpu:/\n", "cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"proc": "0::/\n"}, None),                                  # no cpu.max: no limit known
])
def test_a_cgroup_cpu_quota_caps_the_cores(tmp_path, files, want):
    for name, text in files.items():
        path = tmp_path / ("proc_cgroup" if name == "proc" else f"root/{name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert cpu._cgroup_quota(str(tmp_path / "proc_cgroup"), str(tmp_path / "root")) == want


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
    """A real busy machine: one spinning process per usable core, started before npvlm."""
    cores = cpu.usable_cores()
    if cores > 16 or cpu.default_threads() == 1:
        pytest.skip(f"{cores} cores, BLAS default {cpu.default_threads()}: nothing to tell apart")
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        r = run_py(CHOSEN)
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "1", r.stdout


def test_npvlm_threads_fixes_the_count_and_a_bad_value_is_one_line():
    for n in ("1", "2"):                  # both: the load alone could not give both
        r = run_py(CHOSEN, {"NPVLM_THREADS": n})
        assert r.returncode == 0 and r.stdout.split()[0] == n, r.stdout + r.stderr
    for bad in ("0", "two", "-3", "\u00b2"):
        r = subprocess.run([sys.executable, str(ROOT / "run.py")], capture_output=True, text=True,
                           env={**os.environ, "NPVLM_THREADS": bad}, timeout=120)
        assert r.returncode == 1 and r.stderr.strip().splitlines() == [
            f"error: NPVLM_THREADS must be an integer >= 1, got {bad!r}; unset it to let npvlm choose "
            "from the machine's load"], r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "run.py"), "--threads", "0"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == "error: --threads must be >= 1, got 0", r.stderr


def test_the_commands_take_threads_and_leave_the_session_as_they_found_it(capfd, unfixed):
    from npvlm import cli
    assert cli.main(["--threads", "1", "--json"]) == 0
    assert json.loads(capfd.readouterr().out)["text"]
    assert cpu._state["fixed"] is None
    cores = cpu.usable_cores()
    assert cli.main(["--threads", str(cores + 1)]) == 0
    assert f"note: --threads {cores + 1}: {cores + 1} BLAS threads are more than the {cores} core" \
        in capfd.readouterr().err


def test_a_resumed_fine_tune_keeps_the_saved_runs_thread_count(tmp_path, capfd, monkeypatch, unfixed):
    """Saved at 1 thread, resumed where the load would give 2: 1, so it rounds as the saved run."""
    data = make_data(tmp_path / "d", n=4)
    common = ["--model", "demo", "--data", str(data), "--out", str(tmp_path / "o"), "--steps", "3",
              "--batch-size", "2", "--quiet"]
    assert finetune.run(finetune.parse_args([*common, "--threads", "1"]),
                        on_step=lambda entry: entry["step"] == 1) == 0
    assert json.loads((tmp_path / "o.work" / "state.json").read_text())["blas_threads"] == 1
    assert cpu._state["fixed"] is None                    # --threads held for the run only
    monkeypatch.setattr(cpu, "threads_for", lambda others, cores, default: 2)
    capfd.readouterr()
    assert finetune.main([*common, "--resume"]) == 0
    assert ", 1 BLAS thread\n" in capfd.readouterr().err
    assert json.loads((tmp_path / "o" / "npvlm_finetune.json").read_text())["blas_threads"] == 1


def test_a_saved_count_above_the_cores_resumes_at_the_cores(tmp_path, capfd, monkeypatch, unfixed):
    data = make_data(tmp_path / "d", n=4)
    common = ["--model", "demo", "--data", str(data), "--out", str(tmp_path / "o"), "--steps", "2",
              "--batch-size", "2", "--quiet"]
    assert finetune.run(finetune.parse_args(common), on_step=lambda entry: entry["step"] == 1) == 0
    state = tmp_path / "o.work" / "state.json"
    meta = json.loads(state.read_text())
    cores = cpu.usable_cores()
    state.write_text(json.dumps({**meta, "blas_threads": cores + 15}))
    capfd.readouterr()
    assert finetune.main([*common, "--resume"]) == 0
    err = capfd.readouterr().err
    assert f"note: the saved run used {cores + 15} BLAS threads, more than the {cores} core(s)" in err, err
    assert f", {cores} BLAS thread" in err


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
    assert kept == "True" and int(faults) < 100 < int(alone[1])


@pytest.mark.skipif(cpu._libc_name() != "glibc", reason="the allocator's thresholds are glibc's")
@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "131072"}, {"MALLOC_MMAP_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}])
def test_the_users_own_malloc_thresholds_are_left_alone(env):
    r = run_py(FAULTS.replace("sys.argv[1]", "'keep'"), env)
    assert r.stdout.split()[0] == "False", r.stdout + r.stderr
