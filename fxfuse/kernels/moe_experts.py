"""Fused MoE experts (gate_up GEMM + SiLU-and-mul + down GEMM + weighted top-k combine) in Triton.

This module knows nothing about FX.  It provides:

* :func:`moe_experts_reference` -- pure-torch oracle (a loop over *all* experts with masks, no
  ``nonzero``: it traces under fake tensors and is the CPU kernel of the op).
* ``torch.ops.fxfuse.moe_experts`` -- a ``torch.library.triton_op`` launching through
  ``wrap_triton`` (so Inductor emits user-defined Triton kernels, not a Python fallback).
* :func:`moe_experts_triton` -- plain launcher (eager CUDA, or CPU under ``TRITON_INTERPRET=1``).
* ``torch.ops.fxfuse.moe_routed_experts`` / :func:`moe_routed_experts_triton` -- the same from the
  router logits: ``fxfuse::moe_routing`` then ``fxfuse::moe_experts``, except that on the decode
  path kernel A routes its token itself (``moe_routing.route_row``, the routing kernel's code) and
  hands the (weights, ids) to kernel B: one launch fewer.
* :func:`selected_weight_bytes` -- the weight-streaming floor model for benchmarks.

No host synchronization anywhere: expert ids are read on the GPU, every grid comes from static
shapes (upper bounds), so the layer replays inside a CUDA graph.

Semantics (``S = M * K`` (token, expert-slot) pairs, weights in GEMM "B" form)::

    w1: [E, H, 2I]   (transformers stores gate_up_proj as [E, 2I, H]; w1 is its transpose view)
    w2: [E, I, H]    (down_proj [E, H, I] transposed view)
    for each pair p = (t, j), e = ids[t, j]:
        gu = round_act(x[t] @ w1[e])                  # act = x.dtype, fp32 accumulation
        h  = round_act(round_act(silu(gu[:I])) * gu[I:])
        y  = round_act(h @ w2[e])
        c  = y * w[t, j]   (rounded to prod_dtype)
    out[t] = round(sum_j c, sum_dtype) -> out_dtype   # fp32 sum over the top-k
Pairs with an id outside [0, E) contribute zero.

Two paths, chosen from the static token count (symbolic token counts take the tiled path):

* decode (``M*K*4 <= E`` or tiny M): kernel A, one program per (pair, N-block), a pipelined
  16-row ``tl.dot`` (row 0 = x[token]) over gate and up weight tiles, writes the SiLU-mul
  intermediate [S, I]; kernel B, one program per (token, H-block), streams ``w2[e]`` for the K
  slots and combines deterministically in fp32 -> out [M, H].  All selected experts' weights are
  streamed in parallel by many programs (N-split), loads contiguous along H / I.  Which form
  (vector or dot) and which tiles come from ``decode_config`` (measured, per shape class).
* prefill: an align step on the GPU (Triton, static upper bounds: ``S + E*(BM-1)`` padded rows,
  vLLM's moe_align_block_size idea; one launch for a static pair count <= 1024, else histogram +
  atomic scatter) sorts pairs by expert in BLOCK_M tiles; then two tiled ``tl.dot`` grouped GEMM
  kernels; tiles past the padded count exit early after reading that count from device memory.
  A combine kernel sums each token's per-pair outputs over K in slot order (deterministic).
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .accesses import accesses, declare
from . import moe_routing as _routing
from .moe_routing import route_row
from .quant_common import DT_CODE as _DT_CODE, round_to

__all__ = [
    "PATH_AUTO",
    "PATH_DECODE",
    "PATH_PREFILL",
    "moe_experts",
    "moe_experts_reference",
    "moe_experts_triton",
    "moe_routed_experts",
    "moe_routed_experts_triton",
    "choose_path",
    "decode_config",
    "gate_classes",
    "prefill_config",
    "selected_weight_bytes",
    "check_args",
]

PATH_AUTO = 0
PATH_DECODE = 1
PATH_PREFILL = 2
WEIGHT_DTYPES = (torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------
# Validation and block-size tables
# ----------------------------------------------------------------------------


def check_args(x: torch.Tensor, topk_w: torch.Tensor, topk_ids: torch.Tensor, w1: torch.Tensor,
               w2: torch.Tensor) -> None:
    """Shape/dtype contract of the op (pure Python on shapes: fake-safe)."""
    if x.dim() != 2 or topk_w.dim() != 2 or topk_ids.dim() != 2 or w1.dim() != 3 or w2.dim() != 3:
        raise ValueError("moe_experts: x [M,H], topk_w/topk_ids [M,K], w1 [E,H,2I], w2 [E,I,H]")
    E, H, N2 = w1.shape
    if x.shape[1] != H or w2.shape[0] != E or w2.shape[2] != H or 2 * w2.shape[1] != N2:
        raise ValueError(f"moe_experts: inconsistent shapes x{tuple(x.shape)} w1{tuple(w1.shape)} w2{tuple(w2.shape)}")
    if x.dtype not in WEIGHT_DTYPES or w1.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(f"moe_experts: x/w1/w2 must share one dtype in {WEIGHT_DTYPES}")
    if topk_ids.dtype not in (torch.int32, torch.int64) or not topk_w.is_floating_point():
        raise ValueError("moe_experts: topk_ids must be int32/int64 and topk_w floating point")


def choose_path(M: object, K: int, E: int) -> int:
    """decode for a static, small pair count (each pair streams its expert once), else prefill.

    A symbolic M takes the tiled path: choosing per call would need a guard on M.
    """
    if not isinstance(M, int):
        return PATH_PREFILL
    # M * K * 2 <= E: Qwen3-30B-A3B (E=128, top-8) at 8 tokens ran the decode path's raw op in 128.4 us
    # against 130.0 us for the best BM=16 tiles and 142.9 us for the old ones (H200, tune_moe_decode.py
    # --small), and it needs neither the align nor the combine launch; Mixtral (E=8, top-2) at 8 tokens
    # reads each expert several times per step on it (872 us vs 640 us tiled) and stays tiled
    return PATH_DECODE if (M * K * 2 <= E or M <= 2) else PATH_PREFILL


LARGE_PER_EXPERT = 96  # mean pairs per expert above which the tiled path uses 128-row tiles


def gate_classes(M: object, K: int, E: int) -> list[str]:
    """The benchmark shape classes a call must have measured faster than stock to ship.

    decode; prefill (tiled, up to LARGE_PER_EXPERT pairs per expert); prefill-large (compute-bound
    128-row tiles, where cuBLAS grouped GEMMs can win: Mixtral at 2048 tokens measured 0.80x on an
    H200). A symbolic M may be either tiled class at run time, so it needs both.
    """
    if choose_path(M, K, E) == PATH_DECODE:
        return ["decode"]
    if not isinstance(M, int):
        return ["prefill", "prefill-large"]
    return ["prefill-large" if _tile_rows(M * K, E) == 128 else "prefill"]


def _tile_rows(S: object, E: int) -> int:
    """BLOCK_M of the tiled path: the mean pairs per expert, so each expert's weights stream about
    once per N-block; a symbolic pair count (dynamic M) takes a middle size (any size is correct)."""
    per_expert = S / E if isinstance(S, int) else 64
    return 16 if per_expert <= 16 else 32 if per_expert <= 32 else 64 if per_expert <= LARGE_PER_EXPERT else 128


def decode_config(H: int, I: int, K: int = 8, M: int = 1) -> dict:
    """Block sizes, forms and warps for decode kernels A and B by shape class (no autotuning).

    From benchmarks/tune_moe_decode.py on an H200 (benchmarks/results/tune_moe_decode_h200.json,
    tune_moe_focus_h200.json, tune_moe_focus8_h200.json): kernel A as a pipelined 16-row ``tl.dot``
    (32 x 128 weight tiles, 4 stages; 32-wide N-blocks beat 64 at Qwen3-30B-A3B M=1 and M=8 by
    0.5-1 us) beat the best vector form at both Qwen3-30B-A3B and Mixtral shapes; kernel B keeps the
    3-D vector tile when K >= 8 (all K experts' streams in flight in one program) and takes the
    pipelined dot form for small K (few, long expert streams). With several tokens (M >= 4; measured
    at 8) B's programs are 8x as many, and 4 warps over 128-wide steps beat 8 over 256 (125.8 vs
    128.6 us for the op at Qwen M=8; at M=1 the wider step wins, 23.6 vs 25.1 us).
    """
    del H, I  # one class per K today: both measured shapes agree on A; B splits on K
    k_pad = triton.next_power_of_2(K)
    a = dict(A_DOT=1, A_BN=32, A_BK=128, A_STAGES=4, A_WARPS=4)
    if k_pad >= 8:
        b = dict(B_DOT=0, B_BN=2, B_BK=128, B_WARPS=4, B_STAGES=4) if M >= 4 else \
            dict(B_DOT=0, B_BN=2, B_BK=256, B_WARPS=8, B_STAGES=4)
    else:
        b = dict(B_DOT=1, B_BN=32, B_BK=256, B_WARPS=4, B_STAGES=4)
    return {**a, **b}


def prefill_config(S: object, H: int, I: int, E: int) -> dict:
    """Tile sizes for the grouped GEMMs by shape class (no autotuning).

    BLOCK_M from `_tile_rows` (the same rule picks the benchmark class in `gate_classes`).
    """
    bm = _tile_rows(S, E)
    big = bm >= 64
    # 4 warps at every BM: the H200 sweep (tune_moe_decode.py --prefill) had 8 warps 7% slower at BM=128
    cfg = dict(BM=bm, BN1=64, BK1=64, BN2=128 if big else 64, BK2=64, WARPS=4, STAGES=3)
    cfg.update(TILED_TUNED.get(bm, {}))
    return cfg


# Measured tiles by BLOCK_M (benchmarks/tune_moe_decode.py --prefill); WARPS2/STAGES2 (the down GEMM's
# warps and stages) default to WARPS/STAGES. BM=16 is the decode-sized tiled class (a few pairs per
# expert, e.g. Qwen3-30B-A3B at 8 tokens), bound by streaming the selected experts' weights.
TILED_TUNED: dict[int, dict[str, int]] = {
    # geomean-best over Qwen3-30B-A3B and Mixtral-8x7B at 8 tokens (H200, tune_moe_decode.py --small):
    # Qwen 142.9 -> 130.0 us, Mixtral 695.4 -> ~663 us (best Mixtral-only tiles: 640 us)
    16: dict(BN1=32, BK1=128, STAGES=5, BN2=64, BK2=128, WARPS2=4, STAGES2=3),
}


def selected_weight_bytes(ids: torch.Tensor, E: int, H: int, I: int, elem: int = 2) -> int:
    """Bytes of the distinct selected experts' weights (gate_up + down): the streaming floor."""
    n = int(torch.unique(ids.reshape(-1)).numel())
    return n * 3 * H * I * elem


# ----------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------


@triton.jit
def _silu_mul(g, u, ACT: tl.constexpr, NATIVE: tl.constexpr):
    """round(round(silu(round(g))) * round(u)) in fp32, as eager computes it in the act dtype."""
    g = round_to(g, ACT, NATIVE)
    u = round_to(u, ACT, NATIVE)
    s = round_to(g / (1.0 + tl.exp(-g)), ACT, NATIVE)
    return round_to(s * u, ACT, NATIVE)


@triton.jit
def _gate_up_acc(a_ptrs, rmask, bg_ptrs, bu_ptrs, mask_n, H, stride_w1k,
                 ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NATIVE: tl.constexpr):
    """Gate and up accumulators [ROWS, BLOCK_N] (fp32) of x rows (`rmask`) times an expert's w1 tiles
    over H. The weight loads feed ``tl.dot``, so the pipeliner keeps ``num_stages`` tiles in flight;
    shared by the decode (one real row of 16) and the grouped (BLOCK_M rows) kernels."""
    offs_k = tl.arange(0, BLOCK_K)
    acc_g = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        mk = offs_k < H - k0
        a = tl.load(a_ptrs, mask=rmask[:, None] & mk[None, :], other=0.0)
        bg = tl.load(bg_ptrs, mask=mk[:, None] & mask_n[None, :], other=0.0)
        bu = tl.load(bu_ptrs, mask=mk[:, None] & mask_n[None, :], other=0.0)
        if not NATIVE:  # the interpreter's bf16 dot is wrong; fp32 inputs are exact here
            a = a.to(tl.float32)
            bg = bg.to(tl.float32)
            bu = bu.to(tl.float32)
        acc_g = tl.dot(a, bg, acc_g)
        acc_u = tl.dot(a, bu, acc_u)
        a_ptrs += BLOCK_K
        bg_ptrs += BLOCK_K * stride_w1k
        bu_ptrs += BLOCK_K * stride_w1k
    return acc_g, acc_u


@triton.jit
def _pair_expert(ids_ptr, tok, slot, stride_idm, stride_idk, E):
    """(expert, valid) of a decode program's (token, slot) pair: an id outside [0, E) is clamped to 0
    (loads stay in bounds) and marked invalid (its output is zero).

    The kernels take pair = program_id(0) and its token themselves: a value a helper returns is, to
    Inductor's mutation analysis of user kernels, derived from every argument of the call, so a
    store address built from it would mark the ids (or router logits) as written: cloned copies."""
    e = tl.load(ids_ptr + tok * stride_idm + slot * stride_idk).to(tl.int64)
    valid = (e >= 0) & (e < E)
    return tl.where(valid, e, 0), valid


@triton.jit
def _routed_pair_expert(logits_ptr, bias_ptr, tw_ptr, ids_ptr, tok, slot, stride_l, fill, renorm_eps, scale,
                        E: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, SCORING: tl.constexpr,
                        SCORE_DT: tl.constexpr, BIASED_DT: tl.constexpr, VALUE_DT: tl.constexpr, OUT_DT: tl.constexpr,
                        HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                        GROUP_SCORE: tl.constexpr, G_PAD: tl.constexpr, GS: tl.constexpr, GS_PAD: tl.constexpr,
                        RENORM: tl.constexpr, HAS_EPS: tl.constexpr, HAS_SCALE: tl.constexpr,
                        GATHER_W: tl.constexpr, FILL_NINF: tl.constexpr, NATIVE: tl.constexpr):
    """`_pair_expert` of a routed decode program: the program routes its token itself (`route_row`,
    the routing kernel's math, redundantly per program: one row of logits) and takes its slot's
    expert. The programs of slot 0 and N-block 0 write the token's k (weights, ids) for kernel B."""
    vals, ids = route_row(
        logits_ptr + tok.to(tl.int64) * stride_l, bias_ptr, logits_ptr, fill, renorm_eps, scale,
        E, K, K_PAD, SCORING, SCORE_DT, BIASED_DT, VALUE_DT, OUT_DT, HAS_BIAS, N_GROUP, TOPK_GROUP, GROUP_SCORE,
        G_PAD, GS, GS_PAD, RENORM, HAS_EPS, HAS_SCALE, GATHER_W, FILL_NINF, NATIVE, False,
    )
    kr = tl.arange(0, K_PAD)
    first = kr + (slot + tl.program_id(1)) * K_PAD < K  # kr < K on slot 0 of N-block 0, else none
    tl.store(tw_ptr + tok.to(tl.int64) * K + kr, vals.to(tw_ptr.dtype.element_ty), mask=first)
    tl.store(ids_ptr + tok.to(tl.int64) * K + kr, ids, mask=first)
    e = tl.sum(tl.where(kr == slot, ids, 0), axis=0)
    valid = (e >= 0) & (e < E)  # always, but for NaN logits (unsupported): then no load goes astray
    return tl.where(valid, e, 0), valid


@triton.jit
def _gate_up_vec(x_ptr, w1_ptr, h_ptr, pair, tok, e, valid,
                 stride_xm, stride_w1e, stride_w1k, stride_w1n, stride_hm, H, I,
                 ACT: tl.constexpr, NATIVE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Kernel A's vector form for one (pair, N-block): gate and up rows of expert e times x[tok]."""
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < I
    acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
    wg_base = w1_ptr + e * stride_w1e + offs_n[:, None].to(tl.int64) * stride_w1n
    wu_base = wg_base + I * stride_w1n
    x_row = x_ptr + tok.to(tl.int64) * stride_xm
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < H
        xk = tl.load(x_row + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        m2 = mask_n[:, None] & mask_k[None, :]
        kk = offs_k[None, :] * stride_w1k
        wg = tl.load(wg_base + kk, mask=m2, other=0.0).to(tl.float32)
        wu = tl.load(wu_base + kk, mask=m2, other=0.0).to(tl.float32)
        acc_g += tl.sum(wg * xk[None, :], axis=1)
        acc_u += tl.sum(wu * xk[None, :], axis=1)
    h = _silu_mul(acc_g, acc_u, ACT, NATIVE)
    h = tl.where(valid, h, 0.0)
    tl.store(h_ptr + pair.to(tl.int64) * stride_hm + offs_n, h.to(h_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _gate_up_dot(x_ptr, w1_ptr, h_ptr, pair, tok, e, valid,
                 stride_xm, stride_w1e, stride_w1k, stride_w1n, stride_hm, H, I,
                 ACT: tl.constexpr, NATIVE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Kernel A's 16-row ``tl.dot`` form for one (pair, N-block) (row 0 is x[tok], the rest masked
    to zero).

    Same arithmetic as the vector form (fp32 accumulation of one row), but the weight loads feed a
    dot, so Triton's software pipeliner keeps ``num_stages`` tiles in flight per program: a decode
    step is bound by how many weight bytes are in flight, not by FLOPs (15 wasted rows are free).
    """
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < I
    r = tl.arange(0, 16)
    first = r == 0
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok.to(tl.int64) * stride_xm + r[:, None] * 0 + offs_k[None, :]
    bg_ptrs = w1_ptr + e * stride_w1e + offs_k[:, None] * stride_w1k + offs_n[None, :].to(tl.int64) * stride_w1n
    acc_g, acc_u = _gate_up_acc(a_ptrs, first, bg_ptrs, bg_ptrs + I * stride_w1n, mask_n, H, stride_w1k,
                                16, BLOCK_N, BLOCK_K, NATIVE)
    h = _silu_mul(acc_g, acc_u, ACT, NATIVE)
    h = tl.where(valid, h, 0.0)
    h_ptrs = h_ptr + pair.to(tl.int64) * stride_hm + r[:, None] * 0 + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=first[:, None] & mask_n[None, :])


@triton.jit
def _moe_decode_gate_up_kernel(
    x_ptr, ids_ptr, w1_ptr, h_ptr,
    stride_xm, stride_idm, stride_idk, stride_w1e, stride_w1k, stride_w1n, stride_hm,
    E, H, I,
    K_TOP: tl.constexpr, ACT: tl.constexpr, NATIVE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program per (pair, N-block): gate and up rows of expert ids[pair] times x[token]."""
    pair = tl.program_id(0)
    tok = pair // K_TOP
    e, valid = _pair_expert(ids_ptr, tok, pair % K_TOP, stride_idm, stride_idk, E)
    _gate_up_vec(x_ptr, w1_ptr, h_ptr, pair, tok, e, valid, stride_xm, stride_w1e, stride_w1k, stride_w1n,
                 stride_hm, H, I, ACT, NATIVE, BLOCK_N, BLOCK_K)


@triton.jit
def _moe_decode_gate_up_dot_kernel(
    x_ptr, ids_ptr, w1_ptr, h_ptr,
    stride_xm, stride_idm, stride_idk, stride_w1e, stride_w1k, stride_w1n, stride_hm,
    E, H, I,
    K_TOP: tl.constexpr, ACT: tl.constexpr, NATIVE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Kernel A as a 16-row ``tl.dot`` (`_gate_up_dot`) of expert ids[pair]."""
    pair = tl.program_id(0)
    tok = pair // K_TOP
    e, valid = _pair_expert(ids_ptr, tok, pair % K_TOP, stride_idm, stride_idk, E)
    _gate_up_dot(x_ptr, w1_ptr, h_ptr, pair, tok, e, valid, stride_xm, stride_w1e, stride_w1k, stride_w1n,
                 stride_hm, H, I, ACT, NATIVE, BLOCK_N, BLOCK_K)


@triton.jit
def _moe_decode_routed_gate_up_kernel(
    x_ptr, logits_ptr, bias_ptr, tw_ptr, ids_ptr, w1_ptr, h_ptr,
    stride_xm, stride_l, stride_w1e, stride_w1k, stride_w1n, stride_hm,
    H, I, fill, renorm_eps, scale,
    E: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, SCORING: tl.constexpr,
    SCORE_DT: tl.constexpr, BIASED_DT: tl.constexpr, VALUE_DT: tl.constexpr, OUT_DT: tl.constexpr,
    HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_SCORE: tl.constexpr,
    G_PAD: tl.constexpr, GS: tl.constexpr, GS_PAD: tl.constexpr,
    RENORM: tl.constexpr, HAS_EPS: tl.constexpr, HAS_SCALE: tl.constexpr,
    GATHER_W: tl.constexpr, FILL_NINF: tl.constexpr, NATIVE: tl.constexpr,
    ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Kernel A (vector form) with the routing folded in: router logits in, the token's top-k
    (weights, ids) out for kernel B (`_routed_pair_expert`); the routing launch is gone."""
    pair = tl.program_id(0)
    tok = pair // K
    e, valid = _routed_pair_expert(
        logits_ptr, bias_ptr, tw_ptr, ids_ptr, tok, pair % K, stride_l, fill, renorm_eps, scale,
        E, K, K_PAD, SCORING, SCORE_DT, BIASED_DT, VALUE_DT, OUT_DT, HAS_BIAS, N_GROUP, TOPK_GROUP, GROUP_SCORE,
        G_PAD, GS, GS_PAD, RENORM, HAS_EPS, HAS_SCALE, GATHER_W, FILL_NINF, NATIVE)
    _gate_up_vec(x_ptr, w1_ptr, h_ptr, pair, tok, e, valid, stride_xm, stride_w1e, stride_w1k, stride_w1n,
                 stride_hm, H, I, ACT, NATIVE, BLOCK_N, BLOCK_K)


@triton.jit
def _moe_decode_routed_gate_up_dot_kernel(
    x_ptr, logits_ptr, bias_ptr, tw_ptr, ids_ptr, w1_ptr, h_ptr,
    stride_xm, stride_l, stride_w1e, stride_w1k, stride_w1n, stride_hm,
    H, I, fill, renorm_eps, scale,
    E: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, SCORING: tl.constexpr,
    SCORE_DT: tl.constexpr, BIASED_DT: tl.constexpr, VALUE_DT: tl.constexpr, OUT_DT: tl.constexpr,
    HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_SCORE: tl.constexpr,
    G_PAD: tl.constexpr, GS: tl.constexpr, GS_PAD: tl.constexpr,
    RENORM: tl.constexpr, HAS_EPS: tl.constexpr, HAS_SCALE: tl.constexpr,
    GATHER_W: tl.constexpr, FILL_NINF: tl.constexpr, NATIVE: tl.constexpr,
    ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Kernel A (dot form) with the routing folded in (see `_moe_decode_routed_gate_up_kernel`)."""
    pair = tl.program_id(0)
    tok = pair // K
    e, valid = _routed_pair_expert(
        logits_ptr, bias_ptr, tw_ptr, ids_ptr, tok, pair % K, stride_l, fill, renorm_eps, scale,
        E, K, K_PAD, SCORING, SCORE_DT, BIASED_DT, VALUE_DT, OUT_DT, HAS_BIAS, N_GROUP, TOPK_GROUP, GROUP_SCORE,
        G_PAD, GS, GS_PAD, RENORM, HAS_EPS, HAS_SCALE, GATHER_W, FILL_NINF, NATIVE)
    _gate_up_dot(x_ptr, w1_ptr, h_ptr, pair, tok, e, valid, stride_xm, stride_w1e, stride_w1k, stride_w1n,
                 stride_hm, H, I, ACT, NATIVE, BLOCK_N, BLOCK_K)


@triton.jit
def _moe_decode_down_kernel(
    h_ptr, ids_ptr, tw_ptr, w2_ptr, out_ptr,
    stride_hm, stride_idm, stride_idk, stride_twm, stride_twk,
    stride_w2e, stride_w2k, stride_w2n, stride_om,
    E, H, I,
    K_TOP: tl.constexpr, K_PAD: tl.constexpr, ACT: tl.constexpr, PROD: tl.constexpr, SUM: tl.constexpr,
    NATIVE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program per (token, H-block): the down rows of all K selected experts in one 3-D tile
    [K, BLOCK_N, BLOCK_K] (every expert's stream in flight at once), weighted, summed over K in a
    fixed order (deterministic)."""
    tok = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < H
    slots = tl.arange(0, K_PAD)
    mask_s = slots < K_TOP
    e = tl.load(ids_ptr + tok * stride_idm + slots * stride_idk, mask=mask_s, other=-1).to(tl.int64)
    valid = mask_s & (e >= 0) & (e < E)
    e = tl.where(valid, e, 0)
    wt = tl.load(tw_ptr + tok * stride_twm + slots * stride_twk, mask=mask_s, other=0.0).to(tl.float32)
    w_base = w2_ptr + e[:, None, None] * stride_w2e + offs_n[None, :, None].to(tl.int64) * stride_w2n
    h_base = h_ptr + (tok * K_TOP + slots)[:, None] * stride_hm
    m_wn = valid[:, None, None] & mask_n[None, :, None]
    acc = tl.zeros([K_PAD, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < I
        hk = tl.load(h_base + offs_k[None, :], mask=valid[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_base + offs_k[None, None, :] * stride_w2k, mask=m_wn & mask_k[None, None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(w * hk[:, None, :], axis=2)
    c = round_to(round_to(acc, ACT, NATIVE) * wt[:, None], PROD, NATIVE)
    out = tl.sum(tl.where(valid[:, None], c, 0.0), axis=0)
    out = round_to(out, SUM, NATIVE)
    tl.store(out_ptr + tok * stride_om + offs_n, out.to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _moe_decode_down_dot_kernel(
    h_ptr, ids_ptr, tw_ptr, w2_ptr, out_ptr,
    stride_hm, stride_idm, stride_idk, stride_twm, stride_twk,
    stride_w2e, stride_w2k, stride_w2n, stride_om,
    E, H, I,
    K_TOP: tl.constexpr, K_PAD: tl.constexpr, ACT: tl.constexpr, PROD: tl.constexpr, SUM: tl.constexpr,
    NATIVE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Kernel B as 16-row ``tl.dot`` products (row 0 real), one pipelined I-loop per slot; slots
    are combined in slot order in fp32 (deterministic)."""
    tok = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < H
    r = tl.arange(0, 16)
    first = r == 0
    offs_k = tl.arange(0, BLOCK_K)
    out = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(K_TOP):
        e = tl.load(ids_ptr + tok * stride_idm + j * stride_idk).to(tl.int64)
        valid = (e >= 0) & (e < E)
        e = tl.where(valid, e, 0)
        wt = tl.load(tw_ptr + tok * stride_twm + j * stride_twk).to(tl.float32)
        a_ptrs = h_ptr + (tok * K_TOP + j) * stride_hm + r[:, None] * 0 + offs_k[None, :]
        b_ptrs = w2_ptr + e * stride_w2e + offs_k[:, None] * stride_w2k + offs_n[None, :].to(tl.int64) * stride_w2n
        acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            mk = offs_k < I - k0
            a = tl.load(a_ptrs, mask=first[:, None] & mk[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=mk[:, None] & mask_n[None, :], other=0.0)  # e clamped: in bounds
            if not NATIVE:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * stride_w2k
        c = round_to(round_to(acc, ACT, NATIVE) * wt, PROD, NATIVE)
        out += tl.where(valid, c, 0.0)
    out = round_to(out, SUM, NATIVE)
    o_ptrs = out_ptr + tok * stride_om + r[:, None] * 0 + offs_n[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=first[:, None] & mask_n[None, :])


@triton.jit
def _moe_gemm1_kernel(
    x_ptr, w1_ptr, h_ptr, sorted_ptr, block_e_ptr, npad_ptr,
    stride_xm, stride_w1e, stride_w1k, stride_w1n, stride_hm,
    S, H, I,
    K_TOP: tl.constexpr, ACT: tl.constexpr, NATIVE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Tile of BLOCK_M pairs of one expert x BLOCK_N of I: gate and up accumulators, SiLU-mul epilogue."""
    pid_m = tl.program_id(0)
    npad = tl.load(npad_ptr)
    if pid_m * BLOCK_M >= npad:
        return
    e = tl.load(block_e_ptr + pid_m).to(tl.int64)
    rows = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < S
    tok = tl.where(rmask, rows // K_TOP, 0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :]
    bg_ptrs = w1_ptr + e * stride_w1e + offs_k[:, None] * stride_w1k + offs_n[None, :].to(tl.int64) * stride_w1n
    acc_g, acc_u = _gate_up_acc(a_ptrs, rmask, bg_ptrs, bg_ptrs + I * stride_w1n, mask_n, H, stride_w1k,
                                BLOCK_M, BLOCK_N, BLOCK_K, NATIVE)
    h = _silu_mul(acc_g, acc_u, ACT, NATIVE)
    tl.store(h_ptr + rows[:, None] * stride_hm + offs_n[None, :], h.to(h_ptr.dtype.element_ty),
             mask=rmask[:, None] & mask_n[None, :])


@triton.jit
def _moe_gemm2_kernel(
    h_ptr, w2_ptr, tw_ptr, p_ptr, sorted_ptr, block_e_ptr, npad_ptr,
    stride_hm, stride_w2e, stride_w2k, stride_w2n, stride_pm,
    S, H, I,
    ACT: tl.constexpr, PROD: tl.constexpr, NATIVE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Tile of BLOCK_M pairs x BLOCK_N of H: down GEMM, times the routing weight -> per-pair rows."""
    pid_m = tl.program_id(0)
    npad = tl.load(npad_ptr)
    if pid_m * BLOCK_M >= npad:
        return
    e = tl.load(block_e_ptr + pid_m).to(tl.int64)
    rows = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < S
    rows_c = tl.where(rmask, rows, 0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + rows_c[:, None] * stride_hm + offs_k[None, :]
    b_ptrs = w2_ptr + e * stride_w2e + offs_k[:, None] * stride_w2k + offs_n[None, :].to(tl.int64) * stride_w2n
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        mk = offs_k < I - k0
        a = tl.load(a_ptrs, mask=rmask[:, None] & mk[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mk[:, None] & mask_n[None, :], other=0.0)
        if not NATIVE:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_w2k
    wt = tl.load(tw_ptr + rows_c, mask=rmask, other=0.0).to(tl.float32)
    c = round_to(round_to(acc, ACT, NATIVE) * wt[:, None], PROD, NATIVE)
    tl.store(p_ptr + rows_c[:, None] * stride_pm + offs_n[None, :], c.to(p_ptr.dtype.element_ty),
             mask=rmask[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------
# Align (torch ops on the device, static upper bounds, no host sync)
# ----------------------------------------------------------------------------


def _align(ids_flat: torch.Tensor, E: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, object]:
    """Sort pairs by expert into BLOCK_M-padded tiles.

    Returns (sorted pair ids [P + 1] with S as padding, expert of each tile [P/BM], padded count [1],
    number of tiles), P = round_up(S + E*(BM-1), BM) a static bound.  Pairs with an id outside
    [0, E) are dropped (they contribute zero).
    """
    S = ids_flat.shape[0]
    dev = ids_flat.device
    ids = ids_flat.to(torch.int64)
    valid = (ids >= 0) & (ids < E)
    eid = torch.where(valid, ids, E)
    counts = torch.zeros(E + 1, dtype=torch.int64, device=dev).scatter_add(0, eid, torch.ones_like(eid))
    padded = (counts + (block_m - 1)) // block_m * block_m
    padded = torch.where(torch.arange(E + 1, device=dev) < E, padded, 0)  # dropped pairs get no tiles
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    cnt_start = torch.cumsum(counts, 0) - counts
    sorted_e, perm = torch.sort(eid, stable=True)
    rank = torch.arange(S, device=dev, dtype=torch.int64) - cnt_start.gather(0, sorted_e)
    n_tiles = (S + E * (block_m - 1) + block_m - 1) // block_m
    P = n_tiles * block_m
    dest = torch.where(sorted_e < E, pad_start.gather(0, sorted_e) + rank, P)
    sorted_ids = torch.full((P + 1,), S, dtype=torch.int32, device=dev)
    sorted_ids = sorted_ids.scatter(0, dest, perm.to(torch.int32))  # [P + 1]: last slot is the trash bin
    starts = torch.arange(n_tiles, device=dev, dtype=torch.int64) * block_m
    block_e = torch.searchsorted(pad_end, starts, right=True).clamp(max=E - 1).to(torch.int32)
    npad = pad_end.narrow(0, E, 1).to(torch.int32)  # pad_end[E] == pad_end[E-1]: no tiles for dropped pairs
    return sorted_ids, block_e, npad, n_tiles


ALIGN_MAX_BINS = 4096  # experts + 1 a Triton align histogram holds; more take the torch-op align
ALIGN_ONE_LAUNCH = 1024  # static pair counts up to one histogram chunk: align and scatter in one launch


@triton.jit
def _moe_align_kernel(
    ids_ptr, sorted_ptr, block_e_ptr, npad_ptr, cursor_ptr,
    S, E, P, NT,
    BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr,
    SCATTER: tl.constexpr = False, FILL: tl.constexpr = 1024,
):
    """One program: per-expert counts (histogram), BLOCK_M-padded offsets (cumsum), each tile's
    expert, the padded count, the padding fill of the sorted ids, and a per-expert write cursor.

    SCATTER (all pairs in one BLOCK_S chunk, decode-sized batches): the program also places the
    pairs (the `_moe_scatter_kernel` step) after a barrier, saving a launch and its gap."""
    bins = tl.arange(0, E_PAD)
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for s0 in range(0, S, BLOCK_S):
        offs = s0 + tl.arange(0, BLOCK_S)
        m = offs < S
        e = tl.load(ids_ptr + offs, mask=m, other=-1)
        e = tl.where(m & (e >= 0) & (e < E), e, E).to(tl.int32)  # dropped pairs and lanes: bin E
        counts += tl.histogram(e, E_PAD)
    real = bins < E
    padded = tl.where(real, (counts + (BLOCK_M - 1)) // BLOCK_M * BLOCK_M, 0)
    pad_end = tl.cumsum(padded, 0)
    tl.store(cursor_ptr + bins, pad_end - padded)
    tl.store(npad_ptr, tl.sum(padded, 0))
    for t0 in range(0, NT, BLOCK_T):  # tile t's expert: searchsorted(pad_end, t * BLOCK_M, right)
        t = t0 + tl.arange(0, BLOCK_T)
        below = (pad_end[None, :] <= (t * BLOCK_M)[:, None]) & real[None, :]
        tl.store(block_e_ptr + t, tl.minimum(tl.sum(below.to(tl.int32), axis=1), E - 1), mask=t < NT)
    for p0 in range(0, P + 1, FILL):  # padding rows point at pair S (the kernels mask it)
        p = p0 + tl.arange(0, FILL)
        tl.store(sorted_ptr + p, tl.zeros([FILL], dtype=tl.int32) + S, mask=p <= P)
    if SCATTER:
        tl.debug_barrier()  # the cursor and the padding fill are in memory before pairs take rows
        offs = tl.arange(0, BLOCK_S)
        m = offs < S
        e = tl.load(ids_ptr + offs, mask=m, other=-1)
        valid = m & (e >= 0) & (e < E)
        slot = tl.atomic_add(cursor_ptr + tl.where(valid, e, 0), 1, mask=valid)
        tl.store(sorted_ptr + slot, offs.to(tl.int32), mask=valid)


@triton.jit
def _moe_scatter_kernel(ids_ptr, sorted_ptr, cursor_ptr, S, E, BLOCK: tl.constexpr):
    """Each valid pair takes the next row of its expert's padded range (atomic cursor). The order
    within an expert is not fixed, which changes nothing: every output row of the grouped GEMMs
    depends on its own pair only, and pairs are summed per token in slot order."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < S
    e = tl.load(ids_ptr + offs, mask=m, other=-1)
    valid = m & (e >= 0) & (e < E)
    slot = tl.atomic_add(cursor_ptr + tl.where(valid, e, 0), 1, mask=valid)
    tl.store(sorted_ptr + slot, offs.to(tl.int32), mask=valid)


def aligns_equivalent(a: tuple, b: tuple) -> bool:
    """Two align results tile alike: same padded count, tile count and tile experts, and each
    expert's padded range holds the same pairs (an atomic scatter may order them differently)."""
    (sa, ea, na, ta), (sb, eb, nb, tb) = a, b
    n = int(na.item())
    if n != int(nb.item()) or ta != tb:
        return False
    bm = (sa.numel() - 1) // ta
    if not torch.equal(ea[: n // bm].cpu(), eb[: n // bm].cpu()):
        return False
    per_a: dict[int, list[int]] = {}
    per_b: dict[int, list[int]] = {}
    for e, x, y in zip(ea[: n // bm].repeat_interleave(bm).tolist(), sa[:n].tolist(), sb[:n].tolist()):
        per_a.setdefault(e, []).append(x)
        per_b.setdefault(e, []).append(y)
    return all(sorted(v) == sorted(per_b.get(e, [])) for e, v in per_a.items())


def align_config(S: object, E: int) -> dict:
    """Histogram chunk, tiles per searchsorted step and warps of the align program (pure Python on
    static shapes; a symbolic pair count takes the full 1024-lane chunk)."""
    e_pad = triton.next_power_of_2(E + 1)
    block_s = 1024 if not isinstance(S, int) else max(16, min(1024, triton.next_power_of_2(S)))
    # 2 warps for decode-sized counts: 6.5 -> 5.7 us at 64 pairs over 128 experts (H200, tune_moe_align.py)
    return dict(BLOCK_S=block_s, BLOCK_T=max(1, min(64, 16384 // e_pad)), WARPS=2 if block_s <= 128 else 4)


ALIGN_OVERRIDE: dict[str, int] = {}  # sweeps (benchmarks/tune_moe_align.py): applied over align_config


def _align_triton(wrap, ids_flat: torch.Tensor, E: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor, object]:
    """`_align` in one or two launches (vs a dozen torch kernels): same tiles, experts and padded
    count; pairs of one expert may sit in another order inside its range."""
    S = ids_flat.shape[0]
    dev = ids_flat.device
    n_tiles = (S + E * (block_m - 1) + block_m - 1) // block_m
    P = n_tiles * block_m
    e_pad = triton.next_power_of_2(E + 1)
    sorted_ids = torch.empty((P + 1,), dtype=torch.int32, device=dev)
    block_e = torch.empty((n_tiles,), dtype=torch.int32, device=dev)
    npad = torch.empty((1,), dtype=torch.int32, device=dev)
    cursor = torch.empty((e_pad,), dtype=torch.int32, device=dev)
    one = isinstance(S, int) and S <= ALIGN_ONE_LAUNCH  # static and small: scatter in the same program
    c = {**align_config(S, E), **ALIGN_OVERRIDE}
    if one and c["BLOCK_S"] < S:  # the one-launch scatter covers the pairs in one chunk
        c["BLOCK_S"] = triton.next_power_of_2(S)
    wrap(_moe_align_kernel)[(1,)](
        ids_flat, sorted_ids, block_e, npad, cursor, S, E, P, n_tiles,
        BLOCK_M=block_m, E_PAD=e_pad, BLOCK_S=c["BLOCK_S"], BLOCK_T=c["BLOCK_T"], SCATTER=one, FILL=1024,
        num_warps=c["WARPS"],  # every argument explicit: Inductor's traced launch passes no defaults
    )
    if not one:
        wrap(_moe_scatter_kernel)[(triton.cdiv(S, 256),)](ids_flat, sorted_ids, cursor, S, E, BLOCK=256,
                                                           num_warps=4)
    return sorted_ids, block_e, npad, n_tiles


@triton.jit
def _moe_combine_kernel(pair_ptr, ids_ptr, out_ptr, stride_p, stride_im, stride_ik, stride_o, E, H,
                        K_TOP: tl.constexpr, SUM: tl.constexpr, OUT: tl.constexpr, NATIVE: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """out[m] = sum over the token's K slots, in slot order, of its weighted expert outputs (fp32;
    dropped ids add 0), rounded to the sum dtype: `where(valid, pair_out, 0).sum(1, fp32)`, one
    launch reading each pair row once (Inductor's reduction over the middle dim ran at ~0.2 TB/s)."""
    m = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = n < H
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k in tl.static_range(K_TOP):
        e = tl.load(ids_ptr + m * stride_im + k * stride_ik)
        ok = (e >= 0) & (e < E)
        v = tl.load(pair_ptr + (m * K_TOP + k) * stride_p + n, mask=nm, other=0.0).to(tl.float32)
        acc += tl.where(ok, v, 0.0)  # a dropped pair's row was never written (any bits, NaN too)
    acc = round_to(round_to(acc, SUM, NATIVE), OUT, NATIVE)  # RNE under the interpreter too
    tl.store(out_ptr + m * stride_o + n, acc.to(out_ptr.dtype.element_ty), mask=nm)


# Declared accesses (fxfuse.kernels.accesses). Inductor's analysis maps a value a @jit helper returns
# to every argument of that call: the routed kernels' expert id comes from `_routed_pair_expert`, which
# takes the router logits, bias and the top-k outputs, so the w1 loads it addresses count as reads of all four.
for _k in (_moe_decode_gate_up_kernel, _moe_decode_gate_up_dot_kernel):
    declare(_k)(lambda a: accesses(("x_ptr", "ids_ptr", "w1_ptr"), ("h_ptr",), one_store=True))
for _k in (_moe_decode_routed_gate_up_kernel, _moe_decode_routed_gate_up_dot_kernel):
    declare(_k)(lambda a: accesses(("x_ptr", "logits_ptr", "bias_ptr", "tw_ptr", "ids_ptr", "w1_ptr"),
                                   ("tw_ptr", "ids_ptr", "h_ptr")))
for _k in (_moe_decode_down_kernel, _moe_decode_down_dot_kernel):
    declare(_k)(lambda a: accesses(("h_ptr", "ids_ptr", "tw_ptr", "w2_ptr"), ("out_ptr",), one_store=True))
declare(_moe_gemm1_kernel)(lambda a: accesses(("x_ptr", "w1_ptr", "sorted_ptr", "block_e_ptr", "npad_ptr"),
                                              ("h_ptr",), one_store=True))
declare(_moe_gemm2_kernel)(lambda a: accesses(("h_ptr", "w2_ptr", "tw_ptr", "sorted_ptr", "block_e_ptr", "npad_ptr"),
                                              ("p_ptr",), one_store=True))
declare(_moe_align_kernel)(lambda a: accesses(("ids_ptr",), ("sorted_ptr", "block_e_ptr", "npad_ptr", "cursor_ptr")))
declare(_moe_scatter_kernel)(lambda a: accesses(("ids_ptr",), ("sorted_ptr", "cursor_ptr")))
declare(_moe_combine_kernel)(lambda a: accesses(("pair_ptr", "ids_ptr"), ("out_ptr",), one_store=True))

# ----------------------------------------------------------------------------
# Launch (shared by the triton_op body and the plain launcher)
# ----------------------------------------------------------------------------


def _native() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") != "1"


def _launch(
    wrap,
    x: torch.Tensor,
    topk_w: torch.Tensor,
    topk_ids: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    prod_dtype: torch.dtype,
    sum_dtype: torch.dtype,
    out_dtype: torch.dtype,
    path: int,
    out: Optional[torch.Tensor] = None,
    config: Optional[dict] = None,
    route: Optional[dict] = None,
) -> torch.Tensor:
    """`route` (decode path only): kernel A routes each token itself from route["logits"] (see
    `_launch_routed`) and writes `topk_w` and `topk_ids`, which are then its output buffers."""
    M, H = x.shape
    K = topk_ids.shape[1]
    E = w1.shape[0]
    I = w2.shape[1]
    S = M * K
    if x.stride(1) != 1:
        x = x.contiguous()
    act, prod, sm = _DT_CODE[x.dtype], _DT_CODE[prod_dtype], _DT_CODE[sum_dtype]
    native = _native()
    if isinstance(M, int) and M == 0:  # nothing to launch (a zero-size grid is an error)
        res = torch.zeros((0, H), dtype=out_dtype, device=x.device)
        return out if out is not None else res
    if path == PATH_AUTO:
        path = choose_path(M, K, E)
    if route is not None and path != PATH_DECODE:
        raise ValueError("moe_experts: the routing folds into the decode path only")
    if path == PATH_DECODE:
        c = {**decode_config(H, I, K, M if isinstance(M, int) else 1), **(config or {})}
        h = torch.empty((S, I), dtype=x.dtype, device=x.device)
        if out is None:
            out = torch.empty((M, H), dtype=out_dtype, device=x.device)
        extra_a = {"num_stages": c["A_STAGES"]} if native and c.get("A_DOT") else {}
        grid_a = (S, triton.cdiv(I, c["A_BN"]))
        if route is not None:
            kern_a = _moe_decode_routed_gate_up_dot_kernel if c.get("A_DOT") else _moe_decode_routed_gate_up_kernel
            logits, bias = route["logits"], route["bias"]
            wrap(kern_a)[grid_a](
                x, logits, bias if bias is not None else logits, topk_w, topk_ids, w1, h,
                x.stride(0), logits.stride(0), w1.stride(0), w1.stride(1), w1.stride(2), h.stride(0),
                H, I, *route["scalars"],
                **route["meta"], ACT=act, BLOCK_N=c["A_BN"], BLOCK_K=c["A_BK"], num_warps=c["A_WARPS"], **extra_a,
            )
        else:
            kern_a = _moe_decode_gate_up_dot_kernel if c.get("A_DOT") else _moe_decode_gate_up_kernel
            wrap(kern_a)[grid_a](
                x, topk_ids, w1, h,
                x.stride(0), topk_ids.stride(0), topk_ids.stride(1), w1.stride(0), w1.stride(1), w1.stride(2),
                h.stride(0),
                E, H, I,
                K_TOP=K, ACT=act, NATIVE=native, BLOCK_N=c["A_BN"], BLOCK_K=c["A_BK"], num_warps=c["A_WARPS"],
                **extra_a,
            )
        kern_b = _moe_decode_down_dot_kernel if c.get("B_DOT") else _moe_decode_down_kernel
        extra_b = {"num_stages": c["B_STAGES"]} if native and c.get("B_DOT") else {}
        wrap(kern_b)[(M, triton.cdiv(H, c["B_BN"]))](
            h, topk_ids, topk_w, w2, out,
            h.stride(0), topk_ids.stride(0), topk_ids.stride(1), topk_w.stride(0), topk_w.stride(1),
            w2.stride(0), w2.stride(1), w2.stride(2), out.stride(0),
            E, H, I,
            K_TOP=K, K_PAD=triton.next_power_of_2(K), ACT=act, PROD=prod, SUM=sm, NATIVE=native,
            BLOCK_N=c["B_BN"], BLOCK_K=c["B_BK"], num_warps=c["B_WARPS"], **extra_b,
        )
        return out
    c = {**prefill_config(S, H, I, E), **(config or {})}
    bm = c["BM"]
    ids_flat = topk_ids.reshape(-1)
    if ids_flat.stride(0) != 1:  # a strided view of the ids: the align kernels read them densely
        ids_flat = ids_flat.contiguous()
    if E + 1 <= ALIGN_MAX_BINS:
        sorted_ids, block_e, npad, n_tiles = _align_triton(wrap, ids_flat, E, bm)
    else:
        sorted_ids, block_e, npad, n_tiles = _align(ids_flat, E, bm)
    tw = topk_w.reshape(-1)
    if tw.stride(0) != 1:
        tw = tw.contiguous()
    h = torch.empty((S, I), dtype=x.dtype, device=x.device)
    # per-pair products are already rounded to prod_dtype: storing them in it is lossless
    pair_out = torch.empty((S, H), dtype=prod_dtype, device=x.device)
    extra = {} if not native else {"num_stages": c["STAGES"]}
    extra2 = {} if not native else {"num_stages": c.get("STAGES2", c["STAGES"])}
    wrap(_moe_gemm1_kernel)[(n_tiles, triton.cdiv(I, c["BN1"]))](
        x, w1, h, sorted_ids, block_e, npad,
        x.stride(0), w1.stride(0), w1.stride(1), w1.stride(2), h.stride(0),
        S, H, I,
        K_TOP=K, ACT=act, NATIVE=native, BLOCK_M=bm, BLOCK_N=c["BN1"], BLOCK_K=c["BK1"],
        num_warps=c["WARPS"], **extra,
    )
    wrap(_moe_gemm2_kernel)[(n_tiles, triton.cdiv(H, c["BN2"]))](
        h, w2, tw, pair_out, sorted_ids, block_e, npad,
        h.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), pair_out.stride(0),
        S, H, I,
        ACT=act, PROD=prod, NATIVE=native, BLOCK_M=bm, BLOCK_N=c["BN2"], BLOCK_K=c["BK2"],
        num_warps=c.get("WARPS2", c["WARPS"]), **extra2,
    )
    if out is None:
        out = torch.empty((M, H), dtype=out_dtype, device=x.device)
    bn = min(1024, triton.next_power_of_2(H))
    wrap(_moe_combine_kernel)[(M, triton.cdiv(H, bn))](
        pair_out, topk_ids, out, pair_out.stride(0), topk_ids.stride(0), topk_ids.stride(1), out.stride(0), E, H,
        K_TOP=K, SUM=sm, OUT=_DT_CODE[out_dtype], NATIVE=native, BLOCK_N=bn, num_warps=4,
    )
    return out


# ----------------------------------------------------------------------------
# Custom op
# ----------------------------------------------------------------------------


@triton_op("fxfuse::moe_experts", mutates_args=())
def moe_experts(
    x: torch.Tensor,
    topk_w: torch.Tensor,
    topk_ids: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    prod_dtype: torch.dtype,
    sum_dtype: torch.dtype,
    out_dtype: torch.dtype,
    path: int = PATH_AUTO,
) -> torch.Tensor:
    """Fused MoE experts -> combined output [M, H]. Body doubles as the fake impl."""
    if x.device.type == "cpu":
        return _moe_experts_cpu(x, topk_w, topk_ids, w1, w2, prod_dtype, sum_dtype, out_dtype, path)
    check_args(x, topk_w, topk_ids, w1, w2)
    return _launch(wrap_triton, x, topk_w, topk_ids, w1, w2, prod_dtype, sum_dtype, out_dtype, path)


def moe_experts_reference(
    x: torch.Tensor,
    topk_w: torch.Tensor,
    topk_ids: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    prod_dtype: torch.dtype,
    sum_dtype: torch.dtype,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Dense loop over all experts with masks (no nonzero: traces under fake tensors)."""
    M, H = x.shape
    K = topk_ids.shape[1]
    E = w1.shape[0]
    I = w2.shape[1]
    act = x.dtype
    acc = torch.zeros((M, K, H), dtype=torch.float32, device=x.device)
    wt = topk_w.float()
    for e in range(E):
        gu = (x.float() @ w1[e].float()).to(act)
        g, u = gu[:, :I], gu[:, I:]
        hh = (torch.nn.functional.silu(g.float()).to(act).float() * u.float()).to(act)
        y = (hh.float() @ w2[e].float()).to(act)
        c = (y.float().unsqueeze(1) * wt.unsqueeze(-1)).to(prod_dtype).float()  # [M, K, H]
        acc = torch.where((topk_ids == e).unsqueeze(-1), c, acc)
    return acc.sum(1).to(sum_dtype).to(out_dtype)


def _moe_experts_cpu(
    x: torch.Tensor,
    topk_w: torch.Tensor,
    topk_ids: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    prod_dtype: torch.dtype,
    sum_dtype: torch.dtype,
    out_dtype: torch.dtype,
    path: int = PATH_AUTO,
) -> torch.Tensor:
    """CPU has no Triton: run the reference (fresh, non-aliasing output)."""
    return moe_experts_reference(x, topk_w, topk_ids, w1, w2, prod_dtype, sum_dtype, out_dtype).contiguous()


moe_experts.register_kernel("cpu")(_moe_experts_cpu)


def moe_experts_triton(
    x: torch.Tensor,
    topk_w: torch.Tensor,
    topk_ids: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    prod_dtype: Optional[torch.dtype] = None,
    sum_dtype: Optional[torch.dtype] = None,
    out_dtype: Optional[torch.dtype] = None,
    *,
    path: int = PATH_AUTO,
    out: Optional[torch.Tensor] = None,
    config: Optional[dict] = None,
) -> torch.Tensor:
    """Launch the raw kernels (no dispatcher): eager CUDA, or CPU tensors under TRITON_INTERPRET=1.

    Dtypes default to the transformers semantics: product in promote(x, topk_w), sum and output
    in x.dtype. `out` (poisoned by tests) must be fully written; `config` overrides block sizes
    (benchmark sweeps).
    """
    check_args(x, topk_w, topk_ids, w1, w2)
    prod_dtype = prod_dtype or torch.promote_types(x.dtype, topk_w.dtype)
    sum_dtype = sum_dtype or prod_dtype
    out_dtype = out_dtype or x.dtype
    return _launch(lambda k: k, x, topk_w, topk_ids, w1, w2, prod_dtype, sum_dtype, out_dtype, path, out=out,
                   config=config)


# ----------------------------------------------------------------------------
# Routing folded in: router logits -> combined output (decode: one launch fewer)
# ----------------------------------------------------------------------------


class _Routing(NamedTuple):
    """The routing op's arguments from `k` on (need_scores left out; weights_dtype is its out_dtype)."""

    k: int
    scoring: int
    score_dtype: torch.dtype
    biased_dtype: torch.dtype
    n_group: int
    topk_group: int
    group_score: int
    fill: float
    renormalize: bool
    renorm_eps: float
    scale: float
    value_dtype: torch.dtype
    weights_dtype: torch.dtype
    gather_weights: bool


def _routed_buffers(x: torch.Tensor, k: int, weights_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The token's top-k (weights, ids) as kernel A writes them for kernel B."""
    M = x.shape[0]
    return (torch.empty((M, k), dtype=weights_dtype, device=x.device),
            torch.empty((M, k), dtype=torch.int64, device=x.device))


def _check_routed(x: torch.Tensor, logits: torch.Tensor, bias: Optional[torch.Tensor], r: _Routing,
                  tw: torch.Tensor, ids: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> None:
    _routing.check_args(logits, bias, r.k, r.scoring, r.score_dtype, r.biased_dtype, r.n_group, r.topk_group,
                        r.group_score, r.value_dtype, r.weights_dtype, r.fill)
    check_args(x, tw, ids, w1, w2)
    if logits.shape[0] != x.shape[0] or logits.shape[1] != w1.shape[0]:
        raise ValueError(f"moe_routed_experts: logits {tuple(logits.shape)} are not [tokens, experts] of "
                         f"x{tuple(x.shape)} w1{tuple(w1.shape)}")


def _launch_routed(wrap, x: torch.Tensor, logits: torch.Tensor, bias: Optional[torch.Tensor], r: _Routing,
                   w1: torch.Tensor, w2: torch.Tensor, prod_dtype: torch.dtype, sum_dtype: torch.dtype,
                   out_dtype: torch.dtype, out: Optional[torch.Tensor] = None,
                   routing_out: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                   config: Optional[dict] = None) -> torch.Tensor:
    """Decode: kernel A routes (`_routed_pair_expert`), kernel B as ever: two launches for routing
    and experts. Any other path launches the routing kernel, then the experts' kernels."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    tw, ids = routing_out if routing_out is not None else _routed_buffers(x, r.k, r.weights_dtype)
    if choose_path(x.shape[0], r.k, w1.shape[0]) != PATH_DECODE:
        empty = torch.empty((0,), dtype=r.score_dtype, device=x.device)
        _routing.launch(wrap, logits, bias, *r[:13], False, r.gather_weights, out=(tw, ids, empty))
        return _launch(wrap, x, tw, ids, w1, w2, prod_dtype, sum_dtype, out_dtype, PATH_AUTO, out=out, config=config)
    route = dict(logits=logits, bias=bias, scalars=_routing.row_scalars(r.fill, r.renorm_eps, r.scale),
                 meta=_routing.row_meta(logits, bias, *r))
    return _launch(wrap, x, tw, ids, w1, w2, prod_dtype, sum_dtype, out_dtype, PATH_DECODE, out=out, config=config,
                   route=route)


@triton_op("fxfuse::moe_routed_experts", mutates_args=())
def moe_routed_experts(
    x: torch.Tensor,
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
    weights_dtype: torch.dtype,
    gather_weights: bool,
    w1: torch.Tensor,
    w2: torch.Tensor,
    prod_dtype: torch.dtype,
    sum_dtype: torch.dtype,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``fxfuse::moe_routing`` (its arguments from `k` on, `weights_dtype` its `out_dtype`, no scores)
    then ``fxfuse::moe_experts`` -> combined output [M, H]; at decode the routing runs inside the
    experts' first kernel. Body doubles as the fake impl."""
    routing = _Routing(k, scoring, score_dtype, biased_dtype, n_group, topk_group, group_score, fill, renormalize,
                       renorm_eps, scale, value_dtype, weights_dtype, gather_weights)
    if x.device.type == "cpu":
        return _moe_routed_experts_cpu(x, logits, bias, *routing, w1, w2, prod_dtype, sum_dtype, out_dtype)
    tw, ids = _routed_buffers(x, k, weights_dtype)
    _check_routed(x, logits, bias, routing, tw, ids, w1, w2)
    return _launch_routed(wrap_triton, x, logits, bias, routing, w1, w2, prod_dtype, sum_dtype, out_dtype,
                          routing_out=(tw, ids))


def _moe_routed_experts_cpu(
    x: torch.Tensor,
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
    weights_dtype: torch.dtype,
    gather_weights: bool,
    w1: torch.Tensor,
    w2: torch.Tensor,
    prod_dtype: torch.dtype,
    sum_dtype: torch.dtype,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """CPU has no Triton: the routing reference, then the experts reference (fresh output)."""
    routing = _Routing(k, scoring, score_dtype, biased_dtype, n_group, topk_group, group_score, fill, renormalize,
                       renorm_eps, scale, value_dtype, weights_dtype, gather_weights)
    # the reference's arguments: routing up to weights_dtype (its out_dtype), no scores, gather_weights
    tw, ids, _ = _routing.moe_routing_reference(logits, bias, *routing[:-1], False, gather_weights)
    _check_routed(x, logits, bias, routing, tw, ids, w1, w2)
    return moe_experts_reference(x, tw, ids, w1, w2, prod_dtype, sum_dtype, out_dtype).contiguous()


moe_routed_experts.register_kernel("cpu")(_moe_routed_experts_cpu)


def moe_routed_experts_triton(
    x: torch.Tensor,
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
    weights_dtype: torch.dtype,
    gather_weights: bool,
    w1: torch.Tensor,
    w2: torch.Tensor,
    prod_dtype: torch.dtype,
    sum_dtype: torch.dtype,
    out_dtype: torch.dtype,
    *,
    out: Optional[torch.Tensor] = None,
    routing_out: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    config: Optional[dict] = None,
) -> torch.Tensor:
    """Launch the raw kernels (no dispatcher): eager CUDA, or CPU tensors under TRITON_INTERPRET=1.

    `out` and `routing_out` = (weights [M, k], ids [M, k] int64), the routing as kernel B reads it,
    are caller buffers (tests poison them; both fully written); `config` overrides decode_config."""
    routing = _Routing(k, scoring, score_dtype, biased_dtype, n_group, topk_group, group_score, fill, renormalize,
                       renorm_eps, scale, value_dtype, weights_dtype, gather_weights)
    tw, ids = routing_out if routing_out is not None else _routed_buffers(x, k, weights_dtype)
    _check_routed(x, logits, bias, routing, tw, ids, w1, w2)
    return _launch_routed(lambda kern: kern, x, logits, bias, routing, w1, w2, prod_dtype, sum_dtype, out_dtype,
                          out=out, routing_out=(tw, ids), config=config)
