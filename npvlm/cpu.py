"""How npvlm runs on the CPU: how many threads NumPy's BLAS runs, from the machine's load, and
glibc's allocator kept from handing the forward pass's temporaries back to the kernel.

BLAS threads: all of them on a quiet machine, fewer when other processes keep the cores busy;
chosen once per loaded model, so results repeat bit for bit. Why: OpenBLAS splits each product
over its threads and makes them wait for each other, spinning. When another BLAS-heavy process
(a second npvlm, a numpy or torch job) also wants the cores, those waits stretch: on a 2-core
machine the demo's answers took 46x longer beside such a process, against 1.6x with one thread
(docs/performance.md, "A busy machine"). One thread on a quiet machine costs ~1.8x on large
products, so the count follows what the machine is doing, looked at once:

    on_load()    npvlm.load: a look at the machine begins (one begun at import, under 2 s ago,
                 serves), or NPVLM_THREADS=n applies;
    settle()     the model's first computation (npvlm/api.py, training.grads.loss_and_grads):
                 the cores other processes used since the look began, from /proc/stat (the
                 busy time of this process's CPUs) minus this process's own CPU time, over at
                 least 0.1 s; BLAS gets the cores they left (at least one, at most its own
                 default). The count then stays until the next load: OpenBLAS rounds
                 differently at another thread count, and a model's results should not depend
                 on the load of the moment.
    set_threads(n)   a fixed count (the commands' --threads); None: choose again at the next
                 computation.

A load that starts after the choice is not seen (set NPVLM_THREADS=1 or pass --threads 1 then).
Linux only: elsewhere, and on the GPU backend, BLAS keeps its own default. The count is set
through threadpoolctl, for whichever BLAS NumPy was built with.

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

import os
import time

WINDOW_S = 0.1                # /proc/stat counts 10 ms ticks: a shorter look measures noise
FRESH_S = 2.0                 # a look begun this recently (at import) serves a load
BUSY_CORE = 0.5               # other processes hold a core when they used half of one or more
MMAP_THRESHOLD = 32 << 20     # glibc's ceiling for its dynamic threshold (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 256 << 20    # free memory kept at the heap's top: a prefill's temporaries and more
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3      # mallopt's parameters (glibc's malloc.h)

_state = {"fixed": None, "controller": None, "default": None, "look": None, "settled": False, "malloc": None}


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


def threads_for(others, cpus, default):
    """The BLAS threads for a machine whose other processes used `others` cores (a mean over the
    look) of the `cpus` this process may use, BLAS's own default being `default`."""
    held = 0 if others < BUSY_CORE else max(1, round(others))
    return max(1, min(default, cpus - held))


def _cpus():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                      # not Linux
        return os.cpu_count() or 1


def _busy_seconds():
    """Busy CPU time (all but idle and iowait) of this process's CPUs since boot, from
    /proc/stat; None where there is none."""
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
            ticks = [int(v) for v in fields]
            busy += sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)
    return busy / os.sysconf("SC_CLK_TCK")


def _look():
    busy = _busy_seconds()
    return None if busy is None else (time.perf_counter(), time.process_time(), busy)


def _blas():
    """threadpoolctl's controller of NumPy's BLAS, made on first use (it reads the loaded
    libraries); remembers BLAS's own default thread count."""
    if _state["controller"] is None:
        from threadpoolctl import ThreadpoolController  # noqa: PLC0415 (only once a model computes)
        controller = ThreadpoolController().select(user_api="blas")
        _state["default"] = max([lib.num_threads for lib in controller.lib_controllers] or [1])
        _state["controller"] = controller
    return _state["controller"]


def _apply(n):
    for lib in _blas().lib_controllers:
        if lib.num_threads != n:
            lib.set_num_threads(n)


def default_threads():
    """BLAS's own thread count (from its environment variables, else the cores)."""
    _blas()
    return _state["default"]


def blas_threads():
    """The threads NumPy's BLAS runs now."""
    return max([lib.num_threads for lib in _blas().lib_controllers] or [1])


def set_threads(n):
    """Fix NumPy's BLAS at n threads (an integer >= 1), or None to choose from the machine's load
    again at the next computation."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        from .errors import InputError  # noqa: PLC0415 (kept beside its one use)
        raise InputError(f"threads must be an integer >= 1 (or None: chosen from the load), got {n!r}")
    _state["fixed"] = n
    if n is None:
        _state["look"], _state["settled"] = _look(), False
    else:
        _apply(n)


def from_environment():
    """NPVLM_THREADS as a thread count, or None where it is unset."""
    value = os.environ.get("NPVLM_THREADS", "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        from .errors import InputError  # noqa: PLC0415 (kept beside its one use)
        raise InputError(f"NPVLM_THREADS must be an integer >= 1, got {value!r}; unset it to let npvlm "
                         "choose from the machine's load")
    return int(value)


def on_load():
    """A model is being loaded: NPVLM_THREADS applies, else a look at the machine starts (the
    choice is made at the model's first computation). A count fixed by set_threads stays. The
    allocator keeps freed memory from here on."""
    keep_freed_memory()
    if _state["fixed"] is not None:
        return
    n = from_environment()
    if n is not None:
        _apply(n)
        _state["settled"] = True
        return
    look = _state["look"]
    if look is None or time.perf_counter() - look[0] > FRESH_S:
        _state["look"] = _look()
    _state["settled"] = False


def settle():
    """Before the first computation since a load: choose the count from what other processes
    did since the look began (waiting out the rest of WINDOW_S if need be); then a no-op."""
    keep_freed_memory()
    if _state["fixed"] is not None or _state["settled"]:
        return
    _state["settled"] = True
    start = _state["look"] or _look()
    if start is None:
        return                                  # no /proc/stat: BLAS keeps its default
    time.sleep(max(0.0, WINDOW_S - (time.perf_counter() - start[0])))
    now, own, busy = _state["look"] = _look()
    others = ((busy - start[2]) - (own - start[1])) / (now - start[0])
    _apply(threads_for(others, _cpus(), default_threads()))


_state["look"] = _look()      # the first look begins at import: the load's time counts
