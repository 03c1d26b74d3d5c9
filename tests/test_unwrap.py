"""Unwrapping opaque custom ops (CPU): a decoder block built only from vLLM-schema opaque ops
compiles with fxfuse to the same numerics as eager, unwraps every op, and fuses the unwrapped
RMSNorm+quant pairs; mutated inputs match eager; auto_functionalized v1 and v2; dynamic tokens;
unknown ops untouched; "auto" mode for Python custom ops."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._inductor.utils import fresh_cache

import fxfuse
from fxfuse.patterns import unwrap as unwrap_mod
from fxfuse.patterns import unwrap_builtin

NS = "fxfuse_unwrap_test"
FP8 = torch.float8_e4m3fn
FMAX = 448.0
EPS = 1e-6

# ----------------------------------------------------------------------------- opaque test ops
# Same schemas as vLLM's _C / _moe_C ops, eager reference implementations written independently
# of the shipped decompositions (in-place writes, plain torch).

_lib = torch.library.Library(NS, "DEF")
SCHEMAS = {
    "rms_norm": "rms_norm(Tensor! result, Tensor input, Tensor weight, float epsilon) -> ()",
    "fused_add_rms_norm": "fused_add_rms_norm(Tensor! input, Tensor! residual, Tensor weight, float epsilon) -> ()",
    "static_scaled_fp8_quant": "static_scaled_fp8_quant(Tensor! result, Tensor input, Tensor scale) -> ()",
    "dynamic_scaled_fp8_quant": "dynamic_scaled_fp8_quant(Tensor! result, Tensor input, Tensor! scale) -> ()",
    "dynamic_per_token_scaled_fp8_quant": (
        "dynamic_per_token_scaled_fp8_quant(Tensor! result, Tensor input, Tensor! scale, Tensor? scale_ub) -> ()"
    ),
    "rotary_embedding": (
        "rotary_embedding(Tensor positions, Tensor! query, Tensor!? key, int head_size, "
        "Tensor cos_sin_cache, bool is_neox) -> ()"
    ),
    "silu_and_mul": "silu_and_mul(Tensor! result, Tensor input) -> ()",
    "topk_softmax": (
        "topk_softmax(Tensor! topk_weights, Tensor! topk_indices, Tensor! token_expert_indices, "
        "Tensor gating_output, bool renormalize) -> ()"
    ),
    "mystery": "mystery(Tensor! result, Tensor input) -> ()",  # opaque, nothing registered
}


def _ref_rms(x, w, eps):
    v = x.float()
    return (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def _ref_rms_norm(out, x, w, eps):
    out.copy_(_ref_rms(x, w, eps))


def _ref_fused_add_rms_norm(x, res, w, eps):
    s = x + res
    res.copy_(s)
    x.copy_(_ref_rms(s, w, eps))


def _ref_static(out, x, scale):
    out.copy_((x.float() / scale).clamp(-FMAX, FMAX).to(out.dtype))


def _ref_dynamic(out, x, scale):
    scale.fill_(x.abs().max().float().item() / FMAX)
    out.copy_((x.float() / scale).clamp(-FMAX, FMAX).to(out.dtype))


def _ref_per_token(out, x, scale, ub):
    amax = x.abs().float().amax(-1, keepdim=True)
    if ub is not None:
        amax = amax.clamp(max=ub.item())
    s = torch.clamp(amax / FMAX, min=1.0 / (FMAX * 512))
    scale.copy_(s)
    out.copy_((x.float() / s).clamp(-FMAX, FMAX).to(out.dtype))


def _ref_rope(positions, q, k, head_size, cache, is_neox):
    rot = cache.shape[1]
    for t in (q, k):
        if t is None:
            continue
        v = t.view(positions.numel(), -1, head_size)
        for tok in range(v.shape[0]):
            c, s = cache[positions.flatten()[tok]].to(t.dtype).chunk(2)
            for h in range(v.shape[1]):
                r = v[tok, h, :rot].clone()
                if is_neox:
                    a, b = r[: rot // 2], r[rot // 2 :]
                    v[tok, h, :rot] = torch.cat((a * c - b * s, b * c + a * s))
                else:
                    a, b = r[0::2], r[1::2]
                    v[tok, h, 0:rot:2] = a * c - b * s
                    v[tok, h, 1:rot:2] = b * c + a * s


def _ref_silu_and_mul(out, x):
    d = x.shape[-1] // 2
    out.copy_(F.silu(x[..., :d]) * x[..., d:])


def _ref_topk_softmax(w, ids, tei, logits, renorm):
    p = logits.float().softmax(-1)
    tw, ti = p.topk(w.shape[-1], -1)
    if renorm:
        tw = tw / tw.sum(-1, keepdim=True)
    w.copy_(tw)
    ids.copy_(ti)
    m = logits.shape[0]
    for t in range(m):
        for j in range(w.shape[-1]):
            tei[t, j] = j * m + t


def _ref_mystery(out, x):
    out.copy_(x * 3)


_REFS = {
    "rms_norm": _ref_rms_norm,
    "fused_add_rms_norm": _ref_fused_add_rms_norm,
    "static_scaled_fp8_quant": _ref_static,
    "dynamic_scaled_fp8_quant": _ref_dynamic,
    "dynamic_per_token_scaled_fp8_quant": _ref_per_token,
    "rotary_embedding": _ref_rope,
    "silu_and_mul": _ref_silu_and_mul,
    "topk_softmax": _ref_topk_softmax,
    "mystery": _ref_mystery,
}
for _name, _schema in SCHEMAS.items():
    _lib.define(_schema)
    _lib.impl(_name, _REFS[_name], "CPU")
    torch.library.register_fake(f"{NS}::{_name}", lambda *a, **k: None, lib=_lib)

ops = getattr(torch.ops, NS)


@pytest.fixture(scope="module", autouse=True)
def builtins_registered():
    """Register the shipped decompositions against the test ops, through the built-in code path."""
    added = unwrap_builtin.register_builtins({"_C": NS, "_moe_C": NS})
    assert len(added) == 8, added
    yield
    for key in added:
        unwrap_mod.unregister_unwrap(key)


# ----------------------------------------------------------------------------- helpers


def compile_run(fn, args, *, passes=None, dynamic: bool = False):
    """Compile fn with fxfuse from a clean cache; returns (outputs, post-pass graph text)."""
    graphs: list[str] = []

    def after(g: fx.Graph) -> None:
        graphs.append(str(g))

    p = passes or fxfuse.FusionPasses(after=after)
    if passes is not None:
        p.after = after
    torch._dynamo.reset()
    fxfuse.counters.clear()
    if dynamic:
        for a in args:
            if isinstance(a, torch.Tensor) and a.dim() >= 1 and a.shape[0] == args[0].shape[0]:
                torch._dynamo.mark_dynamic(a, 0)
    with fresh_cache(), torch.no_grad():
        out = torch.compile(fn, options={"post_grad_custom_pre_pass": p}, fullgraph=True)(*args)
    return out, "\n".join(graphs)


def clone_args(args):
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


# ----------------------------------------------------------------------------- the decoder block

H, HEAD, ROT, E, K, INTER = 64, 32, 16, 4, 2, 48


def block(x, residual, positions, ln1, ln2, w_qkv, w_o, w_gu, w_down, w_router, cos_sin, sq):
    """One decoder layer written only with opaque ops between plain matmuls."""
    M = x.shape[0]
    h = torch.empty_like(x)
    ops.rms_norm(h, x, ln1, EPS)  # out-variant RMSNorm into an internal buffer
    hq = torch.empty(x.shape, dtype=FP8, device=x.device)
    hs = torch.empty(M, 1, dtype=torch.float32, device=x.device)
    ops.dynamic_per_token_scaled_fp8_quant(hq, h, hs, None)  # -> fuses with the norm above
    qkv = ((hq.float() * hs) @ w_qkv).to(x.dtype)
    q, k, v = qkv.split(H, -1)
    q, k = q.contiguous(), k.contiguous()
    ops.rotary_embedding(positions, q, k, HEAD, cos_sin, True)  # in place on q, k
    o = (((q * k).sigmoid() * v).float() @ w_o).to(x.dtype)
    ops.fused_add_rms_norm(o, residual, ln2, EPS)  # o <- norm(o + residual); residual (input) <- o + residual
    oq = torch.empty(o.shape, dtype=FP8, device=x.device)
    ops.static_scaled_fp8_quant(oq, o, sq)  # -> fuses with the fused-add norm above
    xo = oq.float() * sq
    tw = torch.empty(M, K, dtype=torch.float32, device=x.device)
    ti = torch.empty(M, K, dtype=torch.int32, device=x.device)
    tei = torch.empty(M, K, dtype=torch.int32, device=x.device)
    ops.topk_softmax(tw, ti, tei, xo @ w_router, True)
    gu = (xo @ w_gu).to(x.dtype)
    act = torch.empty(M, INTER, dtype=x.dtype, device=x.device)
    ops.silu_and_mul(act, gu)
    aq = torch.empty(act.shape, dtype=FP8, device=x.device)
    a_s = torch.empty(1, dtype=torch.float32, device=x.device)
    ops.dynamic_scaled_fp8_quant(aq, act, a_s)
    down = (aq.float() * a_s) @ w_down
    out = down * tw.sum(-1, keepdim=True) + ti.float().mean(-1, keepdim=True)
    return out.to(x.dtype), q, k, ti, tei, hs


def block_inputs(M: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    bf = torch.bfloat16

    def r(*s, dt=torch.float32, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(dt)

    return [
        r(M, H, dt=bf),
        r(M, H, dt=bf),
        torch.randint(0, 64, (M,), generator=g),
        (1 + 0.1 * r(H)).to(bf),
        (1 + 0.1 * r(H)).to(bf),
        r(H, 3 * H, scale=H**-0.5),
        r(H, H, scale=H**-0.5),
        r(H, 2 * INTER, scale=H**-0.5),
        r(INTER, H, scale=INTER**-0.5),
        r(H, E),
        r(64, ROT),
        torch.tensor([0.02]),
    ]


def assert_block_close(out, ref):
    o, q, k, ti, tei, hs = out
    ro, rq, rk, rti, rtei, rhs = ref
    torch.testing.assert_close(hs, rhs, rtol=1e-2, atol=1e-6)
    torch.testing.assert_close(q.float(), rq.float(), rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(k.float(), rk.float(), rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(tei, rtei)
    assert (ti == rti).float().mean() > 0.9  # router ties under fp8 noise may swap an expert
    torch.testing.assert_close(o.float(), ro.float(), rtol=0.1, atol=0.1)


@pytest.mark.parametrize("v2", [True, False], ids=["auto_functionalized_v2", "auto_functionalized_v1"])
def test_decoder_block(v2):
    args = block_inputs(8)
    eager_args = clone_args(args)
    with torch.no_grad():
        ref = block(*eager_args)
    with torch._inductor.config.patch(enable_auto_functionalized_v2=v2):
        out, graph = compile_run(block, args)
    c = dict(fxfuse.counters)
    assert c.get("unwrap") == 8, (c, fxfuse.report())
    assert c.get("rmsnorm_quant") == 2, (c, fxfuse.report())
    assert NS not in graph and "auto_functionalized" not in graph, graph
    assert_block_close(out, ref)
    # the mutated graph input holds the eager value (x + o, rounded like eager)
    torch.testing.assert_close(args[1], eager_args[1], rtol=2e-2, atol=2e-2)
    assert not torch.equal(args[1], block_inputs(8)[1])


def test_decoder_block_dynamic_tokens():
    args = block_inputs(8, seed=1)
    eager_args = clone_args(args)
    with torch.no_grad():
        ref = block(*eager_args)
    out, graph = compile_run(block, args, dynamic=True)
    assert fxfuse.counters["unwrap"] == 8, fxfuse.report()
    assert fxfuse.counters["rmsnorm_quant"] == 2, fxfuse.report()
    assert_block_close(out, ref)
    torch.testing.assert_close(args[1], eager_args[1], rtol=2e-2, atol=2e-2)
    # another token count reuses the dynamic graph and stays correct
    compiled = torch.compile(block, options={"post_grad_custom_pre_pass": fxfuse.passes}, fullgraph=True)
    args = block_inputs(13, seed=2)
    eager_args = clone_args(args)
    with torch.no_grad():
        ref = block(*eager_args)
        assert_block_close(compiled(*args), ref)
    torch.testing.assert_close(args[1], eager_args[1], rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------- unknown ops, logging


def test_unknown_opaque_op_untouched(caplog):
    def fn(x, w, buf):
        h = torch.empty_like(x)
        ops.rms_norm(h, x, w, EPS)
        ops.mystery(buf, h)  # unknown: stays opaque, writes a graph input
        return h * 2

    x, w = torch.randn(4, H, dtype=torch.bfloat16), torch.randn(H, dtype=torch.bfloat16)
    buf, ref_buf = torch.zeros(4, H, dtype=torch.bfloat16), torch.zeros(4, H, dtype=torch.bfloat16)
    ref = fn(x, w, ref_buf)
    with caplog.at_level(logging.DEBUG, logger="fxfuse"):
        out, graph = compile_run(fn, [x, w, buf])
    assert fxfuse.counters["unwrap"] == 1
    assert f"{NS}.mystery" in graph and f"{NS}.rms_norm" not in graph, graph
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(buf, ref_buf)
    logs = caplog.text
    assert f"unwrapped {NS}::rms_norm.default" in logs
    assert f"left opaque op {NS}::mystery.default" in logs and "no decomposition registered" in logs
    assert any("mystery" in m.reason for g in fxfuse.report().graphs for m in g.near_misses)


def test_unwrap_off_leaves_everything():
    def fn(x, w):
        h = torch.empty_like(x)
        ops.rms_norm(h, x, w, EPS)
        return h

    x, w = torch.randn(4, H, dtype=torch.bfloat16), torch.randn(H, dtype=torch.bfloat16)
    out, graph = compile_run(fn, [x, w], passes=fxfuse.FusionPasses(unwrap=None))
    assert fxfuse.counters["unwrap"] == 0 and f"{NS}.rms_norm" in graph
    torch.testing.assert_close(out, _ref_rms(x, w, EPS))


# ----------------------------------------------------------------------------- registry API


def test_register_forms_and_digest():
    qual = f"{NS}::mystery"
    d0 = unwrap_mod.registry_digest()
    u0 = fxfuse.passes.uuid()

    def mystery_decomp(out, x):
        out.copy_(x * 3)

    for form in (qual, ops.mystery, ops.mystery.default):
        fxfuse.register_unwrap(form, mystery_decomp)
        try:
            assert unwrap_mod.lookup(ops.mystery.default) is mystery_decomp
            assert unwrap_mod.registry_digest() != d0  # the FX cache key sees registrations
            assert fxfuse.passes.uuid() != u0
        finally:
            unwrap_mod.unregister_unwrap(form)
        assert unwrap_mod.lookup(ops.mystery.default) is None
    assert unwrap_mod.registry_digest() == d0 and fxfuse.passes.uuid() == u0
    with pytest.raises(ValueError):
        fxfuse.register_unwrap("no_namespace", mystery_decomp)


_lib2 = torch.library.Library(NS + "_other", "DEF")
_lib2.define("rms_norm(Tensor input, Tensor weight, float epsilon) -> Tensor")  # same name, other schema


def test_builtin_needs_matching_schema():
    assert unwrap_builtin.register_builtins({"_C": NS + "_other", "_moe_C": NS + "_other"}) == []
    assert unwrap_mod.lookup(getattr(torch.ops, NS + "_other").rms_norm.default) is None


def test_user_registration_and_untraceable_decomposition(caplog):
    def fn(x):
        a, b = torch.empty_like(x), torch.empty_like(x)
        ops.mystery(a, x)
        ops.mystery(b, a)
        return a + b

    x = torch.randn(4, 8)
    calls = []

    def good(out, inp):
        out.copy_(inp * 3)

    def bad(out, inp):
        calls.append(1)
        if inp.shape[0] == 4 and inp.sum().item() > -1e9:  # data-dependent: cannot trace to ATen
            out.copy_(inp * 3)

    fxfuse.register_unwrap(ops.mystery, good)
    try:
        out, graph = compile_run(fn, [x])
        assert fxfuse.counters["unwrap"] == 2 and "mystery" not in graph
        torch.testing.assert_close(out, x * 3 + x * 9)
        fxfuse.register_unwrap(ops.mystery, bad)
        with caplog.at_level(logging.DEBUG, logger="fxfuse"):
            out, graph = compile_run(fn, [x])
        assert calls and fxfuse.counters["unwrap"] == 0 and "mystery" in graph
        torch.testing.assert_close(out, x * 3 + x * 9)
        assert "decomposition did not trace" in caplog.text
    finally:
        unwrap_mod.unregister_unwrap(ops.mystery)


@pytest.mark.parametrize("v2", [True, False], ids=["auto_functionalized_v2", "auto_functionalized_v1"])
def test_view_arguments(v2):
    """Mutable args that are views: a slice of a graph input, and vLLM-style RoPE on q/k slices
    of one qkv buffer (two mutable args sharing a base)."""

    def fn(x, buf, qkv_in, positions, cache):
        ops.silu_and_mul(buf[:, :8], x)  # writes a slice of a graph input
        qkv = qkv_in * 2
        q, k = qkv[:, :HEAD], qkv[:, HEAD : 2 * HEAD]
        ops.rotary_embedding(positions, q, k, HEAD, cache, False)  # GPT-J style, partial rotary
        return buf * 1, qkv

    x, buf = torch.randn(4, 16), torch.zeros(4, 16)
    args = [x, buf, torch.randn(4, 3 * HEAD), torch.randint(0, 64, (4,)), torch.randn(64, ROT)]
    eager_args = clone_args(args)
    ref = fn(*eager_args)
    with torch._inductor.config.patch(enable_auto_functionalized_v2=v2):
        out, graph = compile_run(fn, args)
    assert fxfuse.counters["unwrap"] == 2, fxfuse.report()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(args[1], eager_args[1])


# ----------------------------------------------------------------------------- "auto" mode


@torch.library.custom_op(f"{NS}::py_rms", mutates_args=())
def py_rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return _ref_rms(x, w, eps)


@py_rms.register_fake
def _(x, w, eps):
    return torch.empty_like(x)


@torch.library.custom_op(f"{NS}::py_token_quant", mutates_args=("out", "scale"))
def py_token_quant(out: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> None:
    s = (x.abs().amax(-1, keepdim=True).float() / FMAX).clamp_min(1.0 / (FMAX * 512))
    scale.copy_(s)
    out.copy_((x.float() / s).clamp(-FMAX, FMAX).to(out.dtype))


@py_token_quant.register_fake
def _(out, scale, x):
    return None


@torch.library.custom_op(f"{NS}::py_numpy", mutates_args=())
def py_numpy(x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(x.numpy() * 2)  # not traceable to ATen


@py_numpy.register_fake
def _(x):
    return torch.empty_like(x)


def py_block(x, w):
    y = py_rms(x, w, EPS)
    q = torch.empty(x.shape, dtype=FP8)
    s = torch.empty(x.shape[0], 1)
    py_token_quant(q, s, y)
    return q, s, py_numpy(x.float())


@pytest.mark.parametrize("mode", ["auto", "registered"])
def test_auto_mode(mode, caplog):
    x, w = torch.randn(6, H, dtype=torch.bfloat16), (1 + 0.1 * torch.randn(H)).to(torch.bfloat16)
    ref = py_block(x, w)
    with caplog.at_level(logging.DEBUG, logger="fxfuse"):
        out, graph = compile_run(py_block, [x, w], passes=fxfuse.FusionPasses(unwrap=mode))
    assert f"{NS}.py_numpy" in graph  # cannot be traced: left as it was
    if mode == "auto":
        assert fxfuse.counters["unwrap"] == 2, fxfuse.report()
        assert fxfuse.counters["rmsnorm_quant"] == 1, fxfuse.report()  # unwrapped Python ops fuse too
        assert "py_rms" not in graph and "py_token_quant" not in graph
        assert f"left opaque op {NS}::py_numpy.default" in caplog.text and "did not trace" in caplog.text
    else:
        assert fxfuse.counters["unwrap"] == 0 and "py_rms" in graph
    torch.testing.assert_close(out[0].float(), ref[0].float(), rtol=0.07, atol=1e-2)
    torch.testing.assert_close(out[1], ref[1])
    torch.testing.assert_close(out[2], ref[2])


def test_per_token_quant_with_scale_ub():
    def fn(x, ub):
        q = torch.empty(x.shape, dtype=FP8)
        s = torch.empty(x.shape[0], 1)
        ops.dynamic_per_token_scaled_fp8_quant(q, x, s, ub)
        return q, s

    x = torch.randn(6, H, dtype=torch.bfloat16) * 4
    ub = torch.tensor([2.0])  # below most row maxima: clamps the row max before / 448
    ref = fn(x, ub)
    out, graph = compile_run(fn, [x, ub])
    assert fxfuse.counters["unwrap"] == 1 and NS not in graph
    torch.testing.assert_close(out[1], ref[1])
    torch.testing.assert_close(out[0].float(), ref[0].float())


def test_silu_and_mul_then_per_token_quant_fuses():
    """vLLM's _C::silu_and_mul + _C::dynamic_per_token_scaled_fp8_quant, both unwrapped, fuse
    into one silu_mul_quant kernel (the MLP's down_proj input)."""

    def fn(gu):
        M = gu.shape[0]
        act = torch.empty(M, gu.shape[1] // 2, dtype=gu.dtype)
        ops.silu_and_mul(act, gu)
        q = torch.empty(act.shape, dtype=FP8)
        s = torch.empty(M, 1)
        ops.dynamic_per_token_scaled_fp8_quant(q, act, s, None)
        return q, s

    gu = torch.randn(7, 2 * INTER, dtype=torch.bfloat16) * 2
    ref = fn(gu)
    out, graph = compile_run(fn, [gu])
    assert fxfuse.counters["unwrap"] == 2 and fxfuse.counters["silu_mul_quant"] == 1, fxfuse.report()
    assert NS not in graph
    torch.testing.assert_close(out[1], ref[1], rtol=1e-6, atol=0)
    assert (out[0].float() != ref[0].float()).float().mean() < 0.01
