"""Fused RoPE of q and k (+ optional fp8 quantization of each) as ONE Triton kernel.

This module knows nothing about FX.  It provides:

* :func:`rope_quant_reference` -- pure-torch oracle (also the CPU kernel of the custom op).
* ``torch.ops.fxfuse.rope_quant`` -- a ``torch.library.triton_op`` launching the kernel through
  ``wrap_triton`` (a user-defined Triton kernel in Inductor's output code on CUDA).
* :func:`rope_quant_triton` -- plain launcher (eager CUDA, or CPU tensors under ``TRITON_INTERPRET=1``).
* :func:`bytes_moved` -- HBM traffic model for the benchmark.

Tensors are seen as 4-D ``[B, S, H, D]`` views (any strides, last dim unit stride): token
``m = b * S + s``.  That covers token-major ``[T, H, D]`` (B = 1) and the Hugging Face
``[B, H, S, D]`` transposed view (the caller permutes, no copy).  ``cos``/``sin`` are ``[N, C]``
rows: row ``positions[m]`` when positions are given (a cos/sin cache), else row ``m``.
``C == rot_dim`` holds one value per rotated element (HF form, halves need not be equal);
``C == rot_dim // 2`` holds one value per pair (vLLM cache form).

Semantics per token and head (fp32 math, products rounded like eager does)::

    xr = x[:rot]; r = rotate(xr)           neox: cat(-x2, x1)   gpt-j: pairs (-x_odd, x_even)
    o = round_R(round_R(xr * cos) + round_R(r * sin));  out = cat(o, x[rot:])   (R = out dtype)
    quant: s = static | chain(amax(|o|) per token and head); q = clamp(o / s  or  o * s).to(fp8)

Each of q and k is quantized or not, independently, with its own scale.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .accesses import accesses, declare
from .quant_common import (
    MAX_SCALE_OPS,
    SCALE_CLAMP_MAX,
    SCALE_CLAMP_MIN,
    SCALE_DIV,
    SCALE_MUL,
    SCALE_RDIV,
    SCALE_RECIP,
    SCALE_ROUND_BF16,
    SCALE_ROUND_F16,
    absmax,
    apply_scale_op_ref,
    check_eps_tensor,
    pad_scale_chain,
    quantize,
    round_to,
    scale_chain,
)

__all__ = [
    "QUANT_NONE",
    "QUANT_STATIC",
    "QUANT_DYNAMIC",
    "rope_quant",
    "rope_quant_reference",
    "rope_quant_triton",
    "rope_quant_cache",
    "rope_quant_cache_reference",
    "rope_quant_cache_triton",
    "bytes_moved",
    "launch_config",
    "CONFIG_OVERRIDE",
]

QUANT_NONE = 0
QUANT_STATIC = 1  # per-tensor scale (one-element tensor or a constant)
QUANT_DYNAMIC = 2  # per token and head: amax over head_dim, then the scale-op chain

_DT_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_X_DTYPES = tuple(_DT_CODE)
_QDTYPE = torch.float8_e4m3fn
_EMPTY = (0,)
# re-exported so the pattern module takes every interface code from one place
SCALE_CODES = (SCALE_MUL, SCALE_DIV, SCALE_RDIV, SCALE_CLAMP_MIN, SCALE_CLAMP_MAX, SCALE_RECIP,
               SCALE_ROUND_BF16, SCALE_ROUND_F16)


# ----------------------------------------------------------------------------- validation


def check_args(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: Optional[torch.Tensor],
    rot_dim: int,
    cos_half: bool,
    out_dtype: torch.dtype,
    q_quant: int,
    k_quant: int,
    q_ops: Sequence[int],
    k_ops: Sequence[int],
    norm_dtype: Optional[torch.dtype] = None,
) -> None:
    """Raise ValueError on unsupported inputs (last line of defense; the FX side pre-checks)."""
    if q.dim() != 4:
        raise ValueError(f"rope_quant: q must be 4-D [B, S, H, D], got {tuple(q.shape)}")
    B, S, _, D = q.shape
    for name, t in (("q", q), ("k", k)):
        if t is None:
            continue
        if t.dim() != 4 or t.shape[0] != B or t.shape[1] != S or t.shape[3] != D:
            raise ValueError(f"rope_quant: {name} shape {tuple(t.shape)} does not match [B, S, *, D]")
        if t.dtype not in _X_DTYPES:
            raise ValueError(f"rope_quant: {name} dtype {t.dtype} unsupported")
        if t.device != q.device:
            raise ValueError(f"rope_quant: {name} on another device")
    if k is not None and k.dtype != q.dtype:
        raise ValueError("rope_quant: q and k dtypes differ")
    if out_dtype not in _X_DTYPES:
        raise ValueError(f"rope_quant: out dtype {out_dtype} unsupported")
    if rot_dim <= 0 or rot_dim > D or rot_dim % 2:
        raise ValueError(f"rope_quant: rot_dim {rot_dim} must be even and <= head_dim {D}")
    if rot_dim < D and out_dtype != (norm_dtype or q.dtype):
        raise ValueError("rope_quant: partial rotary needs out dtype == input dtype")
    C = rot_dim // 2 if cos_half else rot_dim
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 2 or t.shape[1] != C:
            raise ValueError(f"rope_quant: {name} must be [N, {C}], got {tuple(t.shape)}")
        if t.dtype not in _X_DTYPES or t.device != q.device:
            raise ValueError(f"rope_quant: {name} dtype/device unsupported")
    if positions is not None:
        if positions.dim() != 1 or positions.dtype not in (torch.int32, torch.int64):
            raise ValueError("rope_quant: positions must be a 1-D int32/int64 tensor")
    for qq, ops in ((q_quant, q_ops), (k_quant, k_ops)):
        if qq not in (QUANT_NONE, QUANT_STATIC, QUANT_DYNAMIC):
            raise ValueError(f"rope_quant: quant scheme {qq} unknown")
        if len(ops) > MAX_SCALE_OPS:
            raise ValueError(f"rope_quant: at most {MAX_SCALE_OPS} scale ops")


# ----------------------------------------------------------------------------- reference


def _rotate(x: torch.Tensor, neox: bool) -> torch.Tensor:
    if neox:
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), dim=-1)
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def _expand_cs(c: torch.Tensor, neox: bool, cos_half: bool) -> torch.Tensor:
    if not cos_half:
        return c
    return torch.cat((c, c), dim=-1) if neox else c.repeat_interleave(2, dim=-1)


def _rope_one_ref(x4, cs, sn, rot, neox, out_dtype):
    B, S, H, D = x4.shape
    x = x4.reshape(B * S, H, D)
    f32 = torch.float32
    xr = x[..., :rot].to(f32)
    r = _rotate(xr, neox)
    p1 = (xr * cs[:, None, :]).to(out_dtype).to(f32)
    p2 = (r * sn[:, None, :]).to(out_dtype).to(f32)
    o = (p1 + p2).to(out_dtype)
    if rot < D:
        o = torch.cat((o, x[..., rot:].to(out_dtype)), dim=-1)
    return o  # [M, H, D]


def _quant_ref(o, scheme, scale, static_value, ops, consts, quant_mul, qmin, qmax):
    f32 = torch.float32
    v = o.to(f32)
    if scheme == QUANT_STATIC:
        s = scale.reshape(()).to(f32) if scale is not None else torch.tensor(static_value, dtype=f32, device=o.device)
        sb = s
    else:
        s = v.abs().amax(dim=-1)  # [M, H]
        for op, c in zip(ops, consts):
            s = apply_scale_op_ref(s, int(op), float(c))
        sb = s[..., None]
    qv = v * sb if quant_mul else v / sb
    lo = torch.tensor(qmin, dtype=f32, device=o.device)
    hi = torch.tensor(qmax, dtype=f32, device=o.device)
    qv = torch.clamp(qv, min=lo, max=hi).to(_QDTYPE)
    return qv, s.to(f32)


def _qk_norm_ref(x, w, eps, woff, round_before, wsum_dtype, norm_dtype):
    """Per-head RMSNorm over head_dim, the rmsnorm_quant kernel's math (fp32, rounding points)."""
    f32 = torch.float32
    v = x.to(f32)
    e = eps.reshape(()).to(f32) if isinstance(eps, torch.Tensor) else torch.tensor(eps, dtype=f32)
    r = torch.reciprocal(torch.sqrt((v * v).mean(-1, keepdim=True) + e))
    n = v * r
    if round_before:
        n = n.to(x.dtype).to(f32)
    we = w.to(f32) + torch.tensor(woff, dtype=f32)
    if wsum_dtype is not None:
        we = we.to(wsum_dtype).to(f32)
    return (n * we).to(norm_dtype)


def _laid_out(t: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
    """t ([B, S, H, D]) copied into the layout `order` (outermost dims first)."""
    out = torch.empty_strided(t.shape, _strides(t.shape, order), dtype=t.dtype, device=t.device)
    return out.copy_(t)


def rope_quant_reference(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: Optional[torch.Tensor],
    q_scale: Optional[torch.Tensor],
    k_scale: Optional[torch.Tensor],
    rot_dim: int,
    neox: bool,
    cos_half: bool,
    out_dtype: torch.dtype,
    q_quant: int,
    q_static: float,
    q_ops: Sequence[int],
    q_consts: Sequence[float],
    q_mul: bool,
    k_quant: int,
    k_static: float,
    k_ops: Sequence[int],
    k_consts: Sequence[float],
    k_mul: bool,
    qmin: float,
    qmax: float,
    need_q_rope: bool,
    need_k_rope: bool,
    q_order: Sequence[int] = (0, 1, 2),
    k_order: Sequence[int] = (0, 1, 2),
    q_norm_w: Optional[torch.Tensor] = None,
    k_norm_w: Optional[torch.Tensor] = None,
    q_eps: float = 1e-6,
    k_eps: float = 1e-6,
    norm_woff: float = 0.0,
    norm_round_before: bool = True,
    norm_wsum_dtype: Optional[torch.dtype] = None,
    norm_dtype: Optional[torch.dtype] = None,
    math_dtype: Optional[torch.dtype] = None,
    q_scale_order: Optional[Sequence[int]] = None,
    k_scale_order: Optional[Sequence[int]] = None,
    q_eps_tensor: Optional[torch.Tensor] = None,
    k_eps_tensor: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, ...]:
    """Pure-torch oracle: (q_rope, q_fp8, q_scales, k_rope, k_fp8, k_scales), unused ones empty.

    q/k_eps_tensor (one fp32 element, q's device) replace q/k_eps: a float attribute that
    dynamic=True lifted into a graph input, read on every call rather than baked.

    math_dtype (fp32): the rotation rounds like a float32 computation, the result is cast to
    out_dtype once at the end (the complex form: fp32 product, then `.type_as(x)`).
    q/k_scale_order: memory order of a dynamic scale's [B, S, H] dims (None: contiguous), so the
    scale lands in the layout its consumer expects (no copy after the op)."""
    check_args(q, k, cos, sin, positions, rot_dim, cos_half, out_dtype, q_quant, k_quant, q_ops, k_ops, norm_dtype)
    check_eps_tensor("rope_quant", "q_eps_tensor", q_eps_tensor, q.device)
    check_eps_tensor("rope_quant", "k_eps_tensor", k_eps_tensor, q.device)
    if math_dtype is not None and (q_quant or k_quant):
        raise ValueError("rope_quant: math_dtype with a quantized output is not supported")
    nd = norm_dtype or q.dtype
    if q_norm_w is not None:
        qe = q_eps if q_eps_tensor is None else q_eps_tensor
        q = _qk_norm_ref(q, q_norm_w, qe, norm_woff, norm_round_before, norm_wsum_dtype, nd)
    if k is not None and k_norm_w is not None:
        ke = k_eps if k_eps_tensor is None else k_eps_tensor
        k = _qk_norm_ref(k, k_norm_w, ke, norm_woff, norm_round_before, norm_wsum_dtype, nd)
    B, S = q.shape[0], q.shape[1]
    f32 = torch.float32
    cs, sn = cos, sin
    if positions is not None:
        cs, sn = cs.index_select(0, positions.long()), sn.index_select(0, positions.long())
    cs = _expand_cs(cs.to(f32), neox, cos_half)
    sn = _expand_cs(sn.to(f32), neox, cos_half)
    outs: list[torch.Tensor] = []
    for x, scheme, scale, sv, ops, consts, mul, need, order, sorder in (
        (q, q_quant, q_scale, q_static, q_ops, q_consts, q_mul, need_q_rope, q_order, q_scale_order),
        (k, k_quant, k_scale, k_static, k_ops, k_consts, k_mul, need_k_rope, k_order, k_scale_order),
    ):
        empty = lambda dt: torch.empty(_EMPTY, dtype=dt, device=q.device)  # noqa: E731
        if x is None:
            outs += [empty(out_dtype), empty(_QDTYPE), empty(f32)]
            continue
        H, D = x.shape[2], x.shape[3]
        o = _rope_one_ref(x, cs, sn, rot_dim, neox, math_dtype or out_dtype).to(out_dtype)
        outs.append(_laid_out(o.reshape(B, S, H, D), order) if need else empty(out_dtype))
        if scheme == QUANT_NONE:
            outs += [empty(_QDTYPE), empty(f32)]
            continue
        qv, s = _quant_ref(o, scheme, scale, sv, ops, consts, mul, qmin, qmax)
        outs.append(_laid_out(qv.reshape(B, S, H, D), order))
        if scheme == QUANT_STATIC:
            outs.append(s.reshape(1).clone())
        else:
            st = _scale_strides((B, S, H), sorder)
            outs.append(torch.empty_strided((B, S, H), st, dtype=f32, device=q.device).copy_(s.reshape(B, S, H)))
    return tuple(outs)


# ----------------------------------------------------------------------------- Triton kernel


@triton.jit
def _qk_norm(v, rstd, w, woff, X_DT: tl.constexpr, NORM_DT: tl.constexpr, WSUM_DT: tl.constexpr,
             ROUND_BEFORE_W: tl.constexpr, NATIVE: tl.constexpr):
    n = v * rstd[:, None]
    if ROUND_BEFORE_W:
        n = round_to(n, X_DT, NATIVE)
    we = w + woff
    if WSUM_DT >= 0:
        we = round_to(we, WSUM_DT, NATIVE)
    return round_to(n * we[None, :], NORM_DT, NATIVE)


@triton.jit
def _rstd(ss, eps, D: tl.constexpr):
    """1 / sqrt(ss / D + eps), each step IEEE-rounded (the reference's reciprocal(sqrt(mean + eps))).
    A power-of-2 D divides as a multiply by 1/D: the same real value, so the same rounding (one
    div.rn per row less)."""
    if D & (D - 1) == 0:
        ms = ss * (1.0 / D)
    else:
        ms = tl.math.div_rn(ss, (D + 0.0) + tl.zeros_like(ss))
    return tl.math.div_rn(1.0 + tl.zeros_like(ss), tl.sqrt_rn(ms + eps))


@triton.jit
def _rope_heads(
    x_ptr, o_ptr, qo_ptr, s_ptr, scale_ptr,
    cos_ptr, sin_ptr, crow, s_cos, s_sin, w_ptr, eps, woff, one,
    b, s_, h0, H, S,
    sxb, sxs, sxh, sob, sos, soh, ssb, sss, ssh,
    static_value, c0, c1, c2, c3, qmin, qmax,
    D: tl.constexpr, ROT: tl.constexpr, NEOX: tl.constexpr, COS_HALF: tl.constexpr,
    OUT_DT: tl.constexpr, NEED_ROPE: tl.constexpr, QUANT: tl.constexpr, HAS_SCALE_T: tl.constexpr,
    OP0: tl.constexpr, OP1: tl.constexpr, OP2: tl.constexpr, OP3: tl.constexpr,
    QUANT_MUL: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, NATIVE: tl.constexpr,
    NORM: tl.constexpr, X_DT: tl.constexpr, NORM_DT: tl.constexpr, WSUM_DT: tl.constexpr,
    ROUND_BEFORE_W: tl.constexpr,
    c_ptr, c_off, c_ok, c_sh, CACHE: tl.constexpr, CACHE_FP8: tl.constexpr, CACHE_U8: tl.constexpr,
    STORE_QQ: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_P2: tl.constexpr,
):
    """Dispatch: SPLIT 1 (contiguous halves, see _rope_heads_split), else the gathered-partner path
    (SPLIT 2: its full-rotary form taking the partner from registers, see _swap_halves)."""
    if SPLIT == 1:
        _rope_heads_split(
            x_ptr, o_ptr, qo_ptr, s_ptr, scale_ptr, cos_ptr, sin_ptr, crow, s_cos, s_sin, w_ptr, eps, woff, one,
            b, s_, h0, H, S, sxb, sxs, sxh, sob, sos, soh, ssb, sss, ssh, static_value, c0, c1, c2, c3, qmin, qmax,
            D, ROT, NEOX, COS_HALF, OUT_DT, NEED_ROPE, QUANT, HAS_SCALE_T, OP0, OP1, OP2, OP3,
            QUANT_MUL, BLOCK_H, BLOCK_D, NATIVE, NORM, X_DT, NORM_DT, WSUM_DT, ROUND_BEFORE_W,
            c_ptr, c_off, c_ok, c_sh, CACHE, CACHE_FP8, CACHE_U8, STORE_QQ, BLOCK_P, BLOCK_P2)
    else:
        _rope_heads_gather(
            x_ptr, o_ptr, qo_ptr, s_ptr, scale_ptr, cos_ptr, sin_ptr, crow, s_cos, s_sin, w_ptr, eps, woff, one,
            b, s_, h0, H, S, sxb, sxs, sxh, sob, sos, soh, ssb, sss, ssh, static_value, c0, c1, c2, c3, qmin, qmax,
            D, ROT, NEOX, COS_HALF, OUT_DT, NEED_ROPE, QUANT, HAS_SCALE_T, OP0, OP1, OP2, OP3,
            QUANT_MUL, BLOCK_H, BLOCK_D, NATIVE, NORM, X_DT, NORM_DT, WSUM_DT, ROUND_BEFORE_W,
            c_ptr, c_off, c_ok, c_sh, CACHE, CACHE_FP8, CACHE_U8, STORE_QQ, SPLIT == 2)


@triton.jit
def _swap_halves(x, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, NEOX: tl.constexpr):
    """The rotation partner of every column of a full-rotary [BLOCK_H, BLOCK_D] block, in registers:
    neox x[(j + D/2) % D] (the two halves swapped), gpt-j x[j ^ 1] (the two lanes of each pair swapped)."""
    HALF: tl.constexpr = BLOCK_D // 2
    if NEOX:
        a, b = tl.split(tl.permute(tl.reshape(x, [BLOCK_H, 2, HALF]), [0, 2, 1]))
        r = tl.reshape(tl.permute(tl.join(b, a), [0, 2, 1]), [BLOCK_H, BLOCK_D])
    else:
        a, b = tl.split(tl.reshape(x, [BLOCK_H, HALF, 2]))
        r = tl.reshape(tl.join(b, a), [BLOCK_H, BLOCK_D])
    return r


@triton.jit
def _rope_emit(o, hcol, col, m, sb, obase, soh, o_ptr, qo_ptr, qmin, qmax, c_ptr, c_off, c_ok, c_sh,
               NEED_ROPE: tl.constexpr, QUANT: tl.constexpr, QUANT_MUL: tl.constexpr, NATIVE: tl.constexpr,
               CACHE: tl.constexpr, CACHE_FP8: tl.constexpr, CACHE_U8: tl.constexpr, STORE_QQ: tl.constexpr):
    """Store one part (rope output, its fp8 quant by scale `sb`, the cache row) at heads hcol, columns col."""
    oofs = obase + hcol.to(tl.int64) * soh + col
    if NEED_ROPE:
        tl.store(o_ptr + oofs, o.to(o_ptr.dtype.element_ty), mask=m)
    if QUANT != 0:
        qq = quantize(o, sb + tl.zeros_like(o), qmin, qmax, QUANT_MUL, False, False, NATIVE)
        if STORE_QQ:
            tl.store(qo_ptr + oofs, qq, mask=m)
        if CACHE and CACHE_FP8:
            _cache_put(c_ptr, c_off, c_sh, hcol, col, qq, m, c_ok, CACHE_U8)
    if CACHE and not CACHE_FP8:
        _cache_put(c_ptr, c_off, c_sh, hcol, col, o, m, c_ok, False)


@triton.jit
def _rope_out(x1, x2, ca, sa, cb, sb, one, OUT_DT: tl.constexpr, NATIVE: tl.constexpr):
    """(o1, o2) = (x1*ca - x2*sa, x2*cb + x1*sb), each product and the sum rounded like the gather path."""
    ca = ca * one  # see the `* one` comment in _rope_heads_gather (no narrowed product -> no fma)
    sa = sa * one
    cb = cb * one
    sb = sb * one
    o1 = round_to(round_to(x1 * ca[None, :], OUT_DT, NATIVE) + round_to((x2 * -1.0) * sa[None, :], OUT_DT, NATIVE),
                  OUT_DT, NATIVE)
    o2 = round_to(round_to(x2 * cb[None, :], OUT_DT, NATIVE) + round_to(x1 * sb[None, :], OUT_DT, NATIVE),
                  OUT_DT, NATIVE)
    return o1, o2


@triton.jit
def _rope_heads_split(
    x_ptr, o_ptr, qo_ptr, s_ptr, scale_ptr,
    cos_ptr, sin_ptr, crow, s_cos, s_sin, w_ptr, eps, woff, one,
    b, s_, h0, H, S,
    sxb, sxs, sxh, sob, sos, soh, ssb, sss, ssh,
    static_value, c0, c1, c2, c3, qmin, qmax,
    D: tl.constexpr, ROT: tl.constexpr, NEOX: tl.constexpr, COS_HALF: tl.constexpr,
    OUT_DT: tl.constexpr, NEED_ROPE: tl.constexpr, QUANT: tl.constexpr, HAS_SCALE_T: tl.constexpr,
    OP0: tl.constexpr, OP1: tl.constexpr, OP2: tl.constexpr, OP3: tl.constexpr,
    QUANT_MUL: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, NATIVE: tl.constexpr,
    NORM: tl.constexpr, X_DT: tl.constexpr, NORM_DT: tl.constexpr, WSUM_DT: tl.constexpr,
    ROUND_BEFORE_W: tl.constexpr,
    c_ptr, c_off, c_ok, c_sh, CACHE: tl.constexpr, CACHE_FP8: tl.constexpr, CACHE_U8: tl.constexpr,
    STORE_QQ: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_P2: tl.constexpr,
):
    """The gather path's math with every operand loaded contiguously: neox as the two halves
    [BLOCK_H, HALF] (x1 = x[:HALF], x2 = x[HALF:ROT]), gpt-j as one [BLOCK_H, HALF, 2] block split
    into even/odd lanes (joined again to store), and partial rotary's x[ROT:D] as a [BLOCK_H, BLOCK_P]
    block (BLOCK_P the largest power of 2 <= D - ROT) plus, for the rest, a masked [BLOCK_H, BLOCK_P2]
    one (0: none; 192 = 128 + 64 idles no lane). No partner reload, no per-element index math."""
    HALF: tl.constexpr = ROT // 2
    hh = h0 + tl.arange(0, BLOCK_H)
    hmask = hh < H
    i = tl.arange(0, HALF)
    xrow = x_ptr + b * sxb + s_ * sxs
    crow_c = cos_ptr + crow * s_cos
    crow_s = sin_ptr + crow * s_sin
    if NEOX:
        hcol = hh[:, None]
        cola = i[None, :]
        colb = cola + HALF
        m = hmask[:, None] & (cola < HALF)
        x1 = tl.load(xrow + hcol * sxh + cola, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(xrow + hcol * sxh + colb, mask=m, other=0.0).to(tl.float32)
        ca = tl.load(crow_c + i).to(tl.float32)
        sa = tl.load(crow_s + i).to(tl.float32)
        if COS_HALF:
            cb = ca
            sb_ = sa
        else:
            cb = tl.load(crow_c + HALF + i).to(tl.float32)
            sb_ = tl.load(crow_s + HALF + i).to(tl.float32)
        if NORM:
            w1 = tl.load(w_ptr + i).to(tl.float32)
            w2 = tl.load(w_ptr + HALF + i).to(tl.float32)
    else:
        t = tl.arange(0, 2)
        hcol = hh[:, None, None]
        cola = 2 * i[None, :, None] + t[None, None, :]
        m = hmask[:, None, None] & (cola < ROT)
        x1, x2 = tl.split(tl.load(xrow + hcol * sxh + cola, mask=m, other=0.0).to(tl.float32))
        if COS_HALF:
            ca = tl.load(crow_c + i).to(tl.float32)
            sa = tl.load(crow_s + i).to(tl.float32)
            cb = ca
            sb_ = sa
        else:
            ci = 2 * i[:, None] + t[None, :]
            ca, cb = tl.split(tl.load(crow_c + ci).to(tl.float32))
            sa, sb_ = tl.split(tl.load(crow_s + ci).to(tl.float32))
        if NORM:
            w1, w2 = tl.split(tl.load(w_ptr + 2 * i[:, None] + t[None, :]).to(tl.float32))
    if ROT < D:
        pj = tl.arange(0, BLOCK_P)
        pcol = ROT + pj[None, :]
        pm = hmask[:, None] & (pcol < D)
        xp = tl.load(xrow + hh[:, None] * sxh + pcol, mask=pm, other=0.0).to(tl.float32)
        if BLOCK_P2 > 0:
            pj2 = tl.arange(0, BLOCK_P2)
            pcol2 = ROT + BLOCK_P + pj2[None, :]
            pm2 = hmask[:, None] & (pcol2 < D)
            xp2 = tl.load(xrow + hh[:, None] * sxh + pcol2, mask=pm2, other=0.0).to(tl.float32)
    if NORM:  # per-head RMSNorm over head_dim before the rotation: sum of squares over the parts
        ss = tl.sum(x1 * x1 + x2 * x2, axis=1)  # one reduction of the rotated part
        if ROT < D:
            ss = ss + tl.sum(xp * xp, axis=1)
            if BLOCK_P2 > 0:
                ss = ss + tl.sum(xp2 * xp2, axis=1)
        rstd = _rstd(ss, eps, D)
        x1 = _qk_norm(x1, rstd, w1, woff, X_DT, NORM_DT, WSUM_DT, ROUND_BEFORE_W, NATIVE)
        x2 = _qk_norm(x2, rstd, w2, woff, X_DT, NORM_DT, WSUM_DT, ROUND_BEFORE_W, NATIVE)
        if ROT < D:
            wp = tl.load(w_ptr + ROT + pj, mask=ROT + pj < D, other=0.0).to(tl.float32)
            xp = _qk_norm(xp, rstd, wp, woff, X_DT, NORM_DT, WSUM_DT, ROUND_BEFORE_W, NATIVE)
            if BLOCK_P2 > 0:
                wp2 = tl.load(w_ptr + ROT + BLOCK_P + pj2, mask=ROT + BLOCK_P + pj2 < D, other=0.0).to(tl.float32)
                xp2 = _qk_norm(xp2, rstd, wp2, woff, X_DT, NORM_DT, WSUM_DT, ROUND_BEFORE_W, NATIVE)
    o1, o2 = _rope_out(x1, x2, ca, sa, cb, sb_, one, OUT_DT, NATIVE)
    # math in fp32 (math_dtype) stored narrower: round once, RNE (a no-op when OUT_DT is the store dtype)
    if o_ptr.dtype.element_ty == tl.bfloat16:
        o1 = round_to(o1, 1, NATIVE)
        o2 = round_to(o2, 1, NATIVE)
    elif o_ptr.dtype.element_ty == tl.float16:
        o1 = round_to(o1, 2, NATIVE)
        o2 = round_to(o2, 2, NATIVE)
    tok = b * S + s_
    sc = 0.0
    if QUANT == 1:
        if HAS_SCALE_T:
            sc = tl.load(scale_ptr).to(tl.float32)
        else:
            sc = static_value + 0.0
        if (tok == 0) & (h0 == 0):
            tl.store(s_ptr, sc)
    elif QUANT == 2:
        hm2 = hmask[:, None]
        am = tl.maximum(absmax(tl.where(hm2, o1, 0.0), 1), absmax(tl.where(hm2, o2, 0.0), 1),
                        propagate_nan=tl.PropagateNan.ALL)
        if ROT < D:
            am = tl.maximum(am, absmax(tl.where(pm, xp, 0.0), 1), propagate_nan=tl.PropagateNan.ALL)
            if BLOCK_P2 > 0:
                am = tl.maximum(am, absmax(tl.where(pm2, xp2, 0.0), 1), propagate_nan=tl.PropagateNan.ALL)
        sc = scale_chain(am, c0, c1, c2, c3, OP0, OP1, OP2, OP3)
        tl.store(s_ptr + b.to(tl.int64) * ssb + s_.to(tl.int64) * sss + hh.to(tl.int64) * ssh, sc, mask=hmask)
    sc2 = sc  # the scale broadcast over a [BLOCK_H, n] part
    if QUANT == 2:
        sc2 = sc[:, None]
    obase = b * sob + s_ * sos
    if NEOX:
        _rope_emit(o1, hcol, cola, m, sc2, obase, soh, o_ptr, qo_ptr, qmin, qmax, c_ptr, c_off, c_ok, c_sh,
                   NEED_ROPE, QUANT, QUANT_MUL, NATIVE, CACHE, CACHE_FP8, CACHE_U8, STORE_QQ)
        _rope_emit(o2, hcol, colb, m, sc2, obase, soh, o_ptr, qo_ptr, qmin, qmax, c_ptr, c_off, c_ok, c_sh,
                   NEED_ROPE, QUANT, QUANT_MUL, NATIVE, CACHE, CACHE_FP8, CACHE_U8, STORE_QQ)
    else:
        sc3 = sc
        if QUANT == 2:
            sc3 = sc[:, None, None]
        _rope_emit(tl.join(o1, o2), hcol, cola, m, sc3, obase, soh, o_ptr, qo_ptr, qmin, qmax, c_ptr, c_off, c_ok,
                   c_sh, NEED_ROPE, QUANT, QUANT_MUL, NATIVE, CACHE, CACHE_FP8, CACHE_U8, STORE_QQ)
    if ROT < D:
        _rope_emit(xp, hh[:, None], pcol, pm, sc2, obase, soh, o_ptr, qo_ptr, qmin, qmax, c_ptr, c_off, c_ok, c_sh,
                   NEED_ROPE, QUANT, QUANT_MUL, NATIVE, CACHE, CACHE_FP8, CACHE_U8, STORE_QQ)
        if BLOCK_P2 > 0:
            _rope_emit(xp2, hh[:, None], pcol2, pm2, sc2, obase, soh, o_ptr, qo_ptr, qmin, qmax, c_ptr, c_off, c_ok,
                       c_sh, NEED_ROPE, QUANT, QUANT_MUL, NATIVE, CACHE, CACHE_FP8, CACHE_U8, STORE_QQ)


@triton.jit
def _rope_heads_gather(
    x_ptr, o_ptr, qo_ptr, s_ptr, scale_ptr,
    cos_ptr, sin_ptr, crow, s_cos, s_sin, w_ptr, eps, woff, one,
    b, s_, h0, H, S,
    sxb, sxs, sxh, sob, sos, soh, ssb, sss, ssh,
    static_value, c0, c1, c2, c3, qmin, qmax,
    D: tl.constexpr, ROT: tl.constexpr, NEOX: tl.constexpr, COS_HALF: tl.constexpr,
    OUT_DT: tl.constexpr, NEED_ROPE: tl.constexpr, QUANT: tl.constexpr, HAS_SCALE_T: tl.constexpr,
    OP0: tl.constexpr, OP1: tl.constexpr, OP2: tl.constexpr, OP3: tl.constexpr,
    QUANT_MUL: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, NATIVE: tl.constexpr,
    NORM: tl.constexpr, X_DT: tl.constexpr, NORM_DT: tl.constexpr, WSUM_DT: tl.constexpr,
    ROUND_BEFORE_W: tl.constexpr,
    c_ptr, c_off, c_ok, c_sh, CACHE: tl.constexpr, CACHE_FP8: tl.constexpr, CACHE_U8: tl.constexpr,
    STORE_QQ: tl.constexpr, REG_PARTNER: tl.constexpr,
):
    """(QK-norm +) RoPE (+quant) of BLOCK_H heads of one token of one tensor (outputs and [B,S,H] scales strided).

    CACHE: also store the rope output (or, CACHE_FP8, its fp8 quant; CACHE_U8: as uint8 bits) at
    cache row offset `c_off` when `c_ok` (the token's slot is written)."""
    hh = h0 + tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_D)
    hmask = hh < H
    mask = hmask[:, None] & (j < D)[None, :]
    xrow = x_ptr + b * sxb + s_ * sxs
    offs = hh[:, None] * sxh + j[None, :]
    x = tl.load(xrow + offs, mask=mask, other=0.0).to(tl.float32)
    HALF: tl.constexpr = ROT // 2
    is_rot = j < ROT
    if NEOX:
        partner = tl.where(j < HALF, j + HALF, j - HALF)
        sign = tl.where(j < HALF, -1.0, 1.0)
        if COS_HALF:
            cidx = j % HALF
        else:
            cidx = j
    else:
        partner = j ^ 1
        sign = tl.where((j & 1) == 0, -1.0, 1.0)
        if COS_HALF:
            cidx = j // 2
        else:
            cidx = j
    rmask = mask & is_rot[None, :]
    if not REG_PARTNER:
        xp = tl.load(xrow + hh[:, None] * sxh + partner[None, :], mask=rmask, other=0.0).to(tl.float32)
    if NORM:  # per-head RMSNorm over head_dim (Qwen3/Gemma3 q_norm/k_norm) before the rotation
        ss = tl.sum(x * x, axis=1)
        rstd = _rstd(ss, eps, D)
        w = tl.load(w_ptr + j, mask=j < D, other=0.0).to(tl.float32)
        x = _qk_norm(x, rstd, w, woff, X_DT, NORM_DT, WSUM_DT, ROUND_BEFORE_W, NATIVE)
        if not REG_PARTNER:
            wp = tl.load(w_ptr + partner, mask=is_rot, other=0.0).to(tl.float32)
            xp = _qk_norm(xp, rstd, wp, woff, X_DT, NORM_DT, WSUM_DT, ROUND_BEFORE_W, NATIVE)
    if REG_PARTNER:  # full rotary, D a power of 2: the partner from x's registers (normalized once)
        xp = _swap_halves(x, BLOCK_H, BLOCK_D, NEOX)
    cmask = is_rot
    # `* one` (a runtime 1.0, exact for every value): compiled, LLVM narrows trunc(ext(x) * ext(c))
    # of two bf16/f16 values to a bf16/f16 multiply (legal: exact) and the NVPTX backend then
    # contracts it with the sum below into fma.rn.bf16, dropping the product's rounding (1-ulp
    # differences vs eager in many elements). A cos/sin that is not an extension stops that.
    c = tl.load(cos_ptr + crow * s_cos + cidx, mask=cmask, other=0.0).to(tl.float32) * one
    sn = tl.load(sin_ptr + crow * s_sin + cidx, mask=cmask, other=0.0).to(tl.float32) * one
    p1 = round_to(x * c[None, :], OUT_DT, NATIVE)
    p2 = round_to((xp * sign[None, :]) * sn[None, :], OUT_DT, NATIVE)
    o = round_to(p1 + p2, OUT_DT, NATIVE)
    # math in fp32 (math_dtype) stored narrower: round once, RNE (a no-op when OUT_DT is the store dtype)
    if o_ptr.dtype.element_ty == tl.bfloat16:
        o = round_to(o, 1, NATIVE)
    elif o_ptr.dtype.element_ty == tl.float16:
        o = round_to(o, 2, NATIVE)
    o = tl.where(is_rot[None, :], o, x)
    tok = b * S + s_
    oofs = b * sob + s_ * sos + hh[:, None].to(tl.int64) * soh + j[None, :]
    if NEED_ROPE:
        tl.store(o_ptr + oofs, o.to(o_ptr.dtype.element_ty), mask=mask)
    if QUANT != 0:
        if QUANT == 1:
            if HAS_SCALE_T:
                sc = tl.load(scale_ptr).to(tl.float32)
            else:
                sc = static_value + 0.0
            sb = sc + tl.zeros_like(o)
            if (tok == 0) & (h0 == 0):
                tl.store(s_ptr, sc)
        else:
            sc = absmax(tl.where(mask, o, 0.0), 1)  # [BLOCK_H], NaN kept like torch.amax
            sc = scale_chain(sc, c0, c1, c2, c3, OP0, OP1, OP2, OP3)
            tl.store(s_ptr + b.to(tl.int64) * ssb + s_.to(tl.int64) * sss + hh.to(tl.int64) * ssh, sc, mask=hmask)
            sb = sc[:, None] + tl.zeros_like(o)
        qq = quantize(o, sb, qmin, qmax, QUANT_MUL, False, False, NATIVE)
        if STORE_QQ:
            tl.store(qo_ptr + oofs, qq, mask=mask)
        if CACHE and CACHE_FP8:
            _cache_store(c_ptr, c_off, c_sh, hh, j, qq, mask, c_ok, CACHE_U8)
    if CACHE and not CACHE_FP8:
        _cache_store(c_ptr, c_off, c_sh, hh, j, o, mask, c_ok, False)


@triton.jit
def _slot(raw, n, ok, NEG_SKIP: tl.constexpr):
    """(row, written?) of a slot in a cache of n rows: slot < 0 skipped (vLLM) or wrapped (index_put)."""
    if NEG_SKIP:
        s = raw
    else:
        s = tl.where(raw < 0, raw + n, raw)
    return s, ok & (s >= 0) & (s < n)


@triton.jit
def _cache_store(c_ptr, c_off, c_sh, hh, j, val, mask, ok, U8: tl.constexpr):
    """Store [BLOCK_H, BLOCK_D] rows of one token into its cache slot (fp8 bits as uint8 when U8)."""
    _cache_put(c_ptr, c_off, c_sh, hh[:, None], j[None, :], val, mask, ok, U8)


@triton.jit
def _cache_put(c_ptr, c_off, c_sh, hcol, col, val, mask, ok, U8: tl.constexpr):
    """Store `val` at heads `hcol`, columns `col` (broadcast to val's shape) of one token's cache slot."""
    if U8:
        val = val.to(tl.uint8, bitcast=True)
    offs = c_off + hcol.to(tl.int64) * c_sh + col
    m = mask & (tl.zeros_like(offs) + ok.to(tl.int32) != 0)
    tl.store(c_ptr + offs, val.to(c_ptr.dtype.element_ty), mask=m)


@triton.jit
def _cache_v(v_ptr, c_ptr, vscale_ptr, b, s_, h0, H, svb, svs, svh, c_off, c_ok, c_sh, v_static, qmin, qmax,
             D: tl.constexpr, V_QUANT: tl.constexpr, V_SCALE_T: tl.constexpr, V_MUL: tl.constexpr,
             CACHE_U8: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, NATIVE: tl.constexpr):
    """Copy BLOCK_H heads of v of one token into its cache slot (static fp8 quant when V_QUANT)."""
    hh = h0 + tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_D)
    mask = (hh < H)[:, None] & (j < D)[None, :]
    mask = mask & (tl.zeros_like(hh)[:, None] + c_ok.to(tl.int32) != 0)
    x = tl.load(v_ptr + b * svb + s_ * svs + hh[:, None].to(tl.int64) * svh + j[None, :], mask=mask, other=0.0)
    if V_QUANT:
        if V_SCALE_T:
            sc = tl.load(vscale_ptr).to(tl.float32)
        else:
            sc = v_static + 0.0
        xf = x.to(tl.float32)
        x = quantize(xf, sc + tl.zeros_like(xf), qmin, qmax, V_MUL, False, False, NATIVE)
    _cache_store(c_ptr, c_off, c_sh, hh, j, x, mask, c_ok, CACHE_U8)


@triton.jit
def _rope_quant_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, pos_ptr, qscale_ptr, kscale_ptr, qw_ptr, kw_ptr,
    qo_ptr, qq_ptr, qs_ptr, ko_ptr, kq_ptr, ks_ptr,
    S, HQ, HK, NQB,
    sqb, sqs, sqh, skb, sks, skh, s_cos, s_sin,
    soqb, soqs, soqh, sokb, soks, sokh,
    ssqb, ssqs, ssqh, sskb, ssks, sskh,
    q_static, qc0, qc1, qc2, qc3, k_static, kc0, kc1, kc2, kc3, qmin, qmax, q_eps, k_eps, woff, one,
    D: tl.constexpr, ROT: tl.constexpr, NEOX: tl.constexpr, COS_HALF: tl.constexpr,
    OUT_DT: tl.constexpr, HAS_POS: tl.constexpr,
    Q_NORM: tl.constexpr, K_NORM: tl.constexpr, X_DT: tl.constexpr, NORM_DT: tl.constexpr,
    WSUM_DT: tl.constexpr, ROUND_BEFORE_W: tl.constexpr,
    NEED_Q: tl.constexpr, Q_QUANT: tl.constexpr, Q_SCALE_T: tl.constexpr, Q_MUL: tl.constexpr,
    QOP0: tl.constexpr, QOP1: tl.constexpr, QOP2: tl.constexpr, QOP3: tl.constexpr,
    NEED_K: tl.constexpr, K_QUANT: tl.constexpr, K_SCALE_T: tl.constexpr, K_MUL: tl.constexpr,
    KOP0: tl.constexpr, KOP1: tl.constexpr, KOP2: tl.constexpr, KOP3: tl.constexpr,
    HAS_K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, NATIVE: tl.constexpr = False,
    v_ptr=None, kc_ptr=None, vc_ptr=None, slot_ptr=None, vscale_ptr=None,
    n_slots=0, n_vslots=0, n_tok=0, n_v=0, HV=0, NKB=0, skc=0, skc_h=0, svc=0, svc_h=0, svb=0, svs=0, svh=0,
    v_static=1.0, v_qmin=-448.0, v_qmax=448.0, skc_b=0, svc_b=0,
    HAS_CACHE: tl.constexpr = False, SLOT_BY_S: tl.constexpr = False, NEG_SKIP: tl.constexpr = False, K_CACHE_FP8: tl.constexpr = False,
    K_CACHE_U8: tl.constexpr = False, V_CACHE_U8: tl.constexpr = False, STORE_KQ: tl.constexpr = True,
    V_QUANT: tl.constexpr = False, V_SCALE_T: tl.constexpr = False, V_MUL: tl.constexpr = False,
    SPLIT: tl.constexpr = 0, BLOCK_P: tl.constexpr = 1, BLOCK_P2: tl.constexpr = 0,
    qeps_ptr=None, keps_ptr=None, Q_EPS_T: tl.constexpr = False, K_EPS_T: tl.constexpr = False,
):
    """Grid (tokens, q head-blocks + k head-blocks): q and k of a token in ONE launch.

    cos/sin of a token are read once per head block (L1/L2 hits), x once (+ a partner reload
    of the rotated half from cache); HBM traffic is one read of q/k and one write of each output.
    HAS_CACHE: k programs also store k (rope or fp8) at the token's slot of kc, and NVB extra
    head-block programs per token copy v (fp8 when V_QUANT) into vc. A slot < 0 is skipped
    (NEG_SKIP, vLLM) or wraps to slot + n_slots (ATen index_put); slots >= n_slots are not written.
    SLOT_BY_S: [B, H, max_len, D] caches (transformers StaticCache): position s of every batch row b
    goes to slot slots[s] of batch row b (cache offsets slot * skc + b * skc_b + head * skc_h).
    SPLIT: 1 contiguous loads of the rotated halves (no partner gather), 2 the partner from registers
    (full rotary, pow2 D), 0 the partner gathered by a second load; BLOCK_P/BLOCK_P2: passthrough chunks.
    """
    q_static = tl.cast(q_static, tl.float32)
    k_static = tl.cast(k_static, tl.float32)
    qc0 = tl.cast(qc0, tl.float32)
    qc1 = tl.cast(qc1, tl.float32)
    qc2 = tl.cast(qc2, tl.float32)
    qc3 = tl.cast(qc3, tl.float32)
    kc0 = tl.cast(kc0, tl.float32)
    kc1 = tl.cast(kc1, tl.float32)
    kc2 = tl.cast(kc2, tl.float32)
    kc3 = tl.cast(kc3, tl.float32)
    qmin = tl.cast(qmin, tl.float32)
    qmax = tl.cast(qmax, tl.float32)
    q_eps = tl.cast(q_eps, tl.float32)
    k_eps = tl.cast(k_eps, tl.float32)
    if Q_EPS_T:  # a float attribute dynamic=True lifted into a graph input: read on every call
        q_eps = tl.load(qeps_ptr).to(tl.float32)
    if K_EPS_T:
        k_eps = tl.load(keps_ptr).to(tl.float32)
    woff = tl.cast(woff, tl.float32)
    one = tl.cast(one, tl.float32)
    tok = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    b = tok // S
    s_ = tok % S
    if HAS_POS:
        crow = tl.load(pos_ptr + tok).to(tl.int64)
    else:
        crow = tok
    c_ok = False
    v_ok = False
    slot = tok * 0
    vslot = tok * 0
    if HAS_CACHE:
        v_static = tl.cast(v_static, tl.float32)
        v_qmin = tl.cast(v_qmin, tl.float32)
        v_qmax = tl.cast(v_qmax, tl.float32)
        if SLOT_BY_S:
            sidx = s_
        else:
            sidx = tok
        in_rng = sidx < n_tok  # slots may cover only the first n_tok tokens (rows = x[:len(slots)])
        raw = tl.load(slot_ptr + sidx, mask=in_rng, other=0).to(tl.int64)
        slot, c_ok = _slot(raw, n_slots, in_rng, NEG_SKIP)
        vslot, v_ok = _slot(raw, n_vslots, in_rng & (sidx < n_v), NEG_SKIP)
    if hb < NQB:
        _rope_heads(q_ptr, qo_ptr, qq_ptr, qs_ptr, qscale_ptr, cos_ptr, sin_ptr, crow, s_cos, s_sin,
                    qw_ptr, q_eps, woff, one,
                    b, s_, hb * BLOCK_H, HQ, S, sqb, sqs, sqh, soqb, soqs, soqh, ssqb, ssqs, ssqh,
                    q_static, qc0, qc1, qc2, qc3, qmin, qmax,
                    D, ROT, NEOX, COS_HALF, OUT_DT, NEED_Q, Q_QUANT, Q_SCALE_T,
                    QOP0, QOP1, QOP2, QOP3, Q_MUL, BLOCK_H, BLOCK_D, NATIVE,
                    Q_NORM, X_DT, NORM_DT, WSUM_DT, ROUND_BEFORE_W,
                    qo_ptr, 0, False, 0, False, False, False, True, SPLIT, BLOCK_P, BLOCK_P2)
    elif HAS_K and hb < NQB + NKB:
        _rope_heads(k_ptr, ko_ptr, kq_ptr, ks_ptr, kscale_ptr, cos_ptr, sin_ptr, crow, s_cos, s_sin,
                    kw_ptr, k_eps, woff, one,
                    b, s_, (hb - NQB) * BLOCK_H, HK, S, skb, sks, skh, sokb, soks, sokh, sskb, ssks, sskh,
                    k_static, kc0, kc1, kc2, kc3, qmin, qmax,
                    D, ROT, NEOX, COS_HALF, OUT_DT, NEED_K, K_QUANT, K_SCALE_T,
                    KOP0, KOP1, KOP2, KOP3, K_MUL, BLOCK_H, BLOCK_D, NATIVE,
                    K_NORM, X_DT, NORM_DT, WSUM_DT, ROUND_BEFORE_W,
                    kc_ptr, slot * skc + b * skc_b, c_ok, skc_h, HAS_CACHE, K_CACHE_FP8, K_CACHE_U8, STORE_KQ,
                    SPLIT, BLOCK_P, BLOCK_P2)
    elif HAS_CACHE:
        _cache_v(v_ptr, vc_ptr, vscale_ptr, b, s_, (hb - NQB - NKB) * BLOCK_H, HV, svb, svs, svh,
                 vslot * svc + b * svc_b, v_ok, svc_h, v_static, v_qmin, v_qmax,
                 D, V_QUANT, V_SCALE_T, V_MUL, V_CACHE_U8, BLOCK_H, BLOCK_D, NATIVE)


@declare(_rope_quant_kernel)
def _rope_quant_accesses(a):
    """q programs always; k programs under HAS_K; v-copy programs and the cache stores under HAS_CACHE."""
    reads = ["q_ptr", "cos_ptr", "sin_ptr"] + ["pos_ptr"] * bool(a["HAS_POS"])
    reads += ["qeps_ptr"] * bool(a.get("Q_EPS_T")) + ["keps_ptr"] * bool(a.get("K_EPS_T"))
    writes = ["qo_ptr"] * bool(a["NEED_Q"])
    sides = [("q", "Q", True)] + [("k", "K", False)] * bool(a["HAS_K"])
    for x, X, is_q in sides:
        reads += [f"{x}_ptr"] + [f"{x}w_ptr"] * bool(a[f"{X}_NORM"])
        reads += [f"{x}scale_ptr"] * (a[f"{X}_QUANT"] == 1 and bool(a[f"{X}_SCALE_T"]))
        if a[f"{X}_QUANT"]:
            writes += [f"{x}s_ptr"] + [f"{x}q_ptr"] * (is_q or bool(a.get("STORE_KQ", True)))
    writes += ["ko_ptr"] * (bool(a["HAS_K"]) and bool(a["NEED_K"]))
    if a.get("HAS_CACHE"):
        reads += ["slot_ptr", "v_ptr"] + ["vscale_ptr"] * (bool(a.get("V_QUANT")) and bool(a.get("V_SCALE_T")))
        # k programs put k in the cache: its rope, or its fp8 under K_CACHE_FP8 (only if k is quantized)
        writes += ["kc_ptr"] * (bool(a["HAS_K"]) and (not a.get("K_CACHE_FP8") or a["K_QUANT"] != 0)) + ["vc_ptr"]
    # stores of each q/k output: one on the gather paths, one per emitted part on SPLIT 1 (two halves
    # under NEOX, the passthrough chunks); the v copy stores once
    parts = 1 if a["SPLIT"] != SPLIT_HALVES else (1 + bool(a["NEOX"]) + (a["ROT"] < a["D"]) * (1 + (a["BLOCK_P2"] > 0)))
    return accesses(reads, writes, one_store=parts == 1 or writes == ["vc_ptr"])


# Launch-config override for tuning sweeps: keys SPLIT / BLOCK_H / num_warps (any subset). Also read
# from the env var FXFUSE_ROPE_CONFIG ("SPLIT=1,BLOCK_H=8,num_warps=4"); a `config=` keyword wins.
CONFIG_OVERRIDE: dict[str, int] = {}
_CONFIG_KEYS = ("SPLIT", "BLOCK_H", "num_warps")
# SPLIT values: the kernel's three ways to get each element's rotation partner
SPLIT_GATHER = 0  # reload the partner column (+ normalize it again under QK-norm): any rot
SPLIT_HALVES = 1  # load the rotated halves as contiguous blocks (split_ok: a power-of-2 half)
SPLIT_REG = 2  # load whole heads, take the partner from registers (reg_partner_ok: rot == D, a power of 2)


def split_ok(D: int, rot: int) -> bool:
    """The SPLIT path needs a power-of-2 half (tl.arange sizes); the passthrough is masked."""
    half = rot // 2
    return 0 < rot <= D and rot % 2 == 0 and half & (half - 1) == 0


def reg_partner_ok(D: int, rot: int) -> bool:
    """SPLIT 2 reshapes a [BLOCK_H, D] block into halves/pairs: full rotary, D a power of 2."""
    return rot == D and D >= 2 and D & (D - 1) == 0


def _env_config() -> dict[str, int]:
    raw = os.environ.get("FXFUSE_ROPE_CONFIG", "").strip()
    out: dict[str, int] = {}
    for item in filter(None, (x.strip() for x in raw.split(","))):
        k, _, v = item.partition("=")
        if k.strip() not in _CONFIG_KEYS:
            raise ValueError(f"FXFUSE_ROPE_CONFIG: unknown key {k!r} (want {_CONFIG_KEYS})")
        out[k.strip()] = int(v)
    return out


def launch_config(D: int, rot: int, HQ: int, HK: int, HV: int, M: Any = None, neox: bool = True,
                  q_quant: int = QUANT_NONE, k_quant: int = QUANT_NONE, norm: bool = False, cache: bool = False,
                  override: Optional[dict[str, int]] = None) -> dict[str, int]:
    """dict(SPLIT, BLOCK_H, num_warps) of one launch: pure Python on static shapes (fake-tensor safe).

    M (tokens) may be symbolic or None: read as "large", never branched on. Defaults from the H200
    sweep (benchmarks/tune_rope.py; benchmarks/results/tune_rope_h200.json): small programs of ~1K
    elements on 1 warp (head_dim <= 128) or 2 (256) beat 2K-element 4-warp ones by 1.1-1.9x
    (Llama fp8 static at 16384 tokens 127.6 -> 95.3 us, Qwen3.5 129.4 -> 68.8 us); partial rotary
    takes the SPLIT path (passthrough as its own chunks), full rotary the gathered partner (the
    sweep's winner there); dynamic fp8 at head_dim 256 takes 8 heads.
    QK-norm takes the SPLIT path wherever it can (split_ok), on the blocks the sweep found best for
    it on the gather path (8 heads / 1 warp at head_dim <= 128, 2 / 1 at 256): the gather path
    normalizes every rotated element twice (itself and as its neighbour's partner, after a second
    load), which made QK-norm cost ~50% over plain RoPE at the same bytes (Llama 16384 tokens:
    148 vs 93 us on an H200); the SPLIT path normalizes each element once (sm_90 PTX: 41% fewer
    instructions per head at head_dim 128, 38% at 256). Its sum of squares adds in another order,
    so rstd may differ from the gather path's by an ulp (both within the tests' tolerance of eager).
    With full rotary and a power-of-2 head_dim, QK-norm takes SPLIT=2 (gather layout, the partner
    from registers): H200 sweep (tune_rope.py --schemes rope_qknorm, tune_rope_qknorm_h200.json),
    Llama shape 8 heads / 1 warp at 16384 tokens: SPLIT=2 109.6 us, SPLIT=1 134.5, old gather 138.7.
    Partial rotary at head_dim 256 (Qwen3.5 shape, SPLIT=1) takes 4 heads on 2 warps: the same sweep
    measured 114.0 us at 16384 tokens (97% of copy) and 30.2 us at 4096, against 153.7 / 38.0 us for
    the 2 heads / 1 warp this default had (the sweep's own "default" column was the plain-RoPE one).
    CONFIG_OVERRIDE, FXFUSE_ROPE_CONFIG, then `override` replace any of the keys. A SPLIT that the
    rotary dim does not allow (split_ok, reg_partner_ok) falls back to the gather path."""
    bd = triton.next_power_of_2(D)
    hmax = triton.next_power_of_2(max(HQ, HK, HV, 1))
    if norm:  # full rotary: the partner from registers (Llama shape, 16384 tokens: 134.5 -> 109.6 us on an H200)
        split = SPLIT_REG if reg_partner_ok(D, rot) else SPLIT_HALVES
        # head_dim 256: partial rotary as swept; full rotary not swept yet, the earlier 2 heads / 1 warp
        bh, warps = (8, 1) if bd <= 128 else (4, 2) if split == SPLIT_HALVES else (2, 1)
    else:
        per = 2048 if (bd > 128 and QUANT_DYNAMIC in (q_quant, k_quant)) else 1024  # elements per program
        bh, split, warps = max(1, per // bd), int(rot < D), 1 if bd <= 128 else 2
    cfg = dict(SPLIT=split, BLOCK_H=max(1, min(hmax, bh)), num_warps=warps)
    for o in (CONFIG_OVERRIDE, _env_config(), override or {}):
        bad = set(o) - set(_CONFIG_KEYS)
        if bad:
            raise ValueError(f"rope_quant launch config: unknown keys {sorted(bad)}")
        cfg.update({k: int(v) for k, v in o.items()})
    if cfg["BLOCK_H"] < 1 or cfg["BLOCK_H"] & (cfg["BLOCK_H"] - 1) or cfg["num_warps"] not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"rope_quant launch config: BLOCK_H must be a power of 2, num_warps 1..32: {cfg}")
    if cfg["SPLIT"] not in (SPLIT_GATHER, SPLIT_HALVES, SPLIT_REG):
        raise ValueError(f"rope_quant launch config: SPLIT must be 0, 1 or 2: {cfg}")
    if (cfg["SPLIT"] == SPLIT_HALVES and not split_ok(D, rot)) or (cfg["SPLIT"] == SPLIT_REG
                                                                   and not reg_partner_ok(D, rot)):
        cfg["SPLIT"] = SPLIT_GATHER
    return cfg


def _pass_blocks(n: int) -> tuple[int, int]:
    """SPLIT's passthrough chunks of n = D - ROT columns: (largest pow2 <= n, pow2 >= the rest or 0)."""
    if n <= 0:
        return 1, 0
    p1 = 1 << (n.bit_length() - 1)
    return p1, (triton.next_power_of_2(n - p1) if n > p1 else 0)


def _strides(shape: Sequence, order: Sequence[int]) -> list:
    """Strides of a [B, S, H, D] tensor laid out with dims `order` (outermost first) then D."""
    st = [0, 0, 0, 1]
    acc = shape[3]
    for d in reversed(list(order)):
        st[d] = acc
        acc = acc * shape[d]
    return st


def _scale_strides(shape: Sequence, order: Optional[Sequence[int]]) -> list:
    """Strides of a dynamic scale [B, S, H] laid out with dims `order` (None: contiguous)."""
    if order is not None and sorted(order) != [0, 1, 2]:
        raise ValueError(f"rope_quant: scale order {list(order)} is not a permutation of [0, 1, 2]")
    return _strides(list(shape) + [1], (0, 1, 2) if order is None else order)[:3]


def _alloc(q, k, out_dtype, q_quant, k_quant, need_q_rope, need_k_rope, q_order=(0, 1, 2), k_order=(0, 1, 2),
           store_k_fp8=True, q_scale_order=None, k_scale_order=None):
    dev = q.device
    outs = []
    for x, scheme, need, order, keep, sorder in ((q, q_quant, need_q_rope, q_order, True, q_scale_order),
                                                 (k, k_quant, need_k_rope, k_order, store_k_fp8, k_scale_order)):
        if x is None:
            outs += [torch.empty(_EMPTY, dtype=out_dtype, device=dev), torch.empty(_EMPTY, dtype=_QDTYPE, device=dev),
                     torch.empty(_EMPTY, dtype=torch.float32, device=dev)]
            continue
        B, S, H, D = x.shape
        st = _strides((B, S, H, D), order)
        outs.append(torch.empty_strided((B, S, H, D), st, dtype=out_dtype, device=dev) if need
                    else torch.empty(_EMPTY, dtype=out_dtype, device=dev))
        outs.append(torch.empty_strided((B, S, H, D), st, dtype=_QDTYPE, device=dev) if scheme and keep
                    else torch.empty(_EMPTY, dtype=_QDTYPE, device=dev))
        if scheme == QUANT_DYNAMIC:
            outs.append(torch.empty_strided((B, S, H), _scale_strides((B, S, H), sorder), dtype=torch.float32,
                                            device=dev))
        else:
            outs.append(torch.empty(_EMPTY if scheme == QUANT_NONE else (1,), dtype=torch.float32, device=dev))
    return outs


def _cache_args(c: Optional[dict], BH: int, dummy: torch.Tensor) -> tuple[int, dict, dict]:
    """(v head blocks, runtime args, constexprs) of the KV-cache write (`c` None: no write)."""
    if c is None:  # every argument explicit: Inductor's mutation analysis wants the full signature
        return 0, dict(v_ptr=dummy, kc_ptr=dummy, vc_ptr=dummy, slot_ptr=dummy, vscale_ptr=dummy, n_slots=0,
                       n_vslots=0, n_tok=0, n_v=0, HV=0, skc=0, skc_h=0, svc=0, svc_h=0, svb=0, svs=0, svh=0,
                       v_static=1.0, v_qmin=-448.0, v_qmax=448.0, skc_b=0, svc_b=0), dict(
            HAS_CACHE=False, SLOT_BY_S=False, NEG_SKIP=False, K_CACHE_FP8=False, K_CACHE_U8=False, V_CACHE_U8=False, STORE_KQ=True,
            V_QUANT=False, V_SCALE_T=False, V_MUL=False)
    v, kc, vc = c["v"], c["k_cache"], c["v_cache"]
    H, D = kc.shape[-2], kc.shape[-1]
    HV = v.shape[2]
    rt = dict(v_ptr=v, kc_ptr=kc, vc_ptr=vc, slot_ptr=c["slots"],
              vscale_ptr=c["v_scale"] if c["v_scale"] is not None else dummy,
              n_slots=kc.numel() // (H * D), n_vslots=vc.numel() // (vc.shape[-2] * vc.shape[-1]), n_tok=c["slots"].shape[0], n_v=v.shape[1], HV=HV, skc=H * D, skc_h=D, svc=vc.shape[-2] * vc.shape[-1],
              svc_h=vc.shape[-1], svb=v.stride(0), svs=v.stride(1), svh=v.stride(2),
              v_static=float(c["v_static"]), v_qmin=float(c["v_qmin"]), v_qmax=float(c["v_qmax"]), skc_b=0, svc_b=0)
    if c["cache_bhsd"]:  # contiguous [B, H, max_len, D]: slot stride D, head stride max_len * D
        rt.update(n_slots=kc.shape[2], n_vslots=vc.shape[2], skc=kc.stride(2), skc_h=kc.stride(1), skc_b=kc.stride(0),
                  svc=vc.stride(2), svc_h=vc.stride(1), svc_b=vc.stride(0))
    ce = dict(HAS_CACHE=True, SLOT_BY_S=bool(c["cache_bhsd"]), NEG_SKIP=bool(c["neg_skip"]), K_CACHE_FP8=bool(c["k_cache_fp8"]),
              K_CACHE_U8=kc.dtype == torch.uint8, V_CACHE_U8=vc.dtype == torch.uint8,
              STORE_KQ=bool(c["store_k_fp8"]), V_QUANT=bool(c["v_quant"]), V_SCALE_T=c["v_scale"] is not None,
              V_MUL=bool(c["v_mul"]))
    return triton.cdiv(HV, BH), rt, ce


def _launch(kernel, a: dict, outs, num_warps=None, cache: Optional[dict] = None,
            config: Optional[dict[str, int]] = None):
    q, k, cos, sin, positions = a["q"], a["k"], a["cos"], a["sin"], a["positions"]
    q_scale, k_scale, qw, kw = a["q_scale"], a["k_scale"], a["q_norm_w"], a["k_norm_w"]
    B, S, HQ, D = q.shape
    HK = k.shape[2] if k is not None else 0
    HV = cache["v"].shape[2] if cache is not None else 0
    rot = int(a["rot_dim"])
    cfg = launch_config(D, rot, HQ, HK, HV, B * S, bool(a["neox"]), int(a["q_quant"]),
                        int(a["k_quant"]) if k is not None else 0, qw is not None or kw is not None,
                        cache is not None, override=config)
    BH = cfg["BLOCK_H"]
    nqb = triton.cdiv(HQ, BH)
    nkb = triton.cdiv(HK, BH) if k is not None else 0
    nvb, c_rt, c_ce = _cache_args(cache, BH, cos)
    qo, qq, qs, ko, kq, ks = outs
    need_q, need_k = bool(a["need_q_rope"]), bool(a["need_k_rope"]) and k is not None
    oq = qo if need_q else qq
    ok = ko if need_k else kq
    oqs = [oq.stride(i) for i in range(3)] if oq.dim() == 4 else [0, 0, 0]
    oks = [ok.stride(i) for i in range(3)] if ok.dim() == 4 else [0, 0, 0]
    sqs_ = list(qs.stride()) if qs.dim() == 3 else [0, 0, 0]  # dynamic scales [B, S, H], any layout
    sks_ = list(ks.stride()) if ks.dim() == 3 else [0, 0, 0]
    if need_q and a["q_quant"] and list(qq.stride()) != list(qo.stride()):
        raise ValueError("rope_quant: q rope and fp8 outputs must share a layout")
    if need_k and a["k_quant"] and kq.dim() == 4 and list(kq.stride()) != list(ko.stride()):
        raise ValueError("rope_quant: k rope and fp8 outputs must share a layout")
    qops, qc = pad_scale_chain(a["q_ops"], a["q_consts"])
    kops, kc = pad_scale_chain(a["k_ops"], a["k_consts"])
    kk = k if k is not None else q
    bd = triton.next_power_of_2(D)
    norm_dt = a["norm_dtype"] or q.dtype
    wsum = a["norm_wsum_dtype"]
    p1, p2 = _pass_blocks(D - rot)
    kernel[(B * S, nqb + nkb + nvb)](
        q, kk, cos, sin, positions if positions is not None else cos,
        q_scale if q_scale is not None else cos, k_scale if k_scale is not None else cos,
        qw if qw is not None else cos, kw if kw is not None else cos,
        qo, qq, qs, ko, kq, ks,
        S, HQ, HK, nqb,
        q.stride(0), q.stride(1), q.stride(2), kk.stride(0), kk.stride(1), kk.stride(2),
        cos.stride(0), sin.stride(0),
        oqs[0], oqs[1], oqs[2], oks[0], oks[1], oks[2],
        sqs_[0], sqs_[1], sqs_[2], sks_[0], sks_[1], sks_[2],
        float(a["q_static"]), qc[0], qc[1], qc[2], qc[3], float(a["k_static"]), kc[0], kc[1], kc[2], kc[3],
        float(a["qmin"]), float(a["qmax"]), float(a["q_eps"]), float(a["k_eps"]), float(a["norm_woff"]), 1.0,
        D=D, ROT=int(a["rot_dim"]), NEOX=bool(a["neox"]), COS_HALF=bool(a["cos_half"]),
        OUT_DT=_DT_CODE[a["math_dtype"] or a["out_dtype"]], HAS_POS=positions is not None,  # stores cast to out
        Q_NORM=qw is not None, K_NORM=kw is not None and k is not None, X_DT=_DT_CODE[q.dtype],
        NORM_DT=_DT_CODE[norm_dt], WSUM_DT=-1 if wsum is None else _DT_CODE[wsum],
        ROUND_BEFORE_W=bool(a["norm_round_before"]),
        NEED_Q=need_q, Q_QUANT=int(a["q_quant"]), Q_SCALE_T=q_scale is not None, Q_MUL=bool(a["q_mul"]),
        QOP0=qops[0], QOP1=qops[1], QOP2=qops[2], QOP3=qops[3],
        NEED_K=need_k, K_QUANT=int(a["k_quant"]) if k is not None else 0,
        K_SCALE_T=k_scale is not None, K_MUL=bool(a["k_mul"]),
        KOP0=kops[0], KOP1=kops[1], KOP2=kops[2], KOP3=kops[3],
        HAS_K=k is not None, BLOCK_H=BH, BLOCK_D=bd,
        NATIVE=os.environ.get("TRITON_INTERPRET", "0") != "1",
        NKB=nkb, **c_rt, **c_ce,
        SPLIT=int(cfg["SPLIT"]), BLOCK_P=p1, BLOCK_P2=p2,
        qeps_ptr=a["q_eps_tensor"] if a["q_eps_tensor"] is not None else cos,
        keps_ptr=a["k_eps_tensor"] if a["k_eps_tensor"] is not None else cos,
        Q_EPS_T=a["q_eps_tensor"] is not None, K_EPS_T=a["k_eps_tensor"] is not None,
        num_warps=num_warps or cfg["num_warps"],
    )


# ----------------------------------------------------------------------------- custom op


@triton_op("fxfuse::rope_quant", mutates_args=())
def rope_quant(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: Optional[torch.Tensor],
    q_scale: Optional[torch.Tensor],
    k_scale: Optional[torch.Tensor],
    rot_dim: int,
    neox: bool,
    cos_half: bool,
    out_dtype: torch.dtype,
    q_quant: int,
    q_static: float,
    q_ops: list[int],
    q_consts: list[float],
    q_mul: bool,
    k_quant: int,
    k_static: float,
    k_ops: list[int],
    k_consts: list[float],
    k_mul: bool,
    qmin: float,
    qmax: float,
    need_q_rope: bool,
    need_k_rope: bool,
    q_order: list[int],
    k_order: list[int],
    q_norm_w: Optional[torch.Tensor] = None,
    k_norm_w: Optional[torch.Tensor] = None,
    q_eps: float = 1e-6,
    k_eps: float = 1e-6,
    norm_woff: float = 0.0,
    norm_round_before: bool = True,
    norm_wsum_dtype: Optional[torch.dtype] = None,
    norm_dtype: Optional[torch.dtype] = None,
    math_dtype: Optional[torch.dtype] = None,
    q_scale_order: Optional[list[int]] = None,
    k_scale_order: Optional[list[int]] = None,
    q_eps_tensor: Optional[torch.Tensor] = None,
    k_eps_tensor: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused (QK-norm +) RoPE (+fp8 quant) of q and k -> (q_rope, q_fp8, q_scales, k_rope, k_fp8, k_scales)."""
    args = (q, k, cos, sin, positions, q_scale, k_scale, rot_dim, neox, cos_half, out_dtype,
            q_quant, q_static, q_ops, q_consts, q_mul, k_quant, k_static, k_ops, k_consts, k_mul,
            qmin, qmax, need_q_rope, need_k_rope, q_order, k_order, q_norm_w, k_norm_w, q_eps, k_eps,
            norm_woff, norm_round_before, norm_wsum_dtype, norm_dtype, math_dtype, q_scale_order, k_scale_order,
            q_eps_tensor, k_eps_tensor)
    if q.device.type == "cpu":
        return _rope_quant_cpu(*args)
    a = _bind(args, {})
    _check(a)
    outs = _alloc(q, k, out_dtype, q_quant, k_quant, need_q_rope, need_k_rope, q_order, k_order,
                  q_scale_order=q_scale_order, k_scale_order=k_scale_order)
    _launch(wrap_triton(_rope_quant_kernel), a, outs)
    return tuple(outs)


def _rope_quant_cpu(*args):
    """CPU has no Triton: the reference (fresh, non-aliasing outputs)."""
    return tuple(rope_quant_reference(*args))


rope_quant.register_kernel("cpu")(_rope_quant_cpu)


# ----------------------------------------------------------------------------- + KV-cache write

_ROPE_PARAMS = ("q", "k", "cos", "sin", "positions", "q_scale", "k_scale", "rot_dim", "neox", "cos_half", "out_dtype",
                "q_quant", "q_static", "q_ops", "q_consts", "q_mul", "k_quant", "k_static", "k_ops", "k_consts",
                "k_mul", "qmin", "qmax", "need_q_rope", "need_k_rope", "q_order", "k_order")
_CACHE_PARAMS = ("v", "k_cache", "v_cache", "slots", "v_scale", "k_cache_fp8", "store_k_fp8", "v_quant", "v_static",
                 "v_mul", "v_qmin", "v_qmax", "neg_skip")
_CACHE_ALL = _CACHE_PARAMS + ("cache_bhsd",)  # cache_bhsd: keyword (default False) after the QK-norm ones


def check_cache_args(c: dict, k: Optional[torch.Tensor], out_dtype: torch.dtype, k_quant: int) -> None:
    """Raise ValueError on an unsupported cache write (the FX side pre-checks all of this)."""
    v, kc, vc, slots = c["v"], c["k_cache"], c["v_cache"], c["slots"]
    if c["cache_bhsd"]:  # [B, H, max_len, D] caches; k, v [B, S, H, D]; position s -> slot slots[s] of row b
        if k is None or v.dim() != 4 or v.shape[0] != k.shape[0] or v.shape[3] != k.shape[3]:
            raise ValueError("rope_quant_cache: k and v must be [B, S, H, D] with the same B and D")
        for name, t, h in (("k_cache", kc, k.shape[2]), ("v_cache", vc, v.shape[2])):
            if t.dim() != 4 or tuple(t.shape[:2]) != (k.shape[0], h) or t.shape[3] != k.shape[3] or not t.is_contiguous():
                raise ValueError(f"rope_quant_cache: {name} must be contiguous [{k.shape[0]}, {h}, max_len, {k.shape[3]}]")
        n_max = k.shape[1]
    else:
        if k is None or v.dim() != 4 or v.shape[0] != 1 or k.shape[0] != 1 or v.shape[3] != k.shape[3]:
            raise ValueError("rope_quant_cache: k and v must be token-major [1, T, H, D] (v's T may differ)")
        for name, t, h in (("k_cache", kc, k.shape[2]), ("v_cache", vc, v.shape[2])):
            if t.dim() < 3 or t.shape[-2] != h or t.shape[-1] != k.shape[3] or not t.is_contiguous():
                raise ValueError(f"rope_quant_cache: {name} must be contiguous [..., {h}, {k.shape[3]}]")
        n_max = k.shape[0] * k.shape[1]
    if slots.dim() != 1 or slots.shape[0] > n_max or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError("rope_quant_cache: slots must be 1-D int32/int64, one per token (the first len(slots) tokens)")
    fp8 = (_QDTYPE, torch.uint8)
    if c["k_cache_fp8"] and (k_quant != QUANT_STATIC or kc.dtype not in fp8):
        raise ValueError("rope_quant_cache: an fp8 k cache needs static fp8 quant of k")
    if not c["k_cache_fp8"] and kc.dtype != out_dtype:
        raise ValueError("rope_quant_cache: k cache dtype differs from the rope output dtype")
    if (vc.dtype in fp8) != bool(c["v_quant"]) or (not c["v_quant"] and vc.dtype != v.dtype):
        raise ValueError("rope_quant_cache: v cache dtype does not match v (or its fp8 quant)")
    if not c["store_k_fp8"] and c["k_cache_fp8"] is False and k_quant != QUANT_NONE:
        raise ValueError("rope_quant_cache: k is quantized but its fp8 output is neither stored nor cached")


def _write_rows(cache: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, neg_skip: bool) -> None:
    """cache (viewed [N, H, D]) rows slots[i] <- rows[i]: slot < 0 skipped (neg_skip) or wrapped (index_put)."""
    H, D = cache.shape[-2], cache.shape[-1]
    flat = cache.view(-1, H, D)
    if rows.dtype != cache.dtype:
        rows = rows.view(cache.dtype)  # fp8 bits into a uint8 cache
    s = slots.long()
    if not neg_skip:
        flat.index_put_((s,), rows)
        return
    n = flat.shape[0]
    pad = torch.cat((flat, flat[:1]))  # row n: where skipped tokens go (no data-dependent shapes)
    pad.index_put_((torch.where(s >= 0, s, n),), rows)
    flat.copy_(pad[:n])


def _write_rows_bhsd(cache: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, neg_skip: bool) -> None:
    """cache [B, H, L, D] at [:, :, slots[i]] <- rows[:, i] ([B, n, H, D]); slot < 0 skipped or wrapped."""
    if rows.dtype != cache.dtype:
        rows = rows.view(cache.dtype)
    s = slots.long()
    if neg_skip:
        keep = s >= 0
        s, rows = s[keep], rows[:, keep]
    cache[:, :, s] = rows.permute(0, 2, 1, 3)


def rope_quant_cache_reference(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
    """Oracle of the fused op with the KV-cache write: rope_quant_reference, then k (rope or fp8)
    and v (fp8 when v_quant) written into k_cache / v_cache (mutated) at `slots`."""
    a = _bind_cache(args, kwargs)
    c = {n: a.pop(n) for n in _CACHE_ALL}
    check_cache_args(c, a["k"], a["out_dtype"], a["k_quant"])
    need_k = a["need_k_rope"]
    a["need_k_rope"] = True
    outs = list(rope_quant_reference(**a))
    k = a["k"]
    B, S, HK, D = k.shape
    n = c["slots"].shape[0]  # the first n tokens are written (k and v hold at least n in a valid graph)
    kout = outs[4] if c["k_cache_fp8"] else outs[3]
    bhsd = c["cache_bhsd"]
    krows = kout[:, :n] if bhsd else kout.reshape(B * S, HK, D)[:n]
    v = c["v"][:, :n] if bhsd else c["v"][0, :n]
    if c["v_quant"]:
        sc = c["v_scale"].reshape(()) if c["v_scale"] is not None else torch.tensor(c["v_static"], device=v.device)
        v, _ = _quant_ref(v, QUANT_STATIC, sc, c["v_static"], [], [], c["v_mul"], c["v_qmin"], c["v_qmax"])
    write = _write_rows_bhsd if bhsd else _write_rows
    write(c["k_cache"], krows, c["slots"], c["neg_skip"])
    write(c["v_cache"], v, c["slots"], c["neg_skip"])
    if not need_k:
        outs[3] = torch.empty(_EMPTY, dtype=outs[3].dtype, device=k.device)
    if not c["store_k_fp8"]:
        outs[4] = torch.empty(_EMPTY, dtype=_QDTYPE, device=k.device)
    return tuple(outs)


_NORM_DEFAULTS = dict(q_norm_w=None, k_norm_w=None, q_eps=1e-6, k_eps=1e-6, norm_woff=0.0, norm_round_before=True,
                      norm_wsum_dtype=None, norm_dtype=None, math_dtype=None, cache_bhsd=False,
                      q_scale_order=None, k_scale_order=None, q_eps_tensor=None, k_eps_tensor=None)


def _bind_cache(args: tuple, kwargs: dict) -> dict:
    """The cache op's arguments by name: rope args, cache args, then the QK-norm ones (defaults filled in)."""
    names = _ROPE_PARAMS + _CACHE_PARAMS + tuple(_NORM_DEFAULTS)
    a = dict(_NORM_DEFAULTS)
    a.update(zip(names, args))
    a.update(kwargs)
    missing = [n for n in names if n not in a]
    if missing:
        raise TypeError(f"rope_quant_cache: missing arguments {missing}")
    return a


@triton_op("fxfuse::rope_quant_cache", mutates_args=("k_cache", "v_cache"))
def rope_quant_cache(
    q: torch.Tensor, k: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
    positions: Optional[torch.Tensor], q_scale: Optional[torch.Tensor], k_scale: Optional[torch.Tensor],
    rot_dim: int, neox: bool, cos_half: bool, out_dtype: torch.dtype,
    q_quant: int, q_static: float, q_ops: list[int], q_consts: list[float], q_mul: bool,
    k_quant: int, k_static: float, k_ops: list[int], k_consts: list[float], k_mul: bool,
    qmin: float, qmax: float, need_q_rope: bool, need_k_rope: bool, q_order: list[int], k_order: list[int],
    v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
    v_scale: Optional[torch.Tensor], k_cache_fp8: bool, store_k_fp8: bool, v_quant: bool, v_static: float,
    v_mul: bool, v_qmin: float, v_qmax: float, neg_skip: bool,
    q_norm_w: Optional[torch.Tensor] = None, k_norm_w: Optional[torch.Tensor] = None,
    q_eps: float = 1e-6, k_eps: float = 1e-6, norm_woff: float = 0.0, norm_round_before: bool = True,
    norm_wsum_dtype: Optional[torch.dtype] = None, norm_dtype: Optional[torch.dtype] = None,
    math_dtype: Optional[torch.dtype] = None, cache_bhsd: bool = False,
    q_scale_order: Optional[list[int]] = None, k_scale_order: Optional[list[int]] = None,
    q_eps_tensor: Optional[torch.Tensor] = None, k_eps_tensor: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """rope_quant + the KV-cache write in the same launch: k (rope, or its fp8 quant) and v (fp8 when
    v_quant) stored into k_cache / v_cache (mutated in place) at `slots`.

    Traced under FunctionalTensorMode (the pass does) this becomes, on CUDA,
    `triton_kernel_wrapper_functional(..., tensors_to_clone=[.., k_cache, v_cache])`, and on CPU
    `auto_functionalized_v2(fxfuse.rope_quant_cache_ref)`; Inductor's reinplacing then drops the
    cache clones, as the caches are graph inputs only copied back at the end."""
    kw = {n: v_ for n, v_ in locals().items()}
    if q.device.type == "cpu":
        return _rope_quant_cache_ref_op(**kw)
    c = {n: kw.pop(n) for n in _CACHE_ALL}
    a = _bind((), kw)
    _check(a)
    check_cache_args(c, k, out_dtype, k_quant)
    outs = _alloc(q, k, out_dtype, q_quant, k_quant, need_q_rope, need_k_rope, q_order, k_order, store_k_fp8,
                  q_scale_order, k_scale_order)
    _launch(wrap_triton(_rope_quant_kernel), a, outs, cache=c)
    return tuple(outs)


# the CPU reference as a mutating custom op of the same schema (auto_functionalized in a compiled graph)
_SCHEMA = str(rope_quant_cache._opoverload._schema)
_rope_quant_cache_ref_op = torch.library.custom_op(
    "fxfuse::rope_quant_cache_ref", rope_quant_cache_reference, mutates_args=("k_cache", "v_cache"),
    schema=_SCHEMA[_SCHEMA.index("("):],
)


@_rope_quant_cache_ref_op.register_fake
def _(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
    a = _bind_cache(args, kwargs)
    c = {n: a.pop(n) for n in _CACHE_ALL}
    return tuple(_alloc(a["q"], a["k"], a["out_dtype"], a["q_quant"], a["k_quant"], a["need_q_rope"],
                        a["need_k_rope"], a["q_order"], a["k_order"], c["store_k_fp8"], a["q_scale_order"],
                        a["k_scale_order"]))


def rope_quant_cache_triton(*args: Any, out=None, num_warps: Optional[int] = None,
                            config: Optional[dict[str, int]] = None, **kwargs: Any) -> tuple[torch.Tensor, ...]:
    """Launch the raw kernel with the cache write (eager CUDA, or CPU under TRITON_INTERPRET=1).

    `config` overrides launch_config's keys (tuning sweeps)."""
    a = _bind_cache(args, kwargs)
    c = {n: a.pop(n) for n in _CACHE_ALL}
    _check(a)
    check_cache_args(c, a["k"], a["out_dtype"], a["k_quant"])
    q = a["q"]
    outs = list(out) if out is not None else _alloc(q, a["k"], a["out_dtype"], a["q_quant"], a["k_quant"],
                                                    a["need_q_rope"], a["need_k_rope"], a["q_order"], a["k_order"],
                                                    c["store_k_fp8"], a["q_scale_order"], a["k_scale_order"])
    if q.shape[0] * q.shape[1] > 0:
        _launch(_rope_quant_kernel, a, outs, num_warps=num_warps, cache=c, config=config)
    return tuple(outs)


def _bind(args: tuple, kwargs: dict) -> dict:
    """The op's arguments by name (defaults filled in)."""
    import inspect

    ba = inspect.signature(rope_quant_reference).bind(*args, **kwargs)
    ba.apply_defaults()
    return dict(ba.arguments)


def _check(a: dict) -> None:
    for name in ("q_eps_tensor", "k_eps_tensor"):
        check_eps_tensor("rope_quant", name, a.get(name), a["q"].device)
    if a.get("math_dtype") is not None and (a["q_quant"] or a["k_quant"]):
        raise ValueError("rope_quant: math_dtype with a quantized output is not supported")
    check_args(a["q"], a["k"], a["cos"], a["sin"], a["positions"], a["rot_dim"], a["cos_half"], a["out_dtype"],
               a["q_quant"], a["k_quant"], a["q_ops"], a["k_ops"], a["norm_dtype"])


def rope_quant_triton(*args, out=None, num_warps: Optional[int] = None, config: Optional[dict[str, int]] = None,
                      **kwargs) -> tuple[torch.Tensor, ...]:
    """Launch the raw kernel (eager CUDA, or CPU under TRITON_INTERPRET=1); same args as the op.

    `out` (6 tensors) lets tests poison the outputs before the launch; `config` overrides
    launch_config's keys (tuning sweeps).
    """
    a = _bind(args, kwargs)
    _check(a)
    q = a["q"]
    outs = list(out) if out is not None else _alloc(q, a["k"], a["out_dtype"], a["q_quant"], a["k_quant"],
                                                    a["need_q_rope"], a["need_k_rope"], a["q_order"], a["k_order"],
                                                    q_scale_order=a["q_scale_order"], k_scale_order=a["k_scale_order"])
    if q.shape[0] * q.shape[1] > 0:
        _launch(_rope_quant_kernel, a, outs, num_warps=num_warps, config=config)
    return tuple(outs)


def bytes_moved(M: int, hq: int, hk: int, D: int, dtype: torch.dtype = torch.bfloat16, rot_dim: int | None = None,
                q_quant: bool = False, k_quant: bool = False, need_rope: bool = True,
                positions: bool = False) -> int:
    """Minimum HBM bytes read + written by one call (cos/sin rows read once per token)."""
    es = torch.empty((), dtype=dtype).element_size()
    rot = rot_dim or D
    read = M * (hq + hk) * D * es + M * 2 * rot * es + (M * 8 if positions else 0)
    write = 0
    for h, qz in ((hq, q_quant), (hk, k_quant)):
        if need_rope or not qz:
            write += M * h * D * es
        if qz:
            write += M * h * D
    return read + write
