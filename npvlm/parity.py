"""Parity checks: compare a stage of ours with a reference tensor, print one line per stage.

The one comparison helper that the tests and the notebooks share: `compare` (one stage),
`compare_stages` (many, one printed line each, passing or not), `compare_grad` (a gradient), with
the fp32 tolerances below. The stage names are the trace names of npvlm/model/record.py.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backend import to_host

# The golden tensors made by HF transformers (tests/make_goldens.py, tests/make_grad_goldens.py)
# that the notebooks' check cells compare with: in a clone of the repository only (a
# pip-installed npvlm does not ship tests/).
GOLDENS = Path(__file__).resolve().parent.parent / "tests" / "goldens"

# fp32 parity tolerances, as transformers' own tests use: |ours - ref| <= atol' + rtol * |ref|,
# where atol' = ATOL * max(1, max|ref|) over the stage. Why scale atol: an fp32 activation is a
# sum of D products of size ~|h|, so its rounding error is ~eps * |h| whatever its own size; in a
# stage whose values reach 20, an entry near 0 carries ~1e-5 of error in any fp32 implementation
# (HF's included). For stages of magnitude <= 1 this is exactly atol = 1e-5.
ATOL = 1e-5
RTOL = 1e-4


@dataclass(frozen=True)
class StageDiff:
    name: str
    shape: tuple
    max_abs: float
    max_rel: float      # max |Δ| / (|ref| + atol')
    ok: bool
    atol: float = 0.0   # the scaled absolute tolerance used

    def __str__(self):
        tag = "OK  " if self.ok else "FAIL"
        return (f"[{tag}] {self.name:<26} {str(self.shape):<18} max|Δ|={self.max_abs:.3e} "
                f"max rel={self.max_rel:.3e} (atol {self.atol:.1e})")


def compare(name, ours, ref, atol=ATOL, rtol=RTOL, where=None):
    """Compare one stage. `where` (bool, broadcastable to the arrays' leading axes) selects the
    entries that are meaningful, e.g. real tokens only, not left padding. The absolute
    tolerance is atol * max(1, max|ref|) (see ATOL), or atol(max|ref|) for a function."""
    ours = np.asarray(to_host(ours), dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape:
        return StageDiff(name, ours.shape, float("inf"), float("inf"), False)
    shape = ours.shape
    if where is not None:
        where = np.asarray(where, bool)
        sel = np.broadcast_to(where.reshape(where.shape + (1,) * (ref.ndim - where.ndim)), ref.shape)
        ours, ref = ours[sel], ref[sel]
    ref_max = float(np.abs(ref).max()) if ref.size else 0.0
    atol = atol(ref_max) if callable(atol) else atol * max(1.0, ref_max)
    diff = np.abs(ours - ref)
    ok = bool(np.isfinite(ours).all() and (diff <= atol + rtol * np.abs(ref)).all())
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float((diff / (np.abs(ref) + atol)).max()) if diff.size else 0.0
    return StageDiff(name, shape, max_abs, max_rel, ok, atol)


GRAD_ATOL = 1e-5      # x the tensor's own max |ref|: gradients are small, so no floor of 1


def compare_grad(name, ours, ref, noise=0.0, rtol=RTOL, where=None):
    """Compare a gradient: |ours - ref| <= atol + rtol |ref|, with atol = GRAD_ATOL * max|ref|,
    or twice `noise` (the reference's own fp32-vs-fp64 error on this tensor) where that is
    larger: a tensor that needs more tolerance must show that the reference is that far off
    the exact value itself (e.g. a gradient that is zero in exact arithmetic)."""
    return compare(name, ours, ref, atol=lambda ref_max: max(GRAD_ATOL * ref_max, 2.0 * float(noise)),
                   rtol=rtol, where=where)


def compare_stages(ours, golden, names, atol=ATOL, rtol=RTOL, where=None, printer=print):
    """Compare many stages, print one line each (passing or not), return the list of diffs."""
    results = []
    for name in names:
        w = where(name) if callable(where) else where
        r = compare(name, ours[name], golden[name], atol, rtol, w)
        if printer is not None:
            printer(str(r))
        results.append(r)
    return results
