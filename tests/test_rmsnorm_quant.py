"""RMSNorm(+residual)+quant fusion on CPU: every norm form x quant form x dtype fuses, leaves no
unfused norm/quant nodes behind, and matches eager numerics; dynamic token dims work too."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.fx as fx
from torch._inductor.utils import fresh_cache

import fxfuse
from forms import NORMS, QUANTS, assert_identical, dequant_close, make_inputs, make_model, stock_compile

aten = torch.ops.aten
LEFTOVER = {aten.rsqrt.default, aten.amax.default, aten.pow.Tensor_Scalar, aten.mean.dim, aten.abs.default}


def compile_and_run(fn, args, *, dynamic_dim: int | None = None, passes: fxfuse.FusionPasses | None = None):
    """Compile fn with fxfuse (capturing the after-graph), run it, and return (outputs, graphs)."""
    graphs: list[str] = []
    leftovers: list[str] = []

    def after(g: fx.Graph) -> None:
        graphs.append(str(g))
        leftovers.extend(n.name for n in g.nodes if n.op == "call_function" and n.target in LEFTOVER)

    p = passes or fxfuse.FusionPasses(after=after)
    torch._dynamo.reset()
    fxfuse.counters.clear()
    if dynamic_dim is not None:
        for a in args[:2]:
            torch._dynamo.mark_dynamic(a, dynamic_dim)
    with fresh_cache(), torch.no_grad():
        out = torch.compile(fn, options={"post_grad_custom_pre_pass": p}, fullgraph=True)(*args)
    return out, leftovers


MATRIX = [
    (n, q, dt, res)
    for (n, q), dt, res in itertools.product(
        itertools.product(NORMS, QUANTS), (torch.bfloat16, torch.float16, torch.float32), (False, True)
    )
]


def _case_id(c):
    n, q, dt, res = c
    return f"{n}-{q}-{str(dt).split('.')[-1]}{'-res' if res else ''}"


@pytest.mark.parametrize("case", MATRIX, ids=[_case_id(c) for c in MATRIX])
def test_form_matrix(case):
    norm, quant, dtype, residual = case
    fn = make_model(norm, quant, residual, hidden=256, dtype=dtype)
    args = make_inputs(6, 256, dtype)
    with torch.no_grad():
        ref = fn(*args)
    out, leftovers = compile_and_run(fn, args)
    assert fxfuse.counters["rmsnorm_quant"] == 1, fxfuse.report()
    assert not leftovers, f"unfused nodes left: {leftovers}"
    problems = dequant_close(tuple(out), tuple(ref))
    assert not problems, problems


@pytest.mark.parametrize("quant", ["token", "group128", "static_div", "int8_token"])
def test_dynamic_token_dim(quant):
    fn = make_model("hf", quant, residual=True)
    args = make_inputs(5, 256, torch.bfloat16, seed=1)
    out, leftovers = compile_and_run(fn, args, dynamic_dim=0)
    assert fxfuse.counters["rmsnorm_quant"] == 1, fxfuse.report()
    assert not leftovers
    # a second size reuses the dynamic graph and is still correct
    compiled = torch.compile(fn, options={"post_grad_custom_pre_pass": fxfuse.passes}, fullgraph=True)
    for m in (5, 9, 33):
        a = make_inputs(m, 256, torch.bfloat16, seed=m)
        for t in a[:2]:
            torch._dynamo.mark_dynamic(t, 0)
        with torch.no_grad():
            assert not dequant_close(tuple(compiled(*a)), tuple(fn(*a)))


def test_3d_input_dynamic_seq():
    fn = make_model("functional", "token", residual=True)
    args = make_inputs((2, 7), 128, torch.bfloat16, seed=3)
    with torch.no_grad():
        ref = fn(*args)
    out, leftovers = compile_and_run(fn, args, dynamic_dim=1)
    assert fxfuse.counters["rmsnorm_quant"] == 1, fxfuse.report()
    assert not dequant_close(tuple(out), tuple(ref))


def test_two_layers_fuse_twice():
    def two(x, res, w, scale):
        h1 = x + res
        q1, s1 = QUANTS["token"](NORMS["hf"](h1, w, 1e-5), scale)
        h2 = h1 + x
        q2, s2 = QUANTS["group128"](NORMS["hf"](h2, w, 1e-6), scale)
        return q1, s1, q2, s2, h2

    args = make_inputs(4, 256, torch.bfloat16, seed=4)
    with torch.no_grad():
        ref = two(*args)
    out, leftovers = compile_and_run(two, args)
    assert fxfuse.counters["rmsnorm_quant"] == 2, fxfuse.report()
    assert not leftovers
    assert not dequant_close(tuple(out), tuple(ref))


def test_any_eps_is_captured():
    for eps in (1e-5, 3.3e-7):
        fn = make_model("hf", "token", residual=False, eps=eps)
        args = make_inputs(4, 128, torch.bfloat16, seed=5)
        # a large eps relative to the data would show if eps were baked in
        args = (args[0] * 1e-3, *args[1:])
        with torch.no_grad():
            ref = fn(*args)
        out, _ = compile_and_run(fn, args)
        assert fxfuse.counters["rmsnorm_quant"] == 1
        assert not dequant_close(tuple(out), tuple(ref))


# ------------------------------------------------------------------ forms that must NOT fuse
def _quant_prenorm(x, res, w, scale):
    y = NORMS["hf"](x, w, 1e-6)
    s = x.abs().amax(-1, keepdim=True).float() / 448.0  # scale from the pre-norm tensor
    return (y.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn), s


def _reduce_wrong_dim(x, res, w, scale):
    v = x.float()
    v = v * torch.rsqrt(v.pow(2).mean(0, keepdim=True) + 1e-6)
    return QUANTS["token"](w * v.to(x.dtype), scale)


def _norm_also_returned(x, res, w, scale):
    y = NORMS["hf"](x, w, 1e-6)
    return (*QUANTS["token"](y, scale), y)


def _weight_2d(x, res, w, scale):
    return QUANTS["token"](NORMS["hf"](x, w.reshape(1, -1), 1e-6), scale)


def _amax_other_dim(x, res, w, scale):
    y = NORMS["hf"](x, w, 1e-6)
    s = y.abs().amax(0, keepdim=True).float() / 448.0
    return (y.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn), s


def _no_quant(x, res, w, scale):
    return (NORMS["hf"](x, w, 1e-6),)


NEAR_MISSES = {
    "quant_prenorm": (_quant_prenorm, "pre-norm"),
    "reduce_wrong_dim": (_reduce_wrong_dim, "last dim"),
    "norm_also_returned": (_norm_also_returned, "also used outside"),
    "weight_2d": (_weight_2d, "weight shape"),
    "amax_other_dim": (_amax_other_dim, "last dim"),
    "no_quant": (_no_quant, "not quantized"),
}


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_near_miss_stays_unfused(name):
    fn, reason = NEAR_MISSES[name]
    args = make_inputs(4, 128, torch.bfloat16, seed=6)
    ref = stock_compile(fn, args)
    fxfuse.report.clear()
    out, _ = compile_and_run(fn, args)
    assert fxfuse.counters["rmsnorm_quant"] == 0
    misses = fxfuse.report().near_misses
    assert any(reason in m.reason for m in misses), [m.reason for m in misses]
    assert_identical(tuple(out), ref)


def test_unsupported_dtype_falls_back_silently():
    fn = make_model("hf", "token", residual=False)
    x, res, w, scale = make_inputs(4, 128, torch.float64, seed=7)
    ref = stock_compile(fn, (x, res, w, scale))
    fxfuse.report.clear()
    out, _ = compile_and_run(fn, (x, res, w, scale))
    assert fxfuse.counters["rmsnorm_quant"] == 0
    assert any("not supported" in m.reason for m in fxfuse.report().near_misses)
    assert_identical(tuple(out), ref)


def test_noncontiguous_input_rejected():
    fn = make_model("hf", "token", residual=False)
    x, res, w, scale = make_inputs(4, 256, torch.bfloat16, seed=8)
    xt = x.reshape(4, 2, 128).transpose(0, 1)[0]  # rows strided: last dim contiguous, tensor is not
    args = (xt, res, w[:128], scale)
    ref = stock_compile(fn, args)
    fxfuse.report.clear()
    out, _ = compile_and_run(fn, args)
    assert fxfuse.counters["rmsnorm_quant"] == 0
    assert any("not contiguous" in m.reason for m in fxfuse.report().near_misses)
    assert_identical(tuple(out), ref)


def test_export_metadata_asserts_do_not_block_fusion():
    """torch.export graphs (AOTInductor) carry aten._assert_tensor_metadata on intermediates."""
    from fxfuse.patterns.rmsnorm_quant import match_norm, match_quant
    from fxfuse.patterns.normalize import PASS as normalize
    from torch.fx.experimental.proxy_tensor import make_fx

    fn = make_model("hf", "token", residual=True)
    args = make_inputs(4, 128, torch.bfloat16, seed=9)
    gm = make_fx(fn, tracing_mode="fake")(*args)
    g = gm.graph
    rsqrt = next(n for n in g.nodes if n.target is aten.rsqrt.default)
    y = next(n for n in g.nodes if n.target is aten.mul.Tensor and n.args[0].op == "placeholder")
    with g.inserting_after(y):
        g.call_function(aten._assert_tensor_metadata.default, (y, None, None, torch.bfloat16))
    with pytest.raises(Exception, match="used outside"):
        match_quant(match_norm(rsqrt))
    normalize(g, None)
    assert not any(n.target is aten._assert_tensor_metadata.default for n in g.nodes)
    match_quant(match_norm(rsqrt))  # no longer blocked


def _q_tensor(keepdim: bool):
    """Per-tensor dynamic fp8 (torchao per-tensor form): one amax over the whole tensor."""

    def fn(x, res, w, scale):
        y = NORMS["hf"](x + res, w, 1e-6)
        amax = y.abs().amax(dim=tuple(range(y.dim())), keepdim=True) if keepdim else y.abs().amax()
        s = (amax / 448.0).to(torch.float32).clamp(min=1e-12)
        return (y.to(torch.float32) / s).clamp(-448, 448).to(torch.float8_e4m3fn), s

    return fn


@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("lead", [(1,), (1, 1)])
def test_per_tensor_scale_of_one_row_fuses(keepdim, lead):
    """One row (decode of one sequence): the whole-tensor amax is that row's amax, so per-tensor
    dynamic quant fuses like per-token; the scale keeps the graph's shape (0-d, or all ones)."""
    fn = _q_tensor(keepdim)
    args = make_inputs(lead, 256, torch.bfloat16, seed=11)
    with torch.no_grad():
        ref = fn(*args)
    out, leftovers = compile_and_run(fn, args)
    assert fxfuse.counters["rmsnorm_quant"] == 1, fxfuse.report()
    assert not leftovers, leftovers
    assert out[1].shape == ref[1].shape
    assert not dequant_close(tuple(out), tuple(ref))


@pytest.mark.parametrize("lead,dynamic", [((3,), None), ((1, 2), None), ((2,), 0)])
def test_per_tensor_scale_of_several_rows_is_a_near_miss(lead, dynamic):
    """More than one row, or a token dim that may grow past one at run time: every row needs the
    grid-wide amax, no one-pass kernel; unfused, same bits as stock."""
    fn = _q_tensor(False)
    args = make_inputs(lead, 256, torch.bfloat16, seed=12)
    ref = stock_compile(fn, args)
    fxfuse.report.clear()
    out, _ = compile_and_run(fn, args, dynamic_dim=dynamic)
    assert fxfuse.counters["rmsnorm_quant"] == 0
    assert any("amax over the whole tensor" in m.reason for m in fxfuse.report().near_misses), fxfuse.report()
    assert_identical(tuple(out), ref)
