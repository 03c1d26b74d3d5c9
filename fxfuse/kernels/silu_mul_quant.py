"""Fused act(gate) * up + quantization (SiLU-and-mul / GELU-tanh-and-mul) as one Triton kernel.

This module knows nothing about FX. It provides:

* :func:`silu_mul_quant_reference` -- pure-torch oracle (also the op's CPU kernel);
* ``torch.ops.fxfuse.silu_mul_quant`` -- a ``torch.library.triton_op`` launching through
  ``wrap_triton`` (becomes ``triton_kernel_wrapper_functional`` under torch.compile);
* :func:`silu_mul_quant_triton` -- plain launcher (eager CUDA, or CPU under TRITON_INTERPRET=1);
* :func:`launch_config` -- rows per program / warps / layout of both launch paths (TUNED table,
  LAUNCH_OVERRIDE and a ``config=`` keyword for sweeps: benchmarks/tune_silu.py);
* :func:`bytes_moved` -- HBM traffic model for benchmarks.

Why one kernel: stock Inductor computes the per-token amax in one loop and the quantized product
in a second loop over the same row, so at large intermediate sizes it reads gate and up twice.
Here a program holds its row in registers: gate and up are read once, q and scales written once.

Semantics per row (fp32 unless stated), gate/up either two [M, I] tensors or the two halves of
one merged [M, 2I] ``gate_up`` (``up is None``)::

    g = gate.f32
    a = g / (1 + exp(-g))                                            (ACT_SILU, Inductor's form)
      | 0.5 g (1 + tanh(0.7978845608028654 (g + 0.044715 g^3)))      (ACT_GELU_TANH)
    a = a.to(act_dtype).f32
    y = (a * up.f32).to(out_dtype).f32
    q, scales = quant(y)   (quant_common: static / per-token / per-group, fp8 e4m3fn / int8)
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
    DT_CODE as _DT_CODE,
    SCHEME_PER_GROUP,
    SCHEME_PER_TOKEN,
    SCHEME_STATIC,
    absmax_bits,
    check_quant_args,
    f32_chain_consts,
    pad_scale_chain,
    quantize,
    quantize_reference,
    quantize_store_row,
    round_to,
    row_tile,
    scale_chain,
    scales_bytes,
    scales_shape,
    tile_scales,
)

__all__ = [
    "ACT_SILU",
    "ACT_GELU_TANH",
    "MAX_INTER",
    "silu_mul_quant",
    "silu_mul_quant_reference",
    "silu_mul_quant_triton",
    "bytes_moved",
    "check_args",
    "flat_chunk",
    "launch_config",
    "row_pieces",
]

ACT_SILU = 0
ACT_GELU_TANH = 1
ACT_NAMES = {ACT_SILU: "silu", ACT_GELU_TANH: "gelu_tanh"}
MAX_INTER = 32768  # one row per program, whole row in registers
_IN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _split(x: torch.Tensor, up: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) views: the two halves of a merged gate_up when `up` is None."""
    if up is not None:
        return x, up
    inter = x.shape[1] // 2
    return x[:, :inter], x[:, inter:]


def check_args(
    x: torch.Tensor,
    up: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    act: int,
    act_dtype: torch.dtype,
    out_dtype: torch.dtype,
    quant_dtype: torch.dtype,
    scheme: int,
    group_size: int,
    scale_ops: Sequence[int],
    scale_consts: Sequence[float],
    for_triton: bool = False,
) -> None:
    """Raise ValueError on unsupported inputs (last line of defense; the FX side pre-checks)."""
    if x.dim() != 2:
        raise ValueError(f"silu_mul_quant: x must be 2-D, got shape {tuple(x.shape)}")
    if x.dtype not in _IN_DTYPES:
        raise ValueError(f"silu_mul_quant: dtype {x.dtype} unsupported (bf16/fp16/fp32)")
    if up is None:
        if x.shape[1] % 2:
            raise ValueError(f"silu_mul_quant: merged gate_up width {x.shape[1]} is odd")
    else:
        if up.shape != x.shape or up.dtype != x.dtype or up.device != x.device:
            raise ValueError("silu_mul_quant: up must match gate in shape, dtype and device")
        if for_triton and up.stride(1) != 1:
            raise ValueError("silu_mul_quant: up rows must be contiguous (stride(1) == 1)")
    if for_triton and x.stride(1) != 1:
        raise ValueError("silu_mul_quant: rows must be contiguous (stride(1) == 1)")
    inter = x.shape[1] if up is not None else x.shape[1] // 2
    if act not in ACT_NAMES:
        raise ValueError(f"silu_mul_quant: act {act} unknown")
    if act_dtype not in _IN_DTYPES or out_dtype not in _IN_DTYPES:
        raise ValueError("silu_mul_quant: act_dtype/out_dtype must be bf16/fp16/fp32")
    if for_triton and inter > MAX_INTER:
        raise ValueError(f"silu_mul_quant: I={inter} above {MAX_INTER}")
    check_quant_args("silu_mul_quant", inter, x.device, scale, quant_dtype, scheme, group_size, scale_ops,
                     scale_consts, for_triton)


# ----------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------


def act_mul_reference(
    x: torch.Tensor, up: Optional[torch.Tensor], act: int, act_dtype: torch.dtype, out_dtype: torch.dtype
) -> torch.Tensor:
    """fp32 [M, I] product act(gate) * up with the written rounding points."""
    f32 = torch.float32
    gate, u = _split(x, up)
    g = gate.to(f32)
    if act == ACT_SILU:
        a = g / (1.0 + torch.exp(-g))
    else:
        inner = (g + g * g * g * 0.044715) * 0.7978845608028654
        a = (g * 0.5) * (torch.tanh(inner) + 1.0)
    a = a.to(act_dtype).to(f32)
    return (a * u.to(f32)).to(out_dtype).to(f32)


def silu_mul_quant_reference(
    x: torch.Tensor,
    up: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    act: int,
    act_dtype: torch.dtype,
    out_dtype: torch.dtype,
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
    scale_ub: Optional[torch.Tensor] = None,
    ub_slot: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch oracle (any device): (q [M, I], scales [1] | [M] | [M, I/g])."""
    check_args(x, up, scale, act, act_dtype, out_dtype, quant_dtype, scheme, group_size, scale_ops, scale_consts)
    y = act_mul_reference(x, up, act, act_dtype, out_dtype)
    return quantize_reference(y, scheme, group_size, scale, static_scale_value, scale_ops, scale_consts,
                              quant_mul, qmin, qmax, round_to_int, quant_dtype, scale_ub, ub_slot)


# ----------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------


@triton.jit
def _act(g, ACT: tl.constexpr):
    """act(g) in fp32, written as Inductor decomposes it (tanh via exp: no libdevice needed)."""
    if ACT == 0:
        a = g / (1.0 + tl.exp(-g))
    else:
        inner = (g + g * g * g * 0.044715) * 0.7978845608028654
        t = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)
        a = (g * 0.5) * (t + 1.0)
    return a


@triton.jit
def _act_mul(g_ptrs, u_ptrs, mask, ACT: tl.constexpr, ACT_DT: tl.constexpr, OUT_DT: tl.constexpr,
             NATIVE: tl.constexpr):
    """round(round(act(gate)) * up) in fp32 from the gate/up pointers: the one definition of the
    product every launch form (one row, ROWS / FLAT tiles, the row loop) quantizes, so they stay
    bit-identical. Masked lanes are 0 and do not raise an amax."""
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptrs, mask=mask, other=0.0).to(tl.float32)
    return round_to(round_to(_act(g, ACT), ACT_DT, NATIVE) * u, OUT_DT, NATIVE)


@triton.jit
def _quant_store_rows(
    y, rows, rel, row0, g_idx, offs, mask, q_ptr, s_out_ptr, scale_ptr, ub_ptr, stride_q, NG, M,
    static_scale_value, c0, c1, c2, c3, qmin, qmax,
    HAS_SCALE_T: tl.constexpr, SCHEME: tl.constexpr, UB_SLOT: tl.constexpr,
    OP0: tl.constexpr, OP1: tl.constexpr, OP2: tl.constexpr, OP3: tl.constexpr,
    QUANT_MUL: tl.constexpr, ROUND_INT: tl.constexpr, Q_INT8: tl.constexpr, NATIVE: tl.constexpr,
):
    """quantize_store_row for a tile whose rows belong to several token rows (`rows` [T]: each
    tile row's token row, int64, = row0 + rel: FLAT's int32 rows from its first, else row0 = 0;
    `g_idx` [T]: its group, or 0): the same per-element math, so ROWS > 1 is bit-identical to
    one row per program; rows >= M are masked (last program)."""
    s, sb, qmin, qmax = tile_scales(y, s_out_ptr, scale_ptr, ub_ptr, static_scale_value, c0, c1, c2, c3, qmin, qmax,
                                    HAS_SCALE_T, SCHEME, UB_SLOT, OP0, OP1, OP2, OP3)
    if SCHEME != 0:  # [T]: one scale per tile row (a token row, or one of its groups)
        tl.store(s_out_ptr + rows * NG + g_idx, s, mask=(g_idx < NG) & (rows < M))
    qo = quantize(y, sb, qmin, qmax, QUANT_MUL, ROUND_INT, Q_INT8, NATIVE)
    tl.store(q_ptr + row0 * stride_q + (rel[:, None] * stride_q + offs), qo, mask=mask)


@triton.jit
def _silu_mul_quant_row_loop(
    g_ptr, u_ptr, ub_ptr, q_ptr, s_out_ptr, stride_g, stride_u, stride_q, u_off, INTER,
    c0, c1, c2, c3, qmin, qmax, ACT: tl.constexpr, ACT_DT: tl.constexpr, OUT_DT: tl.constexpr,
    UB_SLOT: tl.constexpr, OP0: tl.constexpr, OP1: tl.constexpr, OP2: tl.constexpr, OP3: tl.constexpr,
    QUANT_MUL: tl.constexpr, ROUND_INT: tl.constexpr, Q_INT8: tl.constexpr, CHUNK: tl.constexpr,
    NATIVE: tl.constexpr,
):
    """Per-token quant of one row in CHUNK-wide steps: pass 1 the amax (NaN kept), pass 2 the
    quantization; the same per-element math as the one-tile path (bit-identical)."""
    c0, c1, c2, c3, qmin, qmax = f32_chain_consts(c0, c1, c2, c3, qmin, qmax, ub_ptr, UB_SLOT)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, CHUNK)
    run = tl.zeros([CHUNK], dtype=tl.float32)  # lane-wise running max of |y|
    nan = tl.zeros([CHUNK], dtype=tl.int32)
    for k0 in range(0, INTER, CHUNK):
        offs = k0 + cols
        m = offs < INTER
        y = _act_mul(g_ptr + row * stride_g + offs, u_ptr + row * stride_u + u_off + offs, m, ACT, ACT_DT, OUT_DT,
                     NATIVE)
        a = tl.abs(y)
        run = tl.maximum(run, a)
        nan = nan | (a != a).to(tl.int32)
    s = tl.max(run, axis=0)
    s = tl.where(tl.max(nan, axis=0) > 0, float("nan"), s)  # like torch.amax
    s = scale_chain(s, c0, c1, c2, c3, OP0, OP1, OP2, OP3)
    tl.store(s_out_ptr + row, s)
    for k0 in range(0, INTER, CHUNK):
        offs = k0 + cols
        m = offs < INTER
        y = _act_mul(g_ptr + row * stride_g + offs, u_ptr + row * stride_u + u_off + offs, m, ACT, ACT_DT, OUT_DT,
                     NATIVE)
        qo = quantize(y, s + tl.zeros_like(y), qmin, qmax, QUANT_MUL, ROUND_INT, Q_INT8, NATIVE)
        tl.store(q_ptr + row * stride_q + offs, qo, mask=m)


@triton.jit
def _piece_index(INTER, OFF: tl.constexpr, P: tl.constexpr, MASKED: tl.constexpr, SCHEME: tl.constexpr,
                 BLOCK_G: tl.constexpr):
    """Elements [OFF, OFF + P) of a PIECES row: (tile-row group indices, element offsets, mask), as a
    [P // BLOCK_G, BLOCK_G] tile (a group per tile row) for the per-group scheme, else one [1, P]
    tile row. Only the tail piece (MASKED) is masked at INTER; the others' mask is a constant true,
    which folds away (unpredicated vector loads and stores).

    No pointer goes in: Inductor's mutation analysis of user kernels maps every result of a call to
    all of its arguments, so offsets returned by a function that also took g_ptr/u_ptr made the q
    and scale stores look like writes to the inputs (both cloned on every call: 2-3x slower)."""
    if SCHEME == 2:
        g_idx = OFF // BLOCK_G + tl.arange(0, P // BLOCK_G)
        offs = g_idx[:, None] * BLOCK_G + tl.arange(0, BLOCK_G)[None, :]
    else:
        g_idx = tl.arange(0, 1)
        offs = OFF + tl.arange(0, P)[None, :]
    if MASKED:
        mask = offs < INTER
    else:
        mask = tl.full(offs.shape, 1, tl.int1)
    return g_idx, offs, mask


@triton.jit
def _quant_store_piece(y, s, row, offs, mask, q_ptr, stride_q, qmin, qmax, QUANT_MUL: tl.constexpr,
                       ROUND_INT: tl.constexpr, Q_INT8: tl.constexpr, NATIVE: tl.constexpr):
    """Quantize one [1, P] per-token piece by its row's scale `s` (a scalar) and store it."""
    qo = quantize(y, s + tl.zeros_like(y), qmin, qmax, QUANT_MUL, ROUND_INT, Q_INT8, NATIVE)
    tl.store(q_ptr + row * stride_q + offs, qo, mask=mask)


@triton.jit
def _silu_mul_quant_pieces(
    g_ptr, u_ptr, scale_ptr, ub_ptr, q_ptr, s_out_ptr, stride_g, stride_u, stride_q, u_off, INTER, NG,
    static_scale_value, c0, c1, c2, c3, qmin, qmax, ACT: tl.constexpr, ACT_DT: tl.constexpr,
    OUT_DT: tl.constexpr, HAS_SCALE_T: tl.constexpr, SCHEME: tl.constexpr, UB_SLOT: tl.constexpr,
    OP0: tl.constexpr, OP1: tl.constexpr, OP2: tl.constexpr, OP3: tl.constexpr, QUANT_MUL: tl.constexpr,
    ROUND_INT: tl.constexpr, Q_INT8: tl.constexpr, BLOCK_G: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr,
    P2: tl.constexpr, P3: tl.constexpr, P_MASKED: tl.constexpr, NATIVE: tl.constexpr,
):
    """One row per program as up to 4 power-of-2 pieces (P0 > P1 > ... , 0 = absent; piece
    P_MASKED, if any, is a rounded-up tail masked at INTER), each its own register tile: the row
    is read once with no padded lanes (I = 18432 = 16384 + 2048, 768 = 512 + 256).

    Per-token: the row amax is the max of the pieces' (absmax_bits over the whole piece: NaN kept, as
    torch.amax; a scalar, not a [1] tile row: combining [1] results of differently laid out pieces
    made Triton convert a whole piece's layout through shared memory), then
    the scale chain and each piece's quantization: the same per-element math as the one-row path
    (bit-identical). Static and per-group scales need no row reduction: each piece runs the
    one-row epilogue on its own (per-group pieces are whole groups: I % group == 0)."""
    row = tl.program_id(0).to(tl.int64)
    O1: tl.constexpr = P0
    O2: tl.constexpr = P0 + P1
    O3: tl.constexpr = P0 + P1 + P2
    g0, o0, m0 = _piece_index(INTER, 0, P0, P_MASKED == 0, SCHEME, BLOCK_G)
    y0 = _act_mul(g_ptr + row * stride_g + o0, u_ptr + row * stride_u + u_off + o0, m0, ACT, ACT_DT, OUT_DT,
                 NATIVE)
    if P1 > 0:
        g1, o1, m1 = _piece_index(INTER, O1, P1, P_MASKED == 1, SCHEME, BLOCK_G)
        y1 = _act_mul(g_ptr + row * stride_g + o1, u_ptr + row * stride_u + u_off + o1, m1, ACT, ACT_DT, OUT_DT,
                     NATIVE)
    if P2 > 0:
        g2, o2, m2 = _piece_index(INTER, O2, P2, P_MASKED == 2, SCHEME, BLOCK_G)
        y2 = _act_mul(g_ptr + row * stride_g + o2, u_ptr + row * stride_u + u_off + o2, m2, ACT, ACT_DT, OUT_DT,
                     NATIVE)
    if P3 > 0:
        g3, o3, m3 = _piece_index(INTER, O3, P3, P_MASKED == 3, SCHEME, BLOCK_G)
        y3 = _act_mul(g_ptr + row * stride_g + o3, u_ptr + row * stride_u + u_off + o3, m3, ACT, ACT_DT, OUT_DT,
                     NATIVE)
    if SCHEME == 1:
        b = absmax_bits(y0)
        if P1 > 0:
            b = tl.maximum(b, absmax_bits(y1))
        if P2 > 0:
            b = tl.maximum(b, absmax_bits(y2))
        if P3 > 0:
            b = tl.maximum(b, absmax_bits(y3))
        c0, c1, c2, c3, qmin, qmax = f32_chain_consts(c0, c1, c2, c3, qmin, qmax, ub_ptr, UB_SLOT)
        s = tl.where(b > 0x7F800000, float("nan"), b.to(tl.float32, bitcast=True))  # like torch.amax
        s = scale_chain(s, c0, c1, c2, c3, OP0, OP1, OP2, OP3)
        tl.store(s_out_ptr + row, s)
        _quant_store_piece(y0, s, row, o0, m0, q_ptr, stride_q, qmin, qmax, QUANT_MUL, ROUND_INT, Q_INT8, NATIVE)
        if P1 > 0:
            _quant_store_piece(y1, s, row, o1, m1, q_ptr, stride_q, qmin, qmax, QUANT_MUL, ROUND_INT, Q_INT8,
                               NATIVE)
        if P2 > 0:
            _quant_store_piece(y2, s, row, o2, m2, q_ptr, stride_q, qmin, qmax, QUANT_MUL, ROUND_INT, Q_INT8,
                               NATIVE)
        if P3 > 0:
            _quant_store_piece(y3, s, row, o3, m3, q_ptr, stride_q, qmin, qmax, QUANT_MUL, ROUND_INT, Q_INT8,
                               NATIVE)
    else:
        quantize_store_row(y0, row, g0, o0, m0, q_ptr, s_out_ptr, scale_ptr, ub_ptr, stride_q, NG,
                           static_scale_value, c0, c1, c2, c3, qmin, qmax,
                           HAS_SCALE_T, SCHEME, UB_SLOT, OP0, OP1, OP2, OP3, QUANT_MUL, ROUND_INT, Q_INT8, NATIVE)
        if P1 > 0:
            quantize_store_row(y1, row, g1, o1, m1, q_ptr, s_out_ptr, scale_ptr, ub_ptr, stride_q, NG,
                               static_scale_value, c0, c1, c2, c3, qmin, qmax,
                               HAS_SCALE_T, SCHEME, UB_SLOT, OP0, OP1, OP2, OP3, QUANT_MUL, ROUND_INT, Q_INT8, NATIVE)
        if P2 > 0:
            quantize_store_row(y2, row, g2, o2, m2, q_ptr, s_out_ptr, scale_ptr, ub_ptr, stride_q, NG,
                               static_scale_value, c0, c1, c2, c3, qmin, qmax,
                               HAS_SCALE_T, SCHEME, UB_SLOT, OP0, OP1, OP2, OP3, QUANT_MUL, ROUND_INT, Q_INT8, NATIVE)
        if P3 > 0:
            quantize_store_row(y3, row, g3, o3, m3, q_ptr, s_out_ptr, scale_ptr, ub_ptr, stride_q, NG,
                               static_scale_value, c0, c1, c2, c3, qmin, qmax,
                               HAS_SCALE_T, SCHEME, UB_SLOT, OP0, OP1, OP2, OP3, QUANT_MUL, ROUND_INT, Q_INT8, NATIVE)


@triton.jit(do_not_specialize=["M"])
def _silu_mul_quant_kernel(
    g_ptr, u_ptr, scale_ptr, ub_ptr, q_ptr, s_out_ptr,
    stride_g, stride_u, stride_q, u_off,
    INTER, NG, M,
    static_scale_value, c0, c1, c2, c3, qmin, qmax,
    ACT: tl.constexpr, ACT_DT: tl.constexpr, OUT_DT: tl.constexpr, HAS_SCALE_T: tl.constexpr,
    SCHEME: tl.constexpr, UB_SLOT: tl.constexpr,
    OP0: tl.constexpr, OP1: tl.constexpr, OP2: tl.constexpr, OP3: tl.constexpr,
    QUANT_MUL: tl.constexpr, ROUND_INT: tl.constexpr, Q_INT8: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr, ROWS: tl.constexpr = 1, FLAT: tl.constexpr = False,
    NATIVE: tl.constexpr = False, CHUNK: tl.constexpr = 0, P0: tl.constexpr = 0, P1: tl.constexpr = 0,
    P2: tl.constexpr = 0, P3: tl.constexpr = 0, P_MASKED: tl.constexpr = -1,
):
    """ROWS token rows per program (ROWS = 1: one row per program), each held as BLOCK_R tile rows
    of BLOCK_G (a group per tile row for the per-group scheme): gate and up are read once, q and
    the scales written once. ROWS > 1 serves narrow rows (I = 768: one 1024-lane row is too
    little work per program); its [ROWS * BLOCK_R, BLOCK_G] tile row t is token row
    program_id(0) * ROWS + t // BLOCK_R, tile row t % BLOCK_R of it. Static and per-group scales
    need no row reduction, so small-M launches split the row over a second grid dim
    (program_id(1) = chunk of BLOCK_R tile rows; ROWS = 1) to spread one row over many SMs.

    FLAT (static, per-group): no padding to a power-of-2 row. A row is NG chunks of BLOCK_G
    (its groups, or for static the largest power-of-2 divisor of I), the M * NG chunks are
    numbered flat and tile row t is chunk program_id(0) * ROWS * BLOCK_R + t, so I = 768 runs as
    3 x 256 (static) or 6 x 128 (groups) with no masked lanes but the last program's tail.

    CHUNK > 0 (per-token, wide rows not a power of 2: I = 18432 padded to 32768 held 44% masked
    lanes and ran at 65% of copy bandwidth): one row per program in CHUNK-wide steps, twice --
    the amax, then the quantization, re-reading the row (an L2 hit: it was just read); it reached
    84% of copy bandwidth.

    P0 > 0 (PIECES, any scheme; rows not a power of 2): one row per program held as I's
    power-of-2 pieces (_silu_mul_quant_pieces): read once, no padded lanes, no second pass."""
    if CHUNK > 0:
        _silu_mul_quant_row_loop(g_ptr, u_ptr, ub_ptr, q_ptr, s_out_ptr, stride_g, stride_u, stride_q, u_off, INTER,
                                 c0, c1, c2, c3, qmin, qmax, ACT, ACT_DT, OUT_DT, UB_SLOT, OP0, OP1, OP2, OP3,
                                 QUANT_MUL, ROUND_INT, Q_INT8, CHUNK, NATIVE)
    elif P0 > 0:
        _silu_mul_quant_pieces(g_ptr, u_ptr, scale_ptr, ub_ptr, q_ptr, s_out_ptr, stride_g, stride_u, stride_q, u_off,
                               INTER, NG, static_scale_value, c0, c1, c2, c3, qmin, qmax, ACT, ACT_DT, OUT_DT,
                               HAS_SCALE_T, SCHEME, UB_SLOT, OP0, OP1, OP2, OP3, QUANT_MUL, ROUND_INT, Q_INT8,
                               BLOCK_G, P0, P1, P2, P3, P_MASKED, NATIVE)
    elif ROWS == 1 and not FLAT:
        row = tl.program_id(0).to(tl.int64)
        g_idx = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs = g_idx[:, None] * BLOCK_G + tl.arange(0, BLOCK_G)[None, :]
        mask = offs < INTER

        y = _act_mul(g_ptr + row * stride_g + offs, u_ptr + row * stride_u + u_off + offs, mask, ACT, ACT_DT,
                     OUT_DT, NATIVE)
        quantize_store_row(y, row, g_idx, offs, mask, q_ptr, s_out_ptr, scale_ptr, ub_ptr, stride_q, NG,
                           static_scale_value, c0, c1, c2, c3, qmin, qmax,
                           HAS_SCALE_T, SCHEME, UB_SLOT, OP0, OP1, OP2, OP3, QUANT_MUL, ROUND_INT, Q_INT8, NATIVE)
    else:
        t = tl.arange(0, ROWS * BLOCK_R)
        if FLAT:
            # a scalar int64 first row plus int32 rows from it: int64 // NG per tile row spills
            chunk0 = tl.program_id(0).to(tl.int64) * (ROWS * BLOCK_R)  # first flat chunk index
            row0 = chunk0 // NG
            local = (chunk0 - row0 * NG).to(tl.int32) + t  # chunk index counted from row0's first
            rel = local // NG  # [T] token row of each tile row, from row0
            g_idx = local % NG
        else:
            row0 = 0
            rel = tl.program_id(0).to(tl.int64) * ROWS + t // BLOCK_R  # [T] token row of each tile row
            g_idx = tl.program_id(1) * BLOCK_R + t % BLOCK_R
        rows = row0 + rel  # [T] int64
        offs = g_idx[:, None] * BLOCK_G + tl.arange(0, BLOCK_G)[None, :]  # element offsets in the row
        mask = (offs < INTER) & (rows < M)[:, None]

        y = _act_mul(g_ptr + row0 * stride_g + (rel[:, None] * stride_g + offs),
                     u_ptr + row0 * stride_u + u_off + (rel[:, None] * stride_u + offs), mask, ACT, ACT_DT, OUT_DT, NATIVE)
        _quant_store_rows(y, rows, rel, row0, g_idx, offs, mask, q_ptr, s_out_ptr, scale_ptr, ub_ptr, stride_q, NG, M,
                          static_scale_value, c0, c1, c2, c3, qmin, qmax,
                          HAS_SCALE_T, SCHEME, UB_SLOT, OP0, OP1, OP2, OP3, QUANT_MUL, ROUND_INT, Q_INT8, NATIVE)


SPLIT_CHUNK = 1024  # row elements per program in a column-split launch
SPLIT_MAX_M = 64  # static token counts up to this split rows (decode); symbolic M never does (no guard)


@declare(_silu_mul_quant_kernel)
def _silu_mul_quant_accesses(a):
    # the CHUNK row loop (per-token only) never reads a static scale
    reads = ["g_ptr", "u_ptr"] + ["scale_ptr"] * (a["SCHEME"] == 0 and bool(a["HAS_SCALE_T"]) and not a.get("CHUNK"))
    reads += ["ub_ptr"] * (a["UB_SLOT"] >= 0)
    return accesses(reads, ["q_ptr", "s_out_ptr"])


def column_split(M: object, inter: int, scheme: int, group_size: int) -> bool:
    """Split each row over programs: a static, small M (one program per row would leave most SMs
    idle: a single 14336-wide row took 3.7 us on an H100 against Inductor's 1.4 us) and a scheme
    without a row reduction (static, or per-group with groups that tile SPLIT_CHUNK)."""
    if not isinstance(M, int) or M > SPLIT_MAX_M or inter <= SPLIT_CHUNK:
        return False
    if scheme == SCHEME_STATIC:
        return True
    return scheme == SCHEME_PER_GROUP and SPLIT_CHUNK % group_size == 0 and inter % group_size == 0


def default_num_warps(block: int) -> int:
    """Warps per row-program by padded row width (benchmarks sweep this)."""
    if block <= 2048:
        return 4
    if block <= 8192:
        return 8
    if block <= 16384:
        return 16
    return 32  # 32768-wide rows (I up to 32768): 32 values/thread per operand, no spills


# Tuned launch configs by (scheme, padded row width):
# {"ROWS": r, "num_warps": w[, "FLAT": 1][, "CHUNK": c][, "PIECES": 1]},
# from benchmarks/tune_silu.py on an H200 (benchmarks/results/tune_silu_h200*.json: suggested_tuned,
# entries >= 1.01x the default launch); other shapes keep ROWS=1 at default_num_warps.
TUNED: dict[tuple[int, int], dict[str, int]] = {
    (0, 1024): {"FLAT": 1, "ROWS": 2, "num_warps": 4},  # static I=768: 1.13x
    (0, 32768): {"FLAT": 1, "ROWS": 1, "num_warps": 16},  # static I=18432: 1.24x
    (1, 1024): {"CHUNK": 0, "FLAT": 0, "PIECES": 1, "ROWS": 1, "num_warps": 1},  # per-token I=768 (512+256): 1.33x
    (1, 16384): {"CHUNK": 0, "FLAT": 0, "PIECES": 1, "ROWS": 1, "num_warps": 8},  # per-token I=14336: 1.15x
    (1, 32768): {"CHUNK": 0, "FLAT": 0, "PIECES": 1, "ROWS": 1, "num_warps": 16},  # per-token I=18432: 1.51x over the row loop
    (2, 1024): {"CHUNK": 0, "FLAT": 0, "PIECES": 1, "ROWS": 1, "num_warps": 1},  # per-group I=768: 1.16x over FLAT
    (2, 16384): {"CHUNK": 0, "FLAT": 0, "PIECES": 1, "ROWS": 1, "num_warps": 16},  # per-group I=14336: 1.10x
    (2, 32768): {"CHUNK": 0, "FLAT": 0, "PIECES": 1, "ROWS": 1, "num_warps": 16},  # per-group I=18432: 1.27x over FLAT
}
# Applied over every default (tests, sweeps; also read when torch.compile traces the op): e.g.
# {"ROWS": 4, "num_warps": 2} or {"PIECES": 1, "num_warps": 16}; empty = off.
LAUNCH_OVERRIDE: dict[str, int] = {}
MAX_TILE = 65536  # elements of one program's tile (ROWS * padded row): register budget
MIN_FLAT_CHUNK = 64  # narrowest static FLAT chunk (a power-of-2 divisor of I)
MAX_PIECES = 4  # kernel constexprs P0..P3
MIN_PIECE = 16  # narrowest exact piece: lower bits of I join a masked tail piece
_LAYOUTS = ("FLAT", "CHUNK", "PIECES")  # one row layout per launch


def row_pieces(inter: int) -> tuple[list[int], int]:
    """(piece widths, index of the masked tail piece or -1) of a PIECES launch: I's binary
    representation, largest first (18432 -> [16384, 2048], 14336 -> [8192, 4096, 2048]). Bits
    beyond MAX_PIECES - 1 exact pieces, or narrower than MIN_PIECE, join one tail piece rounded up
    to a power of 2 and masked at I (29568 -> [16384, 8192, 4096, 1024], tail 896 of 1024)."""
    widths: list[int] = []
    rest = inter
    while rest:
        top = 1 << (rest.bit_length() - 1)
        if rest != top and (top < MIN_PIECE or len(widths) == MAX_PIECES - 1):
            return widths + [triton.next_power_of_2(rest)], len(widths)
        widths.append(top)
        rest -= top
    return widths, -1


def flat_chunk(inter: int, scheme: int, group_size: int) -> Optional[int]:
    """Chunk width of the unpadded FLAT layout: the group (per-group), the largest power-of-2
    divisor of I (static); None where FLAT does not apply (per-token needs a whole row per tile
    row for its amax; a static I with only a narrow power-of-2 divisor would vectorize poorly)."""
    if scheme == SCHEME_PER_GROUP:
        return group_size
    if scheme != SCHEME_STATIC:
        return None
    c = inter & -inter
    return c if c >= MIN_FLAT_CHUNK else None


def launch_config(inter: int, scheme: int, group_size: int, M: object = None,
                  override: Optional[dict[str, int]] = None) -> dict[str, Any]:
    """{"ROWS", "num_warps", "FLAT", "CHUNK", "PIECES", "split"} of a launch, for the eager launcher
    and the triton_op.

    Pure Python on static shape facts (inter, scheme, group): M only enables the column split,
    and only when it is a static int (column_split); a symbolic M never picks a config, so no
    guard is added. Precedence: defaults < TUNED < LAUNCH_OVERRIDE < `override`. A layer that
    picks a row layout (FLAT, CHUNK or PIECES nonzero) drops the layouts of the layers below it,
    so {"PIECES": 1} overrides a TUNED row loop without also naming "CHUNK": 0; one that asks for
    ROWS > 1 drops the one-row layouts (CHUNK, PIECES) below it.
    """
    split = column_split(M, inter, scheme, group_size)
    block = SPLIT_CHUNK if split else row_tile(inter, scheme, group_size)[0]
    cfg: dict[str, Any] = dict(ROWS=1, num_warps=default_num_warps(block), FLAT=0, CHUNK=0, PIECES=0)
    tuned = {} if split else TUNED.get((int(scheme), block), {})  # a split launch: one row chunk per program
    layers = [tuned] if tuned and _applicable(tuned, inter, scheme, group_size) else []  # else the defaults
    for layer in (*layers, LAUNCH_OVERRIDE, override or {}):
        if any(layer.get(k) for k in _LAYOUTS):
            cfg.update(dict.fromkeys(_LAYOUTS, 0))
        elif int(layer.get("ROWS", 1)) > 1:  # several rows per program: no one-row layout from below
            cfg.update(CHUNK=0, PIECES=0)
        cfg.update(layer)
    rows, nw, flat, chunk = int(cfg["ROWS"]), int(cfg["num_warps"]), int(bool(cfg["FLAT"])), int(cfg["CHUNK"])
    pieces = int(bool(cfg["PIECES"]))
    if chunk and (chunk & (chunk - 1) or scheme != SCHEME_PER_TOKEN or split or rows != 1 or flat):
        raise ValueError(f"silu_mul_quant: CHUNK={chunk} needs a power of 2, per-token, ROWS=1, no FLAT or split")
    if pieces and (split or rows != 1 or flat or chunk):
        raise ValueError("silu_mul_quant: PIECES needs ROWS=1, no FLAT, CHUNK or column split (small static M)")
    if rows < 1 or rows & (rows - 1) or nw < 1 or nw & (nw - 1):
        raise ValueError(f"silu_mul_quant: ROWS={rows}, num_warps={nw} must be powers of 2")
    if split and rows != 1:
        raise ValueError("silu_mul_quant: a column-split launch (small static M) takes ROWS=1")
    if rows * block > MAX_TILE and rows > 1:
        raise ValueError(f"silu_mul_quant: ROWS={rows} x {block}-wide rows exceeds {MAX_TILE} elements")
    if flat and (split or flat_chunk(inter, scheme, group_size) is None):
        raise ValueError(f"silu_mul_quant: FLAT needs static (I with a power-of-2 divisor >= {MIN_FLAT_CHUNK}) "
                         "or per-group, and no column split")
    return dict(ROWS=rows, num_warps=nw, FLAT=flat, CHUNK=chunk, PIECES=pieces, split=split)


def _applicable(tuned: dict[str, int], inter: int, scheme: int, group_size: int) -> bool:
    """A TUNED entry (keyed by padded width) fits this exact row: FLAT needs a chunk of I, and the
    row loop is per-token only (an entry that does not fit is skipped, never an error)."""
    if tuned.get("FLAT") and flat_chunk(inter, scheme, group_size) is None:
        return False
    return not (tuned.get("CHUNK") and scheme != SCHEME_PER_TOKEN)


def _kernel_meta(inter: int, scale: Optional[torch.Tensor], act: int, act_dtype: torch.dtype,
                 out_dtype: torch.dtype, quant_dtype: torch.dtype, scheme: int, group_size: int,
                 scale_ops: Sequence[int], quant_mul: bool, round_to_int: bool, cfg: dict[str, Any]) -> dict:
    """Constexpr kwargs + num_warps (pure Python on shapes: fake-safe)."""
    block, block_g, block_r = row_tile(inter, scheme, group_size)
    if cfg["split"]:  # static: [1, SPLIT_CHUNK] tiles; per-group: SPLIT_CHUNK // group groups per program
        block_g, block_r = (SPLIT_CHUNK, 1) if scheme == SCHEME_STATIC else (group_size, SPLIT_CHUNK // group_size)
    if cfg["FLAT"]:  # tiles of ROWS * block elements, as wide as one chunk
        block_g = flat_chunk(inter, scheme, group_size)
        block_r = block // block_g
    ops, _ = pad_scale_chain(scale_ops, ())
    widths, tail = row_pieces(inter) if cfg["PIECES"] else ([], -1)
    p = widths + [0] * (MAX_PIECES - len(widths))
    return dict(
        ACT=int(act), ACT_DT=_DT_CODE[act_dtype], OUT_DT=_DT_CODE[out_dtype], HAS_SCALE_T=scale is not None,
        SCHEME=int(scheme), OP0=ops[0], OP1=ops[1], OP2=ops[2], OP3=ops[3],
        QUANT_MUL=bool(quant_mul), ROUND_INT=bool(round_to_int), Q_INT8=quant_dtype == torch.int8,
        BLOCK_G=block_g, BLOCK_R=block_r, ROWS=cfg["ROWS"], FLAT=bool(cfg["FLAT"]), CHUNK=cfg["CHUNK"],
        P0=p[0], P1=p[1], P2=p[2], P3=p[3], P_MASKED=tail,
        NATIVE=os.environ.get("TRITON_INTERPRET", "0") != "1",
        num_warps=cfg["num_warps"],
    )


def _launch(kernel, x, up, scale, q, scales, act, act_dtype, out_dtype, quant_dtype, scheme, group_size,
            static_scale_value, scale_ops, scale_consts, quant_mul, qmin, qmax, round_to_int, scale_ub=None,
            ub_slot=-1, override=None):
    M = x.shape[0]
    inter = x.shape[1] if up is not None else x.shape[1] // 2  # no slicing: the kernel offsets up itself
    cfg = launch_config(inter, scheme, group_size, M, override)
    meta = _kernel_meta(inter, scale, act, act_dtype, out_dtype, quant_dtype, scheme, group_size,
                        scale_ops, quant_mul, round_to_int, cfg)
    _, c = pad_scale_chain((), scale_consts)
    ng = inter // group_size if scheme == SCHEME_PER_GROUP else 1
    if cfg["FLAT"]:
        span = cfg["ROWS"] * meta["BLOCK_R"] // (inter // meta["BLOCK_G"]) + 2  # rows one program touches, at most
        strides = (x.stride(0), up.stride(0) if up is not None else 0, q.stride(0))
        if not all(isinstance(st, int) and st * span < 2**31 for st in strides):  # the kernel's int32 row offsets
            if {**LAUNCH_OVERRIDE, **(override or {})}.get("FLAT"):
                raise ValueError(f"silu_mul_quant: FLAT with row strides {strides} overflows int32 offsets")
            cfg = dict(cfg, FLAT=0, ROWS=1, num_warps=default_num_warps(row_tile(inter, scheme, group_size)[0]))
            meta = _kernel_meta(inter, scale, act, act_dtype, out_dtype, quant_dtype, scheme, group_size,
                                scale_ops, quant_mul, round_to_int, cfg)
    if cfg["FLAT"]:  # chunks per row; the grid covers the M * ng chunks
        ng = inter // meta["BLOCK_G"]
    # merged gate_up: pass the base tensor twice and offset up's pointer by I inside the row
    u_arg = x if up is None else up
    u_off = inter if up is None else 0
    if cfg["FLAT"]:
        grid = (triton.cdiv(M * ng, cfg["ROWS"] * meta["BLOCK_R"]), 1)
    else:
        grid = (triton.cdiv(M, cfg["ROWS"]), triton.cdiv(inter, SPLIT_CHUNK) if cfg["split"] else 1)
    kernel[grid](
        x, u_arg, scale if scale is not None else x, scale_ub if scale_ub is not None else x, q, scales,
        x.stride(0), u_arg.stride(0), q.stride(0), u_off,
        inter, ng, M,
        float(static_scale_value), c[0], c[1], c[2], c[3], float(qmin), float(qmax),
        UB_SLOT=int(ub_slot) if scale_ub is not None else -1,
        **meta,
    )


# ----------------------------------------------------------------------------
# Custom op
# ----------------------------------------------------------------------------


@triton_op("fxfuse::silu_mul_quant", mutates_args=())
def silu_mul_quant(
    x: torch.Tensor,
    up: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    act: int,
    act_dtype: torch.dtype,
    out_dtype: torch.dtype,
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
    scale_ub: Optional[torch.Tensor] = None,
    ub_slot: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused act(gate) * up + quant -> (q [M, I], scales). Body doubles as the fake impl."""
    if x.device.type == "cpu":
        return _silu_mul_quant_cpu(x, up, scale, act, act_dtype, out_dtype, quant_dtype, scheme, group_size,
                                   static_scale_value, scale_ops, scale_consts, quant_mul, qmin, qmax, round_to_int,
                                   scale_ub, ub_slot)
    check_args(x, up, scale, act, act_dtype, out_dtype, quant_dtype, scheme, group_size, scale_ops,
               scale_consts, for_triton=True)
    M = x.shape[0]
    inter = x.shape[1] if up is not None else x.shape[1] // 2
    q = torch.empty((M, inter), dtype=quant_dtype, device=x.device)
    s_shape, _ = scales_shape(M, inter, scheme, group_size)
    scales = torch.empty(s_shape, dtype=torch.float32, device=x.device)
    _launch(wrap_triton(_silu_mul_quant_kernel), x, up, scale, q, scales, act, act_dtype, out_dtype, quant_dtype,
            scheme, group_size, static_scale_value, scale_ops, scale_consts, quant_mul, qmin, qmax, round_to_int,
            scale_ub, ub_slot)
    return q, scales


def _silu_mul_quant_cpu(
    x: torch.Tensor,
    up: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    act: int,
    act_dtype: torch.dtype,
    out_dtype: torch.dtype,
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
    scale_ub: Optional[torch.Tensor] = None,
    ub_slot: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU has no Triton: run the reference (fresh, non-aliasing outputs)."""
    q, s = silu_mul_quant_reference(x, up, scale, act, act_dtype, out_dtype, quant_dtype, scheme, group_size,
                                    static_scale_value, scale_ops, scale_consts, quant_mul, qmin, qmax, round_to_int,
                                    scale_ub, ub_slot)
    return q.contiguous(), s.contiguous()


silu_mul_quant.register_kernel("cpu")(_silu_mul_quant_cpu)


def silu_mul_quant_triton(
    x: torch.Tensor,
    up: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    act: int,
    act_dtype: torch.dtype,
    out_dtype: torch.dtype,
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
    scale_ub: Optional[torch.Tensor] = None,
    ub_slot: int = -1,
    *,
    out: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    num_warps: Optional[int] = None,
    config: Optional[dict[str, int]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the raw kernel (no dispatcher): eager CUDA, or CPU under TRITON_INTERPRET=1.

    `out=(q, scales)` writes into caller buffers (tests poison them to catch unwritten elements).
    `config` ({"ROWS", "num_warps", "FLAT", "CHUNK", "PIECES"}) and `num_warps` override launch_config
    (sweeps, tests).
    """
    check_args(x, up, scale, act, act_dtype, out_dtype, quant_dtype, scheme, group_size, scale_ops,
               scale_consts, for_triton=True)
    M = x.shape[0]
    inter = x.shape[1] if up is not None else x.shape[1] // 2
    s_shape, _ = scales_shape(M, inter, scheme, group_size)
    if out is None:
        q = torch.empty((M, inter), dtype=quant_dtype, device=x.device)
        scales = torch.empty(s_shape, dtype=torch.float32, device=x.device)
    else:
        q, scales = out
        if q.shape != (M, inter) or q.dtype != quant_dtype or q.stride(1) != 1:
            raise ValueError("silu_mul_quant: out q has wrong shape/dtype/layout")
        if tuple(scales.shape) != s_shape or scales.dtype != torch.float32 or not scales.is_contiguous():
            raise ValueError("silu_mul_quant: out scales has wrong shape/dtype/layout")
    if M > 0:
        _launch(_silu_mul_quant_kernel, x, up, scale, q, scales, act, act_dtype, out_dtype, quant_dtype, scheme,
                group_size, static_scale_value, scale_ops, scale_consts, quant_mul, qmin, qmax, round_to_int,
                scale_ub, ub_slot, {**(config or {}), **({} if num_warps is None else {"num_warps": num_warps})})
    return q, scales


def bytes_moved(M: int, inter: int, dtype: torch.dtype = torch.bfloat16,
                quant_dtype: torch.dtype = torch.float8_e4m3fn, scheme: int = SCHEME_PER_TOKEN,
                group_size: int = 128) -> int:
    """Minimum HBM bytes read + written by one call: gate and up once, q and scales once."""
    xs = torch.empty((), dtype=dtype).element_size()
    qs = torch.empty((), dtype=quant_dtype).element_size()
    return 2 * M * inter * xs + M * inter * qs + scales_bytes(M, inter, scheme, group_size)
