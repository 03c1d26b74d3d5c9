"""Benchmark gating: a fused kernel ships only for shape classes where it measured faster than
stock Inductor on the same visible ops.

`gates.json` (next to this file, written by `benchmarks/bench_rmsnorm_quant.py --write-gates`)
holds, per family and scheme, the measured geomean speedup over stock torch.compile for each
hidden size. A shape class is the (family, scheme, nearest measured hidden size). Unmeasured
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


def rejects(family: str, *, scheme: str, hidden: int, dtype: torch.dtype, enabled: bool = True) -> str | None:
    """None if the fused kernel may ship for this CUDA shape class, else the plain-words reason."""
    if not enabled or os.environ.get("FXFUSE_UNGATED") == "1":
        return None
    fam = _table().get(family)
    if not fam:
        return f"no GPU benchmark recorded for {family}; gated off (set FXFUSE_UNGATED=1 to force)"
    entries = fam.get(scheme) or {}
    if not entries:
        return f"no GPU benchmark recorded for {family} {scheme}; gated off (set FXFUSE_UNGATED=1 to force)"
    nearest = min(entries, key=lambda h: abs(int(h) - hidden))
    speedup = float(entries[nearest])
    if speedup < MIN_SPEEDUP:
        return (
            f"benchmark gate: fused {scheme} kernel measured {speedup:.2f}x stock Inductor at hidden={nearest}; "
            "left to Inductor"
        )
    return None
