"""Quantization epilogue shared by every fused kernel: scheme and scale-op codes, the Triton
rounding/scale helpers, and their pure-torch reference.

One definition, so that RMSNorm+quant, SiLU-mul+quant and RoPE+quant round and scale the same
bits the same way, and the pattern modules take the op codes from here. Knows nothing about FX.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

SCHEME_STATIC = 0
SCHEME_PER_TOKEN = 1
SCHEME_PER_GROUP = 2

SCALE_MUL = 0  # s * c
SCALE_DIV = 1  # s / c
SCALE_RDIV = 2  # c / s
SCALE_CLAMP_MIN = 3  # max(s, c)
SCALE_CLAMP_MAX = 4  # min(s, c)
SCALE_RECIP = 5  # 1 / s
SCALE_ROUND_BF16 = 6  # s -> bf16 -> f32
SCALE_ROUND_F16 = 7  # s -> f16 -> f32
# kernel dtype codes (constexpr ints: dtype objects do not survive Inductor codegen)
DT_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

SCALE_NOP = -1  # padding for unused slots (kernel only)
MAX_SCALE_OPS = 4
QUANT_DTYPES = (torch.float8_e4m3fn, torch.int8)


def _fp8_cast_saturates() -> bool:
    """Does this torch's fp32 -> float8_e4m3fn cast saturate finite overflow and inf to +-448?

    torch >= 2.12 does (pytorch#178817); earlier versions give NaN above 464. The kernels
    follow whichever the running torch does, so fused and eager agree bit for bit.
    """
    v = torch.tensor([1000.0, float("inf")]).to(torch.float8_e4m3fn).float()
    return bool((v == 448.0).all())


FP8_SATURATES: bool = _fp8_cast_saturates()
_FP8_SAT: tl.constexpr = tl.constexpr(FP8_SATURATES)


def apply_scale_op_ref(s: torch.Tensor, op: int, c: "float | torch.Tensor") -> torch.Tensor:
    """One scale-chain step on an fp32 tensor (constants rounded to fp32, like the kernel; a
    one-element tensor `c` is the runtime value the kernel loads for that slot)."""
    if op == SCALE_NOP:  # an empty chain travels as [SCALE_NOP] (AOTInductor: no empty list arguments)
        return s
    if isinstance(c, torch.Tensor):
        ct = c.reshape(()).to(torch.float32)
    else:
        ct = torch.tensor(c, dtype=torch.float32, device=s.device)
    if op == SCALE_MUL:
        return s * ct
    if op == SCALE_DIV:
        return s / ct
    if op == SCALE_RDIV:
        return ct / s
    if op == SCALE_CLAMP_MIN:
        return torch.clamp(s, min=ct)
    if op == SCALE_CLAMP_MAX:
        return torch.clamp(s, max=ct)
    if op == SCALE_RECIP:
        return torch.ones_like(s) / s
    if op == SCALE_ROUND_BF16:
        return s.to(torch.bfloat16).to(torch.float32)
    if op == SCALE_ROUND_F16:
        return s.to(torch.float16).to(torch.float32)
    raise ValueError(f"quant: unknown scale op code {op}")


@triton.jit
def round_to(v, DT: tl.constexpr, NATIVE: tl.constexpr = False):
    """Round fp32 `v` to dtype code DT (0 f32, 1 bf16, 2 f16) and return fp32.

    Compiled (NATIVE) uses the hardware RNE cast. Under TRITON_INTERPRET the fp32->bf16 cast is
    not RNE, so there bf16 rounding is done on the bit pattern.
    """
    if DT == 1 and NATIVE:
        r = v.to(tl.bfloat16).to(tl.float32)
    elif DT == 1:
        b = v.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        r = tl.where(v != v, v, b.to(tl.float32, bitcast=True))
    elif DT == 2:
        r = v.to(tl.float16).to(tl.float32)
    else:
        r = v
    return r


@triton.jit
def round_e4m3(v):
    """RNE of fp32 `v` (|v| <= 464, or NaN) onto the float8_e4m3fn grid, result in fp32.

    (a + 2^23*ulp) - 2^23*ulp rounds |v| to a multiple of its e4m3 ulp with the FPU's
    ties-to-even; the final cast to fp8 is then exact on hardware and in the interpreter.
    """
    a = tl.abs(v)
    e = ((a.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32)
    e = tl.maximum(e, 121) - 3  # min normal exponent 2^-6 (biased 121); ulp = 2^(e-3)
    ulp = (e << 23).to(tl.float32, bitcast=True)
    magic = ulp * 8388608.0
    r = (a + magic) - magic
    sign = v.to(tl.uint32, bitcast=True) & 0x80000000  # keeps -0.0 (torch casts it to 0x80)
    return (r.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def rint(v):
    """Round half to even for fp32, portable (no libdevice): exact for all |v| < 2^23."""
    a = tl.abs(v)
    r = (a + 8388608.0) - 8388608.0
    r = tl.where(a < 8388608.0, r, a)
    return tl.where(v < 0, -r, r)


@triton.jit
def scale_op(s, OP: tl.constexpr, c):
    """One step of the scale chain; OP is constexpr so dead steps vanish."""
    if OP == 0:
        s = s * c
    elif OP == 1:
        s = tl.math.div_rn(s, c + tl.zeros_like(s))
    elif OP == 2:
        s = tl.math.div_rn(c + tl.zeros_like(s), s)
    elif OP == 3:
        s = tl.maximum(s, c, propagate_nan=tl.PropagateNan.ALL)  # torch.clamp keeps NaN
    elif OP == 4:
        s = tl.minimum(s, c, propagate_nan=tl.PropagateNan.ALL)
    elif OP == 5:
        s = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
    elif OP == 6:
        s = round_to(s, 1)
    elif OP == 7:
        s = round_to(s, 2)
    return s




@triton.jit
def absmax_bits(y, axis: tl.constexpr = None):
    """max of |y|'s fp32 bit patterns (sign cleared) along axis (None: all of y) as int32.

    For non-negative floats the integer order is the float order and every NaN lies above +inf,
    so one integer max is both torch.amax's value and its NaN (a float max plus a NaN-flag max
    took two reductions and ~2.5x the instructions per element in sm_90 PTX). Masked lanes (0) do
    not raise it; int results of several pieces combine with tl.maximum, NaN kept."""
    return tl.max(y.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=axis)


@triton.jit
def absmax(y, axis: tl.constexpr):
    """max(|y|) along axis, NaN if any element is NaN (like torch.amax; tl.max drops NaNs)."""
    return absmax_bits(y, axis).to(tl.float32, bitcast=True)


@triton.jit
def scale_chain(s, c0, c1, c2, c3, OP0: tl.constexpr, OP1: tl.constexpr, OP2: tl.constexpr,
                OP3: tl.constexpr):
    """The captured amax -> scale op chain (up to MAX_SCALE_OPS steps; SCALE_NOP pads)."""
    s = scale_op(s, OP0, c0)
    s = scale_op(s, OP1, c1)
    s = scale_op(s, OP2, c2)
    s = scale_op(s, OP3, c3)
    return s


@triton.jit
def quantize(y, sb, qmin, qmax, QUANT_MUL: tl.constexpr, ROUND_INT: tl.constexpr,
             Q_INT8: tl.constexpr, NATIVE: tl.constexpr):
    """y / sb (or y * sb), optional round-half-even, clamp (NaN kept), cast to int8 / fp8 e4m3."""
    if QUANT_MUL:
        qv = y * sb
    elif NATIVE:
        qv = y / sb  # per element: fast division, as Inductor emits (per-row math stays exact)
    else:
        qv = tl.math.div_rn(y, sb)
    if ROUND_INT:
        qv = rint(qv)
    qv = tl.minimum(tl.maximum(qv, qmin, propagate_nan=tl.PropagateNan.ALL), qmax,
                    propagate_nan=tl.PropagateNan.ALL)
    if Q_INT8:
        qo = qv.to(tl.int8)
    else:
        # torch's cast: NaN stays NaN; |v| > 464 (incl. inf) saturates to +-448 or becomes NaN
        # depending on the torch version; |v| <= 464 rounds to nearest even (464 -> 448)
        if _FP8_SAT:
            qv = tl.where(qv != qv, qv, tl.minimum(tl.maximum(qv, -448.0), 448.0))
        else:
            qv = tl.where(tl.abs(qv) > 464.0, float("nan"), qv)
        if NATIVE:
            qo = qv.to(tl.float8e4nv)  # hardware RNE (cvt.rn.satfinite), in range here
        else:
            # the interpreter's fp8 cast is not RNE and turns NaN into 384: round here, NaN by bits
            qo = round_e4m3(qv).to(tl.float8e4nv)
            nan8 = (tl.zeros_like(qv).to(tl.uint8) | 0x7F).to(tl.float8e4nv, bitcast=True)
            qo = tl.where(qv != qv, nan8, qo)
    return qo


@triton.jit
def f32_chain_consts(c0, c1, c2, c3, qmin, qmax, ub_ptr, UB_SLOT: tl.constexpr):
    """The scale-chain constants and quant bounds as fp32 (Inductor may pass Python floats as fp64;
    the graph's constants are fp32-rounded already, so this matches eager), with slot UB_SLOT read
    from `ub_ptr` (load_ub)."""
    c0 = tl.cast(c0, tl.float32)
    c1 = tl.cast(c1, tl.float32)
    c2 = tl.cast(c2, tl.float32)
    c3 = tl.cast(c3, tl.float32)
    c0, c1, c2, c3 = load_ub(ub_ptr, c0, c1, c2, c3, UB_SLOT)
    return c0, c1, c2, c3, tl.cast(qmin, tl.float32), tl.cast(qmax, tl.float32)


@triton.jit
def load_ub(ub_ptr, c0, c1, c2, c3, UB_SLOT: tl.constexpr):
    """A one-element runtime tensor replaces the constant of slot UB_SLOT (UB_SLOT < 0: none): a
    scale_ub bound (SCALE_CLAMP_MAX) or a float attribute lifted into a graph input (MUL/DIV)."""
    if UB_SLOT >= 0:
        ub = tl.load(ub_ptr).to(tl.float32)
        if UB_SLOT == 0:
            c0 = ub
        elif UB_SLOT == 1:
            c1 = ub
        elif UB_SLOT == 2:
            c2 = ub
        else:
            c3 = ub
    return c0, c1, c2, c3


@triton.jit
def quantize_store_row(
    y, row, g_idx, offs, mask, q_ptr, s_out_ptr, scale_ptr, ub_ptr, stride_q, NG,
    static_scale_value, c0, c1, c2, c3, qmin, qmax,
    HAS_SCALE_T: tl.constexpr, SCHEME: tl.constexpr, UB_SLOT: tl.constexpr,
    OP0: tl.constexpr, OP1: tl.constexpr, OP2: tl.constexpr, OP3: tl.constexpr,
    QUANT_MUL: tl.constexpr, ROUND_INT: tl.constexpr, Q_INT8: tl.constexpr, NATIVE: tl.constexpr,
):
    """The quant epilogue of a row-per-program kernel: scale, quantize, store q and the scales.

    `y` is the row's fp32 [BLOCK_R, BLOCK_G] tile (a group per tile row for the per-group
    scheme), `offs`/`mask` its element offsets in the row, `g_idx` the tile-row index. The static
    scale is a tensor (HAS_SCALE_T) or `static_scale_value`; dynamic scales are the NaN-propagating
    amax per tile row (masked lanes must be 0) through the captured scale chain. Scalars are cast
    to fp32 here: Inductor may pass Python floats as fp64, and the graph's constants are
    fp32-rounded already, so this matches eager.
    """
    s, sb, qmin, qmax = tile_scales(y, s_out_ptr, scale_ptr, ub_ptr, static_scale_value, c0, c1, c2, c3, qmin, qmax,
                                    HAS_SCALE_T, SCHEME, UB_SLOT, OP0, OP1, OP2, OP3)
    if SCHEME != 0:
        tl.store(s_out_ptr + row * NG + g_idx, s, mask=g_idx < NG)
    qo = quantize(y, sb, qmin, qmax, QUANT_MUL, ROUND_INT, Q_INT8, NATIVE)
    tl.store(q_ptr + row * stride_q + offs, qo, mask=mask)


@triton.jit
def tile_scales(
    y, s_out_ptr, scale_ptr, ub_ptr, static_scale_value, c0, c1, c2, c3, qmin, qmax,
    HAS_SCALE_T: tl.constexpr, SCHEME: tl.constexpr, UB_SLOT: tl.constexpr,
    OP0: tl.constexpr, OP1: tl.constexpr, OP2: tl.constexpr, OP3: tl.constexpr,
):
    """(scales, scales broadcast over `y`, qmin, qmax) of a quant epilogue's fp32 tile `y`: the
    static scale (a tensor or a constant; program (0, 0) writes it out) or the NaN-propagating amax
    per tile row (masked lanes must be 0), through the captured chain. The caller stores
    per-row/group scales (their addresses depend on the launch form)."""
    static_scale_value = tl.cast(static_scale_value, tl.float32)
    c0, c1, c2, c3, qmin, qmax = f32_chain_consts(c0, c1, c2, c3, qmin, qmax, ub_ptr, UB_SLOT)
    if SCHEME == 0:
        if HAS_SCALE_T:
            s = tl.load(scale_ptr).to(tl.float32)
        else:
            s = static_scale_value + 0.0
    else:
        s = absmax(y, 1)  # one amax per tile row (a row, or one of its groups)
    s = scale_chain(s, c0, c1, c2, c3, OP0, OP1, OP2, OP3)
    if SCHEME == 0:
        sb = s + tl.zeros_like(y)
        if tl.program_id(0) == 0:
            if tl.program_id(1) == 0:  # column-split launches: one program writes the scale
                tl.store(s_out_ptr, s)
    else:
        sb = s[:, None] + tl.zeros_like(y)
    return s, sb, qmin, qmax


# ----------------------------------------------------------------------------- host-side helpers


def op_scale_chain(ops: Sequence[int], consts: Sequence[float]) -> tuple[list[int], list[float]]:
    """A scale chain as an op's arguments: an empty one becomes [SCALE_NOP] / [0.0]. AOTInductor's
    package cannot type an empty list argument of a custom op (its loader expects List[int] and
    fails), and every kernel and reference treats SCALE_NOP as no step."""
    return ([int(o) for o in ops], [float(c) for c in consts]) if len(ops) else ([SCALE_NOP], [0.0])


def pad_scale_chain(ops: Sequence[int], consts: Sequence[float]) -> tuple[list[int], list[float]]:
    """Scale-chain ops and constants padded to MAX_SCALE_OPS kernel slots (SCALE_NOP, 0.0)."""
    return ([int(o) for o in ops] + [SCALE_NOP] * (MAX_SCALE_OPS - len(ops)),
            [float(c) for c in consts] + [0.0] * (MAX_SCALE_OPS - len(consts)))


def scales_shape(M: int, H: int, scheme: int, group_size: int) -> tuple[tuple[int, ...], int]:
    """(shape of the scales output, groups per row) of a scheme for an [M, H] quantized tensor."""
    if scheme == SCHEME_STATIC:
        return (1,), 1
    if scheme == SCHEME_PER_TOKEN:
        return (M,), 1
    return (M, H // group_size), H // group_size


def row_tile(H: int, scheme: int, group_size: int) -> tuple[int, int, int]:
    """(padded row width, BLOCK_G, BLOCK_R): a row as one tile row, or one group per tile row."""
    block = triton.next_power_of_2(H)
    if scheme == SCHEME_PER_GROUP:
        return block, group_size, max(block // group_size, 1)
    return block, block, 1


def check_eps_tensor(op: str, name: str, t: Optional[torch.Tensor], device: torch.device) -> None:
    """ValueError unless `t` (a norm eps read at run time: a float attribute dynamic=True lifted into a
    graph input, moved to the device by the FX side) is None or one float32 element on `device`."""
    if t is None:
        return
    if t.numel() != 1 or t.dtype != torch.float32:
        raise ValueError(f"{op}: {name} must be one float32 element")
    if t.device != device:
        raise ValueError(f"{op}: {name} on a different device than the input")


def check_quant_args(
    op: str,
    H: int,
    device: torch.device,
    scale: "torch.Tensor | None",
    quant_dtype: torch.dtype,
    scheme: int,
    group_size: int,
    scale_ops: Sequence[int],
    scale_consts: Sequence[float],
    for_triton: bool,
) -> None:
    """ValueError on quant arguments a fused op cannot take (the quant half of its check_args)."""
    if quant_dtype not in QUANT_DTYPES:
        raise ValueError(f"{op}: quant_dtype {quant_dtype} unsupported (float8_e4m3fn/int8)")
    if scheme not in (SCHEME_STATIC, SCHEME_PER_TOKEN, SCHEME_PER_GROUP):
        raise ValueError(f"{op}: scheme {scheme} unknown (0 static, 1 per-token, 2 per-group)")
    if scale is not None:
        if scheme != SCHEME_STATIC:
            raise ValueError(f"{op}: a scale tensor is only valid with the static scheme")
        if scale.numel() != 1 or not scale.dtype.is_floating_point:
            raise ValueError(f"{op}: a scale tensor must be one floating-point element")
        if scale.device != device:
            raise ValueError(f"{op}: scale on a different device")
    if scheme == SCHEME_PER_GROUP:
        if group_size <= 0 or H % group_size:
            raise ValueError(f"{op}: row length {H} not divisible by group_size={group_size}")
        if for_triton and group_size & (group_size - 1):
            raise ValueError(f"{op}: group_size={group_size} must be a power of two")
    if len(scale_ops) != len(scale_consts) or len(scale_ops) > MAX_SCALE_OPS:
        raise ValueError(f"{op}: scale_ops/scale_consts differ in length or exceed {MAX_SCALE_OPS}")
    for o in scale_ops:
        if o not in range(SCALE_MUL, SCALE_ROUND_F16 + 1) and o != SCALE_NOP:
            raise ValueError(f"{op}: unknown scale op code {o}")


def scales_bytes(M: int, H: int, scheme: int, group_size: int) -> int:
    """HBM bytes of the fp32 scales output (traffic models)."""
    return 4 * (1 if scheme == SCHEME_STATIC else M * scales_shape(M, H, scheme, group_size)[1])


def quantize_reference(
    y: torch.Tensor,
    scheme: int,
    group_size: int,
    scale: torch.Tensor | None,
    static_scale_value: float,
    scale_ops: "list[int] | tuple[int, ...]",
    scale_consts: "list[float] | tuple[float, ...]",
    quant_mul: bool,
    qmin: float,
    qmax: float,
    round_to_int: bool,
    quant_dtype: torch.dtype,
    scale_ub: "torch.Tensor | None" = None,
    ub_slot: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch quant of an fp32 [M, H] tensor -> (q [M, H], scales [1] | [M] | [M, H/g]).

    With `scale_ub`, scale-chain step `ub_slot` takes that one-element tensor instead of its
    constant: vLLM's scale_ub bound (a SCALE_CLAMP_MAX, `torch.minimum` as written), or a
    multiply/divide by a float attribute that dynamic=True lifted into a graph input.
    """
    f32 = torch.float32
    M, H = y.shape
    if scheme == SCHEME_STATIC:
        if scale is not None:
            base = scale.reshape(()).to(f32)
        else:
            base = torch.tensor(static_scale_value, dtype=f32, device=y.device)
    elif scheme == SCHEME_PER_TOKEN:
        base = y.abs().amax(dim=-1)  # [M]
    else:
        base = y.reshape(M, H // group_size, group_size).abs().amax(dim=-1)  # [M, G]
    s = base
    for i, (op, c) in enumerate(zip(scale_ops, scale_consts)):
        if i == ub_slot and scale_ub is not None and int(op) == SCALE_CLAMP_MAX:
            s = torch.minimum(s, scale_ub.reshape(()).to(f32))
        elif i == ub_slot and scale_ub is not None:
            s = apply_scale_op_ref(s, int(op), scale_ub)
        else:
            s = apply_scale_op_ref(s, int(op), float(c))
    if scheme == SCHEME_STATIC:
        s_b = s
    elif scheme == SCHEME_PER_TOKEN:
        s_b = s[:, None]
    else:
        s_b = s[:, :, None].expand(M, H // group_size, group_size).reshape(M, H)
    q = y * s_b if quant_mul else y / s_b
    if round_to_int:
        q = torch.round(q)
    q = torch.clamp(q, min=torch.tensor(qmin, dtype=f32, device=y.device),
                    max=torch.tensor(qmax, dtype=f32, device=y.device)).to(quant_dtype)
    scales = s.reshape(1).to(f32).clone() if scheme == SCHEME_STATIC else s.to(f32).contiguous()
    return q, scales
