"""Regression tests for issue 12 (correctness and first-run defects found by adversarial and
new-user runs). Each test failed before its fix; CPU only, tiny shapes, few compiles."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch._inductor.utils import fresh_cache

import fxfuse
from forms import FP8, norm_hf

H = 64


def _compile_run(fn, args, passes: fxfuse.FusionPasses | None = None, **compile_kw):
    """Compile fn with fxfuse on a fresh FX cache, run it under no_grad, return the outputs."""
    torch._dynamo.reset()
    fxfuse.counters.clear()
    fxfuse.report.clear()
    with fresh_cache(), torch.no_grad():
        return torch.compile(fn, options={"post_grad_custom_pre_pass": passes or fxfuse.passes}, **compile_kw)(*args)


def _inputs(M: int = 4, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, H, generator=g).to(dtype)
    w = (1.0 + 0.2 * torch.randn(H, generator=g)).to(dtype)
    return x, w


def _reasons() -> list[str]:
    return [m.reason for m in fxfuse.report().near_misses]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype == FP8:
        a, b = a.float(), b.float()
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)))


# ----------------------------------------------------------------------------- 2: successive clamps


def _two_clamps(first, second):
    def fn(x, w, s):
        y = norm_hf(x, w, 1e-6)
        return first(second(y.float() / s)).to(FP8)  # second is the inner clamp

    return fn


CLAMPS = {
    # disjoint: the result is a constant, one merged clamp gets it wrong
    "disjoint": (lambda t: t.clamp(100.0, 448.0), lambda t: t.clamp(-448.0, -300.0), False),
    "max_then_min": (lambda t: t.clamp_min(60.0), lambda t: t.clamp_max(50.0), False),
    # overlapping: merging is exact, still fuses
    "overlap": (lambda t: t.clamp(-100.0, 448.0), lambda t: t.clamp(-448.0, 300.0), True),
}


@pytest.mark.parametrize("name", list(CLAMPS))
def test_successive_clamps(name):
    outer, inner, fuses = CLAMPS[name]
    fn = _two_clamps(outer, inner)
    x, w = _inputs()
    s = torch.tensor(0.001)  # large quotients: every element hits a clamp bound
    ref = fn(x, w, s)
    out = _compile_run(fn, (x, w, s))
    assert _same_bits(out, ref), (out.float()[0, :8], ref.float()[0, :8])
    assert fxfuse.counters["rmsnorm_quant"] == int(fuses), fxfuse.report()
    if not fuses:
        assert any("do not overlap" in r for r in _reasons()), _reasons()


# ----------------------------------------------------------------------------- 4: mean dtype


def test_variance_mean_in_bf16_is_not_fp32():
    def fn(x, w):
        v = x.float()
        var = v.pow(2).mean(-1, keepdim=True, dtype=torch.bfloat16)
        y = w * (v * torch.rsqrt(var + 1e-6)).to(x.dtype)
        s = (y.abs().amax(-1, keepdim=True).float() / 448.0).clamp(min=1e-12)
        return (y.float() / s).clamp(-448.0, 448.0).to(FP8), s

    x, w = _inputs(seed=3)
    ref = fn(x, w)
    q, s = _compile_run(fn, (x, w))
    assert fxfuse.counters["rmsnorm_quant"] == 0
    assert any("variance mean computed in torch.bfloat16" in r for r in _reasons()), _reasons()
    # not fused: within stock Inductor's bf16 mean tolerance of eager
    assert torch.allclose(s, ref[1], rtol=2e-2)
