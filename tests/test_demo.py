"""`python -m fxfuse demo --quick` on CPU: runs, exits 0, stays correct, and fuses what it should.

One subprocess run (the README's first command minus the install) is shared by every assert; it
writes `--json`, which the asserts read.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Minimum fxfuse.counters per demo model on CPU (--quick, 2 layers). Tighten at merge as fusions land.
# A scratch merge of this branch with issue 7's branch (multi-quant + silu_mul_quant) gave, on CPU:
#   dense_fp8: {"rmsnorm_quant": 4, "silu_mul_quant": 2}  (2 layers x 2 norms; the final norm feeds
#              the bf16 lm_head and stays a near miss)
#   moe:       {"moe_routing": 2, "moe_experts": 2}  (scratch merge with issues 9 + 10's branches)
EXPECTED_MIN_COUNTERS: dict[str, dict[str, int]] = {
    "dense_fp8": {"rmsnorm_quant": 4, "silu_mul_quant": 2, "rope_quant": 2},
    "moe": {"moe_routing": 2, "moe_experts": 2, "rope_quant": 2},
}

# Every RMSNorm in the model is either fused or reported as a near miss with a reason.
RMSNORMS = {
    "dense_fp8": 2 * 2 + 1,  # input + post-attention norm per layer, final norm
    "moe": 2 * 4 + 1,  # + q_norm and k_norm per layer (Qwen3)
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("demo") / "demo.json"
    env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-m", "fxfuse", "demo", "--quick", "--device", "cpu", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"demo exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return {"stdout": proc.stdout, "json": json.loads(out.read_text())}


def _models(demo: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in demo["json"]["models"]}


def test_demo_runs_both_models_and_prints_the_report(demo: dict[str, Any]) -> None:
    models = _models(demo)
    assert set(models) == set(EXPECTED_MIN_COUNTERS)
    text = demo["stdout"]
    assert "fxfuse.counters:" in text and "numerics vs eager" in text
    for m in models.values():
        assert m["title"] in text
        assert m["cache"] == "fresh", m["cache"]
        assert m["report_text"] and m["report_text"] in text


@pytest.mark.parametrize("name", sorted(EXPECTED_MIN_COUNTERS))
def test_demo_counters(demo: dict[str, Any], name: str) -> None:
    m = _models(demo)[name]
    got = {k: m["counters"].get(k, 0) for k in EXPECTED_MIN_COUNTERS[name]}
    short = {k: (g, EXPECTED_MIN_COUNTERS[name][k]) for k, g in got.items() if g < EXPECTED_MIN_COUNTERS[name][k]}
    assert not short, f"{name}: (got, expected at least) {short}; near misses: {m['near_misses']}"
    assert not m["errors"], m["errors"]
    # the counters and the report agree
    by_name: dict[str, int] = {}
    for f in m["fusions"]:
        by_name[f["name"]] = by_name.get(f["name"], 0) + 1
    assert by_name == m["counters"]


@pytest.mark.parametrize("name", sorted(RMSNORMS))
def test_demo_every_norm_is_fused_or_explained(demo: dict[str, Any], name: str) -> None:
    m = _models(demo)[name]
    fused = m["counters"].get("rmsnorm_quant", 0)
    missed = [line for line in m["near_misses"] if line.startswith("rmsnorm_quant")]
    assert fused + len(missed) == RMSNORMS[name], (fused, missed)
    assert all(line.split(": ", 1)[1].strip() for line in missed)  # each has a reason


@pytest.mark.parametrize("name", sorted(EXPECTED_MIN_COUNTERS))
def test_demo_numerics_match_eager(demo: dict[str, Any], name: str) -> None:
    num = _models(demo)[name]["numerics"]["fxfuse"]
    assert num["finite"]
    # fp8 activations: a rounding flip moves a logit by ~1 fp8 ulp of one product; 2.6e-2 seen
    assert num["max_rel_err"] < 0.1, num
    assert num["argmax_agree"] >= 0.9, num


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(EXPECTED_MIN_COUNTERS))
def test_demo_model_on_cuda_output_code(name: str) -> None:
    """One real-size layer: every fusion is a Triton kernel in the output code, no Python fallback."""
    import torch
    from torch._inductor.utils import fresh_cache, run_and_get_code

    import fxfuse
    from fxfuse import demo

    kw = {"fp8_backend": "fxfuse-demo"} if name == "dense_fp8" else {}
    dm = demo.BUILDERS[name]("cuda", True, layers=1, **kw)
    ids = demo.random_ids(dm.vocab, 64, "cuda", seed=3)
    with torch.no_grad():
        ref = dm.module(ids)
    passes = fxfuse.FusionPasses(options={"gate": False})
    with fresh_cache(), torch.no_grad():
        out, codes = run_and_get_code(torch.compile(dm.module, dynamic=False,
                                                    options={"post_grad_custom_pre_pass": passes}), ids)
    code = "\n".join(codes)
    assert "torch.ops.fxfuse" not in code, "fused op left as a Python fallback call"
    fused = {k: v for k, v in fxfuse.counters.items() if k != "unwrap" and v}
    if fused:
        kernels = demo.fxfuse_kernel_names() - {"fxfuse"}
        assert any(k in code for k in kernels), (fused, sorted(kernels))
    for k, v in EXPECTED_MIN_COUNTERS[name].items():  # 1 layer: half the 2-layer minimum
        assert fxfuse.counters.get(k, 0) >= v // 2, (k, dict(fxfuse.counters), fxfuse.report())
    # as close to eager as stock compile (random weights + fp8: argmax ties are common at this size)
    torch._dynamo.reset()
    with fresh_cache(), torch.no_grad():
        stock = torch.compile(dm.module, dynamic=False)(ids)
    num, base = demo.logits_error(out, ref), demo.logits_error(stock, ref)
    assert num["finite"], num
    assert num["max_rel_err"] <= 1.5 * base["max_rel_err"] + 1e-2, (num, base)
    assert num["argmax_agree"] >= base["argmax_agree"] - 0.05, (num, base)
