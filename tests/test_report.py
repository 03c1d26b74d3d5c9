"""fxfuse.report(): applied fusions with their source lines, near misses with plain-words reasons,
the table/JSON forms, TORCH_LOGS lines, tlparse artifacts and `python -m fxfuse explain`.

The near-miss models below look like RMSNorm+quant but differ by one op; each must not fuse and
must report the first failed check, at the line of this file where the model wrote the norm.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import pathlib
import subprocess
import sys
from typing import Any, Callable

import pytest
import torch

import fxfuse
from fxfuse.testing import capture_graphs

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import fxfuse_models as models  # noqa: E402

F8 = torch.float8_e4m3fn
THIS = pathlib.Path(__file__).name
REPO = pathlib.Path(__file__).resolve().parents[1]


def line_of(fn: Callable[..., Any], marker: str) -> int:
    """Line number (in this file) of the first source line of `fn` containing `marker`."""
    lines, start = inspect.getsourcelines(fn)
    for i, text in enumerate(lines):
        if marker in text:
            return start + i
    raise AssertionError(f"{marker!r} not in {fn.__name__}")


# ----------------------------------------------------------------------------- fused model


def llama_inline(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()  # first line of the region
    var = xf.pow(2).mean(-1, keepdim=True)
    y = (xf * torch.rsqrt(var + 1e-6)).to(x.dtype) * w
    s = y.float().abs().amax(-1, keepdim=True).clamp(min=1e-12) / 448.0
    return (y.float() / s).clamp(-448.0, 448.0).to(F8), s  # last line of the region


# ----------------------------------------------------------------------------- near misses
# Each marks the line of its rsqrt: near misses are anchored there.


def wrong_dim(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(0, keepdim=True) + 1e-6)).to(x.dtype) * w  # rsqrt
    return models._quant(y)


def no_keepdim(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1) + 1e-6).unsqueeze(-1)).to(x.dtype) * w  # rsqrt
    return models._quant(y)


def weight_2d(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w.view(1, -1)  # rsqrt
    return models._quant(y)


def quant_pre_norm(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w  # rsqrt
    s = y.float().abs().amax(-1, keepdim=True).clamp(min=1e-12) / 448.0
    return (xf / s).clamp(-448.0, 448.0).to(F8), s  # quantizes xf, not y


def y_also_returned(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w  # rsqrt
    q, s = models._quant(y)
    return q, s, y


def scale_from_input(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w  # rsqrt
    s = xf.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 448.0  # scale of the input, not of y
    return (y.float() / s).clamp(-448.0, 448.0).to(F8), s


def not_quantized(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w  # rsqrt


def var_in_bf16(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)) * w  # rsqrt
    return models._quant(y)


NEAR_MISSES: dict[str, tuple[Callable[..., Any], str]] = {
    "wrong_dim": (wrong_dim, "mean is not over the last dim with keepdim=True"),
    "no_keepdim": (no_keepdim, "mean is not over the last dim with keepdim=True"),
    "weight_2d": (weight_2d, "weight shape (1, 64) is not [hidden]"),
    "quant_pre_norm": (quant_pre_norm, "quantization reads the pre-norm input, not the normalized output"),
    "y_also_returned": (y_also_returned, "normalized output is also used outside the quantization"),
    "scale_from_input": (scale_from_input, "the quant scale is computed from the pre-norm input, not the normalized output"),
    "not_quantized": (not_quantized, "normalized output is not quantized to fp8/int8"),
    "var_in_bf16": (var_in_bf16, "variance computed in torch.bfloat16, not float32"),
}


@pytest.fixture(scope="module")
def fused_capture() -> Any:
    torch._dynamo.reset()
    return capture_graphs(llama_inline, *models.inputs())


# ----------------------------------------------------------------------------- tests


def test_fusion_names_source_lines(fused_capture: Any) -> None:
    assert fused_capture.counters["rmsnorm_quant"] == 1
    (f,) = fused_capture.report.fusions
    first, last = line_of(llama_inline, "first line of the region"), line_of(llama_inline, "last line of the region")
    assert f.name == "rmsnorm_quant"
    assert f.locations == [f"{THIS}:{first}-{last}"]
    assert f.kernel == "fxfuse::rms_norm_quant"
    replaced_ops = {r.split("=", 1)[1] for r in f.replaced}
    assert {"rsqrt.default", "mean.dim", "amax.default"} <= replaced_ops
    assert "per-token" in f.detail


def test_report_table_and_dict(fused_capture: Any) -> None:
    rep = fused_capture.report
    text = str(rep)
    assert "rmsnorm_quant" in text and "fxfuse::rms_norm_quant" in text and f"{THIS}:" in text
    assert "replaced: " in rep.format(verbose=True)
    d = json.loads(json.dumps(rep.to_dict()))
    (g,) = d["graphs"]
    assert g["fusions"][0]["name"] == "rmsnorm_quant"
    assert g["near_misses"] == [] and g["errors"] == []
    assert json.loads(rep.to_json())["graphs"][0]["graph_id"] == g["graph_id"]


def test_global_report_accumulates_and_clears() -> None:
    capture_graphs(llama_inline, *models.inputs())
    capture_graphs(not_quantized, *models.inputs())
    rep = fxfuse.report()
    assert len(rep.graphs) == 2
    assert [f.name for f in rep.fusions] == ["rmsnorm_quant"]
    assert len(rep.near_misses) == 1
    fxfuse.report.clear()
    assert fxfuse.report().graphs == []
    assert "no graphs" in str(fxfuse.report())


@pytest.mark.parametrize("case", sorted(NEAR_MISSES))
def test_near_miss_reason(case: str) -> None:
    fn, reason = NEAR_MISSES[case]
    cap = capture_graphs(fn, *models.inputs())
    assert cap.counters["rmsnorm_quant"] == 0
    assert fxfuse.counters["rmsnorm_quant"] == 0
    misses = cap.report.near_misses
    assert [m.reason for m in misses] == [reason]
    (m,) = misses
    assert m.family == "rmsnorm_quant"
    assert m.location == f"{THIS}:{line_of(fn, '# rsqrt')}"
    assert m.line() == f"rmsnorm_quant at {m.location}: {reason}"
    assert reason in str(cap.report)
    assert cap.report.near_miss_lines() == [m.line()]


def test_near_miss_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="fxfuse")
    capture_graphs(quant_pre_norm, *models.inputs())
    lines = [r.getMessage() for r in caplog.records if r.name == "fxfuse" and "near miss" in r.getMessage()]
    loc = f"{THIS}:{line_of(quant_pre_norm, '# rsqrt')}"
    assert any(f"rmsnorm_quant at {loc}: quantization reads the pre-norm input" in s for s in lines), lines


def test_explain_cli_logs_and_trace(tmp_path: pathlib.Path) -> None:
    """`python -m fxfuse explain` prints the table; TORCH_LOGS=+fxfuse prints the near-miss lines;
    TORCH_TRACE gets the before/after graph artifacts for tlparse."""
    env = dict(os.environ, TORCH_LOGS="+fxfuse", TORCH_TRACE=str(tmp_path / "trace"))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "fxfuse", "explain", "tests/fxfuse_models.py:example", "--device", "cpu"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "rmsnorm_quant=1" in out
    assert "fusion" in out and "near miss" in out and "fxfuse::rms_norm_quant" in out
    pre_norm_line = line_of(models.quant_pre_norm, "torch.rsqrt")
    assert f"fxfuse_models.py:{pre_norm_line}" in out
    assert "quantization reads the pre-norm input, not the normalized output" in out
    assert f"fxfuse near miss: rmsnorm_quant at fxfuse_models.py:{pre_norm_line}: quantization reads" in proc.stderr
    trace = "".join(p.read_text() for p in (tmp_path / "trace").glob("*.log"))
    assert "fxfuse_graph_before" in trace and "fxfuse_after_rmsnorm_quant" in trace


def test_explain_json(monkeypatch: pytest.MonkeyPatch) -> None:
    from fxfuse.__main__ import explain

    monkeypatch.chdir(REPO)
    d = json.loads(explain("tests.fxfuse_models:example", device="cpu", as_json=True))
    assert d["counters"] == {"rmsnorm_quant": 1}
    assert d["device"] == "cpu"
    (g,) = d["graphs"]
    assert [m["reason"] for m in g["near_misses"]] == ["quantization reads the pre-norm input, not the normalized output"]
