"""Small RMSNorm+quant models shared by the report / testing tests.

Each function writes RMSNorm + fp8 quant the way a model might; `quant_pre_norm` differs by
one op so that the fusion must not fire (tests/test_report.py has the near-miss catalogue).
"""

from __future__ import annotations

import torch

F8 = torch.float8_e4m3fn
H = 64


def inputs(rows: int = 4, hidden: int = H, weight_shape: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=g).to(torch.bfloat16)
    w = (1 + 0.1 * torch.randn(weight_shape or (hidden,), generator=g)).to(torch.bfloat16)
    return x, w


def _quant(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    yf = y.float()
    s = yf.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 448.0
    return (yf / s).clamp(-448.0, 448.0).to(F8), s


def llama(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF Llama RMSNorm followed by per-token fp8 quant: fuses."""
    xf = x.float()
    var = xf.pow(2).mean(-1, keepdim=True)  # norm: llama
    y = (xf * torch.rsqrt(var + 1e-6)).to(x.dtype) * w
    return _quant(y)


def two_norms(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Two fusable norms, the second on a residual sum of the first one's output: 2 fusions."""
    q1, s1 = llama(x, w)
    h = x + q1.to(x.dtype)
    hf = h.float()
    y = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * w  # norm: second
    q2, s2 = _quant(y)
    return q1, s1, q2, s2


def quant_pre_norm(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Bug in the model: the scale comes from the normalized tensor, but the input x is quantized."""
    xf = x.float()
    var = xf.pow(2).mean(-1, keepdim=True)  # norm: quant_pre_norm
    y = (xf * torch.rsqrt(var + 1e-6)).to(x.dtype) * w
    s = y.float().abs().amax(-1, keepdim=True).clamp(min=1e-12) / 448.0
    return (xf / s).clamp(-448.0, 448.0).to(F8), s


class TinyBlock(torch.nn.Module):
    """Two RMSNorm+quant sites: the first fuses, the second quantizes the pre-norm input (near miss)."""

    def __init__(self, hidden: int = H) -> None:
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.ones(hidden, dtype=torch.bfloat16))
        self.w2 = torch.nn.Parameter(torch.ones(hidden, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q1, s1 = llama(x, self.w1)
        q2, s2 = quant_pre_norm(x * 2, self.w2)
        return q1, s1, q2, s2


def example() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    """Factory for `python -m fxfuse explain tests/fxfuse_models.py:example`."""
    x, _ = inputs()
    return TinyBlock(), (x,)
