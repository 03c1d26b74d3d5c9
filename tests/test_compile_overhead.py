"""Compile-time overhead of the pipeline, guarded by counts (not wall time, which flakes on a loaded
CI machine): identical replacements are traced once per graph, CPU fake impls run once per
metadata, the topological sort after a rewrite only walks what the rewrite put out of order.
Every cache is checked to give exactly the graph the uncached pipeline gives, and to never hand
out a result for other shapes, strides, dtypes or closure values.
"""

from __future__ import annotations

import contextlib
import operator
import random
from typing import Any

import pytest
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

import fxfuse
from fxfuse import demo, fx_utils
from fxfuse.kernels import fake_cache
from fxfuse.testing import graph_text, on_fake_device, post_grad_graph, random_inputs, reapply

pytest.importorskip("transformers")


@contextlib.contextmanager
def _caches_off(monkeypatch: pytest.MonkeyPatch) -> Any:
    with monkeypatch.context() as m:
        m.setattr(fxfuse.pipeline, "trace_cache", lambda graph: contextlib.nullcontext())
        m.setattr(fake_cache, "ENABLED", False)
        m.setattr(fx_utils, "_local_stable_toposort", lambda graph, inserted: False)
        yield


def _run_both(gm: fx.GraphModule, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any, dict[str, int]]:
    """The pipeline with its caches and without: same graph text, same node meta keys."""
    fx_utils.trace_stats.clear()
    fast = reapply(gm, passes=fxfuse.FusionPasses(strict=True, options={"gate": False}))
    stats = dict(fx_utils.trace_stats)
    with _caches_off(monkeypatch):
        slow = reapply(gm, passes=fxfuse.FusionPasses(strict=True, options={"gate": False}))
    assert fast.counters == slow.counters
    assert graph_text(fast.graph_module) == graph_text(slow.graph_module)
    for a, b in zip(fast.graph_module.graph.nodes, slow.graph_module.graph.nodes, strict=True):
        assert set(a.meta) == set(b.meta), (a.name, set(a.meta) ^ set(b.meta))
    return fast, slow, stats


def test_dense_demo_graph_same_with_and_without_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    """2-layer Llama with fp8 linears: the second layer's rewrites reuse the first layer's traces
    and fake outputs, and the result is the uncached pipeline's graph, bit for bit in its outputs."""
    dm = demo.build_dense("cpu", True, fp8_backend="fxfuse-demo")
    gm = post_grad_graph(dm.module, demo.random_ids(dm.vocab, 8, "cpu", seed=1).reshape(1, -1), dynamic=False)
    hits0 = fake_cache.stats["hits"]
    fast, slow, stats = _run_both(gm, monkeypatch)
    assert fast.counters["rmsnorm_quant"] == 4 and fast.counters["rope_quant"] == 2, fast.counters
    applied = sum(fast.counters.values())
    assert stats["traced"] + stats["reused"] == applied
    assert stats["reused"] >= applied // 2 - 1, stats  # layer 2 repeats layer 1
    assert fake_cache.stats["hits"] > hits0
    args = [a.abs() % 8 if isinstance(a, torch.Tensor) and not a.is_floating_point() else a
            for a in random_inputs(gm)]  # token ids inside the vocabulary
    for a, b in zip(fast.graph_module(*args), slow.graph_module(*args)):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)


def test_moe_demo_graph_on_fake_cuda_same_with_and_without_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA path (Triton kernels traced through functionalization) reuses traces too, and the
    reused copies get their own fake values (no tensor shared between two layers' nodes)."""
    dm = demo.build_moe("cpu", True)
    ids = demo.random_ids(dm.vocab, 8, "cpu", seed=1).reshape(1, -1)
    gm = on_fake_device(post_grad_graph(dm.module, ids, dynamic=False))
    fast, slow, stats = _run_both(gm, monkeypatch)
    assert fast.counters["moe_experts"] == 2 and fast.counters["moe_routing"] == 2, fast.counters
    assert stats["reused"] >= 2, stats
    hop = torch.ops.higher_order.triton_kernel_wrapper_functional
    vals = [id(v) for n in fast.graph_module.graph.nodes if n.target is hop for v in n.meta["val"].values()]
    assert vals and len(vals) == len(set(vals))


# ----------------------------------------------------------------------------- trace cache keys


def _fake(mode: FakeTensorMode, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
          stride: tuple[int, ...] | None = None) -> torch.Tensor:
    with mode:
        if stride is None:
            return torch.empty(shape, dtype=dtype)
        return torch.empty_strided(shape, stride, dtype=dtype)


def _scaled(c: float) -> Any:
    def fn(x: torch.Tensor) -> torch.Tensor:
        return (x * c).reshape(-1)
    return fn


def test_trace_cache_keys_shape_stride_dtype_and_closure() -> None:
    mode = FakeTensorMode()
    fx_utils.trace_stats.clear()
    with fx_utils.trace_cache():
        a = _fake(mode, (2, 3))
        g1 = fx_utils.trace_aten(_scaled(2.0), [a], functionalize=False)
        out1 = list(g1.graph.nodes)[-1].args[0].meta["val"]
        g2 = fx_utils.trace_aten(_scaled(2.0), [_fake(mode, (2, 3))], functionalize=False)
        out2 = list(g2.graph.nodes)[-1].args[0].meta["val"]
        assert fx_utils.trace_stats == {"traced": 1, "reused": 1}
        assert out2 is not out1 and out2.shape == (6,)  # fresh values for this input
        for other in ([_fake(mode, (3, 2))], [_fake(mode, (2, 3), torch.bfloat16)],
                      [_fake(mode, (2, 3), stride=(1, 2))]):
            g = fx_utils.trace_aten(_scaled(2.0), other, functionalize=False)
            v = list(g.graph.nodes)[-1].args[0].meta["val"]
            assert v.dtype == other[0].dtype and v.shape == (6,)
        assert fx_utils.trace_stats["traced"] == 4
        fx_utils.trace_aten(_scaled(3.0), [_fake(mode, (2, 3))], functionalize=False)  # other closure value
        fx_utils.trace_aten(_scaled(2), [_fake(mode, (2, 3))], functionalize=False)  # int, not float
        assert fx_utils.trace_stats["traced"] == 6
        # a closure over a tensor cannot be keyed: traced every time
        t = _fake(mode, (2, 3))
        for _ in range(2):
            fx_utils.trace_aten(lambda x: x + t, [_fake(mode, (2, 3))], functionalize=False)
        assert fx_utils.trace_stats["traced"] == 8
    # outside a pipeline run nothing is cached
    fx_utils.trace_aten(_scaled(2.0), [a], functionalize=False)
    assert fx_utils.trace_stats["traced"] == 9


def test_trace_cache_keys_input_aliasing() -> None:
    mode = FakeTensorMode()
    fx_utils.trace_stats.clear()
    with fx_utils.trace_cache():
        a = _fake(mode, (4,))
        fx_utils.trace_aten(lambda x, y: x + y, [a, _fake(mode, (4,))], functionalize=False)
        fx_utils.trace_aten(lambda x, y: x + y, [a, a], functionalize=False)
    assert fx_utils.trace_stats["traced"] == 2


# ----------------------------------------------------------------------------- CPU fake-impl cache


def _moe_args(mode: FakeTensorMode | None, M: int) -> list[Any]:
    H, I, E, K = 8, 4, 3, 2
    g = torch.Generator().manual_seed(M)
    real = [torch.randn(M, H, generator=g), torch.rand(M, K, generator=g), torch.randint(0, E, (M, K), generator=g),
            torch.randn(E, H, 2 * I, generator=g), torch.randn(E, I, H, generator=g)]
    if mode is not None:
        real = [mode.from_tensor(t) for t in real]
    return [*real, torch.float32, torch.float32, torch.bfloat16]


@pytest.mark.parametrize("M", [5, 6])
def test_fake_cache_matches_real_outputs(M: int) -> None:
    op = torch.ops.fxfuse.moe_experts.default
    ref = op(*_moe_args(None, M))
    mode = FakeTensorMode()
    h0 = fake_cache.stats["hits"]
    with mode:
        outs = [op(*_moe_args(mode, M)) for _ in range(2)]
    assert fake_cache.stats["hits"] == h0 + 1
    for o in outs:
        assert (o.shape, o.stride(), o.dtype, o.device) == (ref.shape, ref.stride(), ref.dtype, ref.device)
    assert outs[0].untyped_storage()._cdata != outs[1].untyped_storage()._cdata


# ----------------------------------------------------------------------------- local topological sort


def _random_graph(rng: random.Random, n: int) -> fx.Graph:
    g = fx.Graph()
    nodes = [g.placeholder(f"p{i}") for i in range(3)]
    for _ in range(n):
        nodes.append(g.call_function(operator.add, tuple(rng.choice(nodes) for _ in range(rng.randint(1, 3)))))
    g.output(nodes[-1])
    return g


def _rewrite(rng: random.Random, g: fx.Graph) -> None:
    """What a fusion does: inline a small graph before an anchor (inputs may come later) and
    reroute some uses of older nodes to it."""
    body = [n for n in g.nodes if n.op == "call_function"]
    anchor = rng.choice(body)
    inputs = [rng.choice(body + [n for n in g.nodes if n.op == "placeholder"]) for _ in range(rng.randint(1, 3))]
    ancestors: set[fx.Node] = set()
    stack = list(inputs)
    while stack:
        x = stack.pop()
        if x not in ancestors:
            ancestors.add(x)
            stack.extend(x.all_input_nodes)
    sub = fx.Graph()
    cur = [sub.placeholder(f"q{i}") for i in range(len(inputs))]
    for _ in range(rng.randint(1, 3)):
        cur.append(sub.call_function(operator.mul, (rng.choice(cur), rng.choice(cur))))
    sub.output(cur[-1])
    (new,) = fx_utils.inline_graph(g, fx.GraphModule({}, sub), inputs, anchor)
    cands = [n for n in body if n not in ancestors and n is not anchor]
    for old in rng.sample(cands, min(len(cands), rng.randint(0, 2))):
        for u in list(old.users):
            if u.op != "output" and u not in ancestors:
                u.replace_input_with(old, new)


def test_local_toposort_equals_inductors_whole_graph_sort() -> None:
    from torch._inductor.pattern_matcher import stable_topological_sort

    local = 0
    orig = fx_utils._local_stable_toposort

    def counting(graph: fx.Graph, inserted: list[fx.Node]) -> bool:
        nonlocal local
        ok = orig(graph, inserted)
        local += ok
        return ok

    fx_utils._local_stable_toposort = counting
    try:
        for seed in range(300):
            n = random.Random(seed).randint(5, 60)
            g, ref = _random_graph(random.Random(seed), n), _random_graph(random.Random(seed), n)
            for step in range(random.Random(seed).randint(1, 4)):
                _rewrite(random.Random(seed * 100 + step), g)
                _rewrite(random.Random(seed * 100 + step), ref)
                fx_utils._INSERTED.pop(ref, None)
                stable_topological_sort(ref)
                fx_utils.stable_toposort(g)
                assert [x.name for x in g.nodes] == [x.name for x in ref.nodes], (seed, step)
                g.lint()
    finally:
        fx_utils._local_stable_toposort = orig
    assert local > 500  # the window sort ran (not the whole-graph fallback)
