"""Fused RMSNorm(+residual add) + quantization as one Triton kernel.

This module knows nothing about FX.  It provides:

* :func:`rms_norm_quant_reference` -- pure-torch oracle with the exact semantics
  (also the CPU kernel of the custom op).
* ``torch.ops.fxfuse.rms_norm_quant`` -- a ``torch.library.triton_op`` whose body
  launches the kernel through ``wrap_triton`` so that, when traced under
  FunctionalTensorMode, it becomes a ``triton_kernel_wrapper_functional`` HOP that
  Inductor emits as a user-defined Triton kernel.
* :func:`rms_norm_quant_triton` -- plain launcher (eager CUDA, or CPU tensors under
  ``TRITON_INTERPRET=1``), optionally writing into caller-provided buffers.
* :func:`bytes_moved` -- HBM traffic model for benchmarks.

Semantics per row (fp32 unless stated)::

    h = (x + residual) rounded to x.dtype    (or x)
    v = h.f32; r = 1 / sqrt(mean(v*v) + eps); n = v * r
    if round_before_weight: n = n.to(x.dtype).f32
    if weight: n = n * w_eff,  w_eff = w.f32 + weight_offset  [rounded via weight_sum_dtype]
    y = n.to(norm_dtype).f32
    base = static scale | amax(|y|) per row | amax(|y|) per group
    s = scale-op chain(base)
    q = clamp(rint?(y / s  or  y * s), qmin, qmax).to(quant_dtype)

All rounding steps (bf16, fp8 e4m3fn, round-half-even) are done with portable
fp32/bit tricks so that compiled Triton and ``TRITON_INTERPRET=1`` produce the
same bits as torch (the interpreter's own bf16/fp8 casts are not RNE).
"""

from __future__ import annotations

import os

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .accesses import accesses, declare
from .quant_common import (  # noqa: F401  (scheme/scale-op codes re-exported: part of this op's interface)
    MAX_SCALE_OPS,
    SCALE_CLAMP_MAX,
    SCALE_CLAMP_MIN,
    SCALE_DIV,
    SCALE_MUL,
    DT_CODE as _DT_CODE,
    SCALE_RDIV,
    SCALE_RECIP,
    SCALE_ROUND_BF16,
    SCALE_ROUND_F16,
    SCHEME_PER_GROUP,
    SCHEME_PER_TOKEN,
    SCHEME_STATIC,
    check_eps_tensor,
    check_quant_args,
    pad_scale_chain,
    quantize_reference,
    quantize_store_row,
    round_to,
    row_tile,
    scales_bytes,
    scales_shape,
)

__all__ = [
    "SCHEME_STATIC",
    "SCHEME_PER_TOKEN",
    "SCHEME_PER_GROUP",
    "SCALE_MUL",
    "SCALE_DIV",
    "SCALE_RDIV",
    "SCALE_CLAMP_MIN",
    "SCALE_CLAMP_MAX",
    "SCALE_RECIP",
    "SCALE_ROUND_BF16",
    "SCALE_ROUND_F16",
    "MAX_SCALE_OPS",
    "rms_norm_quant",
    "rms_norm_quant_reference",
    "rms_norm_quant_triton",
    "default_num_warps",
    "bytes_moved",
    "check_args",
]

# ----------------------------------------------------------------------------
# Dtypes (scheme and scale-op codes live in quant_common)
# ----------------------------------------------------------------------------
_X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_NORM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# ----------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------


def check_args(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    weight_sum_dtype: Optional[torch.dtype],
    norm_dtype: torch.dtype,
    quant_dtype: torch.dtype,
    scheme: int,
    group_size: int,
    scale_ops: Sequence[int],
    scale_consts: Sequence[float],
    for_triton: bool = False,
    eps_tensor: Optional[torch.Tensor] = None,
) -> None:
    """Raise ValueError on unsupported inputs (last line of defense; FX side pre-checks)."""
    if x.dim() != 2:
        raise ValueError(f"rms_norm_quant: x must be 2-D [M, H], got shape {tuple(x.shape)}")
    if x.dtype not in _X_DTYPES:
        raise ValueError(f"rms_norm_quant: x dtype {x.dtype} unsupported (bf16/fp16/fp32)")
    H = x.shape[1]
    if for_triton and x.stride(1) != 1:
        raise ValueError("rms_norm_quant: x rows must be contiguous (x.stride(1) == 1)")
    if residual is not None:
        if residual.dim() != 2 or residual.shape != x.shape:
            raise ValueError(
                f"rms_norm_quant: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}"
            )
        if residual.dtype != x.dtype:
            raise ValueError(f"rms_norm_quant: residual dtype {residual.dtype} != x dtype {x.dtype}")
        if for_triton and residual.stride(1) != 1:
            raise ValueError("rms_norm_quant: residual rows must be contiguous (stride(1) == 1)")
        if residual.device != x.device:
            raise ValueError("rms_norm_quant: residual on a different device than x")
    if weight is not None:
        if weight.dim() != 1 or weight.shape[0] != H:
            raise ValueError(f"rms_norm_quant: weight must be [H={H}], got {tuple(weight.shape)}")
        if not weight.dtype.is_floating_point or weight.dtype not in _X_DTYPES:
            raise ValueError(f"rms_norm_quant: weight dtype {weight.dtype} unsupported")
        if weight.device != x.device:
            raise ValueError("rms_norm_quant: weight on a different device than x")
    if weight_sum_dtype is not None and weight_sum_dtype not in _NORM_DTYPES:
        raise ValueError(f"rms_norm_quant: weight_sum_dtype {weight_sum_dtype} unsupported")
    if norm_dtype not in _NORM_DTYPES:
        raise ValueError(f"rms_norm_quant: norm_dtype {norm_dtype} unsupported")
    check_quant_args("rms_norm_quant", H, x.device, scale, quant_dtype, scheme, group_size, scale_ops,
                     scale_consts, for_triton)
    check_eps_tensor("rms_norm_quant", "eps_tensor", eps_tensor, x.device)


# ----------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------


def rms_norm_quant_reference(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    eps: float,
    weight_offset: float,
    weight_sum_dtype: Optional[torch.dtype],
    round_before_weight: bool,
    norm_dtype: torch.dtype,
    quant_dtype: torch.dtype,
    scheme: int,
    group_size: int,
    static_scale_value: float,
    scale_ops: Sequence[int],
    scale_consts: Sequence[float],
    quant_mul: bool,
    qmin: float,
    qmax: float,
    round_to_int: bool,
    need_residual_out: bool,
    scale_ub: Optional[torch.Tensor] = None,
    ub_slot: int = -1,
    eps_tensor: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-torch oracle (any device); returns (q, scales, h) exactly as the op specifies.

    `eps_tensor` (one element, x's device) replaces `eps`: a float attribute that dynamic=True
    lifted into a graph input, read at run time.
    """
    check_args(x, residual, weight, scale, weight_sum_dtype, norm_dtype, quant_dtype, scheme,
               group_size, scale_ops, scale_consts, eps_tensor=eps_tensor)
    f32 = torch.float32
    M, H = x.shape
    if residual is not None:
        h = (x.to(f32) + residual.to(f32)).to(x.dtype)
    else:
        h = x
    v = h.to(f32)
    ms = (v * v).mean(dim=-1, keepdim=True)
    eps_t = eps_tensor.reshape(()).to(f32) if eps_tensor is not None else torch.tensor(eps, dtype=f32, device=x.device)
    r = torch.reciprocal(torch.sqrt(ms + eps_t))
    n = v * r
    if round_before_weight:
        n = n.to(x.dtype).to(f32)
    if weight is not None:
        w = weight.to(f32) + torch.tensor(weight_offset, dtype=f32, device=x.device)
        if weight_sum_dtype is not None:
            w = w.to(weight_sum_dtype).to(f32)
        n = n * w
    y = n.to(norm_dtype).to(f32)

    q, scales = quantize_reference(y, scheme, group_size, scale, static_scale_value, scale_ops,
                                   scale_consts, quant_mul, qmin, qmax, round_to_int, quant_dtype,
                                   scale_ub, ub_slot)
    if need_residual_out:
        h_out = h.clone() if residual is not None else x.clone()
        h_out = h_out.contiguous()
    else:
        h_out = torch.empty((0,), dtype=x.dtype, device=x.device)
    return q, scales, h_out


# ----------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------


@triton.jit
def _rms_norm_quant_kernel(
    x_ptr, res_ptr, w_ptr, scale_ptr, ub_ptr, eps_ptr,
    q_ptr, s_out_ptr, h_ptr,
    stride_x, stride_r, stride_q, stride_h,
    H, NG,
    eps, weight_offset, static_scale_value,
    c0, c1, c2, c3, qmin, qmax,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_SCALE_T: tl.constexpr,
    NEED_H: tl.constexpr, X_DT: tl.constexpr, NORM_DT: tl.constexpr, WSUM_DT: tl.constexpr,
    ROUND_BEFORE_W: tl.constexpr, SCHEME: tl.constexpr,
    OP0: tl.constexpr, OP1: tl.constexpr, OP2: tl.constexpr, OP3: tl.constexpr,
    QUANT_MUL: tl.constexpr, ROUND_INT: tl.constexpr, Q_INT8: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr, NATIVE: tl.constexpr = False,
    UB_SLOT: tl.constexpr = -1, EPS_T: tl.constexpr = False,
):
    """One program per row; the row lives in registers as a [BLOCK_R, BLOCK_G] tile.

    For the per-group scheme BLOCK_G is the group size and each tile row is a group;
    otherwise BLOCK_R == 1 and BLOCK_G = next_pow2(H).  HBM is touched once:
    read x (+residual, weight), write h, q, scales.
    """
    # Inductor may pass Python floats as fp64 scalars: all scalar math here is fp32 (the graph's
    # constants are fp32-rounded already, so this matches eager); the quant epilogue casts its own
    if EPS_T:
        eps = tl.load(eps_ptr).to(tl.float32)  # a lifted float attribute: read on every call
    else:
        eps = tl.cast(eps, tl.float32)
    weight_offset = tl.cast(weight_offset, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    g_idx = tl.arange(0, BLOCK_R)
    offs = g_idx[:, None] * BLOCK_G + tl.arange(0, BLOCK_G)[None, :]
    mask = offs < H

    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        v = round_to(x + r, X_DT, NATIVE)
    else:
        v = x
    if NEED_H:
        tl.store(h_ptr + row * stride_h + offs, v.to(h_ptr.dtype.element_ty), mask=mask)

    ss = tl.sum(tl.sum(v * v, axis=1), axis=0)
    ms = tl.math.div_rn(ss, (H + 0.0) + tl.zeros_like(ss))
    rstd = tl.math.div_rn(1.0 + tl.zeros_like(ss), tl.sqrt_rn(ms + eps))
    n = v * rstd
    if ROUND_BEFORE_W:
        n = round_to(n, X_DT, NATIVE)
    if HAS_W:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w = w + weight_offset
        if WSUM_DT >= 0:
            w = round_to(w, WSUM_DT, NATIVE)
        n = n * w
    y = round_to(n, NORM_DT, NATIVE)  # masked lanes are 0: they do not raise the amax
    quantize_store_row(y, row, g_idx, offs, mask, q_ptr, s_out_ptr, scale_ptr, ub_ptr, stride_q, NG,
                       static_scale_value, c0, c1, c2, c3, qmin, qmax,
                       HAS_SCALE_T, SCHEME, UB_SLOT, OP0, OP1, OP2, OP3, QUANT_MUL, ROUND_INT, Q_INT8, NATIVE)


@declare(_rms_norm_quant_kernel)
def _rms_norm_quant_accesses(a):
    reads = ["x_ptr"] + ["res_ptr"] * bool(a["HAS_RES"]) + ["w_ptr"] * bool(a["HAS_W"])
    reads += ["scale_ptr"] * (a["SCHEME"] == 0 and bool(a["HAS_SCALE_T"])) + ["ub_ptr"] * (a.get("UB_SLOT", -1) >= 0)
    reads += ["eps_ptr"] * bool(a.get("EPS_T", False))
    return accesses(reads, ["q_ptr", "s_out_ptr"] + ["h_ptr"] * bool(a["NEED_H"]))


def default_num_warps(block: int) -> int:
    """Warps per row-program by row width (benchmarks sweep this)."""
    if block <= 1024:
        return 4
    if block <= 2048:
        return 4
    if block <= 8192:
        return 8
    return 16


def _kernel_meta(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    weight_sum_dtype: Optional[torch.dtype],
    round_before_weight: bool,
    norm_dtype: torch.dtype,
    quant_dtype: torch.dtype,
    scheme: int,
    group_size: int,
    scale_ops: Sequence[int],
    quant_mul: bool,
    round_to_int: bool,
    need_residual_out: bool,
    num_warps: Optional[int],
) -> dict:
    """Constexpr kwargs + num_warps for the kernel (pure Python on shapes: fake-safe)."""
    block, block_g, block_r = row_tile(x.shape[1], scheme, group_size)
    ops, _ = pad_scale_chain(scale_ops, ())
    return dict(
        HAS_RES=residual is not None,
        HAS_W=weight is not None,
        HAS_SCALE_T=scale is not None,
        NEED_H=bool(need_residual_out),
        X_DT=_DT_CODE[x.dtype],
        NORM_DT=_DT_CODE[norm_dtype],
        WSUM_DT=-1 if weight_sum_dtype is None else _DT_CODE[weight_sum_dtype],
        ROUND_BEFORE_W=bool(round_before_weight),
        SCHEME=int(scheme),
        OP0=ops[0], OP1=ops[1], OP2=ops[2], OP3=ops[3],
        QUANT_MUL=bool(quant_mul),
        ROUND_INT=bool(round_to_int),
        Q_INT8=quant_dtype == torch.int8,
        BLOCK_G=block_g,
        BLOCK_R=block_r,
        NATIVE=os.environ.get("TRITON_INTERPRET", "0") != "1",
        num_warps=num_warps if num_warps is not None else default_num_warps(block),
    )


def _alloc_outputs(x: torch.Tensor, quant_dtype: torch.dtype, scheme: int, group_size: int,
                   need_residual_out: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    M, H = x.shape
    q = torch.empty((M, H), dtype=quant_dtype, device=x.device)
    s_shape, _ = scales_shape(M, H, scheme, group_size)
    scales = torch.empty(s_shape, dtype=torch.float32, device=x.device)
    h_shape = (M, H) if need_residual_out else (0,)
    h = torch.empty(h_shape, dtype=x.dtype, device=x.device)
    return q, scales, h


# ----------------------------------------------------------------------------
# Custom op
# ----------------------------------------------------------------------------


@triton_op("fxfuse::rms_norm_quant", mutates_args=())
def rms_norm_quant(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    eps: float,
    weight_offset: float,
    weight_sum_dtype: Optional[torch.dtype],
    round_before_weight: bool,
    norm_dtype: torch.dtype,
    quant_dtype: torch.dtype,
    scheme: int,
    group_size: int,
    static_scale_value: float,
    scale_ops: list[int],
    scale_consts: list[float],
    quant_mul: bool,
    qmin: float,
    qmax: float,
    round_to_int: bool,
    need_residual_out: bool,
    scale_ub: Optional[torch.Tensor] = None,
    ub_slot: int = -1,
    eps_tensor: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused RMSNorm(+residual)+quant -> (q, scales, h). Body doubles as the fake impl."""
    if x.device.type == "cpu":
        # No Triton on CPU: when this body is traced (fake impl / FunctionalTensorMode
        # decomposition under torch.compile on CPU) emit the reference's aten ops instead.
        return _rms_norm_quant_cpu(
            x, residual, weight, scale, eps, weight_offset, weight_sum_dtype,
            round_before_weight, norm_dtype, quant_dtype, scheme, group_size,
            static_scale_value, scale_ops, scale_consts, quant_mul, qmin, qmax,
            round_to_int, need_residual_out, scale_ub, ub_slot, eps_tensor)
    check_args(x, residual, weight, scale, weight_sum_dtype, norm_dtype, quant_dtype, scheme,
               group_size, scale_ops, scale_consts, for_triton=True, eps_tensor=eps_tensor)
    M = x.shape[0]
    H = x.shape[1]
    if weight is not None:
        weight = weight.contiguous()  # no-op for parameters; kernel assumes unit stride
    q, scales, h = _alloc_outputs(x, quant_dtype, scheme, group_size, need_residual_out)
    meta = _kernel_meta(x, residual, weight, scale, weight_sum_dtype, round_before_weight,
                        norm_dtype, quant_dtype, scheme, group_size, scale_ops, quant_mul,
                        round_to_int, need_residual_out, None)
    _, c = pad_scale_chain((), scale_consts)
    ng = H // group_size if scheme == SCHEME_PER_GROUP else 1
    res_arg = residual if residual is not None else x
    w_arg = weight if weight is not None else x
    s_arg = scale if scale is not None else x  # dummy, never read; must not alias an output
    stride_r = residual.stride(0) if residual is not None else 0
    stride_h = h.stride(0) if need_residual_out else 0
    wrap_triton(_rms_norm_quant_kernel)[(M,)](
        x, res_arg, w_arg, s_arg, scale_ub if scale_ub is not None else x,
        eps_tensor if eps_tensor is not None else x,
        q, scales, h,
        x.stride(0), stride_r, q.stride(0), stride_h,
        H, ng,
        float(eps), float(weight_offset), float(static_scale_value),
        c[0], c[1], c[2], c[3], float(qmin), float(qmax),
        UB_SLOT=int(ub_slot) if scale_ub is not None else -1,
        EPS_T=eps_tensor is not None,
        **meta,
    )
    return q, scales, h


def _rms_norm_quant_cpu(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    eps: float,
    weight_offset: float,
    weight_sum_dtype: Optional[torch.dtype],
    round_before_weight: bool,
    norm_dtype: torch.dtype,
    quant_dtype: torch.dtype,
    scheme: int,
    group_size: int,
    static_scale_value: float,
    scale_ops: list[int],
    scale_consts: list[float],
    quant_mul: bool,
    qmin: float,
    qmax: float,
    round_to_int: bool,
    need_residual_out: bool,
    scale_ub: Optional[torch.Tensor] = None,
    ub_slot: int = -1,
    eps_tensor: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPU has no Triton: run the reference (fresh, non-aliasing outputs)."""
    q, s, h = rms_norm_quant_reference(
        x, residual, weight, scale, eps, weight_offset, weight_sum_dtype, round_before_weight,
        norm_dtype, quant_dtype, scheme, group_size, static_scale_value, scale_ops, scale_consts,
        quant_mul, qmin, qmax, round_to_int, need_residual_out, scale_ub, ub_slot, eps_tensor)
    return q.contiguous(), s.contiguous(), h.contiguous()


rms_norm_quant.register_kernel("cpu")(_rms_norm_quant_cpu)


# ----------------------------------------------------------------------------
# Plain launcher
# ----------------------------------------------------------------------------


def rms_norm_quant_triton(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    eps: float,
    weight_offset: float,
    weight_sum_dtype: Optional[torch.dtype],
    round_before_weight: bool,
    norm_dtype: torch.dtype,
    quant_dtype: torch.dtype,
    scheme: int,
    group_size: int,
    static_scale_value: float,
    scale_ops: Sequence[int],
    scale_consts: Sequence[float],
    quant_mul: bool,
    qmin: float,
    qmax: float,
    round_to_int: bool,
    need_residual_out: bool,
    scale_ub: Optional[torch.Tensor] = None,
    ub_slot: int = -1,
    eps_tensor: Optional[torch.Tensor] = None,
    *,
    out: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    num_warps: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the raw kernel (no dispatcher): eager CUDA, or CPU under TRITON_INTERPRET=1.

    `out=(q, scales, h)` writes into caller buffers (tests poison them to catch unwritten
    elements); `num_warps` overrides the heuristic (benchmark sweeps).
    """
    check_args(x, residual, weight, scale, weight_sum_dtype, norm_dtype, quant_dtype, scheme,
               group_size, scale_ops, scale_consts, for_triton=True, eps_tensor=eps_tensor)
    M, H = x.shape
    if weight is not None:
        weight = weight.contiguous()
    if out is None:
        q, scales, h = _alloc_outputs(x, quant_dtype, scheme, group_size, need_residual_out)
    else:
        q, scales, h = out
        s_shape, _ = scales_shape(M, H, scheme, group_size)
        if q.shape != (M, H) or q.dtype != quant_dtype or q.stride(1) != 1:
            raise ValueError("rms_norm_quant: out q has wrong shape/dtype/layout")
        if tuple(scales.shape) != s_shape or scales.dtype != torch.float32 or not scales.is_contiguous():
            raise ValueError("rms_norm_quant: out scales has wrong shape/dtype/layout")
        if need_residual_out and (h.shape != (M, H) or h.dtype != x.dtype or h.stride(1) != 1):
            raise ValueError("rms_norm_quant: out h has wrong shape/dtype/layout")
    meta = _kernel_meta(x, residual, weight, scale, weight_sum_dtype, round_before_weight,
                        norm_dtype, quant_dtype, scheme, group_size, scale_ops, quant_mul,
                        round_to_int, need_residual_out, num_warps)
    _, c = pad_scale_chain((), scale_consts)
    ng = H // group_size if scheme == SCHEME_PER_GROUP else 1
    if M > 0:
        _rms_norm_quant_kernel[(M,)](
            x, residual if residual is not None else x, weight if weight is not None else x,
            scale if scale is not None else x, scale_ub if scale_ub is not None else x,
            eps_tensor if eps_tensor is not None else x,
            q, scales, h,
            x.stride(0), residual.stride(0) if residual is not None else 0, q.stride(0),
            h.stride(0) if need_residual_out else 0,
            H, ng,
            float(eps), float(weight_offset), float(static_scale_value),
            c[0], c[1], c[2], c[3], float(qmin), float(qmax),
            UB_SLOT=int(ub_slot) if scale_ub is not None else -1,
            EPS_T=eps_tensor is not None,
            **meta,
        )
    return q, scales, h


# ----------------------------------------------------------------------------
# Traffic model
# ----------------------------------------------------------------------------


def bytes_moved(
    M: int,
    H: int,
    x_dtype: torch.dtype = torch.bfloat16,
    has_residual: bool = False,
    weight_dtype: Optional[torch.dtype] = torch.bfloat16,
    need_residual_out: bool = False,
    quant_dtype: torch.dtype = torch.float8_e4m3fn,
    scheme: int = SCHEME_PER_TOKEN,
    group_size: int = 128,
    has_scale_tensor: bool = False,
) -> int:
    """Minimum HBM bytes read + written by one call (weight read once)."""
    xs = torch.empty((), dtype=x_dtype).element_size()
    qs = torch.empty((), dtype=quant_dtype).element_size()
    read = M * H * xs
    if has_residual:
        read += M * H * xs
    if weight_dtype is not None:
        read += H * torch.empty((), dtype=weight_dtype).element_size()
    if scheme == SCHEME_STATIC and has_scale_tensor:
        read += 4
    write = M * H * qs
    if need_residual_out:
        write += M * H * xs
    return read + write + scales_bytes(M, H, scheme, group_size)
