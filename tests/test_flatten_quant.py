"""A row-preserving flatten before the quant (`y.reshape(-1, H)`, as quantized linears write it
for a 3-D activation) fuses in both families: RMSNorm+quant and SiLU-mul+quant, every scheme,
static and dynamic token dims; the outputs keep the written (flattened) shapes and match eager.
A reshape that changes the last dim (mixes rows, or splits a row other than into
[groups, group_size]) stays unfused with a plain reason and stays correct."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fxfuse
from forms import NORMS, QUANTS, assert_identical, dequant_close, make_inputs, q_group_2d, stock_compile
from test_rmsnorm_quant import compile_and_run as run_norm
from test_silu_mul_quant import compile_and_run as run_silu, make_args


def _flat(y: torch.Tensor) -> torch.Tensor:
    return y.reshape(-1, y.shape[-1])


def _merge_mid(y: torch.Tensor) -> torch.Tensor:
    """[A, B, C, H] -> [A, B*C, H]: merges some token dims only."""
    return y.reshape(y.shape[0], -1, y.shape[-1])


def _unsqueeze_rows(y: torch.Tensor) -> torch.Tensor:
    """2-D [M, H] -> [1, M, H]: still row-preserving."""
    return y.reshape(1, *y.shape)


def _quant(name: str):
    if name == "group2d":
        return q_group_2d
    return QUANTS[name]


VIEWS = {"flat": _flat, "merge_mid": _merge_mid, "unsqueeze_rows": _unsqueeze_rows}

# (view, quant, token dims, dynamic dim or None)
NORM_CASES = [
    ("flat", "token", (2, 5), None),
    ("flat", "token", (2, 5), 1),
    ("flat", "static_div", (3, 4), 1),
    ("flat", "group64", (2, 5), 1),
    ("flat", "group2d", (2, 3), 1),
    ("flat", "torchao_rowwise", (1, 7), None),
    ("merge_mid", "int8_token", (2, 3, 2), None),
    ("unsqueeze_rows", "token", (6,), 0),
]


def _ids(cases):
    return ["-".join([c[0], c[1], "x".join(map(str, c[2])), "dyn" if c[3] is not None else "static"]) for c in cases]


@pytest.mark.parametrize("case", NORM_CASES, ids=_ids(NORM_CASES))
def test_norm_flatten_fuses(case):
    view, quant, lead, dyn = case
    vf, qf = VIEWS[view], _quant(quant)

    def fn(x, res, w, scale):
        return qf(vf(NORMS["hf"](x, w, 1e-6)), scale)

    args = make_inputs(lead, 128, torch.bfloat16, seed=len(lead) * 7 + len(quant))
    with torch.no_grad():
        ref = fn(*args)
    out, leftovers = run_norm(fn, args, dynamic_dim=dyn)
    assert fxfuse.counters["rmsnorm_quant"] == 1, fxfuse.report()
    assert not leftovers, leftovers
    assert not dequant_close(tuple(out), tuple(ref)), dequant_close(tuple(out), tuple(ref))
    if dyn is not None:  # a second token count through the same compiled graph
        lead2 = tuple(d + 3 if i == dyn else d for i, d in enumerate(lead))
        args2 = make_inputs(lead2, 128, torch.bfloat16, seed=5)
        torch._dynamo.mark_dynamic(args2[0], dyn)
        with torch.no_grad():
            compiled = torch.compile(fn, options={"post_grad_custom_pre_pass": fxfuse.passes}, fullgraph=True)
            assert not dequant_close(tuple(compiled(*args2)), tuple(fn(*args2)))


def test_norm_flatten_shared_by_three_linears():
    """q, k, v each flatten and quantize the normalized output: one fused quant."""

    def fn(x, res, w, scale):
        y = NORMS["hf"](x + res, w, 1e-6)
        return tuple(t for _ in range(3) for t in QUANTS["token"](_flat(y), scale))

    args = make_inputs((2, 3), 128, torch.bfloat16, seed=31)
    with torch.no_grad():
        ref = fn(*args)
    out, _ = run_norm(fn, args, dynamic_dim=1)
    assert fxfuse.counters["rmsnorm_quant"] == 1, fxfuse.report()
    assert "shared by 3 quantizations" in fxfuse.report().fusions[0].detail
    assert out[0].shape == (6, 128) and out[1].shape == (6, 1)
    assert not dequant_close(tuple(out), tuple(ref))


SILU_CASES = [
    ("separate", "token", (2, 5), None),
    ("chunk", "group64", (2, 5), 1),
    ("slice", "group2d", (3, 2), 1),
    ("separate", "int8_static", (2, 3), 1),
]


@pytest.mark.parametrize(
    "case", SILU_CASES, ids=["-".join([c[0], c[1], "dyn" if c[3] is not None else "static"]) for c in SILU_CASES]
)
def test_silu_flatten_fuses(case):
    layout, quant, lead, dyn = case
    qf = _quant(quant)

    def fn(gu, up, scale):
        if layout == "separate":
            g, u = gu, up
        elif layout == "chunk":
            g, u = gu.chunk(2, dim=-1)
        else:
            d = gu.shape[-1] // 2
            g, u = gu[..., :d], gu[..., d:]
        return qf(_flat(F.silu(g) * u), scale)

    args = make_args(lead, 128, torch.bfloat16, layout, seed=17)
    with torch.no_grad():
        ref = fn(*args)
    out, leftovers = run_silu(fn, args, dynamic_dim=dyn)
    assert fxfuse.counters["silu_mul_quant"] == 1, fxfuse.report()
    assert not leftovers, leftovers
    assert out[0].shape[0] == lead[0] * lead[1]
    assert not dequant_close(tuple(out), tuple(ref)), dequant_close(tuple(out), tuple(ref))


# ------------------------------------------------------------------ reshapes that must NOT fuse
def _mix_rows(y: torch.Tensor) -> torch.Tensor:
    return y.reshape(y.shape[0], -1)  # [B, T, H] -> [B, T*H]: one "row" spans T tokens


def _split_rows(y: torch.Tensor) -> torch.Tensor:
    return y.reshape(-1, y.shape[-1] // 2)  # [B, T, H] -> [2BT, H/2]: half rows


def _scale_unflattened(y: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """amax over the 3-D y, divide of the flattened one: a broadcast across views."""
    s = (y.abs().amax(-1, keepdim=True).float() / 448.0).clamp(min=1e-12)
    return (_flat(y).float() / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), s


NEAR = {
    "mix_rows": (lambda y, s: QUANTS["token"](_mix_rows(y), s), "changes the last dim"),
    "split_rows": (lambda y, s: QUANTS["token"](_split_rows(y), s), "changes the last dim"),
    "scale_unflattened": (_scale_unflattened, "scale rows"),
}


@pytest.mark.parametrize("family", ["rmsnorm_quant", "silu_mul_quant"])
@pytest.mark.parametrize("name", list(NEAR))
def test_reshape_near_miss(family, name):
    qf, reason = NEAR[name]
    if family == "rmsnorm_quant":
        args = make_inputs((1, 4), 128, torch.bfloat16, seed=41)

        def fn(x, res, w, scale):
            return qf(NORMS["hf"](x, w, 1e-6), scale)

        run = run_norm
    else:
        args = make_args((1, 4), 128, torch.bfloat16, "separate", seed=42)

        def fn(gu, up, scale):
            return qf(F.silu(gu) * up, scale)

        run = run_silu
    ref = stock_compile(fn, args)
    fxfuse.report.clear()
    out, _ = run(fn, args)
    assert fxfuse.counters[family] == 0
    misses = [m.reason for m in fxfuse.report().near_misses if m.family == family]
    assert any(reason in r for r in misses), misses
    assert_identical(tuple(out), ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["rmsnorm_quant", "silu_mul_quant"])
def test_gpu_flatten_fuses_into_triton_kernel(family):
    """On CUDA the flattened form compiles to the family's user Triton kernel, dynamic token dim."""
    from torch._inductor.utils import fresh_cache, run_and_get_code

    if family == "rmsnorm_quant":
        args = make_inputs((2, 37), 1024, torch.bfloat16, device="cuda", seed=51)

        def fn(x, res, w, scale):
            return QUANTS["token"](_flat(NORMS["hf"](x + res, w, 1e-6)), scale)

        kernel = "_rms_norm_quant_kernel"
    else:
        gu, up, scale = make_args((2, 37), 1024, torch.bfloat16, "chunk", seed=52)
        args = (gu.cuda(), up.cuda(), scale.cuda())

        def fn(gu, up, scale):
            g, u = gu.chunk(2, dim=-1)
            return QUANTS["group128"](_flat(F.silu(g) * u), scale)

        kernel = "_silu_mul_quant_kernel"
    torch._dynamo.mark_dynamic(args[0], 1)
    if family == "rmsnorm_quant":  # x + res: both token dims dynamic, else Dynamo specializes x's
        torch._dynamo.mark_dynamic(args[1], 1)
    with torch.no_grad():
        ref = fn(*args)
    passes = fxfuse.FusionPasses(options={"gate": False})
    with fresh_cache(), torch.no_grad():
        out, codes = run_and_get_code(torch.compile(fn, options={"post_grad_custom_pre_pass": passes}), *args)
    assert fxfuse.counters[family] == 1, fxfuse.report()
    code = "\n".join(codes)
    assert kernel in code and "torch.ops.fxfuse" not in code
    assert not dequant_close(tuple(out), tuple(ref))


@pytest.mark.parametrize("family", ["rmsnorm_quant", "silu_mul_quant"])
def test_fake_cuda_flatten_traces_to_triton_kernel(family):
    """The CUDA rewrite of a flattened form with a symbolic token dim: a user Triton kernel node
    (no opaque op call left), outputs in the written [B*T, ...] shapes. Fake CUDA tensors, so CPU
    CI runs it."""
    from torch._dispatch.python import enable_python_dispatcher
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    def norm(x, w):
        return QUANTS["token"](_flat(NORMS["hf"](x, w, 1e-6)), None)

    def silu(gu):
        g, u = gu.chunk(2, dim=-1)
        return q_group_2d(_flat(F.silu(g) * u), None)

    fn, shapes = (norm, [(2, None, 256), (256,)]) if family == "rmsnorm_quant" else (silu, [(2, None, 512)])
    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env)
    T = env.create_symintnode(env.create_symbol(5, ConstantSource("T"), dynamic_dim=DimDynamic.DYNAMIC), hint=5)
    with mode:
        ins = [torch.empty([T if d is None else d for d in s], dtype=torch.bfloat16, device="cuda") for s in shapes]
        with enable_python_dispatcher():
            gm = make_fx(fn, tracing_mode="real")(*ins)
    fxfuse.FusionPasses(options={"gate": False}, strict=True)(gm.graph)
    assert fxfuse.counters[family] == 1, fxfuse.report()
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.higher_order.triton_kernel_wrapper_functional in targets
    assert not any("fxfuse" in str(t) for t in targets), targets
    (outs,) = [n.args[0] for n in gm.graph.nodes if n.op == "output"]
    q_shape = tuple(outs[0].meta["val"].shape)
    assert q_shape == (2 * T, 256), q_shape
