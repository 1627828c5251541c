"""How npvlm runs on the CPU: how many threads NumPy's BLAS runs, from the machine's load, and
glibc's allocator kept from handing the forward pass's temporaries back to the kernel.

BLAS threads: all of them on a quiet machine, fewer when other processes keep the cores busy;
chosen at a model's first computation and kept with the model, so its results repeat bit for
bit. Why: OpenBLAS splits each product over its threads and makes them wait for each other,
spinning. When another BLAS-heavy process (a second npvlm, a numpy or torch job) also wants the
cores, those waits stretch: on a 2-core machine the demo's answers took 46x longer beside such
a process, against 1.6x with one thread (docs/performance.md, "A busy machine"). One thread on
a quiet machine costs ~1.8x on large products, so the count follows what the machine is doing,
looked at once per model:

    on_load()    npvlm.load: a look at the machine begins (one begun under FRESH_S ago, at
                 import, serves); NPVLM_THREADS is checked.
    settle(choice)   before each computation (npvlm/api.py; training.grads.loss_and_grads):
                 applies the model's count, choosing it at the model's first computation from
                 the CPU time other processes used since the look began (/proc/stat's busy
                 time of the cores this process may use, minus this process's own; over at
                 least WINDOW_S, a fresh look where the last began more than FRESH_S ago):
                 the cores they left, at least one, at most BLAS's own default. Steal time (a
                 virtual machine's host running others) counts as other processes' use.
    set_threads(n)   a fixed count for every model (the commands' --threads; NPVLM_THREADS
                 for a whole process); None: every model chooses again at its next
                 computation.

Why once per model rather than continually: OpenBLAS rounds differently at another thread
count, and a model's results should not depend on the load of the moment. A load that starts
after a model chose is not seen (set NPVLM_THREADS=1 or pass --threads 1 then). The cores this
process may use are its CPU affinity, capped by a cgroup CPU quota (a container's --cpus).
Linux only: elsewhere BLAS keeps its own default; the GPU backend does not use it. Counts are
set through threadpoolctl, for whichever BLAS NumPy was built with; one count at a time for
the process (models used from several threads share it).

The allocator (keep_freed_memory, at the first load or computation): a prefill makes and frees
hundreds of MB of temporaries ([268, 16384] MLP activations, attention scores, each linear
layer's output). glibc returns freed memory at the top of its heap to the kernel once more than
twice its (dynamic, at most 32 MB) mmap threshold is free, and the next arrays fault it in again,
zeroed: ~46,000 page faults (~190 MB) per 3B prefill. Fixing the mmap threshold at glibc's own
ceiling (32 MB) and the trim threshold at 256 MB keeps that memory in the process: no page
faults, a 3B prefill 3% faster, a mid-size one 9%, a training step 17%, the same peak RSS
(docs/performance.md, "Page faults, and the prefill against its own products"). glibc only, and
not where the user set glibc's MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ or their
GLIBC_TUNABLES.
"""

import math
import operator
import os
import threading
import time
from contextlib import contextmanager

WINDOW_S = 0.1                # /proc/stat counts 10 ms ticks: a shorter look measures noise
FRESH_S = 2.0                 # a look begun longer ago is renewed before a choice
BUSY_CORE = 0.5               # other processes hold a core when they used half of one or more
MMAP_THRESHOLD = 32 << 20     # glibc's ceiling for its dynamic threshold (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 256 << 20    # free memory kept at the heap's top: a prefill's temporaries and more
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3      # mallopt's parameters (glibc's malloc.h)
FIRST = "first"               # settle's choice for a model that has not computed yet

# fixed: set_threads's count; epoch: counts set_threads calls (a model's choice from an older
# epoch is made again); current: the latest (epoch, count) applied; look: (wall s, own CPU s,
# busy CPU s of our cores) when the look began
_state = {"fixed": None, "epoch": 0, "current": None, "look": None, "controller": None, "default": None,
          "malloc": None}
_lock = threading.Lock()


def keep_freed_memory():
    """Once per process, on glibc: fix malloc's mmap threshold at 32 MB and its trim threshold at
    256 MB, so freed temporaries are reused instead of returned and faulted in again. -> whether
    it applies (not elsewhere, nor where the user set glibc's own malloc thresholds)."""
    if _state["malloc"] is None:
        _state["malloc"] = False
        tunables = os.environ.get("GLIBC_TUNABLES", "")
        if (_libc_name() == "glibc" and not {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ)
                and "mmap_threshold" not in tunables and "trim_threshold" not in tunables):
            import ctypes  # noqa: PLC0415 (only here, once)
            try:
                mallopt = ctypes.CDLL(None).mallopt      # the process's own C library
            except (OSError, AttributeError):
                return False
            mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
            _state["malloc"] = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                                    and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _state["malloc"]


def _libc_name():
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").split(" ")[0]   # "glibc 2.36"
    except (ValueError, OSError, AttributeError):
        return ""


# ---- the machine's load ------------------------------------------------------------------------

def threads_for(others, cores, default):
    """The BLAS threads for a machine whose other processes used `others` cores (a mean over the
    look) of the `cores` this process may use, BLAS's own default being `default`."""
    held = 0 if others < BUSY_CORE else max(1, int(others + 0.5))
    return max(1, min(default, cores - held))


def usable_cores():
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:                      # not Linux
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(n, quota)) if quota else n


def _cgroup_quota(proc="/proc/self/cgroup", root="/sys/fs/cgroup"):
    """ceil(quota / period) of this process's cgroup CPU limit (v2 cpu.max, v1 cfs_quota_us), or
    None where there is none or it cannot be read."""
    try:
        with open(proc) as f:
            entries = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    for entry in entries:
        if len(entry) != 3:
            continue
        _, controllers, path = entry
        path = path.rstrip("/")
        if controllers == "":                                              # cgroup v2
            files = [(f"{d}/cpu.max",) for d in (f"{root}{path}", root)]
        elif "cpu" in controllers.split(","):                              # cgroup v1
            files = [(f"{d}/cpu.cfs_quota_us", f"{d}/cpu.cfs_period_us")
                     for v1 in (f"{root}/cpu", f"{root}/cpu,cpuacct") for d in (f"{v1}{path}", v1)]
        else:
            continue
        for names in files:
            try:
                quota, period = (_read(names[0]).split()[:2] if len(names) == 1
                                 else [_read(n).strip() for n in names])
                if quota in ("max", "-1"):
                    return None
                return max(1, math.ceil(int(quota) / int(period)))
            except (OSError, ValueError, ZeroDivisionError):
                continue
    return None


def _read(path):
    with open(path) as f:
        return f.read()


def _busy_seconds():
    """Busy CPU time of this process's cores since boot, from /proc/stat: user, nice, system,
    irq, softirq and steal (guest time is already in user); None where there is none."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
        wanted = {f"cpu{c}" for c in os.sched_getaffinity(0)}
    except (OSError, AttributeError):
        return None
    busy = 0
    for line in lines:
        name, *fields = line.split()
        if name in wanted:
            ticks = [int(v) for v in fields[:8]] + [0] * (8 - len(fields[:8]))
            busy += sum(ticks) - ticks[3] - ticks[4]                   # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def _look():
    busy = _busy_seconds()
    return None if busy is None else (time.perf_counter(), time.process_time(), busy)


def _choose():
    """A count from what other processes did since the look began (renewed and waited on where
    it is older than FRESH_S; the rest of WINDOW_S waited out); BLAS's default without
    /proc/stat."""
    start = _state["look"]
    if start is None or time.perf_counter() - start[0] > FRESH_S:
        start = _look()
    if start is not None:
        time.sleep(max(0.0, WINDOW_S - (time.perf_counter() - start[0])))
    end = _look()
    if start is None or end is None:
        return default_threads()
    _state["look"] = end
    others = ((end[2] - start[2]) - (end[1] - start[1])) / (end[0] - start[0])
    return threads_for(others, usable_cores(), default_threads())


# ---- BLAS --------------------------------------------------------------------------------------

def _blas():
    """threadpoolctl's controllers of NumPy's BLAS, made on first use (it reads the loaded
    libraries); remembers BLAS's own default thread count."""
    if _state["controller"] is None:
        from threadpoolctl import ThreadpoolController  # noqa: PLC0415 (only once a model computes)
        controller = ThreadpoolController().select(user_api="blas")
        _state["default"] = max([lib.num_threads for lib in controller.lib_controllers] or [1])
        _state["controller"] = controller
    return _state["controller"].lib_controllers


def _apply(n):
    for lib in _blas():
        if lib.num_threads != n:
            lib.set_num_threads(n)


def default_threads():
    """BLAS's own thread count (from its environment variables, else the cores)."""
    _blas()
    return _state["default"]


def blas_threads():
    """The threads NumPy's BLAS runs now; None where threadpoolctl finds no BLAS to control."""
    libs = _blas()
    return max(lib.num_threads for lib in libs) if libs else None


def set_threads(n):
    """Fix NumPy's BLAS at n threads (an integer >= 1) for every model, or None to let each
    choose from the machine's load again at its next computation."""
    if n is not None:
        try:
            count = 0 if isinstance(n, bool) else operator.index(n)      # numpy integers too
        except TypeError:
            count = 0
        if count < 1:
            from .errors import InputError  # noqa: PLC0415 (kept beside its use)
            raise InputError(f"threads must be an integer >= 1 (or None: chosen from the load), got {n!r}")
        n = count
    with _lock:
        _state["fixed"] = n
        _state["epoch"] += 1
        if n is not None:
            _apply(n)


@contextmanager
def threads_fixed(n):
    """set_threads(n) for the block (None: no change), the setting before restored after (the
    commands, so an in-process run leaves the session as it found it)."""
    if n is None:
        yield
        return
    before = _state["fixed"]
    set_threads(n)
    try:
        yield
    finally:
        set_threads(before)


def more_than_cores(n):
    """A note when n threads exceed the cores this process may use (they would wait on each
    other: docs/performance.md, "A busy machine"), else None."""
    cores = usable_cores()
    if n is not None and n > cores:
        return (f"{n} BLAS threads are more than the {cores} core{'s' if cores != 1 else ''} this process may "
                "use: they wait on each other, many times slower")
    return None


def from_environment():
    """NPVLM_THREADS as a thread count, or None where it is unset."""
    value = os.environ.get("NPVLM_THREADS", "").strip()
    if not value:
        return None
    if not (value.isascii() and value.isdigit()) or int(value) < 1:
        from .errors import InputError  # noqa: PLC0415 (kept beside its use)
        raise InputError(f"NPVLM_THREADS must be an integer >= 1, got {value!r}; unset it to let npvlm "
                         "choose from the machine's load")
    return int(value)


def on_load():
    """A model is being loaded: the allocator keeps freed memory from here on, NPVLM_THREADS is
    checked, and a look at the machine begins (unless one begun under FRESH_S ago serves)."""
    keep_freed_memory()
    from_environment()
    with _lock:
        look = _state["look"]
        if look is None or time.perf_counter() - look[0] > FRESH_S:
            _state["look"] = _look()


def settle(choice=None):
    """Apply BLAS's thread count before a computation; -> the choice for the caller to keep and
    pass again. The count is set_threads's where one is fixed; else `choice`'s, made since the
    last set_threads; else NPVLM_THREADS; else chosen from the machine's load now. choice: FIRST
    for a model's first computation, a kept choice after, None for the process's latest (bare
    parameters: loss_and_grads)."""
    keep_freed_memory()
    if not _blas():
        return choice                             # no BLAS threadpoolctl can set
    with _lock:
        if _state["fixed"] is not None:
            _apply(_state["fixed"])
            return choice
        if choice is None:
            choice = _state["current"]
        if not isinstance(choice, tuple) or choice[0] != _state["epoch"]:
            n = from_environment()
            choice = (_state["epoch"], n if n is not None else _choose())
        _apply(choice[1])
        _state["current"] = choice
        return choice


_state["look"] = _look()      # the first look begins at import: the load's time counts
