"""MoE router logits at decode (x [M, H] @ W[E, H]^T, M small) as one Triton GEMV.

This module knows nothing about FX. At decode the router GEMM reads ~0.5 MB of weights
(Qwen3-30B-A3B: 128 x 2048 bf16) and cuBLAS runs it as a 64x8 tile on a couple of SMs: 4.9 us
on an H200 (benchmarks/diag_moe_decode_profile.py), longer than the routing after it. Here each
program takes BLOCK_E experts of one token (one, by the sweep), so the weight read is spread over
E / BLOCK_E programs.

* :func:`router_logits_reference` -- ``torch.mm(x, w.t())``, eager's own op (the CPU kernel).
* ``torch.ops.fxfuse.router_logits`` -- a ``torch.library.triton_op`` (Inductor output code on CUDA).
* :func:`router_logits_triton` -- plain launcher (eager CUDA, or CPU under ``TRITON_INTERPRET=1``).

Numerics: fp32 accumulation, one rounding to the output dtype, as cuBLAS does; the summation
order differs (bits can differ in the last place of a logit, as between cuBLAS algorithms).
``out_dtype=torch.float32`` on bf16/fp16 operands is DeepSeek-V3's fp32 router
(``linear(x.float(), W.float())``): the kernel reads the 2-byte weights and upcasts in registers
(exact) instead of reading an fp32 copy of them.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .accesses import accesses, declare
from .quant_common import DT_CODE, round_to

__all__ = ["MAX_ROWS", "MAX_ROW_ELEMS", "MAX_UPCAST_ROW_ELEMS", "fits", "router_config", "router_logits", "router_logits_reference", "router_logits_triton",
           "check_args"]

MAX_ROWS = 16  # decode-sized token counts: past that a GEMM (cuBLAS) reads the weights once for all rows
MAX_ROW_ELEMS = 8 << 20
"""Each token's programs stream the whole router weight again (from L2 after the first), so the
GEMV pays only while M * E * H stays small: on an H200 it beat cuBLAS at every measured M for
128 x 2048 and 8 x 4096 (M <= 16: 1.18-3.47x), and for 256 x 7168 up to M = 4 (1.41x at 7.3 Mi
elements) but not at M = 8 (0.88x at 14.7 Mi)."""


MAX_UPCAST_ROW_ELEMS = 32 << 20
"""The fp32-of-2-byte form (DeepSeek-V3's ``linear(x.float(), W.float())``) competes with an fp32
cuBLAS GEMM over upcast copies, so it wins further: on an H200, 256 x 7168 at every M <= 16
(1.74x at M = 16, 29.4 Mi elements)."""


def fits(M: int, E: int, H: int, upcast: bool = False) -> bool:
    """Whether the GEMV is the decode-sized case it was measured to win (static M only); `upcast`
    is the fp32-of-bf16/fp16 form."""
    return M <= MAX_ROWS and M * E * H <= (MAX_UPCAST_ROW_ELEMS if upcast else MAX_ROW_ELEMS)


def check_args(x: torch.Tensor, w: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> None:
    """Raise ValueError unless (x [M, H], w [E, H]) is a supported layout (rows contiguous) and
    out_dtype is the operands' dtype or fp32."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"router_logits: want x [M, H] and w [E, H], got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.dtype != w.dtype or x.dtype not in DT_CODE:
        raise ValueError(f"router_logits: dtypes {x.dtype}/{w.dtype} not supported")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("router_logits: rows of x and w must be contiguous (stride(1) == 1)")
    if x.device != w.device:
        raise ValueError("router_logits: x and w on different devices")
    if out_dtype not in (None, x.dtype, torch.float32):
        raise ValueError(f"router_logits: out_dtype {out_dtype} not supported for {x.dtype} operands")


def router_config(E: int, H: int) -> dict[str, int]:
    """Block sizes (no autotuning): BLOCK_E experts per program, BLOCK_K of H per step.

    H200 sweep at Qwen3-30B-A3B M=1 (benchmarks/bench_router_gemv.py --sweep): one expert row per
    program, 1024-wide steps, 8 warps: 1.68 us, against 3.36 us for 4 rows x 512 on 4 warps and
    4.68 us for stock compile's cuBLAS call (the most programs, each streaming one long row)."""
    del E
    return dict(BLOCK_E=1, BLOCK_K=min(1024, triton.next_power_of_2(H)), num_warps=8)


@triton.jit
def _router_gemv_kernel(x_ptr, w_ptr, out_ptr, stride_xm, stride_we, stride_om, E, H,
                        OUT_DT: tl.constexpr, NATIVE: tl.constexpr,
                        BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per (token, BLOCK_E experts): a [BLOCK_E, BLOCK_K] fp32 partial-product tile
    summed over H, reduced once at the end."""
    row = tl.program_id(0).to(tl.int64)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_E, BLOCK_K], dtype=tl.float32)
    x_row = x_ptr + row * stride_xm
    w_rows = w_ptr + offs_e[:, None].to(tl.int64) * stride_we
    for k0 in range(0, H, BLOCK_K):
        mk = offs_k < H - k0
        xk = tl.load(x_row + k0 + offs_k, mask=mk, other=0.0).to(tl.float32)
        wk = tl.load(w_rows + k0 + offs_k[None, :], mask=mask_e[:, None] & mk[None, :], other=0.0).to(tl.float32)
        acc += wk * xk[None, :]
    out = round_to(tl.sum(acc, axis=1), OUT_DT, NATIVE)
    tl.store(out_ptr + row * stride_om + offs_e, out.to(out_ptr.dtype.element_ty), mask=mask_e)


@declare(_router_gemv_kernel)
def _router_gemv_accesses(a):
    return accesses(("x_ptr", "w_ptr"), ("out_ptr",), one_store=True)


def _launch(wrap, x: torch.Tensor, w: torch.Tensor, out: Optional[torch.Tensor] = None,
            config: Optional[dict[str, int]] = None, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    M, H = x.shape
    E = w.shape[0]
    out = out if out is not None else torch.empty((M, E), dtype=out_dtype or x.dtype, device=x.device)
    c = {**router_config(E, H), **(config or {})}
    if not (isinstance(M, int) and M == 0):  # a zero-size grid is an error
        wrap(_router_gemv_kernel)[(M, triton.cdiv(E, c["BLOCK_E"]))](
            x, w, out, x.stride(0), w.stride(0), out.stride(0), E, H,
            OUT_DT=DT_CODE[out.dtype], NATIVE=os.environ.get("TRITON_INTERPRET", "0") != "1",
            BLOCK_E=c["BLOCK_E"], BLOCK_K=c["BLOCK_K"], num_warps=c["num_warps"],
        )
    return out


def router_logits_reference(x: torch.Tensor, w: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """What the graph computed: ``mm(x, w.t())``, on operands cast to out_dtype if given."""
    if out_dtype is not None and out_dtype != x.dtype:
        x, w = x.to(out_dtype), w.to(out_dtype)
    return torch.mm(x, w.t())


@triton_op("fxfuse::router_logits", mutates_args=())
def router_logits(x: torch.Tensor, w: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Router logits [M, E] = x [M, H] @ w [E, H]^T in out_dtype (default: x's dtype)."""
    if x.device.type == "cpu":
        return router_logits_reference(x, w, out_dtype)
    check_args(x, w, out_dtype)
    return _launch(wrap_triton, x, w, out_dtype=out_dtype)


router_logits.register_kernel("cpu")(router_logits_reference)


def router_logits_triton(x: torch.Tensor, w: torch.Tensor, out_dtype: Optional[torch.dtype] = None, *,
                         out: Optional[torch.Tensor] = None, config: Optional[dict[str, int]] = None) -> torch.Tensor:
    """Launch the raw kernel (no dispatcher); `out` = caller buffer (tests poison it), `config`
    overrides block sizes (benchmark sweeps)."""
    check_args(x, w, out.dtype if out is not None else out_dtype)
    return _launch(lambda kern: kern, x, w, out=out, config=config, out_dtype=out_dtype)
