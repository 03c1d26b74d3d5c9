"""The decode router GEMV (fxfuse::router_logits): the Triton kernel under TRITON_INTERPRET=1 against
float64 (poisoned outputs, masked tails, strided rows); the moe_routing pass puts it in place of a
router's ``mm(x, W.t())`` at decode and nowhere else (near misses: a biased router, more than 16
tokens, too many weights per token, a symbolic token count); on CUDA it is a user Triton kernel
that clones nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import fresh_cache

import fxfuse
from fxfuse.kernels.router_gemv import MAX_ROW_ELEMS, fits

REPO = Path(__file__).resolve().parents[1]
CASES = [  # (name, M, E, H, dtype, x row stride pad, out dtype)
    ("bf16-qwenlike", 2, 16, 512, "bfloat16", 0, "bfloat16"),
    ("bf16-tails", 3, 6, 100, "bfloat16", 4, "bfloat16"),
    ("fp16", 1, 8, 1030, "float16", 0, "float16"),
    ("fp32-strided", 5, 12, 64, "float32", 3, "float32"),
    ("bf16-to-fp32", 2, 16, 300, "bfloat16", 0, "float32"),  # DeepSeek-V3's fp32 router
    ("fp16-to-fp32", 1, 5, 64, "float16", 2, "float32"),
]
HALF_ULP = {"bfloat16": 2**-8, "float16": 2**-11, "float32": 2**-20}


def _interp_main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from fxfuse.kernels.router_gemv import router_logits_triton

    res = {}
    for name, M, E, H, dt, pad, odt in CASES:
        dtype, out_dtype = getattr(torch, dt), getattr(torch, odt)
        torch.manual_seed(M * 100 + E)
        x = torch.randn(M, H + pad, dtype=dtype)[:, :H]
        w = torch.randn(E, H, dtype=dtype) * 0.05
        out = torch.full((M, E), float("nan"), dtype=out_dtype)
        router_logits_triton(x, w, out_dtype, out=out)
        ref = x.double() @ w.double().t()
        err = (out.double() - ref).abs()
        bound = HALF_ULP[odt] * ref.abs() + 1e-6 * (x.double().abs() @ w.double().abs().t())
        res[name] = dict(finite=bool(torch.isfinite(out).all()), within=bool((err <= bound).all()),
                         max_err=float(err.max()))
    print(json.dumps(res))


@pytest.fixture(scope="module")
def interp_results() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--interp-json"], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"interpreter subprocess failed rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_kernel_interpreter_vs_float64(interp_results: dict, name: str) -> None:
    r = interp_results[name]
    assert r["finite"], r  # every element written (outputs were NaN-poisoned)
    assert r["within"], r  # fp32 accumulation, one rounding: within half an ulp plus summation error


class _Router(torch.nn.Module):
    """Qwen3-style router: linear (optionally biased) -> softmax -> top-k -> renormalize."""

    def __init__(self, H: int, E: int, k: int, bias: bool = False) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(H, E, bias=bias)
        self.k = k

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(h.reshape(-1, h.shape[-1]))
        p = torch.softmax(logits, dim=-1, dtype=torch.float)
        w, ids = torch.topk(p, self.k, dim=-1)
        return (w / w.sum(-1, keepdim=True)).to(h.dtype), ids


class _Fp32Router(torch.nn.Module):
    """DeepSeek-V3's router: fp32 logits of upcast bf16 operands, sigmoid scores, top-k, scaled."""

    def __init__(self, H: int, E: int, k: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(E, H) * 0.1)
        self.k = k

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(h.reshape(-1, h.shape[-1]).type(torch.float32), self.weight.type(torch.float32))
        w, ids = torch.topk(logits.sigmoid(), self.k, dim=-1)
        return w * 2.5, ids


def _compile(m: torch.nn.Module, x: torch.Tensor, dynamic: bool = False):
    fxfuse.counters.clear()
    fxfuse.report.clear()
    torch._dynamo.reset()
    with fresh_cache(), torch.no_grad():
        return torch.compile(m, dynamic=dynamic, options={"post_grad_custom_pre_pass": fxfuse.passes})(x)


def _same_ids(m: _Router, x: torch.Tensor, ids: torch.Tensor, ref_ids: torch.Tensor) -> None:
    """Equal ids, or ids whose eager scores are equal (tied bf16 logits: topk's pick among equals
    is unspecified, see fxfuse.kernels.moe_routing)."""
    with torch.no_grad():
        p = torch.softmax(m.gate(x.reshape(-1, x.shape[-1])), dim=-1, dtype=torch.float)
    assert torch.equal(p.gather(1, ids), p.gather(1, ref_ids))


def _gemv_applied() -> bool:
    return any(f.name == "moe_routing" and "+router GEMV" in f.detail for f in fxfuse.report().fusions)


@pytest.mark.parametrize("M", [1, 16])
def test_router_gemm_becomes_gemv_at_decode(M: int) -> None:
    """Static M <= 16 on CPU: the mm becomes fxfuse::router_logits (its CPU kernel is the mm), the
    routing still fuses, and the results are eager's exactly."""
    torch.manual_seed(0)
    m = _Router(64, 16, 4).to(torch.bfloat16).eval()
    x = torch.randn(1, M, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        ref_w, ref_ids = m(x)
    w, ids = _compile(m, x)
    assert fxfuse.counters["moe_routing"] == 1, fxfuse.report()
    assert _gemv_applied(), fxfuse.report()
    torch.testing.assert_close(w, ref_w, rtol=0, atol=0)
    _same_ids(m, x, ids, ref_ids)


def test_fp32_router_of_upcast_operands_reads_them_in_bf16() -> None:
    """linear(x.float(), W.float()) at decode: the GEMV takes the bf16 sources and writes fp32
    logits (exact upcast), eager's result; on CUDA its own gate class (router_gemv_upcast)."""
    from fxfuse import gating

    torch.manual_seed(0)
    m = _Fp32Router(64, 16, 4).to(torch.bfloat16).eval()
    x = torch.randn(1, 2, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        ref_w, ref_ids = m(x)
    w, ids = _compile(m, x)
    assert fxfuse.counters["moe_routing"] == 1, fxfuse.report()
    assert any("+router GEMV (fp32 from 2-byte operands)" in f.detail for f in fxfuse.report().fusions), fxfuse.report()
    torch.testing.assert_close(w, ref_w, rtol=0, atol=0)
    assert torch.equal(ids, ref_ids)
    table = {"moe_routing": {"router_gemv/M<=16": {"2048": 2.0}}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gating, "_table", lambda: table)
        assert gating.rejects("moe_routing", scheme="router_gemv", hidden=2048, dtype=torch.bfloat16, M=1) is None
        assert "router_gemv_upcast" in gating.rejects("moe_routing", scheme="router_gemv_upcast", hidden=2048,
                                                      dtype=torch.bfloat16, M=1)


@pytest.mark.parametrize("case", ["biased", "M=17", "too-many-weights", "dynamic"])
def test_router_gemm_near_misses(case: str) -> None:
    """The routing fuses but the mm stays Inductor's: a biased router (addmm), more than 16 tokens,
    more weight elements per step than the GEMV wins at, a symbolic token count."""
    torch.manual_seed(0)
    H, E, M = 64, 16, 4
    if case == "too-many-weights":
        H, E, M = 4096, 256, 16  # 16 M elements > MAX_ROW_ELEMS
        assert not fits(M, E, H) and M * E * H > MAX_ROW_ELEMS
        assert fits(M, E, H, upcast=True)  # the fp32-of-bf16 form wins further (vs fp32 cuBLAS)
        assert not fits(M, 2 * E, 2 * H, upcast=True)  # 64 Mi: past its measured size too
    if case == "M=17":
        M = 17
    m = _Router(H, E, 4, bias=case == "biased").to(torch.bfloat16).eval()
    x = torch.randn(1, M, H, dtype=torch.bfloat16)
    with torch.no_grad():
        ref_w, ref_ids = m(x)
    w, ids = _compile(m, x, dynamic=case == "dynamic")
    assert fxfuse.counters["moe_routing"] == 1, fxfuse.report()
    assert not _gemv_applied(), fxfuse.report()
    torch.testing.assert_close(w, ref_w, rtol=0, atol=0)
    _same_ids(m, x, ids, ref_ids)


def test_router_gemv_launch_clones_nothing(sm90_target) -> None:
    """On (fake) CUDA the op traces to one user Triton kernel whose functional wrapper clones no
    input (it only writes its fresh logits buffer)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fxfuse.fx_utils import trace_aten
    from fxfuse.kernels import router_gemv  # noqa: F401

    with FakeTensorMode():
        x = torch.empty(1, 2048, dtype=torch.bfloat16, device="cuda")
        w = torch.empty(128, 2048, dtype=torch.bfloat16, device="cuda")
        gm = trace_aten(lambda a, b: torch.ops.fxfuse.router_logits(a, b), [x, w], functionalize=True)
    hops = [n for n in gm.graph.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
    assert len(hops) == 1
    assert set(hops[0].kwargs["tensors_to_clone"]) <= {"out_ptr"}, hops[0].kwargs["tensors_to_clone"]
    assert not any("fxfuse" in str(n.target) for n in gm.graph.nodes)


if __name__ == "__main__":
    if "--interp-json" in sys.argv:
        _interp_main()
