"""Benchmark gating by token-count class: a fused kernel ships for a call only where every class
the call may run in measured faster than stock Inductor (a geomean over M hid small-M losses)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import fxfuse
from forms import q_token
from fxfuse import gating

BF16 = torch.bfloat16


def _symbolic_int() -> torch.SymInt:
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    env = ShapeEnv()
    sym = env.create_symbol(37, source=ConstantSource("M"), dynamic_dim=DimDynamic.DYNAMIC)
    return env.create_symintnode(sym, hint=37)


def test_m_classes():
    assert gating.m_classes(1) == ["M<=16"]
    assert gating.m_classes(16) == ["M<=16"]
    assert gating.m_classes(17) == ["M<=256"]
    assert gating.m_classes(256) == ["M<=256"]
    assert gating.m_classes(1000) == ["M<=256", "M>=4096"]  # between measured classes: both
    assert gating.m_classes(4096) == ["M>=4096"]
    assert gating.m_classes(1 << 20) == ["M>=4096"]
    assert gating.m_classes(_symbolic_int()) == ["M<=16", "M<=256", "M>=4096"]
    assert [gating.m_class(m) for m in (1, 200, 300, 5000)] == ["M<=16", "M<=256", "M>=4096", "M>=4096"]


@pytest.fixture
def table(tmp_path, monkeypatch):
    """A gates table of our own (the measured one changes with every GPU run)."""

    def use(t: dict) -> None:
        path = tmp_path / "gates.json"
        path.write_text(json.dumps(t))
        monkeypatch.setattr(gating, "GATES_PATH", path)
        gating.reload()

    yield use
    monkeypatch.undo()
    gating.reload()


def test_rejects_by_class(table):
    table({"fam": {"s": {"64": 1.2}, "s/M<=16": {"64": 0.8}, "s/M<=256": {"64": 1.1}, "s/M>=4096": {"64": 1.3}},
           "old": {"s": {"64": 1.2}}})
    why = gating.rejects("fam", scheme="s", hidden=64, dtype=BF16, M=1)
    assert why and "s/M<=16" in why and "0.80x" in why
    assert gating.rejects("fam", scheme="s", hidden=64, dtype=BF16, M=256) is None
    assert gating.rejects("fam", scheme="s", hidden=64, dtype=BF16, M=8192) is None
    assert gating.rejects("fam", scheme="s", hidden=64, dtype=BF16, M=_symbolic_int()) is not None  # any M: needs all
    assert gating.rejects("fam", scheme="s", hidden=64, dtype=BF16) is None  # no M: the geomean decides
    # a table without classes keeps gating by the per-scheme figure
    assert gating.rejects("old", scheme="s", hidden=64, dtype=BF16, M=1) is None
    assert gating.rejects("fam", scheme="s", hidden=64, dtype=BF16, M=1, enabled=False) is None


def _fake_cuda_silu_graph(M: int):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fxfuse.fx_utils import trace_aten

    def model(g, u, scale):
        return q_token(F.silu(g) * u, scale)

    with FakeTensorMode():
        args = (torch.empty(M, 768, dtype=BF16, device="cuda"), torch.empty(M, 768, dtype=BF16, device="cuda"),
                torch.empty((), dtype=torch.float32, device="cuda"))
        return trace_aten(model, args, functionalize=True)


def test_silu_mul_quant_gated_per_m_class(table):
    """On CUDA, per-token silu*up+quant at I=768 ships at M=4096 (measured faster) and is a near
    miss naming the class at M=1 (measured slower)."""
    table({"silu_mul_quant": {"per-token": {"768": 1.08}, "per-token/M<=16": {"768": 0.7},
                              "per-token/M<=256": {"768": 0.83}, "per-token/M>=4096": {"768": 1.5}}})
    for M, fused in ((4096, 1), (1, 0)):
        gm = _fake_cuda_silu_graph(M)
        fxfuse.counters.clear()
        fxfuse.report.clear()
        fxfuse.passes(gm.graph)
        assert fxfuse.counters["silu_mul_quant"] == fused, (M, fxfuse.report())
        if not fused:
            why = [m.reason for m in fxfuse.report().near_misses]
            assert any("per-token/M<=16" in w and "0.70x" in w for w in why), why


def test_shipped_plain_rope_gates_by_head_dim_and_tokens() -> None:
    """The shipped table: plain RoPE (no quant) is left to Inductor at decode, where stock folds it
    into the attention prologue (in-model profile; head_dim 64 takes that ratio as a proxy), and
    ships from 256 tokens on, for the measured head_dims 64 (GPT-OSS), 128 and 256 alike."""
    for hd in (64, 128):
        assert gating.rejects("rope_quant", scheme="rope", hidden=hd, dtype=torch.bfloat16, M=1) is not None, hd
    for hd in (64, 128, 256):
        for M in (256, 4096):
            assert gating.rejects("rope_quant", scheme="rope", hidden=hd, dtype=torch.bfloat16, M=M) is None, (hd, M)
        assert gating.rejects("rope_quant", scheme="rope_fp8_dynamic", hidden=hd, dtype=torch.bfloat16, M=1) is None
