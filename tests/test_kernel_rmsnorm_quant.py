"""Tests for fxfuse.kernels.rmsnorm_quant.

* reference vs an independent float64 re-derivation;
* the Triton kernel under TRITON_INTERPRET=1 on CPU -- run in ONE subprocess (the env var
  must be set before triton.jit decorates anything, and other test files in the session
  import triton normally); it reports JSON metrics that the parametrized tests assert on;
* the custom op on CPU (== reference) and torch.library.opcheck;
* @pytest.mark.gpu: the op / launcher / torch.compile on CUDA at larger shapes.

Every kernel run goes into poisoned buffers twice with different poison values; the two
results must be bit-identical, so any element the kernel fails to write shows up.

Run this file directly (``python tests/test_kernel_rmsnorm_quant.py --interp-json``) to get
the interpreter metrics as JSON.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fxfuse.kernels import rmsnorm_quant as K  # noqa: E402
from fxfuse.kernels.quant_common import quantize as _quantize, rint as _rint, round_e4m3 as _round_e4m3, round_to as _round_to  # noqa: E402

FP8 = torch.float8_e4m3fn
I8 = torch.int8
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32

# ----------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------


def _case(
    cid: str,
    *,
    dtype: torch.dtype,
    M: int,
    H: int,
    scheme: int,
    qd: torch.dtype = FP8,
    res: bool = True,
    w: bool = True,
    w_dtype: Optional[torch.dtype] = None,
    woff: float = 0.0,
    wsum: Optional[torch.dtype] = None,
    rbw: bool = True,
    norm: Optional[torch.dtype] = None,
    gs: int = 64,
    scale_t: bool = True,
    ssv: float = 0.0,
    ops: tuple = (),
    consts: tuple = (),
    qmul: bool = False,
    rint: bool = False,
    need_h: Optional[bool] = None,
    strided: bool = False,
    xmul: float = 2.0,
) -> dict[str, Any]:
    return dict(
        id=cid, dtype=dtype, M=M, H=H, scheme=scheme, qd=qd, res=res, w=w,
        w_dtype=w_dtype or dtype, woff=woff, wsum=wsum, rbw=rbw, norm=norm or dtype, gs=gs,
        scale_t=scale_t, ssv=ssv, ops=list(ops), consts=list(consts), qmul=qmul, rint=rint,
        need_h=res if need_h is None else need_h, strided=strided, xmul=xmul,
    )


S0, S1, S2 = K.SCHEME_STATIC, K.SCHEME_PER_TOKEN, K.SCHEME_PER_GROUP
MUL, DIV, RDIV, CMIN, CMAX, RECIP, RBF16, RF16 = (
    K.SCALE_MUL, K.SCALE_DIV, K.SCALE_RDIV, K.SCALE_CLAMP_MIN, K.SCALE_CLAMP_MAX,
    K.SCALE_RECIP, K.SCALE_ROUND_BF16, K.SCALE_ROUND_F16,
)

INTERP_CASES: list[dict[str, Any]] = [
    _case("static_tensor_bf16", dtype=BF16, M=3, H=256, scheme=S0),
    _case("static_float_fp16", dtype=F16, M=1, H=64, scheme=S0, res=False, scale_t=False,
          ssv=0.03, rbw=False),
    _case("static_recip_mul_fp32", dtype=F32, M=3, H=256, scheme=S0, ops=(RECIP,), consts=(0.0,),
          qmul=True),
    _case("static_mul_wf32_wsum_f16", dtype=BF16, M=3, H=64, scheme=S0, w_dtype=F32, wsum=F16,
          woff=0.5, rbw=False, ops=(MUL, RBF16), consts=(2.0, 0.0), res=False),
    _case("tok_fp8_bf16_res", dtype=BF16, M=3, H=256, scheme=S1, ops=(CMIN, DIV),
          consts=(1e-12, 448.0)),
    _case("tok_fp8_fp16_now_nores", dtype=F16, M=1, H=256, scheme=S1, w=False, res=False,
          ops=(CMIN, DIV), consts=(1e-12, 448.0)),
    _case("tok_int8_round_bf16", dtype=BF16, M=3, H=256, scheme=S1, qd=I8, rint=True,
          ops=(DIV,), consts=(127.0,)),
    _case("tok_int8_gemma_offset", dtype=BF16, M=3, H=256, scheme=S1, qd=I8, rint=True, woff=1.0,
          wsum=BF16, rbw=False, ops=(CMIN, DIV), consts=(1e-5, 127.0)),
    _case("tok_int8_trunc_fp32", dtype=F32, M=3, H=64, scheme=S1, qd=I8, rint=False,
          ops=(DIV,), consts=(127.0,), norm=F32),
    _case("grp_fp8_bf16_res", dtype=BF16, M=3, H=256, scheme=S2, gs=64, ops=(CMIN, DIV),
          consts=(1e-10, 448.0)),
    _case("grp_fp8_fp32_H192", dtype=F32, M=3, H=192, scheme=S2, gs=64, res=False,
          ops=(DIV, RBF16), consts=(448.0, 0.0)),
    _case("grp_int8_fp16", dtype=F16, M=1, H=256, scheme=S2, gs=64, qd=I8, rint=True,
          ops=(DIV, CMIN), consts=(127.0, 1e-8)),
    _case("tok_qmul_chain_H96", dtype=BF16, M=3, H=96, scheme=S1, ops=(DIV, CMIN, RECIP),
          consts=(448.0, 1e-12, 0.0), qmul=True),
    _case("tok_rdiv_cmax_rf16", dtype=F32, M=3, H=64, scheme=S1, ops=(CMIN, RDIV, CMAX, RF16),
          consts=(1e-6, 448.0, 1e4, 0.0), qmul=True, res=False),
    _case("tok_h_without_residual", dtype=BF16, M=3, H=64, scheme=S1, res=False, need_h=True,
          ops=(DIV,), consts=(448.0,)),
    _case("tok_strided_rows", dtype=BF16, M=3, H=256, scheme=S1, strided=True, ops=(DIV,),
          consts=(448.0,), norm=F32),
    _case("grp_norm_fp16_from_bf16", dtype=BF16, M=3, H=128, scheme=S2, gs=64, norm=F16,
          ops=(CMIN, DIV), consts=(1e-10, 448.0), need_h=False),
]


def _qlimits(qd: torch.dtype) -> tuple[float, float]:
    return (-448.0, 448.0) if qd == FP8 else (-128.0, 127.0)


def make_args(case: dict[str, Any], device: str = "cpu", seed: int = 0,
              M: Optional[int] = None, H: Optional[int] = None,
              gs: Optional[int] = None) -> tuple:
    """Deterministic random inputs (never zeros) and the full op argument tuple."""
    M = case["M"] if M is None else M
    H = case["H"] if H is None else H
    gs = case["gs"] if gs is None else gs
    g = torch.Generator().manual_seed(seed)
    dt = case["dtype"]
    width = H + 128 if case["strided"] else H
    xb = torch.randn(M, width, generator=g) * case["xmul"]
    # a few outliers so amax / clamps are exercised
    xb[:, :: max(H // 7, 1)] *= 4.0
    # slice AFTER moving to the device so strided rows stay strided there
    x = xb.to(dt).to(device)[:, :H]
    residual = None
    if case["res"]:
        residual = torch.randn(M, width, generator=g).to(dt).to(device)[:, :H]
    weight = None
    if case["w"]:
        base = 0.0 if case["woff"] else 1.0
        weight = (base + 0.3 * torch.randn(H, generator=g)).to(case["w_dtype"])
    scale = None
    if case["scheme"] == S0 and case["scale_t"]:
        scale = torch.tensor([0.021], dtype=F32)
    qmin, qmax = _qlimits(case["qd"])
    to = (lambda t: None if t is None else t.to(device))
    return (x, residual, to(weight), to(scale), 1e-6, case["woff"], case["wsum"],
            case["rbw"], case["norm"], case["qd"], case["scheme"], gs, case["ssv"],
            list(case["ops"]), list(case["consts"]), case["qmul"], qmin, qmax, case["rint"],
            case["need_h"])


def _poisoned_outputs(args: tuple, variant: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = args[0]
    scheme, gs, qd, need_h = args[10], args[11], args[9], args[19]
    q, s, h = K._alloc_outputs(x, qd, scheme, gs, need_h)
    if qd == FP8:
        q.view(torch.uint8).fill_(0x7F if variant == 0 else 0x3A)  # NaN / 1.25
    else:
        q.fill_(77 if variant == 0 else -77)
    s.fill_(float("nan") if variant == 0 else 12345.0)
    h.fill_(float("nan") if variant == 0 else -3.0)
    return q, s, h


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).cpu()


def compare(ref: tuple, runs: list[tuple], args: tuple) -> dict[str, Any]:
    """Metrics of kernel outputs (two poisoned runs) against the reference."""
    qr, sr, hr = (t.cpu() for t in ref)
    q, s, h = (t.cpu() for t in runs[0])
    scheme, gs, qmul, norm = args[10], args[11], args[15], args[8]
    M, H = args[0].shape
    out: dict[str, Any] = {}
    out["runs_identical"] = all(
        torch.equal(_bits(a), _bits(b)) for a, b in zip(runs[0], runs[1]))
    out["shapes_ok"] = (q.shape == qr.shape and s.shape == sr.shape and h.shape == hr.shape
                        and q.dtype == qr.dtype and s.dtype == sr.dtype and h.dtype == hr.dtype)
    out["h_exact"] = bool(torch.equal(_bits(h), _bits(hr))) if hr.numel() else h.numel() == 0
    rel = ((s - sr).abs() / sr.abs().clamp_min(1e-30))
    rel = torch.where(torch.isnan(s) & torch.isnan(sr), torch.zeros_like(rel), rel)
    out["scale_max_rel"] = float(rel.max()) if rel.numel() else 0.0
    out["scale_frac_off"] = float((rel > 1e-6).float().mean()) if rel.numel() else 0.0
    out["scale_nan"] = bool(torch.isnan(s).any() and not torch.isnan(sr).any())
    qf, qrf = q.float(), qr.float()
    out["q_frac_diff"] = float((qf != qrf).float().mean())
    out["q_nan"] = bool(torch.isnan(qf).any())
    if scheme == S0:
        sb, sbr = s.reshape(()), sr.reshape(())
    elif scheme == S1:
        sb, sbr = s[:, None], sr[:, None]
    else:
        sb = s.repeat_interleave(gs, dim=1)
        sbr = sr.repeat_interleave(gs, dim=1)
    deq = qf / sb if qmul else qf * sb
    deqr = qrf / sbr if qmul else qrf * sbr
    out["deq_rel"] = float((deq - deqr).norm() / deqr.norm().clamp_min(1e-30))
    # A reduction-order ulp in rstd can flip one rounding of the amax element of y; the scale
    # then moves by one ulp of the *coarsest* dtype rounded along the way: the norm dtype, and
    # the input dtype when rounding before the weight (HF Llama), and the weight-sum dtype. E.g.
    # bf16 input with an fp16 norm dtype flips at the bf16 rounding (up to 2^-7 relative), not at
    # fp16's 2^-10: grp_norm_fp16_from_bf16 at 4096x7168 on H100 moved one group scale by 4.4e-3,
    # and a +-1 ulp rstd perturbation on CPU moves 1-3 of 229376 group scales by up to 5.8e-3.
    ulp = {BF16: 2.0**-7, F16: 2.0**-10, F32: 1e-5}
    rounded = [norm] + ([args[0].dtype] if args[7] else []) + ([args[6]] if args[6] is not None else [])
    out["scale_tol"] = max(ulp[d] for d in rounded) * 2
    return out


def assert_metrics(m: dict[str, Any]) -> None:
    assert m["shapes_ok"], m
    assert m["runs_identical"], f"unwritten output elements (poison differs): {m}"
    assert m["h_exact"], m
    assert not m["q_nan"] and not m["scale_nan"], m
    # scales: exact up to fp32 rounding; rarely a reduction-order ulp in r flips the
    # rounding of the amax element of y, which moves one scale by <= 1 ulp of norm_dtype
    assert m["scale_max_rel"] <= m["scale_tol"], m
    assert m["scale_frac_off"] <= 0.02 or m["scale_max_rel"] <= 1e-6, m
    assert m["q_frac_diff"] <= 0.01, m
    assert m["deq_rel"] <= 5e-3, m


# ----------------------------------------------------------------------------
# Interpreter subprocess
# ----------------------------------------------------------------------------


@triton.jit
def _helpers_kernel(x_ptr, bf_ptr, f16_ptr, e4_ptr, ri_ptr, N: tl.constexpr):
    o = tl.arange(0, N)
    v = tl.load(x_ptr + o)
    tl.store(bf_ptr + o, _round_to(v, 1))
    tl.store(f16_ptr + o, _round_to(v, 2))
    a = tl.minimum(tl.maximum(v, -448.0), 448.0)
    tl.store(e4_ptr + o, _round_e4m3(a).to(tl.float8e4nv))
    tl.store(ri_ptr + o, _rint(v))


def _helper_values() -> torch.Tensor:
    """Random values plus exact rounding midpoints for bf16, e4m3 and integers."""
    g = torch.Generator().manual_seed(1)
    parts = [torch.randn(4096, generator=g) * torch.exp(torch.randn(4096, generator=g) * 3)]
    b = torch.randn(1024, generator=g).to(BF16).float()
    parts.append((b.view(torch.int32) + (1 << 15)).view(F32))  # bf16 ties
    e = torch.arange(0, 0x7E, dtype=torch.uint8).view(FP8).float()
    mids = (e[1:] + e[:-1]) / 2
    parts += [e, -e, mids, -mids]  # e4m3 grid points and ties (incl. subnormals)
    parts.append(torch.arange(-300, 300, dtype=F32) + 0.5)  # integer ties
    parts.append(torch.tensor([0.0, -0.0, 8388607.5, 4194304.5, 1e9, -1e9, 3e38]))
    v = torch.cat(parts)
    n = triton.next_power_of_2(v.numel())
    return torch.cat([v, torch.full((n - v.numel(),), 0.75)])


def _interp_helpers() -> dict[str, int]:
    v = _helper_values()
    bf, f16, ri = (torch.empty_like(v) for _ in range(3))
    e4 = torch.empty(v.shape, dtype=FP8)
    _helpers_kernel[(1,)](v, bf, f16, e4, ri, N=v.numel())
    with torch.no_grad():
        return {
            "bf16": int((bf != v.to(BF16).float()).sum()),
            "f16": int((f16 != v.to(F16).float()).sum()),
            "e4m3": int((e4.float() != v.clamp(-448, 448).to(FP8).float()).sum()),
            "rint": int((ri != torch.round(v)).sum()),
        }


def _run_kernel_case(args: tuple) -> dict[str, Any]:
    ref = K.rms_norm_quant_reference(*args)
    runs = []
    for variant in (0, 1):
        out = _poisoned_outputs(args, variant)
        K.rms_norm_quant_triton(*args, out=out)
        runs.append(out)
    return compare(ref, runs, args)


@triton.jit
def _quantize_kernel(v_ptr, q_ptr, qmin, qmax, N: tl.constexpr, NATIVE: tl.constexpr):
    o = tl.arange(0, N)
    v = tl.load(v_ptr + o)
    tl.store(q_ptr + o, _quantize(v, 1.0 + tl.zeros_like(v), qmin, qmax, False, False, False, NATIVE))


def _fp8_same(a: torch.Tensor, b: torch.Tensor) -> int:
    """Number of elements whose fp8 bits differ (-0.0 != 0.0; NaN == NaN whatever its sign)."""
    both_nan = torch.isnan(a.float()) & torch.isnan(b.float())
    return int(((a.view(torch.uint8) != b.view(torch.uint8)) & ~both_nan).sum())


def _interp_special(device: str = "cpu") -> dict[str, int]:
    """Mismatch counts vs torch/reference where eager is subtle: unclamped fp8 overflow, inf,
    NaN, and NaN/inf rows (amax must propagate NaN like torch.amax)."""
    out: dict[str, int] = {}
    v = torch.tensor([0.0, 1.0, 447.0, 448.0, 449.0, 463.9, 464.0, 464.1, 470.0, 479.9, 480.0, 1e4, 3e38,
                      float("inf"), float("nan")])
    v = torch.cat([v, -v, torch.full((32 - 2 * v.numel(),), 0.5)]).to(device)
    q = torch.empty(v.shape, dtype=FP8, device=device)
    _quantize_kernel[(1,)](v, q, float("-inf"), float("inf"), N=v.numel(), NATIVE=device != "cpu")
    out["unclamped_cast"] = _fp8_same(q.cpu(), v.cpu().to(FP8))
    for cid, scheme in (("nan_rows_token", S1), ("nan_rows_group", S2), ("nan_rows_static", S0)):
        case = _case(cid, dtype=BF16, M=4, H=128, scheme=scheme, gs=64,
                     ops=() if scheme == S0 else (CMIN, DIV), consts=() if scheme == S0 else (1e-12, 448.0))
        args = list(make_args(case, device=device))
        x = args[0].clone()
        x[1, 5] = float("nan")
        x[2, 7] = float("inf")
        x[3] *= 1000.0  # static scale: |y / s| far above 448 in this row
        args[0] = x
        args[16], args[17] = float("-inf"), float("inf")  # unclamped quant
        ref = K.rms_norm_quant_reference(*args)
        got = K.rms_norm_quant_triton(*args)
        (gq, gs_), (rq, rs) = (got[0].cpu(), got[1].cpu()), (ref[0].cpu(), ref[1].cpu())
        out[cid + "_q"] = _fp8_same(gq, rq)
        out[cid + "_s"] = int((gs_ != rs).sum() - (gs_.isnan() & rs.isnan()).sum())
        out[cid + "_nan_rows_q"] = _fp8_same(gq[1:3], rq[1:3])
        if scheme != S0:
            gn, rn = gs_[1:3], rs[1:3]
            out[cid + "_nan_rows_s"] = int((gn != rn).sum() - (gn.isnan() & rn.isnan()).sum())
    return out


def _interp_runtime(device: str = "cpu") -> dict[str, int]:
    """eps and one scale-chain constant read from one-element tensors (dynamic=True lifts float
    attributes into graph inputs): mismatch counts vs the reference with them as constants, and
    vs the reference taking the same tensors. eps 0.37 is far from the argument's 1e-6, so a
    kernel that ignored the tensor would differ everywhere."""
    out: dict[str, int] = {}
    for cid, scheme, slot, op in (("tok_div", S1, 1, DIV), ("grp_mul", S2, 0, MUL), ("static_rdiv", S0, 0, RDIV)):
        consts = (1e-12, 100.0) if slot == 1 else (3.0, 1e-12)
        ops = (CMIN, op) if slot == 1 else (op, CMIN)
        case = _case(cid, dtype=BF16, M=3, H=128, scheme=scheme, gs=64, ops=ops, consts=consts)
        args = list(make_args(case, device=device))
        const_args = list(args)
        const_args[4] = 0.37
        ref_const = K.rms_norm_quant_reference(*const_args)
        args[14] = [0.0 if i == slot else c for i, c in enumerate(consts)]  # the kernel must load it
        rt = dict(scale_ub=torch.tensor([consts[slot]], device=device), ub_slot=slot,
                  eps_tensor=torch.tensor(0.37, device=device))
        ref_rt = K.rms_norm_quant_reference(*args, **rt)
        got = K.rms_norm_quant_triton(*args, **rt)
        for name, ref in (("const", ref_const), ("ref", ref_rt)):
            out[f"{cid}_{name}_q"] = _fp8_same(got[0].cpu(), ref[0].cpu())
            out[f"{cid}_{name}_s"] = int((got[1].cpu() != ref[1].cpu()).sum())
    return out


def _interp_main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    result: dict[str, Any] = {"helpers": _interp_helpers(), "cases": {}, "special": _interp_special(),
                              "runtime": _interp_runtime()}
    for case in INTERP_CASES:
        try:
            result["cases"][case["id"]] = _run_kernel_case(make_args(case))
        except Exception as e:  # report, do not abort the other cases
            result["cases"][case["id"]] = {"error": f"{type(e).__name__}: {e}"}
    print("@@JSON@@" + json.dumps(result))


@pytest.fixture(scope="module")
def interp_results() -> dict[str, Any]:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--interp-json"],
        cwd=str(REPO), env=env, capture_output=True, text=True, timeout=300,
    )
    marker = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@JSON@@")]
    if proc.returncode != 0 or not marker:
        pytest.fail(f"interpreter subprocess failed rc={proc.returncode}\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(marker[-1][len("@@JSON@@"):])


def test_interp_rounding_helpers(interp_results: dict[str, Any]) -> None:
    assert interp_results["helpers"] == {"bf16": 0, "f16": 0, "e4m3": 0, "rint": 0}


def test_interp_nan_inf_and_unclamped_fp8(interp_results: dict[str, Any]) -> None:
    """Kernel == torch's cast/reference bit for bit on overflow, inf, NaN and NaN/inf rows."""
    special = interp_results["special"]
    assert special and all(v == 0 for v in special.values()), special


def test_interp_runtime_eps_and_scale_constant(interp_results: dict[str, Any]) -> None:
    """eps_tensor and a runtime scale-chain slot (MUL/DIV/RDIV): the kernel gives the bits of
    the reference with those values as constants."""
    rt = interp_results["runtime"]
    assert rt and all(v == 0 for v in rt.values()), rt


@pytest.mark.parametrize("cid", [c["id"] for c in INTERP_CASES])
def test_interp_kernel(interp_results: dict[str, Any], cid: str) -> None:
    m = interp_results["cases"][cid]
    assert "error" not in m, m.get("error")
    assert_metrics(m)
    # same arithmetic as the reference except the reduction order: expect exact here
    assert m["q_frac_diff"] <= 0.005, m


# ----------------------------------------------------------------------------
# Reference sanity (float64 re-derivation) and CPU op
# ----------------------------------------------------------------------------


def _f64_rederive(args: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-by-row float64 re-derivation; returns (dequantized q, scales)."""
    (x, residual, weight, scale, eps, woff, wsum, rbw, norm, qd, scheme, gs, ssv, ops, consts,
     qmul, qmin, qmax, rint, need_h) = args
    M, H = x.shape
    f64 = torch.float64
    deqs, scs = [], []
    for m in range(M):
        hrow = x[m].double()
        if residual is not None:
            hrow = (hrow + residual[m].double()).to(x.dtype).double()
        rr = 1.0 / math.sqrt(float((hrow * hrow).mean()) + eps)
        n = hrow * rr
        if rbw:
            n = n.to(x.dtype).double()
        if weight is not None:
            wv = weight.double() + woff
            if wsum is not None:
                wv = wv.to(wsum).double()
            n = n * wv
        y = n.to(norm).double()
        if scheme == S0:
            bases = [float(scale[0]) if scale is not None else ssv]
            width = H
        elif scheme == S1:
            bases, width = [float(y.abs().max())], H
        else:
            bases = [float(y[i:i + gs].abs().max()) for i in range(0, H, gs)]
            width = gs
        row_deq, row_s = [], []
        for gi, s in enumerate(bases):
            for op, c in zip(ops, consts):
                s = {MUL: lambda s, c: s * c, DIV: lambda s, c: s / c, RDIV: lambda s, c: c / s,
                     CMIN: lambda s, c: max(s, c), CMAX: lambda s, c: min(s, c),
                     RECIP: lambda s, c: 1.0 / s,
                     RBF16: lambda s, c: float(torch.tensor(s).to(BF16)),
                     RF16: lambda s, c: float(torch.tensor(s).to(F16))}[op](s, c)
            seg = y[gi * width:(gi + 1) * width]
            qp = seg * s if qmul else seg / s
            if rint:
                qp = torch.round(qp)
            q = qp.clamp(qmin, qmax).to(qd).double()
            row_deq.append(q / s if qmul else q * s)
            row_s.append(s)
        deqs.append(torch.cat(row_deq))
        scs.append(torch.tensor(row_s, dtype=f64))
    return torch.stack(deqs), torch.stack(scs)


@pytest.mark.parametrize("cid", ["tok_fp8_bf16_res", "grp_fp8_bf16_res", "tok_int8_gemma_offset",
                                 "static_recip_mul_fp32", "tok_rdiv_cmax_rf16"])
def test_reference_vs_float64(cid: str) -> None:
    case = next(c for c in INTERP_CASES if c["id"] == cid)
    args = make_args(case, M=8)
    q, s, h = K.rms_norm_quant_reference(*args)
    deq64, s64 = _f64_rederive(args)
    s32 = s.double().reshape(s64.shape[0] if case["scheme"] != S0 else 1, -1)
    if case["scheme"] == S0:
        s64 = s64[:1]
    assert torch.allclose(s32, s64, rtol=2**-7, atol=0), (s32, s64)
    qmul = args[15]
    if case["scheme"] == S0:
        sb = s.double()
    elif case["scheme"] == S1:
        sb = s.double()[:, None]
    else:
        sb = s.double().repeat_interleave(args[11], dim=1)
    deq = q.double() / sb if qmul else q.double() * sb
    rel = (deq - deq64).norm() / deq64.norm()
    assert rel < 2e-2, rel
    if args[1] is not None:
        assert torch.equal(h, (args[0].float() + args[1].float()).to(args[0].dtype))


def test_reference_quant_semantics() -> None:
    """Hand-checked corners: int8 round-half-even vs truncation, fp8 clamp, shapes."""
    x = torch.tensor([[1.0, -1.0, 1.0, -1.0]])  # normalized: all +-1
    common = dict(residual=None, weight=None, scale=None, eps=0.0, weight_offset=0.0,
                  weight_sum_dtype=None, round_before_weight=False, norm_dtype=F32,
                  group_size=4, scale_ops=[], scale_consts=[], need_residual_out=False)
    def int8(mult: float, rint: bool) -> list:
        q, s, h = K.rms_norm_quant_reference(
            x, quant_dtype=I8, scheme=S0, static_scale_value=mult, quant_mul=True,
            qmin=-128, qmax=127, round_to_int=rint, **common)
        assert s.shape == (1,) and h.shape == (0,)
        return q.tolist()[0]

    assert int8(2.5, True) == [2, -2, 2, -2]  # half to even
    assert int8(3.5, True) == [4, -4, 4, -4]
    assert int8(3.5, False) == [3, -3, 3, -3]  # plain cast truncates toward zero
    assert int8(300.0, True) == [127, -128, 127, -128]  # clamp
    q, s, _ = K.rms_norm_quant_reference(
        x, quant_dtype=FP8, scheme=S1, static_scale_value=0.0, quant_mul=True, qmin=-448,
        qmax=448, round_to_int=False, **{**common, "scale_consts": [1000.0],
                                         "scale_ops": [MUL]})
    assert q.float().tolist() == [[448.0, -448.0, 448.0, -448.0]] and s.tolist() == [1000.0]


@pytest.mark.parametrize("cid", ["tok_fp8_bf16_res", "grp_fp8_bf16_res", "static_float_fp16",
                                 "tok_int8_round_bf16"])
def test_custom_op_cpu_matches_reference(cid: str) -> None:
    case = next(c for c in INTERP_CASES if c["id"] == cid)
    args = make_args(case)
    out = torch.ops.fxfuse.rms_norm_quant(*args)
    ref = K.rms_norm_quant_reference(*args)
    for a, b in zip(out, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("cid", ["tok_fp8_bf16_res", "static_tensor_bf16"])
def test_opcheck_cpu(cid: str) -> None:
    case = next(c for c in INTERP_CASES if c["id"] == cid)
    torch.library.opcheck(torch.ops.fxfuse.rms_norm_quant.default, make_args(case))


def test_fake_impl_cuda_shapes() -> None:
    """The Triton-path body traced with fake CUDA tensors (no GPU needed) gives right metadata."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(5, 7168, dtype=BF16, device="cuda")
        w = torch.empty(7168, dtype=BF16, device="cuda")
        q, s, h = torch.ops.fxfuse.rms_norm_quant(
            x, x, w, None, 1e-6, 0.0, None, True, BF16, FP8, S2, 128, 0.0, [CMIN, DIV],
            [1e-10, 448.0], False, -448.0, 448.0, False, True)
        assert (q.shape, q.dtype) == ((5, 7168), FP8)
        assert (s.shape, s.dtype) == ((5, 56), F32)
        assert (h.shape, h.dtype) == ((5, 7168), BF16)
        q, s, h = torch.ops.fxfuse.rms_norm_quant(
            x, None, w, None, 1e-6, 0.0, None, True, BF16, I8, S0, 128, 0.5, [], [],
            False, -128.0, 127.0, True, False)
        assert (q.dtype, s.shape, h.shape) == (I8, (1,), (0,))


def test_bad_inputs_raise_value_error() -> None:
    case = next(c for c in INTERP_CASES if c["id"] == "grp_fp8_bf16_res")
    args = list(make_args(case))

    def bad(**kw: Any) -> list:
        names = ["x", "residual", "weight", "scale", "eps", "weight_offset", "weight_sum_dtype",
                 "round_before_weight", "norm_dtype", "quant_dtype", "scheme", "group_size",
                 "static_scale_value", "scale_ops", "scale_consts", "quant_mul", "qmin", "qmax",
                 "round_to_int", "need_residual_out"]
        a = list(args)
        for k, v in kw.items():
            a[names.index(k)] = v
        return a

    x = args[0]
    for kw in [
        dict(x=x.to(torch.int32)),
        dict(x=x.reshape(-1)),
        dict(group_size=96),  # 256 % 96
        dict(group_size=48, x=x[:, :192], residual=None, weight=args[2][:192]),  # not pow2
        dict(scale=torch.ones(1)),  # scale with dynamic scheme
        dict(scale_ops=[0, 0, 0, 0, 0], scale_consts=[1.0] * 5),
        dict(scale_ops=[9], scale_consts=[1.0]),
        dict(scale_ops=[0], scale_consts=[]),
        dict(quant_dtype=torch.float8_e5m2),
        dict(norm_dtype=torch.float64),
        dict(scheme=3),
        dict(residual=args[1].to(F16)),
        dict(weight=args[2][:10]),
        dict(x=x.t().contiguous().t()),  # column-major rows
    ]:
        with pytest.raises(ValueError):
            K.rms_norm_quant_triton(*bad(**kw))


def test_bytes_moved() -> None:
    M, H = 4096, 7168
    b = K.bytes_moved(M, H, BF16, has_residual=True, weight_dtype=BF16, need_residual_out=True,
                      quant_dtype=FP8, scheme=S1)
    assert b == M * H * 2 * 2 + H * 2 + M * H * (1 + 2) + M * 4
    b = K.bytes_moved(M, H, BF16, scheme=S2, group_size=128)
    assert b == M * H * 2 + H * 2 + M * H + M * (H // 128) * 4


# ----------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------

_HAS_CUDA = torch.cuda.is_available()
GPU_SHAPES = [(1, 4096), (4096, 4096), (4096, 7168), (33, 8192)]
GPU_CASES = ["static_tensor_bf16", "static_float_fp16", "static_recip_mul_fp32",
             "tok_fp8_bf16_res", "tok_int8_round_bf16", "tok_int8_gemma_offset",
             "grp_fp8_bf16_res", "grp_int8_fp16", "tok_qmul_chain_H96", "tok_strided_rows",
             "grp_norm_fp16_from_bf16"]


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA")
def test_gpu_nan_inf_and_unclamped_fp8() -> None:
    """Compiled kernel == torch's cast on overflow/inf/NaN and NaN rows (finite rows: reduction order)."""
    special = _interp_special("cuda")
    exact = {k: v for k, v in special.items() if k == "unclamped_cast" or "nan_rows" in k}
    assert all(v == 0 for v in exact.values()), special
    assert all(v <= 4 for v in special.values()), special


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("M,H", GPU_SHAPES)
@pytest.mark.parametrize("cid", GPU_CASES)
def test_gpu_kernel_vs_reference(cid: str, M: int, H: int) -> None:
    case = next(c for c in INTERP_CASES if c["id"] == cid)
    gs = 128 if case["scheme"] == S2 else case["gs"]
    args_cpu = make_args(case, "cpu", seed=M + H, M=M, H=H, gs=gs)
    args = make_args(case, "cuda", seed=M + H, M=M, H=H, gs=gs)
    ref = K.rms_norm_quant_reference(*args_cpu)  # CPU: exact 1/sqrt like the kernel
    runs = []
    for variant in (0, 1):
        out = _poisoned_outputs(args, variant)
        K.rms_norm_quant_triton(*args, out=out)
        runs.append(out)
    torch.cuda.synchronize()
    m = compare(ref, runs, args)
    assert_metrics(m)
    op_out = torch.ops.fxfuse.rms_norm_quant(*args)
    for a, b in zip(op_out, runs[0]):
        assert torch.equal(_bits(a), _bits(b))


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("cid", ["tok_fp8_bf16_res", "grp_fp8_bf16_res", "static_tensor_bf16"])
def test_gpu_op_under_torch_compile(cid: str) -> None:
    """Traced through AOT the op must become a user-defined Triton kernel in Inductor code."""
    from torch._inductor.utils import run_and_get_code

    case = next(c for c in INTERP_CASES if c["id"] == cid)
    gs = 128 if case["scheme"] == S2 else case["gs"]
    args = make_args(case, "cuda", seed=3, M=256, H=4096, gs=gs)
    tensors, rest = args[:4], args[4:]

    def f(x, r, w, s):  # type: ignore[no-untyped-def]
        return torch.ops.fxfuse.rms_norm_quant(x, r, w, s, *rest)

    torch._dynamo.reset()
    out, codes = run_and_get_code(torch.compile(f, fullgraph=True), *tensors)
    assert any("_rms_norm_quant_kernel" in c for c in codes), "kernel not inlined by Inductor"
    eager = torch.ops.fxfuse.rms_norm_quant(*args)
    for a, b in zip(out, eager):
        assert torch.equal(_bits(a), _bits(b))


if __name__ == "__main__":
    if "--interp-json" in sys.argv:
        _interp_main()
