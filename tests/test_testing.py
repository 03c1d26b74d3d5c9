"""fxfuse.testing: capture_graphs, assert_fused, stable graph text + golden snapshots, and saved
graphs that re-run through the passes without the model."""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

import pytest
import torch

import fxfuse
from fxfuse.testing import (
    assert_fused,
    assert_golden,
    capture_graphs,
    graph_text,
    load_graph,
    random_inputs,
    reapply,
    save_graph,
)

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import fxfuse_models as models  # noqa: E402

SAVED = pathlib.Path(__file__).parent / "graphs" / "saved"


def _dynamic_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    x, w = models.inputs(rows=6)
    torch._dynamo.mark_dynamic(x, 0)
    return x, w


@pytest.fixture(scope="module")
def caps() -> dict[str, Any]:
    """One compile per model, shared by the tests of this module."""
    out = {}
    for name, fn, args in [
        ("llama", models.llama, models.inputs()),
        ("two_norms", models.two_norms, models.inputs()),
        ("quant_pre_norm", models.quant_pre_norm, models.inputs()),
        ("llama_dynamic", models.llama, _dynamic_inputs()),
    ]:
        torch._dynamo.reset()
        out[name] = capture_graphs(fn, *args)
    return out


def _run(gm: torch.fx.GraphModule, args: list[Any]) -> list[Any]:
    out = gm(*args)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _same(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b):
        if isinstance(u, torch.Tensor):
            torch.testing.assert_close(u.float(), v.float(), atol=0, rtol=0)
        else:
            assert u == v


# ----------------------------------------------------------------------------- capture


def test_capture_before_after(caps: dict[str, Any]) -> None:
    cap = caps["llama"]
    assert cap.counters == {"rmsnorm_quant": 1}
    (g,) = cap.graphs
    assert isinstance(g.before, torch.fx.GraphModule) and isinstance(g.after, torch.fx.GraphModule)
    assert "aten.rsqrt(" in g.before_text and "fxfuse.rms_norm_quant" not in g.before_text
    assert "aten.rsqrt(" not in g.after_text and "fxfuse.rms_norm_quant(" in g.after_text
    assert g.report is not None and len(g.report.fusions) == 1
    # both snapshots are runnable and agree on real inputs (post-grad inputs: x, w)
    args = list(models.inputs())
    _same(_run(g.before, args), _run(g.after, args))


def test_graph_text_is_normalized(caps: dict[str, Any]) -> None:
    text = caps["llama"].graphs[0].before_text
    assert text.splitlines()[0] == "%arg0: bf16[4, 64] = input"
    assert "%mean: f32[4, 1] = aten.mean.dim(%pow, [-1], True)" in text
    assert "%pow_1" not in text  # tracer names (pow_1, ...) are replaced by per-op counters
    assert "%convert_1: bf16[4, 64] = convert(%mul, bf16)" in text
    dyn = caps["llama_dynamic"].graphs[0]
    assert "bf16[s0, 64]" in dyn.before_text and "bf16[s0, 64]" in dyn.after_text
    assert caps["llama_dynamic"].counters == {"rmsnorm_quant": 1}


def test_golden_snapshots(caps: dict[str, Any], golden: Any) -> None:
    for name in ("llama", "two_norms", "quant_pre_norm", "llama_dynamic"):
        golden(name, caps[name].after_text)


def test_golden_snapshots_stable_across_runs(caps: dict[str, Any]) -> None:
    again = capture_graphs(models.two_norms, *models.inputs())
    assert again.after_text == caps["two_norms"].after_text
    assert again.before_text == caps["two_norms"].before_text


def test_assert_golden_update_and_diff(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FXFUSE_UPDATE_GRAPHS", raising=False)
    p = tmp_path / "g.txt"
    with pytest.raises(AssertionError, match="no golden snapshot"):
        assert_golden(p, "a\n")
    monkeypatch.setenv("FXFUSE_UPDATE_GRAPHS", "1")
    assert_golden(p, "a\n")
    assert p.read_text() == "a\n"
    monkeypatch.delenv("FXFUSE_UPDATE_GRAPHS")
    assert_golden(p, "a\n")
    with pytest.raises(AssertionError, match=r"(?s)differs.*-a\n\+b"):
        assert_golden(p, "b\n")
    # a per-version snapshot wins over the generic one
    mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    (tmp_path / f"g.torch-{mm}.txt").write_text("b\n")
    assert_golden(p, "b\n")


# ----------------------------------------------------------------------------- assert_fused


def test_assert_fused_passes() -> None:
    cap = assert_fused(models.two_norms, *models.inputs(), expect={"rmsnorm_quant": 2})
    assert len(cap.report.fusions) == 2


def test_assert_fused_failure_shows_near_miss() -> None:
    with pytest.raises(AssertionError) as e:
        assert_fused(models.quant_pre_norm, *models.inputs(), expect={"rmsnorm_quant": 1})
    msg = str(e.value)
    assert "rmsnorm_quant: expected 1 fusion(s), got 0" in msg
    assert "quantization reads the pre-norm input" in msg


# ----------------------------------------------------------------------------- save / load / reapply


@pytest.mark.parametrize("name", ["llama", "llama_dynamic"])
def test_saved_graph_reapplies(caps: dict[str, Any], name: str, tmp_path: pathlib.Path) -> None:
    cap = caps[name]
    path = tmp_path / f"{name}.json"
    save_graph(path, cap.graphs[0].before)
    assert json.loads(path.read_text())["format"] == "fxfuse-graph/1"
    gm = load_graph(path)
    assert graph_text(gm) == cap.before_text
    assert all("val" in n.meta for n in gm.graph.nodes if n.op != "output")
    r = reapply(gm)
    assert r.counters == {"rmsnorm_quant": 1}
    assert r.text == cap.after_text
    assert r.report is not None and r.report.fusions[0].locations == cap.report.fusions[0].locations
    assert graph_text(gm) == cap.before_text  # reapply works on a copy
    args = random_inputs(gm)
    _same(_run(gm, args), _run(r.graph_module, args))


def test_saved_near_miss_reapplies_with_reason(caps: dict[str, Any], tmp_path: pathlib.Path) -> None:
    cap = caps["quant_pre_norm"]
    save_graph(tmp_path / "g.json", cap.graphs[0].before)
    r = reapply(load_graph(tmp_path / "g.json"))
    assert r.counters == {}
    assert [m.line() for m in r.report.near_misses] == cap.report.near_miss_lines()


def test_checked_in_graph_reapplies() -> None:
    """A graph saved once and checked in (as a user would attach to an issue) still fuses."""
    gm = load_graph(SAVED / "llama_before.json")
    r = reapply(gm, passes=fxfuse.FusionPasses(strict=True))
    assert r.counters == {"rmsnorm_quant": 1}
    args = random_inputs(gm)
    _same(_run(gm, args), _run(r.graph_module, args))


@pytest.mark.parametrize("name", ["dense_fp8", "moe"])
def test_on_fake_device_keeps_symbolic_shapes(sm90_target, name: str) -> None:
    """A graph captured with dynamic shapes moves to fake CUDA with its symbols (SymInt inputs pass
    through, sizes stay symbolic), so the passes' CUDA path is testable on a CPU machine at a
    symbolic token count: the demo models fuse there as they do at a static one."""
    from fxfuse import demo
    from fxfuse.testing import on_fake_device, post_grad_graph, triton_launches

    dm = demo.BUILDERS[name]("cpu", True, layers=1)
    ids = demo.random_ids(dm.vocab, 8, "cpu", seed=1).reshape(1, -1)
    gm = on_fake_device(post_grad_graph(dm.module, ids, dynamic=True))
    ph = [p.meta["val"] for p in gm.graph.nodes if p.op == "placeholder"]
    assert any(isinstance(v, torch.SymInt) for v in ph)
    toks = next(v for v in ph if isinstance(v, torch.Tensor) and v.dtype == torch.int64)
    assert toks.is_cuda and isinstance(toks.shape[-1], torch.SymInt)
    out = reapply(gm, passes=fxfuse.FusionPasses(strict=True, options={"gate": False}))
    want = {"dense_fp8": {"rmsnorm_quant": 2, "silu_mul_quant": 1, "rope_quant": 1},
            "moe": {"rope_quant": 1, "moe_routing": 1, "moe_experts": 1}}[name]
    assert {k: out.counters[k] for k in want} == want, fxfuse.report().near_miss_lines()
    launches = triton_launches(out.graph_module)
    assert launches and any(isinstance(v, torch.SymInt) for _, kw in launches for v in kw.values())
