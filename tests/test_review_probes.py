"""Adversarial probes of the compile-time caches, the row-preserving flatten before the quant and
lifted scalars under dynamic=True (review of 2026-12-01). Each compares with eager (or stock
Inductor where the graph stays unfused) and asserts the fusion count.

The cache probes put rewrites that differ in one detail into ONE graph: a trace-cache or
fake-cache entry shared across a difference the key misses would give one layer another's code.
"""

from __future__ import annotations

import operator
import pathlib
import random
import re

import pytest
import torch
import torch.fx as fx
from torch._inductor.utils import fresh_cache

import fxfuse
from forms import FP8, NORMS, QUANTS, _group, assert_identical, dequant_close, make_inputs, norm_hf, stock_compile

H = 128


def _compile(fn, args, dyn_dims=(), **kw):
    torch._dynamo.reset()
    fxfuse.counters.clear()
    fxfuse.report.clear()
    for a, d in dyn_dims:
        torch._dynamo.mark_dynamic(a, d)
    with fresh_cache(), torch.no_grad():
        f = torch.compile(fn, options={"post_grad_custom_pre_pass": fxfuse.passes}, fullgraph=True, **kw)
        return f, f(*args)


def _reasons() -> list[str]:
    return [m.reason for m in fxfuse.report().near_misses]


def _q_static_const(c: float):
    def q(y, scale):
        return ((y.float() / c).clamp(-448.0, 448.0).to(FP8),)

    return q


def _q_clamp(lim: float):
    def q(y, scale):
        return ((y.float() / scale).clamp(-lim, lim).to(FP8),)

    return q


# (name, quant, eps, input transform) per layer; each layer reads its own input tensor
LAYERS = [
    ("token-eps1e-6", QUANTS["token"], 1e-6, None),
    ("token-eps1e-1", QUANTS["token"], 1e-1, None),
    ("token-eps1e-6-again", QUANTS["token"], 1e-6, None),  # identical: the trace is reused
    ("static0.05", _q_static_const(0.05), 1e-6, None),
    ("static0.02", _q_static_const(0.02), 1e-6, None),
    ("clamp448", _q_clamp(448.0), 1e-6, None),
    ("clamp100", _q_clamp(100.0), 1e-6, None),
    ("int8-token", QUANTS["int8_token"], 1e-6, None),
    ("group64", _group(64), 1e-6, None),
    ("group128", _group(128), 1e-6, None),
    ("fp16", QUANTS["token"], 1e-6, "half"),
    ("residual", QUANTS["token"], 1e-6, "residual"),
]


def _layers_model(x, res, w, scale):
    """Each layer reads its own scaled copy of x (one token symbol for all, as in a model)."""
    outs = []
    for i, (_, qf, eps, how) in enumerate(LAYERS):
        xi, ww = (x.half(), w.half()) if how == "half" else (x, w)
        xi = xi * (1.0 + 0.25 * i)  # one rounding, as in eager
        if how == "residual":
            h = xi + res
            outs += [*qf(norm_hf(h, ww, eps), scale), h]
        else:
            outs += qf(norm_hf(xi, ww, eps), scale)
    return tuple(outs)


@pytest.mark.parametrize("dyn", [False, True], ids=["static", "dyn-tokens"])
def test_cache_layers_differing_in_one_detail_each_match_eager(dyn):
    from fxfuse.fx_utils import trace_stats
    from fxfuse.kernels import fake_cache

    args = make_inputs((2, 3), H, torch.bfloat16, seed=4)
    x, res, w, scale = args
    trace_stats.clear()
    hits = fake_cache.stats["hits"]
    f, out = _compile(_layers_model, args, [(x, 1), (res, 1)] if dyn else ())
    assert fxfuse.counters["rmsnorm_quant"] == len(LAYERS), _reasons()
    assert trace_stats["reused"] >= 1, trace_stats  # the identical layer exercised the cache
    if not dyn:
        assert fake_cache.stats["hits"] > hits  # and the CPU fake-output cache
    with torch.no_grad():
        ref = _layers_model(*args)
    assert not dequant_close(tuple(out), tuple(ref)), dequant_close(tuple(out), tuple(ref))
    if dyn:  # another token count through the same graph
        args2 = make_inputs((2, 5), H, torch.bfloat16, seed=5)
        with torch.no_grad():
            assert not dequant_close(tuple(f(*args2)), tuple(_layers_model(*args2)))


def test_cache_symbolic_and_static_token_dims_in_one_graph():
    """Same-sized inputs, one with a symbolic token dim and one static, and (duck shaping off) two
    different symbols with the same hint: identical rewrites otherwise, each its own written shape."""
    qf = QUANTS["token"]

    def fn(a, b, c, w, scale):
        return (*qf(norm_hf(a, w, 1e-6), scale), *qf(norm_hf(b, w, 1e-6), scale), *qf(norm_hf(c, w, 1e-6), scale))

    g = torch.Generator().manual_seed(7)
    a, b, c = (torch.randn(4, H, generator=g).to(torch.bfloat16) for _ in range(3))
    w = (1.0 + 0.2 * torch.randn(H, generator=g)).to(torch.bfloat16)
    scale = torch.tensor(0.02)
    with torch.fx.experimental._config.patch(use_duck_shape=False):
        f, out = _compile(fn, (a, b, c, w, scale), [(a, 0), (c, 0)])
        assert fxfuse.counters["rmsnorm_quant"] == 3, _reasons()
        with torch.no_grad():
            assert not dequant_close(tuple(out), tuple(fn(a, b, c, w, scale)))
            a2, c2 = torch.randn(6, H, generator=g).to(torch.bfloat16), torch.randn(9, H, generator=g).to(torch.bfloat16)
            out2 = f(a2, b, c2, w, scale)
            assert [tuple(t.shape) for t in out2] == [(6, H), (6, 1), (4, H), (4, 1), (9, H), (9, 1)]
            assert not dequant_close(tuple(out2), tuple(fn(a2, b, c2, w, scale)))


# ----------------------------------------------------------------------------- windowed toposort


def _random_graph(rng: random.Random) -> fx.Graph:
    g = fx.Graph()
    nodes = [g.placeholder(f"p{i}") for i in range(2)]
    for _ in range(rng.randint(5, 25)):
        k = rng.randint(1, 2)
        args = tuple(rng.choice(nodes) for _ in range(k))
        nodes.append(g.call_function(operator.add if k == 2 else operator.neg, args))
    g.output(tuple(nodes[-3:]))
    return g


def _random_rewrite(g: fx.Graph, rng: random.Random) -> list[fx.Node]:
    """As the passes do: insert nodes before an anchor, reroute uses of nearby old nodes to them
    (users may sit before the anchor), and sometimes a size read after a new node with uses
    rerouted to it (`reroute_shape_reads`). Returns every created node."""
    nodes = [n for n in g.nodes if n.op == "call_function"]
    before = rng.choice(nodes)
    idx = nodes.index(before)
    ins: list[fx.Node] = []
    with g.inserting_before(before):
        avail = [n for n in g.nodes if n < before]
        for _ in range(rng.randint(1, 3)):
            ins.append(g.call_function(operator.pos, (rng.choice(avail + ins),)))
    for _ in range(rng.randint(1, 3)):
        old, new = rng.choice(nodes[max(0, idx - 4): idx + 4]), rng.choice(ins)
        for u in list(old.users):
            if rng.random() < 0.7 and u not in ins:
                u.replace_input_with(old, new)
    if rng.random() < 0.5:
        q = rng.choice(ins)
        with g.inserting_after(q):
            s = g.call_function(operator.abs, (q,))
        tgt = rng.choice(nodes)
        for u in list(tgt.users):
            if u is not s:
                u.replace_input_with(tgt, s)
        ins.append(s)
    return ins


def test_windowed_toposort_equals_inductor_sort_on_random_rewrites():
    from torch._inductor.pattern_matcher import stable_topological_sort

    from fxfuse.fx_utils import _local_stable_toposort

    checked = 0
    for seed in range(600):
        g_full = _random_graph(random.Random(seed * 2 + 1))
        _random_rewrite(g_full, random.Random(seed))
        try:
            stable_topological_sort(g_full)
        except AssertionError:  # the random reroute made a cycle
            continue
        g = _random_graph(random.Random(seed * 2 + 1))
        created = _random_rewrite(g, random.Random(seed))
        if not _local_stable_toposort(g, created):
            stable_topological_sort(g)
        assert [n.name for n in g.nodes] == [n.name for n in g_full.nodes], seed
        checked += 1
    assert checked > 400


def test_patterns_record_every_node_they_create_outside_inline_graph():
    """The windowed sort only sees recorded nodes: a pattern that creates a node itself
    (graph.call_function / create_node / node_copy) must call record_inserted."""
    root = pathlib.Path(fxfuse.__file__).parent / "patterns"
    create = re.compile(r"\.(call_function|call_method|call_module|create_node|node_copy|graph_copy|get_attr)\(")
    for p in sorted(root.glob("*.py")):
        src = p.read_text()
        if create.search(src):
            assert "record_inserted(" in src, f"{p.name} creates FX nodes without record_inserted"


# ----------------------------------------------------------------------------- flatten before the quant


def _flat(y):
    return y.reshape(-1, y.shape[-1])


def _q_group_rows(g: int):
    """Groups taken from the flattened rows (`y.reshape(-1, g)`), not per row: only equal to a
    per-row group quant when g divides H."""

    def q(y, scale):
        yg = y.reshape(-1, g).float()
        s = (yg.abs().amax(-1, keepdim=True) / 448.0).clamp(min=1e-10)
        return (yg / s).clamp(-448.0, 448.0).to(FP8).reshape(y.shape), s

    return q


qt = QUANTS["token"]
FLAT_NEAR = {
    "transposed-y": ((4, 4), H, lambda x, r, w, s: qt(_flat(norm_hf(x, w, 1e-6).transpose(0, 1)), s),
                     "reads a different tensor"),
    "merge-heads": ((2, 3, 2), 64, lambda x, r, w, s: qt(norm_hf(x, w, 1e-6).reshape(6, 128), s),
                    "changes the last dim"),
    "flat-view-used-twice": ((2, 5), H, lambda x, r, w, s: (lambda yf: (*qt(yf, s), yf * 2))(_flat(norm_hf(x, w, 1e-6))),
                             "used elsewhere"),
    "group-not-dividing-H": ((2, 4), 96, lambda x, r, w, s: _q_group_rows(64)(_flat(norm_hf(x, w, 1e-6)), s),
                             "changes the last dim"),
}


@pytest.mark.parametrize("name", list(FLAT_NEAR))
def test_flatten_near_misses_stay_unfused_and_exact(name):
    lead, hidden, fn, reason = FLAT_NEAR[name]
    args = make_inputs(lead, hidden, torch.bfloat16, seed=3)
    _, out = _compile(fn, args)
    assert fxfuse.counters["rmsnorm_quant"] == 0
    assert any(reason in r for r in _reasons()), _reasons()
    assert_identical(tuple(out), stock_compile(fn, args))


def _swap_token_dims(x, r, w, s):
    y = norm_hf(x, w, 1e-6)
    return qt(y.reshape(x.shape[0], x.shape[2], x.shape[1], -1), s)


def _sizes_used_later(x, r, w, s):
    yf = _flat(norm_hf(x, w, 1e-6))
    q, sc = qt(yf, s)
    return q.reshape(x.shape), sc.reshape(*x.shape[:-1], 1), q.float() * sc, torch.zeros(sc.shape[0], yf.shape[1]) + sc.sum()


FLAT_FUSE = {
    "3lead-2sym-flat": ((2, 3, 4), (1, 2), lambda x, r, w, s: qt(_flat(norm_hf(x, w, 1e-6)), s)),
    "3lead-2sym-swap": ((2, 3, 4), (1, 2), _swap_token_dims),
    "sizes-used-later": ((2, 5), (1,), _sizes_used_later),
    "group-scale-reshaped": ((2, 5), (1,), lambda x, r, w, s: (lambda q, sc: (q, sc.reshape(q.shape[0], -1), sc.new_zeros(sc.shape)))(
        *_group(64)(_flat(norm_hf(x, w, 1e-6)), s))),
}


@pytest.mark.parametrize("name", list(FLAT_FUSE))
def test_flatten_forms_fuse_and_track_eager_across_sizes(name):
    lead, dyn, fn = FLAT_FUSE[name]
    args = make_inputs(lead, H, torch.bfloat16, seed=3)
    f, out = _compile(fn, args, [(args[0], d) for d in dyn])
    assert fxfuse.counters["rmsnorm_quant"] == 1, _reasons()
    with torch.no_grad():
        assert not dequant_close(tuple(out), tuple(fn(*args)))
        lead2 = tuple(v + (2 + i if i in dyn else 0) for i, v in enumerate(lead))
        args2 = make_inputs(lead2, H, torch.bfloat16, seed=4)
        out2 = f(*args2)
        assert not dequant_close(tuple(out2), tuple(fn(*args2))), dequant_close(tuple(out2), tuple(fn(*args2)))


# ----------------------------------------------------------------------------- lifted scalars (dynamic=True)


class _Lifted(torch.nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.kind = kind
        self.eps, self.fp8_max, self.scale, self.ub = 1e-6, 448.0, 0.02, 0.05
        if kind == "int-fp8-max":
            self.fp8_max = 448
        self.weight = torch.nn.Parameter((1.0 + 0.2 * torch.randn(64, generator=g)).to(torch.bfloat16))

    def forward(self, x):
        k = self.kind
        y = norm_hf(x.float(), self.weight.float(), self.eps).to(x.dtype) if k == "eps-fp32-input" else norm_hf(
            x, self.weight, self.eps)
        if k == "scale-used-elsewhere":
            return (y.float() / self.scale).clamp(-448.0, 448.0).to(FP8), x.float() * self.scale
        if k == "eps-used-elsewhere":
            return (y.float() / self.scale).clamp(-448.0, 448.0).to(FP8), x.float() + self.eps
        if k == "ub-and-lifted":
            amax = torch.minimum(y.abs().amax(-1, keepdim=True).float(), torch.tensor(self.ub))
            s = (amax / self.fp8_max).clamp(min=1e-12)
            return (y.float() / s).clamp(-448.0, 448.0).to(FP8), s
        if k == "rdiv-torchao":  # the lifted value divided by the amax (RDIV slot), a multiply by it
            s = self.fp8_max / torch.clamp(y.abs().amax(-1, keepdim=True).float(), min=1e-12)
            return (y.float() * s).clamp(-448.0, 448.0).to(FP8), s.reciprocal()
        if k == "mul-inverse":
            s = (y.abs().amax(-1, keepdim=True).float() * (1.0 / self.fp8_max)).clamp(min=1e-12)
            return (y.float() / s).clamp(-448.0, 448.0).to(FP8), s
        s = (y.abs().amax(-1, keepdim=True).float() / self.fp8_max).clamp(min=1e-12)
        return (y.float() / s).clamp(-448.0, 448.0).to(FP8), s


def _bits(a, b):
    a, b = (a.float(), b.float()) if a.dtype == FP8 else (a, b)
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


LIFTED = [("int-fp8-max", 1), ("eps-fp32-input", 1), ("scale-used-elsewhere", 1), ("eps-used-elsewhere", 1),
          ("ub-and-lifted", 0), ("rdiv-torchao", 1), ("mul-inverse", 1)]


@pytest.mark.parametrize("kind,fused", LIFTED, ids=[k for k, _ in LIFTED])
def test_lifted_scalars_track_eager_when_changed(kind, fused):
    m = _Lifted(kind)
    g = torch.Generator().manual_seed(17)
    x1 = torch.randn(4, 64, generator=g).to(torch.bfloat16)
    x2 = (0.1 * torch.randn(6, 64, generator=g)).to(torch.bfloat16)
    f, out1 = _compile(m, (x1,), dynamic=True)
    assert fxfuse.counters["rmsnorm_quant"] == fused, _reasons()
    if not fused:
        assert any("more than one runtime value" in r for r in _reasons()), _reasons()
    with torch.no_grad():
        ref1 = m(x1)
        m.eps, m.scale, m.ub = 0.5, 0.5, 0.01
        m.fp8_max = 100 if kind == "int-fp8-max" else 100.0  # an int attribute is a guard: recompiles
        out2, ref2 = f(x2), m(x2)
    for out, ref in ((out1, ref1), (out2, ref2)):
        assert all(_bits(a, b) for a, b in zip(out, ref)), kind


def test_uuid_covers_the_ungated_switch(monkeypatch):
    """FXFUSE_UNGATED decides CUDA rewrites: Inductor's FX graph cache must not serve a graph
    compiled under the other setting."""
    monkeypatch.delenv("FXFUSE_UNGATED", raising=False)
    base = fxfuse.FusionPasses().uuid()
    monkeypatch.setenv("FXFUSE_UNGATED", "1")
    assert fxfuse.FusionPasses().uuid() != base


def test_silu_chunk_of_a_symbolic_row_is_a_near_miss_not_an_internal_error():
    """dynamic=True on the gate/up input makes its last dim symbolic: the split sizes are graph
    nodes (was: TypeError in _half_of, candidate skipped as an internal error)."""

    def fn(gu):
        g, u = gu.chunk(2, -1)
        y = torch.nn.functional.silu(g) * u
        s = (y.abs().amax(-1, keepdim=True).float() / 448.0).clamp(min=1e-12)
        return (y.float() / s).clamp(-448.0, 448.0).to(FP8), s

    x = torch.randn(2, 3, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    torch._dynamo.reset()
    fxfuse.counters.clear()
    fxfuse.report.clear()
    with fresh_cache(), torch.no_grad():
        strict = fxfuse.FusionPasses(strict=True)  # an internal error raises
        out = torch.compile(fn, dynamic=True, options={"post_grad_custom_pre_pass": strict})(x)
        torch._dynamo.reset()
        ref = torch.compile(fn, dynamic=True)(x)
    assert fxfuse.counters["silu_mul_quant"] == 0
    assert _reasons(), "a near miss says why"
    assert_identical(tuple(out), tuple(ref))
