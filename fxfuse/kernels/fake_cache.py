"""Remember fxfuse ops' CPU fake outputs by argument metadata.

On CPU a `triton_op` body (which doubles as the fake impl) runs the whole reference implementation
under fake tensors: a Python loop over experts, rotations, quant chains, hundreds of fake ops per
call, and a compile calls it for every rewrite (seconds per MoE model). The outputs of a fake impl
depend only on the arguments' metadata, so identical metadata gets fresh outputs of the recorded
shape/stride/dtype without running the body again. Anything symbolic, or outputs that are not
fresh dense tensors, is never cached (the body runs as before).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .._keys import NoKey, freeze

stats: dict[str, int] = {"hits": 0, "misses": 0}
"""Fake-impl calls served from the cache vs. run (tests read these)."""

ENABLED = True
"""Off: every fake call runs the body (tests compare both)."""


def _tensor_leaf(a: Any, depth: int) -> Any:
    if not isinstance(a, torch.Tensor):
        return NotImplemented
    ints = (*a.shape, *a.stride(), a.storage_offset())
    if a.device.type != "cpu" or a.requires_grad or not all(type(i) is int for i in ints):  # SymInt: never cached
        raise NoKey
    return ("T", a.dtype, tuple(a.shape), a.stride(), a.storage_offset())


def _owns_dense_storage(t: torch.Tensor) -> bool:
    """Offset 0 and a storage exactly as large as the strided extent: an output empty_strided recreates."""
    ints = (*t.shape, *t.stride(), t.storage_offset())
    if not all(type(i) is int for i in ints) or t.storage_offset() != 0 or t.requires_grad:
        return False
    extent = 0 if t.numel() == 0 else 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return t.untyped_storage().nbytes() == extent * t.element_size()


def _out_meta(out: Any) -> Any:
    """(shape, stride, dtype, device) per output, or None when the outputs cannot be recreated exactly."""
    outs = out if isinstance(out, tuple) else (out,)
    if not all(isinstance(t, torch.Tensor) and _owns_dense_storage(t) for t in outs):
        return None
    if len({t.untyped_storage()._cdata for t in outs}) != len(outs):  # outputs sharing a buffer
        return None
    metas = tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in outs)
    return (isinstance(out, tuple), metas)


def _make(meta: Any) -> Any:
    is_tuple, metas = meta
    outs = tuple(torch.empty_strided(shape, stride, dtype=dtype, device=device) for shape, stride, dtype, device in metas)
    return outs if is_tuple else outs[0]


def cache_cpu_fake(op: Any) -> None:
    """Wrap the fake impl of a `triton_op`/`custom_op` (CustomOpDef) with the metadata cache."""
    body: Callable[..., Any] = op._abstract_fn
    cache: dict[Any, Any] = {}

    def fake(*args: Any, **kwargs: Any) -> Any:
        if not ENABLED:
            return body(*args, **kwargs)
        try:
            key = freeze((args, tuple(sorted(kwargs.items()))), _tensor_leaf)
        except NoKey:
            return body(*args, **kwargs)
        meta = cache.get(key)
        if meta is not None:
            stats["hits"] += 1
            return _make(meta)
        stats["misses"] += 1
        out = body(*args, **kwargs)
        meta = _out_meta(out)
        if meta is not None:
            cache[key] = meta
        return out

    fake.__wrapped__ = body  # type: ignore[attr-defined]
    op.register_fake(fake)
