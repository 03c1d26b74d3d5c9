"""AOTInductor packages with fxfuse ops, on CPU: compiled, loaded and run, equal to eager.

The package stores each custom-op call's arguments as JSON for its loader, which rejects a
non-finite float (written as a string: an unclamped quant's +-inf bounds, a router's -inf fill)
and an empty list (a static quant's scale chain). fxfuse's rewrites therefore pass +-FLT_MAX
bounds (`fx_utils.op_bound`), a finite -inf fill (`kernels.moe_routing.NEG_INF_FILL`) and a
one-NOP scale chain (`kernels.quant_common.op_scale_chain`)."""

from __future__ import annotations

import os
import sys
import tempfile

import pytest
import torch

import fxfuse

sys.path.insert(0, os.path.dirname(__file__))


def _package_and_run(model: torch.nn.Module, args: tuple) -> tuple:
    fxfuse.counters.clear()
    with torch.no_grad(), tempfile.TemporaryDirectory() as d:
        ep = torch.export.export(model, args)
        path = torch._inductor.aoti_compile_and_package(
            ep, package_path=os.path.join(d, "m.pt2"),
            inductor_configs={"post_grad_custom_pre_pass": fxfuse.FusionPasses(options={"gate": False})})
        out = torch._inductor.aoti_load_package(path)(*args)
    return out if isinstance(out, (tuple, list)) else (out,)


class _UnclampedStaticQuant(torch.nn.Module):
    """RMSNorm then a static fp8 quant with no clamp: +-inf bounds and an empty scale chain."""

    def forward(self, x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        v = x.float()
        y = (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16) * w
        return (y.float() / s).to(torch.float8_e4m3fn)


def test_rmsnorm_unclamped_static_quant_package() -> None:
    m = _UnclampedStaticQuant()
    args = (torch.randn(4, 64, dtype=torch.bfloat16), torch.randn(64, dtype=torch.bfloat16), torch.tensor(0.05))
    (out,) = _package_and_run(m, args)
    assert fxfuse.counters["rmsnorm_quant"] == 1, fxfuse.report()
    with torch.no_grad():
        assert torch.equal(out.float(), m(*args).float())


def test_moe_block_package() -> None:
    """transformers' Qwen3-MoE block at one token: router GEMV, routing (-inf fill) and experts."""
    pytest.importorskip("transformers")
    from test_moe_fake_cuda import BF16, H, _block

    m = _block("qwen", "grouped_mm")
    x = torch.randn(1, 1, H, dtype=BF16)
    out = _package_and_run(m, (x,))[0]
    assert fxfuse.counters["moe_routing"] == 1 and fxfuse.counters["moe_experts"] == 1, fxfuse.report()
    with torch.no_grad():
        ref = m(x)
    ref = ref[0] if isinstance(ref, tuple) else ref
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2


def test_unclamped_quant_bounds_keep_overflow_semantics() -> None:
    """The +-FLT_MAX bounds an unclamped quant now carries change nothing, overflow included: with a
    tiny static scale every y / s is +-inf (or NaN for a zero row), and the fused result equals
    eager's bit for bit (the fp8 cast of +-inf and of +-FLT_MAX agree on this torch)."""
    from torch._inductor.utils import fresh_cache

    from fxfuse.fx_utils import F32_MAX, op_bound

    assert op_bound(float("-inf")) == -F32_MAX and op_bound(float("inf")) == F32_MAX and op_bound(448.0) == 448.0
    m = _UnclampedStaticQuant()
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    x[1] = 0.0
    args = (x, torch.randn(64, dtype=torch.bfloat16), torch.tensor(1e-39))
    fxfuse.counters.clear()
    torch._dynamo.reset()
    with torch.no_grad(), fresh_cache():
        ref = m(*args)
        out = torch.compile(m, options={"post_grad_custom_pre_pass": fxfuse.FusionPasses(options={"gate": False})})(*args)
    assert fxfuse.counters["rmsnorm_quant"] == 1, fxfuse.report()
    assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))
