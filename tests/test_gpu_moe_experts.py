"""MoE experts on CUDA: the fused kernels end up as user-defined Triton kernels in Inductor's output
code (no `torch.ops.fxfuse` fallback), match eager for both experts implementations, static and
dynamic token counts, and replay inside a CUDA graph with new routing. Run: `pytest -m gpu`."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch._inductor.utils import fresh_cache, run_and_get_code

import fxfuse
from fxfuse.kernels import moe_experts as K

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
transformers = pytest.importorskip("transformers")

UNGATED = fxfuse.FusionPasses(options={"gate": False})
KERNELS = ("_moe_decode_gate_up_kernel", "_moe_decode_gate_up_dot_kernel", "_moe_decode_routed_gate_up_kernel",
           "_moe_decode_routed_gate_up_dot_kernel", "_moe_gemm1_kernel")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _block(model: str, impl: str, dtype=torch.bfloat16, E=16, topk=4, H=256, I=128):
    from transformers import MixtralConfig, Qwen3MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    torch.manual_seed(0)
    if model == "qwen":
        cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=topk,
                             norm_topk_prob=True)
        cls = Qwen3MoeSparseMoeBlock
    else:
        cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=topk)
        cls = MixtralSparseMoeBlock
    cfg._experts_implementation = impl
    m = cls(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return m.to("cuda", dtype).eval()


def _compile_run(fn, *args, passes=UNGATED) -> tuple:
    """fn compiled with `passes` from fresh Dynamo and Inductor caches (counters and report cleared),
    run on args without grad: (output, Inductor's output code)."""
    torch._dynamo.reset()
    fxfuse.counters.clear()
    fxfuse.report.clear()
    with fresh_cache(), torch.no_grad():
        out, codes = run_and_get_code(
            torch.compile(fn, dynamic=False, options={"post_grad_custom_pre_pass": passes}), *args)
    return out, "\n".join(codes)


def _check_code(code: str) -> None:
    assert any(k in code for k in KERNELS), "fused Triton kernel not in Inductor output code"
    assert "torch.ops.fxfuse" not in code, "fused op left as a Python fallback call"
    assert "nonzero" not in code and ".item()" not in code


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("model", ["qwen", "mixtral"])
@pytest.mark.parametrize("M", [1, 64])
def test_fused_kernel_in_output_code(model, impl, M):
    m = _block(model, impl)
    x = torch.randn(1, M, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = m(x)
    out, code = _compile_run(m, x)
    assert fxfuse.counters["moe_experts"] == 1, fxfuse.report()
    _check_code(code)
    assert _rel(out, ref) < 2e-2


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_decode_routing_folded_in_output_code(impl):
    """At M=1 the router's kernel is gone from the output code (folded into kernel A), and back with
    options={"moe_fold_routing": False}; both match eager."""
    m = _block("qwen", impl)
    x = torch.randn(1, 1, 256, device="cuda", dtype=torch.bfloat16)
    outs = {}
    with torch.no_grad():
        ref = m(x)
        for fold in (True, False):
            passes = fxfuse.FusionPasses(options={"gate": False, "moe_fold_routing": fold})
            outs[fold], code = _compile_run(m, x, passes=passes)
            assert fxfuse.counters["moe_routing"] == 1 and fxfuse.counters["moe_experts"] == 1, fxfuse.report()
            assert ("_moe_decode_routed_gate_up" in code) == fold and ("_moe_routing_kernel" in code) != fold
            assert "torch.ops.fxfuse" not in code and not _weight_sized_buffers(code, 1 << 60)  # no clone/copy_
            assert _rel(outs[fold], ref) < 2e-2
    assert _rel(outs[True], outs[False]) < 1e-2


def _weight_sized_buffers(code: str, min_numel: int) -> list[str]:
    """Buffers in Inductor's output code with at least `min_numel` elements (a copy of an expert
    weight would need one; routing, activations and per-pair rows of these tests are far smaller),
    plus any explicit clone/copy_ call."""
    bad = []
    for m in re.finditer(r"empty_strided_cuda\(\(([^)]*)\)", code):
        dims = [d.strip() for d in m.group(1).split(",") if d.strip()]
        if all(d.isdigit() for d in dims) and math.prod(int(d) for d in dims) >= min_numel:
            bad.append(m.group(0))
    return bad + [ln for ln in code.splitlines() if re.search(r"\.copy_\(|\bclone\(", ln) and not ln.lstrip().startswith("#")]


@pytest.mark.parametrize("M", [1, 64])
def test_weights_not_cloned(M):
    """Triton mutation analysis must see x and the expert weights as read-only: no copies of them."""
    m = _block("qwen", "grouped_mm")
    x = torch.randn(1, M, 256, device="cuda", dtype=torch.bfloat16)
    _, code = _compile_run(m, x)
    assert re.search(r"_moe_\w*kernel\w*\.run\(", code), "no fused MoE kernel launch in the output code"
    smallest = min(p.numel() for p in m.experts.parameters() if p.dim() == 3)
    assert smallest > 4 * M * 4 * 256  # far above any routing/activation buffer of this test
    assert not _weight_sized_buffers(code, smallest), _weight_sized_buffers(code, smallest)


def test_weight_sized_buffers_detector():
    """The detector itself: a weight-sized buffer is caught; small buffers and comments are not."""
    ok = ("buf1 = empty_strided_cuda((64, 256), (256, 1), torch.bfloat16)\n"
          "# %clone : call_function[target=torch.ops.aten.clone.default]\n")
    assert _weight_sized_buffers(ok, 16 * 256 * 128) == []
    bad = ok + "buf5 = empty_strided_cuda((16, 256, 256), (65536, 256, 1), torch.bfloat16)\n"
    assert len(_weight_sized_buffers(bad, 16 * 256 * 128)) == 1


def test_fp16_grouped_fallback_and_dynamic_tokens():
    """fp16 grouped_mm goes through transformers' grouped_mm_fallback op; dynamic M takes the tiled path."""
    m = _block("qwen", "grouped_mm", dtype=torch.float16)
    compiled = torch.compile(m, options={"post_grad_custom_pre_pass": UNGATED})
    torch._dynamo.reset()
    fxfuse.counters.clear()
    with fresh_cache(), torch.no_grad():
        for M in (5, 17, 300, 2):
            x = torch.randn(1, M, 256, device="cuda", dtype=torch.float16)
            torch._dynamo.mark_dynamic(x, 1)
            assert _rel(compiled(x), m(x)) < 2e-2, M
    assert fxfuse.counters["moe_experts"] == 1, fxfuse.report()


@pytest.mark.parametrize("path", [K.PATH_DECODE, K.PATH_PREFILL])
@pytest.mark.parametrize("shape", [(128, 8, 2048, 768), (8, 2, 512, 1792)])
@pytest.mark.parametrize("ids_kind", ["random", "one_expert", "two_experts"])
def test_launcher_real_shapes(path, shape, ids_kind):
    E, k, H, I = shape
    M = 1 if path == K.PATH_DECODE else 97
    g = torch.Generator(device="cuda").manual_seed(E + M)
    x = torch.randn(M, H, device="cuda", dtype=torch.bfloat16, generator=g)
    w1 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) * 0.02).bfloat16().permute(0, 2, 1)
    w2 = (torch.randn(E, H, I, device="cuda", generator=g) * 0.02).bfloat16().permute(0, 2, 1)
    if ids_kind == "random":
        ids = torch.rand(M, E, device="cuda", generator=g).topk(k, dim=-1).indices
    elif ids_kind == "one_expert":
        ids = torch.full((M, k), E - 1, device="cuda")
    else:
        ids = torch.tensor([0, 1] * (k // 2), device="cuda").expand(M, k).contiguous()
    tw = torch.rand(M, k, device="cuda", generator=g).bfloat16()
    ref = K.moe_experts_reference(x, tw, ids, w1, w2, torch.bfloat16, torch.bfloat16, torch.bfloat16)
    for poison in (float("nan"), 3.0):
        out = torch.full((M, H), poison, device="cuda", dtype=torch.bfloat16)
        K.moe_experts_triton(x, tw, ids, w1, w2, path=path, out=out)
        assert torch.isfinite(out).all()
        assert _rel(out, ref) < 1e-2


# Qwen3-30B-A3B (softmax top-8 renorm, bf16 weights), Mixtral-8x7B-sized (softmax top-2), DeepSeek-V3-like
# (sigmoid + bias, 8 groups keep 4, renorm eps, x2.5) routers on the decode path
_ROUTED_GPU = {
    "qwen": ((128, 8, 2048, 768), (8, 0, torch.float32, torch.float32, 1, 1, 0, float("-inf"), True, 0.0, 1.0,
                                   torch.float32, torch.bfloat16, True)),
    "mixtral": ((8, 2, 512, 1792), (2, 0, torch.float32, torch.float32, 1, 1, 0, float("-inf"), True, 0.0, 1.0,
                                    torch.float32, torch.float32, True)),
    "deepseek": ((256, 8, 1024, 256), (8, 1, torch.float32, torch.float32, 8, 4, 0, float("-inf"), True, 1e-20, 2.5,
                                       torch.float32, torch.float32, True)),
}


@pytest.mark.parametrize("router", list(_ROUTED_GPU))
@pytest.mark.parametrize("M", [1, 2])
def test_routed_launcher_matches_routing_then_experts(router, M):
    """The routing folded into decode kernel A against the routing kernel then the decode kernels.

    Same code (`route_row`), but the routing kernel runs 1-2 warps and kernel A 4: the fp32 sums of a
    softmax / renormalize reduce in another order, so the last bit of a weight may differ (ids only
    on a near-tie). With the routing kernel at kernel A's warps the layouts should match: bitwise.
    """
    from fxfuse.kernels import moe_routing as R

    (E, k, H, I), r = _ROUTED_GPU[router]
    g = torch.Generator(device="cuda").manual_seed(E + M)
    x = torch.randn(M, H, device="cuda", dtype=torch.bfloat16, generator=g)
    logits = torch.randn(M, E, device="cuda", generator=g).bfloat16()
    bias = torch.randn(E, device="cuda", generator=g) * 0.1 if r[4] > 1 else None
    w1 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) * 0.02).bfloat16().permute(0, 2, 1)
    w2 = (torch.randn(E, H, I, device="cuda", generator=g) * 0.02).bfloat16().permute(0, 2, 1)
    prod = torch.promote_types(torch.bfloat16, r[12])
    fw = torch.full((M, k), float("nan"), device="cuda", dtype=r[12])
    fids = torch.full((M, k), -7, device="cuda", dtype=torch.int64)
    fo = torch.full((M, H), float("nan"), device="cuda", dtype=torch.bfloat16)
    K.moe_routed_experts_triton(x, logits, bias, *r, w1, w2, prod, prod, torch.bfloat16, out=fo,
                                routing_out=(fw, fids))
    assert torch.isfinite(fo).all() and torch.isfinite(fw.float()).all()
    for warps in (K.decode_config(H, I, k)["A_WARPS"], None):
        w, ids, _ = R.moe_routing_triton(logits, bias, *r[:13], False, r[13], num_warps=warps)
        o = K.moe_experts_triton(x, w, ids, w1, w2, prod, prod, torch.bfloat16, path=K.PATH_DECODE)
        if warps is not None:  # the same layouts: the same bits
            assert torch.equal(fids, ids) and torch.equal(fw, w) and torch.equal(fo, o), router
        else:
            assert torch.equal(fids.sort(-1).values, ids.sort(-1).values), router
            assert _rel(fw, w) < 1e-2 and _rel(fo, o) < 1e-2, router


def test_cuda_graph_replay_new_routing():
    """No host sync: the op captures into a CUDA graph and replays correctly with new ids/weights."""
    E, k, H, I, M = 32, 4, 256, 128, 8
    x = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
    w1 = (torch.randn(E, 2 * I, H, device="cuda") * 0.05).bfloat16().permute(0, 2, 1)
    w2 = (torch.randn(E, H, I, device="cuda") * 0.05).bfloat16().permute(0, 2, 1)
    ids = torch.randint(0, E, (M, k), device="cuda")
    tw = torch.rand(M, k, device="cuda").bfloat16()
    for path in (K.PATH_DECODE, K.PATH_PREFILL):
        def f():
            return torch.ops.fxfuse.moe_experts(x, tw, ids, w1, w2, torch.bfloat16, torch.bfloat16, torch.bfloat16, path)
        f()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = f()
        for seed in range(3):
            torch.manual_seed(seed)
            ids.copy_(torch.stack([torch.randperm(E, device="cuda")[:k] for _ in range(M)]))
            tw.copy_(torch.rand(M, k, device="cuda"))
            graph.replay()
            ref = K.moe_experts_reference(x, tw, ids, w1, w2, torch.bfloat16, torch.bfloat16, torch.bfloat16)
            assert _rel(out, ref) < 1e-2, (path, seed)


@pytest.mark.parametrize("M", [1, 40])
def test_dense_loop_on_cuda(M):
    E, k, H, I = 8, 2, 256, 128
    w1 = (torch.randn(E, 2 * I, H, device="cuda") * 0.05).bfloat16()
    w2 = (torch.randn(E, H, I, device="cuda") * 0.05).bfloat16()

    def fn(x, ids, tw):
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in range(E):
            we = (tw * (ids == e)).sum(-1)
            g, u = (x @ w1[e].T).chunk(2, -1)
            out = out + ((torch.nn.functional.silu(g) * u) @ w2[e].T).float() * we[:, None]
        return out.to(x.dtype)

    x = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
    ids = torch.rand(M, E, device="cuda").topk(k, dim=-1).indices
    tw = torch.rand(M, k, device="cuda").bfloat16()
    out, code = _compile_run(fn, x, ids, tw)
    assert fxfuse.counters["moe_experts"] == 1, fxfuse.report()
    _check_code(code)
    assert _rel(out, fn(x, ids, tw)) < 2e-2


@pytest.mark.parametrize("E,H", [(128, 2048), (8, 4096), (256, 7168), (60, 1000)])
@pytest.mark.parametrize("M", [1, 5, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_router_gemv_vs_float64(E, H, M, dtype):
    """The decode router GEMV (fxfuse::router_logits) against a float64 reference, poisoned output,
    odd E and H (masked tails), a row stride > H."""
    from fxfuse.kernels.router_gemv import router_logits_triton

    torch.manual_seed(M + E)
    x = torch.randn(M, H + 8, device="cuda", dtype=dtype)[:, :H]
    w = torch.randn(E, H, device="cuda", dtype=dtype) * 0.05
    out = torch.full((M, E), float("nan"), device="cuda", dtype=dtype)
    router_logits_triton(x, w, out=out)
    ref = x.double() @ w.double().t()
    assert torch.isfinite(out).all()
    ulp = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 2**-20}[dtype]
    assert ((out.double() - ref).abs() <= ulp * ref.abs() + 1e-6 * ref.abs().max()).all()
    mm = torch.mm(x, w.t())
    assert _rel(out, mm) < 4 * ulp
    if dtype != torch.float32:  # DeepSeek-V3's fp32 router of bf16 operands: upcast in registers
        out32 = torch.full((M, E), float("nan"), device="cuda", dtype=torch.float32)
        router_logits_triton(x, w, torch.float32, out=out32)
        assert torch.isfinite(out32).all() and _rel(out32, ref) < 1e-5  # fp32 sums: order only


def test_router_gemv_in_output_code_at_decode():
    """At M=1 the router GEMM is the GEMV kernel in Inductor's output code (no fallback), at M=64 it
    stays a GEMM; both match eager."""
    m = _block("qwen", "grouped_mm")
    for M, gemv in ((1, True), (64, False)):
        x = torch.randn(1, M, 256, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            ref = m(x)
        out, code = _compile_run(m, x)
        assert ("_router_gemv_kernel" in code) == gemv, M
        assert "torch.ops.fxfuse" not in code
        assert any("+router GEMV" in f.detail for f in fxfuse.report().fusions) == gemv
        assert _rel(out, ref) < 2e-2
