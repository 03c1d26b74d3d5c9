"""MoE experts (what consumes hidden states + routing (weights, ids)) -> one fused MoE op.

Recognized forms (post-grad ATen, as transformers' experts implementations trace):

* ``grouped_mm``: ``sort`` of the flat ids, gather ``x[perm // K]``, ``histc``/``cumsum`` offsets,
  ``aten._grouped_mm`` (or transformers' opaque ``grouped_mm_fallback`` op, used for non-bf16
  weights under compile) for gate_up and down, weights gathered by ``perm``, the inverse
  permutation by ``index_put(empty, [perm], iota)``, ``reshape(M, K, H).sum(1)``;
* ``batched_mm``: ``W[ids_flat]`` gathers + ``bmm`` on the token repeated K times
  (``repeat_interleave`` -> unsqueeze/expand/clone/reshape), ``reshape(M, K, H).sum(1)``;
* ``dense_loop``: a traced ``for e in range(E)`` over *all* experts of stacked weights
  (``W1[e]``/``W2[e]`` selects, masked weight ``sum(tw * (ids == e), -1)``), the expert outputs
  combined by a tree of adds. Every expert must appear exactly once.

transformers <= 5.17 always adds expert-parallel sentinel handling (5.23 only under EP): grouped_mm
zeroes the rows whose sorted id is >= E (``masked_fill(sorted_ids >= E, 0)`` on the gathered input
and both GEMM outputs) -- the fused kernels give out-of-range ids zero contribution too; batched_mm
gathers by ``ids.clamp(0, E - 1)`` -- the replacement clamps the ids the same way before the op.

Starting at the gate_up GEMM, walk back to (x, ids) and forward through SiLU-and-mul, the down
GEMM and the weighted combine; everything the region computes must be private to it. The
routing producer (topk or a fused router op) is not part of the region: weights and ids are
inputs. At decode on CUDA (static token count), when they come (through reshape views) from a
fused router (patterns.moe_routing records what it inserted) whose outputs nothing else reads,
the router folds in: one ``fxfuse::moe_routed_experts`` from the logits replaces both ops, and
the experts' first kernel routes (opt-in option ``moe_fold_routing``: on an H200 every program
routing its own token made kernel A as much slower as the saved launch, and at 8 tokens slower;
the decode gate class applies).  transformers' "eager" experts loop graph-breaks on ``nonzero``: graphs that end in its
one-hot expert mask are reported as a near miss naming the fix.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .. import gating
from .._log import log
from ..fx_utils import (
    Reject,
    aten,
    convert_dtype,
    depends_on_any,
    insert_traced,
    is_convert,
    is_op,
    literal,
    same_device,
    stable_toposort,
    tval,
    val,
)

FAMILY = "moe_experts"
DTYPES = (torch.bfloat16, torch.float16)
EAGER_FIX = 'set config._experts_implementation = "grouped_mm" (or "batched_mm") so the whole MoE layer is one graph'


def _fallback_op() -> Any:
    """transformers' opaque grouped-mm op (registered only when transformers is imported)."""
    ns = getattr(torch.ops, "transformers", None)
    try:
        return ns.grouped_mm_fallback.default if ns is not None else None
    except (AttributeError, RuntimeError):
        return None


def _is_grouped_mm(n: Any) -> bool:
    fb = _fallback_op()
    return is_op(n, aten._grouped_mm.default) or (fb is not None and is_op(n, fb))


@dataclass
class MoEMatch:
    form: str
    x: fx.Node  # [M, H]
    ids: fx.Node  # [M, K] int
    tw: fx.Node  # [M, K] routing weights (as multiplied)
    w1: fx.Node  # gate_up weight node
    w1_transposed: bool  # True: w1 is [E, 2I, H] (needs .transpose(1, 2) to the op's [E, H, 2I])
    w2: fx.Node
    w2_transposed: bool
    out: fx.Node  # the combined output
    prod_dtype: torch.dtype
    sum_dtype: torch.dtype
    E: int
    K: int
    H: int
    I: int
    nodes: set[fx.Node] = field(default_factory=set)
    clamp_ids: bool = False  # batched_mm gathered by ids.clamp(0, E - 1) (transformers <= 5.17)


# ----------------------------------------------------------------------------- shared pieces


def _single_user(n: fx.Node, what: str) -> fx.Node:
    users = [u for u in n.users if not is_op(u, aten.sym_size.int)]
    if len(users) != 1:
        raise Reject(f"{what} ({n.name}) has {len(users)} users, expected 1")
    return users[0]


def _dim(d: Any, ndim: int) -> int | None:
    return d % ndim if isinstance(d, int) else None


def _strip_convert(n: Any, nodes: set[fx.Node]) -> Any:
    while is_convert(n):
        nodes.add(n)
        n = n.args[0]
    return n


def _sentinel_masked(n: Any, nodes: set[fx.Node], masks: list[fx.Node]) -> Any:
    """where(mask, 0, v) / masked_fill(v, mask, 0) -> v (mask recorded for the caller to check)."""
    if is_op(n, aten.where.self) and len(n.args) == 3:
        mask, zero, v = n.args
        z = literal(zero)
        if z is None and is_op(zero, aten.full.default) and list(zero.args[0]) == [] and len(zero.args) > 1:
            z = literal(zero.args[1])
            if z == 0.0:
                nodes.add(zero)
    elif is_op(n, aten.masked_fill.Scalar) and len(n.args) == 3:
        v, mask, z = n.args[0], n.args[1], literal(n.args[2])
    else:
        return n
    if z != 0.0 or not isinstance(v, fx.Node):
        return n
    nodes.add(n)
    masks.append(mask)
    return v


def _check_sentinel_masks(masks: list[fx.Node], sorted_ids: fx.Node, E: int, nodes: set[fx.Node]) -> None:
    """Each mask must be (sorted ids >= E)[:, None]: it zeroes only rows of out-of-range ids."""
    for mask in masks:
        u = mask
        if not (is_op(u, aten.unsqueeze.default) and _dim(u.args[1], 2) == 1):
            raise Reject("rows are zeroed by a mask that is not the out-of-range expert ids")
        ge = u.args[0]
        src = _strip_convert(ge.args[0], nodes) if is_op(ge, aten.ge.Scalar) else None
        if src is not sorted_ids or literal(ge.args[1]) != float(E):
            raise Reject("rows are zeroed by a mask that is not the out-of-range expert ids")
        nodes.update({u, ge})


def _silu_source(n: Any, nodes: set[fx.Node]) -> Any:
    """If n computes silu(v) (aten.silu, v*sigmoid(v), v/(1+exp(-v))), return v's source, else None."""
    if is_op(n, aten.silu.default):
        nodes.add(n)
        return n.args[0]
    if is_op(n, aten.mul.Tensor) and len(n.args) == 2:
        a, b = n.args
        for v, s in ((a, b), (b, a)):
            if is_op(s, aten.sigmoid.default) and s.args[0] is v:
                nodes.update({n, s})
                return v
    if is_op(n, aten.div.Tensor) and len(n.args) == 2 and not n.kwargs:
        v, den = n.args
        if is_op(den, aten.add.Tensor, aten.add.Scalar) and len(den.args) == 2:
            a, b = den.args
            ex = a if literal(b) == 1.0 else b if literal(a) == 1.0 else None
            if is_op(ex, aten.exp.default) and is_op(ex.args[0], aten.neg.default) and ex.args[0].args[0] is v:
                nodes.update({n, den, ex, ex.args[0]})
                return v
    return None


def _parse_act(gu: fx.Node, I: int, act: torch.dtype, nodes: set[fx.Node]) -> fx.Node:
    """gu [S, 2I] -> split in gate/up halves -> round(silu(gate)) * up in the act dtype. Returns the mul."""
    sp = _single_user(gu, "gate_up output")
    gdim = len(tval(gu).shape) - 1
    if is_op(sp, aten.split.Tensor) and sp.args[1] == I and _dim(sp.args[2] if len(sp.args) > 2 else 0, gdim + 1) == gdim:
        pass
    elif is_op(sp, aten.split_with_sizes.default) and list(sp.args[1]) == [I, I] and _dim(
        sp.args[2] if len(sp.args) > 2 else 0, gdim + 1
    ) == gdim:
        pass
    elif is_op(sp, aten.add.Tensor):
        raise Reject("gate_up output gets a bias added before the activation (biased experts, e.g. GPT-OSS): "
                     "not supported")
    else:
        raise Reject("gate_up output is not split into gate and up halves along the last dim")
    nodes.add(sp)
    parts: dict[int, fx.Node] = {}
    for u in sp.users:
        if u.target is not operator.getitem:
            raise Reject("split result used directly")
        parts[u.args[1]] = u
        nodes.add(u)
    if set(parts) != {0, 1}:
        raise Reject("gate_up split halves are not both used")
    gate, up = parts[0], parts[1]
    mul = _single_user(up, "up half")
    if not is_op(mul, aten.mul.Tensor) or len(mul.args) != 2:
        raise Reject("up half is not multiplied by the activation")
    other = mul.args[0] if mul.args[1] is up else mul.args[1]
    if tval(mul).dtype != act:
        raise Reject(f"SiLU-and-mul computed in {tval(mul).dtype}, not the activation dtype {act}")
    sub: set[fx.Node] = set()
    s = other
    if is_convert(s):
        if convert_dtype(s) != act:
            raise Reject("activation converted to an unexpected dtype")
        sub.add(s)
        s = s.args[0]
    v = _silu_source(s, sub)
    if v is None:
        raise Reject("activation is not SiLU (only silu(gate) * up is fused)")
    if tval(s).dtype not in (act, torch.float32):
        raise Reject("SiLU computed in an unexpected dtype")
    if is_convert(v) and convert_dtype(v) == torch.float32:  # exact upcast of the gate
        sub.add(v)
        v = v.args[0]
    if v is not gate:
        raise Reject("SiLU does not read the gate half (or reads it through a rounding)")
    nodes.update(sub)
    nodes.add(mul)
    return mul


def _parse_combine(prod_in: fx.Node, gather_w: Any, M: Any, K: int, H: int, nodes: set[fx.Node]) -> tuple:
    """mul(pair_out, unsqueeze(weights_flat, -1)) ... reshape(M, K, H).sum(1) [-> convert].

    `gather_w(flat)` maps the weights operand (after unsqueeze) to the [M*K] flat weights node.
    Returns (tw node, mul node, reshape-input node to check by caller, out node, prod dtype, sum dtype).
    """
    mul = _single_user(prod_in, "down projection output")
    if not is_op(mul, aten.mul.Tensor) or len(mul.args) != 2:
        raise Reject("expert outputs are not multiplied by the routing weights")
    wop = mul.args[1] if mul.args[0] is prod_in else mul.args[0]
    if not is_op(wop, aten.unsqueeze.default) or _dim(wop.args[1], 2) != 1:
        raise Reject("routing weights are not broadcast over the hidden dim")
    flat = gather_w(wop.args[0])
    if not is_op(flat, aten.reshape.default) or len(tval(flat).shape) != 1:
        raise Reject("routing weights are not the flattened [M, K] weights")
    tw = flat.args[0]
    twv = tval(tw)
    if len(twv.shape) != 2 or twv.shape[1] != K or not twv.is_floating_point():
        raise Reject(f"routing weights shape {tuple(twv.shape)} is not [tokens, {K}]")
    nodes.update({wop, flat, mul})
    return tw, mul


def _parse_sum(pairs: fx.Node, M: Any, K: int, H: int, nodes: set[fx.Node]) -> tuple[fx.Node, torch.dtype]:
    """reshape(pairs, [M, K, H]).sum(1) [-> convert]: the top-k combine. Returns (out node, sum dtype)."""
    rs = _single_user(pairs, "weighted expert outputs")
    if not is_op(rs, aten.reshape.default) or len(tval(rs).shape) != 3:
        raise Reject("weighted expert outputs are not viewed as [tokens, top_k, hidden]")
    rv = tval(rs)
    if rv.shape[1] != K or rv.shape[2] != H or rv.shape[0] != M:
        raise Reject(f"combine view {tuple(rv.shape)} is not [tokens, {K}, {H}]")
    red = _single_user(rs, "combine view")
    if not is_op(red, aten.sum.dim_IntList):
        name = getattr(red.target, "__name__", red.target)
        raise Reject(f"per-expert outputs are combined by {name}, not a sum over the top-k")
    dims = red.args[1] if len(red.args) > 1 else red.kwargs.get("dim")
    keep = red.args[2] if len(red.args) > 2 else red.kwargs.get("keepdim", False)
    if not isinstance(dims, (list, tuple)) or [d % 3 for d in dims] != [1] or keep:
        raise Reject("combine does not sum over the top-k dim")
    if red.kwargs.get("dtype") is not None:
        raise Reject("combine sum with an explicit dtype")
    nodes.update({rs, red})
    out = red
    users = [u for u in red.users]
    if len(users) == 1 and is_convert(users[0]):
        out = users[0]
        nodes.add(out)
    return out, tval(red).dtype


def _weight(n: Any, E: int | None, what: str) -> tuple[fx.Node, tuple]:
    if not isinstance(n, fx.Node):
        raise Reject(f"{what} weight is not a tensor")
    v = tval(n)
    if v.dim() != 3 or (E is not None and v.shape[0] != E):
        raise Reject(f"{what} weight shape {tuple(v.shape)} is not [experts, ., .]")
    if not all(isinstance(d, int) for d in v.shape):
        raise Reject(f"{what} weight has a symbolic shape")
    return n, tuple(v.shape)


# ----------------------------------------------------------------------------- grouped_mm form


def _grouped_args(gm: fx.Node) -> tuple[Any, Any, Any]:
    a, b = gm.args[0], gm.args[1]
    offs = gm.args[2] if len(gm.args) > 2 else gm.kwargs.get("offs")
    extra = [v for k, v in gm.kwargs.items() if k != "offs" and v is not None]
    if len(gm.args) > 3 and any(x is not None for x in gm.args[3:]) or extra:
        raise Reject("grouped_mm with bias/out_dtype/scales is not fused")
    return a, b, offs


def match_grouped(gm1: fx.Node) -> MoEMatch:
    nodes: set[fx.Node] = {gm1}
    masks: list[fx.Node] = []
    a1, b1, offs = _grouped_args(gm1)
    a1 = _sentinel_masked(a1, nodes, masks)
    # A1 = x[perm // K]
    if not is_op(a1, aten.index.Tensor) or len(a1.args[1]) != 1:
        raise Reject("grouped_mm input is not a row gather of the hidden states")
    x, idx = a1.args[0], a1.args[1][0]
    if not is_op(idx, aten.div.Tensor_mode) or idx.kwargs.get("rounding_mode") != "floor" or not isinstance(idx.args[1], int):
        raise Reject("gather index is not perm // top_k")
    K = idx.args[1]
    perm = idx.args[0]
    if not (isinstance(perm, fx.Node) and perm.target is operator.getitem and perm.args[1] == 1 and is_op(perm.args[0], aten.sort.default, aten.sort.stable)):
        raise Reject("rows are not gathered in expert-sorted order")
    srt = perm.args[0]
    if is_op(srt, aten.sort.default) and (len(srt.args) > 2 and srt.args[2]):
        raise Reject("experts sorted in descending order")
    ids_flat = srt.args[0]
    nodes.update({a1, idx, perm, srt})
    if not is_op(ids_flat, aten.reshape.default) or len(tval(ids_flat).shape) != 1:
        raise Reject("sorted ids are not the flattened top-k ids")
    ids = ids_flat.args[0]
    iv = tval(ids)
    if iv.dim() != 2 or iv.shape[1] != K or iv.dtype not in (torch.int32, torch.int64):
        raise Reject(f"expert ids {tuple(iv.shape)} {iv.dtype} are not [tokens, {K}] integers")
    nodes.add(ids_flat)
    # offsets = cumsum(histc(sorted ids, bins=E, min=0, max=E-1), dtype=int32)
    if not is_op(offs, aten.cumsum.default):
        raise Reject("grouped_mm offsets are not a cumsum of per-expert counts")
    hist = offs.args[0]
    if not is_op(hist, aten.histc.default):
        raise Reject("per-expert counts are not a histc of the sorted ids")
    hargs = list(hist.args) + [None] * 4
    bins, lo, hi = hargs[1], hargs[2], hargs[3]
    bins = hist.kwargs.get("bins", bins if bins is not None else 100)
    lo = hist.kwargs.get("min", lo if lo is not None else 0)
    hi = hist.kwargs.get("max", hi if hi is not None else 0)
    src = _strip_convert(hist.args[0], nodes)
    if not (isinstance(src, fx.Node) and src.target is operator.getitem and src.args[0] is srt and src.args[1] == 0):
        raise Reject("histc does not count the sorted expert ids")
    E = int(bins)
    if literal(lo) != 0.0 or literal(hi) != float(E - 1):
        raise Reject(f"histc range [{lo}, {hi}] does not cover experts 0..{E - 1} one per bin")
    nodes.update({offs, hist, src})
    w1, s1 = _weight(b1, E, "gate_up")
    xv = tval(x)
    if xv.dim() != 2:
        raise Reject("hidden states are not [tokens, hidden]")
    H = xv.shape[1]
    if s1[1] != H or s1[2] % 2:
        raise Reject(f"gate_up weight {s1} is not [experts, {H}, 2*inter]")
    I = s1[2] // 2
    act = xv.dtype
    gu = _single_user(gm1, "gate_up output")
    h = _parse_act(gu if _sentinel_masked(gu, nodes, masks) is gm1 else gm1, I, act, nodes)
    gm2 = _single_user(h, "SiLU-mul output")
    if not _is_grouped_mm(gm2) or gm2.target is not gm1.target:
        raise Reject("SiLU-mul output does not feed the down grouped_mm")
    a2, b2, offs2 = _grouped_args(gm2)
    if a2 is not h or offs2 is not offs:
        raise Reject("down grouped_mm uses different offsets or input")
    w2, s2 = _weight(b2, E, "down")
    if s2 != (E, I, H):
        raise Reject(f"down weight {s2} is not [experts, {I}, {H}]")
    nodes.add(gm2)

    def gather_w(n: Any) -> Any:
        if not is_op(n, aten.index.Tensor) or len(n.args[1]) != 1 or n.args[1][0] is not perm:
            raise Reject("routing weights are not gathered in the same sorted order")
        nodes.add(n)
        return n.args[0]

    M = xv.shape[0]
    d = _single_user(gm2, "down projection output")
    tw, mul = _parse_combine(d if _sentinel_masked(d, nodes, masks) is gm2 else gm2, gather_w, M, K, H, nodes)
    _check_sentinel_masks(masks, src, E, nodes)
    # restore original order: index(mul, [index_put(empty, [perm], iota)])
    back = _single_user(mul, "weighted expert outputs")
    if not is_op(back, aten.index.Tensor) or len(back.args[1]) != 1:
        raise Reject("weighted outputs are not scattered back to token order")
    inv = back.args[1][0]
    if not (is_op(inv, aten.index_put.default) and len(inv.args[1]) == 1 and inv.args[1][0] is perm
            and not (len(inv.args) > 3 and inv.args[3])):
        raise Reject("the inverse permutation is not index_put(empty, [perm], arange)")
    io = inv.args[2]
    if not ((is_op(io, torch.ops.prims.iota.default) and io.kwargs.get("start", 0) == 0 and io.kwargs.get("step", 1) == 1)
            or (is_op(io, aten.arange.default) and not io.kwargs.get("start"))):
        raise Reject("the inverse permutation does not scatter 0..S-1")
    nodes.update({back, inv, io, inv.args[0]})
    out, sum_dt = _parse_sum(back, M, K, H, nodes)
    return MoEMatch("grouped_mm", x, ids, tw, w1, False, w2, False, out, tval(mul).dtype, sum_dt, E, K, H, I, nodes)


# ----------------------------------------------------------------------------- batched_mm form


def _expert_gather(n: Any) -> tuple[fx.Node, fx.Node] | None:
    """index(W [E, ., .], [ids_flat]) -> (W, ids_flat)."""
    if is_op(n, aten.index.Tensor) and len(n.args[1]) == 1 and isinstance(n.args[0], fx.Node):
        w = tval(n.args[0])
        if w.dim() == 3:
            return n.args[0], n.args[1][0]
    return None


def _repeat_source(n: Any, K: int, nodes: set[fx.Node]) -> Any:
    """x.repeat_interleave(K, 0) as traced: reshape(clone(expand(unsqueeze(x, 1), [M, K, H])), [M*K, H])."""
    if not is_op(n, aten.reshape.default):
        return None
    c = n.args[0]
    if is_op(c, aten.clone.default):
        e = c.args[0]
    else:
        e, c = c, None
    if not is_op(e, aten.expand.default) or not is_op(e.args[0], aten.unsqueeze.default):
        return None
    u = e.args[0]
    if _dim(u.args[1], 3) != 1 or tval(e).shape[1] != K:
        return None
    nodes.update({n, e, u} | ({c} if c is not None else set()))
    return u.args[0]


def match_batched(bmm1: fx.Node) -> MoEMatch:
    nodes: set[fx.Node] = {bmm1}
    g = _expert_gather(bmm1.args[0])
    if g is None:
        raise Reject("bmm does not read gathered expert weights")
    w1, ids_flat = g
    nodes.add(bmm1.args[0])
    clamp, bounds = None, [None, None]
    if is_op(ids_flat, aten.clamp.default) and len(ids_flat.args) == 3 and not ids_flat.kwargs:
        clamp, bounds, ids_flat = ids_flat, list(ids_flat.args[1:]), ids_flat.args[0]
        nodes.add(clamp)
    elif is_op(ids_flat, aten.clamp_max.default) and is_op(ids_flat.args[0], aten.clamp_min.default):
        lo = ids_flat.args[0]
        clamp, bounds, ids_flat = ids_flat, [lo.args[1], ids_flat.args[1]], lo.args[0]
        nodes.update({clamp, lo})
    if not is_op(ids_flat, aten.reshape.default) or len(tval(ids_flat).shape) != 1:
        raise Reject("expert weights are not gathered by the flattened top-k ids")
    ids = ids_flat.args[0]
    iv = tval(ids)
    if iv.dim() != 2 or iv.dtype not in (torch.int32, torch.int64):
        raise Reject("expert ids are not [tokens, top_k] integers")
    K = iv.shape[1]
    if not isinstance(K, int):
        raise Reject("top_k is symbolic")
    nodes.add(ids_flat)
    xin = bmm1.args[1]
    if not is_op(xin, aten.unsqueeze.default) or _dim(xin.args[1], 3) != 2:
        raise Reject("bmm right operand is not the token column (x.unsqueeze(-1))")
    x = _repeat_source(xin.args[0], K, nodes)
    if x is None:
        raise Reject("bmm tokens are not the hidden states repeated top_k times")
    nodes.add(xin)
    E, N2, H = _weight(w1, None, "gate_up")[1]
    xv = tval(x)
    if xv.dim() != 2 or xv.shape[1] != H or N2 % 2:
        raise Reject(f"gate_up weight {(E, N2, H)} is not [experts, 2*inter, {H}]")
    I = N2 // 2
    sq = _single_user(bmm1, "gate_up bmm")
    if not is_op(sq, aten.squeeze.dim) or _dim(sq.args[1], 3) != 2:
        raise Reject("gate_up bmm output is not squeezed")
    nodes.add(sq)
    act = xv.dtype
    h = _parse_act(sq, I, act, nodes)
    hu = _single_user(h, "SiLU-mul output")
    if not is_op(hu, aten.unsqueeze.default) or _dim(hu.args[1], 3) != 2:
        raise Reject("SiLU-mul output is not fed to a bmm as a column")
    bmm2 = _single_user(hu, "SiLU-mul column")
    if not is_op(bmm2, aten.bmm.default) or bmm2.args[1] is not hu:
        raise Reject("SiLU-mul output does not feed the down bmm")
    g2 = _expert_gather(bmm2.args[0])
    if g2 is None or g2[1] is not (clamp if clamp is not None else ids_flat):
        raise Reject("down bmm does not read down weights gathered by the same ids")
    w2 = g2[0]
    if clamp is not None and (literal(bounds[0]) != 0.0 or literal(bounds[1]) != float(E - 1)):
        raise Reject(f"expert ids are clamped to [{bounds[0]}, {bounds[1]}], not [0, {E - 1}]")
    s2 = _weight(w2, E, "down")[1]
    if s2 != (E, H, I):
        raise Reject(f"down weight {s2} is not [experts, {H}, {I}]")
    sq2 = _single_user(bmm2, "down bmm")
    if not is_op(sq2, aten.squeeze.dim) or _dim(sq2.args[1], 3) != 2:
        raise Reject("down bmm output is not squeezed")
    nodes.update({hu, bmm2, bmm2.args[0], sq2})
    M = xv.shape[0]
    tw, mul = _parse_combine(sq2, lambda n: n, M, K, H, nodes)
    out, sum_dt = _parse_sum(mul, M, K, H, nodes)
    return MoEMatch("batched_mm", x, ids, tw, w1, True, w2, True, out, tval(mul).dtype, sum_dt, E, K, H, I, nodes,
                    clamp_ids=clamp is not None)


# ----------------------------------------------------------------------------- dense loop form


def _selected_expert_weight(n: Any) -> tuple[fx.Node, int] | None:
    """permute(select(W [E, ., .], 0, e), [1, 0]) (W[e].T) -> (W, e)."""
    if is_op(n, aten.permute.default) and list(n.args[1]) == [1, 0]:
        s = n.args[0]
        if is_op(s, aten.select.int) and s.args[1] == 0 and isinstance(s.args[2], int) and isinstance(s.args[0], fx.Node):
            return s.args[0], s.args[2]
    return None


def _expert_term(mm2: fx.Node) -> dict | None:
    """One unrolled expert: mm(silu_mul(mm(x, W1[e].T)), W2[e].T). None if mm2 is not one."""
    sel2 = _selected_expert_weight(mm2.args[1])
    if sel2 is None or not is_op(mm2.args[0], aten.mul.Tensor):
        return None
    h = mm2.args[0]
    # find the gate_up mm behind the SiLU-mul: getitem(split(mm1), 1) is one of h's operands
    for up in h.args:
        if isinstance(up, fx.Node) and up.target is operator.getitem and is_op(up.args[0], aten.split.Tensor, aten.split_with_sizes.default):
            mm1 = up.args[0].args[0]
            if is_op(mm1, aten.mm.default):
                sel1 = _selected_expert_weight(mm1.args[1])
                if sel1 is not None and sel1[1] == sel2[1]:
                    return dict(e=sel2[1], x=mm1.args[0], w1=sel1[0], w2=sel2[0], mm1=mm1, h=h, mm2=mm2)
    return None


def _mask_weight(n: Any, e: int, nodes: set[fx.Node]) -> tuple[fx.Node, fx.Node] | None:
    """sum(tw * (ids == e), -1) (or where(ids == e, tw, 0)) -> (tw, ids)."""
    if not is_op(n, aten.sum.dim_IntList):
        return None
    dims = n.args[1] if len(n.args) > 1 else None
    if not isinstance(dims, (list, tuple)) or len(dims) != 1 or (len(n.args) > 2 and n.args[2]) or n.kwargs.get("dtype"):
        return None
    p = n.args[0]
    pv = val(p)
    if not isinstance(pv, torch.Tensor) or pv.dim() != 2 or dims[0] % 2 != 1:
        return None
    eq = tw = None
    if is_op(p, aten.mul.Tensor):
        for a, b in ((p.args[0], p.args[1]), (p.args[1], p.args[0])):
            sub: set[fx.Node] = set()
            c = _strip_convert(a, sub)
            if is_op(c, aten.eq.Scalar) and c.args[1] == e:
                eq, tw = c, b
                nodes.update(sub)
                break
    elif is_op(p, aten.where.self) and is_op(p.args[0], aten.eq.Scalar) and p.args[0].args[1] == e:
        zero = p.args[2]
        zv = val(zero)
        if isinstance(zero, fx.Node) and isinstance(zv, torch.Tensor) and zv.dim() == 0 and is_op(zero, aten.scalar_tensor.default, aten.full.default):
            if literal(zero.args[0] if is_op(zero, aten.scalar_tensor.default) else zero.args[1]) == 0.0:
                eq, tw = p.args[0], p.args[1]
                nodes.add(zero)
    if eq is None or not isinstance(tw, fx.Node):
        return None
    nodes.update({n, p, eq})
    return tw, eq.args[0]


def match_dense(any_mm2: fx.Node) -> MoEMatch:
    """A `for e in range(E)` loop over all experts, unrolled: sum_e y_e * sum_j tw[:, j]*(ids[:, j] == e)."""
    first = _expert_term(any_mm2)
    assert first is not None
    x, w1, w2 = first["x"], first["w1"], first["w2"]
    graph = any_mm2.graph
    terms: dict[int, dict] = {}
    for n in graph.nodes:
        if is_op(n, aten.mm.default):
            t = _expert_term(n)
            if t is not None and t["x"] is x and t["w1"] is w1 and t["w2"] is w2:
                if t["e"] in terms:
                    raise Reject(f"expert {t['e']} is applied twice")
                terms[t["e"]] = t
    E = tval(w1).shape[0]
    if sorted(terms) != list(range(E)):
        raise Reject(f"the loop covers experts {sorted(terms)}, not all {E}")
    nodes: set[fx.Node] = set()
    contribs: dict[fx.Node, int] = {}
    tw = ids = None
    xv = tval(x)
    H = xv.shape[-1]
    s1 = tuple(tval(w1).shape)
    if len(s1) != 3 or s1[2] != H or s1[1] % 2:
        raise Reject(f"gate_up weight {s1} is not [experts, 2*inter, {H}]")
    I = s1[1] // 2
    for e, t in sorted(terms.items()):
        sub: set[fx.Node] = {t["mm1"], t["mm2"], t["mm1"].args[1], t["mm1"].args[1].args[0],
                             t["mm2"].args[1], t["mm2"].args[1].args[0]}
        if _parse_act(t["mm1"], I, xv.dtype, sub) is not t["h"]:
            raise Reject("SiLU-mul output is not what the down projection reads")
        y = _single_user(t["mm2"], "expert output")
        if is_convert(y) and convert_dtype(y) == torch.float32:
            sub.add(y)
            yy = y
            y = _single_user(y, "expert output")
        else:
            yy = t["mm2"]
        if not is_op(y, aten.mul.Tensor):
            raise Reject("expert output is not scaled by its routing weight")
        wop = y.args[1] if y.args[0] is yy else y.args[0]
        if not is_op(wop, aten.unsqueeze.default) or _dim(wop.args[1], 2) != 1:
            raise Reject("routing weight is not broadcast over the hidden dim")
        mw = _mask_weight(wop.args[0], e, sub)
        if mw is None:
            raise Reject("routing weight is not sum(weights * (ids == e)) over the top-k")
        if tw is None:
            tw, ids = mw
        elif mw != (tw, ids):
            raise Reject("experts read different routing tensors")
        sub.update({wop, y})
        nodes |= sub
        contribs[y] = e
    # the contributions are combined by a chain/tree of adds (optionally starting from zeros):
    # grow the tree to a fixpoint, taking an add only if all its operands are already in it
    def _zero(op: Any) -> bool:
        return isinstance(op, fx.Node) and is_op(op, aten.full.default) and literal(op.args[1]) == 0.0

    tree: set[fx.Node] = set()
    changed = True
    while changed:
        changed = False
        for n in list(contribs) + list(tree):
            for u in n.users:
                if u in tree or not is_op(u, aten.add.Tensor) or u.kwargs or len(u.args) != 2:
                    continue
                if all(op in contribs or op in tree or _zero(op) for op in u.args):
                    tree.add(u)
                    changed = True
    members = set(contribs) | tree
    tops = [n for n in members if not any(u in tree for u in n.users)]
    if len(tops) != 1:
        raise Reject("expert outputs are not combined by one sum")
    root = tops[0]
    for n in members - {root}:
        if len(n.users) != 1:
            raise Reject(f"partial sum {n.name} is also used outside the sum over experts")
    nodes.update(op for a in tree for op in a.args if _zero(op))
    nodes |= tree
    out = root
    sum_dt = tval(root).dtype
    if len(root.users) == 1 and is_convert(next(iter(root.users))):
        out = next(iter(root.users))
        nodes.add(out)
    iv = tval(ids)
    if iv.dim() != 2 or iv.dtype not in (torch.int32, torch.int64) or tuple(tval(tw).shape) != tuple(iv.shape):
        raise Reject("routing ids/weights are not [tokens, top_k]")
    prod = tval(next(iter(contribs))).dtype
    return MoEMatch("dense_loop", x, ids, tw, w1, True, w2, True, out, prod, sum_dt, E, iv.shape[1], H, I, nodes)


# ----------------------------------------------------------------------------- checks + rewrite


def check(m: MoEMatch, gate: bool = True) -> None:
    from ..kernels.moe_experts import gate_classes

    xv, iv, tv = tval(m.x), tval(m.ids), tval(m.tw)
    w1v, w2v = tval(m.w1), tval(m.w2)
    if xv.dtype not in DTYPES:
        raise Reject(f"hidden states dtype {xv.dtype} not supported (bf16/fp16)")
    if w1v.dtype != xv.dtype or w2v.dtype != xv.dtype:
        raise Reject(f"expert weights ({w1v.dtype}/{w2v.dtype}) and hidden states ({xv.dtype}) differ in dtype")
    if tv.shape[0] != xv.shape[0] or iv.shape[0] != xv.shape[0] or tuple(tv.shape) != tuple(iv.shape):
        raise Reject("routing weights/ids do not match the token count")
    if m.prod_dtype not in (xv.dtype, torch.float32) or m.sum_dtype not in (xv.dtype, torch.float32):
        raise Reject("combine computed in an unexpected dtype")
    if not isinstance(m.H, int) or not isinstance(m.I, int):
        raise Reject("hidden/intermediate sizes are symbolic")
    if not same_device(xv, iv, tv, w1v, w2v):
        raise Reject("inputs are on different devices")
    dev = xv.device.type
    if dev not in ("cpu", "cuda"):
        raise Reject(f"device {dev} not supported")
    # every intermediate must be private to the region (else the expert compute would run twice)
    for n in m.nodes - {m.out}:
        if not isinstance(val(n), torch.Tensor) and n.target is not operator.getitem:
            continue
        outside = [u for u in n.users if u not in m.nodes and not is_op(u, aten.sym_size.int)]
        if outside:
            raise Reject(f"intermediate {n.name} ({getattr(n.target, '__name__', n.target)}) is also used outside the MoE experts")
    for inp in (m.x, m.tw, m.ids, m.w1, m.w2):
        if depends_on_any(inp, m.nodes):
            raise Reject(f"input {inp.name} depends on the MoE region itself")
    if dev == "cuda":
        for cls in gate_classes(xv.shape[0], m.K, m.E):
            why = gating.rejects(FAMILY, scheme=f"{m.form}/{cls}", hidden=m.H, dtype=xv.dtype, enabled=gate)
            if why:
                raise Reject(why)


def rewrite(graph: fx.Graph, m: MoEMatch, routed: "Fold | None" = None) -> list[fx.Node]:
    """Insert the fused op; with `routed`, the one that also routes (fxfuse::moe_routed_experts, from
    the router logits) in place of the fused router too."""
    from ..kernels import moe_experts as _k  # noqa: F401  (registers torch.ops.fxfuse.moe_experts)

    out_dtype = tval(m.out).dtype
    prod, sm = m.prod_dtype, m.sum_dtype
    t1, t2 = m.w1_transposed, m.w2_transposed
    out_shape_is_2d = tval(m.out).dim() == 2
    clamp_to = m.E - 1 if m.clamp_ids else None
    E = m.E

    def replacement(x: torch.Tensor, tw: torch.Tensor, ids: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        if clamp_to is not None:
            ids = ids.clamp_min(0).clamp_max(clamp_to)  # as post-grad graphs write clamp
        o = torch.ops.fxfuse.moe_experts(
            x, tw, ids, w1.permute(0, 2, 1) if t1 else w1, w2.permute(0, 2, 1) if t2 else w2, prod, sm, out_dtype
        )
        return o if out_shape_is_2d else o.reshape(x.shape)

    def routed_replacement(x: torch.Tensor, logits: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                           *bias: torch.Tensor) -> torch.Tensor:
        # the router's ids are in [0, E): a clamp of them (clamp_to) changes nothing
        o = torch.ops.fxfuse.moe_routed_experts(
            x, logits.reshape(-1, E), bias[0] if bias else None, **params,
            w1=w1.permute(0, 2, 1) if t1 else w1, w2=w2.permute(0, 2, 1) if t2 else w2, prod_dtype=prod,
            sum_dtype=sm, out_dtype=out_dtype,
        )
        return o if out_shape_is_2d else o.reshape(x.shape)

    on_cuda = tval(m.x).device.type == "cuda"
    if routed is None:
        inputs = [m.x, m.tw, m.ids, m.w1, m.w2]
        fn = replacement
    else:
        r = routed.rec
        params = {k: v for k, v in r.params.items() if k not in ("need_scores", "out_dtype")}
        params["weights_dtype"] = r.params["out_dtype"]
        inputs = [m.x, r.logits, m.w1, m.w2] + ([r.bias] if r.bias is not None else [])
        fn = routed_replacement
    (new,) = insert_traced(graph, fn, inputs, before=m.out, functionalize=on_cuda)
    m.out.replace_all_uses_with(new)
    stable_toposort(graph)
    if routed is None:
        return sorted(m.nodes, key=lambda n: n.name)
    # the experts region, the views of the router outputs and the router launch are dead now; erase
    # them here (DCE keeps a kernel launch it deems impure, and the launch is the point)
    dead = m.nodes | routed.views | routed.rec.nodes
    for n in reversed(list(graph.nodes)):
        if n in dead and not n.users:
            graph.erase_node(n)
    return sorted(m.nodes | routed.views, key=lambda n: n.name)


# ----------------------------------------------------------------------------- routing fold

FOLD_OPTION = "moe_fold_routing"
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.alias.default)


@dataclass
class Fold:
    """A fused router whose outputs only this experts region reads: its routing folds into the
    experts' decode kernel A (one launch fewer)."""

    rec: Any  # patterns.moe_routing.RoutedOutputs
    views: set[fx.Node]  # reshape views between the router outputs and the region's weights/ids


def _view_source(graph: fx.Graph, n: fx.Node, views: set[fx.Node]) -> fx.Node:
    """Walk back through reshape-type views (same row-major order) to a fused router's output, or
    as far as they go."""
    from .moe_routing import routed_outputs

    while routed_outputs(graph, n) is None and is_op(n, *_VIEWS) and isinstance(n.args[0], fx.Node):
        views.add(n)
        n = n.args[0]
    return n


def fold_routing(graph: fx.Graph, m: MoEMatch, enabled: bool = True) -> tuple[Fold | None, str]:
    """(the fold, "") if the region's weights and ids come straight from one fused router whose
    outputs nothing else reads, at the decode path of a static token count on CUDA; else (None, why)."""
    from ..kernels.moe_experts import PATH_DECODE, choose_path
    from .moe_routing import routed_outputs

    views: set[fx.Node] = set()
    tw_src, ids_src = _view_source(graph, m.tw, views), _view_source(graph, m.ids, views)
    rec = routed_outputs(graph, tw_src)
    if rec is None:
        return None, f"routing weights ({tw_src.name}) do not come from a fused router"
    if not enabled:
        return None, f"routing fold disabled ({FOLD_OPTION}=False)"
    if tval(m.x).device.type != "cuda":
        return None, "not CUDA"
    if rec.weights is not tw_src or rec.ids is not ids_src:
        return None, "routing weights and ids do not come from the same fused router"
    M = tval(m.x).shape[0]
    if not isinstance(M, int) or choose_path(M, m.K, m.E) != PATH_DECODE:
        return None, "not the decode path (static, small token count)"
    # traced on CUDA, the scores "output" is the router launch's own buffer (used by that launch)
    if rec.params["need_scores"] or any(u not in rec.nodes for u in rec.scores.users):
        return None, "the router's full scores are used"
    lv = tval(rec.logits)
    if lv.shape[-1] != m.E or rec.params["k"] != m.K or tval(rec.weights).numel() != M * m.K:
        return None, "router and experts disagree on experts, top-k or tokens"
    if not same_device(lv, tval(m.x)):
        return None, "router logits on another device"
    for n in (rec.weights, rec.ids, *views):
        outside = [u for u in n.users if u not in m.nodes and u not in views]
        if outside:
            return None, f"routing {'ids' if n is rec.ids else 'weights'} also used outside the experts ({outside[0].name})"
    return Fold(rec, views), ""


# ----------------------------------------------------------------------------- eager-loop near miss


def _eager_loop_anchor(graph: fx.Graph) -> fx.Node | None:
    """A graph whose output carries a one-hot mask of [tokens, top_k] ids (transformers' eager loop:
    `one_hot(ids, E + 1)` then `.nonzero()` outside the graph)."""
    out = next((n for n in graph.nodes if n.op == "output"), None)
    if out is None:
        return None
    for n in graph.nodes:
        if not is_op(n, aten.eq.Tensor):
            continue
        a, b = (n.args + (None, None))[:2]
        one_hot = False
        for s, r in ((a, b), (b, a)):
            if is_op(s, aten.unsqueeze.default) and is_op(r, torch.ops.prims.iota.default, aten.arange.default, aten.arange.start):
                sv = val(s.args[0])
                one_hot = one_hot or (isinstance(sv, torch.Tensor) and sv.dim() == 2 and not sv.is_floating_point())
        has_topk = one_hot
        if has_topk and _reaches_output(n, out):
            return n
    return None


def _reaches_output(n: fx.Node, out: fx.Node, limit: int = 50) -> bool:
    frontier, seen = [n], {n}
    for _ in range(limit):
        nxt = []
        for f in frontier:
            for u in f.users:
                if u is out:
                    return True
                if u not in seen:
                    seen.add(u)
                    nxt.append(u)
        frontier = nxt
        if not frontier:
            return False
    return False


def _report_unfusable_router(graph: fx.Graph, m: MoEMatch, ctx: Any) -> None:
    """A router computed in this graph that the routing pass could not even anchor on (it anchors on
    topk; PhiMoE's sparsemixer picks each slot by a masked max) would otherwise miss silently: say
    so, under the routing family, at the ids' producer. Routing from graph inputs, from a fused
    router, or from a topk (whose own near miss the routing pass reported) says nothing."""
    from .moe_routing import routed_outputs

    src = _view_source(graph, m.ids, set())
    if src.op != "call_function" or routed_outputs(graph, _view_source(graph, m.tw, set())) is not None:
        return
    ops: list[str] = []
    frontier, seen = [src], {src}
    for _ in range(40):  # the router's ops back to the logits' GEMM (or the graph inputs)
        nxt = []
        for n in frontier:
            if is_op(n, aten.topk.default):
                return
            if n.op == "call_function" and not is_op(n, aten.mm.default, aten.addmm.default, aten.linear.default):
                name = getattr(n.target, "__name__", str(n.target)).split(".")[0]
                if name != "getitem" and name not in ops:
                    ops.append(name)
                for a in n.all_input_nodes:
                    if a not in seen:
                        seen.add(a)
                        nxt.append(a)
        frontier = nxt
        if not frontier:
            break
    ctx.near_miss(
        "moe_routing", src,
        f"the experts' ids ({src.name}) are not a top-k of router scores (computed by {', '.join(ops[:6])}; "
        "e.g. PhiMoE's sparsemixer picks each slot by a masked max): only top-k routers fuse",
    )


class MoEExperts:
    name = FAMILY

    def __call__(self, graph: fx.Graph, ctx: Any) -> None:
        found = False
        for node in list(graph.nodes):
            if node.graph is not graph or node.op != "call_function" or getattr(node, "_erased", False):
                continue  # (a routing fold erases the region it replaced)
            if _is_grouped_mm(node):
                # only the gate_up grouped_mm anchors (the down one reads the SiLU-mul output)
                a0 = node.args[0]
                if is_op(a0, aten.mul.Tensor):
                    continue
                matcher = match_grouped
            elif is_op(node, aten.mm.default) and _expert_term(node) is not None and _expert_term(node)["e"] == 0:
                matcher = match_dense
            elif is_op(node, aten.bmm.default) and _expert_gather(node.args[0]) is not None:
                if is_op(node.args[1], aten.unsqueeze.default) and is_op(node.args[1].args[0], aten.mul.Tensor):
                    continue
                matcher = match_batched
            else:
                continue
            found = True
            with ctx.candidate(FAMILY, node):
                m = matcher(node)
                _report_unfusable_router(graph, m, ctx)
                check(m, gate=ctx.options.get("gate", True))
                opaque = {n.name for n in m.nodes if _is_grouped_mm(n) and n.target is not aten._grouped_mm.default}
                detail = f"{m.form} E={m.E} top{m.K} H={m.H} I={m.I} {tval(m.x).dtype}"
                fold, replaced = self._fold(graph, m, node, ctx)
                if fold is not None:
                    detail += " +routing folded"
                    if fold.rec.fusion is not None:  # the router's report entry: where its kernel went
                        fold.rec.fusion.kernel = "triton:fxfuse_moe_routed_experts"
                        fold.rec.fusion.detail += " (folded into moe_experts' decode kernel A)"
                else:
                    replaced = rewrite(graph, m)
                if opaque:  # unwrap reported transformers' opaque grouped-mm op; it is fused now
                    ctx.graph_report.near_misses[:] = [
                        nm for nm in ctx.graph_report.near_misses if not (nm.family == "unwrap" and nm.anchor in opaque)
                    ]
                kernel = "triton:fxfuse_moe_experts" if tval(m.x).device.type == "cuda" else "fxfuse::moe_experts"
                if fold is not None:
                    kernel = "triton:fxfuse_moe_routed_experts"
                ctx.applied(FAMILY, replaced, kernel, detail)
        if not found:
            anchor = _eager_loop_anchor(graph)
            if anchor is not None:
                ctx.near_miss(
                    FAMILY, anchor,
                    "graph ends in a one-hot expert mask: transformers' eager experts loop graph-breaks on nonzero, "
                    f"so no pass sees the whole layer; {EAGER_FIX}",
                )

    @staticmethod
    def _fold(graph: fx.Graph, m: MoEMatch, node: fx.Node, ctx: Any) -> tuple[Fold | None, list[fx.Node]]:
        """Fold the fused router into the fused experts when `fold_routing` allows: (fold, replaced
        nodes), or (None, []) and the caller inserts the plain experts op. The fold is an extra: a
        failure keeps both ops (logged as an internal error; raised when strict)."""
        from .moe_routing import forget_routed

        fold, why = fold_routing(graph, m, enabled=ctx.options.get(FOLD_OPTION, False))
        if fold is None:
            log.debug("fxfuse moe_experts at %s: routing not folded: %s", node.name, why)
            return None, []
        try:
            replaced = rewrite(graph, m, fold)
        except Exception as e:  # noqa: BLE001 - the unfolded rewrite still applies
            ctx.extra_failed(e, f"{FAMILY} routing fold at {node.name}", "kept the router's own launch")
            return None, []
        forget_routed(graph, fold.rec)
        return fold, replaced


PASS = MoEExperts()
