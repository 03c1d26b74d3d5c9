"""Which arguments each fxfuse Triton kernel reads and writes, declared beside the kernel.

Why: Inductor works this out for every user-defined Triton kernel it traces or lowers, by building
the kernel's TTIR and walking it (40-90 ms a variant; a model's first compile meets 5-10 variants,
most of the time fxfuse adds to it). A kernel whose accesses are declared here is answered from the
declaration instead (`fxfuse._ttir_cache`).

A declaration is a function of the launch's arguments (the constexprs pick the branches that load
and store) returning the formal parameter names the kernel loads from and stores to, as torch's
analysis would report them: a pointer reached from a load or store address counts, whatever tensor
the launcher passed (a dummy pointer that a constexpr leaves unused is in neither set). Names bound
to non-tensors are dropped by the caller. Declarations must equal torch's answer, and are checked
against it on every launch of the test suites (FXFUSE_VERIFY_ACCESSES=1, set by tests/conftest.py:
the CPU suite on fake CUDA tensors and the GPU suite) and once per process at run time.

This module knows nothing about FX or Inductor.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

__all__ = ["Accesses", "declare", "declared", "declared_kernels"]


@dataclasses.dataclass(frozen=True)
class Accesses:
    """Formal parameter names a launch loads from (`reads`) and stores or atomically updates
    (`writes`); `one_store` says the single written pointer is stored through once (torch then
    allows an epilogue to be fused into the kernel)."""

    reads: frozenset[str]
    writes: frozenset[str]
    one_store: bool = False


Declaration = Callable[[Mapping[str, Any]], Accesses]

_DECLARED: dict[Any, Declaration] = {}


def accesses(reads: Iterable[str], writes: Iterable[str], one_store: bool = False) -> Accesses:
    """An `Accesses` from any iterables of names."""
    return Accesses(frozenset(reads), frozenset(writes), one_store)


def declare(kernel: Any) -> Callable[[Declaration], Declaration]:
    """Decorator: `fn(kwargs) -> Accesses` declares `kernel`'s (a JITFunction) accesses for a launch
    with these keyword arguments (constexprs included)."""

    def register(fn: Declaration) -> Declaration:
        _DECLARED[kernel] = fn
        return fn

    return register


def declared(kernel: Any) -> Declaration | None:
    """The declaration of a JITFunction, or None."""
    try:
        return _DECLARED.get(kernel)
    except TypeError:  # unhashable
        return None


def declared_kernels() -> list[Any]:
    """Every kernel with a declaration (tests check each is verified)."""
    return list(_DECLARED)
