"""Cheap CPU checks of the demo's fp8 linear and of benchmarks/e2e.py + plot_e2e.py helpers
(the GPU run is one batched call: a typo there costs device time)."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest
import torch

from fxfuse import demo

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import e2e  # noqa: E402
import plot_e2e  # noqa: E402


def test_fp8_linear_matches_dequantized_reference() -> None:
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=True).to(torch.bfloat16)
    x = torch.randn(2, 5, 64, generator=g).to(torch.bfloat16)
    f = demo.Fp8Linear.from_linear(lin)
    assert f.weight.dtype == demo.FP8 and f.weight_scale.shape == (1, 48)
    y = f(x)
    assert y.shape == (2, 5, 48) and y.dtype == torch.bfloat16
    ref = x.float() @ lin.weight.float().t() + lin.bias.float()
    rel = ((y.float() - ref).norm() / ref.norm()).item()
    assert 1e-4 < rel < 0.08, rel  # fp8 error is there (it did quantize), and small


def test_swap_keeps_lm_head_and_embeddings() -> None:
    dm = demo.build_dense("cpu", True, fp8_backend="fxfuse-demo", layers=1)
    mods = dict(dm.module.named_modules())
    assert isinstance(mods["model.lm_head"], torch.nn.Linear)
    assert isinstance(mods["model.model.embed_tokens"], torch.nn.Embedding)
    fp8 = [n for n, m in mods.items() if isinstance(m, demo.Fp8Linear)]
    assert len(fp8) == 7, fp8  # q k v o gate up down
    assert not [n for n, m in mods.items() if type(m) is torch.nn.Linear and n != "model.lm_head"]


def test_logits_error() -> None:
    a = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    e = demo.logits_error(a, a)
    assert e == {"max_rel_err": 0.0, "argmax_agree": 1.0, "finite": True}
    b = a.clone()
    b[1, 0] = 0.0  # second token's argmax moves
    e = demo.logits_error(b, a)
    assert e["argmax_agree"] == 0.5 and e["max_rel_err"] == pytest.approx(3 / 14**0.5)


def test_kernel_names_and_profile_on_cpu() -> None:
    assert "_rms_norm_quant_kernel" in demo.fxfuse_kernel_names()
    p = e2e.profile_share(lambda: torch.ones(8) * 2, "cpu", iters=2)
    assert p["fxfuse_share"] is None and p["kernel_us_per_step"] is None


def _fake_result() -> dict:
    rows = []
    for kind, m, sp in [("decode", 1, 1.2), ("decode", 8, 1.1), ("prefill", 2048, 0.98)]:
        rows.append({"model": "moe", "kind": kind, "M": m, "us": {"compile": 10.0, "fxfuse": 10.0 / sp},
                     "speedup_vs_compile": {"compile": 1.0, "fxfuse": sp, "eager": 0.5},
                     "compile_overhead": 0.05 if m == 1 else None, "fxfuse_pass_share_of_compile": 0.01,
                     "compile_s": {"compile": 20.0, "fxfuse": 21.0}, "fxfuse_pass_s": 0.2,
                     "err": {"fxfuse": {"max_rel_err": 1e-3}}})
    return {"gpu": "fake", "torch": "x", "models": [{"model": "moe", "title": "t", "rows": rows, "counters": {}}]}


def test_summarize() -> None:
    s = e2e.summarize(_fake_result()["models"])
    assert s["moe_decode_geomean_fxfuse_vs_compile"] == pytest.approx((1.2 * 1.1) ** 0.5)
    assert s["moe_prefill_min_fxfuse_vs_compile"] == pytest.approx(0.98)
    assert s["moe_max_compile_overhead"] == pytest.approx(0.05)


def test_steps() -> None:
    st = e2e.steps([1, 8], [2048])
    assert [(s.kind, s.batch, s.seq, s.tokens) for s in st] == [
        ("decode", 1, 1, 1), ("decode", 8, 1, 8), ("prefill", 1, 2048, 2048)]


def test_plot(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("matplotlib")
    src = tmp_path / "r.json"
    src.write_text(json.dumps(_fake_result()))
    png = tmp_path / "r.png"
    plot_e2e.main([str(src), str(src), str(png)])
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_plot_latest_row_per_kind_and_m() -> None:
    """Runs of one model merge into one panel: the newer run's row wins where both measured the same
    (kind, M); rows only the older run has stay; leave-one-out variants are not plotted."""
    old, new = _fake_result(), _fake_result()
    old["date"], new["date"] = "2026-12-01T10:00", "2026-12-01T20:00"
    new["models"][0]["rows"] = [dict(new["models"][0]["rows"][0], speedup_vs_compile={
        "compile": 1.0, "fxfuse": 1.5, "fxfuse_no_rope_quant": 1.4})]
    for order in ([old, new], [new, old]):
        got = plot_e2e.latest(order)
        assert len(got["models"]) == 1
        pts = plot_e2e.series(got["models"][0])
        assert pts["fxfuse"] == [(1, 1.5, "decode"), (8, 1.1, "decode"), (2048, 0.98, "prefill")]
        assert "fxfuse_no_rope_quant" not in pts and got["date"] == new["date"]


def test_demo_format_result_latency_table() -> None:
    r = demo.ModelResult("m", "Title", ["note"], counters={"rmsnorm_quant": 2}, report_text="REPORT",
                         numerics={"fxfuse": {"max_rel_err": 1e-3, "argmax_agree": 1.0, "finite": False}},
                         latency_us={"1": {"eager": 100.0, "stock": 50.0, "fxfuse": 40.0},
                                     "512": {"eager": 900.0, "stock": None, "fxfuse": 800.0}})
    text = demo.format_result(r)
    assert "fxfuse.counters: rmsnorm_quant=2" in text and "REPORT" in text and "NON-FINITE" in text
    assert "decode 1" in text and "1.250x" in text
    assert [ln for ln in text.splitlines() if "prefill 512" in ln][0].rstrip().endswith("n/a")


@pytest.mark.parametrize("name", sorted(demo.BUILDERS))
def test_builders_run_eager_on_cpu(name: str) -> None:
    dm = demo.BUILDERS[name]("cpu", True, layers=1)
    ids = demo.random_ids(dm.vocab, 5, "cpu", seed=0)
    with torch.no_grad():
        out = dm.module(ids)
    assert out.shape == (1, 5, dm.vocab) and torch.isfinite(out.float()).all()


def test_markdown_section() -> None:
    text = "\n".join(plot_e2e.markdown(_fake_result(), "benchmarks/results/e2e.png"))
    assert "| decode | 1 |" in text and "1.200x" in text and "![speedup vs tokens]" in text
    assert "Cold compile (decode M=1)" in text and "+5.0%" in text


def test_llama_layer_bench_subset_args_and_incremental_json(tmp_path: pathlib.Path) -> None:
    """bench_llama_fp8_layer: --tokens/--schemes parse (bad values are argparse errors), and the
    JSON is replaced atomically (a kill mid-run leaves the last complete version, no temp file)."""
    import argparse

    import bench_llama_fp8_layer as B

    assert B._int_list("1,16,4096") == [1, 16, 4096]
    assert B._schemes("tensor") == ["tensor"] and B._schemes("row,tensor") == ["row", "tensor"]
    for bad in ("0", "1,x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            B._int_list(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        B._schemes("row,blockwise")
    out = tmp_path / "res" / "layer.json"
    B.write_json(out, dict(cases=[dict(tokens=1)], complete=False))
    B.write_json(out, dict(cases=[dict(tokens=1), dict(tokens=16)], complete=False))
    assert [c["tokens"] for c in json.loads(out.read_text())["cases"]] == [1, 16]
    assert [p.name for p in out.parent.iterdir()] == ["layer.json"]


def test_in_model_gates(tmp_path: pathlib.Path) -> None:
    """The in-model RoPE gate sums RoPE-related kernels on both sides, refuses a cut-short kernel
    list, and never raises the isolated bench's figure."""
    import in_model_gates as g

    assert g.rope_related("_rope_quant_kernel") and g.rope_related("triton_poi_fused__scaled_dot_product_x")
    assert g.rope_related("triton_poi_fused_bmm_cat_cos_mul_sin_3") and not g.rope_related("nvjet_sm90_gemm")
    full = {"kernel_us_per_step": 10.0, "top_kernels": [["nvjet_gemm", 6.0], ["triton_poi_fused__scaled_dot_product_a", 4.0]]}
    fx = {"kernel_us_per_step": 11.0, "top_kernels": [["nvjet_gemm", 6.0], ["_rope_quant_kernel", 3.0],
                                                      ["triton_poi_fused__scaled_dot_product_b", 2.0]]}
    assert g.side_us(full) == 4.0 and g.side_us(fx) == 5.0
    assert g.side_us({"kernel_us_per_step": 20.0, "top_kernels": full["top_kernels"]}) is None  # cut short
    doc = {"gpu": "G", "date": "D", "torch": "T", "models": [{"model": "dense_fp8", "rows": [
        {"kind": "decode", "M": 1, "profile_compile": full, "profile": fx},
        {"kind": "prefill", "M": 2048, "profile_compile": full, "profile": full}]}]}
    src = tmp_path / "e2e.json"
    src.write_text(json.dumps(doc))
    rows = g.in_model_ratios([str(src)])
    assert [(r["M"], r["ratio"], r["head_dim"]) for r in rows] == [(1, 0.8, 128)]  # older result: HEAD_DIM
    doc2 = {**doc, "models": [{**doc["models"][0], "model": "moe", "head_dim": 64}]}  # e2e.py records it now
    src2 = tmp_path / "e2e2.json"
    src2.write_text(json.dumps(doc2))
    assert [(r["model"], r["head_dim"]) for r in g.in_model_ratios([str(src2)])] == [("moe", 64)]
    out = tmp_path / "gate.json"
    for iso_fig, want in ((1.42, 0.8), (0.5, 0.5)):  # the smaller of the isolated and in-model figures
        iso = tmp_path / "rope.json"
        iso.write_text(json.dumps({"summary": {"geomean_speedup_vs_compile": {"rope": {"128/M<=16": iso_fig}}}}))
        sys.argv = ["in_model_gates.py", str(src), "--out", str(out), "--isolated", str(iso)]
        g.main()
        res = json.loads(out.read_text())
        assert res["gates_merge"] and res["family"] == "rope_quant"
        assert res["gates"]["rope/M<=16"]["128"] == want


def test_tune_moe_decode_two_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode sweep's two stages: the second runs on top of the first's best, a wrong (not ok)
    config never wins however fast, and a stage keeps its start when nothing beats it."""
    import tune_moe_decode as T

    def fake(args, cfg, ref, rep, path=None):
        us = 10.0 - cfg.get("A", 0) - 2 * cfg.get("B", 0)
        return dict(cfg=cfg, us=us, ok=cfg.get("A") != 9)

    monkeypatch.setattr(T, "time_cfg", fake)
    base = dict(cfg={}, us=10.0, ok=True)
    rows1, rows2, best1, best = T.two_stage((), None, 1, [{"A": 1}, {"A": 2}, {"A": 9}], [{"B": 1}, {"B": 3}], base)
    assert best1["cfg"] == {"A": 2} and [r["cfg"] for r in rows2] == [{"A": 2, "B": 1}, {"A": 2, "B": 3}]
    assert best["cfg"] == {"A": 2, "B": 3} and best["us"] == 2.0
    _, _, best1, best = T.two_stage((), None, 1, [{"A": -1}], [{"B": -1}], base)
    assert best1 is base and best is base


def test_interleaved_timing_round_robin() -> None:
    """Variants are timed A B C, A B C, ... (a drift shifts them alike); a variant that raises
    leaves the later rounds and comes back as an error, the others keep every round."""
    order: list[str] = []
    clock = iter(range(100))

    def fake_time(fn) -> float:
        name = fn()
        order.append(name)
        if name == "bad" and len(order) > 3:
            raise RuntimeError("graph capture failed")
        return 10.0 + next(clock)  # a steady drift upwards

    fns = {k: (lambda k=k: k) for k in ("a", "b", "bad")}
    samples, errors = e2e.interleaved_us(fns, 3, fake_time)
    assert order == ["a", "b", "bad", "a", "b", "bad", "a", "b"]
    assert set(samples) == {"a", "b"} and list(errors) == ["bad"]
    assert samples["a"] == [10.0, 13.0, 15.0] and samples["b"] == [11.0, 14.0, 16.0]
    one, _ = e2e.interleaved_us({"a": lambda: "a"}, 0, lambda fn: 1.0)
    assert one == {"a": [1.0]}  # at least one round


def test_round_range_in_the_table() -> None:
    row = {"us_rounds": {"compile": [100.0, 102.0, 99.0], "fxfuse": [100.0, 100.0, 100.0]}}
    assert plot_e2e.round_range(row) == " (0.990-1.020 over 3 rounds)"
    assert plot_e2e.round_range({"us_rounds": {"compile": [1.0], "fxfuse": [1.0]}}) == ""
    assert plot_e2e.round_range({}) == ""
