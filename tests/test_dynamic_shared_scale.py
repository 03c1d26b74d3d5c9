"""dynamic=True: one normalized output quantized for several linears, each dividing by the same
lifted float. Dynamo lifts a float (a module attribute, or a module-level constant such as the
demo's FP8_MAX) into a 0-d float64 graph input, and under dynamic shapes Inductor leaves one fp32
convert of it per linear. The quantizations are then the same function of the same input and must
fuse as one, as they do under static shapes; converts of two different inputs must not (the values
may differ at run time)."""

from __future__ import annotations

import torch
from torch._inductor.utils import fresh_cache

import fxfuse
from forms import assert_identical
from fxfuse import demo
from fxfuse.fx_utils import value_key

H = 64


class _TwoLinears(torch.nn.Module):
    """HF Llama RMSNorm, then one per-token fp8 quant per projection, each written out in full
    (as each fp8 linear does), dividing by one float attribute (`shared`) or by two."""

    def __init__(self, shared: bool) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.weight = torch.nn.Parameter((1.0 + 0.2 * torch.randn(H, generator=g)).to(torch.bfloat16))
        self.eps = 1e-6
        self.shared = shared
        self.lim, self.lim_b = 448.0, 448.0  # equal now; a second attribute may change on its own

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.weight * h.to(torch.bfloat16)
        outs = []
        for lim in (self.lim, self.lim if self.shared else self.lim_b):
            amax = y.abs().amax(dim=-1, keepdim=True).to(torch.float32)
            scale = (amax / lim).clamp(min=1e-12)
            outs += [(y.to(torch.float32) / scale).clamp(-lim, lim).to(torch.float8_e4m3fn), scale]
        return tuple(outs)


def _run(m: torch.nn.Module, xs: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
    torch._dynamo.reset()
    fxfuse.counters.clear()
    fxfuse.report.clear()
    with fresh_cache(), torch.no_grad():
        f = torch.compile(m, dynamic=True, options={"post_grad_custom_pre_pass": fxfuse.passes})
        return [f(x) for x in xs]


def test_same_lifted_float_fuses_once_and_matches_eager() -> None:
    m = _TwoLinears(shared=True)
    xs = [torch.randn(n, H, dtype=torch.bfloat16) for n in (5, 11)]
    outs = _run(m, xs)
    assert fxfuse.counters["rmsnorm_quant"] == 1, fxfuse.report().near_miss_lines()
    for x, out in zip(xs, outs):
        assert_identical(out, m(x))


def test_two_different_lifted_floats_stay_unfused() -> None:
    """Two float attributes are two graph inputs: equal now, free to differ later. Not one quant."""
    m = _TwoLinears(shared=False)
    x = torch.randn(7, H, dtype=torch.bfloat16)
    out = _run(m, [x])[0]
    assert fxfuse.counters["rmsnorm_quant"] == 0
    assert any("quantizations that differ" in line for line in fxfuse.report().near_miss_lines())
    ref = m(x)
    for i in (0, 2):  # stock Inductor keeps fp32 where eager rounds: compare dequantized values
        deq, deq_ref = out[i].float() * out[i + 1], ref[i].float() * ref[i + 1]
        assert ((deq - deq_ref).abs().max() / deq_ref.abs().max()) < 0.07


def test_value_key_equates_converts_of_one_input_only() -> None:
    g = torch.fx.Graph()
    a, b = g.placeholder("a"), g.placeholder("b")
    conv = torch.ops.prims.convert_element_type.default
    c1, c2 = g.call_function(conv, (a, torch.float32)), g.call_function(conv, (a, torch.float32))
    c3, c4 = g.call_function(conv, (b, torch.float32)), g.call_function(conv, (a, torch.float16))
    assert value_key(c1) == value_key(c2)
    assert value_key(c1) != value_key(c3) and value_key(c1) != value_key(c4)
    assert value_key(a) is a and value_key(None) is None


def test_demo_dense_model_fuses_its_norms_under_dynamic_shapes() -> None:
    """The transformers Llama with the demo's fp8 linears, dynamic=True: both norms of each layer
    fuse (q/k/v and gate/up share one quant each, all dividing by the lifted FP8_MAX), as under static
    shapes, and the logits match eager."""
    dm = demo.BUILDERS["dense_fp8"]("cpu", True, layers=1)
    ids = [demo.random_ids(dm.vocab, n, "cpu", seed=n).reshape(1, -1) for n in (6, 13)]
    outs = _run(dm.module, ids)
    assert fxfuse.counters["rmsnorm_quant"] == 2, fxfuse.report().near_miss_lines()
    for i, out in zip(ids, outs):
        with torch.no_grad():
            ref = dm.module(i)
        err = demo.logits_error(out, ref)
        assert err["finite"] and err["max_rel_err"] < 0.05, err  # tiny random model: near-tied argmaxes
