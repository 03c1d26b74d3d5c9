"""MoE experts fusion on CPU: transformers' grouped_mm and batched_mm experts implementations (real
Qwen3-MoE / Mixtral blocks, and the experts module with routing as graph inputs) and a dense
loop over all experts with masks fuse into one
`fxfuse::moe_experts` op and match eager with dynamic token counts, including batches where some
experts get no tokens and where all tokens pick the same expert. Near misses stay untouched.

Kernel checks: the Triton kernels (decode and prefill paths) under TRITON_INTERPRET=1 in one
subprocess; the CUDA replacement traces to user-defined Triton kernels (fake CUDA tensors).
torch._grouped_mm runs on CPU in torch 2.13, so the grouped_mm form is compiled and run here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._inductor.utils import fresh_cache

import fxfuse
from kernel_checks import assert_full_signatures

transformers = pytest.importorskip("transformers")
from transformers import MixtralConfig, Qwen3MoeConfig  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FAMILY = "moe_experts"
H, I, E, K = 32, 16, 4, 2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _block(model: str, impl: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if model == "qwen":
        cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K,
                             norm_topk_prob=True)
        cfg._experts_implementation = impl
        m = Qwen3MoeSparseMoeBlock(cfg)
    else:
        cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K)
        cfg._experts_implementation = impl
        m = MixtralSparseMoeBlock(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return m.to(dtype).eval()


def _compile(fn, **kw):
    return torch.compile(fn, options={"post_grad_custom_pre_pass": fxfuse.FusionPasses(**kw)})


@pytest.mark.parametrize(
    "model,impl,dtype",
    [
        ("qwen", "grouped_mm", torch.bfloat16),
        ("qwen", "batched_mm", torch.bfloat16),
        ("mixtral", "grouped_mm", torch.float16),  # fp16 -> transformers' grouped_mm_fallback op
        ("mixtral", "batched_mm", torch.bfloat16),
    ],
)
def test_transformers_block(model, impl, dtype):
    m = _block(model, impl, dtype)
    compiled = _compile(m)
    with fresh_cache(), torch.no_grad():
        for i, seq in enumerate((5, 9, 3)):
            x = torch.randn(2, seq, H, dtype=dtype)
            torch._dynamo.mark_dynamic(x, 1)
            out = compiled(x)
            ref = m(x)
            assert _rel(out, ref) < 2e-2, (seq, _rel(out, ref))
            if i == 0:
                assert fxfuse.counters[FAMILY] == 1, fxfuse.report()
    assert fxfuse.counters[FAMILY] == 1, "dynamic graph recompiled"
    assert not fxfuse.report().errors
    assert not fxfuse.report().near_miss_lines()  # incl. unwrap's note on the fused fallback op


def _experts(impl: str, dtype: torch.dtype) -> torch.nn.Module:
    return _block("qwen", impl, dtype, seed=1).experts


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_routing_as_inputs_edge_cases(impl):
    """The matcher starts at whatever produced (weights, ids): here graph inputs."""
    dtype = torch.bfloat16
    ex = _experts(impl, dtype)

    def fn(x, ids, w):
        return ex(x, ids, w)

    compiled = _compile(fn)
    g = torch.Generator().manual_seed(3)
    cases = {
        "random": lambda m: torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(m)]),
        "all_one_expert": lambda m: torch.full((m, K), 2),
        "experts_without_tokens": lambda m: torch.stack([torch.tensor([1, 0])] * m),
    }
    with fresh_cache(), torch.no_grad():
        for name, mk in cases.items():
            for m in (6, 11):
                x = torch.randn(m, H, dtype=dtype, generator=g)
                ids = mk(m)
                w = torch.rand(m, K, generator=g).to(dtype)
                for t in (x, ids, w):
                    torch._dynamo.mark_dynamic(t, 0)
                out = compiled(x, ids, w)
                ref = fn(x, ids, w)
                assert _rel(out, ref) < 2e-2, (name, m, _rel(out, ref))
    assert fxfuse.counters[FAMILY] == 1, fxfuse.report()


def _dense_loop(reduce: str = "sum", experts: int = E):
    """A hand-written MoE looping over all experts with masks (traced: unrolled, no nonzero)."""
    torch.manual_seed(5)
    w1 = torch.randn(E, 2 * I, H, dtype=torch.bfloat16) * 0.3
    w2 = torch.randn(E, H, I, dtype=torch.bfloat16) * 0.3

    def fn(x, ids, tw, res):
        out = torch.zeros(x.shape, dtype=torch.float32)
        for e in range(experts):
            we = (tw * (ids == e)).sum(-1)
            g, u = (x @ w1[e].T).chunk(2, -1)
            y = (torch.nn.functional.silu(g) * u) @ w2[e].T
            c = y.float() * we[:, None]
            out = out + c if reduce == "sum" else torch.maximum(out, c)
        return out.to(x.dtype) + res  # the residual add is not part of the MoE

    return fn


def test_dense_expert_loop_dynamic():
    fn = _dense_loop()
    compiled = _compile(fn)
    g = torch.Generator().manual_seed(4)
    with fresh_cache(), torch.no_grad():
        for m, kind in ((6, "random"), (9, "one"), (7, "two")):
            x = torch.randn(m, H, dtype=torch.bfloat16, generator=g)
            res = torch.randn(m, H, dtype=torch.bfloat16, generator=g)
            if kind == "random":
                ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(m)])
            elif kind == "one":
                ids = torch.full((m, K), 1)
                ids[:, 1] = 3  # every token on experts 1 and 3; 0 and 2 get none
            else:
                ids = torch.tensor([[2, 0]] * m)
            tw = torch.rand(m, K, generator=g).to(torch.bfloat16)
            for t in (x, ids, tw, res):
                torch._dynamo.mark_dynamic(t, 0)
            out = compiled(x, ids, tw, res)
            assert _rel(out, fn(x, ids, tw, res)) < 2e-2, kind
    assert fxfuse.counters[FAMILY] == 1, fxfuse.report()


def test_dense_loop_near_miss_other_reduction():
    """The same expert loop combined by max instead of a sum is not an MoE: left to Inductor."""
    fn, reason = _dense_loop(reduce="max"), "not combined by one sum"
    args = (torch.randn(5, H, dtype=torch.bfloat16), torch.stack([torch.randperm(E)[:K] for _ in range(5)]),
            torch.rand(5, K, dtype=torch.bfloat16), torch.randn(5, H, dtype=torch.bfloat16))
    with fresh_cache(), torch.no_grad():
        out = _compile(fn)(*args)
    assert fxfuse.counters[FAMILY] == 0
    lines = fxfuse.report().near_miss_lines()
    assert any(reason in line for line in lines), lines
    assert _rel(out, fn(*args)) < 1e-2


def test_near_miss_other_reduction():
    """A grouped expert loop whose per-pair outputs are combined by max, not sum: not an MoE combine."""
    torch.manual_seed(0)
    w1 = torch.randn(E, 2 * I, H, dtype=torch.bfloat16) * 0.3
    w2 = torch.randn(E, H, I, dtype=torch.bfloat16) * 0.3

    def fn(x, ids, w):
        S = ids.numel()
        flat = ids.reshape(-1)
        eg, perm = torch.sort(flat)
        xs = x[perm // K]
        offs = torch.cumsum(torch.histc(eg.float(), bins=E, min=0, max=E - 1), dim=0, dtype=torch.int32)
        gu = torch._grouped_mm(xs, w1.transpose(1, 2), offs=offs)
        g, u = gu.chunk(2, dim=-1)
        h = torch.nn.functional.silu(g) * u
        y = torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)
        y = y * w.reshape(-1)[perm].unsqueeze(-1)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(S)
        return y[inv].view(x.shape[0], K, H).amax(dim=1)

    x = torch.randn(5, H, dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(5)])
    w = torch.rand(5, K, dtype=torch.bfloat16)
    with fresh_cache(), torch.no_grad():
        out = _compile(fn)(x, ids, w)
        ref = fn(x, ids, w)
    assert fxfuse.counters[FAMILY] == 0
    lines = fxfuse.report().near_miss_lines()
    assert any("not a sum over the top-k" in line for line in lines), lines
    assert _rel(out, ref) < 1e-2


def test_eager_experts_loop_reports_fix():
    """transformers' eager loop graph-breaks on nonzero: reported, naming the config fix."""
    m = _block("qwen", "eager", torch.bfloat16)
    x = torch.randn(1, 4, H, dtype=torch.bfloat16)
    with fresh_cache(), torch.no_grad():
        out = _compile(m)(x)
        ref = m(x)
    assert fxfuse.counters[FAMILY] == 0
    lines = [line for line in fxfuse.report().near_miss_lines() if FAMILY in line]
    assert lines and '_experts_implementation = "grouped_mm"' in lines[0], lines
    assert _rel(out, ref) < 1e-2


def test_op_cpu_matches_reference_and_fake():
    from fxfuse.kernels.moe_experts import moe_experts_reference

    torch.manual_seed(0)
    x = torch.randn(7, H, dtype=torch.float16)
    w1 = (torch.randn(E, 2 * I, H) * 0.3).half().permute(0, 2, 1)
    w2 = (torch.randn(E, H, I) * 0.3).half().permute(0, 2, 1)
    ids = torch.randint(0, E, (7, K))
    tw = torch.rand(7, K)
    out = torch.ops.fxfuse.moe_experts(x, tw, ids, w1, w2, torch.float32, torch.float32, torch.float16)
    ref = moe_experts_reference(x, tw, ids, w1, w2, torch.float32, torch.float32, torch.float16)
    assert torch.equal(out, ref)
    # independent float64 oracle: per token, loop over its selected experts
    want = torch.zeros(7, H, dtype=torch.float64)
    for t in range(7):
        for j in range(K):
            e = int(ids[t, j])
            gu = x[t].double() @ w1[e].double()
            hh = torch.nn.functional.silu(gu[:I]) * gu[I:]
            want[t] += tw[t, j].double() * (hh @ w2[e].double())
    assert _rel(out, want) < 5e-3


@pytest.mark.parametrize("M", [1, 64, "dynamic"])
def test_cuda_path_traces_to_user_triton_kernels(M):
    """On CUDA the op decomposes into user-defined Triton kernels (decode at M=1, tiled at 64 and
    for a symbolic M) without adding shape guards."""
    import torch.fx as fx
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    from fxfuse.fx_utils import insert_traced

    # decode: gate_up + down; tiled: align (+ a scatter launch unless the pair count is static and
    # small) + 2 grouped GEMMs + the combine
    expect = {1: 2, 64: 4, "dynamic": 5}[M]
    mode = FakeTensorMode(shape_env=ShapeEnv())
    if M == "dynamic":
        ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC])
        M = mode.from_tensor(torch.empty(5, 2), symbolic_context=ctx).shape[0]
    with mode:
        x = torch.empty(M, 256, dtype=torch.bfloat16, device="cuda")
        tw = torch.empty(M, 2, dtype=torch.bfloat16, device="cuda")
        ids = torch.empty(M, 2, dtype=torch.int64, device="cuda")
        w1 = torch.empty(8, 128, 256, dtype=torch.bfloat16, device="cuda")
        w2 = torch.empty(8, 256, 64, dtype=torch.bfloat16, device="cuda")
    g = fx.Graph()
    ph = [g.placeholder(n) for n in ("x", "tw", "ids", "w1", "w2")]
    for p, v in zip(ph, (x, tw, ids, w1, w2)):
        p.meta["val"] = v
    out = g.output(None)

    def repl(x, tw, ids, w1, w2):
        return torch.ops.fxfuse.moe_experts(x, tw, ids, w1.permute(0, 2, 1), w2.permute(0, 2, 1),
                                            torch.bfloat16, torch.bfloat16, torch.bfloat16)

    insert_traced(g, repl, ph, before=out, functionalize=True)
    kernels = [n for n in g.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
    assert len(kernels) == expect, [n.kwargs.get("kernel_idx") for n in kernels]
    assert_full_signatures(kernels)
    assert not any("fxfuse" in str(n.target) for n in g.nodes)
    syncs = {torch.ops.aten.nonzero.default, torch.ops.aten._local_scalar_dense.default}
    assert not any(n.target in syncs for n in g.nodes), "host sync in the fused path"
    assert not mode.shape_env.guards, "the fused path guarded on the token count"


@pytest.mark.parametrize("M", [1, 2, 64])
def test_routed_op_traces_to_user_triton_kernels(M):
    """fxfuse::moe_routed_experts on CUDA: at decode (static M = 1, 2) two user-defined Triton kernels,
    kernel A routing itself (no routing launch), every kernel parameter passed explicitly; a tiled
    token count launches the routing kernel, then the tiled experts kernels."""
    import torch.fx as fx
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from fxfuse.fx_utils import insert_traced

    mode = FakeTensorMode(shape_env=ShapeEnv())
    with mode:
        x = torch.empty(M, 256, dtype=torch.bfloat16, device="cuda")
        logits = torch.empty(M, 32, dtype=torch.float32, device="cuda")
        bias = torch.empty(32, dtype=torch.float32, device="cuda")
        w1 = torch.empty(32, 128, 256, dtype=torch.bfloat16, device="cuda")
        w2 = torch.empty(32, 256, 64, dtype=torch.bfloat16, device="cuda")
    g = fx.Graph()
    ph = [g.placeholder(n) for n in ("x", "logits", "bias", "w1", "w2")]
    for p, v in zip(ph, (x, logits, bias, w1, w2)):
        p.meta["val"] = v
    out = g.output(None)
    routing = _routed_args("deepseek", 4)

    def repl(x, logits, bias, w1, w2):
        return torch.ops.fxfuse.moe_routed_experts(x, logits, bias, *routing, w1.permute(0, 2, 1), w2.permute(0, 2, 1),
                                                   torch.float32, torch.float32, torch.bfloat16)

    insert_traced(g, repl, ph, before=out, functionalize=True)
    kernels = [n for n in g.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
    names = [getattr(k, "fn", k).__name__ for k in (kernel_side_table.get_kernel(n.kwargs["kernel_idx"]) for n in kernels)]
    if M <= 2:
        assert names == ["_moe_decode_routed_gate_up_dot_kernel", "_moe_decode_down_dot_kernel"], names
    else:
        assert names[0] == "_moe_routing_kernel" and "_moe_gemm1_kernel" in names and len(names) == 5, names
    assert_full_signatures(kernels)
    assert not any("fxfuse" in str(n.target) for n in g.nodes)
    assert not mode.shape_env.guards


@pytest.mark.parametrize("routed", [False, True])
def test_decode_kernel_a_writes_only_its_buffers(routed, sm90_target):
    """Inductor's mutation analysis of a user kernel (TTIR, run here for an sm_90 target without a
    driver) must find kernel A writing only its own buffers: a routing input (ids; router logits and
    bias) it deems written is cloned before the launch: a copy kernel, a launch more per layer."""
    import torch.fx as fx
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fxfuse.fx_utils import insert_traced

    with FakeTensorMode():
        x = torch.empty(1, 256, dtype=torch.bfloat16, device="cuda")
        logits = torch.empty(1, 32, dtype=torch.float32, device="cuda")
        bias = torch.empty(32, dtype=torch.float32, device="cuda")
        tw = torch.empty(1, 4, dtype=torch.float32, device="cuda")
        ids = torch.empty(1, 4, dtype=torch.int64, device="cuda")
        w1 = torch.empty(32, 128, 256, dtype=torch.bfloat16, device="cuda")
        w2 = torch.empty(32, 256, 64, dtype=torch.bfloat16, device="cuda")
    g = fx.Graph()
    vals = (x, logits, bias, tw, ids, w1, w2)
    ph = [g.placeholder(n) for n in ("x", "logits", "bias", "tw", "ids", "w1", "w2")]
    for p, v in zip(ph, vals):
        p.meta["val"] = v
    out = g.output(None)
    routing = _routed_args("deepseek", 4)

    def repl(x, logits, bias, tw, ids, w1, w2):
        w1, w2 = w1.permute(0, 2, 1), w2.permute(0, 2, 1)
        if routed:
            return torch.ops.fxfuse.moe_routed_experts(x, logits, bias, *routing, w1, w2, torch.float32,
                                                       torch.float32, torch.bfloat16)
        return torch.ops.fxfuse.moe_experts(x, tw, ids, w1, w2, torch.float32, torch.float32, torch.bfloat16)

    try:
        insert_traced(g, repl, ph, before=out, functionalize=True)
    except (AttributeError, TypeError) as e:  # another Triton driver layout: cannot fake the target
        pytest.skip(f"cannot fake an sm_90 Triton target here: {e}")
    written = {}
    for n in g.nodes:
        if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
            k = kernel_side_table.get_kernel(n.kwargs["kernel_idx"])
            written[getattr(k, "fn", k).__name__] = set(n.kwargs["tensors_to_clone"])
    a = "_moe_decode_routed_gate_up_dot_kernel" if routed else "_moe_decode_gate_up_dot_kernel"
    assert written[a] == ({"tw_ptr", "ids_ptr", "h_ptr"} if routed else {"h_ptr"}), written


def test_routed_op_cpu_is_routing_then_experts():
    """The CPU kernel (and fake impl) of fxfuse::moe_routed_experts is the routing reference then the
    experts reference."""
    from fxfuse.kernels.moe_experts import moe_experts_reference
    from fxfuse.kernels.moe_routing import moe_routing_reference

    torch.manual_seed(0)
    x = torch.randn(3, H, dtype=torch.bfloat16)
    logits = torch.randn(3, E * 4)
    bias = torch.randn(E * 4) * 0.1
    w1 = (torch.randn(E * 4, 2 * I, H) * 0.3).bfloat16().permute(0, 2, 1)
    w2 = (torch.randn(E * 4, H, I) * 0.3).bfloat16().permute(0, 2, 1)
    r = _routed_args("deepseek", K)
    out = torch.ops.fxfuse.moe_routed_experts(x, logits, bias, *r, w1, w2, torch.float32, torch.float32, torch.bfloat16)
    w, ids, _ = moe_routing_reference(logits, bias, *r[:13], False, r[13])
    assert torch.equal(out, moe_experts_reference(x, w, ids, w1, w2, torch.float32, torch.float32, torch.bfloat16))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as fm:
        fo = torch.ops.fxfuse.moe_routed_experts(*(fm.from_tensor(t) for t in (x, logits, bias)), *r,
                                                 fm.from_tensor(w1), fm.from_tensor(w2), torch.float32, torch.float32,
                                                 torch.bfloat16)
    assert (fo.shape, fo.dtype) == (out.shape, out.dtype)
    with pytest.raises(ValueError):  # logits of another expert count than the weights
        torch.ops.fxfuse.moe_routed_experts(x, logits[:, :E], None, *_routed_args("qwen", K), w1, w2, torch.float32,
                                            torch.float32, torch.bfloat16)


# ----------------------------------------------------------------------------- TRITON_INTERPRET=1

_INTERP_CASES = [
    # (id, M, E, K, H, I, dtype, wdtype, path, ids kind)
    ("decode-bf16", 3, 4, 2, 32, 16, "bfloat16", "bfloat16", 1, "random"),
    ("decode-fp16-f32w", 2, 6, 2, 48, 24, "float16", "float32", 1, "random"),
    ("decode-k3", 2, 6, 3, 32, 16, "bfloat16", "float32", 1, "random"),
    ("prefill-k3", 4, 6, 3, 32, 16, "float16", "float16", 2, "random"),
    ("decode-one-expert", 4, 4, 1, 32, 16, "bfloat16", "bfloat16", 1, "one"),
    ("prefill-bf16", 5, 4, 2, 32, 16, "bfloat16", "bfloat16", 2, "random"),
    ("prefill-fp16-f32w", 5, 6, 2, 48, 24, "float16", "float32", 2, "random"),
    ("prefill-one-expert", 9, 4, 2, 32, 16, "bfloat16", "bfloat16", 2, "one"),
    ("prefill-empty-experts", 6, 8, 2, 32, 16, "float16", "float16", 2, "two"),
    ("prefill-bm64", 40, 2, 2, 32, 16, "bfloat16", "bfloat16", 2, "random"),
    ("prefill-bad-id", 3, 4, 2, 32, 16, "bfloat16", "bfloat16", 2, "bad"),
    ("decode-bad-id", 3, 4, 2, 32, 16, "bfloat16", "bfloat16", 1, "bad"),
    ("decode-k8", 2, 16, 8, 32, 16, "bfloat16", "float32", 1, "random"),  # kernel B's 3-D vector form
    ("decode-vector-forms", 3, 4, 2, 32, 16, "float16", "float16", 1, "random"),
    ("decode-vector-bad-id", 3, 4, 2, 32, 16, "bfloat16", "bfloat16", 1, "bad"),
    ("decode-dot-forms-k8", 2, 16, 8, 32, 16, "bfloat16", "bfloat16", 1, "random"),
    ("prefill-e7-bad-id", 9, 7, 3, 32, 16, "bfloat16", "bfloat16", 2, "bad"),  # E + 1 a power of two
    ("prefill-e1-one", 12, 1, 2, 32, 16, "float16", "float16", 2, "one"),  # every pair on the one expert
]
# decode_config overrides: every kernel form (vector / pipelined dot) of both decode kernels runs
_INTERP_CONFIG = {
    "decode-vector-forms": {"A_DOT": 0, "B_DOT": 0, "A_BN": 8, "A_BK": 16, "B_BN": 4, "B_BK": 8},
    "decode-vector-bad-id": {"A_DOT": 0, "B_DOT": 0},
    "decode-dot-forms-k8": {"A_DOT": 1, "B_DOT": 1, "A_BN": 16, "A_BK": 16, "B_BN": 16, "B_BK": 16},
}


def _interp_main() -> None:
    """Runs in a subprocess with TRITON_INTERPRET=1 (set before triton imports)."""
    from fxfuse.kernels import moe_experts as Km

    res = {}
    for cid, M, E_, K_, H_, I_, dt, wdt, path, kind in _INTERP_CASES:
        torch.manual_seed(len(cid))
        dt, wdt = getattr(torch, dt), getattr(torch, wdt)
        x = torch.randn(M, H_, dtype=dt)
        w1 = (torch.randn(E_, 2 * I_, H_) * 0.2).to(dt).permute(0, 2, 1)
        w2 = (torch.randn(E_, H_, I_) * 0.2).to(dt).permute(0, 2, 1)
        if kind == "one":
            ids = torch.full((M, K_), E_ - 1)
        elif kind == "two":
            ids = torch.tensor([[3, 5]] * M)
        else:
            ids = torch.stack([torch.randperm(E_)[:K_] for _ in range(M)])
        tw = torch.rand(M, K_, dtype=wdt)
        pd = torch.promote_types(dt, wdt)
        if kind == "bad":
            ids[0, 1] = E_  # out of range: contributes zero
            keep = ids < E_
            ref = Km.moe_experts_reference(x, torch.where(keep, tw, 0), ids.clamp(max=E_ - 1), w1, w2, pd, pd, dt)
        else:
            ref = Km.moe_experts_reference(x, tw, ids, w1, w2, pd, pd, dt)
        outs = []
        for poison in (float("nan"), 7.0):
            o = torch.full((M, H_), poison, dtype=dt)
            outs.append(Km.moe_experts_triton(x, tw, ids, w1, w2, path=path, out=o, config=_INTERP_CONFIG.get(cid)))
        res[cid] = {"same": bool(torch.equal(outs[0], outs[1])), "err": _rel(outs[0], ref),
                    "finite": bool(torch.isfinite(outs[0]).all())}
    for case in _ROUTED_CASES:
        res[case[0]] = _routed_agree(*case)
    for cid, S, E_, bm, bad in _ALIGN_CASES:
        torch.manual_seed(S + E_)
        ids = torch.randint(0, E_, (S,))
        if bad:
            ids[::5] = E_ + 3  # dropped pairs
            ids[1::7] = -1
        if bad == "int32":
            ids = ids.to(torch.int32)
        want = Km._align(ids, E_, bm)
        got = Km._align_triton(lambda k: k, ids, E_, bm)
        res[cid] = _align_agree(want, got, S)
    print(json.dumps(res))


# Routing folded into decode kernel A (fxfuse::moe_routed_experts): bit-identical to the routing
# kernel followed by the decode kernels. (id, M, E, k, H, I, router, logits kind, decode_config override)
_ROUTED_CASES = [
    ("routed-qwen-m1", 1, 16, 4, 32, 16, "qwen", "randn", None),
    ("routed-qwen-m2-ties", 2, 16, 4, 32, 16, "qwen", "ties", None),
    ("routed-qwen-k8", 2, 32, 8, 32, 16, "qwen", "randn", None),  # kernel B's 3-D vector form
    ("routed-qwen-vector-forms", 2, 16, 4, 32, 16, "qwen", "ties",
     {"A_DOT": 0, "B_DOT": 0, "A_BN": 8, "A_BK": 16, "B_BN": 4, "B_BK": 8}),
    ("routed-mixtral-top2-norenorm", 1, 8, 2, 48, 24, "mixtral", "randn", None),
    ("routed-mixtral-ties-fp16", 2, 8, 2, 32, 16, "mixtral-fp16", "ties", None),
    ("routed-deepseek-sigmoid-bias-groups", 2, 32, 4, 32, 16, "deepseek", "randn", None),
    ("routed-deepseek-ties-fill0", 1, 32, 4, 32, 16, "deepseek-fill0", "ties", None),
    ("routed-topk-softmax", 2, 16, 2, 32, 16, "topk_softmax", "ties", None),
    ("routed-prefill-fallback", 5, 8, 2, 32, 16, "qwen", "randn", None),  # tiled: routing launch + experts
]


def _routed_args(router: str, k: int) -> tuple:
    """fxfuse::moe_routing's arguments from k on (need_scores left out), as the routing pass captures
    them from transformers' routers: (k, scoring, score_dtype, biased_dtype, n_group, topk_group,
    group_score, fill, renormalize, renorm_eps, scale, value_dtype, weights_dtype, gather_weights)."""
    from fxfuse.kernels import moe_routing as R

    f32, bf16 = torch.float32, torch.bfloat16
    if router == "qwen":  # softmax in fp32 -> top-k -> renormalize -> to(bf16)
        return (k, R.SCORING_SOFTMAX, f32, f32, 1, 1, R.GROUP_TOP2_SUM, float("-inf"), True, 0.0, 1.0, f32, bf16, True)
    if router.startswith("mixtral"):  # softmax -> top-2, no renormalize
        wdt = torch.float16 if router.endswith("fp16") else bf16
        return (k, R.SCORING_SOFTMAX, f32, f32, 1, 1, R.GROUP_TOP2_SUM, float("-inf"), False, 0.0, 1.0, f32, wdt, True)
    if router.startswith("deepseek"):  # sigmoid + bias, 8 groups keep 2 (top-2 sums), renorm eps, scale
        fill = 0.0 if router.endswith("fill0") else float("-inf")
        return (k, R.SCORING_SIGMOID, f32, f32, 8, 2, R.GROUP_TOP2_SUM, fill, True, 1e-20, 2.5, f32, f32, True)
    if router == "topk_softmax":  # top-k on the bf16 logits, softmax over the k
        return (k, R.SCORING_TOPK_SOFTMAX, bf16, bf16, 1, 1, R.GROUP_TOP2_SUM, float("-inf"), False, 0.0, 1.0, f32,
                f32, True)
    raise ValueError(router)


def _routed_agree(cid: str, M: int, E_: int, k: int, H_: int, I_: int, router: str, logits_kind: str,
                  config: dict | None) -> dict:
    """The folded launch against the routing kernel then moe_experts' kernels, every output poisoned."""
    from fxfuse.kernels import moe_experts as Km
    from fxfuse.kernels import moe_routing as R

    torch.manual_seed(len(cid) + M)
    dt = torch.float16 if router.endswith("fp16") else torch.bfloat16
    x = torch.randn(M, H_, dtype=dt)
    w1 = (torch.randn(E_, 2 * I_, H_) * 0.2).to(dt).permute(0, 2, 1)
    w2 = (torch.randn(E_, H_, I_) * 0.2).to(dt).permute(0, 2, 1)
    if logits_kind == "ties":  # a few distinct values: many exact ties, in the groups' scores too
        logits = (torch.randint(-2, 3, (M, E_)).float() / 2).to(dt)
    else:
        logits = torch.randn(M, E_).to(dt)
    bias = (torch.randint(-2, 3, (E_,)).float() / 8) if router.startswith("deepseek") else None
    r = _routed_args(router, k)
    wdt = r[12]
    prod = torch.promote_types(dt, wdt)
    runs = []
    for poison, junk in ((float("nan"), 12345), (7.0, -5)):
        w, ids, sc = R._alloc(logits, k, r[2], wdt, False)
        w.fill_(poison)
        ids.fill_(junk)
        R.moe_routing_triton(logits, bias, *r[:13], False, r[13], out=(w, ids, sc))
        o = torch.full((M, H_), poison, dtype=dt)
        Km.moe_experts_triton(x, w, ids, w1, w2, prod, prod, dt, out=o, config=config)
        fw, fids = torch.full((M, k), poison, dtype=wdt), torch.full((M, k), junk, dtype=torch.int64)
        fo = torch.full((M, H_), poison, dtype=dt)
        Km.moe_routed_experts_triton(x, logits, bias, *r, w1, w2, prod, prod, dt, out=fo, routing_out=(fw, fids),
                                     config=config)
        runs.append((w, ids, o, fw, fids, fo))
    (w, ids, o, fw, fids, fo), again = runs[0], runs[1]
    cpu = torch.ops.fxfuse.moe_routed_experts(x, logits, bias, *r, w1, w2, prod, prod, dt)
    return {
        "decode": Km.choose_path(M, k, E_) == Km.PATH_DECODE,
        "out_equal": bool(torch.equal(o, fo)), "weights_equal": bool(torch.equal(w, fw)),
        "ids_equal": bool(torch.equal(ids, fids)), "poison_independent": all(torch.equal(a, b) for a, b in zip(runs[0], again)),
        "finite": bool(torch.isfinite(fo).all() and torch.isfinite(fw).all()),
        "ids_in_range": bool(((fids >= 0) & (fids < E_)).all()),
        "err_vs_cpu_op": _rel(fo, cpu),
    }


# (id, pairs S, experts E, BLOCK_M, with dropped ids)
_ALIGN_CASES = [("align-16", 37, 8, 16, False), ("align-bad", 50, 6, 16, True), ("align-big", 3000, 128, 64, True),
                ("align-one-tile", 3, 4, 16, False), ("align-bm128", 700, 5, 128, False),
                ("align-e15-bad", 2100, 15, 16, True), ("align-e1-many", 2100, 1, 64, True),
                ("align-e3-bad-int32", 300, 3, 64, "int32")]


def _align_agree(want: tuple, got: tuple, S: int) -> dict:
    """The Triton align tiles like the torch one (kernels.moe_experts.aligns_equivalent: padded count,
    tile experts, each expert's pairs over its range), and the padding past the count points at S."""
    from fxfuse.kernels import moe_experts as Km

    n = int(want[2].item())
    return {"equivalent": Km.aligns_equivalent(want, got), "pad_fill": bool((got[0][n:] == S).all())}



@pytest.fixture(scope="module")
def interp_results() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO) + os.pathsep + str(REPO / "tests"))
    r = subprocess.run([sys.executable, __file__, "--interp-json"], env=env, capture_output=True, text=True,
                       timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cid", [c[0] for c in _ALIGN_CASES])
def test_triton_align_matches_torch_align(interp_results, cid):
    """The Triton align (histogram + cumsum, atomic scatter; one launch for small static pair counts)
    tiles as the torch-op one."""
    assert all(interp_results[cid].values()), interp_results[cid]


@pytest.mark.parametrize("cid", [c[0] for c in _INTERP_CASES])
def test_triton_kernels_interpreted(interp_results, cid):
    r = interp_results[cid]
    assert r["finite"] and r["same"], r
    assert r["err"] < 1e-2, r


@pytest.mark.parametrize("cid", [c[0] for c in _ROUTED_CASES])
def test_routed_kernels_interpreted(interp_results, cid):
    """The routing folded into decode kernel A: the combined output, and the (weights, ids) it hands
    to kernel B, bit for bit those of the routing kernel followed by the decode kernels (one routing
    implementation, `route_row`); ties resolve alike; every output written (poisoned before)."""
    r = interp_results[cid]
    assert r["decode"] == (cid != "routed-prefill-fallback"), r
    assert r["out_equal"] and r["weights_equal"] and r["ids_equal"], r
    assert r["poison_independent"] and r["finite"] and r["ids_in_range"], r
    assert r["err_vs_cpu_op"] < 1e-2, r


if __name__ == "__main__" and "--interp-json" in sys.argv:
    _interp_main()


def test_aligns_equivalent_detects_a_moved_pair():
    """The align check itself can fail: a pair moved to another expert's range, or a changed padded
    count, is not equivalent; reordering pairs inside one expert's range is."""
    from fxfuse.kernels import moe_experts as Km

    ids = torch.tensor([0, 1, 1, 2, 0, 2, 2, 1])
    a = Km._align(ids, 3, 4)
    assert Km.aligns_equivalent(a, a)
    s, e, n, t = a
    same = s.clone()
    same[0], same[1] = s[1].item(), s[0].item()  # both in expert 0's range
    assert Km.aligns_equivalent(a, (same, e, n, t))
    moved = s.clone()
    moved[0], moved[4] = s[4].item(), s[0].item()  # expert 0's first pair swapped with expert 1's
    assert not Km.aligns_equivalent(a, (moved, e, n, t))
    assert not Km.aligns_equivalent(a, (s, e, n + 4, t))
