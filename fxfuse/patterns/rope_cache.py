"""KV-cache writes after a RoPE: find them so rope_quant can store k and v in the same launch.

A cache write, after functionalization, is `index_put(flat_view(cache), [slots], rows)` whose
result is copied back into the graph-input cache by the graph's final `copy_`:

* ATen forms (`index_put_`, `index_copy_`, `cache[slots] = x`; flat `[N, H, D]` or paged
  `[blocks, block_size, H, D]` viewed flat): `slots` is any 1-D integer tensor; a negative slot
  wraps around (index_put semantics), so the fused kernel wraps too.
* transformers' StaticCache (`index_copy_(2, cache_position, k)` or `cache[:, :, pos] = k`): a
  contiguous `[B, H, max_len, D]` cache, `index_put(cache, [None, None, pos], rows [B, H, n, D])`
  (`CacheWrite.bhsd`); position s of batch row b goes to slot pos[s] of row b.
* vLLM's `reshape_and_cache_flash` as fxfuse's built-in unwrap writes it (unwrap_builtin._cache_write):
  padded tokens (slot < 0) are pointed at the first valid token's slot with that token's row
  (or row 0 with its own old value when none is valid), i.e. slot < 0 writes nothing; that
  exact index/where structure is checked node by node, and the kernel skips slot < 0.

Rows are `x` (k after RoPE, or its static fp8 quant; v, or its static fp8 quant), possibly
bit-cast to a uint8 cache. Where eager would raise (a slot >= num_slots, a row count that differs
from the slot count at run time), the kernel writes nothing for that token instead. Everything else (accumulate, broadcast rows, a cache that is not a
contiguous graph input, a read of the cache's old contents) stays with Inductor. Reads of the new
contents (attention over the whole cache after the write) read the fused op's cache output instead
(`reroute_reads`), viewed the way the graph viewed the index_put result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..fx_utils import (Reject, aten, convert_dtype, fake_mode_of, is_convert, is_op, literal, prims,
                        record_inserted, tval, val)

FP8 = torch.float8_e4m3fn
BYTE_DTYPES = (FP8, torch.uint8)
_RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)


@dataclass
class CacheWrite:
    cache: fx.Node  # graph input holding the cache
    copy: fx.Node  # the final copy_(cache, new contents)
    rows: fx.Node  # tensor whose row i goes to slot i ([n, H, D]; fp8 when the cache holds fp8 bits)
    slots: fx.Node  # 1-D integer tensor
    neg_skip: bool  # slot < 0 writes nothing (vLLM) instead of wrapping (index_put)
    nodes: set[fx.Node] = field(default_factory=set)  # the write's own nodes (dead once rerouted)
    prefix: bool = False  # rows are the first len(slots) rows of `rows` (which may hold more)
    base: list[fx.Node] = field(default_factory=list)  # cache -> index_put target views, in order
    post: list[fx.Node] = field(default_factory=list)  # index_put, then its views up to the copy_ source
    reads: dict[fx.Node, list[fx.Node]] = field(default_factory=dict)  # post node -> readers of the new contents
    bhsd: bool = False  # [B, H, max_len, D] cache written along dim 2 (StaticCache); rows [B, H, n, D]

    def readers(self) -> list[fx.Node]:
        return [u for us in self.reads.values() for u in us]


def _same(a: Any, b: Any) -> bool:
    """Two sizes (ints, SymInts or nodes holding a SymInt) provably equal."""
    a, b = (val(x) if isinstance(x, fx.Node) else x for x in (a, b))
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001
        return False


def rows_match(m: Any, n: Any) -> bool:
    """m rows can be written to n slots: provably m == n, or m is provably >= 2 (index_put
    broadcasts only a single row; any other mismatch is a runtime error in eager, so the graph
    only runs with m == n)."""
    if _same(m, n):
        return True
    try:
        return bool(statically_known_true(m >= 2))
    except Exception:  # noqa: BLE001
        return False


def _is_bitcast(n: Any) -> bool:
    """view(dtype) between fp8 and uint8 (same bits)."""
    return (is_op(n, aten.view.dtype) and tval(n).dtype in BYTE_DTYPES
            and tval(n.args[0]).dtype in BYTE_DTYPES)


def _strip_one(n: Any) -> tuple[fx.Node, bool] | None:
    """(input, is a dim-0 prefix slice) of a row-preserving reinterpretation (alias, reshape, dim-0
    slice from 0, fp8<->uint8 bit-cast), else None."""
    if not isinstance(n, fx.Node):
        return None
    if is_op(n, aten.alias.default, *_RESHAPES) or _is_bitcast(n):
        return n.args[0], False
    if is_op(n, aten.slice.Tensor):
        a = list(n.args) + [0, None, None, 1][len(n.args) - 1:]
        dim, start, end, step = a[1:5]
        size = tval(n.args[0]).shape[dim]
        full = end is None or (isinstance(end, int) and end >= 2**62) or _same(end, size)
        if start in (0, None) and (step or 1) == 1 and (full or dim == 0):
            return n.args[0], not full
    return None


def _flat_base(base: Any, cache: fx.Node, nodes: set[fx.Node]) -> list[fx.Node]:
    """base must be the cache (through clone / reshape / bit-cast) viewed [N, H, D]; returns that
    chain of nodes from the one reading the cache to `base`."""
    n, chain = base, []
    while n is not cache:
        if not (is_op(n, aten.clone.default, aten.alias.default, *_RESHAPES) or _is_bitcast(n)):
            raise Reject(f"the index_put target is not a view of the cache input ({getattr(n, 'name', n)})")
        nodes.add(n)
        chain.append(n)
        n = n.args[0]
    return chain[::-1]


def _where_parts(n: Any) -> tuple[Any, Any, Any] | None:
    return tuple(n.args[:3]) if is_op(n, aten.where.self) else None


def _scalar_of(n: Any) -> Any:
    """The value of scalar_tensor(v) (an int or a node holding a SymInt), else a sentinel."""
    if is_op(n, aten.scalar_tensor.default) and tval(n).dtype == torch.int64:
        return n.args[0]
    return object()


def _match_skip_form(ip: fx.Node, flat: fx.Node, nodes: set[fx.Node]) -> tuple[fx.Node, fx.Node]:
    """(rows, slots) of unwrap_builtin._cache_write's index_put, checked node by node."""
    idx, vals = ip.args[1][0], ip.args[2]
    if is_convert(idx) and convert_dtype(idx) == torch.int64:
        nodes.add(idx)
        idx = idx.args[0]
    w3 = _where_parts(idx)
    if w3 is None or not is_op(vals, aten.index.Tensor) or len(vals.args[1]) != 1:
        raise Reject("cache write indices are computed, not the vLLM slot form")
    ge, slots, w2 = w3
    if not (is_op(ge, aten.ge.Scalar) and ge.args[0] is slots and literal(ge.args[1]) == 0.0):
        raise Reject("cache write: padded-slot mask is not slots >= 0")
    sv = tval(slots)
    if sv.dim() != 1 or sv.dtype not in (torch.int32, torch.int64):
        raise Reject(f"slots are {tuple(sv.shape)} {sv.dtype}, not a 1-D int32/int64 tensor")
    n = sv.shape[0]
    anyv, pick, zero = _where_parts(w2) or (None, None, None)
    if not (is_op(anyv, aten.any.default) and anyv.args[0] is ge) or not _same(_scalar_of(zero), 0):
        raise Reject("cache write: padded slots do not fall back to the first valid slot or row 0")
    if not (is_op(pick, aten.index.Tensor) and pick.args[0] is slots and len(pick.args[1]) == 1):
        raise Reject("cache write: padded slots do not fall back to the first valid slot")
    first = pick.args[1][0]
    am = first.args[0] if is_op(first, *_RESHAPES) and list(first.args[1]) == [1] else None
    cv = am.args[0] if is_op(am, aten.argmax.default) and len(am.args) == 1 and not am.kwargs else None
    if not (is_convert(cv) and convert_dtype(cv) == torch.int32 and cv.args[0] is ge):
        raise Reject("cache write: the fallback token is not argmax(slots >= 0)")
    table, (src,) = vals.args[0], vals.args[1]
    w1 = _where_parts(src)
    if w1 is None or w1[0] is not ge:
        raise Reject("cache write: rows are not selected by the same slot mask")
    _, iota, w0 = w1
    if not (is_op(iota, prims.iota.default) and _same(iota.args[0], n) and iota.kwargs.get("start") == 0
            and iota.kwargs.get("step") == 1):
        raise Reject("cache write: valid tokens do not write their own row")
    w0p = _where_parts(w0)
    if w0p is None or w0p[0] is not anyv or w0p[1] is not first or not _same(_scalar_of(w0p[2]), n):
        raise Reject("cache write: padded tokens do not repeat the first valid token's row")
    if not (is_op(table, aten.cat.default) and len(table.args[0]) == 2 and (len(table.args) < 2 or table.args[1] == 0)):
        raise Reject("cache write: row table is not cat(rows, cache[:1])")
    rows, row0 = table.args[0]
    if not (is_op(row0, aten.slice.Tensor) and row0.args[0] is flat and list(row0.args[1:4]) == [0, 0, 1]):
        raise Reject("cache write: the extra row is not the cache's row 0")
    if not _same(tval(rows).shape[0], n):
        raise Reject("cache write: row count differs from the slot count")
    nodes |= {idx, ge, w2, anyv, zero, pick, first, am, cv, vals, table, src, iota, w0, w0p[2], row0}
    return rows, slots


def match_cache_write(copy: fx.Node) -> CacheWrite | None:
    """The cache write ending at `copy` (copy_(cache_input, ...)); None if it is not an index_put
    write at all, Reject (a near miss) if it is one that cannot be fused."""
    cache, src = copy.args[0], copy.args[1]
    if not (is_op(copy, aten.copy_.default) and isinstance(cache, fx.Node) and cache.op == "placeholder"):
        return None
    nodes: set[fx.Node] = {copy}
    back, post = src, []
    while isinstance(back, fx.Node) and (is_op(back, aten.alias.default, *_RESHAPES) or _is_bitcast(back)):
        nodes.add(back)
        post.append(back)
        back = back.args[0]
    if not is_op(back, aten.index_put.default):
        return None
    ip = back
    nodes.add(ip)
    post = [ip] + post[::-1]
    cv, sv_ = tval(cache), tval(src)
    if tuple(sv_.shape) != tuple(cv.shape) or sv_.dtype != cv.dtype:
        raise Reject("cache write: the copied-back tensor does not match the cache's shape/dtype")
    if len(ip.args) > 3 and ip.args[3] or ip.kwargs.get("accumulate"):
        raise Reject("cache write accumulates (index_put accumulate=True)")
    idx = list(ip.args[1])
    if cv.dim() == 4 and len(idx) == 3 and idx[:2] == [None, None] and idx[2] is not None:
        return _match_bhsd(copy, ip, cache, nodes, post)
    if len(idx) != 1 or idx[0] is None:
        raise Reject("cache write indexes more than the slot dim")
    if cv.dim() < 3 or not cv.is_contiguous():
        raise Reject(f"cache {cache.name} is not a contiguous [..., H, D] tensor")
    flat = ip.args[0]
    fv = tval(flat)
    H, D = cv.shape[-2], cv.shape[-1]
    if fv.dim() != 3 or not _same(fv.shape[1], H) or not _same(fv.shape[2], D) or not _same(fv.numel(), cv.numel()):
        raise Reject(f"cache write target is {tuple(fv.shape)}, not the cache viewed as [slots, {H}, {D}]")
    if not (fv.dtype == cv.dtype or {fv.dtype, cv.dtype} <= set(BYTE_DTYPES)):
        raise Reject("cache write target reinterprets the cache as another dtype")
    base = _flat_base(flat, cache, nodes)
    fl, iv = tval(flat), tval(ip)
    if not (_same_shape(fl, iv) and fl.dtype == iv.dtype and _same_strides(fl, iv)):
        raise Reject("cache write: the index_put result is not laid out like its target")
    vals, idx0 = ip.args[2], ip.args[1][0]
    if is_convert(idx0):
        idx0 = idx0.args[0]
    if is_op(vals, aten.index.Tensor) and is_op(idx0, aten.where.self):
        rows, slots = _match_skip_form(ip, flat, nodes)
        neg_skip = True
    else:
        rows, slots = vals, ip.args[1][0]
        if is_convert(slots) and convert_dtype(slots) == torch.int64 and tval(slots.args[0]).dtype == torch.int32:
            nodes.add(slots)
            slots = slots.args[0]
        neg_skip = False
        slv = tval(slots)
        if slv.dim() != 1 or slv.dtype not in (torch.int32, torch.int64):
            raise Reject(f"cache write slots are {tuple(slv.shape)} {slv.dtype}, not a 1-D int32/int64 tensor")
    reads = _uses(cache, copy, nodes, base, post)
    rv = tval(rows)
    if rv.dim() == 2 and _same(tval(slots).shape[0], 1) and is_op(rows, *_RESHAPES) and tval(rows.args[0]).dim() == 3:
        nodes.add(rows)  # one token: [H, D] rows (a squeezed [1, H, D]) broadcast to the one slot
        rows = rows.args[0]
        rv = tval(rows)
    if rv.dim() != 3 or not rows_match(rv.shape[0], tval(slots).shape[0]) or not _same(rv.shape[1], H) or not _same(rv.shape[2], D):
        raise Reject(f"cache write rows are {tuple(rv.shape)}, not [{tval(slots).shape[0]}, {H}, {D}] (broadcast rows)")
    rows, prefix = _rows_source(rows, nodes)
    if tval(rows).device != cv.device or tval(slots).device != cv.device:
        raise Reject("cache, rows and slots are on different devices")
    return CacheWrite(cache=cache, copy=copy, rows=rows, slots=slots, neg_skip=neg_skip, nodes=nodes, prefix=prefix,
                      base=base, post=post, reads=reads)


def _uses(cache: fx.Node, copy: fx.Node, nodes: set[fx.Node], base: list[fx.Node],
          post: list[fx.Node]) -> dict[fx.Node, list[fx.Node]]:
    """Readers of the new contents (the index_put result and its views), which `reroute_reads`
    points at the fused op's cache output; Reject if anything else reads the write's nodes (the old
    contents through the target view, the skip form's intermediates) or the cache input itself."""
    reads = {n: [u for u in n.users if u not in nodes] for n in post}
    reads = {n: us for n, us in reads.items() if us}
    for n in nodes - {copy} - set(post):  # the flat view may feed the skip form's row-0 slice (now in nodes)
        us = [u for u in n.users if u not in nodes]
        if us:
            what = "old contents of the cache" if n in base else "write's intermediate"
            raise Reject(f"cache write: {n.name} is also used elsewhere ({us[0].name} reads the {what})")
    old_reads = [u for u in cache.users if u not in nodes]
    if old_reads:
        raise Reject(f"cache {cache.name} is read elsewhere in the graph ({old_reads[0].name} reads the old "
                     "contents, not the written ones)")
    return reads


def _match_bhsd(copy: fx.Node, ip: fx.Node, cache: fx.Node, nodes: set[fx.Node], post: list[fx.Node]) -> CacheWrite:
    """index_put(cache, [None, None, slots], rows): a contiguous [B, H, max_len, D] cache (transformers
    StaticCache's index_copy_(2, cache_position, k)) with rows [B, H, n, D]."""
    cv = tval(cache)
    if not cv.is_contiguous():
        raise Reject(f"[B, H, max_len, D] cache {cache.name} is not contiguous")
    flat = ip.args[0]
    fv, iv = tval(flat), tval(ip)
    if not (_same_shape(fv, cv) and fv.dtype == cv.dtype and _same_shape(iv, cv) and _same_strides(iv, cv)
            and _same_strides(fv, cv)):
        raise Reject("cache write: the index_put target is not the [B, H, max_len, D] cache as it is")
    base = _flat_base(flat, cache, nodes)
    slots = ip.args[1][2]
    if is_convert(slots) and convert_dtype(slots) == torch.int64 and tval(slots.args[0]).dtype == torch.int32:
        nodes.add(slots)
        slots = slots.args[0]
    slv = tval(slots)
    if slv.dim() != 1 or slv.dtype not in (torch.int32, torch.int64):
        raise Reject(f"cache write positions are {tuple(slv.shape)} {slv.dtype}, not a 1-D int32/int64 tensor")
    reads = _uses(cache, copy, nodes, base, post)
    rows = ip.args[2]
    if _is_bitcast(rows):
        nodes.add(rows)
        rows = rows.args[0]
    rv = tval(rows)
    if not (rv.dim() == 4 and all(_same(rv.shape[i], cv.shape[i]) for i in (0, 1, 3))
            and rows_match(rv.shape[2], slv.shape[0])):
        raise Reject(f"cache write rows are {tuple(rv.shape)}, not [{cv.shape[0]}, {cv.shape[1]}, {slv.shape[0]}, "
                     f"{cv.shape[3]}] (broadcast rows)")
    if not (rv.dtype == cv.dtype or {rv.dtype, cv.dtype} <= set(BYTE_DTYPES)):
        raise Reject(f"cache write rows are {rv.dtype}, the cache {cv.dtype}")
    if rv.device != cv.device or slv.device != cv.device:
        raise Reject("cache, rows and slots are on different devices")
    return CacheWrite(cache=cache, copy=copy, rows=rows, slots=slots, neg_skip=False, nodes=nodes, base=base,
                      post=post, reads=reads, bhsd=True)


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dim() == b.dim() and all(_same(x, y) for x, y in zip(a.shape, b.shape))


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Strides equal wherever they matter (size-1 dims ignored), provably for symbolic sizes."""
    return all(_same(sa, sb) for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if not _same(n, 1))


def reroute_vals(w: CacheWrite, new_val: torch.Tensor) -> list[torch.Tensor]:
    """Values of the views `reroute_reads` makes of the fused op's new cache `new_val` (laid out
    like the cache input): the target view chain, then the post-write views. Each is a fresh view
    of `new_val` (not of the cache input: Inductor's reinplacing tells the cache's views apart by
    their values' storage) with the shape, dtype and strides of the node it stands for; Reject if not."""
    if not w.reads:
        return []
    cv = tval(w.cache)
    if not (_same_shape(new_val, cv) and new_val.dtype == cv.dtype and _same_strides(new_val, cv)):
        raise Reject(f"fused cache output {tuple(new_val.shape)} {new_val.stride()} is not laid out like {w.cache.name}")
    fake_mode = fake_mode_of([new_val])
    vals, cur = [], new_val
    for old in w.base + w.post[1:]:
        args = (cur, *fx.node.map_arg(old.args[1:], val))
        with fake_mode:
            cur = old.target(*args, **fx.node.map_arg(dict(old.kwargs), val))
        ov = tval(old)
        if not (_same_shape(cur, ov) and cur.dtype == ov.dtype and _same_strides(cur, ov)):
            raise Reject(f"cache write: {old.name} of the fused cache would be {tuple(cur.shape)} {cur.stride()}, "
                         f"not {tuple(ov.shape)} {ov.stride()}")
        vals.append(cur)
    return vals


def reroute_reads(graph: fx.Graph, w: CacheWrite, new_cache: fx.Node, vals: list[torch.Tensor]) -> list[fx.Node]:
    """Point every reader of the written contents (the index_put result and its views) at
    `new_cache` (the cache input's new value), viewed the same way: the target view chain and the
    post-write views are replayed on it, with the values `reroute_vals` gave. Returns the nodes added
    (recorded for the pipeline's final sort)."""
    if not w.reads:
        return []
    added: list[fx.Node] = []
    anchor = new_cache.next
    it = iter(vals)

    def replay(old: fx.Node, inp: fx.Node) -> fx.Node:
        with graph.inserting_before(anchor):
            nn = graph.call_function(old.target, (inp, *old.args[1:]), dict(old.kwargs))
        nn.meta.update({k: x for k, x in old.meta.items() if k not in ("val", "tensor_meta")})
        nn.meta["val"] = next(it)
        added.append(nn)
        return nn

    cur = new_cache
    for b in w.base:
        cur = replay(b, cur)
    new = {w.post[0]: cur}
    for p in w.post[1:]:
        new[p] = replay(p, new[p.args[0]])
    for n, users in w.reads.items():
        for u in users:
            u.replace_input_with(n, new[n])
    record_inserted(graph, added)  # the windowed stable_toposort checks only recorded nodes' edges
    return added


def _write_result(n: Any) -> bool:
    """n is an index_put result (a cache write's new contents) or a view of one."""
    while is_op(n, aten.alias.default, aten.slice.Tensor, *_RESHAPES) or _is_bitcast(n):
        n = n.args[0]
    return is_op(n, aten.index_put.default)


def _rows_source(rows: fx.Node, nodes: set[fx.Node]) -> tuple[fx.Node, bool]:
    """(source, prefix): the deepest node above `rows` whose first rows are the written rows, through
    row-preserving reinterpretations (every node [tokens, ...] with H*D values per token); `prefix`
    when a dim-0 slice took the first len(slots) tokens of a longer (or not provably equal) source."""
    rv = tval(rows)
    per_tok = rv.shape[1] * rv.shape[2]
    chain, pref = [rows], [False]
    while True:
        nxt = _strip_one(chain[-1])
        if nxt is None or _write_result(nxt[0]):  # a read of another cache's new contents stays a reader
            break                                   # (reroute_reads points readers, not CacheWrite.rows, at the op)
        nv = tval(nxt[0])
        if nv.dim() < 2 or not _same(math.prod(nv.shape[1:]), per_tok):
            break
        chain.append(nxt[0])
        pref.append(pref[-1] or nxt[1])
    best = max(i for i, n in enumerate(chain)
               if tval(n).dim() == 3 and _same(tval(n).shape[1], rv.shape[1]) and _same(tval(n).shape[2], rv.shape[2]))
    nodes |= set(chain[:best])
    return chain[best], pref[best]


@dataclass
class KVPlan:
    """The k and v cache writes fused into one rope_quant launch."""

    k: CacheWrite
    v: CacheWrite
    v_src: fx.Node  # v rows as read by the kernel ([n, Hv, D])
    k_fp8: bool  # the k cache gets the fp8 quant of k (else the rope output)
    v_quant: Any = None  # quant.QuantMatch of v's static fp8 quant, or None
    store_kq: bool = True  # k's fp8 quant is also used outside the cache write (the op outputs it)

    @property
    def nodes(self) -> set[fx.Node]:
        return self.k.nodes | self.v.nodes | (self.v_quant.nodes if self.v_quant is not None else set())


def v_rows(w: CacheWrite) -> tuple[fx.Node, Any]:
    """(v, static fp8 quant match or None) of a v cache write's rows."""
    from .quant import STATIC, _match_chain, strip_f32_convert

    rows = w.rows
    if is_convert(rows) and convert_dtype(rows).is_floating_point and convert_dtype(rows).itemsize == 1 \
            and convert_dtype(rows) != FP8:
        raise Reject(f"v is quantized to {convert_dtype(rows)}; only e4m3fn caches are fused")
    if not (is_convert(rows) and convert_dtype(rows) in BYTE_DTYPES):
        return rows, None
    t = rows.args[0]
    while is_op(t, aten.clamp_min.default, aten.clamp_max.default, aten.clamp.default):
        t = t.args[0]
    if not is_op(t, aten.div.Tensor, aten.mul.Tensor):
        raise Reject("v is converted to fp8 without dividing or multiplying by a scale")
    a = t.args[0]
    if is_op(t, aten.mul.Tensor) and isinstance(t.args[1], fx.Node) and tval(t.args[1]).numel() != 1:
        a = t.args[1]
    v = strip_f32_convert(a)[0]
    if not isinstance(v, fx.Node):
        raise Reject("v fp8 quant reads a constant")
    q = _match_chain(v, rows, {})
    if q.scheme != STATIC or q.round_to_int or q.qdtype != FP8:
        raise Reject("v fp8 quant is not a static per-tensor e4m3 quant")
    if q.scale_ops:  # the cache kernel divides by the scale tensor as is (no scale chain for v)
        raise Reject("v fp8 scale is computed from the scale tensor (e.g. scale * c); only a plain scale is fused")
    return v, q
