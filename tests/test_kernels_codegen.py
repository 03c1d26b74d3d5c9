"""Kernel modules must stay compilable by Inductor's user-defined-kernel codegen.

Inductor copies a `triton_op` kernel's source into its output code, then pastes every JIT helper
the kernel names, under the helper's *own* `def` name (torch/_inductor/codegen/wrapper.py,
`traverse`). A helper imported under an alias (`from .quant_common import quantize as _q`) is
pasted as `quantize` while the kernel calls `_q`: a NameError only on CUDA, at compile time.
This walks every kernel in fxfuse.kernels the same way, so CPU CI catches it.
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest
from triton.runtime.jit import JITFunction

import fxfuse.kernels


def _kernel_modules() -> list[str]:
    return [m.name for m in pkgutil.iter_modules(fxfuse.kernels.__path__)]


def _jit_functions(module: object) -> list[JITFunction]:
    return [v for v in vars(module).values() if isinstance(v, JITFunction)]


def _walk(mod: object) -> tuple[set[str], list[str]]:
    """Every JIT function reachable from the module's own, and the calls made under an alias."""
    bad = []
    seen: dict[int, str] = {}
    stack = _jit_functions(mod)
    while stack:
        fn = stack.pop()
        if id(fn) in seen:
            continue
        seen[id(fn)] = fn.fn.__name__
        for sym in fn.fn.__code__.co_names:
            target = fn.fn.__globals__.get(sym)
            if isinstance(target, JITFunction):
                if sym != target.fn.__name__:
                    bad.append(f"{fn.fn.__name__} calls {target.fn.__name__} as {sym!r}")
                stack.append(target)
    return set(seen.values()), bad


@pytest.mark.parametrize("name", _kernel_modules())
def test_jit_helpers_are_referenced_by_their_own_names(name: str) -> None:
    _, bad = _walk(importlib.import_module(f"fxfuse.kernels.{name}"))
    assert not bad, "aliased Triton helpers break Inductor codegen: " + "; ".join(bad)


@pytest.mark.parametrize("name", ["rmsnorm_quant", "silu_mul_quant"])
def test_walk_finds_the_kernels(name: str) -> None:
    """The check above must see real kernels and the shared epilogue they call (it would pass
    vacuously on an empty walk)."""
    names, _ = _walk(importlib.import_module(f"fxfuse.kernels.{name}"))
    assert {"quantize_store_row", "quantize", "scale_chain", "absmax", "load_ub", "round_to"} <= names, names
    assert any(n.endswith("_kernel") for n in names), names
