"""benchmarks/survey_models.py: one transformers family through the survey (counters, details,
numerics), and a config that cannot be built is a row with its error, not a crash."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import survey_models  # noqa: E402


def test_qwen3_layer_fuses_rope_with_its_qk_norm() -> None:
    row = survey_models.survey("qwen3")
    assert "error" not in row, row
    assert row["counters"].get("rope_quant") == 1, row
    assert any("+qk_norm" in f for f in row["fusions"]), row
    assert row["rel_err"] < 2e-2 and row["argmax_agree"] > 0.9, row


def test_unbuildable_config_is_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(survey_models.MODELS, "bogus", ("NoSuchConfig", {}))
    row = survey_models.survey("bogus")
    assert row["error"].startswith("AttributeError"), row


def test_gpt_oss_layer_rope_fuses_and_biased_experts_say_why() -> None:
    """GPT-OSS as transformers builds it: its chunk-form RoPE fuses; its experts (bias added to
    gate_up, clamped SwiGLU) are a different function, and the near miss says which part."""
    row = survey_models.survey("gpt_oss")
    assert "error" not in row, row
    assert row["counters"].get("rope_quant") == 1 and "moe_experts" not in row["counters"], row
    assert any(m.startswith("moe_experts:") and "bias" in m for m in row["near_misses"]), row["near_misses"]
    assert row["rel_err"] < 2e-2, row


def test_phimoe_sparsemixer_router_says_why() -> None:
    """PhiMoE's sparsemixer router (a masked max per slot, no topk) cannot fuse: the experts still
    fuse and the report names the router as a routing near miss instead of saying nothing."""
    row = survey_models.survey("phimoe")
    assert "error" not in row, row
    assert row["counters"].get("moe_experts") == 1 and "moe_routing" not in row["counters"], row
    assert any(m.startswith("moe_routing:") and "not a top-k" in m and "max" in m
               for m in row["near_misses"]), row["near_misses"]


def test_topk_router_has_no_router_near_miss() -> None:
    """A top-k router that fuses (Qwen3-MoE) gets no such line."""
    row = survey_models.survey("qwen3_moe")
    assert "error" not in row, row
    assert row["counters"].get("moe_routing") == 1, row
    assert not any(m.startswith("moe_routing:") for m in row["near_misses"]), row["near_misses"]
