"""RoPE (+ fp8 quant) fusion on CPU: HF rotate_half forms, partial rotary, cos/sin tables, token-major
layouts and dynamic token dims fuse q and k into ONE op and match eager; near misses stay untouched.
The Triton kernel itself is checked under TRITON_INTERPRET=1 in a subprocess (bit-exact vs the reference)."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.fx as fx
from torch._inductor.utils import fresh_cache

import fxfuse
from forms import assert_identical, dequant_close, stock_compile
from kernel_checks import assert_full_signatures

REPO = Path(__file__).resolve().parents[1]
FP8 = torch.float8_e4m3fn
BF16 = torch.bfloat16
LEFTOVER = {torch.ops.aten.cat.default, torch.ops.aten.neg.default}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' apply_rotary_pos_emb."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def q_static(x, scale):
    return ((x.float() / scale).clamp(-448.0, 448.0).to(FP8),)


def q_dynamic(x, scale):
    s = (x.float().abs().amax(-1, keepdim=True) / 448.0).clamp_min(1e-6)
    return (x.float() / s).clamp(-448.0, 448.0).to(FP8), s


def q_none(x, scale):
    return (x,)


QUANTS = {"none": q_none, "static": q_static, "dynamic": q_dynamic}


def make_hf(qq: str, kq: str):
    def model(q, k, cos, sin, scale):
        qe, ke = apply_rope(q, k, cos, sin)
        return (*QUANTS[qq](qe, scale), *QUANTS[kq](ke, scale))

    return model


def hf_inputs(B=2, S=5, HQ=4, HK=2, D=32, dtype=BF16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, HQ, D, generator=g).to(dtype).transpose(1, 2)  # HF: [B, H, S, D] view
    k = torch.randn(B, S, HK, D, generator=g).to(dtype).transpose(1, 2)
    ang = torch.rand(B, S, D // 2, generator=g) * 6.0
    emb = torch.cat((ang, ang), dim=-1)
    return q, k, emb.cos().to(dtype), emb.sin().to(dtype), torch.tensor(0.02)


def compile_and_run(fn, args, *, dynamic_dims=None, passes=None):
    leftovers: list[str] = []

    def after(g: fx.Graph) -> None:
        leftovers.extend(n.name for n in g.nodes if n.op == "call_function" and n.target in LEFTOVER)

    p = passes or fxfuse.FusionPasses(after=after)
    torch._dynamo.reset()
    fxfuse.counters.clear()
    for a, d in (dynamic_dims or {}).items():
        torch._dynamo.mark_dynamic(args[a], d)
    with fresh_cache(), torch.no_grad():
        out = torch.compile(fn, options={"post_grad_custom_pre_pass": p}, fullgraph=True)(*args)
    return out, leftovers


def check_close(out, ref):
    out, ref = tuple(out), tuple(ref)
    problems = dequant_close(out, ref)
    assert not problems, problems
    for o, r in zip(out, ref):  # layouts as eager
        assert o.stride() == r.stride() or o.numel() <= 1, (o.stride(), r.stride())


@pytest.mark.parametrize("qq,kq", [("none", "none"), ("static", "dynamic"), ("dynamic", "static"), ("static", "none")])
def test_hf_forms_fuse_q_and_k_in_one_op(qq, kq):
    fn = make_hf(qq, kq)
    args = hf_inputs(seed=1)
    with torch.no_grad():
        ref = fn(*args)
    out, leftovers = compile_and_run(fn, args)
    assert fxfuse.counters["rope_quant"] == 1, fxfuse.report()
    assert not leftovers, leftovers
    check_close(out, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_dtypes(dtype):
    fn = make_hf("dynamic", "none")
    args = hf_inputs(dtype=dtype, seed=2)
    with torch.no_grad():
        ref = fn(*args)
    out, _ = compile_and_run(fn, args)
    assert fxfuse.counters["rope_quant"] == 1, fxfuse.report()
    check_close(out, ref)


def _bench_dynamic_capture():
    """The benchmark's HF dynamic-fp8 form (Llama-3 8B heads, 4 tokens) compiled on CPU, and eager's outputs."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_rope_quant as bench

    from fxfuse.testing import capture_graphs

    fargs = bench.make_inputs("llama3_8b", 4, "cpu", "rope_fp8_dynamic")
    with torch.no_grad():
        ref = bench.form_rope_fp8_dynamic(*fargs)
        cap = capture_graphs(bench.form_rope_fp8_dynamic, *fargs)
    assert cap.counters["rope_quant"] == 1, cap.report
    return cap, ref


def test_dynamic_scales_written_in_the_layout_eager_gives():
    """Eager's amax(-1, keepdim=True) on the HF [B, H, S, D] view is a contiguous [B, H, S, 1]: the op
    writes each scale in that layout (q/k_scale_order), so no empty_strided + copy follows it."""
    cap, ref = _bench_dynamic_capture()
    text = cap.after_text
    assert "copy" not in text and "empty_strided" not in text, text
    assert "[0, 2, 1], [0, 2, 1])" in text, text  # both scale orders: H outermost, then S
    check_close(cap.outputs, ref)


def test_dynamic_scale_restride_fallback(monkeypatch):
    """A scale layout no order expresses keeps today's restride copy. A keepdim amax (and its
    elementwise scale chain) is always dense over x's dims, so every real layout has an order:
    the fallback is forced here by withholding the order."""
    from fxfuse.patterns import rope_quant as pat

    monkeypatch.setattr(pat, "_scale_order_of", lambda mm: None)
    cap, ref = _bench_dynamic_capture()
    text = cap.after_text
    assert text.count("= aten.empty_strided(") == 2 and text.count("= aten.copy(") == 2, text
    check_close(cap.outputs, ref)


def test_dynamic_token_dim():
    fn = make_hf("static", "dynamic")
    compiled = None
    for i, S in enumerate((5, 9, 17)):
        args = hf_inputs(S=S, seed=3 + S)
        with torch.no_grad():
            ref = fn(*args)
        if compiled is None:
            out, _ = compile_and_run(fn, args, dynamic_dims={0: 2, 1: 2, 2: 1, 3: 1})
            assert fxfuse.counters["rope_quant"] == 1, fxfuse.report()
            compiled = torch.compile(fn, options={"post_grad_custom_pre_pass": fxfuse.passes}, fullgraph=True)
        else:
            for a, d in {0: 2, 1: 2, 2: 1, 3: 1}.items():
                torch._dynamo.mark_dynamic(args[a], d)
            with torch.no_grad():
                out = compiled(*args)
        check_close(out, ref)


def partial_model(q, k, cos, sin, scale):
    """Partial rotary (GPT-NeoX / Qwen3.5 style): rotate the first rot dims, pass the rest through."""
    rot = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    qr, qp = q[..., :rot], q[..., rot:]
    kr, kp = k[..., :rot], k[..., rot:]
    qe = torch.cat((qr * cos + rotate_half(qr) * sin, qp), dim=-1)
    ke = torch.cat((kr * cos + rotate_half(kr) * sin, kp), dim=-1)
    return (*q_static(qe, scale), ke)


def test_partial_rotary():
    q, k, cos, sin, scale = hf_inputs(D=32, seed=4)
    args = (q, k, cos[..., :16].contiguous(), sin[..., :16].contiguous(), scale)
    with torch.no_grad():
        ref = partial_model(*args)
    out, leftovers = compile_and_run(partial_model, args)
    assert fxfuse.counters["rope_quant"] == 1, fxfuse.report()
    assert "rot=16" in fxfuse.report().fusions[0].detail
    assert not leftovers
    check_close(out, ref)


def table_model(q, k, cos_cached, sin_cached, pos, scale):
    """Token-major [T, H, D] with cos/sin gathered from tables by positions (vLLM-like)."""
    cos = cos_cached[pos].unsqueeze(-2)
    sin = sin_cached.index_select(0, pos).unsqueeze(-2)
    qe = q * cos + rotate_half(q) * sin
    ke = k * cos + rotate_half(k) * sin
    return (*q_dynamic(qe, scale), ke)


def table_inputs(T=7, HQ=4, HK=2, D=32, seed=5):
    g = torch.Generator().manual_seed(seed)
    ang = torch.rand(64, D // 2, generator=g) * 6.0
    emb = torch.cat((ang, ang), -1)
    q = torch.randn(T, HQ, D, generator=g).to(BF16)
    k = torch.randn(T, HK, D, generator=g).to(BF16)
    pos = torch.randint(0, 64, (T,), generator=g)
    return q, k, emb.cos().to(BF16), emb.sin().to(BF16), pos, torch.tensor(0.02)


def test_table_lookup_by_positions_dynamic():
    args = table_inputs()
    with torch.no_grad():
        ref = table_model(*args)
    out, _ = compile_and_run(table_model, args, dynamic_dims={0: 0, 1: 0, 4: 0})
    assert fxfuse.counters["rope_quant"] == 1, fxfuse.report()
    assert "+table" in fxfuse.report().fusions[0].detail
    check_close(out, ref)


def vllm_model(neox: bool):
    """The form vLLM's _C::rotary_embedding unwraps to: cos/sin halves split from a gathered cache,
    x1*cos - x2*sin / x2*cos + x1*sin, on [T, H*D] projections; static fp8 of q's [T, H*D]."""
    from fxfuse.patterns.unwrap_builtin import _rope

    def model(pos, q, k, cache, scale):
        cos, sin = cache.index_select(0, pos).chunk(2, dim=-1)
        qe = _rope(q, cos, sin, pos.shape[0], 32, neox)
        ke = _rope(k, cos, sin, pos.shape[0], 32, neox)
        return (*q_static(qe, scale), ke)

    return model


@pytest.mark.parametrize("neox,rot", [(True, 16), (False, 32)])
def test_vllm_explicit_halves_form(neox, rot):
    g = torch.Generator().manual_seed(10)
    T = 6
    args = (torch.randint(0, 64, (T,), generator=g), torch.randn(T, 4 * 32, generator=g).to(BF16),
            torch.randn(T, 2 * 32, generator=g).to(BF16), torch.randn(64, rot, generator=g).to(BF16), torch.tensor(0.02))
    fn = vllm_model(neox)
    with torch.no_grad():
        ref = fn(*args)
    out, leftovers = compile_and_run(fn, args, dynamic_dims={0: 0, 1: 0, 2: 0})
    assert fxfuse.counters["rope_quant"] == 1, fxfuse.report()
    d = fxfuse.report().fusions[0].detail
    assert "fp8 static" in d and "+table" in d and "k[2x32]" in d, d
    check_close(out, ref)


def gptj_model(q, k, cos, sin, scale):
    """HF GPT-J rotate_every_two with repeat-interleaved cos/sin."""
    def rot(x):
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)

    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return (*q_dynamic(q * cos + rot(q) * sin, scale), k * cos + rot(k) * sin)


def test_gptj_interleaved_form():
    g = torch.Generator().manual_seed(11)
    T = 5
    ang = torch.rand(T, 16, generator=g) * 5
    args = (torch.randn(T, 4, 32, generator=g).to(BF16), torch.randn(T, 2, 32, generator=g).to(BF16),
            ang.cos().repeat_interleave(2, -1).to(BF16), ang.sin().repeat_interleave(2, -1).to(BF16), torch.tensor(0.02))
    with torch.no_grad():
        ref = gptj_model(*args)
    out, _ = compile_and_run(gptj_model, args)
    assert fxfuse.counters["rope_quant"] == 1, fxfuse.report()
    assert "per-token-head" in fxfuse.report().fusions[0].detail
    check_close(out, ref)


def complex_model(q, k, freqs_cis):
    """Meta Llama / gpt-fast apply_rotary_emb: adjacent pairs as complex numbers times freqs_cis."""
    def rot(x):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        f = freqs_cis.view(1, x.shape[1], 1, x.shape[-1] // 2)
        return torch.view_as_real(xc * f).flatten(3).type_as(x)

    return rot(q), rot(k)


def complex_halves_model(q, k, freqs_cis):
    """Near miss: the complex numbers pair x[j] with x[j + D/2] (a different rotation than the
    GPT-J pairs the kernel does through view_as_complex); stays with Inductor."""
    def rot(x):
        h = x.float().reshape(*x.shape[:-1], 2, -1).transpose(-1, -2).contiguous()
        f = freqs_cis.view(1, x.shape[1], 1, x.shape[-1] // 2)
        return torch.view_as_real(torch.view_as_complex(h) * f).flatten(3).type_as(x)

    return rot(q), rot(k)


def complex_inputs(B=2, S=5, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, 4, D, generator=g).to(BF16)
    k = torch.randn(B, S, 2, D, generator=g).to(BF16)
    return q, k, torch.polar(torch.ones(S, D // 2), torch.rand(S, D // 2, generator=g) * 6.0)


def test_complex_form_fuses_like_the_interleaved_one():
    """view_as_complex(x.float().reshape(..., -1, 2)) * freqs_cis -> view_as_real -> flatten -> type_as:
    q and k in one op (fp32 math like the complex product, one cast to bf16 at the store); dynamic S."""
    compiled = None
    for S in (5, 9):
        args = complex_inputs(S=S, seed=S)
        with torch.no_grad():
            ref = complex_model(*args)
        if compiled is None:
            left: list[str] = []

            def after(g: fx.Graph) -> None:
                left.extend(str(n.target) for n in g.nodes if n.op == "call_function" and (
                    "view_as_complex" in str(n.target) or (n.target is torch.ops.prims.convert_element_type.default
                                                   and n.args[1] == BF16)))

            out, _ = compile_and_run(complex_model, args, dynamic_dims={0: 1, 1: 1, 2: 0},
                                     passes=fxfuse.FusionPasses(after=after))
            r = fxfuse.report()
            assert fxfuse.counters["rope_quant"] == 1 and not r.near_misses, r.format(verbose=True)
            assert not left, left  # the complex ops and the final cast back to bf16 are in the kernel
            compiled = torch.compile(complex_model, options={"post_grad_custom_pre_pass": fxfuse.passes}, fullgraph=True)
        else:
            for a, d in {0: 1, 1: 1, 2: 0}.items():
                torch._dynamo.mark_dynamic(args[a], d)
            with torch.no_grad():
                out = compiled(*args)
        check_close(out, ref)


def test_complex_form_near_miss_other_pairing():
    args = complex_inputs(seed=3)
    with torch.no_grad():
        ref = complex_halves_model(*args)
    out, _ = compile_and_run(complex_halves_model, args)
    r = fxfuse.report()
    assert fxfuse.counters["rope_quant"] == 0, r
    assert any("view_as_complex does not read a reshape" in m.reason for m in r.near_misses), r.near_misses
    check_close(out, ref)


@pytest.mark.parametrize("qq", ["none", "dynamic"])
def test_gpt_oss_chunk_form_fuses(qq):
    """transformers' GPT-OSS `_apply_rotary_emb`: `torch.chunk(x, 2, dim=-1)` (aten.split + getitem
    after tracing), then the explicit halves with cos/sin of half the head dim: q and k in one op,
    with the fp8 quant that follows; bf16 rounding after every op as in eager."""
    go = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    q, k, cos, sin, scale = hf_inputs(seed=23)
    h = cos.shape[-1] // 2

    def fn(q, k, cos, sin, scale):
        qe, ke = go.apply_rotary_pos_emb(q, k, cos, sin)
        return (*QUANTS[qq](qe, scale), ke)

    args = (q, k, cos[..., :h].contiguous(), sin[..., :h].contiguous(), scale)
    with torch.no_grad():
        ref = fn(*args)
    out, left = compile_and_run(fn, args, dynamic_dims={0: 2, 1: 2, 2: 1, 3: 1})
    r = fxfuse.report()
    assert fxfuse.counters["rope_quant"] == 1 and not r.near_misses, r.format(verbose=True)
    assert not left, left
    check_close(out, ref)


def test_split_into_unequal_parts_is_not_two_halves():
    """torch.split(x, [12, 20]) read as if it were halves would rotate the wrong pairs: a near miss,
    the same as stock."""
    q, k, cos, sin, _ = hf_inputs(seed=24)

    def rot(x, c, s):
        a, b = torch.split(x, [12, 20], dim=-1)
        return torch.cat((a * c[..., :12] - b[..., :12] * s[..., :12],
                          b[..., :12] * c[..., :12] + a * s[..., :12], b[..., 12:]), dim=-1)

    fn = lambda q, k, c, s: (rot(q, c.unsqueeze(1), s.unsqueeze(1)), rot(k, c.unsqueeze(1), s.unsqueeze(1)))  # noqa: E731
    args = (q, k, cos, sin)
    out, _ = compile_and_run(fn, args)
    assert fxfuse.counters["rope_quant"] == 0, fxfuse.report().format(verbose=True)
    assert_identical(tuple(out), stock_compile(fn, args))


def test_deepseek_interleave_form_is_a_named_near_miss():
    """transformers' DeepSeek-V3 `apply_rotary_pos_emb_interleave`: even/odd lanes in, two halves out
    (a gpt-j rotation stored de-interleaved). Not a form the kernel does: untouched, and the report
    names the form rather than a generic miss."""
    ds = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    if not hasattr(ds, "apply_rotary_pos_emb_interleave"):
        pytest.skip("this transformers has no apply_rotary_pos_emb_interleave")
    q, k, cos, sin, _ = hf_inputs(seed=21)
    args = (q, k, cos, sin)
    fn = lambda q, k, c, s: ds.apply_rotary_pos_emb_interleave(q, k, c, s)  # noqa: E731
    out, _ = compile_and_run(fn, args)
    r = fxfuse.report()
    assert fxfuse.counters["rope_quant"] == 0, r.format(verbose=True)
    assert any("even/odd elements" in m.reason and "DeepSeek" in m.reason for m in r.near_misses), r.near_misses
    assert_identical(tuple(out), stock_compile(fn, args))  # untouched: what stock Inductor gives


def qk_norm_model(qp, kp, cos, sin, wq, wk, scale):
    """Qwen3: per-head RMSNorm (q_norm/k_norm) on [B, S, H, D], transpose, RoPE, then fp8 of q."""
    def rms(x, w, eps):
        v = x.float()
        v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)
        return w * v.to(x.dtype)

    q = rms(qp, wq, 1e-6).transpose(1, 2)
    k = rms(kp, wk, 1e-5).transpose(1, 2)
    qe, ke = apply_rope(q, k, cos, sin)
    return (*q_dynamic(qe, scale), ke)


def test_qk_norm_fuses_into_the_rope_kernel():
    g = torch.Generator().manual_seed(12)
    B, S, D = 2, 5, 32
    _, _, cos, sin, scale = hf_inputs(B=B, S=S, D=D, seed=12)
    args = (torch.randn(B, S, 4, D, generator=g).to(BF16), torch.randn(B, S, 2, D, generator=g).to(BF16), cos, sin,
            (1 + 0.2 * torch.randn(D, generator=g)).to(BF16), (1 + 0.2 * torch.randn(D, generator=g)).to(BF16), scale)
    with torch.no_grad():
        ref = qk_norm_model(*args)
    out, _ = compile_and_run(qk_norm_model, args, dynamic_dims={0: 1, 1: 1, 2: 1, 3: 1})
    assert fxfuse.counters["rope_quant"] == 1 and fxfuse.counters["rmsnorm_quant"] == 0, fxfuse.report()
    assert "+qk_norm" in fxfuse.report().fusions[0].detail
    # 1/sqrt vs rsqrt may flip a rare bf16 ulp: compare loosely, but the fp8 codes via dequant_close
    assert not dequant_close(tuple(out[:1]), tuple(ref[:1]))
    for o, r in zip(out[1:], ref[1:]):
        assert ((o.double() - r.double()).norm() / r.double().norm()).item() < 2e-3


def kv_write_model(q, k, v, cos_cached, sin_cached, pos, slots, k_cache, v_cache):
    """RoPE then a KV-cache write by slot (indexed assignment into graph-input caches, flat and paged)."""
    cos, sin = cos_cached[pos].unsqueeze(-2), sin_cached[pos].unsqueeze(-2)
    qe = q * cos + rotate_half(q) * sin
    ke = k * cos + rotate_half(k) * sin
    k_cache[slots] = ke  # flat [num_slots, H, D]
    v_cache.view(-1, *v.shape[1:])[slots] = v  # paged [blocks, block_size, H, D]
    return qe


def kv_ops_model(q, k, v, cos_cached, sin_cached, pos, slots, k_cache, v_cache):
    """The same through index_put_ (paged k cache) and index_copy_ (flat v cache)."""
    cos, sin = cos_cached.index_select(0, pos).unsqueeze(-2), sin_cached.index_select(0, pos).unsqueeze(-2)
    qe = q * cos + rotate_half(q) * sin
    ke = k * cos + rotate_half(k) * sin
    k_cache.view(-1, *k.shape[1:]).index_put_((slots,), ke)
    v_cache.index_copy_(0, slots, v)
    return qe


def kv_k_first_model(q, k, v, cos_cached, sin_cached, pos, slots, k_cache, v_cache):
    """MHA (as many k heads as q heads) with k rotated and written first: k still takes the cache slot."""
    cos, sin = cos_cached[pos].unsqueeze(-2), sin_cached[pos].unsqueeze(-2)
    ke = k * cos + rotate_half(k) * sin
    k_cache[slots] = ke
    v_cache.view(-1, *v.shape[1:])[slots] = v
    return q * cos + rotate_half(q) * sin


def kv_fp8_model(q, k, v, cos_cached, sin_cached, pos, slots, k_cache, v_cache, ks, vs):
    """fp8 e4m3 caches (static per-tensor k/v scales); q stays bf16, k is also returned in fp8."""
    cos, sin = cos_cached[pos].unsqueeze(-2), sin_cached[pos].unsqueeze(-2)
    qe = q * cos + rotate_half(q) * sin
    ke = k * cos + rotate_half(k) * sin
    k_cache[slots] = q_static(ke, ks)[0]
    v_cache.view(-1, *v.shape[1:])[slots] = q_static(v, vs)[0]
    return qe


def kv_inputs(T=7, seed=13, slots=None, fp8=False, paged_k=False, HQ=4, HK=2, D=32):
    q, k, c, s, pos, _ = table_inputs(T=T, HQ=HQ, HK=HK, D=D, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    v = torch.randn(k.shape, generator=g).to(BF16)
    if slots is None:
        slots = torch.randperm(32, generator=g)[:T]
    dt = FP8 if fp8 else BF16
    kshape = (4, 8, HK, D) if paged_k else (32, HK, D)
    vshape = (32, HK, D) if paged_k else (4, 8, HK, D)
    # random old contents: rows the write does not touch must stay exactly as they were
    kc, vc = (torch.randn(sh, generator=g).mul(50).to(dt) for sh in (kshape, vshape))
    return q, k, v, c, s, pos, slots, kc, vc


def _bits(t):
    return t.view(torch.uint8) if t.dtype == FP8 else t


def run_kv(fn, args, extra=(), dynamic_dims=None):
    """Compile fn on args (caches mutated in place) next to eager on clones; return the fused detail."""
    eager = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    with torch.no_grad():
        ref = fn(*eager, *extra)
    out, leftovers = compile_and_run(fn, (*args, *extra), dynamic_dims=dynamic_dims)
    check_close((out,), (ref,))
    for got, want in zip(args[7:9], eager[7:9]):
        assert torch.equal(_bits(got), _bits(want))
    return fxfuse.report()


@pytest.mark.parametrize("form", ["setitem", "index_put_copy", "mha"])
def test_kv_cache_write_fuses(form):
    """k (after RoPE) and v go to the caches from the fused op; the caches equal eager's."""
    fn = {"setitem": kv_write_model, "index_put_copy": kv_ops_model, "mha": kv_k_first_model}[form]
    args = kv_inputs(seed=13, paged_k=form == "index_put_copy", HQ=2 if form == "mha" else 4)
    r = run_kv(fn, args)
    assert fxfuse.counters["rope_quant"] == 1, r
    assert "+kv_cache" in r.fusions[0].detail and not r.near_misses, r.format(verbose=True)
    assert not any("index_put" in n for f in r.fusions for n in f.replaced if n.startswith("copy"))


def test_kv_cache_write_dynamic_tokens_and_negative_slots():
    """Dynamic token dim; a negative slot wraps around like the ATen index_put the graph holds."""
    fn = kv_write_model
    compiled = None
    for T in (7, 12):
        slots = torch.randperm(32, generator=torch.Generator().manual_seed(T))[:T]
        slots[1] = -1  # index_put semantics: the last row
        args = kv_inputs(T=T, seed=T, slots=slots)
        dyn = {0: 0, 1: 0, 2: 0, 5: 0, 6: 0}
        if compiled is None:
            r = run_kv(fn, args, dynamic_dims=dyn)
            assert fxfuse.counters["rope_quant"] == 1 and "+kv_cache" in r.fusions[0].detail, r
            compiled = torch.compile(fn, options={"post_grad_custom_pre_pass": fxfuse.passes}, fullgraph=True)
        else:
            eager = [a.clone() for a in args]
            ref = fn(*eager)
            for a, d in dyn.items():
                torch._dynamo.mark_dynamic(args[a], d)
            with torch.no_grad():
                out = compiled(*args)
            check_close((out,), (ref,))
            assert torch.equal(args[7], eager[7]) and torch.equal(args[8], eager[8])


def test_kv_cache_write_fp8():
    """fp8 caches: k's static fp8 quant and v's go to the caches (k fp8 not needed elsewhere)."""
    args = kv_inputs(seed=21, fp8=True)
    r = run_kv(kv_fp8_model, args, extra=(torch.tensor(0.02), torch.tensor(0.03)))
    assert fxfuse.counters["rope_quant"] == 1, r
    assert "k[2x32] fp8 static" in r.fusions[0].detail and "+kv_cache fp8" in r.fusions[0].detail, r.fusions[0].detail


def _kv_read_after(q, k, v, cc, sc, pos, slots, kc, vc):
    qe = kv_write_model(q, k, v, cc, sc, pos, slots, kc, vc)
    return qe, kc.sum()  # the updated cache is read in the graph: the write stays with Inductor


def _kv_accumulate(q, k, v, cc, sc, pos, slots, kc, vc):
    cos, sin = cc[pos].unsqueeze(-2), sc[pos].unsqueeze(-2)
    qe = q * cos + rotate_half(q) * sin
    ke = k * cos + rotate_half(k) * sin
    kc.index_put_((slots,), ke, accumulate=True)
    vc.view(-1, *v.shape[1:])[slots] = v
    return qe


def _kv_fp8_v_scale_chain(q, k, v, cc, sc, pos, slots, kc, vc, ks, vs):
    """v's fp8 scale is vs * 0.5: the cache kernel divides by the scale tensor as is, so no fusion
    (it once dropped the * 0.5 and wrote v / vs into the cache)."""
    cos, sin = cc[pos].unsqueeze(-2), sc[pos].unsqueeze(-2)
    qe = q * cos + rotate_half(q) * sin
    ke = k * cos + rotate_half(k) * sin
    kc[slots] = q_static(ke, ks)[0]
    vc.view(-1, *v.shape[1:])[slots] = (v.float() / (vs * 0.5)).clamp(-448.0, 448.0).to(FP8)
    return qe


def _kv_complex(q, k, v, freqs, pos, slots, kc, vc):
    """Meta Llama's complex rotation by positions-indexed freqs_cis, then the cache write."""
    def rot(x, fr):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], x.shape[-1] // 2, 2))
        return torch.view_as_real(xc * fr).flatten(-2).type_as(x)

    fr = freqs[pos].unsqueeze(1)
    qe, ke = rot(q, fr), rot(k, fr)
    kc[slots] = ke
    vc[slots] = v
    return qe


@pytest.mark.parametrize("T", [0, 1, 7])
def test_kv_cache_write_complex_form_and_edge_token_counts(T):
    """Complex form + cache write fuses and equals eager bit for bit, for no token, one and several."""
    g = torch.Generator().manual_seed(40 + T)
    q, k, v = (torch.randn(T, h, 32, generator=g).to(BF16) for h in (4, 2, 2))
    freqs = torch.polar(torch.ones(64, 16), torch.rand(64, 16, generator=g) * 6.0)
    pos, slots = torch.randint(0, 64, (T,), generator=g), torch.randperm(32, generator=g)[:T]
    kc, vc = (torch.randn(32, 2, 32, generator=g).to(BF16) for _ in range(2))
    args = [q, k, v, freqs, pos, slots, kc, vc]
    eager = [a.clone() for a in args]
    with torch.no_grad():
        ref = _kv_complex(*eager)
    out, _ = compile_and_run(_kv_complex, args)
    r = fxfuse.report()
    assert fxfuse.counters["rope_quant"] == 1 and "+kv_cache" in r.fusions[0].detail, r.format(verbose=True)
    assert torch.equal(out, ref) and torch.equal(kc, eager[6]) and torch.equal(vc, eager[7])


def test_kv_cache_fp8_v_scale_chain_near_miss():
    args = kv_inputs(seed=21, fp8=True)
    r = run_kv(_kv_fp8_v_scale_chain, args, extra=(torch.tensor(0.02), torch.tensor(0.03)))
    assert fxfuse.counters["rope_quant"] == 1 and "+kv_cache" not in r.fusions[0].detail, r
    assert any("v fp8 scale is computed" in m.reason for m in r.near_misses), [m.reason for m in r.near_misses]


def _kv_other_slots(q, k, v, cc, sc, pos, slots, kc, vc):
    cos, sin = cc[pos].unsqueeze(-2), sc[pos].unsqueeze(-2)
    qe = q * cos + rotate_half(q) * sin
    ke = k * cos + rotate_half(k) * sin
    kc[slots] = ke
    vc.view(-1, *v.shape[1:])[slots.flip(0)] = v
    return qe


def _kv_rope(q, k, cc, sc, pos):
    cos, sin = cc[pos].unsqueeze(-2), sc[pos].unsqueeze(-2)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _kv_attend_after(q, k, v, cc, sc, pos, slots, kc, vc):
    """Write k/v, then attend over the written cache rows (the common decode pattern)."""
    qe, ke = _kv_rope(q, k, cc, sc, pos)
    kc[slots] = ke
    vc.view(-1, *v.shape[1:])[slots] = v
    kk, vv = kc[slots], vc.view(-1, *v.shape[1:])[slots]
    return qe, torch.einsum("thd,tgd->thg", qe[:, :2].float(), kk.float()), vv.float().sum()


def _kv_read_before(q, k, v, cc, sc, pos, slots, kc, vc):
    old = kc[slots].float().sum()  # the old contents: the write must stay after this read
    qe, ke = _kv_rope(q, k, cc, sc, pos)
    kc[slots] = ke
    vc.view(-1, *v.shape[1:])[slots] = v
    return qe, old


def _kv_old_read_after(q, k, v, cc, sc, pos, slots, kc, vc):
    """The old k cache contents (a clone taken before the write) are read after the write."""
    old = kc.clone()
    qe, ke = _kv_rope(q, k, cc, sc, pos)
    kc[slots] = ke
    vc.view(-1, *v.shape[1:])[slots] = v
    return qe, (kc.float() - old.float()).abs().sum()


def _kv_q_from_new_cache(q, k, v, cc, sc, pos, slots, kc, vc):
    """q's RoPE input is computed from the written v cache: the op would read its own output."""
    cos, sin = cc[pos].unsqueeze(-2), sc[pos].unsqueeze(-2)
    ke = k * cos + rotate_half(k) * sin
    kc[slots] = ke
    vc.view(-1, *v.shape[1:])[slots] = v
    q2 = q + vc.view(-1, *v.shape[1:])[:1].sum()
    return q2 * cos + rotate_half(q2) * sin


def _kv_written_twice(q, k, v, cc, sc, pos, slots, kc, vc):
    """The k cache is written twice; the rotated k goes in last, over the first write."""
    qe, ke = _kv_rope(q, k, cc, sc, pos)
    kc[slots.flip(0)] = k
    kc[slots] = ke
    vc.view(-1, *v.shape[1:])[slots] = v
    return qe


def _kv_v_from_rotated_k(q, k, v, cc, sc, pos, slots, kc, vc):
    qe, ke = _kv_rope(q, k, cc, sc, pos)
    kc[slots] = ke
    vc.view(-1, *v.shape[1:])[slots] = ke * 2
    return qe


@pytest.mark.parametrize("fn,reason", [
    (_kv_accumulate, "accumulates"), (_kv_other_slots, "v cache writes"),
    (_kv_read_before, "read elsewhere"), (_kv_old_read_after, "reads the old contents"),
    (_kv_q_from_new_cache, "reads the new contents of cache"),
    (_kv_written_twice, "not a view of the cache input"), (_kv_v_from_rotated_k, "depends on the fused region"),
])
def test_kv_cache_near_misses(fn, reason):
    """Cache writes that must not fuse: the RoPE still fuses, the write stays, the caches equal eager's."""
    args = kv_inputs(seed=17)
    eager = [a.clone() for a in args]
    with torch.no_grad():
        ref = fn(*eager)
    out, _ = compile_and_run(fn, args)
    r = fxfuse.report()
    assert fxfuse.counters["rope_quant"] == 1 and "+kv_cache" not in r.fusions[0].detail, r
    assert any(reason in m.reason for m in r.near_misses), [m.reason for m in r.near_misses]
    out = out if isinstance(out, tuple) else (out,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    check_close(out[:1], ref[:1])
    for o, rr in zip(out[1:], ref[1:]):
        assert torch.allclose(o.float(), rr.float(), rtol=1e-2, atol=1e-2), (o, rr)
    assert torch.equal(args[7], eager[7]) and torch.equal(args[8], eager[8])


def _attend(qe, kc, vc):
    """Attention of every token over the whole (written) caches, GQA (q heads grouped per kv head)."""
    T, HQ, D = qe.shape
    K, V = kc.reshape(-1, *kc.shape[-2:]).float(), vc.reshape(-1, *vc.shape[-2:]).float()
    HK = K.shape[1]
    s = torch.einsum("tgrd,sgd->tgrs", qe.float().reshape(T, HK, HQ // HK, D), K) / D ** 0.5
    return torch.einsum("tgrs,sgd->tgrd", s.softmax(-1), V).reshape(T, HQ, D)


def _kv_attend_setitem(q, k, v, cc, sc, pos, slots, kc, vc):
    """Indexed assignment (flat k, paged v), then attention over the whole new caches."""
    qe, ke = _kv_rope(q, k, cc, sc, pos)
    kc[slots] = ke
    vc.view(-1, *v.shape[1:])[slots] = v
    return qe, _attend(qe, kc, vc)


def _kv_attend_ops(q, k, v, cc, sc, pos, slots, kc, vc):
    """index_put_ into a paged k cache, index_copy_ into a flat v cache, then attention over both."""
    qe, ke = _kv_rope(q, k, cc, sc, pos)
    kc.view(-1, *k.shape[1:]).index_put_((slots,), ke)
    vc.index_copy_(0, slots, v)
    return qe, _attend(qe, kc, vc), ke


def _kv_attend_ops_v_paged(q, k, v, cc, sc, pos, slots, kc, vc):
    """index_copy_ into a flat k cache, index_put_ into a paged v cache (viewed flat), attention."""
    qe, ke = _kv_rope(q, k, cc, sc, pos)
    kc.index_copy_(0, slots, ke)
    vc.view(-1, *v.shape[1:]).index_put_((slots,), v)
    return qe, _attend(qe, kc, vc)


def _kv_gather_after(q, k, v, cc, sc, pos, slots, kc, vc):
    """Write k/v, then read back the written rows and a reduction of the whole cache."""
    qe, ke = _kv_rope(q, k, cc, sc, pos)
    kc[slots] = ke
    vc.view(-1, *v.shape[1:])[slots] = v
    kk, vv = kc[slots], vc.view(-1, *v.shape[1:])[slots]
    return qe, torch.einsum("thd,tgd->thg", qe[:, :2].float(), kk.float()), vv.float().sum(), kc.float().sum()


def _compile_no_index_put(fn, args, dynamic_dims=None):
    """compile_and_run, also asserting that no index_put is left after fxfuse: every reader of the
    written caches reads the fused op's cache output (not an index_put kept alive for it)."""
    left: list[str] = []

    def after(g: fx.Graph) -> None:
        left.extend(n.name for n in g.nodes if n.op == "call_function" and n.target is torch.ops.aten.index_put.default)

    out, _ = compile_and_run(fn, args, dynamic_dims=dynamic_dims, passes=fxfuse.FusionPasses(after=after))
    assert not left, left
    return out


def _compiled_once(fn, arg_sets, dyn):
    """Yield (args, eager args, compiled out, eager out) per argument set: the first set compiles
    with the dims `dyn` dynamic (no index_put left); later sets reuse that compile with the same
    dims marked dynamic. The report after the first yield is the first compile's."""
    compiled = None
    for args in arg_sets:
        eager = [a.clone() for a in args]
        with torch.no_grad():
            ref = fn(*eager)
        if compiled is None:
            out = _compile_no_index_put(fn, args, dynamic_dims=dyn)
            compiled = torch.compile(fn, options={"post_grad_custom_pre_pass": fxfuse.passes}, fullgraph=True)
        else:
            for a, d in dyn.items():
                torch._dynamo.mark_dynamic(args[a], d)
            with torch.no_grad():
                out = compiled(*args)
        yield args, eager, out, ref


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _check_outs(out, ref, tol=1e-3):
    """q (and k) RoPE outputs as eager (dequant_close), everything after within `tol` relative error."""
    assert len(out) == len(ref)
    check_close(out[:1], ref[:1])
    for o, r in zip(out[1:], ref[1:]):
        assert o.shape == r.shape and o.dtype == r.dtype, (o.shape, r.shape)
        assert _rel(o, r) < tol, _rel(o, r)


def _kv_v_read_first(q, k, v, cc, sc, pos, slots, kc, vc):
    """v is written and its new cache read before the RoPE is computed (the fused op moves above
    the reader)."""
    vc.view(-1, *v.shape[1:])[slots] = v
    vsum = vc.float().sum()
    qe, ke = _kv_rope(q, k, cc, sc, pos)
    kc[slots] = ke
    return qe, vsum, _attend(qe, kc, vc)


def _kv_other_views_after(q, k, v, cc, sc, pos, slots, kc, vc):
    """Reads of the new contents through other views than the written one: flat, row slices,
    a column slice, a transpose, and the (mutated) caches returned."""
    qe, ke = _kv_rope(q, k, cc, sc, pos)
    kc[slots] = ke
    vc.view(-1, *v.shape[1:])[slots] = v
    return (qe, kc.view(-1)[:300].float().sum(), vc.view(-1, 32)[3:9].float(), kc.transpose(0, 1).float().sum(0),
            kc[:5].float() * 1, kc[:, 1].float() * 2, vc[1:3].float() + 0)


KV_READ_FORMS = {"other_views": (_kv_other_views_after, False), "v_read_first": (_kv_v_read_first, False), "attend_setitem": (_kv_attend_setitem, False), "attend_ops": (_kv_attend_ops, True),
                 "attend_v_paged": (_kv_attend_ops_v_paged, False), "gather": (_kv_gather_after, False),
                 "sum": (_kv_read_after, False)}


@pytest.mark.parametrize("form", list(KV_READ_FORMS))
def test_kv_cache_reads_after_the_write_fuse(form):
    """Reads of the new cache contents (attention over the whole cache, gathers, sums) read the
    fused op's cache output: the write fuses, outputs match eager, the caches equal eager's bit for bit."""
    fn, paged_k = KV_READ_FORMS[form]
    args = kv_inputs(seed=31, paged_k=paged_k)
    args = (*args[:7], *(c.div(50) for c in args[7:9]))  # attention over O(1) old rows, not one-hot
    eager = [a.clone() for a in args]
    with torch.no_grad():
        ref = fn(*eager)
    out = _compile_no_index_put(fn, args)
    r = fxfuse.report()
    assert fxfuse.counters["rope_quant"] == 1, r.format(verbose=True)
    assert "+kv_cache" in r.fusions[0].detail and not r.near_misses, r.format(verbose=True)
    _check_outs(out, ref)
    assert torch.equal(args[7], eager[7]) and torch.equal(args[8], eager[8])
    assert not torch.equal(args[7], args[7].clone().zero_())  # (the caches hold data)


def _kv_fp8_attend(q, k, v, cc, sc, pos, slots, kc, vc, ks, vs):
    """fp8 caches (k's and v's static quant written), then attention over the dequantized caches."""
    qe = kv_fp8_model(q, k, v, cc, sc, pos, slots, kc, vc, ks, vs)
    return qe, _attend(qe, kc.float() * ks, vc.float() * vs)


def test_kv_cache_fp8_reads_after_the_write_fuse():
    args = kv_inputs(seed=23, fp8=True)
    extra = (torch.tensor(0.02), torch.tensor(0.03))
    eager = [a.clone() for a in args]
    with torch.no_grad():
        ref = _kv_fp8_attend(*eager, *extra)
    out = _compile_no_index_put(_kv_fp8_attend, (*args, *extra))
    r = fxfuse.report()
    assert fxfuse.counters["rope_quant"] == 1 and "+kv_cache fp8" in r.fusions[0].detail, r.format(verbose=True)
    assert not r.near_misses, r.format(verbose=True)
    _check_outs(out, ref)
    assert torch.equal(_bits(args[7]), _bits(eager[7])) and torch.equal(_bits(args[8]), _bits(eager[8]))


def test_kv_cache_reads_after_the_write_dynamic_tokens():
    """Attention over the written caches with a dynamic token dim: one compile serves T = 7 and 12."""
    dyn = {0: 0, 1: 0, 2: 0, 5: 0, 6: 0}

    def inputs(T):
        args = kv_inputs(T=T, seed=40 + T, paged_k=True)
        return (*args[:7], *(c.div(50) for c in args[7:9]))

    for i, (args, eager, out, ref) in enumerate(_compiled_once(_kv_attend_ops, map(inputs, (7, 12)), dyn)):
        if i == 0:
            r = fxfuse.report()
            assert fxfuse.counters["rope_quant"] == 1 and "+kv_cache" in r.fusions[0].detail, r.format(verbose=True)
        _check_outs(out, ref)
        assert torch.equal(args[7], eager[7]) and torch.equal(args[8], eager[8])
    assert not any("KV-cache" in m.reason for m in fxfuse.report().near_misses), fxfuse.report().format(verbose=True)


def _two_layers(h, wq1, wk1, wv1, wq2, wk2, wv2, wo, cc, sc, pos, slots, kc1, vc1, kc2, vc2, v_first=False):
    """Two attention layers sharing the slots: layer 1 writes a flat k / paged v cache by indexed
    assignment, layer 2 (input: layer 1's attention output) a paged k / flat v cache by
    index_put_ / index_copy_; each attends over its whole cache. v_first: layer 1 writes v before
    its q/k projections and RoPE (in program order)."""
    T = h.shape[0]
    if v_first:
        vc1.view(-1, 2, 32)[slots] = (h @ wv1).view(T, 2, 32)
    q1, k1, v1 = (h @ wq1).view(T, 4, 32), (h @ wk1).view(T, 2, 32), (h @ wv1).view(T, 2, 32)
    qe1, ke1 = _kv_rope(q1, k1, cc, sc, pos)
    kc1[slots] = ke1
    if not v_first:
        vc1.view(-1, 2, 32)[slots] = v1
    h2 = _attend(qe1, kc1, vc1).to(h.dtype).reshape(T, 128) @ wo
    q2, k2, v2 = (h2 @ wq2).view(T, 4, 32), (h2 @ wk2).view(T, 2, 32), (h2 @ wv2).view(T, 2, 32)
    qe2, ke2 = _kv_rope(q2, k2, cc, sc, pos)
    kc2.view(-1, 2, 32).index_put_((slots,), ke2)
    vc2.index_copy_(0, slots, v2)
    return qe1, _attend(qe2, kc2, vc2), h2


def _two_layers_cross(h, wq1, wk1, wv1, wq2, wk2, wv2, wo, cc, sc, pos, slots, kc1, vc1, kc2, vc2):
    """Layer 2's v rows come from layer 1's rotated q and are written (in program order) right after
    layer 1's k write: layer 1 must not take that v write (its rows depend on the region), layer 2 does."""
    T = h.shape[0]
    q1, k1 = (h @ wq1).view(T, 4, 32), (h @ wk1).view(T, 2, 32)
    qe1, ke1 = _kv_rope(q1, k1, cc, sc, pos)
    kc1[slots] = ke1
    vc2.index_copy_(0, slots, qe1[:, :2] * 2)
    v1 = (torch.tanh(h @ wq2).to(h.dtype) @ wv1).view(T, 2, 32)
    vc1.view(-1, 2, 32)[slots] = v1
    h2 = _attend(qe1, kc1, vc1).to(h.dtype).reshape(T, 128) @ wo
    q2, k2 = (h2 @ wq2).view(T, 4, 32), (h2 @ wk2).view(T, 2, 32)
    qe2, ke2 = _kv_rope(q2, k2, cc, sc, pos)
    kc2.view(-1, 2, 32).index_put_((slots,), ke2)
    return qe1, _attend(qe2, kc2, vc2), h2


@pytest.mark.parametrize("dynamic,v_first", [(False, False), (True, False), (False, True), (False, "cross")])
def test_kv_cache_two_layers_share_slots(dynamic, v_first):
    """Each layer's k write pairs with its own v write (the other layer's v depends on the region,
    or is nearer to the other k): two fused regions, caches and outputs as eager."""
    g = torch.Generator().manual_seed(77)
    T = 7
    h = torch.randn(T, 128, generator=g).to(BF16)
    ws = [(torch.randn(128, n, generator=g) / 128 ** 0.5).to(BF16) for n in (128, 64, 64, 128, 64, 64, 128)]
    _, _, cc, sc, pos, _ = table_inputs(T=T, seed=78)
    slots = torch.randperm(32, generator=g)[:T]
    caches = [torch.randn(sh, generator=g).to(BF16) for sh in ((32, 2, 32), (4, 8, 2, 32), (4, 8, 2, 32), (32, 2, 32))]
    args = [h, *ws, cc, sc, pos, slots, *caches]
    eager = [a.clone() for a in args]
    fn = _two_layers_cross if v_first == "cross" else functools.partial(_two_layers, v_first=v_first)
    with torch.no_grad():
        ref = fn(*eager)
    out = _compile_no_index_put(fn, args, dynamic_dims={0: 0, 10: 0, 11: 0} if dynamic else None)
    r = fxfuse.report()
    assert fxfuse.counters["rope_quant"] == 2, r.format(verbose=True)
    assert all("+kv_cache" in f.detail for f in r.fusions) and not r.near_misses, r.format(verbose=True)
    _check_outs(out, ref, tol=2e-2)
    idx = torch.zeros(32, dtype=torch.bool)
    idx[slots] = True
    for i, (got, want) in enumerate(zip(args[12:], eager[12:])):
        got, want = got.reshape(32, 2, 32), want.reshape(32, 2, 32)
        if i < 2:  # layer 1: k = RoPE of the same inputs, v = h @ wv1: bit-equal
            assert torch.equal(got, want), i
        else:  # layer 2 reads layer 1's attention (summation order may differ): untouched rows equal
            assert torch.equal(got[~idx], want[~idx]) and _rel(got[idx], want[idx]) < 2e-2, i
            assert not torch.equal(got[idx], want[idx].zero_())


def _v_from_new_k_prefix(q1, k1, q2, k2, v1, cc, sc, pos, slots, kc1, vc1, kc2, vc2):
    """Layer 2's v rows are the first len(slots) rows of layer 1's NEW k cache (kc1[:T] after the write)."""
    qe1, ke1 = _kv_rope(q1, k1, cc, sc, pos)
    kc1[slots] = ke1
    vc1[slots] = v1
    qe2, ke2 = _kv_rope(q2, k2, cc.flip(0), sc.flip(0), pos)
    kc2[slots] = ke2
    vc2[slots] = kc1[:q1.shape[0]]
    return qe1, qe2


def _v_from_new_k_whole(q1, k1, q2, k2, v1, cc, sc, pos, slots, kc1, vc1, kc2, vc2):
    """As above with as many slots as cache rows: layer 2's v rows are layer 1's whole new k cache."""
    qe1, ke1 = _kv_rope(q1, k1, cc, sc, pos)
    kc1[slots] = ke1
    vc1[slots] = v1
    qe2, ke2 = _kv_rope(q2, k2, cc.flip(0), sc.flip(0), pos)
    kc2[slots] = ke2
    vc2[slots] = kc1
    return qe1, qe2


@pytest.mark.parametrize("form", ["prefix", "whole"])
def test_kv_cache_v_rows_are_another_layers_new_cache(form):
    """Layer 2's v rows read layer 1's new k cache. The v write's rows must stay a reader of that
    write (rerouted to layer 1's fused cache output), not the index_put itself: before the fix layer
    2's op read the index_put, which layer 1's fusion had rerouted away, so it was kept alive and
    recomputed (its rows in Inductor's own precision) and vc2 differed from eager."""
    T = 5 if form == "prefix" else 32
    q1, k1, cc, sc, pos, _ = table_inputs(T=T, seed=3)
    q2, k2, _, _, _, _ = table_inputs(T=T, seed=4)
    g = torch.Generator().manual_seed(9)
    v1 = torch.randn(k1.shape, generator=g).to(BF16)
    slots = torch.randperm(32, generator=g)[:T]
    caches = [torch.randn(32, 2, 32, generator=g).to(BF16) for _ in range(4)]
    args = [q1, k1, q2, k2, v1, cc, sc, pos, slots, *caches]
    eager = [a.clone() for a in args]
    fn = _v_from_new_k_prefix if form == "prefix" else _v_from_new_k_whole
    with torch.no_grad():
        ref = fn(*eager)
    out = _compile_no_index_put(fn, args) if form == "prefix" else compile_and_run(fn, args)[0]
    r = fxfuse.report()
    assert fxfuse.counters["rope_quant"] == 2, r.format(verbose=True)
    kv = [f for f in r.fusions if "+kv_cache" in f.detail]
    if form == "prefix":  # both layers fuse their writes
        assert len(kv) == 2 and not r.near_misses, r.format(verbose=True)
    else:  # layer 2's v would be layer 1's index_put itself: a near miss
        assert len(kv) == 1, r.format(verbose=True)
        assert any("new contents of another cache write" in m.reason for m in r.near_misses), r.format(verbose=True)
    for o, rr in zip(out, ref):
        assert torch.equal(o, rr)
    for i, (a, b) in enumerate(zip(args, eager)):
        assert torch.equal(a, b), i


def _q_is_new_k_cache(q1, k1, k2, v1, cc, sc, pos, slots, kc1, vc1):
    """Layer 2 rotates layer 1's whole new k cache (as many tokens as cache rows): its RoPE input is
    the index_put result itself."""
    qe1, ke1 = _kv_rope(q1, k1, cc, sc, pos)
    kc1[slots] = ke1
    vc1[slots] = v1
    cos, sin = cc.flip(0)[pos].unsqueeze(-2), sc.flip(0)[pos].unsqueeze(-2)
    return qe1, kc1 * cos + rotate_half(kc1) * sin, k2 * cos + rotate_half(k2) * sin


def test_kv_cache_rope_input_is_another_writes_index_put():
    """A RoPE whose input is a fused write's index_put result itself stays with Inductor (near miss):
    before the fix its fused op read that index_put, which layer 1's fusion had rerouted away; it was
    kept alive and recomputed from Inductor's own RoPE of k1, so layer 2 did not rotate the cache
    contents the program wrote (and the index_put ran twice)."""
    T = 32
    q1, k1, cc, sc, pos, _ = table_inputs(T=T, seed=3)
    _, k2, _, _, _, _ = table_inputs(T=T, seed=4)
    g = torch.Generator().manual_seed(9)
    v1 = torch.randn(k1.shape, generator=g).to(BF16)
    slots = torch.randperm(32, generator=g)
    args = [q1, k1, k2, v1, cc, sc, pos, slots, *(torch.randn(32, 2, 32, generator=g).to(BF16) for _ in range(2))]
    eager = [a.clone() for a in args]
    with torch.no_grad():
        ref = _q_is_new_k_cache(*eager)
    out = _compile_no_index_put(_q_is_new_k_cache, args)
    r = fxfuse.report()
    assert fxfuse.counters["rope_quant"] == 1 and "+kv_cache" in r.fusions[0].detail, r.format(verbose=True)
    assert any("is an input of the fused op" in m.reason for m in r.near_misses), r.format(verbose=True)
    assert torch.equal(out[0], ref[0])
    _check_outs(out, ref, tol=1e-2)  # layer 2 as Inductor computes it
    for i, (a, b) in enumerate(zip(args, eager)):
        assert torch.equal(a, b), i


@pytest.mark.parametrize("B,prompt_len,step_len", [(1, 5, 1), (2, 3, 4)])
def test_transformers_static_cache_fuses(B, prompt_len, step_len):
    """transformers' StaticCache ([B, Hkv, max_len, D], written by index_copy_(2, cache_position, k)) in a
    real LlamaModel step: each layer's RoPE and its k/v cache writes are one fused op (attention over
    the whole cache reads the op's cache outputs); hidden states and caches match eager."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaModel, StaticCache

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, max_position_embeddings=64)
    m = LlamaModel(cfg).to(BF16).eval()
    caches = [StaticCache(config=cfg, max_cache_len=16) for _ in range(2)]
    prompt, step = torch.randint(0, 64, (B, prompt_len)), torch.randint(0, 64, (B, step_len))
    cpos = torch.arange(prompt_len, prompt_len + step_len)
    with torch.no_grad():
        for c in caches:  # prefill eagerly: the caches exist (graph inputs) before the compiled step
            m(input_ids=prompt, past_key_values=c, use_cache=True, cache_position=torch.arange(prompt_len))
        ref = m(input_ids=step, past_key_values=caches[0], use_cache=True, cache_position=cpos)
    torch._dynamo.reset()
    fxfuse.counters.clear()
    with fresh_cache(), torch.no_grad():
        out = torch.compile(m, options={"post_grad_custom_pre_pass": fxfuse.passes}, fullgraph=True)(
            input_ids=step, past_key_values=caches[1], use_cache=True, cache_position=cpos)
    r = fxfuse.report()
    assert fxfuse.counters["rope_quant"] == 2 and all("+kv_cache" in f.detail for f in r.fusions), r.format(verbose=True)
    assert not [m.reason for m in r.near_misses if m.family == "rope_quant"], r.format(verbose=True)
    assert _rel(out.last_hidden_state, ref.last_hidden_state) < 2e-2
    end = prompt_len + step_len
    for le, lc in zip(caches[0].layers, caches[1].layers):
        for a, b in ((le.keys, lc.keys), (le.values, lc.values)):
            assert torch.equal(a[:, :, :prompt_len], b[:, :, :prompt_len]) and torch.equal(a[:, :, end:], b[:, :, end:])
            assert _rel(b[:, :, prompt_len:end], a[:, :, prompt_len:end]) < 2e-2 and b[:, :, prompt_len:end].abs().sum() > 0


def _static_model(q, k, v, cos, sin, cpos, kc, vc):
    """HF-layout q/k/v [B, H, T, D] (transposed projections), RoPE, StaticCache-style writes, attention
    over the whole caches (GQA by repeat_interleave)."""
    qe, ke = apply_rope(q, k, cos, sin)
    kc.index_copy_(2, cpos, ke)
    vc.index_copy_(2, cpos, v)
    rep = q.shape[1] // kc.shape[1]
    kk, vv = kc.repeat_interleave(rep, 1).float(), vc.repeat_interleave(rep, 1).float()
    return qe, ((qe.float() @ kk.transpose(-1, -2)) / 32 ** 0.5).softmax(-1) @ vv


def _static_mixed(q, k, v, cos, sin, cpos, kc, vc):
    """k to a [B, H, max_len, D] cache, v to a flat [slots, H, D] one: different layouts, not fused."""
    qe, ke = apply_rope(q, k, cos, sin)
    kc.index_copy_(2, cpos, ke)
    vc.view(-1, *vc.shape[-2:])[cpos] = v[0].transpose(0, 1)
    return qe


def _static_inputs(B, S, L=16, seed=0, flat_v=False):
    q, k, cos, sin, _ = hf_inputs(B=B, S=S, HQ=4, HK=2, D=32, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    v = torch.randn(B, S, 2, 32, generator=g).to(BF16).transpose(1, 2)
    cpos = torch.randperm(L, generator=g)[:S]
    kc = torch.randn(B, 2, L, 32, generator=g).to(BF16)
    vc = torch.randn(L, 2, 32, generator=g).to(BF16) if flat_v else torch.randn(B, 2, L, 32, generator=g).to(BF16)
    return [q, k, v, cos, sin, cpos, kc, vc]


def _static_read_views(q, k, v, cos, sin, cpos, kc, vc):
    """StaticCache writes (index_copy_ and indexed assignment), then reads of the new contents through
    slices, a transpose, a flat view and gathers at the written positions."""
    qe, ke = apply_rope(q, k, cos, sin)
    kc.index_copy_(2, cpos, ke)
    vc[:, :, cpos] = v
    return (qe, kc[:, :, :7].float().sum(-1), vc.transpose(1, 2).reshape(vc.shape[0], vc.shape[2], -1).float()[:, 3],
            kc.view(-1)[5:900].float(), kc.index_select(2, cpos).float(), vc[:, :, cpos].float())


@pytest.mark.parametrize("dynamic", [False, True])
def test_static_cache_reads_through_other_views(dynamic):
    args = _static_inputs(B=2, S=3, seed=5)
    eager = [a.clone() for a in args]
    with torch.no_grad():
        ref = _static_read_views(*eager)
    out = _compile_no_index_put(_static_read_views, args,
                                dynamic_dims={0: 2, 1: 2, 2: 2, 3: 1, 4: 1, 5: 0} if dynamic else None)
    r = fxfuse.report()
    assert fxfuse.counters["rope_quant"] == 1 and "+kv_cache" in r.fusions[0].detail, r.format(verbose=True)
    assert not r.near_misses, r.format(verbose=True)
    for o, rr in zip(out, ref):
        assert torch.equal(o, rr)
    assert torch.equal(args[6], eager[6]) and torch.equal(args[7], eager[7])


def test_static_cache_layout_dynamic_tokens():
    """[B, H, max_len, D] caches written at cache positions, dynamic token dim: one compile for S = 3
    and S = 6; q and attention as eager, caches bit-equal."""
    dyn = {0: 2, 1: 2, 2: 2, 3: 1, 4: 1, 5: 0}
    arg_sets = (_static_inputs(B=2, S=S, seed=S) for S in (3, 6))
    for i, (args, eager, out, ref) in enumerate(_compiled_once(_static_model, arg_sets, dyn)):
        if i == 0:
            r = fxfuse.report()
            assert fxfuse.counters["rope_quant"] == 1 and "+kv_cache" in r.fusions[0].detail, r.format(verbose=True)
            assert not r.near_misses, r.format(verbose=True)
        _check_outs(out, ref)
        assert torch.equal(args[6], eager[6]) and torch.equal(args[7], eager[7])


def test_static_cache_mixed_layouts_near_miss():
    args = _static_inputs(B=1, S=3, seed=9, flat_v=True)
    eager = [a.clone() for a in args]
    with torch.no_grad():
        ref = _static_mixed(*eager)
    out, _ = compile_and_run(_static_mixed, args)
    r = fxfuse.report()
    assert fxfuse.counters["rope_quant"] == 1 and "+kv_cache" not in r.fusions[0].detail, r.format(verbose=True)
    assert any("different layouts" in m.reason for m in r.near_misses), [m.reason for m in r.near_misses]
    check_close((out,), (ref,))
    assert torch.equal(args[6], eager[6]) and torch.equal(args[7], eager[7])


def test_kv_cache_reference_op_opcheck():
    from fxfuse.kernels import rope_quant as K

    q, k, v, c, s, pos, slots, kc, vc = kv_inputs(seed=5)
    args = (q.unsqueeze(0), k.unsqueeze(0), c, s, pos, None, None, 32, True, False, BF16, 0, 1.0, [], [], False,
            0, 1.0, [], [], False, -448.0, 448.0, True, False, [0, 1, 2], [0, 1, 2],
            v.unsqueeze(0), kc, vc, slots, None, False, False, False, 1.0, False, -448.0, 448.0, True)
    torch.library.opcheck(torch.ops.fxfuse.rope_quant_cache_ref.default, args,
                          test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------ forms that must NOT fuse (or not together)
def wrong_rotation(q, k, cos, sin, scale):
    def rot(x):
        h = x.shape[-1] // 2
        return torch.cat((x[..., h:], -x[..., :h]), dim=-1)

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (*q_static(q * cos + rot(q) * sin, scale), k * cos + rot(k) * sin)


def swapped_trig(q, k, ang, _unused, scale):
    emb = torch.cat((ang, ang), -1)
    cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
    return apply_rope(q, k, sin, cos)  # x * sin + rotate_half(x) * cos


@pytest.mark.parametrize("name", ["wrong_rotation", "swapped_trig"])
def test_near_miss_stays_unfused(name):
    q, k, cos, sin, scale = hf_inputs(seed=6)
    if name == "wrong_rotation":
        fn, args, reason = wrong_rotation, (q, k, cos, sin, scale), "cat(x2, -x1)"
    else:
        ang = torch.rand(2, 5, 16, generator=torch.Generator().manual_seed(0))
        fn, args, reason = swapped_trig, (q, k, ang, sin, scale), "swapped"
    ref = stock_compile(fn, args)
    fxfuse.report.clear()
    out, _ = compile_and_run(fn, args)
    assert fxfuse.counters["rope_quant"] == 0
    assert any(reason in m.reason for m in fxfuse.report().near_misses), [m.reason for m in fxfuse.report().near_misses]
    assert_identical(tuple(out), ref)


def different_positions(q, k, cos_cached, sin_cached, pos_q, pos_k):
    qe = q * cos_cached[pos_q].unsqueeze(-2) + rotate_half(q) * sin_cached[pos_q].unsqueeze(-2)
    ke = k * cos_cached[pos_k].unsqueeze(-2) + rotate_half(k) * sin_cached[pos_k].unsqueeze(-2)
    return qe, ke


def test_different_positions_are_two_regions():
    q, k, c, s, pos, _ = table_inputs(seed=7)
    pos_k = (pos + 3) % 64
    args = (q, k, c, s, pos, pos_k)
    with torch.no_grad():
        ref = different_positions(*args)
    out, _ = compile_and_run(different_positions, args)
    assert fxfuse.counters["rope_quant"] == 2, fxfuse.report()  # one launch each, no shared cos/sin
    check_close(out, ref)


# ------------------------------------------------------------------ transformers attention modules
def _hf_attention(kind: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                  intermediate_size=64, num_hidden_layers=1, vocab_size=32)
    if kind == "llama":
        from transformers.models.llama import modeling_llama as mm

        cfg = transformers.LlamaConfig(**common)
        attn, rope = mm.LlamaAttention(cfg, layer_idx=0), mm.LlamaRotaryEmbedding(cfg)
    else:
        from transformers.models.qwen3 import modeling_qwen3 as mm

        cfg = transformers.Qwen3Config(**common)
        attn, rope = mm.Qwen3Attention(cfg, layer_idx=0), mm.Qwen3RotaryEmbedding(cfg)
    cfg._attn_implementation = "sdpa"

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.rope = attn, rope

        def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            pe = self.rope(x, pos)
            return self.attn(x, position_embeddings=pe, attention_mask=None)[0]

    return Block().to(BF16).eval()


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_transformers_attention_rope_fuses(kind):
    block = _hf_attention(kind)
    x = torch.randn(2, 6, 64, dtype=BF16)
    pos = torch.arange(6).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        ref = block(x, pos)
    out, leftovers = compile_and_run(block, (x, pos))
    assert fxfuse.counters["rope_quant"] == 1, fxfuse.report()
    assert not leftovers
    assert ("+qk_norm" in fxfuse.report().fusions[0].detail) == (kind == "qwen3"), fxfuse.report().fusions[0].detail
    rel = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert rel < 2e-2, rel


# ------------------------------------------------------------------ the Triton kernel under TRITON_INTERPRET=1
_INTERP = r"""
import itertools, json, sys, torch
from fxfuse.kernels.rope_quant import launch_config, rope_quant_reference, rope_quant_triton
torch.manual_seed(0)
CFG = json.loads(sys.argv[1])  # launch-config override ({} = the defaults)
res = []
def path(q, k, rot, neox, norm=False):
    return launch_config(q.shape[3], rot, q.shape[2], k.shape[2] if k is not None else 0, 0, neox=neox,
                         norm=norm, override=CFG)["SPLIT"]
def poisoned(ref, poison):  # outputs in the reference's layouts (the kernel stores with the outputs' strides)
    return [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(torch.full(t.shape, poison).to(t.dtype))
            for t in ref]
def run(neox, half, rot, D, pos, qq, kq, dt, out_dt, B=2, S=3, HQ=4, HK=2, hf_layout=True, has_k=True, so=None):
    q = torch.randn(B, HQ, S, D).to(dt).transpose(1, 2) if hf_layout else torch.randn(B, S, HQ, D).to(dt)
    k = torch.randn(B, S, HK, D).to(dt) if has_k else None
    C = rot // 2 if half else rot
    N = 11 if pos else B * S
    cos, sin = torch.randn(N, C).to(dt), torch.randn(N, C).to(dt)
    p = torch.randint(0, N, (B * S,)) if pos else None
    qs = torch.tensor([0.05]) if qq == 1 else None
    args = (q, k, cos, sin, p, qs, None, rot, neox, half, out_dt,
            qq, 1.0, [1] if qq == 2 else [], [448.0] if qq == 2 else [], False,
            kq, 0.02, [1, 3] if kq == 2 else [], [448.0, 1e-6] if kq == 2 else [], kq == 1,
            -448.0, 448.0, True, True, [0, 2, 1] if hf_layout else [0, 1, 2], [1, 0, 2])
    sord = dict(q_scale_order=so, k_scale_order=so[::-1]) if so else {}  # dynamic scales' [B, S, H] memory orders
    ref = rope_quant_reference(*args, **sord)
    runs = []
    for poison in (7.0, -3.0):
        runs.append(rope_quant_triton(*args, **sord, out=poisoned(ref, poison), config=CFG))
    bad = 0
    for a, b, c in zip(runs[0], runs[1], ref):
        if a.numel():
            bad += int(not torch.equal(a.float(), b.float())) + int(not torch.equal(a.float(), c.float()))
    if so:  # the reference lays the scales out as ordered
        for t, o in ((ref[2], so), (ref[5], so[::-1])):
            if t.dim() == 3:
                st = [0, 0, 0]
                acc = 1
                for d in reversed(o):
                    st[d] = acc
                    acc *= t.shape[d]
                bad += int(list(t.stride()) != st)
    res.append(dict(case=f"neox={neox} half={half} rot={rot} D={D} pos={pos} q={qq} k={kq} {dt}->{out_dt} so={so}", bad=bad,
                    split=path(q, k, rot, neox)))
for neox, half, pos in itertools.product([True, False], [True, False], [True, False]):
    run(neox, half, 16, 16, pos, 1, 2, torch.bfloat16, torch.bfloat16, so=[0, 2, 1] if pos else None)
run(True, True, 8, 16, True, 2, 0, torch.float16, torch.float16, hf_layout=False, so=[2, 0, 1])
run(False, False, 8, 24, False, 0, 1, torch.float32, torch.float32)
run(True, False, 16, 16, False, 0, 0, torch.bfloat16, torch.float32, has_k=False)
run(True, False, 32, 64, False, 2, 2, torch.bfloat16, torch.bfloat16, B=1, S=1, HQ=3, HK=1, so=[1, 2, 0])
run(True, True, 24, 32, False, 2, 1, torch.bfloat16, torch.bfloat16, so=[2, 1, 0])  # half 12: not a power of 2 (gather)
run(False, True, 16, 72, True, 1, 2, torch.bfloat16, torch.bfloat16, HQ=5, HK=3)  # passthrough 32 + 24 (masked 32), odd heads
# QK-norm before the rotation
def run_norm(neox, rot, D, dt=torch.bfloat16, eps_t=False):
    q = torch.randn(2, 3, 4, D).to(dt); k = torch.randn(2, 3, 2, D).to(dt)
    cos, sin = torch.randn(6, rot).to(dt), torch.randn(6, rot).to(dt)
    wq, wk = (1 + 0.2 * torch.randn(D)).to(dt), (1 + 0.2 * torch.randn(D)).to(dt)
    args = (q, k, cos, sin, None, None, None, rot, neox, False, dt, 2, 1.0, [1], [448.0], False, 0, 1.0, [], [], False,
            -448.0, 448.0, True, True, [0, 1, 2], [0, 1, 2], wq, wk, 1e-6, 1e-5, 0.0, True, None, dt)
    # eps_t: lifted eps read from tensors (values far from the constants, so a baked eps shows)
    kw = dict(q_eps_tensor=torch.tensor([0.37]), k_eps_tensor=torch.tensor(0.05)) if eps_t else {}
    ref = rope_quant_reference(*args, **kw)
    runs = [rope_quant_triton(*args, **kw, config=CFG, out=[torch.full(t.shape, p).to(t.dtype) for t in ref])
            for p in (7.0, -3.0)]
    bad = sum(int(not torch.equal(a.float(), b.float())) + int(not torch.equal(a.float(), c.float()))
              for a, b, c in zip(runs[0], runs[1], ref) if a.numel())
    res.append(dict(case=f"qk_norm neox={neox} rot={rot} D={D}", bad=bad, split=path(q, k, rot, neox, True)))
run_norm(True, 32, 32)
run_norm(False, 16, 32)
run_norm(True, 16, 64, eps_t=True)  # Qwen3.5-like: QK-norm + partial neox rotary; eps from tensors
run_norm(False, 32, 32)  # gpt-j full rotary: SPLIT 2 swaps the lanes of each pair in registers
# fp32 math stored as bf16 (the complex form: fp32 product, one cast at the end)
q = torch.randn(2, 3, 4, 32).to(torch.bfloat16); k = torch.randn(2, 3, 2, 32).to(torch.bfloat16)
args = (q, k, torch.randn(6, 16), torch.randn(6, 16), None, None, None, 32, False, True, torch.bfloat16, 0, 1.0, [], [],
        False, 0, 1.0, [], [], False, -448.0, 448.0, True, True, [0, 1, 2], [0, 1, 2])
ref = rope_quant_reference(*args, math_dtype=torch.float32)
runs = [rope_quant_triton(*args, math_dtype=torch.float32, config=CFG,
                          out=[torch.full(t.shape, p).to(t.dtype) for t in ref]) for p in (7.0, -3.0)]
res.append(dict(case="fp32 math -> bf16", bad=sum(int(not torch.equal(a, b)) + int(not torch.equal(a, c))
                                              for a, b, c in zip(runs[0], runs[1], ref) if a.numel()),
                split=path(q, k, 32, False)))
# dynamic scales of heads holding NaN, +-inf or only zeros: the amax propagates NaN and inf like torch.amax
def same_nan(a, b):
    a, b = a.float(), b.float()
    n = torch.isnan(a)
    return torch.equal(n, torch.isnan(b)) and torch.equal(a[~n], b[~n])
for neox in (True, False):
    q = torch.randn(2, 3, 4, 32).to(torch.bfloat16); k = torch.randn(2, 3, 2, 32).to(torch.bfloat16)
    q[0, 0, 1, 3] = float("nan"); q[1, 2, 0, 5] = float("inf"); q[0, 2, 3, 0] = -0.0
    k[0, 1, 1, :] = 0.0; k[1, 0, 0, 7] = float("-inf")
    cos, sin = torch.randn(6, 32).to(torch.bfloat16), torch.randn(6, 32).to(torch.bfloat16)
    args = (q, k, cos, sin, None, None, None, 32, neox, False, torch.bfloat16, 2, 1.0, [1], [448.0], False,
            2, 1.0, [1, 3], [448.0, 1e-6], False, -448.0, 448.0, True, True, [0, 1, 2], [0, 1, 2])
    ref = rope_quant_reference(*args)
    runs = [rope_quant_triton(*args, config=CFG, out=[torch.full(t.shape, p).to(t.dtype) for t in ref])
            for p in (7.0, -3.0)]
    nans = int(torch.isnan(ref[2]).sum())
    res.append(dict(case=f"special values neox={neox} rot=32 D=32 (NaN scales {nans})",
                    bad=sum(int(not same_nan(a, b)) + int(not same_nan(a, c)) for a, b, c in zip(runs[0], runs[1], ref)
                            if a.numel()) + int(nans == 0), split=path(q, k, 32, neox)))
print(json.dumps(res))
"""


# launch configs the interpreter tests run: the defaults, the SPLIT paths at their default block, and
# small head blocks / warp counts on each path (a program per 1 or 2 heads, masked tails)
# num_warps does nothing under the interpreter (CI time): the configs differ in path and head block
_INTERP_CONFIGS = [{}, {"SPLIT": 1}, {"SPLIT": 1, "BLOCK_H": 2}, {"SPLIT": 0, "BLOCK_H": 2},
                   {"SPLIT": 2}, {"SPLIT": 2, "BLOCK_H": 2}]


@pytest.mark.parametrize("cfg", _INTERP_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_kernel_under_triton_interpreter(cfg):
    """Bit-exact vs the reference (outputs poisoned twice) for every case on both paths (SPLIT
    where the half is a power of 2, else the gather fallback) and several head blocks / warps."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _INTERP, json.dumps(cfg)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    bad = [c for c in res if c["bad"]]
    assert len(res) == 21 and not bad, bad
    split = [c["case"] for c in res if c["split"]]
    dims = {c["case"]: tuple(int(re.search(f"{k}=(\\d+)", c["case"]).group(1)) for k in ("rot", "D")) for c in res
            if "fp32 math" not in c["case"]}
    dims["fp32 math -> bf16"] = (32, 32)
    if cfg.get("SPLIT") == 2:  # the partner from registers: full rotary of a power-of-2 head_dim only
        assert set(split) == {c for c, (rot, d) in dims.items() if rot == d and d & (d - 1) == 0}, split
        assert all(c["split"] == 2 for c in res if c["split"])
    elif "SPLIT" in cfg:
        assert len(split) == (20 if cfg["SPLIT"] else 0), split  # all but the half-12 case
    else:  # defaults: partial rotary and QK-norm take SPLIT, full rotary the gathered partner
        assert split and all(dims[c][0] < dims[c][1] or c.startswith("qk_norm") for c in split), split
        assert all(c["case"] in split for c in res if c["case"].startswith("qk_norm")), split


_INTERP_CACHE = r"""
import json, sys, torch
from fxfuse.kernels.rope_quant import rope_quant_cache_reference, rope_quant_cache_triton
FP8 = torch.float8_e4m3fn
CFG = json.loads(sys.argv[1])  # launch-config override ({} = the defaults)
res = []
def run(fp8, neg_skip, paged, need_k, store_kq, cdt, n, T=7, seed=0, B=0, rot=32, neox=True, q_so=None):
    g = torch.Generator().manual_seed(seed)
    bf = torch.bfloat16
    q, k, v = (torch.randn(B or 1, T, h, 32, generator=g).to(bf) for h in (4, 2, 2))
    cs, sn = torch.randn(64, rot, generator=g).to(bf), torch.randn(64, rot, generator=g).to(bf)
    pos = torch.randint(0, 64, ((B or 1) * T,), generator=g)
    slots = torch.randperm(24, generator=g)[:n]
    slots[1], slots[4] = -1, -3
    shape = (B, 2, 24, 32) if B else (3, 8, 2, 32) if paged else (24, 2, 32)
    base = torch.randint(0, 120, shape, generator=g, dtype=torch.uint8) if fp8 else torch.randn(shape, generator=g).to(bf)
    if fp8 and cdt == "fp8":
        base = base.view(FP8)
    ks, vs = torch.tensor([0.05]), torch.tensor([0.1])
    a = [q, k, cs, sn, pos, None, ks if fp8 else None, rot, neox, False, bf, 0, 1.0, [], [], False, int(fp8), 1.0, [], [],
         False, -448., 448., True, need_k, [0, 1, 2], [0, 1, 2], v, None, None, slots, vs if fp8 else None, fp8,
         store_kq and fp8, fp8, 1.0, False, -448., 448., neg_skip]
    a[28], a[29] = base.clone(), base.clone()
    kw = dict(cache_bhsd=bool(B))
    if q_so:  # dynamic fp8 q, its scale laid out in memory order q_so of [B, S, H]
        a[11], a[13], a[14] = 2, [1], [448.0]
        kw["q_scale_order"] = q_so
    ref = rope_quant_cache_reference(*a, **kw)
    want = (a[28], a[29])
    bad = 0
    for poison in (7.0, -3.0):
        a[28], a[29] = base.clone(), base.clone()
        outs = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(torch.full(t.shape, poison).to(t.dtype))
                for t in ref]
        got = rope_quant_cache_triton(*a, out=outs, **kw, config=CFG)
        bits = lambda t: t.view(torch.uint8) if t.dtype == FP8 else t
        bad += sum(int(not torch.equal(bits(x), bits(y))) for x, y in zip(got, ref) if x.numel())
        bad += sum(int(not torch.equal(bits(x), bits(y))) for x, y in zip((a[28], a[29]), want))
    if q_so:
        bad += int(ref[2].stride() != (T, 1, (B or 1) * T))  # q_so [2, 0, 1]: H, then B, then S
    res.append(dict(case=f"fp8={fp8}/{cdt} skip={neg_skip} paged={paged} need_k={need_k} store_kq={store_kq} n={n} B={B} "
                         f"rot={rot} neox={neox} q_so={q_so}", bad=bad))
run(False, False, False, True, False, "bf16", 7)
run(False, True, True, False, False, "bf16", 5)
run(True, True, True, False, False, "u8", 7)
run(True, False, False, True, True, "fp8", 6)
run(False, False, False, True, False, "bf16", 7, B=2)  # [B, H, max_len, D] (StaticCache) caches
run(True, True, False, False, False, "u8", 5, B=3)
run(True, False, True, True, True, "fp8", 6, rot=16, neox=False)  # gpt-j, partial rotary, fp8 cache
run(False, True, False, True, False, "bf16", 7, rot=16)  # neox partial rotary, bf16 cache
run(True, False, False, True, True, "fp8", 6, B=2, q_so=[2, 0, 1])  # dynamic q, its scale H-major
print(json.dumps(res))
"""


@pytest.mark.parametrize("cfg", _INTERP_CONFIGS[:3], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_cache_kernel_under_triton_interpreter(cfg):
    """The cache write in the kernel (k rope/fp8, v, fp8 v, uint8/fp8 caches, slot < 0 skipped or
    wrapped, fewer slots than tokens, [B, H, max_len, D] StaticCache caches, partial rotary, gpt-j)
    is bit-exact vs the reference on both paths (SPLIT, small head blocks); untouched rows stay."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _INTERP_CACHE, json.dumps(cfg)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(res) == 9 and not [c for c in res if c["bad"]], res


_PTR_NAMES = {"pos_ptr": "*i64", "slot_ptr": "*i64", "vscale_ptr": "*fp32", "qscale_ptr": "*fp32", "kscale_ptr": "*fp32", "qs_ptr": "*fp32", "ks_ptr": "*fp32",
              "qq_ptr": "*fp8e4nv", "kq_ptr": "*fp8e4nv"}
_FLOAT_ARGS = set("one q_static qc0 qc1 qc2 qc3 k_static kc0 kc1 kc2 kc3 qmin qmax q_eps k_eps woff v_static v_qmin "
                  "v_qmax".split())


def _sm90_ptx(dt: str = "bf16", asm: str = "ptx", **over: Any) -> str:
    """PTX of the rope kernel compiled for sm_90 (no GPU needed) with constexprs `over` replacing the
    defaults (D = ROT = 128 neox, q static fp8, 16 heads per program); skips where it cannot build."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget

    from fxfuse.kernels import rope_quant as rq

    code = 1 if dt == "bf16" else 2
    const = dict(D=128, ROT=128, NEOX=True, COS_HALF=False, OUT_DT=code, HAS_POS=False, Q_NORM=False, K_NORM=False,
                 X_DT=code, NORM_DT=code, WSUM_DT=-1, ROUND_BEFORE_W=True, NEED_Q=True, Q_QUANT=1, Q_SCALE_T=True,
                 Q_MUL=False, QOP0=-1, QOP1=-1, QOP2=-1, QOP3=-1, NEED_K=True, K_QUANT=0, K_SCALE_T=False,
                 K_MUL=False, KOP0=-1, KOP1=-1, KOP2=-1, KOP3=-1, HAS_K=True, BLOCK_H=16, BLOCK_D=128, NATIVE=True,
                 HAS_CACHE=False, NEG_SKIP=False, K_CACHE_FP8=False, K_CACHE_U8=False, V_CACHE_U8=False, STORE_KQ=True,
                 V_QUANT=False, V_SCALE_T=False, V_MUL=False, SLOT_BY_S=False, SPLIT=0, BLOCK_P=1,
                 BLOCK_P2=0)
    const.update(over)
    sig = {}
    for name in inspect.signature(rq._rope_quant_kernel.fn).parameters:
        if name in const:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = _PTR_NAMES.get(name, "*" + dt)
        else:
            sig[name] = "fp32" if name in _FLOAT_ARGS else "i32"
    try:
        k = triton.compile(triton.compiler.ASTSource(fn=rq._rope_quant_kernel, signature=sig, constexprs=const),
                           target=GPUTarget("cuda", 90, 32))
    except Exception as e:  # no NVIDIA backend / ptxas in this install
        pytest.skip(f"cannot compile for sm_90 here: {type(e).__name__}: {str(e)[:200]}")
    return k.asm[asm]


@pytest.mark.parametrize("split", [0, 1, 2])
def test_kernel_dynamic_amax_is_one_reduction(split):
    """Dynamic per-head fp8 scales of q and k: one integer max per amax, giving the value and the
    NaN together (a float max plus a NaN-flag max was two reductions and ~20% more instructions).
    The SPLIT=1 path takes one amax per rotated half (2 per tensor); the other paths one per tensor."""
    ttgir = _sm90_ptx("bf16", asm="ttgir", SPLIT=split, BLOCK_H=8, NEED_Q=False, NEED_K=False, Q_QUANT=2,
                      K_QUANT=2, Q_SCALE_T=False, K_SCALE_T=False, QOP0=3, KOP0=3)
    per_tensor = 2 if split == 1 else 1
    assert ttgir.count('"tt.reduce"') == 2 * per_tensor, ttgir.count('"tt.reduce"')
    assert "arith.maxsi" in ttgir or "arith.maxui" in ttgir


@pytest.mark.parametrize("split", [0, 1, 2])
@pytest.mark.parametrize("dt", ["bf16", "fp16"])
def test_kernel_ptx_keeps_product_rounding(dt, split):
    """Compiled for sm_90 (no GPU needed): eager rounds x*cos and rot(x)*sin to the out dtype before
    the sum, so no fma may appear (LLVM narrowed the product to bf16 and contracted it into
    fma.rn.bf16: 1-ulp differences in many elements on the H100)."""
    ptx = _sm90_ptx(dt, SPLIT=split)
    assert "fma." not in ptx, [ln for ln in ptx.splitlines() if "fma." in ln][:4]
    pt = "bf16" if dt == "bf16" else "f16"
    assert ptx.count(f"cvt.rn.{pt}.f32") + ptx.count(f"cvt.rn.{pt}x2.f32") > 0


def test_kernel_ptx_qk_norm_normalizes_each_element_once():
    """QK-norm on the SPLIT paths rounds each element's normalization once; the gather path also
    normalizes the reloaded partner (twice the bf16 roundings of the norm: ~50% slower than plain
    RoPE at Llama's shape on an H200). Counted in sm_90 PTX (8 heads, 1 warp as the default)."""
    def cvts(**over):
        ptx = _sm90_ptx("bf16", Q_QUANT=0, BLOCK_H=8, **over)
        return ptx.count("cvt.rn.bf16.f32") + 2 * ptx.count("cvt.rn.bf16x2.f32")

    plain = cvts(SPLIT=0)
    gather, halves, reg = (cvts(SPLIT=s, Q_NORM=True, K_NORM=True) for s in (0, 1, 2))
    # per element: the rope's 3 roundings; the norm's 2 (x * rstd, then * w), once or twice
    assert gather - plain == 2 * (halves - plain) == 2 * (reg - plain) > 0, (plain, gather, halves, reg)


def test_launch_config_symbolic_m_overrides_and_fallback(monkeypatch):
    """Config selection is pure Python on static shapes: an unbacked (symbolic) M is never branched
    on and reads as large; CONFIG_OVERRIDE < FXFUSE_ROPE_CONFIG < override; SPLIT needs a pow2 half."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from fxfuse.kernels import rope_quant as rq

    sym = ShapeEnv().create_unbacked_symint()
    llama = dict(SPLIT=0, BLOCK_H=8, num_warps=1)  # the H200 sweep's defaults
    assert rq.launch_config(128, 128, 32, 8, 0, M=sym) == rq.launch_config(128, 128, 32, 8, 0, M=16384) == llama
    assert rq.launch_config(256, 64, 16, 2, 0, M=sym) == dict(SPLIT=1, BLOCK_H=4, num_warps=2)  # partial rotary
    assert rq.launch_config(256, 64, 16, 2, 0, q_quant=rq.QUANT_DYNAMIC)["BLOCK_H"] == 8
    # QK-norm: the SPLIT path (each element normalized once); partial rotary at head_dim 256 on the
    # QK-norm sweep's best blocks (4 heads / 2 warps), full rotary at 256 on the earlier 2 / 1
    assert rq.launch_config(256, 64, 16, 2, 0, norm=True) == dict(SPLIT=1, BLOCK_H=4, num_warps=2)
    assert rq.launch_config(256, 256, 16, 2, 0, norm=True) == dict(SPLIT=2, BLOCK_H=2, num_warps=1)
    assert rq.launch_config(128, 128, 32, 8, 0, M=sym, norm=True) == dict(SPLIT=2, BLOCK_H=8, num_warps=1)  # full rotary: registers
    assert rq.launch_config(32, 24, 4, 2, 0, norm=True)["SPLIT"] == 0  # half 12: the gather path
    # SPLIT 2 (partner from registers): full rotary of a power-of-2 head_dim, else the gather path
    assert rq.launch_config(128, 128, 32, 8, 0, override={"SPLIT": 2})["SPLIT"] == 2
    assert rq.launch_config(256, 64, 16, 2, 0, override={"SPLIT": 2})["SPLIT"] == 0
    assert rq.launch_config(96, 96, 16, 2, 0, override={"SPLIT": 2})["SPLIT"] == 0
    assert rq.launch_config(128, 128, 4, 2, 0)["BLOCK_H"] == 4  # never more heads than the tensors have
    monkeypatch.setitem(rq.CONFIG_OVERRIDE, "SPLIT", 1)
    monkeypatch.setitem(rq.CONFIG_OVERRIDE, "num_warps", 2)
    monkeypatch.setenv("FXFUSE_ROPE_CONFIG", "BLOCK_H=4,num_warps=8")
    assert rq.launch_config(128, 128, 32, 8, 0, M=sym) == dict(SPLIT=1, BLOCK_H=4, num_warps=8)
    assert rq.launch_config(128, 128, 32, 8, 0, override={"BLOCK_H": 1}) == dict(SPLIT=1, BLOCK_H=1, num_warps=8)
    assert rq.launch_config(32, 24, 4, 2, 0)["SPLIT"] == 0  # half 12: the gather path
    for bad in ({"BLOCK_H": 3}, {"num_warps": 3}, {"WARPS": 4}, {"SPLIT": 3}):
        with pytest.raises(ValueError):
            rq.launch_config(128, 128, 32, 8, 0, override=bad)


def test_op_cpu_matches_reference_and_opcheck():
    from fxfuse.kernels.rope_quant import rope_quant_reference

    q, k, cos, sin, scale = hf_inputs(seed=9)
    q4, k4 = q.transpose(1, 2), k.transpose(1, 2)
    args = (q4, k4, cos.reshape(-1, 32), sin.reshape(-1, 32), None, scale.reshape(1), None, 32, True, False, BF16,
            1, 1.0, [], [], False, 2, 1.0, [1], [448.0], False, -448.0, 448.0, True, False, [0, 2, 1], [0, 1, 2])
    got = torch.ops.fxfuse.rope_quant(*args)
    ref = rope_quant_reference(*args)
    for a, b in zip(got, ref):
        assert torch.equal(a.float(), b.float())
    torch.library.opcheck(torch.ops.fxfuse.rope_quant.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def _fake_cuda_op_graph(**makers) -> tuple[fx.Graph, list[fx.Node], fx.Node]:
    """An empty FX graph whose placeholders (named as the keywords) carry fake CUDA tensors made by
    the given factories: the input side of a test that traces an fxfuse op on the CUDA path."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        vals = {name: make() for name, make in makers.items()}
    g = fx.Graph()
    ph = [g.placeholder(name) for name in vals]
    for node, v in zip(ph, vals.values()):
        node.meta["val"] = v
    return g, ph, g.output(None)


def test_cuda_path_traces_to_user_triton_kernel():
    """On CUDA the op must trace (functionalized) to triton_kernel_wrapper_functional; fake CUDA tensors."""
    from fxfuse.fx_utils import insert_traced

    g, ph, out = _fake_cuda_op_graph(
        q=lambda: torch.empty(2, 4, 5, 32, dtype=BF16, device="cuda").transpose(1, 2),
        k=lambda: torch.empty(2, 5, 2, 32, dtype=BF16, device="cuda"),
        c=lambda: torch.empty(64, 32, dtype=BF16, device="cuda"),
        p=lambda: torch.empty(10, dtype=torch.int64, device="cuda"),
    )

    def repl(q, k, c, p):
        return torch.ops.fxfuse.rope_quant(q, k, c, c, p, None, None, 32, True, False, BF16, 2, 1.0, [1], [448.0],
                                           False, 0, 1.0, [], [], False, -448.0, 448.0, False, True, [0, 2, 1], [0, 1, 2])

    outs = insert_traced(g, repl, ph, before=out, functionalize=True)
    targets = {n.target for n in g.nodes if n.op == "call_function"}
    assert torch.ops.higher_order.triton_kernel_wrapper_functional in targets
    assert not any("fxfuse" in str(t) for t in targets)
    assert len(outs) == 6
    assert_full_signatures(n for n in g.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional)


def _fake_cuda_kv_graph(fp8: bool = False, read_after: bool = False) -> fx.GraphModule:
    """The functional graph AOTAutograd gives a RoPE + index_put_ KV-cache write on CUDA (fake tensors):
    index_put results copied back into the cache inputs by final copy_ nodes (read_after: the new
    caches are also read, as attention over the whole cache reads them)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fxfuse.fx_utils import trace_aten

    def rot(x):  # narrow, not x[...]: Python indexing of fake CUDA tensors needs a CUDA build
        h = x.shape[-1] // 2
        return torch.cat((-x.narrow(-1, h, h), x.narrow(-1, 0, h)), dim=-1)

    def model(q, k, v, cc, sc, pos, slots, kc, vc, ks, vs):
        cos, sin = cc.index_select(0, pos).unsqueeze(-2), sc.index_select(0, pos).unsqueeze(-2)
        qe = q * cos + rot(q) * sin
        ke = k * cos + rot(k) * sin
        if fp8:
            ke, v = q_static(ke, ks)[0], q_static(v, vs)[0]
        kc.index_put_((slots,), ke)
        vc.view(-1, *v.shape[1:]).index_put_((slots,), v)
        if read_after:
            qe = qe + (kc.view(torch.uint8).float().sum() if fp8 else kc.float().sum()).to(qe.dtype)
            qe = qe * (vc.view(torch.uint8).float().amax() if fp8 else vc.float().amax()).to(qe.dtype)
        return qe, kc, vc

    dt = FP8 if fp8 else BF16
    with FakeTensorMode():
        e = lambda *shape, d=BF16: torch.empty(*shape, dtype=d, device="cuda")  # noqa: E731
        args = (e(7, 32, 128), e(7, 8, 128), e(7, 8, 128), e(64, 128), e(64, 128), e(7, d=torch.int64),
                e(7, d=torch.int64), e(64, 8, 128, d=dt), e(4, 16, 8, 128, d=dt), e(1, d=torch.float32),
                e(1, d=torch.float32))
    gm = trace_aten(model, args, functionalize=True)
    g = gm.graph
    out = next(iter(reversed(g.nodes)))
    ph = [n for n in g.nodes if n.op == "placeholder"]
    qe, nk, nv = out.args[0]
    with g.inserting_before(out):
        for dst, src in ((ph[7], nk), (ph[8], nv)):  # the input-mutation epilogue
            g.call_function(torch.ops.aten.copy_.default, (dst, src)).meta["val"] = dst.meta["val"]
    out.args = ((qe,),)
    g.eliminate_dead_code()
    return gm


@pytest.mark.parametrize("fp8,read_after", [(False, False), (True, False), (False, True), (True, True)])
def test_kv_cache_cuda_path_reinplaces_the_caches(sm90_target, fp8, read_after):
    """CUDA (fake): the fused op traces to triton_kernel_wrapper_functional that clones exactly the
    caches and its own outputs; the final copy_ nodes read its results; Inductor's reinplace pass
    (which runs after the pre-pass) then drops the cache clones and the copy_ nodes: no full-cache copy."""
    from torch._inductor.fx_passes.reinplace import reinplace_inplaceable_ops_core

    gm = _fake_cuda_kv_graph(fp8, read_after)
    fxfuse.counters.clear()
    try:
        fxfuse.FusionPasses(options={"gate": False}, strict=True)(gm.graph)
    except RuntimeError as e:
        pytest.skip(f"no NVIDIA Triton backend here: {e}")
    assert fxfuse.counters["rope_quant"] == 1
    assert "+kv_cache" in fxfuse.report().fusions[0].detail
    g = gm.graph
    (twf,) = [n for n in g.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
    ph = [n for n in g.nodes if n.op == "placeholder"]
    kw = twf.kwargs["kwargs"]
    assert kw["kc_ptr"] is ph[7] and kw["vc_ptr"] is ph[8]
    clones = set(twf.kwargs["tensors_to_clone"])
    assert {"kc_ptr", "vc_ptr"} <= clones
    assert not clones & {"q_ptr", "k_ptr", "v_ptr", "slot_ptr", "cos_ptr", "sin_ptr"}, clones
    copies = [n for n in g.nodes if n.target is torch.ops.aten.copy_.default]
    assert len(copies) == 2 and all(c.args[1].args[0] is twf for c in copies)
    assert not any(n.target is torch.ops.aten.index_put.default for n in g.nodes)
    readers = [u for c in copies for u in c.args[1].users if u is not c]
    assert bool(readers) == read_after, readers  # reads of the new caches read the op's outputs
    reinplace_inplaceable_ops_core(g)
    assert not {"kc_ptr", "vc_ptr"} & set(twf.kwargs["tensors_to_clone"]), twf.kwargs["tensors_to_clone"]
    assert not any(n.target is torch.ops.aten.copy_.default for n in g.nodes)


def test_static_cache_cuda_path_reinplaces_the_caches(sm90_target):
    """CUDA (fake): a [B, H, max_len, D] (StaticCache) write read by attention afterwards traces to the
    user Triton kernel with SLOT_BY_S and batch strides; reinplacing drops the cache clones and copy_."""
    from torch._inductor.fx_passes.reinplace import reinplace_inplaceable_ops_core
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fxfuse.fx_utils import trace_aten

    def rot(x):
        h = x.shape[-1] // 2
        return torch.cat((-x.narrow(-1, h, h), x.narrow(-1, 0, h)), dim=-1)

    def model(q, k, v, cos, sin, cpos, kc, vc):
        c, s_ = cos.unsqueeze(1), sin.unsqueeze(1)
        qe, ke = q * c + rot(q) * s_, k * c + rot(k) * s_
        torch.ops.aten.index_put_(kc, [None, None, cpos], ke)  # index_copy_(2, ...) as Inductor decomposes it
        torch.ops.aten.index_put_(vc, [None, None, cpos], v)
        return qe + kc.float().sum().to(qe.dtype) * vc.float().amax().to(qe.dtype), kc, vc

    with FakeTensorMode():
        e = lambda *shape, d=BF16: torch.empty(*shape, dtype=d, device="cuda")  # noqa: E731
        args = (e(2, 3, 32, 128).transpose(1, 2), e(2, 3, 8, 128).transpose(1, 2), e(2, 3, 8, 128).transpose(1, 2),
                e(2, 3, 128), e(2, 3, 128), e(3, d=torch.int64), e(2, 8, 64, 128), e(2, 8, 64, 128))
    gm = trace_aten(model, args, functionalize=True)
    g = gm.graph
    out = next(iter(reversed(g.nodes)))
    ph = [n for n in g.nodes if n.op == "placeholder"]
    qe, nk, nv = out.args[0]
    with g.inserting_before(out):
        for dst, src in ((ph[6], nk), (ph[7], nv)):
            g.call_function(torch.ops.aten.copy_.default, (dst, src)).meta["val"] = dst.meta["val"]
    out.args = ((qe,),)
    g.eliminate_dead_code()
    fxfuse.counters.clear()
    try:
        fxfuse.FusionPasses(options={"gate": False}, strict=True)(g)
    except RuntimeError as ex:
        pytest.skip(f"no NVIDIA Triton backend here: {ex}")
    assert fxfuse.counters["rope_quant"] == 1 and "+kv_cache" in fxfuse.report().fusions[0].detail, fxfuse.report()
    (twf,) = [n for n in g.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
    kw = twf.kwargs["kwargs"]
    assert kw["kc_ptr"] is ph[6] and kw["vc_ptr"] is ph[7] and kw["SLOT_BY_S"] is True
    assert (kw["skc"], kw["skc_h"], kw["skc_b"], kw["n_slots"]) == (128, 64 * 128, 8 * 64 * 128, 64), kw
    assert not any(n.target is torch.ops.aten.index_put.default for n in g.nodes)
    reinplace_inplaceable_ops_core(g)
    assert not {"kc_ptr", "vc_ptr"} & set(twf.kwargs["tensors_to_clone"]), twf.kwargs["tensors_to_clone"]
    assert not any(n.target is torch.ops.aten.copy_.default for n in g.nodes)


def test_cuda_rope_op_clones_only_its_outputs(sm90_target):
    """Inductor's mutation analysis of the kernel (TTIR for sm_90) sees stores only to the op's own
    outputs: the inputs are not cloned (it needs every kernel argument passed explicitly)."""
    from fxfuse.fx_utils import insert_traced

    g, ph, out = _fake_cuda_op_graph(
        q=lambda: torch.empty(1, 7, 32, 128, dtype=BF16, device="cuda"),
        k=lambda: torch.empty(1, 7, 8, 128, dtype=BF16, device="cuda"),
        c=lambda: torch.empty(64, 128, dtype=BF16, device="cuda"),
        p=lambda: torch.empty(7, dtype=torch.int64, device="cuda"),
    )

    def repl(q, k, c, p):
        return torch.ops.fxfuse.rope_quant(q, k, c, c, p, None, None, 128, True, False, BF16, 0, 1.0, [], [],
                                           False, 0, 1.0, [], [], False, -448.0, 448.0, True, True, [0, 1, 2], [0, 1, 2])

    try:
        insert_traced(g, repl, ph, before=out, functionalize=True)
    except RuntimeError as e:
        pytest.skip(f"no NVIDIA Triton backend here: {e}")
    (twf,) = [n for n in g.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
    assert set(twf.kwargs["tensors_to_clone"]) <= {"qo_ptr", "ko_ptr", "qq_ptr", "kq_ptr", "qs_ptr", "ks_ptr"}, \
        twf.kwargs["tensors_to_clone"]


def test_kv_cache_write_gate_on_cuda(tmp_path, monkeypatch):
    """On CUDA the cache write ships where a GPU benchmark recorded it faster (head_dim 128, measured
    on H200 2026-12-01); with that class unmeasured it is a near miss naming the class, the RoPE
    alone still fuses and the index_put stays with Inductor."""
    from fxfuse import gating

    for cls in ("M<=16", "M<=256", "M>=4096"):
        assert not gating.rejects("rope_quant", scheme=f"rope_kvcache/{cls}", hidden=128, dtype=BF16)
        assert not gating.rejects("rope_quant", scheme=f"rope_fp8_static_kvcache/{cls}", hidden=128, dtype=BF16)
    gm = _fake_cuda_kv_graph()
    fxfuse.counters.clear()
    fxfuse.passes(gm.graph)
    assert fxfuse.counters["rope_quant"] == 1 and "+kv_cache" in fxfuse.report().fusions[0].detail

    table = json.loads(gating.GATES_PATH.read_text())
    table["rope_quant"]["rope_kvcache/M<=16"] = {}  # the graph's 7 tokens
    # RoPE alone at decode sizes is gated off in the shipped table (in-model profile); measured on here
    # so the fallback to RoPE alone shows
    table["rope_quant"]["rope/M<=16"] = {"128": 1.42}
    path = tmp_path / "gates.json"
    path.write_text(json.dumps(table))
    monkeypatch.setattr(gating, "GATES_PATH", path)
    gating.reload()
    try:
        gm = _fake_cuda_kv_graph()
        fxfuse.counters.clear()
        fxfuse.report.clear()
        fxfuse.passes(gm.graph)
        r = fxfuse.report()
        assert fxfuse.counters["rope_quant"] == 1 and "+kv_cache" not in r.fusions[0].detail
        why = [m.reason for m in r.near_misses if "KV-cache" in m.reason]
        assert why and "rope_kvcache/M<=16" in why[0], [m.reason for m in r.near_misses]
        assert any(n.target is torch.ops.aten.index_put.default for n in gm.graph.nodes)
    finally:
        monkeypatch.undo()
        gating.reload()


def test_write_gates_merges_the_cache_classes(tmp_path, monkeypatch):
    """bench_rope_quant.py --cache results fill only the rope_*_kvcache classes; the measured RoPE
    classes stay; a class measured slower than stock stays off on CUDA."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("write_gates", REPO / "benchmarks" / "write_gates.py")
    wg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wg)
    gates = tmp_path / "gates.json"
    gates.write_text((REPO / "fxfuse" / "gates.json").read_text())
    res = tmp_path / "rope_cache.json"
    res.write_text(json.dumps({"family": "rope_quant", "gpu": "H100", "date": "d", "torch": "t", "gates_merge": True,
                               "gates": {"rope_kvcache/M<=16": {"128": 1.7},
                                         "rope_fp8_static_kvcache/M>=4096": {"128": 0.9}}}))
    monkeypatch.setattr(wg, "GATES", gates)
    monkeypatch.setattr(sys, "argv", ["write_gates.py", str(res)])
    wg.main()
    table = json.loads(gates.read_text())["rope_quant"]
    before = json.loads((REPO / "fxfuse" / "gates.json").read_text())["rope_quant"]
    assert table["rope_kvcache/M<=16"] == {"128": 1.7} and table["rope_fp8_static_kvcache/M>=4096"] == {"128": 0.9}
    assert all(table[k] == v for k, v in before.items() if k not in ("rope_kvcache/M<=16",
                                                                      "rope_fp8_static_kvcache/M>=4096"))
    # a result of the old form (one figure per head_dim over every M) and no cases: refused, not
    # written under keys the pattern no longer reads
    res.write_text(json.dumps({"family": "rope_quant", "gates_merge": True, "gates": {"rope_kvcache": {"128": 1.7}}}))
    with pytest.raises(SystemExit, match="M class"):
        wg.main()


def _write_gates_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("write_gates", REPO / "benchmarks" / "write_gates.py")
    wg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wg)
    return wg


def test_write_gates_rope_classes_from_the_bench_summary(tmp_path, monkeypatch):
    """The rope gates are keyed "<scheme>/<M class>" per head_dim: from the H200 quick bench they are
    its summary's geomean_speedup_vs_compile "<head_dim>/<M class>" figures (so a class measured
    slower than stock, hidden before in a geomean over every M, gates that class off), and the
    --cache result (no summary) adds its kvcache classes from its cases."""
    wg = _write_gates_module()
    main = json.loads((REPO / "benchmarks" / "results" / "rope_quant_h200_quick.json").read_text())
    got = wg.gates_from(main)
    summ = main["summary"]["geomean_speedup_vs_compile"]
    want = {f"{sch}/{key.split('/', 1)[1]}": {} for sch, per in summ.items() for key in per}
    for sch, per in summ.items():
        for key, x in per.items():
            hd, cls = key.split("/", 1)
            want[f"{sch}/{cls}"][hd] = x
    assert set(got) == {"rope_quant", "_source", "_merge"}
    assert {k: v for k, v in got["rope_quant"].items() if "/M" in k} == want
    assert set(got["rope_quant"]) - set(want) == set(summ)  # + the per-scheme geomean over every M
    # a class slower than stock (the M >= 4096 QK-norm figure of a later H200 run) is a class of its own
    rows = [dict(r) for r in main["cases"]]
    for r in rows:
        if r["scheme"] == "rope_qknorm" and r["head_dim"] == 128 and r["M"] >= 4096:
            r["speedup_vs_compile"] = dict(r["speedup_vs_compile"], fused=0.823)
    slow = wg.gates_from(dict(main, cases=rows))
    slow = slow["rope_quant"]
    assert slow["rope_qknorm/M>=4096"]["128"] == 0.823 and slow["rope_qknorm/M<=16"]["128"] > 1
    cache = wg.gates_from(json.loads((REPO / "benchmarks" / "results" / "rope_quant_cache_h200.json").read_text()))
    assert cache["_merge"] and set(cache["rope_quant"]) == {
        f"{s}{c}" for s in ("rope_kvcache", "rope_fp8_static_kvcache") for c in ("", "/M<=16", "/M<=256", "/M>=4096")}
    # both results, the main one first: every class the pattern reads, and nothing else
    gates = tmp_path / "gates.json"
    gates.write_text((REPO / "fxfuse" / "gates.json").read_text())
    monkeypatch.setattr(wg, "GATES", gates)
    monkeypatch.setattr(sys, "argv", ["write_gates.py", str(REPO / "benchmarks" / "results" / "rope_quant_h200_quick.json"),
                                      str(REPO / "benchmarks" / "results" / "rope_quant_cache_h200.json")])
    wg.main()
    assert set(json.loads(gates.read_text())["rope_quant"]) == set(json.loads((REPO / "fxfuse" / "gates.json").read_text())[
        "rope_quant"])


def _fake_cuda_rope_graph(T: int | None) -> fx.GraphModule:
    """RoPE of q [T, 32, 128] and k [T, 8, 128] by a cos/sin table and positions, traced on fake CUDA
    tensors; T an int (static token count) or None (a symbolic one, hint 4096)."""
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    from fxfuse.fx_utils import trace_aten

    def rot(x):  # narrow, not x[...]: Python indexing of fake CUDA tensors needs a CUDA build
        h = x.shape[-1] // 2
        return torch.cat((-x.narrow(-1, h, h), x.narrow(-1, 0, h)), dim=-1)

    def model(q, k, cc, sc, pos):
        cos, sin = cc.index_select(0, pos).unsqueeze(-2), sc.index_select(0, pos).unsqueeze(-2)
        return q * cos + rot(q) * sin, k * cos + rot(k) * sin

    env = ShapeEnv()
    with FakeTensorMode(shape_env=env):
        if T is None:
            T = env.create_symintnode(env.create_symbol(4096, ConstantSource("T"), dynamic_dim=DimDynamic.DYNAMIC),
                                      hint=4096)
        e = lambda *shape, d=BF16: torch.empty(*shape, dtype=d, device="cuda")  # noqa: E731
        args = (e(T, 32, 128), e(T, 8, 128), e(64, 128), e(64, 128), e(T, d=torch.int64))
    return trace_aten(model, args, functionalize=True)


@pytest.mark.parametrize("T,large,fuses", [(7, 0.82, True), (256, 0.82, True), (1000, 0.82, False),
                                           (4096, 0.82, False), (9000, 0.82, False), (None, 0.82, False),
                                           (None, 1.01, True)],
                         ids=["M7", "M256", "M1000", "M4096", "M9000", "symbolic-slow", "symbolic-all-ok"])
def test_rope_gate_by_m_class(sm90_target, monkeypatch, T, large, fuses):
    """CUDA gates are keyed by (scheme, head_dim, M class): a static M ships where its class measured
    >= 1x stock, and a class measured slower is a near miss naming the class and the ratio while the
    other classes still fuse; a symbolic M ships only if every class of that head_dim passed."""
    from fxfuse import gating
    table = {"rope_quant": {"rope": {"128": 1.19}, "rope/M<=16": {"128": 1.39}, "rope/M<=256": {"128": 1.22},
                            "rope/M>=4096": {"128": large}}}  # "rope": the geomean over M, which hid the 0.82x
    monkeypatch.setattr(gating, "_table", lambda: table)
    gm = _fake_cuda_rope_graph(T)
    fxfuse.counters.clear()
    fxfuse.report.clear()
    fxfuse.passes(gm.graph)
    r = fxfuse.report()
    assert fxfuse.counters["rope_quant"] == int(fuses), r.near_miss_lines()
    why = [m.reason for m in r.near_misses if m.family == "rope_quant"]
    if fuses:
        assert not why, why
    else:
        assert len(why) == 1 and "rope/M>=4096" in why[0] and "0.82x" in why[0] and "hidden=128" in why[0], why
        assert ("symbolic" in why[0]) == (T is None), why
        assert not any(n.target is torch.ops.higher_order.triton_kernel_wrapper_functional for n in gm.graph.nodes)
    # an unmeasured class is off too, with its name in the reason
    del table["rope_quant"]["rope/M<=256"]
    gm = _fake_cuda_rope_graph(T)
    fxfuse.counters.clear()
    fxfuse.report.clear()
    fxfuse.passes(gm.graph)
    off = T is None or T in (256, 1000)  # 1000: between the classes, both neighbours must pass
    assert fxfuse.counters["rope_quant"] == int(fuses and not off)
    if off:
        why = [m.reason for m in fxfuse.report().near_misses if m.family == "rope_quant"]
        assert why and ("rope/M<=256" in why[0] or "rope/M>=4096" in why[0]), why


@pytest.mark.parametrize("T,fuses", [(7, False), (256, True)])
def test_shipped_gate_plain_rope_off_at_decode(sm90_target, T, fuses):
    """The shipped table gates plain RoPE off at M <= 16 (the in-model H200 profile: stock folds the
    rotation into the attention prologue, benchmarks/in_model_gates.py) and on at M <= 256."""
    from fxfuse import gating

    gating.reload()
    gm = _fake_cuda_rope_graph(T)
    fxfuse.counters.clear()
    fxfuse.report.clear()
    fxfuse.passes(gm.graph)
    assert fxfuse.counters["rope_quant"] == int(fuses), fxfuse.report().near_miss_lines()
    if not fuses:
        why = [m.reason for m in fxfuse.report().near_misses if m.family == "rope_quant"]
        assert why and "rope/M<=16" in why[0], why


# ------------------------------------------------------------------ GPU: user Triton kernel in the output code
UNGATED = fxfuse.FusionPasses(options={"gate": False})


def _cuda(args):
    return tuple(a.cuda() for a in args)


def _compiled_with_code(fn, args):
    """fn compiled with the ungated passes in a fresh cache (counters cleared first): its outputs
    on `args` and Inductor's output code, joined."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    fxfuse.counters.clear()
    with fresh_cache(), torch.no_grad():
        out, codes = run_and_get_code(torch.compile(fn, options={"post_grad_custom_pre_pass": UNGATED}), *args)
    return out, "\n".join(codes)


@pytest.mark.parametrize("qq,kq", [("none", "none"), ("static", "static"), ("dynamic", "dynamic"), ("static", "none")])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kernel_in_output_code(qq, kq):
    fn = make_hf(qq, kq)
    args = _cuda(hf_inputs(B=2, S=33, HQ=32, HK=8, D=128, seed=11))
    with torch.no_grad():
        ref = fn(*args)
    out, code = _compiled_with_code(fn, args)
    assert fxfuse.counters["rope_quant"] == 1, fxfuse.report()
    assert "_rope_quant_kernel" in code and "@triton.jit" in code
    assert "torch.ops.fxfuse" not in code
    check_close(out, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_table_partial_dynamic_cudagraphs():
    compiled = torch.compile(table_model, options={"post_grad_custom_pre_pass": UNGATED, "triton.cudagraphs": True})
    torch._dynamo.reset()
    fxfuse.counters.clear()
    with fresh_cache(), torch.no_grad():
        for T in (1, 7, 300, 7):
            args = _cuda(table_inputs(T=T, HQ=32, HK=8, D=128, seed=T))
            for a in (0, 1, 4):
                torch._dynamo.mark_dynamic(args[a], 0)
            out = [t.clone() for t in compiled(*args)]
            check_close(out, table_model(*args))
        q, k, cos, sin, scale = _cuda(hf_inputs(B=2, S=9, HQ=16, HK=2, D=256, seed=12))
        pargs = (q, k, cos[..., :64].contiguous(), sin[..., :64].contiguous(), scale)
        out = torch.compile(partial_model, options={"post_grad_custom_pre_pass": UNGATED})(*pargs)
        check_close(out, partial_model(*pargs))
    assert fxfuse.counters["rope_quant"] >= 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kernel_matches_reference_bitwise():
    from fxfuse.kernels.rope_quant import rope_quant_reference, rope_quant_triton

    q, k, cos, sin, scale = _cuda(hf_inputs(B=3, S=17, HQ=32, HK=8, D=128, seed=13))
    q4, k4 = q.transpose(1, 2), k.transpose(1, 2)
    args = (q4, k4, cos.reshape(-1, 128), sin.reshape(-1, 128), None, scale.reshape(1), None, 128, True, False, BF16,
            1, 1.0, [], [], False, 2, 1.0, [1, 3], [448.0, 1e-6], False, -448.0, 448.0, True, True, [0, 2, 1], [0, 1, 2])
    got = rope_quant_triton(*args)
    ref = rope_quant_reference(*args)
    for i, (a, b) in enumerate(zip(got, ref)):
        if a.dtype == FP8:  # per-element fast division (as Inductor emits `/`): allow rare 1-ulp flips
            frac = (a.float() != b.float()).float().mean().item()
            assert frac < 1e-3, (i, frac)
        else:  # rotated q/k (each product rounded like eager) and the scales: bit for bit
            bad = (a.view(torch.int16 if a.element_size() == 2 else torch.int32)
                   != b.view(torch.int16 if b.element_size() == 2 else torch.int32))
            assert not bad.any(), (i, bad.float().mean().item())


@pytest.mark.parametrize("qq", ["none", "dynamic"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_gpt_oss_chunk_form_in_output_code(qq):
    """GPT-OSS's RoPE (torch.chunk halves, half-width cos/sin) at its shape (64/8 heads x 64): one
    user Triton kernel in Inductor's output code, outputs as eager's."""
    go = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")

    def fn(q, k, cos, sin, scale):
        qe, ke = go.apply_rotary_pos_emb(q, k, cos, sin)
        return (*QUANTS[qq](qe, scale), ke)

    q, k, cos, sin, scale = _cuda(hf_inputs(B=2, S=33, HQ=64, HK=8, D=64, seed=14))
    args = (q, k, cos[..., :32].contiguous(), sin[..., :32].contiguous(), scale)
    with torch.no_grad():
        ref = fn(*args)
    out, code = _compiled_with_code(fn, args)
    assert fxfuse.counters["rope_quant"] == 1, fxfuse.report()
    assert "_rope_quant_kernel" in code and "torch.ops.fxfuse" not in code
    check_close(out, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_qk_norm_eps_from_tensors():
    """QK-norm eps read from one-element tensors (dynamic=True's lifted attribute): the kernel's
    outputs equal the reference's with the same tensors, and differ from the baked constants'."""
    from fxfuse.kernels.rope_quant import rope_quant_reference, rope_quant_triton

    g = torch.Generator(device="cuda").manual_seed(15)
    q = torch.randn(2, 9, 16, 128, device="cuda", generator=g).to(BF16)
    k = torch.randn(2, 9, 4, 128, device="cuda", generator=g).to(BF16)
    cos, sin = (torch.randn(18, 128, device="cuda", generator=g).to(BF16) for _ in range(2))
    wq, wk = ((1 + 0.2 * torch.randn(128, device="cuda", generator=g)).to(BF16) for _ in range(2))
    args = (q, k, cos, sin, None, None, None, 128, True, False, BF16, 2, 1.0, [1], [448.0], False, 0, 1.0, [], [],
            False, -448.0, 448.0, True, True, [0, 1, 2], [0, 1, 2], wq, wk, 1e-6, 1e-6, 0.0, True, None, BF16)
    kw = dict(q_eps_tensor=torch.tensor([0.37], device="cuda"), k_eps_tensor=torch.tensor(0.5, device="cuda"))
    ref = rope_quant_reference(*args, **kw)
    got = rope_quant_triton(*args, **kw, out=[torch.full_like(t, 7.0) if t.dtype != FP8 else
                                              torch.full(t.shape, 7.0, device="cuda").to(FP8) for t in ref])
    baked = rope_quant_triton(*args)
    for a, b in zip(got, ref):
        if a.numel() and a.dtype != FP8:
            assert ((a.double() - b.double()).norm() / b.double().norm()).item() < 1e-2
    for i in (0, 3):  # q (eps 0.37) and k (0.5) against eps 1e-6: rstd 15-18% apart on unit-variance heads
        assert ((baked[i].double() - got[i].double()).norm() / got[i].double().norm()).item() > 0.05, i


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_complex_form_in_output_code():
    args = _cuda(complex_inputs(B=2, S=33, D=128, seed=4))
    with torch.no_grad():
        ref = complex_model(*args)
    out, code = _compiled_with_code(complex_model, args)
    assert fxfuse.counters["rope_quant"] == 1, fxfuse.report()
    assert "_rope_quant_kernel" in code and "torch.ops.fxfuse" not in code
    for o, r in zip(out, ref):  # fp32 complex product: CUDA may contract into FMAs (1-ulp fp32 differences)
        assert ((o.double() - r.double()).norm() / r.double().norm()).item() < 1e-3


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kv_cache_write_in_output_code(fp8):
    """The cache write runs inside the fused kernel; Inductor reinplaced the caches (no full-cache
    clone or copy back), and the caches equal eager's."""
    from torch._inductor.utils import run_and_get_code

    args = _cuda(kv_inputs(T=29, seed=31, fp8=fp8, HQ=32, HK=8, D=128))
    extra = _cuda((torch.tensor(0.02), torch.tensor(0.03))) if fp8 else ()
    fn = kv_fp8_model if fp8 else kv_write_model
    eager = [a.clone() for a in args]
    with torch.no_grad():
        ref = fn(*eager, *extra)
    torch._dynamo.reset()
    fxfuse.counters.clear()
    with fresh_cache(), torch.no_grad():
        out, codes = run_and_get_code(torch.compile(fn, options={"post_grad_custom_pre_pass": UNGATED}), *args, *extra)
    assert fxfuse.counters["rope_quant"] == 1 and "+kv_cache" in fxfuse.report().fusions[0].detail, fxfuse.report()
    code = "\n".join(codes)
    assert "_rope_quant_kernel" in code and "torch.ops.fxfuse" not in code
    # no ATen index_put left (fallback call or Inductor kernel; the Triton kernel's own docstring
    # mentions index_put, so match calls and kernel names only) and no copy back into the caches
    assert not re.search(r"aten\.index_put|fused_index_put|index_put_\(|\.copy_\(", code)
    for c in args[7:9]:  # no buffer the size of a cache: no clone of it
        assert f"empty_strided_cuda({tuple(c.shape)}" not in code, tuple(c.shape)
    check_close((out,), (ref,))
    for got, want in zip(args[7:9], eager[7:9]):
        assert torch.equal(_bits(got), _bits(want))


# ------------------------------------------------------------------ _C_cache_ops::reshape_and_cache_flash unwrap
CACHE_NS = "fxfuse_rope_cache_test"
_cache_lib = torch.library.Library(CACHE_NS, "DEF")
_cache_lib.define(
    "reshape_and_cache_flash(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
    "Tensor slot_mapping, str kv_cache_dtype, Tensor k_scale, Tensor v_scale) -> ()"
)


def _ref_cache(key, value, key_cache, value_cache, slots, kv_cache_dtype, k_scale, v_scale):
    """Written independently of the shipped decomposition: a per-token loop, skipping slot < 0."""
    for c, x, sc in ((key_cache, key, k_scale), (value_cache, value, v_scale)):
        flat = c.view(-1, *c.shape[-2:])
        for t in range(slots.shape[0]):
            s = int(slots[t])
            if s < 0:
                continue
            if kv_cache_dtype == "auto":
                flat[s] = x[t].to(c.dtype)
            else:
                q8 = (x[t].float() / sc).clamp(-448.0, 448.0).to(FP8)
                flat[s] = q8.view(torch.uint8) if c.dtype == torch.uint8 else q8


_cache_lib.impl("reshape_and_cache_flash", _ref_cache, "CPU")
torch.library.register_fake(f"{CACHE_NS}::reshape_and_cache_flash", lambda *a, **k: None, lib=_cache_lib)


@pytest.mark.parametrize("kv_dtype,cache_dtype,dynamic,read_after", [
    ("auto", BF16, False, False), ("fp8", torch.uint8, False, False), ("fp8", FP8, True, False),
    ("auto", BF16, True, True), ("fp8", torch.uint8, False, True),
])
def test_reshape_and_cache_flash_unwraps_and_rope_fuses(kv_dtype, cache_dtype, dynamic, read_after):
    """The unwrapped vLLM cache op (slot < 0 skipped, rows = x[:len(slots)]) fuses into the RoPE kernel;
    read_after: attention over the whole written caches reads the fused op's cache outputs."""
    from fxfuse.patterns import unwrap as unwrap_mod
    from fxfuse.patterns import unwrap_builtin

    added = unwrap_builtin.register_builtins({"_C_cache_ops": CACHE_NS})
    try:
        assert added == [f"{CACHE_NS}::reshape_and_cache_flash.default"], added
        op = getattr(torch.ops, CACHE_NS).reshape_and_cache_flash

        def fn(q, k, v, cos_cached, sin_cached, pos, slots, kc, vc, ks, vs):
            cos, sin = cos_cached[pos].unsqueeze(-2), sin_cached[pos].unsqueeze(-2)
            qe = q * cos + rotate_half(q) * sin
            ke = k * cos + rotate_half(k) * sin
            op(ke, v, kc, vc, slots, kv_dtype, ks, vs)
            if not read_after:
                return qe
            kd, vd = (kc.view(torch.uint8).view(FP8), vc.view(torch.uint8).view(FP8)) if kv_dtype == "fp8" else (kc, vc)
            return qe, _attend(qe, kd.float() * (ks if kv_dtype == "fp8" else 1), vd.float() * (vs if kv_dtype == "fp8" else 1))

        q, k, c, s, pos, _ = table_inputs(T=6, seed=14)
        v = torch.randn_like(k)
        slots = torch.tensor([5, -1, 0, 11, -1, 3])  # padded tokens (-1) write nothing
        cdt = cache_dtype
        kc = torch.randint(0, 120, (3, 4, 2, 32), dtype=torch.uint8).view(cdt) if cdt != BF16 else torch.randn(3, 4, 2, 32).to(cdt)
        vc = kc.clone()
        scales = (torch.tensor([0.05]), torch.tensor([0.1]))
        eager = [kc.clone(), vc.clone()]
        with torch.no_grad():
            ref = fn(q, k, v, c, s, pos, slots, *eager, *scales)
        dyn = {0: 0, 1: 0, 2: 0, 5: 0, 6: 0} if dynamic else None
        out, _ = compile_and_run(fn, (q, k, v, c, s, pos, slots, kc, vc, *scales), dynamic_dims=dyn)
        assert fxfuse.counters["unwrap"] == 1 and fxfuse.counters["rope_quant"] == 1, (fxfuse.report().format(verbose=True), fxfuse.report().graphs[0].errors)
        detail = fxfuse.report().fusions[-1].detail
        assert "+kv_cache" in detail and "skip<0" in detail and ("fp8" in detail) == (kv_dtype == "fp8"), detail
        if read_after:
            _check_outs(out, ref)
        else:
            check_close((out,), (ref,))
        assert torch.equal(_bits(kc), _bits(eager[0])) and torch.equal(_bits(vc), _bits(eager[1]))
    finally:
        for key in added:
            unwrap_mod.unregister_unwrap(key)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_transformers_static_cache_in_output_code():
    """A real LlamaModel decode step with transformers' StaticCache on CUDA, gated as users get it:
    each layer's RoPE + k/v cache write is the user Triton kernel in Inductor's output code (no
    index_put / index_copy left, no Python op call), attention reads the written caches, and hidden
    states and caches match eager."""
    from torch._inductor.utils import run_and_get_code
    from transformers import LlamaConfig, LlamaModel, StaticCache

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=128, max_position_embeddings=256)
    m = LlamaModel(cfg).to("cuda", BF16).eval()
    caches = [StaticCache(config=cfg, max_cache_len=64) for _ in range(2)]
    prompt, step = torch.randint(0, 64, (1, 9), device="cuda"), torch.randint(0, 64, (1, 1), device="cuda")
    cpos = torch.arange(9, 10, device="cuda")
    with torch.no_grad():
        for c in caches:
            m(input_ids=prompt, past_key_values=c, use_cache=True, cache_position=torch.arange(9, device="cuda"))
        ref = m(input_ids=step, past_key_values=caches[0], use_cache=True, cache_position=cpos)
    torch._dynamo.reset()
    fxfuse.counters.clear()
    with fresh_cache(), torch.no_grad():
        out, codes = run_and_get_code(torch.compile(m, options={"post_grad_custom_pre_pass": fxfuse.passes}),
                                      input_ids=step, past_key_values=caches[1], use_cache=True, cache_position=cpos)
    r = fxfuse.report()
    assert fxfuse.counters["rope_quant"] == 2 and all("+kv_cache" in f.detail for f in r.fusions), r.format(verbose=True)
    code = "\n".join(codes)
    assert "_rope_quant_kernel" in code and "torch.ops.fxfuse" not in code
    assert not re.search(r"aten\.index_put|aten\.index_copy|fused_index_put|index_put_\(", code)
    assert _rel(out.last_hidden_state, ref.last_hidden_state) < 2e-2
    for le, lc in zip(caches[0].layers, caches[1].layers):
        for a, b in ((le.keys, lc.keys), (le.values, lc.values)):
            assert torch.equal(a[:, :, :9], b[:, :, :9]) and torch.equal(a[:, :, 10:], b[:, :, 10:])
            assert _rel(b[:, :, 9:10], a[:, :, 9:10]) < 2e-2 and b[:, :, 9:10].abs().sum() > 0
