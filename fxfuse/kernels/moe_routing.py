"""MoE router (logits -> top-k weights and expert ids) as one Triton kernel.

This module knows nothing about FX. It provides:

* :func:`moe_routing_reference` -- pure-torch oracle (also the CPU kernel of the op).
* ``torch.ops.fxfuse.moe_routing`` -- a ``torch.library.triton_op`` launching through
  ``wrap_triton``, so that traced under FunctionalTensorMode it becomes a user-defined Triton
  kernel in Inductor's output code.
* :func:`moe_routing_triton` -- plain launcher (eager CUDA, or CPU under ``TRITON_INTERPRET=1``).

Semantics per token row (fp32 arithmetic, rounded to the graph's dtypes where the graph rounds)::

    x = logits.f32
    scores = softmax(x) | sigmoid(x) | x            (SCORING), rounded to score_dtype
    sel = scores + bias (optional), rounded to biased_dtype
    if n_group > 1:                                 # DeepSeek-V3 grouped selection
        gs[g] = sum of the top-2 of sel in group g  (or max of the group)
        keep the topk_group best groups; sel = where(in kept group, sel, fill)
    ids = top-k of sel (k passes of max-then-mask; ties -> lowest index)
    w = scores[ids] (gather_weights: unbiased, unmasked) | sel[ids] (the topk values)
    if scoring == topk_softmax: w = softmax(w) over the k values
    if renormalize: w = w / (sum(w) + eps)          (each step rounded to value_dtype)
    w = w * scale                                   (rounded to value_dtype)
    weights = w.to(out_dtype); ids int64; scores (optional extra output)

Ties: the kernel picks the lowest index among equal values, and returns the k ids sorted by
value (descending, lowest index first among equals). ``torch.topk`` on CPU resolves ties
arbitrarily (its partial sort: ``topk(zeros(16), 4)`` gives ids [10, 11, 12, 9]) and CUDA's
radix select does not document an order either (on an H100, bf16 logits over 128 experts tie
exactly in a few rows of 64 and CUDA picked other tied ids). So on exact ties the chosen ids can
differ from eager: a differing id always has exactly the score of eager's id at that position,
and the weights are the same values (tests compare this way, tie-aware). Without ties the sets are
identical, and the order equals ``torch.topk(sorted=True)``. NaN scores are not supported (eager
treats NaN as the largest value).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .accesses import accesses, declare
from .quant_common import round_to

__all__ = [
    "SCORING_SOFTMAX",
    "SCORING_SIGMOID",
    "SCORING_TOPK_SOFTMAX",
    "GROUP_TOP2_SUM",
    "GROUP_MAX",
    "MAX_EXPERTS",
    "MAX_K",
    "moe_routing",
    "moe_routing_reference",
    "moe_routing_triton",
    "check_args",
    "bytes_moved",
]

SCORING_SOFTMAX = 0  # softmax over experts, then top-k
SCORING_SIGMOID = 1  # sigmoid per expert, then top-k
SCORING_TOPK_SOFTMAX = 2  # top-k on the logits, then softmax over the k values
SCORING_NAMES = {SCORING_SOFTMAX: "softmax", SCORING_SIGMOID: "sigmoid", SCORING_TOPK_SOFTMAX: "topk_softmax"}

GROUP_TOP2_SUM = 0  # group score = sum of the top-2 (biased) scores in the group (DeepSeek-V3)
GROUP_MAX = 1  # group score = max (DeepSeek-V2)

MAX_EXPERTS = 512
MAX_K = 16

NEG_INF_FILL = -1.7976931348623157e308  # -sys.float_info.max
"""How a -inf fill travels as the ops' `fill` argument: AOTInductor writes a non-finite float
argument into its package as a JSON string ("-Infinity") that its loader rejects. Any fill below
fp32's range rounds to -inf in the fp32 routing math, so this is -inf exactly (`is_ninf_fill`)."""


def is_ninf_fill(fill: float) -> bool:
    """Whether `fill` means -inf (-inf itself, or a finite value that rounds to it in fp32)."""
    return float(fill) < -torch.finfo(torch.float32).max

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DT_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def check_args(
    logits: torch.Tensor,
    bias: Optional[torch.Tensor],
    k: int,
    scoring: int,
    score_dtype: torch.dtype,
    biased_dtype: torch.dtype,
    n_group: int,
    topk_group: int,
    group_score: int,
    value_dtype: torch.dtype,
    out_dtype: torch.dtype,
    fill: float = float("-inf"),
) -> None:
    """Raise ValueError on unsupported inputs (the FX side pre-checks the same things)."""
    if logits.dim() != 2:
        raise ValueError(f"moe_routing: logits must be 2-D [M, E], got {tuple(logits.shape)}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"moe_routing: logits dtype {logits.dtype} unsupported")
    E = logits.shape[1]
    if not (1 <= E <= MAX_EXPERTS):
        raise ValueError(f"moe_routing: {E} experts, at most {MAX_EXPERTS}")
    if not (1 <= k <= min(MAX_K, E)):
        raise ValueError(f"moe_routing: k={k} must be in [1, min({MAX_K}, E={E})]")
    if scoring not in SCORING_NAMES:
        raise ValueError(f"moe_routing: scoring {scoring} unknown")
    for name, dt in (("score_dtype", score_dtype), ("biased_dtype", biased_dtype),
                     ("value_dtype", value_dtype), ("out_dtype", out_dtype)):
        if dt not in _FLOAT_DTYPES:
            raise ValueError(f"moe_routing: {name} {dt} unsupported")
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != E or bias.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"moe_routing: bias must be a float [E={E}] vector, got {tuple(bias.shape)} {bias.dtype}")
        if bias.device != logits.device:
            raise ValueError("moe_routing: bias on a different device than logits")
    if not (math.isfinite(fill) or is_ninf_fill(fill)):
        raise ValueError(f"moe_routing: fill {fill} must be finite or -inf")
    if n_group < 1 or E % n_group:
        raise ValueError(f"moe_routing: n_group={n_group} must divide E={E}")
    if n_group > 1:
        if not (1 <= topk_group <= n_group):
            raise ValueError(f"moe_routing: topk_group={topk_group} not in [1, n_group={n_group}]")
        if group_score not in (GROUP_TOP2_SUM, GROUP_MAX):
            raise ValueError(f"moe_routing: group_score {group_score} unknown")
        if group_score == GROUP_TOP2_SUM and E // n_group < 2:
            raise ValueError("moe_routing: top-2 group score needs at least 2 experts per group")
        if scoring == SCORING_TOPK_SOFTMAX:
            raise ValueError("moe_routing: grouped selection with topk_softmax scoring unsupported")


# ----------------------------------------------------------------------------- reference


def _rnd(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    return t.to(dt).to(torch.float32)


def _topk_lowest_index(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """top-k along the last dim, ties resolved to the lowest index (stable descending sort)."""
    v, i = torch.sort(x, dim=-1, descending=True, stable=True)
    return v[..., :k], i[..., :k]


def moe_routing_reference(
    logits: torch.Tensor,
    bias: Optional[torch.Tensor],
    k: int,
    scoring: int,
    score_dtype: torch.dtype,
    biased_dtype: torch.dtype,
    n_group: int,
    topk_group: int,
    group_score: int,
    fill: float,
    renormalize: bool,
    renorm_eps: float,
    scale: float,
    value_dtype: torch.dtype,
    out_dtype: torch.dtype,
    need_scores: bool,
    gather_weights: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-torch oracle with the kernel's exact semantics (ties: lowest index); any device."""
    check_args(logits, bias, k, scoring, score_dtype, biased_dtype, n_group, topk_group, group_score,
               value_dtype, out_dtype, fill)
    f32 = torch.float32
    M, E = logits.shape
    x = logits.to(f32)
    if scoring == SCORING_SOFTMAX:
        s = torch.softmax(x, dim=-1)
    elif scoring == SCORING_SIGMOID:
        s = torch.sigmoid(x)
    else:
        s = x
    s = _rnd(s, score_dtype)
    sel = s if bias is None else _rnd(s + bias.to(f32), biased_dtype)
    if n_group > 1:
        gsz = E // n_group
        grp = sel.reshape(M, n_group, gsz)
        if group_score == GROUP_TOP2_SUM:
            gscore = _topk_lowest_index(grp, 2)[0].sum(-1)
        else:
            gscore = grp.amax(-1)
        gidx = _topk_lowest_index(gscore, topk_group)[1]
        keep = torch.zeros(M, n_group, dtype=torch.bool, device=x.device).scatter(1, gidx, True)
        keep = keep[:, :, None].expand(M, n_group, gsz).reshape(M, E)
        sel = torch.where(keep, sel, torch.tensor(float("-inf") if is_ninf_fill(fill) else fill, dtype=f32,
                                                  device=x.device))
    sv, ids = _topk_lowest_index(sel, k)
    w = s.gather(1, ids) if gather_weights else sv
    if scoring == SCORING_TOPK_SOFTMAX:
        w = _rnd(torch.softmax(w, dim=-1), value_dtype)
    if renormalize:
        den = _rnd(w.sum(-1, keepdim=True), value_dtype)
        if renorm_eps != 0.0:
            den = _rnd(den + torch.tensor(renorm_eps, dtype=f32, device=x.device), value_dtype)
        w = _rnd(w / den, value_dtype)
    if scale != 1.0:
        w = _rnd(w * torch.tensor(scale, dtype=f32, device=x.device), value_dtype)
    scores = s.to(score_dtype).contiguous() if need_scores else logits.new_empty((0,), dtype=score_dtype)
    return w.to(out_dtype).contiguous(), ids.to(torch.int64).contiguous(), scores


# ----------------------------------------------------------------------------- kernel


def _finite_fill(fill: float) -> float:
    """The runtime fill argument: -inf travels as the FILL_NINF constexpr instead."""
    return 0.0 if is_ninf_fill(fill) else float(fill)


@triton.jit
def route_row(
    logits_row, bias_ptr, scores_row,
    fill, renorm_eps, scale,
    E: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
    SCORING: tl.constexpr, SCORE_DT: tl.constexpr, BIASED_DT: tl.constexpr, VALUE_DT: tl.constexpr, OUT_DT: tl.constexpr,
    HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_SCORE: tl.constexpr,
    G_PAD: tl.constexpr, GS: tl.constexpr, GS_PAD: tl.constexpr,
    RENORM: tl.constexpr, HAS_EPS: tl.constexpr, HAS_SCALE: tl.constexpr,
    GATHER_W: tl.constexpr, FILL_NINF: tl.constexpr, NATIVE: tl.constexpr, NEED_SCORES: tl.constexpr,
):
    """The routing of one token row -> (weights [K_PAD] fp32, exact in OUT_DT; ids [K_PAD] int64),
    lanes >= K undefined. The one implementation of the routing math: the routing kernel and the
    routed decode kernel of moe_experts (which folds the routing into its gate_up programs) call it.

    The row lives in registers as a [G_PAD, GS_PAD] tile (groups x experts per group; one group
    when ungrouped), so group reductions are along axis 1 and the expert top-k reduces both axes.
    Top-k = K passes of (max, lowest index among the max). NEED_SCORES stores the rounded scores
    at `scores_row`."""
    fill = tl.cast(fill, tl.float32)
    renorm_eps = tl.cast(renorm_eps, tl.float32)
    scale = tl.cast(scale, tl.float32)
    g = tl.arange(0, G_PAD)[:, None]
    j = tl.arange(0, GS_PAD)[None, :]
    col = g * GS + j  # expert index
    valid = (g < N_GROUP) & (j < GS)
    NEG = float("-inf")

    x = tl.load(logits_row + col, mask=valid, other=0.0).to(tl.float32)
    if SCORING == 0:
        xm = tl.where(valid, x, NEG)
        mx = tl.max(tl.max(xm, axis=1), axis=0)
        ex = tl.exp(xm - mx)
        den = tl.sum(tl.sum(ex, axis=1), axis=0)
        if NATIVE:
            s = ex / den
        else:
            s = tl.math.div_rn(ex, den + tl.zeros_like(ex))
    elif SCORING == 1:
        s = 1.0 / (1.0 + tl.exp(-x))
    else:
        s = x
    s = round_to(s, SCORE_DT, NATIVE)
    if NEED_SCORES:
        tl.store(scores_row + col, s.to(scores_row.dtype.element_ty), mask=valid)
    sel = s
    if HAS_BIAS:
        b = tl.load(bias_ptr + col, mask=valid, other=0.0).to(tl.float32)
        sel = round_to(s + b, BIASED_DT, NATIVE)
    sel = tl.where(valid, sel, NEG)

    if N_GROUP > 1:
        gi = tl.arange(0, G_PAD)
        g1 = tl.max(sel, axis=1)  # [G_PAD]
        if GROUP_SCORE == 0:
            i1 = tl.min(tl.where(valid & (sel == g1[:, None]), j, 1073741824), axis=1)
            g2 = tl.max(tl.where(valid & (j != i1[:, None]), sel, NEG), axis=1)
            gscore = g1 + g2
        else:
            gscore = g1
        gvalid = gi < N_GROUP
        gtaken = tl.zeros([G_PAD], dtype=tl.int32)
        for _t in tl.static_range(TOPK_GROUP):
            cand = gvalid & (gtaken == 0)
            gm = tl.max(tl.where(cand, gscore, NEG), axis=0)
            gsel = tl.min(tl.where(cand & (gscore == gm), gi, 1073741824), axis=0)
            gtaken = tl.where(gi == gsel, 1, gtaken)
        if FILL_NINF:
            sel = tl.where(gtaken[:, None] != 0, sel, NEG)
        else:
            sel = tl.where(gtaken[:, None] != 0, sel, fill)

    kr = tl.arange(0, K_PAD)
    vals = tl.zeros([K_PAD], dtype=tl.float32)
    ids = tl.zeros([K_PAD], dtype=tl.int64)
    taken = tl.zeros([G_PAD, GS_PAD], dtype=tl.int32)
    for t in tl.static_range(K):
        cand = valid & (taken == 0)
        m = tl.max(tl.max(tl.where(cand, sel, NEG), axis=1), axis=0)
        pick = tl.min(tl.min(tl.where(cand & (sel == m), col, 1073741824), axis=1), axis=0)
        hit = col == pick
        if GATHER_W:  # weights from the unbiased, unmasked scores
            wv = tl.max(tl.max(tl.where(hit, s, NEG), axis=1), axis=0)
        else:  # the selected values themselves (== the scores without bias and groups)
            wv = m
        taken = tl.where(hit, 1, taken)
        vals = tl.where(kr == t, wv, vals)
        ids = tl.where(kr == t, pick.to(tl.int64), ids)

    kvalid = kr < K
    if SCORING == 2:
        vm = tl.where(kvalid, vals, NEG)
        e = tl.exp(vm - tl.max(vm, axis=0))
        ssum = tl.sum(e, axis=0)
        vals = round_to(tl.math.div_rn(e, ssum + tl.zeros_like(e)), VALUE_DT, NATIVE)
    if RENORM:
        ssum = round_to(tl.sum(tl.where(kvalid, vals, 0.0), axis=0), VALUE_DT, NATIVE)
        if HAS_EPS:
            ssum = round_to(ssum + renorm_eps, VALUE_DT, NATIVE)
        vals = round_to(tl.math.div_rn(vals, ssum + tl.zeros_like(vals)), VALUE_DT, NATIVE)
    if HAS_SCALE:
        vals = round_to(vals * scale, VALUE_DT, NATIVE)
    vals = round_to(vals, OUT_DT, NATIVE)  # RNE in the interpreter too; the caller's cast is then exact
    return vals, ids


@triton.jit
def _moe_routing_kernel(
    logits_ptr, bias_ptr, w_ptr, ids_ptr, scores_ptr,
    stride_l,
    fill, renorm_eps, scale,
    E: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
    SCORING: tl.constexpr, SCORE_DT: tl.constexpr, BIASED_DT: tl.constexpr, VALUE_DT: tl.constexpr, OUT_DT: tl.constexpr,
    HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_SCORE: tl.constexpr,
    G_PAD: tl.constexpr, GS: tl.constexpr, GS_PAD: tl.constexpr,
    RENORM: tl.constexpr, HAS_EPS: tl.constexpr, HAS_SCALE: tl.constexpr,
    NEED_SCORES: tl.constexpr, GATHER_W: tl.constexpr, FILL_NINF: tl.constexpr, NATIVE: tl.constexpr,
):
    """One program per token: `route_row`, then the row's k weights and ids (and scores)."""
    row = tl.program_id(0).to(tl.int64)
    vals, ids = route_row(
        logits_ptr + row * stride_l, bias_ptr, scores_ptr + row * E, fill, renorm_eps, scale,
        E, K, K_PAD, SCORING, SCORE_DT, BIASED_DT, VALUE_DT, OUT_DT, HAS_BIAS, N_GROUP, TOPK_GROUP, GROUP_SCORE,
        G_PAD, GS, GS_PAD, RENORM, HAS_EPS, HAS_SCALE, GATHER_W, FILL_NINF, NATIVE, NEED_SCORES,
    )
    kr = tl.arange(0, K_PAD)
    kvalid = kr < K
    tl.store(w_ptr + row * K + kr, vals.to(w_ptr.dtype.element_ty), mask=kvalid)
    tl.store(ids_ptr + row * K + kr, ids, mask=kvalid)


@declare(_moe_routing_kernel)
def _moe_routing_accesses(a):
    return accesses(["logits_ptr"] + ["bias_ptr"] * bool(a["HAS_BIAS"]),
                    ["w_ptr", "ids_ptr"] + ["scores_ptr"] * bool(a["NEED_SCORES"]))


def row_meta(
    logits: torch.Tensor,
    bias: Optional[torch.Tensor],
    k: int,
    scoring: int,
    score_dtype: torch.dtype,
    biased_dtype: torch.dtype,
    n_group: int,
    topk_group: int,
    group_score: int,
    fill: float,
    renormalize: bool,
    renorm_eps: float,
    scale: float,
    value_dtype: torch.dtype,
    out_dtype: torch.dtype,
    gather_weights: bool = True,
) -> dict:
    """The constexpr kwargs of `route_row` but NEED_SCORES (pure Python on static shapes: fake-safe);
    arguments in the op's order. Every kernel that calls `route_row` takes them under these names."""
    E = logits.shape[1]
    gs = E // n_group
    return dict(
        E=E, K=k, K_PAD=triton.next_power_of_2(k),
        SCORING=int(scoring), SCORE_DT=_DT_CODE[score_dtype], BIASED_DT=_DT_CODE[biased_dtype],
        VALUE_DT=_DT_CODE[value_dtype], OUT_DT=_DT_CODE[out_dtype], HAS_BIAS=bias is not None,
        N_GROUP=int(n_group), TOPK_GROUP=int(topk_group) if n_group > 1 else 0,
        GROUP_SCORE=int(group_score),
        G_PAD=triton.next_power_of_2(n_group), GS=gs, GS_PAD=triton.next_power_of_2(gs),
        RENORM=bool(renormalize), HAS_EPS=float(renorm_eps) != 0.0, HAS_SCALE=float(scale) != 1.0,
        GATHER_W=bool(gather_weights) and (bias is not None or n_group > 1),
        FILL_NINF=is_ninf_fill(fill),  # -inf is a constexpr: no inf literal in generated code
        NATIVE=os.environ.get("TRITON_INTERPRET", "0") != "1",
    )


def row_scalars(fill: float, renorm_eps: float, scale: float) -> tuple[float, float, float]:
    """The runtime (fill, renorm_eps, scale) arguments of `route_row`."""
    return _finite_fill(fill), float(renorm_eps), float(scale)


def _meta(
    logits: torch.Tensor,
    bias: Optional[torch.Tensor],
    k: int,
    scoring: int,
    score_dtype: torch.dtype,
    biased_dtype: torch.dtype,
    n_group: int,
    topk_group: int,
    group_score: int,
    renormalize: bool,
    renorm_eps: float,
    scale: float,
    value_dtype: torch.dtype,
    out_dtype: torch.dtype,
    need_scores: bool,
    num_warps: Optional[int],
    gather_weights: bool = True,
    fill: float = 0.0,
) -> dict:
    """Constexpr kwargs + num_warps of the routing kernel (pure Python on static shapes: fake-safe)."""
    E = logits.shape[1]
    block = triton.next_power_of_2(n_group) * triton.next_power_of_2(E // n_group)
    return dict(
        **row_meta(logits, bias, k, scoring, score_dtype, biased_dtype, n_group, topk_group, group_score, fill,
                   renormalize, renorm_eps, scale, value_dtype, out_dtype, gather_weights),
        NEED_SCORES=bool(need_scores),
        num_warps=num_warps if num_warps is not None else (1 if block <= 256 else 2),
    )


def _alloc(logits: torch.Tensor, k: int, score_dtype: torch.dtype, out_dtype: torch.dtype,
           need_scores: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    M, E = logits.shape
    w = torch.empty((M, k), dtype=out_dtype, device=logits.device)
    ids = torch.empty((M, k), dtype=torch.int64, device=logits.device)
    scores = torch.empty((M, E) if need_scores else (0,), dtype=score_dtype, device=logits.device)
    return w, ids, scores


def launch(
    wrap,
    logits: torch.Tensor,
    bias: Optional[torch.Tensor],
    k: int,
    scoring: int,
    score_dtype: torch.dtype,
    biased_dtype: torch.dtype,
    n_group: int,
    topk_group: int,
    group_score: int,
    fill: float,
    renormalize: bool,
    renorm_eps: float,
    scale: float,
    value_dtype: torch.dtype,
    out_dtype: torch.dtype,
    need_scores: bool,
    gather_weights: bool = True,
    out: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    num_warps: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the routing kernel through `wrap` (wrap_triton in the op, identity in plain launchers)
    on row-contiguous logits; `out` = caller buffers (w, ids, scores)."""
    w, ids, scores = out if out is not None else _alloc(logits, k, score_dtype, out_dtype, need_scores)
    meta = _meta(logits, bias, k, scoring, score_dtype, biased_dtype, n_group, topk_group, group_score,
                 renormalize, renorm_eps, scale, value_dtype, out_dtype, need_scores, num_warps, gather_weights, fill)
    M = logits.shape[0]
    if not (isinstance(M, int) and M == 0):  # a zero-size grid is an error
        wrap(_moe_routing_kernel)[(M,)](
            logits, bias if bias is not None else logits, w, ids, scores,
            logits.stride(0), *row_scalars(fill, renorm_eps, scale), **meta,
        )
    return w, ids, scores


@triton_op("fxfuse::moe_routing", mutates_args=())
def moe_routing(
    logits: torch.Tensor,
    bias: Optional[torch.Tensor],
    k: int,
    scoring: int,
    score_dtype: torch.dtype,
    biased_dtype: torch.dtype,
    n_group: int,
    topk_group: int,
    group_score: int,
    fill: float,
    renormalize: bool,
    renorm_eps: float,
    scale: float,
    value_dtype: torch.dtype,
    out_dtype: torch.dtype,
    need_scores: bool,
    gather_weights: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused router -> (weights [M, k], ids [M, k] int64, scores [M, E] or empty)."""
    if logits.device.type == "cpu":
        return _moe_routing_cpu(logits, bias, k, scoring, score_dtype, biased_dtype, n_group, topk_group,
                                group_score, fill, renormalize, renorm_eps, scale, value_dtype, out_dtype,
                                need_scores, gather_weights)
    check_args(logits, bias, k, scoring, score_dtype, biased_dtype, n_group, topk_group, group_score,
               value_dtype, out_dtype, fill)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    return launch(wrap_triton, logits, bias, k, scoring, score_dtype, biased_dtype, n_group, topk_group, group_score,
                  fill, renormalize, renorm_eps, scale, value_dtype, out_dtype, need_scores, gather_weights)


def _moe_routing_cpu(
    logits: torch.Tensor,
    bias: Optional[torch.Tensor],
    k: int,
    scoring: int,
    score_dtype: torch.dtype,
    biased_dtype: torch.dtype,
    n_group: int,
    topk_group: int,
    group_score: int,
    fill: float,
    renormalize: bool,
    renorm_eps: float,
    scale: float,
    value_dtype: torch.dtype,
    out_dtype: torch.dtype,
    need_scores: bool,
    gather_weights: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPU has no Triton: run the reference (fresh, non-aliasing outputs)."""
    w, ids, s = moe_routing_reference(logits, bias, k, scoring, score_dtype, biased_dtype, n_group, topk_group,
                                      group_score, fill, renormalize, renorm_eps, scale, value_dtype, out_dtype,
                                      need_scores, gather_weights)
    return w.clone(), ids.clone(), s.clone()


moe_routing.register_kernel("cpu")(_moe_routing_cpu)


def moe_routing_triton(
    logits: torch.Tensor,
    bias: Optional[torch.Tensor],
    k: int,
    scoring: int,
    score_dtype: torch.dtype,
    biased_dtype: torch.dtype,
    n_group: int,
    topk_group: int,
    group_score: int,
    fill: float,
    renormalize: bool,
    renorm_eps: float,
    scale: float,
    value_dtype: torch.dtype,
    out_dtype: torch.dtype,
    need_scores: bool,
    gather_weights: bool = True,
    *,
    out: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    num_warps: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the raw kernel (no dispatcher): eager CUDA, or CPU under TRITON_INTERPRET=1.

    `out=(w, ids, scores)` writes into caller buffers (tests poison them); `num_warps` overrides
    the heuristic (benchmark sweeps).
    """
    check_args(logits, bias, k, scoring, score_dtype, biased_dtype, n_group, topk_group, group_score,
               value_dtype, out_dtype, fill)
    if logits.stride(1) != 1:
        raise ValueError("moe_routing: logits rows must be contiguous (stride(1) == 1)")
    return launch(lambda kern: kern, logits, bias.contiguous() if bias is not None else None, k, scoring, score_dtype,
                  biased_dtype, n_group, topk_group, group_score, fill, renormalize, renorm_eps, scale, value_dtype,
                  out_dtype, need_scores, gather_weights, out=out, num_warps=num_warps)


def bytes_moved(M: int, E: int, k: int, logits_dtype: torch.dtype = torch.float32,
                out_dtype: torch.dtype = torch.float32, has_bias: bool = False) -> int:
    """Minimum HBM bytes read + written by one call."""
    ls = torch.empty((), dtype=logits_dtype).element_size()
    os_ = torch.empty((), dtype=out_dtype).element_size()
    return M * E * ls + (E * 4 if has_bias else 0) + M * k * (os_ + 8)
