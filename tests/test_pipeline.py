"""The pipeline object: CustomGraphPass contract, cache key, config, strict mode, logging."""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.utils import fresh_cache

import fxfuse
from fxfuse import pipeline
from forms import assert_identical, make_inputs, make_model, stock_compile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _compile(fn, args, passes):
    torch._dynamo.reset()
    fxfuse.counters.clear()
    fxfuse.report.clear()
    with fresh_cache(), torch.no_grad():
        return torch.compile(fn, options={"post_grad_custom_pre_pass": passes})(*args)


def test_passes_is_custom_graph_pass_with_stable_uuid():
    assert isinstance(fxfuse.passes, CustomGraphPass)
    u = fxfuse.passes.uuid()
    assert u and u == fxfuse.passes.uuid() == fxfuse.FusionPasses().uuid()


def test_uuid_covers_config():
    base = fxfuse.FusionPasses().uuid()
    assert fxfuse.FusionPasses(disable=["rmsnorm_quant"]).uuid() != base
    assert fxfuse.FusionPasses(strict=True).uuid() != base
    assert fxfuse.FusionPasses(unwrap=None).uuid() != base
    assert fxfuse.FusionPasses(options={"gate": False}).uuid() != base


def test_uuid_changes_when_a_pattern_file_changes(tmp_path):
    pkg = tmp_path / "fxfuse"
    shutil.copytree(ROOT / "fxfuse", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    before = pipeline._source_digest(pkg)
    assert before == pipeline._source_digest(ROOT / "fxfuse")
    with open(pkg / "patterns" / "rmsnorm_quant.py", "a") as f:
        f.write("\n# an edit\n")
    assert pipeline._source_digest(pkg) != before


def test_unknown_fusion_name_is_an_error():
    with pytest.raises(ValueError, match="unknown fusion"):
        fxfuse.FusionPasses(enable=["rms_norm_quant_typo"])


def test_disable_and_enable():
    fn = make_model("hf", "token", residual=False)
    args = make_inputs(4, 128, torch.bfloat16, seed=0)
    _compile(fn, args, fxfuse.FusionPasses(disable=["rmsnorm_quant"]))
    assert fxfuse.counters["rmsnorm_quant"] == 0
    _compile(fn, args, fxfuse.FusionPasses(enable=["rmsnorm_quant"]))
    assert fxfuse.counters["rmsnorm_quant"] == 1


def test_user_passes_chain_before_and_after():
    seen = []

    def before(g):
        seen.append(("before", sum(n.target is torch.ops.aten.rsqrt.default for n in g.nodes)))

    def after(g):
        seen.append(("after", sum(n.target is torch.ops.aten.rsqrt.default for n in g.nodes)))

    fn = make_model("hf", "token", residual=False)
    _compile(fn, make_inputs(4, 128, torch.bfloat16, seed=0), fxfuse.FusionPasses(before=before, after=after))
    assert seen == [("before", 1), ("after", 0)]


def test_internal_error_skips_candidate_unless_strict(monkeypatch):
    from fxfuse.patterns import rmsnorm_quant

    def boom(*a, **k):
        raise RuntimeError("injected")

    monkeypatch.setattr(rmsnorm_quant, "rewrite", boom)
    fn = make_model("hf", "token", residual=True)
    args = make_inputs(4, 128, torch.bfloat16, seed=0)
    ref = stock_compile(fn, args)
    out = _compile(fn, args, fxfuse.FusionPasses())
    assert fxfuse.counters["rmsnorm_quant"] == 0
    assert_identical(tuple(out), ref)
    assert any("injected" in e for g in fxfuse.report().graphs for e in g.errors)
    with pytest.raises(Exception, match="injected"):
        _compile(fn, args, fxfuse.FusionPasses(strict=True))


def test_logging_info_and_debug(caplog):
    fn = make_model("hf", "token", residual=False)
    with caplog.at_level(logging.DEBUG, logger="fxfuse"):
        _compile(fn, make_inputs(4, 128, torch.bfloat16, seed=0), fxfuse.FusionPasses())
    text = caplog.text
    assert "rmsnorm_quant matched 1 time(s)" in text
    assert "before:" in text and "after:" in text


def test_torch_logs_env_var_works(tmp_path):
    # A private Inductor cache: an FX graph cache hit (from any earlier run on the machine) skips the passes, and so the log line.
    code = textwrap.dedent(
        """
        import torch, fxfuse, sys
        sys.path.insert(0, 'tests')
        from forms import make_model, make_inputs
        fn = make_model('hf', 'token', residual=False)
        with torch.no_grad():
            torch.compile(fn, options={'post_grad_custom_pre_pass': fxfuse.passes})(*make_inputs(4, 64, torch.bfloat16))
        """
    )
    env = {**os.environ, "TORCH_LOGS": "fxfuse", "PYTHONPATH": str(ROOT), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rmsnorm_quant matched 1 time(s)" in r.stderr


def test_fx_graph_cache_hit_in_fresh_process(tmp_path):
    code = textwrap.dedent(
        """
        import json, sys, torch, fxfuse
        from torch._dynamo.utils import counters
        sys.path.insert(0, 'tests')
        from forms import make_model, make_inputs
        fn = make_model('hf', 'token', residual=True)
        args = make_inputs(4, 64, torch.bfloat16, seed=0)
        with torch.no_grad():
            out = torch.compile(fn, options={'post_grad_custom_pre_pass': fxfuse.passes})(*args)
            ref = fn(*args)
        ok = all((o.float() - r.float()).abs().max().item() < 1e-1 for o, r in zip(out, ref))
        print(json.dumps({"hit": counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"],
                          "miss": counters["inductor"]["fxgraph_cache_miss"],
                          "bypass": counters["inductor"]["fxgraph_cache_bypass"],
                          "fused": fxfuse.counters["rmsnorm_quant"], "ok": ok}))
        """
    )
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"),
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
        "PYTHONPATH": str(ROOT),
    }
    import json

    results = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
    first, second = results
    assert first["miss"] >= 1 and first["bypass"] == 0 and first["fused"] == 1 and first["ok"]
    assert second["hit"] >= 1 and second["fused"] == 0 and second["ok"], second


def test_cuda_path_traces_to_user_triton_kernel():
    """The CUDA replacement must be a triton_kernel_wrapper_functional node (compiled into Inductor's
    output code), not an opaque op call. Checked with fake CUDA tensors, so it runs on CPU CI."""
    import torch.fx as fx
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fxfuse.fx_utils import insert_traced
    import fxfuse.kernels  # noqa: F401

    with FakeTensorMode():
        x = torch.empty(4, 256, dtype=torch.bfloat16, device="cuda")
        w = torch.empty(256, dtype=torch.bfloat16, device="cuda")
    g = fx.Graph()
    px, pw = g.placeholder("x"), g.placeholder("w")
    px.meta["val"], pw.meta["val"] = x, w
    out = g.output(None)

    def repl(x, w):
        return torch.ops.fxfuse.rms_norm_quant(
            x, None, w, None, eps=1e-6, weight_offset=0.0, weight_sum_dtype=None, round_before_weight=True,
            norm_dtype=torch.bfloat16, quant_dtype=torch.float8_e4m3fn, scheme=1, group_size=0,
            static_scale_value=1.0, scale_ops=[1, 3], scale_consts=[448.0, 1e-12], quant_mul=False,
            qmin=-448.0, qmax=448.0, round_to_int=False, need_residual_out=False,
        )

    outs = insert_traced(g, repl, [px, pw], before=out, functionalize=True)
    targets = {n.target for n in g.nodes if n.op == "call_function"}
    assert torch.ops.higher_order.triton_kernel_wrapper_functional in targets
    assert not any("fxfuse" in str(t) for t in targets)
    assert len(outs) == 3


def test_uuid_covers_kernel_launch_overrides(monkeypatch):
    """Launch knobs outside the sources (sweep overrides, FXFUSE_ROPE_CONFIG, the tuned table as
    mutated in memory) change the inserted kernels, so they change the cache key."""
    from fxfuse.kernels import moe_experts, rope_quant, silu_mul_quant

    p = fxfuse.FusionPasses()
    base = p.uuid()
    monkeypatch.setitem(rope_quant.CONFIG_OVERRIDE, "BLOCK_H", 2)
    k1 = p.uuid()
    monkeypatch.setenv("FXFUSE_ROPE_CONFIG", "num_warps=2")
    k2 = p.uuid()
    monkeypatch.setitem(silu_mul_quant.TUNED, (1, 1 << 20), {"ROWS": 2})
    k3 = p.uuid()
    monkeypatch.setitem(moe_experts.ALIGN_OVERRIDE, "WARPS", 8)
    k4 = p.uuid()
    assert len({base, k1, k2, k3, k4}) == 5
    monkeypatch.undo()
    assert p.uuid() == base
