"""One normalized tensor, several quantizations (one per quantized linear, as torchao writes it):
identical chains become one fused quant that every consumer reads; differing chains stay unfused
with a near miss and stay correct."""

from __future__ import annotations

import pytest
import torch

import fxfuse
from forms import NORMS, QUANTS, assert_identical, dequant_close, make_inputs, stock_compile
from test_rmsnorm_quant import compile_and_run


def _three(quant: str):
    def model(x, res, w, scale):
        h = x + res
        y = NORMS["hf"](h, w, 1e-6)
        outs = []
        for _ in range(3):  # q, k, v projections each quantize their own input
            outs.extend(QUANTS[quant](y, scale))
        return (*outs, h)

    return model


@pytest.mark.parametrize("quant", ["token", "static_div"])
def test_identical_chains_share_one_fused_quant(quant):
    fn = _three(quant)
    args = make_inputs(5, 128, torch.bfloat16, seed=11)
    with torch.no_grad():
        ref = fn(*args)
    out, leftovers = compile_and_run(fn, args)
    assert fxfuse.counters["rmsnorm_quant"] == 1, fxfuse.report()
    assert not leftovers, leftovers
    assert "shared by 3 quantizations" in fxfuse.report().fusions[0].detail
    assert not dequant_close(tuple(out), tuple(ref))


def _differing(x, res, w, scale):
    y = NORMS["hf"](x, w, 1e-6)
    (q1,) = QUANTS["static_div"](y, scale)
    (q2,) = QUANTS["static_div"](y, scale * 2)  # a different static scale per linear
    return q1, q2


def _differing_scheme(x, res, w, scale):
    y = NORMS["hf"](x, w, 1e-6)
    return (*QUANTS["token"](y, scale), *QUANTS["int8_token"](y, scale))


@pytest.mark.parametrize("fn", [_differing, _differing_scheme], ids=["static_scales", "fp8_vs_int8"])
def test_differing_chains_are_a_near_miss(fn):
    args = make_inputs(4, 128, torch.bfloat16, seed=12)
    ref = stock_compile(fn, args)
    fxfuse.report.clear()
    out, _ = compile_and_run(fn, args)
    assert fxfuse.counters["rmsnorm_quant"] == 0
    reasons = [m.reason for m in fxfuse.report().near_misses]
    assert any("2 quantizations that differ" in r for r in reasons), reasons
    assert_identical(tuple(out), ref)


def test_group_scale_2d_form_fuses():
    """y.reshape(M, -1, g), amax(-1) -> [M, H/g] scale, divide by s.unsqueeze(-1)."""
    from forms import q_group_2d

    def fn(x, res, w, scale):
        return q_group_2d(NORMS["hf"](x, w, 1e-6), scale)

    args = make_inputs(5, 256, torch.bfloat16, seed=13)
    with torch.no_grad():
        ref = fn(*args)
    out, leftovers = compile_and_run(fn, args)
    assert fxfuse.counters["rmsnorm_quant"] == 1, fxfuse.report()
    assert not leftovers, leftovers
    assert out[1].shape == (5, 4)
    assert not dequant_close(tuple(out), tuple(ref))


def test_scale_ub_tensor_is_captured():
    """vLLM per-token quant with scale_ub: min(amax, ub) / 448 with a one-element tensor bound."""

    def fn(x, res, w, ub):
        y = NORMS["hf"](x, w, 1e-6)
        amax = torch.minimum(y.abs().amax(-1, keepdim=True).float(), ub)
        s = (amax / 448.0).clamp_min(1.0 / (448.0 * 512.0))
        return (y.float() / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), s

    x, res, w, _ = make_inputs(6, 128, torch.bfloat16, seed=14)
    ub = torch.tensor([1.5])  # below most row maxima: the bound is what sets those scales
    with torch.no_grad():
        ref = fn(x, res, w, ub)
    out, leftovers = compile_and_run(fn, (x, res, w, ub))
    assert fxfuse.counters["rmsnorm_quant"] == 1, fxfuse.report()
    assert not dequant_close(tuple(out), tuple(ref))
    torch.testing.assert_close(out[1], ref[1], rtol=1e-6, atol=0)
    assert (ref[1] == 1.5 / 448.0).any()
