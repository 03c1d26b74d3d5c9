"""act(gate) * up + quant fusion on CPU: the written forms (SiLU, tanh GELU; gate/up separate or
two halves of one merged tensor; every quant scheme) fuse into fxfuse::silu_mul_quant and match
eager; forms that compute something else stay unfused with a near-miss reason and stay correct."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._inductor.utils import fresh_cache

import fxfuse
from forms import QUANTS, assert_identical, dequant_close, stock_compile

aten = torch.ops.aten
LEFTOVER = {aten.exp.default, aten.tanh.default, aten.amax.default, aten.abs.default, aten.silu.default}


def _act(name: str):
    if name == "silu":
        return F.silu
    return lambda g: F.gelu(g, approximate="tanh")


def make_mlp(act: str, layout: str, quant: str):
    """fn(gate_up, up, scale) -> quant outputs of act(gate) * up."""
    a, qf = _act(act), QUANTS[quant]

    def model(gu: torch.Tensor, up: torch.Tensor, scale: torch.Tensor):
        if layout == "separate":
            g, u = gu, up
        elif layout == "chunk":
            g, u = gu.chunk(2, dim=-1)
        else:  # slices, as vLLM's silu_and_mul reference writes it
            d = gu.shape[-1] // 2
            g, u = gu[..., :d], gu[..., d:]
        return qf(a(g) * u, scale)

    return model


def make_args(M, inter: int, dtype: torch.dtype, layout: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lead = M if isinstance(M, tuple) else (M,)
    width = inter if layout == "separate" else 2 * inter
    gu = (2 * torch.randn(*lead, width, generator=g)).to(dtype)
    up = torch.randn(*lead, inter, generator=g).to(dtype)
    scale = torch.tensor(0.02 + 0.01 * torch.rand((), generator=g).item())
    return gu, up, scale


def compile_and_run(fn, args, *, dynamic_dim: int | None = None):
    leftovers: list[str] = []

    def after(g: fx.Graph) -> None:
        leftovers.extend(n.name for n in g.nodes if n.op == "call_function" and n.target in LEFTOVER)

    torch._dynamo.reset()
    fxfuse.counters.clear()
    if dynamic_dim is not None:
        for a in args[:2]:
            torch._dynamo.mark_dynamic(a, dynamic_dim)
    with fresh_cache(), torch.no_grad():
        out = torch.compile(fn, options={"post_grad_custom_pre_pass": fxfuse.FusionPasses(after=after)}, fullgraph=True)(*args)
    return out, leftovers


CASES = [
    ("silu", "separate", "token", torch.bfloat16),
    ("silu", "chunk", "token", torch.bfloat16),
    ("silu", "slice", "group64", torch.bfloat16),
    ("silu", "separate", "static_div", torch.float32),
    ("silu", "separate", "int8_static", torch.float16),
    ("gelu", "separate", "token", torch.bfloat16),
    ("gelu", "chunk", "static_recip", torch.float32),
]


@pytest.mark.parametrize("case", CASES, ids=["-".join([c[0], c[1], c[2], str(c[3]).split(".")[-1]]) for c in CASES])
def test_forms_fuse(case):
    act, layout, quant, dtype = case
    fn = make_mlp(act, layout, quant)
    args = make_args(6, 256, dtype, layout, seed=hash(case) % 1000)
    with torch.no_grad():
        ref = fn(*args)
    out, leftovers = compile_and_run(fn, args)
    assert fxfuse.counters["silu_mul_quant"] == 1, fxfuse.report()
    assert not leftovers, leftovers
    assert not dequant_close(tuple(out), tuple(ref)), dequant_close(tuple(out), tuple(ref))


def test_group_scale_2d_form():
    from forms import q_group_2d

    def fn(gu, up, scale):
        g, u = gu.chunk(2, dim=-1)
        return q_group_2d(F.silu(g) * u, scale)

    args = make_args(5, 256, torch.bfloat16, "chunk", seed=9)
    with torch.no_grad():
        ref = fn(*args)
    out, leftovers = compile_and_run(fn, args)
    assert fxfuse.counters["silu_mul_quant"] == 1, fxfuse.report()
    assert not leftovers and out[1].shape == (5, 4)
    assert not dequant_close(tuple(out), tuple(ref))


def test_dynamic_tokens_3d():
    fn = make_mlp("silu", "chunk", "token")
    args = make_args((2, 5), 128, torch.bfloat16, "chunk", seed=3)
    out, _ = compile_and_run(fn, args, dynamic_dim=1)
    assert fxfuse.counters["silu_mul_quant"] == 1, fxfuse.report()
    with torch.no_grad():
        assert not dequant_close(tuple(out), tuple(fn(*args)))
    compiled = torch.compile(fn, options={"post_grad_custom_pre_pass": fxfuse.passes}, fullgraph=True)
    for s in (3, 11):
        a = make_args((2, s), 128, torch.bfloat16, "chunk", seed=s)
        torch._dynamo.mark_dynamic(a[0], 1)
        with torch.no_grad():
            assert not dequant_close(tuple(compiled(*a)), tuple(fn(*a)))


# ------------------------------------------------------------------ forms that must NOT fuse
def _swapped(gu, up, scale):
    d = gu.shape[-1] // 2
    return QUANTS["token"](F.silu(gu[..., d:]) * gu[..., :d], scale)


def _sigmoid(gu, up, scale):
    return QUANTS["token"](torch.sigmoid(gu) * up, scale)


def _quant_gate_alone(gu, up, scale):
    return (*QUANTS["token"](gu, scale), F.silu(gu) * up)


def _gelu_erf(gu, up, scale):
    return QUANTS["token"](F.gelu(gu) * up, scale)


def _product_also_returned(gu, up, scale):
    y = F.silu(gu) * up
    return (*QUANTS["token"](y, scale), y)


NEAR_MISSES = {
    "swapped_halves": (_swapped, "second half of the merged gate_up"),
    "sigmoid_gate_times_up": (_sigmoid, "sigmoid(gate), not silu"),
    "quant_of_gate_alone": (_quant_gate_alone, "quantization reads gate or up alone"),
    "product_also_returned": (_product_also_returned, "also used outside"),
}


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_near_miss_stays_unfused(name):
    fn, reason = NEAR_MISSES[name]
    layout = "chunk" if name == "swapped_halves" else "separate"
    args = make_args(4, 128, torch.bfloat16, layout, seed=6)
    ref = stock_compile(fn, args)
    fxfuse.report.clear()
    out, _ = compile_and_run(fn, args)
    assert fxfuse.counters["silu_mul_quant"] == 0
    misses = [m.reason for m in fxfuse.report().near_misses if m.family == "silu_mul_quant"]
    assert any(reason in r for r in misses), misses
    assert_identical(tuple(out), ref)


def test_cpu_op_matches_reference_and_opcheck():
    from fxfuse.kernels import silu_mul_quant as K
    from fxfuse.kernels.quant_common import SCALE_CLAMP_MIN, SCALE_DIV

    x = torch.randn(5, 2 * 64, dtype=torch.bfloat16)
    args = (x, None, None, K.ACT_SILU, torch.bfloat16, torch.bfloat16, torch.float8_e4m3fn, 2, 32, 1.0,
            [SCALE_DIV, SCALE_CLAMP_MIN], [448.0, 1e-10], False, -448.0, 448.0, False)
    q, s = torch.ops.fxfuse.silu_mul_quant(*args)
    # independent float64 re-derivation of the scales
    g, u = x[:, :64].double(), x[:, 64:].double()
    a = (g / (1 + torch.exp(-g))).to(torch.bfloat16).double()
    y = (a * u).to(torch.bfloat16).double()
    s64 = (y.reshape(5, 2, 32).abs().amax(-1) / 448.0).clamp(min=1e-10)
    torch.testing.assert_close(s.double(), s64, rtol=1e-6, atol=0)
    assert q.shape == (5, 64) and s.shape == (5, 2)
    torch.library.opcheck(torch.ops.fxfuse.silu_mul_quant, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_undecomposed_aten_activation_ops(act):
    """Graphs that keep aten.silu / aten.gelu(approximate="tanh") (e.g. traced without Inductor's
    decompositions) fuse too: the op computes in fp32 and rounds to its input dtype."""
    import contextlib

    from torch.fx.experimental.proxy_tensor import make_fx

    from fxfuse.patterns import silu_mul_quant as P

    def f(g, u):
        a = aten.silu(g) if act == "silu" else aten.gelu(g, approximate="tanh")
        return QUANTS["token"](a * u, None)

    g, u, _ = make_args(4, 64, torch.bfloat16, "separate", seed=21)
    gm = make_fx(f, tracing_mode="fake")(g, u)
    applied = []

    class Ctx:
        options: dict = {}

        def candidate(self, *a):
            return contextlib.nullcontext()

        def applied(self, name, *a):
            applied.append(name)

    P.PASS(gm.graph, Ctx())
    gm.graph.eliminate_dead_code()
    gm.recompile()
    assert applied == ["silu_mul_quant"]
    assert not any(n.target in LEFTOVER for n in gm.graph.nodes)
    assert not dequant_close(tuple(gm(g, u)), tuple(f(g, u)))
