"""MoE routing (router logits -> top-k weights and expert ids) -> one fused kernel.

Routers are written in a few shapes (Qwen/Mixtral: softmax -> topk -> renormalize -> cast;
Mixtral-v0/Grok: topk on logits -> softmax over the k; DeepSeek-V3: sigmoid + correction bias ->
grouped top-k through scatter/where masks -> gather unbiased weights -> renormalize -> scale).
Starting from each `aten.topk` (last first, so a grouped router's inner topks are consumed by
the outer one), walk back to the logits and forward along the weights, *capturing* what was
written (scoring, rounding dtypes, bias, n_group/topk_group from the view shapes, fill value,
renorm eps, scale, output dtype) instead of enumerating variants. The router's gate GEMM stays
a GEMM, except at decode (static M <= 16 tokens and M*E*H <= 8 Mi, `mm(x, W.t())`, where the benchmark gate
"router_gemv" allows): there cuBLAS reads the ~0.5 MB of router weights on a couple of SMs (4.9 us
on an H200 for Qwen3-30B-A3B), and ``fxfuse::router_logits`` spreads the read over one program per expert row;
its logits feed the fused router and any other user. Anything that does not fit a check is a near miss; a
weight-side op that is not recognized simply stays after the fused kernel (correct by
construction), except a renormalize by something other than the sum, which is a near miss.
"""

from __future__ import annotations

import math
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
    prims,
    depends_on_any,
    insert_traced,
    is_convert,
    is_op,
    literal,
    norm_dims,
    same_device,
    stable_toposort,
    tval,
    val,
)
from ..kernels.moe_routing import (
    GROUP_MAX,
    GROUP_TOP2_SUM,
    MAX_EXPERTS,
    MAX_K,
    NEG_INF_FILL,
    SCORING_NAMES,
    SCORING_SIGMOID,
    SCORING_SOFTMAX,
    SCORING_TOPK_SOFTMAX,
)
from ..kernels.router_gemv import MAX_ROWS, fits

FAMILY = "moe_routing"
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class RouterMatch:
    topk: fx.Node
    logits: fx.Node
    bias: fx.Node | None
    k: int
    scoring: int
    score_dtype: torch.dtype
    biased_dtype: torch.dtype
    scores: fx.Node  # full scores (softmax/sigmoid output, or the logits for topk_softmax)
    n_group: int = 1
    topk_group: int = 1
    group_score: int = GROUP_TOP2_SUM
    fill: float = float("-inf")
    renormalize: bool = False
    renorm_eps: float = 0.0
    scale: float = 1.0
    value_dtype: torch.dtype = torch.float32
    out_dtype: torch.dtype = torch.float32
    ids: fx.Node | None = None
    sink: fx.Node | None = None  # the node holding the final weights
    need_scores: bool = False
    gather_weights: bool = True
    nodes: set[fx.Node] = field(default_factory=set)
    routed: "RoutedOutputs | None" = None  # what the rewrite inserted

    @property
    def scheme(self) -> str:
        """Gating scheme name of this router."""
        if self.scoring == SCORING_SOFTMAX:
            return "softmax_topk"
        if self.scoring == SCORING_TOPK_SOFTMAX:
            return "topk_softmax"
        return "sigmoid_grouped" if self.n_group > 1 else "sigmoid_topk"


# ----------------------------------------------------------------------------- small helpers


def _arg(node: fx.Node, i: int, name: str, default: Any) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _getitems(node: fx.Node) -> dict[int, fx.Node]:
    out: dict[int, fx.Node] = {}
    for u in node.users:
        if u.target is operator.getitem and isinstance(u.args[1], int):
            if u.args[1] in out:
                raise Reject(f"{node.name} has two getitem({u.args[1]}) nodes")
            out[u.args[1]] = u
        else:
            raise Reject(f"{node.name} is used by {u.name} directly")
    return out


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is_last_dim(node: fx.Node, dim: Any, keepdim_required: bool | None) -> bool:
    nd = tval(node.args[0]).dim()
    if norm_dims(dim, nd) != [nd - 1]:
        return False
    if keepdim_required is None:
        return True
    keepdim = _arg(node, 2, "keepdim", False)
    return bool(keepdim) is keepdim_required


def _red_dim_text(node: fx.Node) -> str:
    dims = _arg(node, 1, "dim", None)
    return f"dim {dims}"


def _full_value(node: Any) -> float | None:
    """The constant of a literal or a `full(shape, c)` / `scalar_tensor(c)` node."""
    if literal(node) is not None:
        return literal(node)
    if is_op(node, aten.full.default) and literal(node.args[1]) is not None:
        return literal(node.args[1])
    if is_op(node, aten.scalar_tensor.default) and literal(node.args[0]) is not None:
        return literal(node.args[0])
    return None


def _strip_upcast(node: Any) -> tuple[Any, fx.Node | None]:
    """(source, convert) if node is a convert to fp32 from a float dtype (an exact upcast)."""
    if is_convert(node) and convert_dtype(node) == torch.float32 and tval(node.args[0]).dtype in FLOAT_DTYPES:
        return node.args[0], node
    return node, None


def match_softmax(out: fx.Node) -> tuple[fx.Node, set[fx.Node], torch.dtype]:
    """Parse Inductor's decomposed softmax ending at `out`: [convert] <- div(exp(sub(x, amax)), sum).

    Returns (input x before an optional fp32 upcast, nodes, output dtype). Rejects a softmax that
    is not over the last dim."""
    nodes: set[fx.Node] = set()
    out_dtype = tval(out).dtype
    d = out
    if is_convert(d):
        nodes.add(d)
        d = d.args[0]
    if not is_op(d, aten.div.Tensor) or d.kwargs:
        raise Reject("not a softmax")
    ex, den = d.args
    if not (is_op(ex, aten.exp.default) and is_op(den, aten.sum.dim_IntList) and den.args[0] is ex):
        raise Reject("not a softmax")
    sub = ex.args[0]
    if not is_op(sub, aten.sub.Tensor) or not is_op(sub.args[1], aten.amax.default):
        raise Reject("not a softmax")
    amax = sub.args[1]
    x = sub.args[0]
    if amax.args[0] is not x:
        raise Reject("softmax subtracts the max of a different tensor")
    for r in (amax, den):
        if not _is_last_dim(r, _arg(r, 1, "dim", None), True):
            raise Reject(f"softmax over {_red_dim_text(r)}, not the expert (last) dim")
    if tval(d).dtype != torch.float32:
        raise Reject(f"softmax computed in {tval(d).dtype}, not float32")
    nodes |= {d, ex, den, sub, amax}
    src, up = _strip_upcast(x)
    if up is not None:
        nodes.add(up)
    return src, nodes, out_dtype


# ----------------------------------------------------------------------------- selection side


def _group_indices(c: fx.Node, G: int, nodes: set[fx.Node]) -> fx.Node:
    """The [tokens, G] 0/1 group mask -> the kept-group indices it was built from.

    Forms: zeros.scatter(1, idx, 1) (scatter_ in place, functionalized), and Inductor's one-hot
    rewrite of a one-index scatter: where(expand(idx, [M, G]) == iota(G), 1, 0)."""
    if is_op(c, aten.scatter.value, aten.scatter.src):
        base, sdim, gidx = c.args[0], c.args[1], c.args[2]
        if _full_value(base) != 0.0 or sdim % 2 != 1:
            raise Reject("group mask does not start from zeros scattered along the group dim")
        src = c.args[3]
        if _full_value(src) in (None, 0.0):
            raise Reject("group mask scatters a zero or non-constant value")
        nodes |= {c, base} | ({src} if isinstance(src, fx.Node) else set())
        return gidx
    if is_op(c, aten.where.self) and _full_value(c.args[2]) == 0.0 and _full_value(c.args[1]) not in (None, 0.0):
        eq = c.args[0]
        if is_op(eq, aten.eq.Tensor):
            a, b = eq.args
            if is_op(b, aten.expand.default):
                a, b = b, a
            io = b.args[0] if is_op(b, aten.reshape.default) else b
            if (
                is_op(a, aten.expand.default)
                and is_op(io, prims.iota.default)
                and io.args[0] == G
                and io.kwargs.get("start", 0) == 0
                and io.kwargs.get("step", 1) == 1
                and tuple(tval(b).shape) == (1, G)
                and tuple(tval(a.args[0]).shape[1:]) == (1,)
            ):
                nodes |= {c, eq, a, b, io} | {x for x in c.args[1:] if isinstance(x, fx.Node)}
                return a.args[0]
    raise Reject("group mask is not built by scatter")


def _match_group_mask(cond: fx.Node, M: Any, E: int, nodes: set[fx.Node]) -> tuple[bool, int, fx.Node]:
    """cond -> (True if cond means 'in a kept group', n_group, the kept-group indices node).

    Accepts `~mask.bool()` / `mask.bool()` where mask = zeros[M, G].scatter(1, group_idx, 1)
    .unsqueeze(-1).expand(M, G, E/G)[.clone()].reshape(M, E), with converts anywhere."""
    inside = True
    c: Any = cond
    seen_reshape = seen_expand = False
    G = None
    while True:
        if is_op(c, aten.bitwise_not.default, aten.logical_not.default):
            inside = not inside
        elif is_convert(c) or is_op(c, aten.clone.default):
            pass
        elif is_op(c, aten.reshape.default, aten.view.default) and not seen_reshape and not seen_expand:
            cv = tval(c)
            if tuple(cv.shape[1:]) != (E,) or cv.dim() != 2:
                raise Reject(f"group mask reshaped to {tuple(cv.shape)}, not [tokens, {E}]")
            seen_reshape = True
        elif is_op(c, aten.expand.default) and seen_reshape and not seen_expand:
            ev = tval(c)
            if ev.dim() != 3 or not isinstance(ev.shape[1], int) or ev.shape[1] * ev.shape[2] != E:
                raise Reject(f"group mask expanded to {tuple(ev.shape)}, not [tokens, groups, experts/group]")
            G = ev.shape[1]
            seen_expand = True
        elif is_op(c, aten.unsqueeze.default) and seen_expand:
            src = tval(c.args[0])
            if src.dim() != 2 or c.args[1] % 3 != 2:
                raise Reject("group mask is not unsqueezed at the last dim")
            nodes.add(c)
            c = c.args[0]
            while is_convert(c):
                nodes.add(c)
                c = c.args[0]
            if not isinstance(G, int) or tuple(tval(c).shape[1:]) != (G,):
                raise Reject("group mask shape does not match its expansion")
            return inside, G, _group_indices(c, G, nodes)
        else:
            raise Reject(f"where() condition is not a group mask ({getattr(c, 'name', c)})")
        nodes.add(c)
        c = c.args[0]


def _match_grouped(where: fx.Node, nodes: set[fx.Node]) -> tuple[fx.Node, int, int, int, float]:
    """where(group mask, biased, fill) -> (biased, n_group, topk_group, group_score, fill)."""
    cond, a, b = where.args
    wv = tval(where)
    M, E = wv.shape[0], wv.shape[-1]
    if wv.dim() != 2:
        raise Reject("grouped selection on a tensor that is not [tokens, experts]")
    gnodes: set[fx.Node] = {where}
    inside, G, gidx = _match_group_mask(cond, M, E, gnodes)
    sel, fill_node = (a, b) if inside else (b, a)
    fill = _full_value(fill_node)
    if fill is None:
        raise Reject("masked experts are not filled with a constant")
    if isinstance(fill_node, fx.Node):
        gnodes.add(fill_node)
    sdt = tval(sel).dtype if isinstance(sel, fx.Node) else None
    if sdt != wv.dtype:
        raise Reject(f"masking changes the scores' dtype ({sdt} -> {wv.dtype})")
    if torch.tensor(fill, dtype=torch.float32).to(sdt).item() != fill and fill == fill:
        raise Reject(f"fill value {fill} is not exact in {sdt}")
    if not (gidx.target is operator.getitem and gidx.args[1] == 1 and is_op(gidx.args[0], aten.topk.default)):
        raise Reject("group mask indices do not come from a topk over group scores")
    gtopk = gidx.args[0]
    topk_group = gtopk.args[1]
    if not isinstance(topk_group, int) or not _is_last_dim(gtopk, _arg(gtopk, 2, "dim", -1), None):
        raise Reject("group topk is not over the group (last) dim")
    if _arg(gtopk, 3, "largest", True) is not True:
        raise Reject("group topk takes the smallest groups")
    gnodes |= {gtopk, gidx}
    gnodes |= {u for u in gtopk.users}
    gscore = gtopk.args[0]
    if tuple(tval(gscore).shape[1:]) != (G,):
        raise Reject("group scores are not [tokens, n_group]")
    # group score: sum(topk(view(sel, M, G, E/G), 2)[0], -1) or amax(view, -1) / max(view, -1)[0]
    if is_op(gscore, aten.sum.dim_IntList) and _is_last_dim(gscore, gscore.args[1], False):
        v2 = gscore.args[0]
        if not (v2.target is operator.getitem and v2.args[1] == 0 and is_op(v2.args[0], aten.topk.default)):
            raise Reject("group score sums something other than the group's top-2")
        t2 = v2.args[0]
        if t2.args[1] != 2 or not _is_last_dim(t2, _arg(t2, 2, "dim", -1), None) or _arg(t2, 3, "largest", True) is not True:
            raise Reject("group score is not the sum of the top-2 scores in the group")
        gnodes |= {gscore, v2, t2} | set(t2.users)
        view = t2.args[0]
        method = GROUP_TOP2_SUM
    elif is_op(gscore, aten.amax.default) and _is_last_dim(gscore, gscore.args[1], False):
        view = gscore.args[0]
        gnodes.add(gscore)
        method = GROUP_MAX
    elif (
        gscore.target is operator.getitem
        and gscore.args[1] == 0
        and is_op(gscore.args[0], aten.max.dim)
        and _is_last_dim(gscore.args[0], gscore.args[0].args[1], False)
    ):
        mx = gscore.args[0]  # .max(dim=-1).values (its indices must be unused)
        if len(mx.users) != 1:
            raise Reject("the group max's indices are used")
        view = mx.args[0]
        gnodes |= {gscore, mx}
        method = GROUP_MAX
    else:
        raise Reject("group score is neither the top-2 sum nor the max of the group")
    if not is_op(view, aten.reshape.default, aten.view.default) or view.args[0] is not sel:
        raise Reject("group scores are computed from a different tensor than the masked scores")
    vv = tval(view)
    if vv.dim() != 3 or vv.shape[1] != G or vv.shape[2] * G != E:
        raise Reject(f"group view {tuple(vv.shape)} is not [tokens, {G}, {E}/{G}]")
    gnodes.add(view)
    if not isinstance(topk_group, int) or not 1 <= topk_group <= G:
        raise Reject(f"topk_group {topk_group} not in [1, {G}]")
    nodes |= gnodes
    return sel, G, topk_group, method, fill


class _NotScores(Reject):
    """The topk input is not softmax/sigmoid scores (it may be logits: the topk_softmax form)."""


def _match_scores(s: Any, nodes: set[fx.Node]) -> tuple[fx.Node, int, torch.dtype]:
    """Scores -> (logits, scoring, score dtype). Softmax (decomposed) or sigmoid, optional casts."""
    if not isinstance(s, fx.Node):
        raise Reject("scores are not a tensor")
    sdt = tval(s).dtype
    try:
        src, snodes, _ = match_softmax(s)
        nodes |= snodes
        return src, SCORING_SOFTMAX, sdt
    except Reject as r:
        if str(r) != "not a softmax":
            raise
    c = s
    if is_convert(c) and is_op(c.args[0], aten.sigmoid.default):
        nodes.add(c)
        c = c.args[0]
    if is_op(c, aten.sigmoid.default):
        if tval(c).dtype != torch.float32 and tval(c).dtype not in FLOAT_DTYPES:
            raise Reject(f"sigmoid in {tval(c).dtype}")
        nodes.add(c)
        src, up = _strip_upcast(c.args[0])
        if up is not None:
            nodes.add(up)
        return src, SCORING_SIGMOID, sdt
    raise _NotScores("topk input is neither softmax nor sigmoid scores")


def _split_bias(x: fx.Node) -> tuple[fx.Node, fx.Node | None]:
    """x = scores + bias (bias a [E] vector) -> (scores, bias); else (x, None)."""
    if is_op(x, aten.add.Tensor) and len(x.args) == 2 and not x.kwargs:
        a, b = x.args
        for s, bias in ((a, b), (b, a)):
            bv = val(bias)
            if isinstance(bv, torch.Tensor) and bv.dim() == 1 and isinstance(s, fx.Node):
                sv = tval(s)
                if sv.dim() >= 1 and bv.shape[0] == sv.shape[-1] and _looks_scored(s):
                    return s, bias
    return x, None


def _looks_scored(s: fx.Node) -> bool:
    c = s.args[0] if is_convert(s) else s
    return is_op(c, aten.sigmoid.default, aten.div.Tensor)


# ----------------------------------------------------------------------------- weight side


def _extend_weights(m: RouterMatch, w0: fx.Node) -> None:
    """Walk from the raw top-k weights through [softmax over k] -> [/ sum(+eps)] -> [* c] -> [cast]."""
    cur = w0
    m.value_dtype = tval(w0).dtype
    if m.scoring == SCORING_TOPK_SOFTMAX:
        out = _softmax_over(cur)
        if out is None:
            raise Reject("topk on logits is not followed by a softmax over the k values")
        out_node, snodes = out
        m.nodes |= snodes
        cur = out_node
        m.value_dtype = tval(cur).dtype
    # renormalize: cur / (sum(cur, -1, keepdim) [+ eps])
    users = set(cur.users)
    divs = [u for u in users if is_op(u, aten.div.Tensor) and u.args[0] is cur]
    if len(divs) == 1 and isinstance(divs[0].args[1], fx.Node) and depends_on_any(divs[0].args[1], {cur}, limit=8):
        div = divs[0]
        den = div.args[1]
        eps = 0.0
        dnodes = {div}
        if is_op(den, aten.add.Tensor, aten.add.Scalar) and literal(den.args[1]) is not None:
            eps = literal(den.args[1])
            dnodes.add(den)
            den = den.args[0]
        if not (is_op(den, aten.sum.dim_IntList) and den.args[0] is cur and _is_last_dim(den, den.args[1], True)):
            raise Reject(f"top-k weights are renormalized by {getattr(den, 'name', den)}, not by their sum over the k")
        dnodes.add(den)
        if users != {div, den} or any(len(n.users) != 1 for n in dnodes - {div}):
            raise Reject("the renormalization's sum is also used elsewhere")
        if tval(div).dtype != m.value_dtype:
            raise Reject(f"renormalization changes dtype to {tval(div).dtype}")
        m.renormalize, m.renorm_eps = True, eps
        m.nodes |= dnodes
        cur = div
    # routed scaling factor
    u = _only_user(cur)
    if u is not None and is_op(u, aten.mul.Tensor, aten.mul.Scalar) and tval(u).dtype == m.value_dtype:
        a, b = u.args
        c = literal(b) if a is cur else literal(a) if b is cur else None
        if c is not None:
            m.scale = c
            m.nodes.add(u)
            cur = u
    m.out_dtype = m.value_dtype
    u = _only_user(cur)
    if u is not None and is_convert(u) and convert_dtype(u) in FLOAT_DTYPES:
        m.out_dtype = convert_dtype(u)
        m.nodes.add(u)
        cur = u
    m.sink = cur
    m.nodes.add(cur)


def _softmax_over(v: fx.Node) -> tuple[fx.Node, set[fx.Node]] | None:
    """If v's only consumer is a (decomposed) softmax over the last dim, return (its output, nodes)."""
    start = v
    u = _only_user(v)
    if u is not None and is_convert(u) and convert_dtype(u) == torch.float32:
        start = u
    # find the div that ends the softmax: start -> amax, sub -> exp -> sum, div
    for cand in list(start.users):
        if is_op(cand, aten.amax.default):
            sub = _only_user(cand)
            if sub is None or not is_op(sub, aten.sub.Tensor):
                return None
            ex = _only_user(sub)
            if ex is None or not is_op(ex, aten.exp.default):
                return None
            div = next((x for x in ex.users if is_op(x, aten.div.Tensor)), None)
            if div is None:
                return None
            out = div
            cu = _only_user(div)
            if cu is not None and is_convert(cu) and convert_dtype(cu) in FLOAT_DTYPES:
                out = cu
            src, nodes, _ = match_softmax(out)
            if src is not v:
                raise Reject("softmax after topk reads a different tensor")
            return out, nodes
    return None


# ----------------------------------------------------------------------------- whole router


def _is_group_helper(topk: fx.Node) -> bool:
    """A topk inside a grouped router (top-2 per group, or the top groups): matched by the outer one."""
    for g in topk.users:
        for u in g.users:
            if is_op(u, aten.scatter.value, aten.scatter.src):
                return True
            if is_op(u, aten.expand.default) and any(is_op(x, aten.eq.Tensor) for x in u.users):
                return True
            if is_op(u, aten.sum.dim_IntList) and any(is_op(x, aten.topk.default) for x in u.users):
                return True
    return False


def is_router_topk(topk: fx.Node) -> bool:
    """Cheap pre-filter: the topk reads softmax/sigmoid-like scores or feeds a softmax (else it is
    not a router candidate and records no near miss)."""
    if _is_group_helper(topk):
        return False
    frontier, seen = [topk.args[0]], set()
    for _ in range(6):
        nxt = []
        for x in frontier:
            if not isinstance(x, fx.Node) or x in seen:
                continue
            seen.add(x)
            if is_op(x, aten.sigmoid.default, aten.exp.default):
                return True
            if is_op(x, aten.div.Tensor) and is_op(x.args[0], aten.exp.default):
                return True
            if is_op(x, aten.where.self, aten.add.Tensor, aten.reshape.default, aten.div.Tensor) or is_convert(x):
                nxt.extend(a for a in x.args if isinstance(a, fx.Node))
        frontier = nxt
    for g in topk.users:
        for u in g.users:
            nxt = list(u.users) if is_convert(u) else [u]
            if any(is_op(c, aten.amax.default) for c in nxt):
                return True
    return False


def match_router(topk: fx.Node) -> RouterMatch:
    x = topk.args[0]
    k = topk.args[1]
    xv = tval(x)
    if xv.dim() < 1:
        raise Reject("topk of a scalar")
    if not _is_last_dim(topk, _arg(topk, 2, "dim", -1), None):
        raise Reject(f"topk over dim {_arg(topk, 2, 'dim', -1)}, not the expert (last) dim")
    if _arg(topk, 3, "largest", True) is not True:
        raise Reject("topk takes the smallest values")
    if not isinstance(k, int):
        raise Reject("k is not a constant")
    gi = _getitems(topk)
    values, ids = gi.get(0), gi.get(1)
    nodes: set[fx.Node] = {topk} | set(gi.values())

    sel = x
    n_group, topk_group, method, fill = 1, 1, GROUP_TOP2_SUM, float("-inf")
    if is_op(sel, aten.where.self):
        sel, n_group, topk_group, method, fill = _match_grouped(sel, nodes)
    scores, bias = _split_bias(sel)
    biased_dtype = tval(sel).dtype
    if bias is not None:
        nodes.add(sel)
    try:
        logits, scoring, score_dtype = _match_scores(scores, nodes)
    except _NotScores:
        if bias is not None or n_group > 1:
            raise
        # topk on the logits: must be followed by a softmax over the k values
        logits, up = _strip_upcast(scores)
        scoring, score_dtype = SCORING_TOPK_SOFTMAX, tval(scores).dtype
        if up is not None:
            nodes.add(up)
    if not isinstance(logits, fx.Node):
        raise Reject("logits are not a tensor")
    m = RouterMatch(topk, logits, bias, k, scoring, score_dtype, biased_dtype, scores,
                    n_group=n_group, topk_group=topk_group, group_score=method, fill=fill, ids=ids,
                    nodes=nodes)

    # weights: topk values (no bias), or gather(scores, -1, ids) (bias: weights are unbiased)
    gathers = [u for u in scores.users if is_op(u, aten.gather.default)]
    if bias is not None or (values is None and gathers):
        if values is not None and values.users:
            raise Reject("the top-k weights are taken from the bias-corrected scores")
        if len(gathers) != 1 or ids is None:
            raise Reject("the weights are not gathered from the unbiased scores at the top-k ids")
        ga = gathers[0]
        if ga.args[2] is not ids or not _is_last_dim(ga, ga.args[1], None):
            raise Reject("the weights are gathered at other indices than the top-k ids")
        nodes.add(ga)
        w0 = ga
    else:
        if values is None or not values.users:
            raise Reject("the top-k weights are not used")
        m.gather_weights = False  # the kernel returns the selected (masked) values, like topk
        w0 = values
    _extend_weights(m, w0)
    return m


def _region_checks(m: RouterMatch) -> None:
    """Every intermediate stays inside; the full scores may escape (extra output)."""
    outputs = {m.sink, m.ids}
    score_nodes = {m.scores} if m.scoring != SCORING_TOPK_SOFTMAX else set()
    for node in m.nodes - outputs:
        outside = [u for u in node.users if u not in m.nodes]
        if not outside:
            continue
        if node in score_nodes:
            m.need_scores = True
            continue
        raise Reject(f"intermediate {node.name} ({getattr(node.target, '__name__', node.target)}) is also used outside the router")


def check(m: RouterMatch, gate: bool = True) -> None:
    lv = tval(m.logits)
    E = lv.shape[-1]
    if not isinstance(E, int):
        raise Reject("expert count is symbolic; the kernel needs a static row length")
    if E > MAX_EXPERTS:
        raise Reject(f"{E} experts, at most {MAX_EXPERTS} supported")
    if not 1 <= m.k <= min(MAX_K, E):
        raise Reject(f"top-{m.k} not supported (k <= {MAX_K})")
    if lv.dtype not in FLOAT_DTYPES:
        raise Reject(f"logits dtype {lv.dtype} not supported")
    for dt in (m.score_dtype, m.biased_dtype, m.value_dtype, m.out_dtype):
        if dt not in FLOAT_DTYPES:
            raise Reject(f"dtype {dt} not supported")
    if not (math.isfinite(m.fill) or m.fill == float("-inf")):
        raise Reject(f"masked experts filled with {m.fill}; only finite values or -inf supported")
    if m.n_group > 1 and m.group_score == GROUP_TOP2_SUM and E // m.n_group < 2:
        raise Reject("top-2 group score with fewer than 2 experts per group")
    if m.bias is not None:
        bv = tval(m.bias)
        if bv.dtype not in FLOAT_DTYPES:
            raise Reject(f"bias dtype {bv.dtype} not supported")
        if depends_on_any(m.bias, m.nodes):
            raise Reject("the bias depends on the router itself")
    tensors = [lv] + ([tval(m.bias)] if m.bias is not None else [])
    if not same_device(*tensors):
        raise Reject("inputs are on different devices")
    dev = lv.device.type
    if dev not in ("cpu", "cuda"):
        raise Reject(f"device {dev} not supported")
    _region_checks(m)
    if dev == "cuda":
        why = gating.rejects(FAMILY, scheme=m.scheme, hidden=E, dtype=lv.dtype, enabled=gate)
        if why:
            raise Reject(why)


@dataclass
class RoutedOutputs:
    """What one routing rewrite inserted: a later pass may fold the fused router into its consumer
    (moe_experts folds it into its decode kernel) while the outputs have no other users."""

    logits: fx.Node  # the router logits the fused op reads ([..., E])
    bias: fx.Node | None
    params: dict[str, Any]  # the fxfuse::moe_routing arguments after (logits, bias)
    weights: fx.Node  # the fused op's outputs as the graph uses them ([..., k])
    ids: fx.Node
    scores: fx.Node
    nodes: set[fx.Node]  # every inserted node the outputs come from (launch, buffers, views)
    fusion: Any = None  # its report entry (a report.Fusion), for a note when folded


_ROUTED_ATTR = "_fxfuse_moe_routed"  # the graph's records, {weights or ids output: RoutedOutputs}: they
# live and die with the graph (a module-level table keyed by graph would keep every graph alive)


def _routed_table(graph: fx.Graph) -> dict[fx.Node, RoutedOutputs]:
    return graph.__dict__.setdefault(_ROUTED_ATTR, {})


def routed_outputs(graph: fx.Graph, node: fx.Node) -> RoutedOutputs | None:
    """The routing rewrite whose weights or ids output is `node` (None if none)."""
    return graph.__dict__.get(_ROUTED_ATTR, {}).get(node)


def forget_routed(graph: fx.Graph, rec: RoutedOutputs) -> None:
    """Drop a record once its routing is folded away."""
    table = _routed_table(graph)
    for n in (rec.weights, rec.ids):
        if table.get(n) is rec:
            del table[n]


def _inserted(outputs: list[fx.Node], inputs: list[fx.Node]) -> set[fx.Node]:
    """The traced nodes behind `outputs` (a traced replacement reads nothing but its inputs)."""
    seen: set[fx.Node] = set()
    stack = list(outputs)
    while stack:
        n = stack.pop()
        if n in seen or n in inputs:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def rewrite(graph: fx.Graph, m: RouterMatch) -> list[fx.Node]:
    """Insert the fused op and reroute weights, ids (and the full scores if used elsewhere)."""
    from ..kernels import moe_routing as _k  # noqa: F401  (registers torch.ops.fxfuse.moe_routing)

    lv = tval(m.logits)
    E, k = lv.shape[-1], m.k
    has_bias = m.bias is not None
    inputs = [m.logits] + ([m.bias] if has_bias else [])
    params = dict(
        k=k, scoring=m.scoring, score_dtype=m.score_dtype, biased_dtype=m.biased_dtype,
        n_group=m.n_group, topk_group=m.topk_group, group_score=m.group_score,
        fill=NEG_INF_FILL if m.fill == float("-inf") else m.fill,  # no inf in op arguments (AOTInductor)
        renormalize=m.renormalize, renorm_eps=m.renorm_eps, scale=m.scale, value_dtype=m.value_dtype,
        out_dtype=m.out_dtype, need_scores=m.need_scores, gather_weights=m.gather_weights,
    )
    need_scores = m.need_scores

    def replacement(logits: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        lead = logits.shape[:-1]
        w, ids, sc = torch.ops.fxfuse.moe_routing(logits.reshape(-1, E), rest[0] if rest else None, **params)
        sc = sc.reshape(*lead, E) if need_scores else sc
        return w.reshape(*lead, k), ids.reshape(*lead, k), sc

    on_cuda = lv.device.type == "cuda"
    w_new, ids_new, sc_new = insert_traced(graph, replacement, inputs, before=m.topk, functionalize=on_cuda)
    m.sink.replace_all_uses_with(w_new)
    if m.ids is not None:
        m.ids.replace_all_uses_with(ids_new)
    m.routed = RoutedOutputs(m.logits, m.bias, params, w_new, ids_new, sc_new,
                             _inserted([w_new, ids_new, sc_new], inputs))
    table = _routed_table(graph)
    table[w_new] = table[ids_new] = m.routed
    if need_scores:
        for u in list(m.scores.users):
            if u not in m.nodes:
                u.replace_input_with(m.scores, sc_new)
    stable_toposort(graph)
    return sorted(m.nodes, key=lambda n: n.name)


def _upcast_source(node: Any) -> Any:
    """The bf16/fp16 tensor an fp32 convert reads (DeepSeek-V3's ``x.float()``/``W.float()``), else None."""
    if isinstance(node, fx.Node) and is_convert(node) and convert_dtype(node) == torch.float32:
        src = node.args[0]
        sv = tval(src) if isinstance(src, fx.Node) else None
        if sv is not None and sv.dtype in (torch.bfloat16, torch.float16):
            return src
    return None


def match_router_gemm(m: RouterMatch, gate: bool = True) -> tuple[fx.Node, fx.Node, fx.Node, Any] | str:
    """(mm, x, w, out_dtype) when the router logits are a decode-sized ``mm(x, w.t())`` the GEMV
    kernel may replace, else why not (the mm then stays Inductor's). An fp32 mm of two upcast
    bf16/fp16 operands reads the 2-byte sources (out_dtype fp32: the kernel upcasts exactly)."""
    mm = m.logits
    if not is_op(mm, aten.mm.default):
        return "router logits are not a plain mm"
    x, wt = mm.args[0], mm.args[1]
    if not (is_op(wt, aten.permute.default) and list(wt.args[1]) == [1, 0]) or not isinstance(x, fx.Node):
        return "router mm's weight operand is not W.t()"
    w = wt.args[0]
    out_dtype = None
    xs, ws = _upcast_source(x), _upcast_source(w)
    if xs is not None and ws is not None and tval(xs).dtype == tval(ws).dtype:
        x, w, out_dtype = xs, ws, torch.float32
    xv, wv, lv = tval(x), tval(w), tval(mm)
    if xv is None or wv is None or lv is None:
        return "router mm without tensor metadata"
    M, H = xv.shape
    if not isinstance(M, int):
        return "token count is symbolic (the GEMV is for static decode steps)"
    if M > MAX_ROWS:
        return f"{M} tokens (> {MAX_ROWS}: a GEMM reads the weights once for all rows)"
    if xv.dtype != wv.dtype or lv.dtype != (out_dtype or xv.dtype) or xv.dtype not in FLOAT_DTYPES:
        return f"router mm dtypes {xv.dtype}/{wv.dtype} not supported"
    if not isinstance(H, int) or not isinstance(wv.shape[0], int):
        return "router mm sizes are symbolic"
    if not fits(M, wv.shape[0], H, upcast=out_dtype is not None):
        return f"{M} tokens x {wv.shape[0]} x {H} router weights: past the size the GEMV wins at (a GEMM reads them once)"
    if xv.stride(1) != 1 or wv.stride(1) != 1:
        return "router mm operands' rows are not contiguous"
    if not same_device(xv, wv) or xv.device.type not in ("cpu", "cuda"):
        return "router mm operands on different or unsupported devices"
    if xv.device.type == "cuda":
        # measured classes: 2-byte operands ("router_gemv"), fp32 ones and the upcast form apart
        scheme = "router_gemv" + ("_upcast" if out_dtype is not None else "_fp32" if xv.dtype == torch.float32 else "")
        why = gating.rejects(FAMILY, scheme=scheme, hidden=H, dtype=xv.dtype, enabled=gate, M=M)
        if why:
            return why
    return mm, x, w, out_dtype


def replace_router_gemm(graph: fx.Graph, mm: fx.Node, x: fx.Node, w: fx.Node, out_dtype: Any = None) -> fx.Node:
    """Put ``fxfuse::router_logits(x, w, out_dtype)`` in place of the router mm (every user rerouted)."""
    from ..kernels import router_gemv as _k  # noqa: F401  (registers torch.ops.fxfuse.router_logits)

    on_cuda = tval(x).device.type == "cuda"
    (new,) = insert_traced(graph, lambda a, b: (torch.ops.fxfuse.router_logits(a, b, out_dtype),), [x, w], before=mm,
                           functionalize=on_cuda)
    mm.replace_all_uses_with(new)
    graph.erase_node(mm)
    return new


class MoERouting:
    name = FAMILY

    @staticmethod
    def _router_gemv(graph: fx.Graph, m: RouterMatch, ctx: Any) -> str:
        """Replace the router's decode GEMM by the GEMV kernel where `match_router_gemm` allows (then
        m.logits is its output): the report's note, "" when kept. An extra: a failure keeps the mm
        (logged as an error; raised when strict)."""
        found = match_router_gemm(m, gate=ctx.options.get("gate", True))
        if isinstance(found, str):
            log.debug("fxfuse moe_routing at %s: router GEMM kept: %s", m.topk.name, found)
            return ""
        try:
            m.logits = replace_router_gemm(graph, *found)
        except Exception as e:  # noqa: BLE001 - the routing rewrite still applies on the mm's logits
            ctx.extra_failed(e, f"{FAMILY} router GEMV at {m.topk.name}", "kept the mm")
            return ""
        return " +router GEMV" + (" (fp32 from 2-byte operands)" if found[3] is not None else "")

    def __call__(self, graph: fx.Graph, ctx: Any) -> None:
        consumed: set[fx.Node] = set()
        graph.__dict__[_ROUTED_ATTR] = {}  # this run's rewrites only
        for node in reversed(list(graph.nodes)):
            if node in consumed or not is_op(node, aten.topk.default):
                continue
            try:
                candidate = is_router_topk(node)
            except Exception:  # noqa: BLE001 - a pre-filter must never break the pass
                candidate = False
            if not candidate:
                continue
            with ctx.candidate(FAMILY, node):
                m = match_router(node)
                check(m, gate=ctx.options.get("gate", True))
                gemv = self._router_gemv(graph, m, ctx)
                replaced = rewrite(graph, m)
                consumed |= m.nodes
                on_cuda = tval(m.logits).device.type == "cuda"
                kernel = "triton:fxfuse_moe_routing" if on_cuda else "fxfuse::moe_routing"
                E = tval(m.logits).shape[-1]
                detail = f"{m.scheme} E={E} k={m.k}"
                if m.n_group > 1:
                    detail += f" groups={m.n_group}/{m.topk_group}"
                if m.bias is not None:
                    detail += " +bias"
                if m.renormalize:
                    detail += " renorm"
                if m.scale != 1.0:
                    detail += f" scale={m.scale:g}"
                if m.need_scores:
                    detail += " +scores"
                detail += gemv
                m.routed.fusion = ctx.applied(FAMILY, replaced, kernel, detail)


PASS = MoERouting()
