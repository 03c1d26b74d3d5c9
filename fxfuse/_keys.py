"""Exact, hashable cache keys for plain Python values (the fxfuse caches share one definition).

Values are type-tagged so 1, 1.0 and True never collide, floats are keyed by their bits (hex), and
anything not understood raises `NoKey`: a cache then does the work instead of guessing.
"""

from __future__ import annotations

import enum
from typing import Any, Callable

import torch


class NoKey(Exception):
    """A value that cannot be keyed exactly: do not cache."""


def freeze(x: Any, leaf: Callable[[Any, int], Any] | None = None, depth: int = 0) -> Any:
    """A hashable image of `x`; `leaf(x, depth)` keys the types a caller knows more about (it
    returns NotImplemented for the rest)."""
    if depth > 8:
        raise NoKey
    if x is None or isinstance(x, (bool, int, str)):
        return (type(x).__name__, x)
    if isinstance(x, float):
        return ("float", x.hex())
    if isinstance(x, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return (type(x).__name__, str(x))
    if isinstance(x, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, enum.Enum)):
        return ("obj", x)
    if isinstance(x, (list, tuple, torch.Size)):
        return (type(x).__name__, tuple(freeze(v, leaf, depth + 1) for v in x))
    if isinstance(x, dict):
        return ("dict", tuple((freeze(k, leaf, depth + 1), freeze(v, leaf, depth + 1)) for k, v in x.items()))
    if leaf is not None:
        key = leaf(x, depth)
        if key is not NotImplemented:
            return key
    raise NoKey
