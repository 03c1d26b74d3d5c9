"""Benchmark gating: a fused kernel ships only for shape classes where it measured faster than
stock Inductor on the same visible ops.

`gates.json` (next to this file, written by `benchmarks/bench_rmsnorm_quant.py --write-gates`)
holds, per family and scheme, the measured geomean speedup over stock torch.compile for each
hidden size. A shape class is the (family, scheme, nearest measured hidden size); families whose
margin depends on the token count put an M class in the scheme key ("<scheme>/<class>":
moe_experts' decode/prefill/prefill-large, rope_quant's M<=16/M<=256/M>=4096), and a call whose
token count is symbolic must pass every class it may run in. Unmeasured
families are allowed only when `FXFUSE_UNGATED=1` or the pipeline option `gate=False` is set.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from typing import Any

import torch

GATES_PATH = pathlib.Path(__file__).with_name("gates.json")
MIN_SPEEDUP = 1.0


@functools.cache
def _table() -> dict[str, Any]:
    try:
        return json.loads(GATES_PATH.read_text())
    except (OSError, ValueError):
        return {}


def reload() -> None:
    """Forget the cached table (after the benchmark rewrote gates.json)."""
    _table.cache_clear()


# Token-count classes of the benchmarks (bench_silu_mul_quant.py, bench_rope_quant.py): a geomean
# over every M hid measured slowdowns at small M behind wins at large M.
M_CLASSES: tuple[tuple[str, int], ...] = (("M<=16", 16), ("M<=256", 256), ("M>=4096", 1 << 62))


def m_class(M: int) -> str:
    """The benchmark class of a measured token count (M between 257 and 4095 joins M>=4096)."""
    return next(name for name, top in M_CLASSES if M <= top)


def m_classes(M: object) -> list[str]:
    """Classes a call may run in: one for a static M; every class for a symbolic M (its kernel
    serves all token counts, so it ships only where it won at each of them)."""
    if not isinstance(M, int):
        return [name for name, _ in M_CLASSES]
    if 256 < M < 4096:  # between the measured classes: both neighbours must have won
        return ["M<=256", "M>=4096"]
    return [m_class(M)]


def rejects(family: str, *, scheme: str, hidden: int, dtype: torch.dtype, enabled: bool = True,
            M: object = None) -> str | None:
    """None if the fused kernel may ship for this CUDA shape class, else the plain-words reason.

    With `M` (token count, int or symbolic) and a table holding `scheme/<M class>` entries, every
    class the call may run in must have measured >= MIN_SPEEDUP; otherwise the per-scheme figure
    (a geomean over M) decides.
    """
    if not enabled or os.environ.get("FXFUSE_UNGATED") == "1":
        return None
    fam = _table().get(family)
    if not fam:
        return f"no GPU benchmark recorded for {family}; gated off (set FXFUSE_UNGATED=1 to force)"
    keys = [scheme]
    if M is not None and any(f"{scheme}/{c}" in fam for c, _ in M_CLASSES):
        keys = [f"{scheme}/{c}" for c in m_classes(M)]
    for key in keys:
        entries = fam.get(key) or {}
        if not entries:
            return f"no GPU benchmark recorded for {family} {key}; gated off (set FXFUSE_UNGATED=1 to force)"
        nearest = min(entries, key=lambda h: abs(int(h) - hidden))
        speedup = float(entries[nearest])
        if speedup < MIN_SPEEDUP:
            return (
                f"benchmark gate: fused {key} kernel measured {speedup:.2f}x stock Inductor at hidden={nearest}; "
                "left to Inductor"
            )
    return None
