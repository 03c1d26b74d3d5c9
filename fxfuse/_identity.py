"""Cache identity of user code that decides a rewrite (decompositions, chained passes, auto-mode
custom op implementations).

Inductor's FX graph cache key is computed before the post-grad passes run, so `uuid()` is the
only record of what they will do. `inspect.getsource` is not enough: a closure's captured values,
the helpers a function calls and default arguments change the rewrite without changing the
source text. This hashes the compiled code object recursively (bytecode, constants, names,
defaults, closure cell values, referenced global functions) and answers None when an input
cannot be known; callers then return None from `uuid()`, which makes Inductor bypass the cache
rather than reuse stale code.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import sys
import types
from typing import Any

_MAX_DEPTH = 8
_MAX_ITEMS = 4096  # bound the walk; beyond it the identity is "unknown" (None)
_TENSOR_NUMEL = 1 << 16

# code in these packages is identified by its qualified name: it is versioned with the package
# (torch.__version__ and fxfuse's own source digest are part of the uuid already)
_LIBRARY_ROOTS = frozenset({"torch", "triton", "numpy", "sympy", "fxfuse", "builtins", "functools", "operator", "math"})


class _Unknown(Exception):
    """Something the identity depends on cannot be captured."""


def _is_library(module: str | None) -> bool:
    if not module:
        return False
    root = module.split(".", 1)[0]
    return root in _LIBRARY_ROOTS or root in sys.stdlib_module_names


class _Walker:
    def __init__(self) -> None:
        self.items = 0
        self.seen: dict[int, int] = {}  # id(obj) -> index of first visit (recursion, shared helpers)

    def value(self, v: Any, depth: int) -> str:
        self.items += 1
        if self.items > _MAX_ITEMS or depth > _MAX_DEPTH:
            raise _Unknown("too deep")
        if v is None or isinstance(v, (bool, int, float, complex, str, bytes, range, slice, type(Ellipsis))):
            return f"{type(v).__name__}:{v!r}"
        if isinstance(v, enum.Enum):
            return f"enum:{type(v).__module__}.{type(v).__qualname__}.{v.name}"
        import torch

        if isinstance(v, (torch.dtype, torch.device, torch.layout, torch.memory_format, torch.Size)):
            return f"torch:{v!r}"
        if isinstance(v, torch.Tensor):
            if v.is_meta or v.numel() > _TENSOR_NUMEL or type(v) is not torch.Tensor and not isinstance(v, torch.nn.Parameter):
                raise _Unknown("tensor")
            t = v.detach().cpu().contiguous().reshape(-1)
            data = bytes(t.view(torch.uint8).tolist()) if t.dtype != torch.bool else bytes(t.tolist())
            return f"tensor:{t.dtype}:{tuple(v.shape)}:{hashlib.sha256(data).hexdigest()}"
        if isinstance(v, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            return f"op:{v}"
        if isinstance(v, (tuple, list, set, frozenset)):
            parts = [self.value(e, depth + 1) for e in v]
            if isinstance(v, (set, frozenset)):
                parts.sort()
            return f"{type(v).__name__}({','.join(parts)})"
        if isinstance(v, dict):
            parts = sorted(f"{self.value(k, depth + 1)}={self.value(e, depth + 1)}" for k, e in v.items())
            return f"dict({','.join(parts)})"
        if isinstance(v, types.ModuleType):
            return f"module:{v.__name__}"
        if isinstance(v, type):
            return f"class:{v.__module__}.{v.__qualname__}"
        if callable(v):
            return self.callable(v, depth + 1)
        raise _Unknown(type(v).__qualname__)

    def callable(self, fn: Any, depth: int) -> str:
        from torch._inductor.custom_graph_pass import CustomGraphPass

        if isinstance(fn, CustomGraphPass):
            u = fn.uuid()
            if u is None:
                raise _Unknown("pass without uuid")
            return f"pass:{type(fn).__qualname__}:{u!r}"
        if isinstance(fn, functools.partial):
            return f"partial({self.value(fn.func, depth)},{self.value(fn.args, depth)},{self.value(fn.keywords, depth)})"
        if isinstance(fn, types.MethodType):
            return f"method({self.value(fn.__func__, depth)},{self.value(fn.__self__, depth)})"
        if isinstance(fn, (types.BuiltinFunctionType, types.BuiltinMethodType)) or (
            not isinstance(fn, types.FunctionType) and _is_library(getattr(type(fn), "__module__", None))
        ):
            return f"builtin:{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
        if not isinstance(fn, types.FunctionType):
            call = getattr(type(fn), "__call__", None)
            if isinstance(call, types.FunctionType):  # a callable object: its class's code + its state
                state = getattr(fn, "__dict__", None)
                return f"obj({self.value(call, depth)},{self.value(state, depth)})"
            raise _Unknown(type(fn).__qualname__)
        name = f"{fn.__module__}.{fn.__qualname__}"
        if _is_library(fn.__module__):
            return f"fn:{name}"
        key = id(fn)
        if key in self.seen:
            return f"ref:{self.seen[key]}"
        self.seen[key] = len(self.seen)
        code = fn.__code__
        cells = [self.value(c.cell_contents, depth) if _cell_set(c) else "<empty>" for c in (fn.__closure__ or ())]
        glob = fn.__globals__
        refs = []
        for n in _global_names(code):
            if n in glob:
                refs.append(f"{n}={self.global_value(glob[n], code, depth)}")
        return "|".join(
            [
                f"fn:{name}",
                self.code(code, depth),
                f"defaults={self.value(fn.__defaults__, depth)}",
                f"kwdefaults={self.value(fn.__kwdefaults__, depth)}",
                f"cells=[{','.join(cells)}]",
                f"globals=[{','.join(refs)}]",
            ]
        )

    def global_value(self, v: Any, code: types.CodeType, depth: int) -> str:
        """A referenced global: modules contribute the user functions of theirs that the code names."""
        if isinstance(v, types.ModuleType):
            if _is_library(v.__name__):
                return f"module:{v.__name__}"
            attrs = sorted(set(_all_names(code)))
            used = [f"{a}={self.value(getattr(v, a), depth + 1)}" for a in attrs if a in vars(v) and not a.startswith("__")]
            return f"module:{v.__name__}({','.join(used)})"
        return self.value(v, depth + 1)

    def code(self, code: types.CodeType, depth: int) -> str:
        consts = [self.code(c, depth + 1) if isinstance(c, types.CodeType) else self.value(c, depth + 1) for c in code.co_consts]
        return f"code({code.co_code.hex()},{consts},{code.co_names},{code.co_varnames},{code.co_argcount},{code.co_kwonlyargcount},{code.co_flags})"


def _cell_set(c: Any) -> bool:
    try:
        c.cell_contents  # noqa: B018
    except ValueError:
        return False
    return True


def _all_names(code: types.CodeType) -> list[str]:
    out = list(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            out.extend(_all_names(c))
    return out


def _global_names(code: types.CodeType) -> list[str]:
    """Names a function (and its nested functions/comprehensions) may look up in its globals."""
    return sorted(set(_all_names(code)))


def callable_identity(fn: Any) -> str | None:
    """Stable text identity of what `fn` computes, or None when it cannot be known."""
    try:
        return _Walker().value(fn, 0)
    except _Unknown:
        return None
    except (RecursionError, ValueError, TypeError, AttributeError, RuntimeError):
        return None
