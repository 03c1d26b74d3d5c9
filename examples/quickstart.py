"""Quickstart: compile a Llama-style RMSNorm + per-token fp8 quant with fxfuse and show what fused.

    python examples/quickstart.py
"""

from __future__ import annotations

import torch
from torch._inductor.utils import fresh_cache

import fxfuse


class NormQuant(torch.nn.Module):
    """Residual add + Hugging Face LlamaRMSNorm + dynamic per-token fp8 quant."""

    def __init__(self, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(1.0 + 0.1 * torch.randn(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = x + residual
        v = h.float()
        v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.weight.to(x.dtype) * v.to(x.dtype)
        scale = (y.abs().amax(-1, keepdim=True).float() / 448.0).clamp(min=1e-12)
        q = (y.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        return q, scale, h


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = NormQuant(4096).to(device)
    x = torch.randn(8, 4096, device=device, dtype=torch.bfloat16)
    r = torch.randn_like(x)
    compiled = torch.compile(model, options={"post_grad_custom_pre_pass": fxfuse.passes})
    # inference: with grad enabled the norm's intermediates are saved for backward and nothing fuses.
    # fresh_cache: on a cache hit from an earlier run Inductor skips the passes, so the counters
    # below would be empty (the cached code is fused all the same)
    with torch.no_grad(), fresh_cache():
        q, s, h = compiled(x, r)
        q_ref, s_ref, _ = model(x, r)
    err = ((q.float() * s - q_ref.float() * s_ref).norm() / (q_ref.float() * s_ref).norm()).item()
    print(f"device: {device}")
    print(f"fxfuse.counters: {dict(fxfuse.counters)}")
    print(f"dequantized relative error vs eager: {err:.2e}")
    print(fxfuse.report())


if __name__ == "__main__":
    main()
