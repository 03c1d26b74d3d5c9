"""RMSNorm and quant forms as users write them, for the fusion test matrix and the GPU benchmark.

Each norm form maps (h, w, eps) -> y; each quant form maps y -> (q, scale-like outputs...).
A model is norm + quant, optionally with a residual add whose sum is also returned.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


# ---------------------------------------------------------------- norms
def norm_hf(h: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face LlamaRMSNorm: fp32 math, round to input dtype, then weight."""
    v = h.to(torch.float32)
    var = v.pow(2).mean(-1, keepdim=True)
    v = v * torch.rsqrt(var + eps)
    return w * v.to(h.dtype)


def norm_functional(h: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(h, (h.shape[-1],), w, eps)


class ModuleNorm(torch.nn.Module):
    """torch.nn.RMSNorm as a submodule; its own weight parameter replaces the `w` argument."""

    def __init__(self, hidden: int, dtype: torch.dtype, device: str | torch.device, eps: float) -> None:
        super().__init__()
        self.norm = torch.nn.RMSNorm(hidden, eps=eps, device=device, dtype=dtype)
        with torch.no_grad():
            self.norm.weight.copy_(1.0 + 0.2 * torch.randn(hidden))

    def forward(self, h: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        return self.norm(h)


def norm_module(h: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    raise RuntimeError("the module form is built by make_model(hidden=..., dtype=...)")


def norm_gemma(h: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma: fp32 math with (1 + weight) in fp32, round at the end."""
    v = h.float()
    v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)
    v = v * (1.0 + w.float())
    return v.type_as(h)


NORMS: dict[str, Callable[..., torch.Tensor]] = {
    "hf": norm_hf,
    "functional": norm_functional,
    "module": norm_module,
    "gemma": norm_gemma,
}


# ---------------------------------------------------------------- quants
def q_static_div(y: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return ((y.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8),)


def q_static_recip(y: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return ((y.float() * (1.0 / scale)).clamp(min=-FP8_MAX, max=FP8_MAX).to(FP8),)


def q_static_float(y: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return ((y.float() / 0.05).clamp(-FP8_MAX, FP8_MAX).to(FP8),)


def q_token(y: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
    s = y.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX
    s = s.clamp(min=1e-12)
    return (y.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


def q_token_clamp_first(y: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
    amax = torch.clamp(y.abs().amax(-1, keepdim=True).to(torch.float32), min=1e-10)
    s = amax * (1.0 / FP8_MAX)
    return (y.to(torch.float32) / s).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


def q_torchao_rowwise(y: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """torchao float8 row-wise: scale = max / clamp(amax, eps); q = (y * scale).clamp.to(fp8)."""
    amax = torch.max(torch.abs(y), dim=-1, keepdim=True).values
    s = (FP8_MAX / torch.clamp(amax.to(torch.float32), min=1e-12)).to(torch.float32)
    q = (y.to(torch.float32) * s).clamp(min=-FP8_MAX, max=FP8_MAX).to(FP8)
    return q, s.reciprocal()


def _group(g: int) -> Callable[..., tuple[torch.Tensor, ...]]:
    def q_group(y: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
        yg = y.reshape(*y.shape[:-1], y.shape[-1] // g, g).float()
        s = (yg.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=1e-10)
        q = (yg / s).clamp(-FP8_MAX, FP8_MAX).to(FP8).reshape(y.shape)
        return q, s.squeeze(-1)

    q_group.__name__ = f"q_group{g}"
    return q_group


def q_group_2d(y: torch.Tensor, scale: torch.Tensor, g: int = 64) -> tuple[torch.Tensor, ...]:
    """vLLM native per-token-group / DeepSeek form: an [M, H/g] scale, unsqueezed to divide."""
    M = y.shape[0]
    yg = y.reshape(M, -1, g).float()
    s = (yg.abs().amax(-1) / FP8_MAX).clamp(min=1e-10)
    q = (yg / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8).reshape(y.shape)
    return q, s


def q_int8_static(y: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return ((y.float() / scale).round().clamp(-128, 127).to(torch.int8),)


def q_int8_token(y: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
    s = y.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / 127.0
    return (y.float() / s).round().clamp(-128, 127).to(torch.int8), s


QUANTS: dict[str, Callable[..., tuple[torch.Tensor, ...]]] = {
    "static_div": q_static_div,
    "static_recip": q_static_recip,
    "static_float": q_static_float,
    "token": q_token,
    "token_clamp_first": q_token_clamp_first,
    "torchao_rowwise": q_torchao_rowwise,
    "group128": _group(128),
    "group64": _group(64),
    "int8_static": q_int8_static,
    "int8_token": q_int8_token,
}


def make_model(
    norm: str,
    quant: str,
    residual: bool,
    eps: float = 1e-6,
    hidden: int | None = None,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
) -> Callable[..., tuple[torch.Tensor, ...]]:
    """fn(x, res, w, scale) -> (*quant outputs, [h]). The "module" norm needs hidden and dtype."""
    nf, qf = NORMS[norm], QUANTS[quant]
    if norm == "module":
        if hidden is None or dtype is None:
            raise ValueError("norm='module' needs hidden= and dtype=")
        nf = ModuleNorm(hidden, dtype, device, eps)

    def model(x: torch.Tensor, res: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if residual:
            h = x + res
            return (*qf(nf(h, w, eps), scale), h)
        return qf(nf(x, w, eps), scale)

    model.__name__ = f"{norm}_{quant}{'_res' if residual else ''}"
    return model


def make_inputs(
    M: int | tuple[int, ...], H: int, dtype: torch.dtype, device: str = "cpu", seed: int | None = None
) -> tuple[torch.Tensor, ...]:
    """Fresh random inputs (never zeros); scale sized so fp8/int8 clamping is exercised a little."""
    g = torch.Generator(device="cpu")
    if seed is not None:
        g.manual_seed(seed)
    lead = M if isinstance(M, tuple) else (M,)
    x = torch.randn(*lead, H, generator=g).to(dtype=dtype, device=device)
    res = torch.randn(*lead, H, generator=g).to(dtype=dtype, device=device)
    w = (1.0 + 0.2 * torch.randn(H, generator=g)).to(dtype=dtype, device=device)
    scale = torch.tensor(0.02 + 0.01 * torch.rand((), generator=g).item(), device=device)
    return x, res, w, scale


def dequant_close(out: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...]) -> list[str]:
    """Compare fused vs eager outputs; return a list of problems (empty if all within tolerance).

    Quantized tensors: at most 2% of elements may differ (fp8/int8 rounding-boundary flips from a
    different fp32 summation order) and the values, as float, must be within 2% relative L2.
    Float tensors (scales, residual sums): relative L2 error < 1e-5.
    """
    problems = []
    if len(out) != len(ref):
        return [f"{len(out)} outputs vs {len(ref)}"]
    for i, (o, r) in enumerate(zip(out, ref)):
        if o.dtype != r.dtype or o.shape != r.shape:
            problems.append(f"output {i}: {o.dtype}{tuple(o.shape)} vs {r.dtype}{tuple(r.shape)}")
            continue
        of, rf = o.double(), r.double()
        if not torch.isfinite(of).all():
            problems.append(f"output {i}: non-finite values")
            continue
        rel = ((of - rf).norm() / rf.norm().clamp_min(1e-30)).item()
        if o.dtype in (FP8, torch.int8):
            frac = (of != rf).double().mean().item()
            if frac > 0.02 or rel > 0.02:
                problems.append(f"output {i}: {frac:.3%} elements differ, rel err {rel:.2e}")
        elif rel > 1e-5:
            problems.append(f"output {i}: rel err {rel:.2e}")
    return problems


def stock_compile(fn: Callable[..., tuple[torch.Tensor, ...]], args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Outputs of torch.compile without fxfuse: what an untouched (near-miss) graph must reproduce.

    Stock Inductor keeps fp32 intermediates where eager rounds to bf16, so an unfused graph is
    compared to this, bit for bit, rather than to eager.
    """
    torch._dynamo.reset()
    with torch.no_grad():
        return tuple(torch.compile(fn)(*args))


def assert_identical(out: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...]) -> None:
    assert len(out) == len(ref)
    for o, r in zip(out, ref):
        assert o.dtype == r.dtype and o.shape == r.shape
        assert torch.equal(o.view(torch.uint8) if o.dtype == FP8 else o, r.view(torch.uint8) if r.dtype == FP8 else r)
