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


@pytest.mark.parametrize("name", _kernel_modules())
def test_jit_helpers_are_referenced_by_their_own_names(name: str) -> None:
    mod = importlib.import_module(f"fxfuse.kernels.{name}")
    bad = []
    seen: set[int] = set()
    stack = _jit_functions(mod)
    while stack:
        fn = stack.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        for sym in fn.fn.__code__.co_names:
            target = fn.fn.__globals__.get(sym)
            if isinstance(target, JITFunction):
                if sym != target.fn.__name__:
                    bad.append(f"{fn.fn.__name__} calls {target.fn.__name__} as {sym!r}")
                stack.append(target)
    assert not bad, "aliased Triton helpers break Inductor codegen: " + "; ".join(bad)


def test_walk_finds_the_kernels() -> None:
    """The check above must see real kernels (it would pass vacuously on an empty walk)."""
    mod = importlib.import_module("fxfuse.kernels.rmsnorm_quant")
    names = {f.fn.__name__ for f in _jit_functions(mod)}
    assert {"_rms_norm_quant_kernel", "quantize", "scale_chain"} <= names
