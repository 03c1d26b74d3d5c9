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


# ----------------------------------------------------------------------------- 3: decomposition outputs

_NS = "fxfuse_i12_test"
_lib = torch.library.Library(_NS, "DEF")
_lib.define("twice(Tensor x) -> Tensor")
_lib.define("twice_into(Tensor! out, Tensor x) -> ()")
_lib.impl("twice", lambda x: x * 2, "CompositeExplicitAutograd")


def _twice_into(out, x):
    out.copy_(x * 2)


_lib.impl("twice_into", _twice_into, "CompositeExplicitAutograd")
torch.library.register_fake(f"{_NS}::twice", lambda x: torch.empty_like(x), lib=_lib)
torch.library.register_fake(f"{_NS}::twice_into", lambda out, x: None, lib=_lib)


def _resize_out(out, x):
    out.resize_(2, 2)
    out.fill_(1.0)


BAD_DECOMPS = {
    "shape": ("twice", lambda x: x[:2] * 2, "shape (2, 8) instead of (4, 8)"),
    "dtype": ("twice", lambda x: (x * 2).double(), "dtype torch.float64 instead of torch.float32"),
    "resize_out": ("twice_into", _resize_out, "shape (2, 2) instead of (4, 8)"),
}


@pytest.mark.parametrize("name", list(BAD_DECOMPS))
def test_decomposition_output_meta_must_match(name):
    op_name, decomp, reason = BAD_DECOMPS[name]
    op = getattr(getattr(torch.ops, _NS), op_name).default
    if op_name == "twice":
        def fn(x):
            return op(x) + 1
    else:
        def fn(x):
            out = torch.empty_like(x)
            op(out, x)
            return out + 1

    x = torch.randn(4, 8)
    ref = fn(x)
    fxfuse.register_unwrap(op, decomp)
    try:
        out = _compile_run(fn, (x,))
    finally:
        fxfuse.patterns.unwrap.unregister_unwrap(op)
    assert fxfuse.counters["unwrap"] == 0, fxfuse.report()
    assert any(reason in r for r in _reasons()), _reasons()
    torch.testing.assert_close(out, ref)


# ----------------------------------------------------------------------------- 1: cache identity


def _make_decomp(factor: float):
    def decomp(x):
        return x * factor

    return decomp


def _helper_a(x):
    return x * 2


def _helper_b(x):
    return x * 3


_HELPER = {"fn": _helper_a}


def _calls_helper(x):
    return _HELPER_FN(x) + 1


_HELPER_FN = _helper_a


def test_uuid_follows_closure_values_helpers_and_user_passes():
    from fxfuse.patterns import unwrap as unwrap_mod

    op = torch.ops.fxfuse_i12_test.twice.default
    try:
        uuids = []
        for decomp in (_make_decomp(2.0), _make_decomp(2.0), _make_decomp(3.0)):
            fxfuse.register_unwrap(op, decomp)
            uuids.append(fxfuse.passes.uuid())
        assert uuids[0] == uuids[1] != uuids[2]  # same code, different closure value

        global _HELPER_FN
        fxfuse.register_unwrap(op, _calls_helper)
        u_a = fxfuse.passes.uuid()
        _HELPER_FN = _helper_b  # same source text, different helper called
        u_b = fxfuse.passes.uuid()
        assert u_a != u_b and u_a is not None
        _HELPER_FN = _helper_a
        assert fxfuse.passes.uuid() == u_a

        fxfuse.register_unwrap(op, _make_decomp(torch.tensor(2.0)))  # small tensors hash by value
        assert fxfuse.passes.uuid() is not None
        fxfuse.register_unwrap(op, _make_decomp(object()))  # unknowable: bypass the cache
        assert fxfuse.passes.uuid() is None
    finally:
        _HELPER_FN = _helper_a
        unwrap_mod.unregister_unwrap(op)

    def after_factory(bound):
        def after(g: fx.Graph) -> None:
            for n in g.nodes:
                if n.op == "call_function" and bound:
                    break

        return after

    a1, a2 = (fxfuse.FusionPasses(after=after_factory(b)).uuid() for b in (False, True))
    assert None not in (a1, a2) and a1 != a2


def test_uuid_auto_mode_covers_custom_op_implementations():
    base = fxfuse.FusionPasses(unwrap="auto").uuid()
    assert base is not None

    @torch.library.custom_op("fxfuse_i12_test::auto_op", mutates_args=())
    def auto_op(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    try:
        with_op = fxfuse.FusionPasses(unwrap="auto").uuid()
        assert with_op not in (None, base)
        assert fxfuse.FusionPasses().uuid() == fxfuse.passes.uuid()  # registered mode: unaffected

        @auto_op.register_kernel("cpu")
        def _(x):
            return x * 3

        assert fxfuse.FusionPasses(unwrap="auto").uuid() not in (None, with_op)
    finally:
        del auto_op


# ----------------------------------------------------------------------------- crashes


def test_static_scale_of_higher_rank_broadcasts_output():
    def fn(x, w, s):
        y = norm_hf(x, w, 1e-6)
        return (y.float() / s.reshape(1, 1, 1)).clamp(-448.0, 448.0).to(FP8)

    x, w = _inputs(seed=5)
    s = torch.tensor([0.02])
    ref = fn(x, w, s)
    out = _compile_run(fn, (x, w, s))
    assert fxfuse.counters["rmsnorm_quant"] == 1, fxfuse.report()
    assert out.shape == ref.shape == (1, 4, H)
    assert (out.float() != ref.float()).float().mean() <= 0.02


def test_config_is_validated():
    with pytest.raises(TypeError, match="strict"):
        fxfuse.FusionPasses(strict="no")
    with pytest.raises(TypeError, match="before"):
        fxfuse.FusionPasses(before=5)
    with pytest.raises(ValueError, match="unknown option 'gaet'"):
        fxfuse.FusionPasses(options={"gaet": False})
    with pytest.raises(TypeError, match="option 'gate' must be bool"):
        fxfuse.FusionPasses(options={"gate": "no"})
    with pytest.raises(ValueError, match="unknown option"):
        fxfuse.FusionPasses(options={1: True, "gate": False})  # mixed key types used to crash uuid()
    p = fxfuse.FusionPasses(enable="rmsnorm_quant")  # a bare string is one name
    assert p.enable == {"rmsnorm_quant"}
    with pytest.raises(ValueError, match=r"unknown fusion name\(s\) \['rmsnorm'\]"):
        fxfuse.FusionPasses(disable="rmsnorm")


def test_register_unwrap_is_validated():
    ok = lambda x: x * 2  # noqa: E731
    for bad in ("::", "ns::", "::name", "a::b::c"):
        with pytest.raises(ValueError, match="not qualified"):
            fxfuse.register_unwrap(bad, ok)
    with pytest.raises(ValueError, match="never unwrapped"):
        fxfuse.register_unwrap(torch.ops.aten.relu.default, ok)
    with pytest.raises(ValueError, match="no overload 'nope'"):
        fxfuse.register_unwrap(f"{_NS}::twice.nope", ok)
    with pytest.raises(TypeError, match="cannot take the arguments"):
        fxfuse.register_unwrap(torch.ops.fxfuse_i12_test.twice_into.default, ok)  # (out, x) vs (x)
    with pytest.warns(UserWarning, match="no op fxfuse_i12_test::not_loaded is loaded yet"):
        fxfuse.register_unwrap(f"{_NS}::not_loaded", ok)
    fxfuse.patterns.unwrap.unregister_unwrap(f"{_NS}::not_loaded")
    assert fxfuse.patterns.unwrap.lookup(torch.ops.fxfuse_i12_test.twice_into.default) is None


# ----------------------------------------------------------------------------- unclear errors


def test_fp64_weight_is_a_near_miss_not_an_internal_error():
    from forms import norm_gemma

    def fn(x, w):
        y = norm_gemma(x, w, 1e-6)
        s = (y.abs().amax(-1, keepdim=True).float() / 448.0).clamp(min=1e-12)
        return (y.float() / s).clamp(-448.0, 448.0).to(FP8), s

    x, _ = _inputs(seed=7)
    w = 0.1 * torch.randn(H, dtype=torch.float64)
    ref = fn(x, w)
    q, s = _compile_run(fn, (x, w))
    assert fxfuse.counters["rmsnorm_quant"] == 0
    assert not fxfuse.report().errors, fxfuse.report().errors
    assert any("weight dtype torch.float64 not supported" in r for r in _reasons()), _reasons()
    torch.testing.assert_close(s, ref[1])


# ----------------------------------------------------------------------------- first run


def test_report_says_when_graphs_came_from_the_cache_and_ids_restart():
    def fn(x):
        return torch.sin(x) * 2

    x = torch.randn(8)
    with fresh_cache():
        torch._dynamo.reset()
        torch.compile(fn, options={"post_grad_custom_pre_pass": fxfuse.passes})(x)
        assert len(fxfuse.report().graphs) == 1
        fxfuse.report.clear()
        torch._dynamo.reset()
        torch.compile(fn, options={"post_grad_custom_pre_pass": fxfuse.passes})(x)  # FX cache hit
        r = fxfuse.report()
        assert r.graphs == [] and r.cache_hits == 1, r.to_dict()
        assert "came from Inductor's FX graph cache" in str(r)
        fxfuse.report.clear()
        torch._dynamo.reset()
        torch.compile(fn, options={"post_grad_custom_pre_pass": fxfuse.FusionPasses(strict=True)})(x)
        assert [g.graph_id for g in fxfuse.report().graphs] == [0]


def test_quickstart_counts_fusions_when_the_cache_already_holds_the_graph(capsys):
    import pathlib
    import runpy

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
    main = runpy.run_path(str(path))["main"]
    with fresh_cache():  # one shared cache: the second run would be a cache hit
        for _ in range(2):
            torch._dynamo.reset()
            fxfuse.counters.clear()
            main()
            out = capsys.readouterr().out
            assert "fxfuse.counters: {'rmsnorm_quant': 1}" in out, out


def test_grad_enabled_gives_a_plain_words_reason():
    def fn(x, w):
        y = norm_hf(x, w, 1e-6)
        s = (y.abs().amax(-1, keepdim=True).float() / 448.0).clamp(min=1e-12)
        return (y.float() / s).clamp(-448.0, 448.0).to(FP8), s

    x, w = _inputs(seed=9)
    w.requires_grad_(True)
    torch._dynamo.reset()
    fxfuse.report.clear()
    with fresh_cache():
        q, s = torch.compile(fn, options={"post_grad_custom_pre_pass": fxfuse.passes})(x, w)
    assert fxfuse.counters["rmsnorm_quant"] == 0
    assert any("saved for backward" in r and "torch.no_grad()" in r for r in _reasons()), _reasons()


# ----------------------------------------------------------------------------- smaller items


def test_mean_then_unsqueeze_gives_the_documented_reason():
    def fn(x, w):
        v = x.float()
        var = v.pow(2).mean(-1).unsqueeze(-1)
        y = w * (v * torch.rsqrt(var + 1e-6)).to(x.dtype)
        s = (y.abs().amax(-1, keepdim=True).float() / 448.0).clamp(min=1e-12)
        return (y.float() / s).clamp(-448.0, 448.0).to(FP8), s

    _compile_run(fn, _inputs(seed=11))
    assert any(r.startswith("mean is not over the last dim with keepdim=True") for r in _reasons()), _reasons()


def test_explain_unknown_factory_is_a_plain_message():
    from fxfuse.__main__ import load_factory

    with pytest.raises(SystemExit, match="has no attribute 'nope'"):
        load_factory("fxfuse:nope")
    with pytest.raises(SystemExit, match="cannot import 'no_such_module_i12'"):
        load_factory("no_such_module_i12:f")


def test_docs_mention_dynamic_and_inference():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    assert "--dynamic" in (root / "docs" / "inspecting.md").read_text()
    assert "torch.no_grad()" in (root / "README.md").read_text()


# ----------------------------------------------------------------------------- dynamic=True float attributes
# Dynamo lifts float attributes (self.eps, self.fp8_max, self.scale) into 0-d float64 graph inputs that
# the graph converts to fp32. The fused ops read them as one-element tensors on every call: a baked
# compile-time value would be wrong after the attribute changes (Dynamo does not recompile).


class _DynModel(torch.nn.Module):
    """HF Llama RMSNorm or SiLU-mul, then an fp8 quant; every constant a float attribute. The
    weights are parameters, so the row length stays static as in a real model."""

    def __init__(self, family: str, quant: str) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.family, self.quant = family, quant
        self.eps, self.fp8_max, self.scale = 1e-6, 448.0, 0.02
        self.weight = torch.nn.Parameter((1.0 + 0.2 * torch.randn(H, generator=g)).to(torch.bfloat16))
        self.gate = torch.nn.Parameter((0.3 * torch.randn(2 * H, H, generator=g)).to(torch.bfloat16))
        self.up = torch.nn.Parameter((0.3 * torch.randn(2 * H, H, generator=g)).to(torch.bfloat16))

    def forward(self, x):
        if self.family == "rmsnorm":
            y = norm_hf(x, self.weight, self.eps)
        else:
            y = torch.nn.functional.silu(x @ self.gate.t()) * (x @ self.up.t())
        if self.quant == "static_div":
            return (y.float() / self.scale).clamp(-448.0, 448.0).to(FP8)
        if self.quant == "static_mul":
            return (y.float() * self.scale).clamp(-448.0, 448.0).to(FP8)
        s = (y.abs().amax(-1, keepdim=True).float() / self.fp8_max).clamp(min=1e-12)
        if self.quant == "token_two_runtime":  # two lifted values in one scale chain: not supported
            s = s * self.scale
        return (y.float() / s).clamp(-448.0, 448.0).to(FP8), s


DYN_CASES = [("rmsnorm", "token"), ("rmsnorm", "static_div"), ("rmsnorm", "static_mul"),
             ("silu_mul", "static_div"), ("silu_mul", "token")]


@pytest.mark.parametrize("family,quant", DYN_CASES, ids=[f"{f}-{q}" for f, q in DYN_CASES])
def test_dynamic_true_float_attributes_fuse_and_are_read_at_run_time(family, quant):
    from torch._dynamo.utils import counters as dynamo_counters

    m = _DynModel(family, quant)
    g = torch.Generator().manual_seed(17)
    x1 = torch.randn(4, H, generator=g).to(torch.bfloat16)
    x2 = (0.1 * torch.randn(6, H, generator=g)).to(torch.bfloat16)  # variance ~0.01: eps 0.5 dominates
    torch._dynamo.reset()
    fxfuse.counters.clear()
    fxfuse.report.clear()
    frames = dynamo_counters["frames"]["ok"]
    with fresh_cache(), torch.no_grad():
        f = torch.compile(m, dynamic=True, options={"post_grad_custom_pre_pass": fxfuse.passes})
        out1 = f(x1)
        assert fxfuse.counters[f"{family}_quant"] == 1, fxfuse.report().near_miss_lines()
        ref1 = m(x1)
        m.eps, m.fp8_max, m.scale = 0.5, 100.0, 0.5  # new values, same compiled graph
        out2 = f(x2)
        ref2 = m(x2)
    assert dynamo_counters["frames"]["ok"] - frames == 1, "recompiled: the test no longer checks run-time values"
    assert fxfuse.counters[f"{family}_quant"] == 1
    for out, ref in ((out1, ref1), (out2, ref2)):
        out, ref = (out if isinstance(out, tuple) else (out,)), (ref if isinstance(ref, tuple) else (ref,))
        for a, b in zip(out, ref):
            assert _same_bits(a, b), (a.float() - b.float()).abs().max()


def _detach_outputs(out):
    """Clones of a compiled call's outputs: under CUDA graphs the next replay reuses their memory."""
    return tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
@pytest.mark.parametrize("family,quant", [("rmsnorm", "token"), ("silu_mul", "static_div")])
def test_gpu_dynamic_true_float_attributes_read_at_run_time(family, quant, mode):
    """On CUDA (gates off): the fused kernel is in Inductor's output code, no fxfuse op call, and a
    changed attribute (no recompile) still gives eager's result, also under CUDA-graph replay."""
    from torch._inductor.utils import run_and_get_code

    from forms import dequant_close

    m = _DynModel(family, quant).cuda()
    g = torch.Generator().manual_seed(17)
    xs = [(s * torch.randn(M, H, generator=g)).to(torch.bfloat16).cuda() for M, s in ((4, 1.0), (6, 0.1), (6, 0.1))]
    torch._dynamo.reset()
    fxfuse.counters.clear()
    passes = fxfuse.FusionPasses(options={"gate": False})
    with fresh_cache(), torch.no_grad():
        # torch 2.11 refuses mode= together with options=: reduce-overhead is CUDA graphs as an option
        cg = {"triton.cudagraphs": True} if mode == "reduce-overhead" else {}
        f = torch.compile(m, dynamic=True, options={"post_grad_custom_pre_pass": passes, **cg})
        out, codes = run_and_get_code(f, xs[0])
        out = _detach_outputs(out)
        assert fxfuse.counters[f"{family}_quant"] == 1, fxfuse.report().near_miss_lines()
        code = "\n".join(codes)
        kernel = {"rmsnorm": "_rms_norm_quant_kernel", "silu_mul": "_silu_mul_quant_kernel"}[family]
        assert kernel in code and "torch.ops.fxfuse" not in code
        results = [(out, m(xs[0]))]
        m.eps, m.fp8_max, m.scale = 0.5, 100.0, 0.5
        for x in xs[1:]:  # twice: the second call replays a recorded CUDA graph
            results.append((_detach_outputs(f(x)), m(x)))  # a replay overwrites the graph's outputs
    for out, ref in results:
        out, ref = (out if isinstance(out, tuple) else (out,)), (ref if isinstance(ref, tuple) else (ref,))
        assert not dequant_close(tuple(o.cpu() for o in out), tuple(r.cpu() for r in ref))


def test_dynamic_true_two_runtime_scale_values_are_a_near_miss():
    m = _DynModel("rmsnorm", "token_two_runtime")
    x = _inputs(seed=13)[0]
    q, s = _compile_run(m, (x,), dynamic=True)
    ref = m(x)
    assert fxfuse.counters["rmsnorm_quant"] == 0
    assert _same_bits(s, ref[1])
    assert any("more than one runtime value" in r and "specialize_float" in r for r in _reasons()), _reasons()


def _dynamic_graph_on_fake_cuda(module: torch.nn.Module, args: tuple) -> tuple[fx.GraphModule, int]:
    """The post-grad graph of `module` compiled with dynamic=True on CPU, re-propagated as Dynamo
    hands a CUDA graph over: tensors on fake CUDA at the captured sizes, the lifted 0-d scalars left
    on CPU. Returns the graph and how many such scalars it has."""
    import copy

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    graphs: list[fx.GraphModule] = []

    class Capture(fxfuse.FusionPasses):
        def __call__(self, graph: fx.Graph) -> None:
            graphs.append(fx.GraphModule(torch.nn.Module(), copy.deepcopy(graph)))

    torch._dynamo.reset()
    with fresh_cache(), torch.no_grad():
        torch.compile(module, dynamic=True, options={"post_grad_custom_pre_pass": Capture()})(*args)
    (gm,) = graphs
    hint = lambda v: int(v.node.hint) if isinstance(v, torch.SymInt) else int(v)  # noqa: E731
    mode, ins = FakeTensorMode(), []
    with mode:
        for p in (n for n in gm.graph.nodes if n.op == "placeholder"):
            v = p.meta["val"]
            if isinstance(v, torch.SymInt):
                ins.append(hint(v))
            else:
                ins.append(torch.empty([hint(d) for d in v.shape], dtype=v.dtype, device="cpu" if v.dim() == 0 else "cuda"))
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*ins)
    return gm, sum(isinstance(t, torch.Tensor) and t.dim() == 0 for t in ins)


def _ungated_launch_kwargs(gm: fx.GraphModule, family: str) -> dict:
    """Run the pipeline ungated on `gm`: exactly one `family` rewrite, traced to one user Triton
    launch; its kernel arguments (FX nodes for tensors)."""
    fxfuse.counters.clear()
    fxfuse.report.clear()
    fxfuse.FusionPasses(options={"gate": False})(gm.graph)
    assert fxfuse.counters[family] == 1, fxfuse.report().near_miss_lines()
    (hop,) = [n for n in gm.graph.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
    return hop.kwargs["kwargs"]


def _copies_or_syncs(gm: fx.GraphModule) -> list[str]:
    """Nodes that copy a value across devices or read it on the host."""
    return [n.format_node() for n in gm.graph.nodes
            if n.op == "call_function" and any(k in str(n.target) for k in ("_to_copy", "device_put", "_local_scalar_dense"))]


def test_dynamic_true_rope_qk_norm_cuda_path_reads_the_eps_on_device():
    """The CUDA rewrite of the lifted-eps QK-norm RoPE (graph captured on CPU under dynamic=True,
    tensors re-propagated on fake CUDA, the 0-d eps left on CPU as Dynamo hands it over): gated as
    its own unmeasured class; ungated, one user Triton kernel reading eps through a pointer made by
    `ones * eps` on the device, with no copy and no .item()."""
    import copy

    from test_rope_quant import apply_rope, hf_inputs, q_dynamic

    D = 32

    class QKNorm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.eps = 1e-6
            self.wq = torch.nn.Parameter(torch.ones(D, dtype=torch.bfloat16))
            self.wk = torch.nn.Parameter(torch.ones(D, dtype=torch.bfloat16))

        def forward(self, qp, kp, cos, sin):
            q, k = (norm_hf(t, w, self.eps).transpose(1, 2) for t, w in ((qp, self.wq), (kp, self.wk)))
            qe, ke = apply_rope(q, k, cos, sin)
            return (*q_dynamic(qe, None), ke)

    _, _, cos, sin, _ = hf_inputs(B=2, S=5, D=D, seed=12)
    args = (torch.randn(2, 5, 4, D).to(torch.bfloat16), torch.randn(2, 5, 2, D).to(torch.bfloat16), cos, sin)
    gm, n_scalars = _dynamic_graph_on_fake_cuda(QKNorm(), args)
    assert n_scalars == 1  # the lifted eps
    fxfuse.report.clear()
    fxfuse.FusionPasses()(copy.deepcopy(gm).graph)
    assert any("cpu-scalars" in r for r in _reasons()), _reasons()
    kw = _ungated_launch_kwargs(gm, "rope_quant")
    assert "+qk_norm" in fxfuse.report().fusions[0].detail
    assert kw["Q_EPS_T"] is True and kw["K_EPS_T"] is True
    for name in ("qeps_ptr", "keps_ptr"):
        ptr = kw[name]
        assert ptr.target is torch.ops.aten.mul.Tensor and ptr.meta["val"].device.type == "cuda", ptr.format_node()
    bad = _copies_or_syncs(gm)
    assert not bad, bad


def test_dynamic_true_rope_qk_norm_reads_the_lifted_eps():
    """Qwen3 q_norm/k_norm with `self.eps` lifted by dynamic=True: the norm fuses with the RoPE and
    the kernel reads eps from the lifted input on every call, so changing the attribute changes the
    output as in eager (a baked 1e-6 for 0.05 on a variance ~0.01 would be off by ~2x)."""
    from test_rope_quant import apply_rope, hf_inputs, q_dynamic

    D = 32

    class QKNorm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(3)
            self.eps = 1e-6
            self.wq = torch.nn.Parameter((1 + 0.2 * torch.randn(D, generator=g)).to(torch.bfloat16))
            self.wk = torch.nn.Parameter((1 + 0.2 * torch.randn(D, generator=g)).to(torch.bfloat16))

        def forward(self, qp, kp, cos, sin):
            q, k = (norm_hf(t, w, self.eps).transpose(1, 2) for t, w in ((qp, self.wq), (kp, self.wk)))
            qe, ke = apply_rope(q, k, cos, sin)
            return (*q_dynamic(qe, None), ke)

    g = torch.Generator().manual_seed(12)
    _, _, cos, sin, _ = hf_inputs(B=2, S=5, D=D, seed=12)
    args = ((0.1 * torch.randn(2, 5, 4, D, generator=g)).to(torch.bfloat16),
            (0.1 * torch.randn(2, 5, 2, D, generator=g)).to(torch.bfloat16), cos, sin)
    m = QKNorm()
    torch._dynamo.reset()
    fxfuse.counters.clear()
    fxfuse.report.clear()
    with fresh_cache(), torch.no_grad():
        f = torch.compile(m, dynamic=True, options={"post_grad_custom_pre_pass": fxfuse.passes})
        outs = [f(*args)]
        refs = [m(*args)]
        m.eps = 0.05
        outs.append(f(*args))
        refs.append(m(*args))
    assert fxfuse.counters["rope_quant"] == 1, fxfuse.report().near_miss_lines()
    assert all("+qk_norm" in fu.detail for fu in fxfuse.report().fusions), fxfuse.report().fusions
    assert not any("eps" in r for r in _reasons()), _reasons()
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()  # noqa: E731
    for out, ref in zip(outs, refs):
        assert rel(out[0].double() * out[1], ref[0].double() * ref[1]) < 5e-2
        assert rel(out[1], ref[1]) < 1e-2 and rel(out[2], ref[2]) < 1e-2


def test_dynamic_true_cuda_path_reads_lifted_scalars_without_copy_or_sync():
    """The CUDA rewrite of a dynamic=True graph (captured on CPU, re-propagated with the tensors on
    fake CUDA and the lifted 0-d scalars on CPU, as Dynamo hands them over): a user Triton kernel
    whose eps / scale-slot pointers come from `ones * scalar` on the device, no copy, no .item()."""
    import copy

    gm, n_scalars = _dynamic_graph_on_fake_cuda(_DynModel("rmsnorm", "token"), (_inputs()[0],))
    assert n_scalars == 2  # eps, fp8_max
    # gates on: each moved scalar adds a tiny launch, a benchmark class of its own (unmeasured: off)
    from fxfuse import gating

    if gating.rejects("rmsnorm_quant", scheme="per-token/cpu-scalars", hidden=H, dtype=torch.bfloat16) is not None:
        fxfuse.report.clear()
        fxfuse.FusionPasses()(copy.deepcopy(gm).graph)
        assert any("per-token/cpu-scalars" in r for r in _reasons()), _reasons()
    kw = _ungated_launch_kwargs(gm, "rmsnorm_quant")
    assert kw["EPS_T"] is True and kw["UB_SLOT"] == 0
    for name in ("eps_ptr", "ub_ptr"):
        ptr = kw[name]
        assert ptr.target is torch.ops.aten.mul.Tensor and ptr.meta["val"].device.type == "cuda", ptr.format_node()
        assert any(isinstance(a, fx.Node) and a.meta["val"].device.type == "cpu" and a.meta["val"].dim() == 0
                   for a in ptr.args)
    bad = _copies_or_syncs(gm)
    assert not bad, bad


# ----------------------------------------------------------------------------- CPU in-place inputs

_lib.define("fused_add_rms_norm(Tensor! input, Tensor! residual, Tensor weight, float epsilon) -> ()")


def _far_impl(x, res, w, eps):
    s = x + res
    res.copy_(s)
    v = s.float()
    x.copy_((v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w)


_lib.impl("fused_add_rms_norm", _far_impl, "CompositeExplicitAutograd")
torch.library.register_fake(f"{_NS}::fused_add_rms_norm", lambda x, r, w, e: None, lib=_lib)


def test_cpu_fused_add_rms_norm_on_two_graph_inputs_is_left_opaque():
    from fxfuse.patterns import unwrap_builtin

    added = unwrap_builtin.register_builtins({"_C": _NS})
    op = torch.ops.fxfuse_i12_test.fused_add_rms_norm

    def fn(x, res, w):
        op(x, res, w, 1e-6)
        return x * 2

    x, w = _inputs(seed=17)
    r = torch.randn_like(x)
    x2, r2 = x.clone(), r.clone()
    try:
        ref = fn(x2, r2, w)
        out = _compile_run(fn, (x, r, w))  # used to raise InductorError KeyError 'bufN'
    finally:
        for key in added:
            fxfuse.patterns.unwrap.unregister_unwrap(key)
    assert any("Inductor CPU codegen bug" in r for r in _reasons()), _reasons()
    assert torch.equal(out, ref) and torch.equal(x, x2) and torch.equal(r, r2)


def test_every_third_party_import_is_a_declared_dependency():
    """A fresh venv with `pip install -e ".[test]"` must have everything the code and tests import
    (numpy was missing: the Triton interpreter needs it)."""
    import ast
    import pathlib
    import re
    import sys
    import tomllib

    root = pathlib.Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    declared |= {re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0].lower() for d in project["optional-dependencies"]["test"]}
    local = {p.stem for d in ("tests", "benchmarks") for p in (root / d).glob("*.py")} | {"fxfuse", "benchmarks"}
    imported: set[str] = set()
    for path in [*(root / "fxfuse").rglob("*.py"), *(root / "tests").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m not in local}
    optional = {"transformers", "torchao"}  # imported lazily: tests skip, the demo falls back without them
    missing = sorted(m for m in third_party - optional if m.lower() not in declared)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    assert "numpy" in declared  # the Triton interpreter (TRITON_INTERPRET=1 tests) imports it


_TWO_PROCESS_SCRIPT = r"""
import sys, torch, fxfuse
lib = torch.library.Library("fxfuse_i12_proc", "DEF")
lib.define("scaled(Tensor x) -> Tensor")
lib.impl("scaled", lambda x: x * 0, "CompositeExplicitAutograd")
torch.library.register_fake("fxfuse_i12_proc::scaled", lambda x: torch.empty_like(x), lib=lib)

def make(factor):
    def decomp(x):
        return x * factor
    return decomp

fxfuse.register_unwrap(torch.ops.fxfuse_i12_proc.scaled.default, make(float(sys.argv[1])))
fn = torch.compile(lambda x: torch.ops.fxfuse_i12_proc.scaled(x) + 1,
                   options={"post_grad_custom_pre_pass": fxfuse.passes})
print("@@", fn(torch.ones(4)).tolist())
"""


def test_fx_cache_is_not_reused_across_processes_when_a_closure_changes(tmp_path):
    import os
    import pathlib
    import subprocess
    import sys

    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path), TORCHINDUCTOR_COMPILE_THREADS="1")
    env["PYTHONPATH"] = str(pathlib.Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    script = tmp_path / "two_process.py"  # a file: inspect.getsource works, as in a user's script
    script.write_text(_TWO_PROCESS_SCRIPT)
    results = []
    for factor in ("2", "3"):
        p = subprocess.run([sys.executable, str(script), factor], env=env, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        results.append([ln for ln in p.stdout.splitlines() if ln.startswith("@@")][-1])
    assert results == ["@@ [3.0, 3.0, 3.0, 3.0]", "@@ [4.0, 4.0, 4.0, 4.0]"], results
