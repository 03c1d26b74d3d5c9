"""A float8 linear for tests: it quantizes its input the way torchao's float8 dynamic activation
quant does (each linear quantizes its own input), so real transformers layers show the graphs
users get from `Float8DynamicActivationFloat8WeightConfig`. Test-only (not in the package).

Row-wise: per token, scale = amax(|x|) over the last dim / 448 (in the input dtype, as torchao
divides before casting the scale to fp32), clamped away from 0; q = clamp(x.f32 / scale) to fp8.
Per-tensor: one amax over the whole tensor. The weight is quantized once, row-wise, at build.
`flatten=True` flattens a 3-D input to [tokens, K] before quantizing, as many fp8 linears do
(the GEMM is 2-D); the output is reshaped back.
The GEMM is an fp32 dequantized matmul so CPU runs it (torch._scaled_mm is what torchao calls).
"""

from __future__ import annotations

from typing import Literal

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
Granularity = Literal["row", "tensor"]


def quantize_input(x: torch.Tensor, granularity: Granularity) -> tuple[torch.Tensor, torch.Tensor]:
    """(q fp8, fp32 scale) of an activation, torchao-style."""
    if granularity == "row":
        amax = x.abs().amax(dim=-1, keepdim=True)
    else:
        amax = x.abs().amax()
    scale = (amax / FP8_MAX).to(torch.float32).clamp(min=1e-12)
    q = (x.to(torch.float32) / scale).clamp(min=-FP8_MAX, max=FP8_MAX).to(FP8)
    return q, scale


class Fp8Linear(torch.nn.Module):
    """y = dequant(quant(x)) @ dequant(W_q).T (+ bias), output in x's dtype."""

    def __init__(self, linear: torch.nn.Linear, granularity: Granularity = "row", flatten: bool = False) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        w_scale = (w.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
        self.register_buffer("w_q", (w / w_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8))
        self.register_buffer("w_scale", w_scale)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().clone())
        self.granularity = granularity
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]) if self.flatten else x
        q, s = quantize_input(x2, self.granularity)
        w = self.w_q.to(torch.float32) * self.w_scale
        y = (q.to(torch.float32) * s) @ w.t()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*lead, -1)


def quantize_linears(module: torch.nn.Module, granularity: Granularity = "row", flatten: bool = False) -> torch.nn.Module:
    """Swap every nn.Linear inside `module` for an Fp8Linear (in place); returns module."""
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, Fp8Linear(child, granularity, flatten))
        else:
            quantize_linears(child, granularity, flatten)
    return module
