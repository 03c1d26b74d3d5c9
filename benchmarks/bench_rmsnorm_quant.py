"""Benchmark fused RMSNorm(+residual)+quant against eager and stock torch.compile.

One GPU call gives everything needed to judge the kernel:
  * device copy bandwidth (the roofline for a memory-bound op),
  * per (scheme, M, H): eager HF-style form, stock torch.compile, torch.compile with the
    fxfuse post-grad pass, and the raw op -- median us via do_bench_cudagraph, GB/s from the
    minimum-traffic model (fxfuse.kernels.rmsnorm_quant.bytes_moved), fraction of copy BW,
    speedup vs stock compile, dequantized error vs eager,
  * optional --sweep-warps: num_warps sweep of the raw kernel for a few shapes.

Usage:  python benchmarks/bench_rmsnorm_quant.py --out benchmarks/results/rmsnorm_quant.json
        [--quick] [--sweep-warps] [--static-shapes] [--rep MS]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fxfuse.kernels import rmsnorm_quant as K  # noqa: E402

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
EPS = 1e-6
GROUP = 128

# ----------------------------------------------------------------------------
# HF / vLLM-style written forms (what a model author writes; what the FX pass must find)
# ----------------------------------------------------------------------------


def _hf_rmsnorm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm.forward: fp32 statistics, round to input dtype, then * weight."""
    hf = h.to(torch.float32)
    var = hf.pow(2).mean(-1, keepdim=True)
    hf = hf * torch.rsqrt(var + eps)
    return weight * hf.to(h.dtype)


def form_per_token(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual add + RMSNorm + dynamic per-token fp8 (h is used by the next layer)."""
    h = x + residual
    y = _hf_rmsnorm(h, weight, EPS)
    amax = y.abs().amax(dim=-1, keepdim=True).to(torch.float32)
    s = amax.clamp(min=1e-12) / FP8_MAX
    q = (y.to(torch.float32) / s).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, s, h


def form_per_group(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm + dynamic per-group (1x128) fp8, DeepSeek-style activation quant."""
    y = _hf_rmsnorm(x, weight, EPS)
    yg = y.to(torch.float32).reshape(*y.shape[:-1], -1, GROUP)
    amax = yg.abs().amax(dim=-1, keepdim=True)
    s = amax.clamp(min=1e-10) / FP8_MAX
    q = (yg / s).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.reshape(y.shape), s.squeeze(-1)


def form_static(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm + static per-tensor fp8 with a calibrated scale tensor."""
    y = _hf_rmsnorm(x, weight, EPS)
    q = (y.to(torch.float32) / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


SCHEMES: dict[str, dict[str, Any]] = {
    "per_token_fp8_res": dict(form=form_per_token, scheme=K.SCHEME_PER_TOKEN, residual=True,
                              ops=[K.SCALE_CLAMP_MIN, K.SCALE_DIV], consts=[1e-12, FP8_MAX]),
    "per_group128_fp8": dict(form=form_per_group, scheme=K.SCHEME_PER_GROUP, residual=False,
                             ops=[K.SCALE_CLAMP_MIN, K.SCALE_DIV], consts=[1e-10, FP8_MAX]),
    "static_fp8": dict(form=form_static, scheme=K.SCHEME_STATIC, residual=False, ops=[],
                       consts=[]),
}


def make_inputs(name: str, M: int, H: int, dev: str = "cuda") -> tuple[tuple, tuple]:
    """Fresh random (never zero) inputs: (form args, raw-op args)."""
    spec = SCHEMES[name]
    dt = torch.bfloat16
    x = torch.randn(M, H, device=dev, dtype=dt)
    w = (1.0 + 0.1 * torch.randn(H, device=dev)).to(dt)
    r = torch.randn(M, H, device=dev, dtype=dt) if spec["residual"] else None
    scale = torch.tensor([4.0 / FP8_MAX], device=dev, dtype=torch.float32)
    if name == "per_token_fp8_res":
        fargs: tuple = (x, r, w)
    elif name == "per_group128_fp8":
        fargs = (x, w)
    else:
        fargs = (x, w, scale)
    oargs = (x, r, w, scale if spec["scheme"] == K.SCHEME_STATIC else None, EPS, 0.0, None, True,
             dt, FP8, spec["scheme"], GROUP, 0.0, spec["ops"], spec["consts"], False,
             -FP8_MAX, FP8_MAX, False, spec["residual"])
    return fargs, oargs


def case_bytes(name: str, M: int, H: int) -> int:
    spec = SCHEMES[name]
    return K.bytes_moved(M, H, torch.bfloat16, has_residual=spec["residual"],
                         weight_dtype=torch.bfloat16, need_residual_out=spec["residual"],
                         quant_dtype=FP8, scheme=spec["scheme"], group_size=GROUP,
                         has_scale_tensor=spec["scheme"] == K.SCHEME_STATIC)


def dequant(out: tuple, scheme: int, M: int, H: int) -> torch.Tensor:
    """Dequantize (q, s, ...) of either the form or the op into fp32 [M, H]."""
    q = out[0].reshape(M, H).to(torch.float32)
    s = out[1].to(torch.float32)
    if scheme == K.SCHEME_STATIC:
        return q * s.reshape(())
    if scheme == K.SCHEME_PER_TOKEN:
        return q * s.reshape(M, 1)
    return q * s.reshape(M, H // GROUP).repeat_interleave(GROUP, dim=1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------


def bench_us(fn: Callable[[], Any], rep: int) -> float:
    """Median us per call under a CUDA graph (no launch overhead, L2 not flushed)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    ms = triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")
    return float(ms) * 1e3


def copy_bandwidth_gbps(rep: int) -> float:
    """Device-to-device copy of a 1 GiB tensor; bytes read + written."""
    n = (1 << 30) // 2
    a = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    us = bench_us(lambda: b.copy_(a), rep)
    del a, b
    return 2 * n * 2 / (us * 1e-6) / 1e9


def load_pass() -> tuple[Optional[Any], Optional[str]]:
    """fxfuse.passes (the other half of the project), imported lazily; None + why if broken."""
    try:
        import fxfuse

        # ungated: the benchmark is what decides the gates (see write_gates.py)
        return fxfuse.FusionPasses(options={"gate": False}), None
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}"


def _kernel_in_code(fn: Callable, args: tuple) -> tuple[Any, Optional[bool]]:
    """Run fn once; True/False whether Inductor emitted our kernel (None if nothing compiled)."""
    from unittest import mock

    from torch._inductor.graph import GraphLowering

    codes: list[str] = []
    # like torch._inductor.utils.run_and_get_code, minus its torch._dynamo.reset()
    with mock.patch.object(GraphLowering, "save_output_code", codes.append):
        out = fn(*args)
    if not codes:
        return out, None
    return out, any("_rms_norm_quant_kernel" in c for c in codes)


def run_sweep(Ms: list[int], Hs: list[int], names: list[str], rep: int, static: bool,
              copy_gbps: float) -> list[dict[str, Any]]:
    fx_pass, pass_err = load_pass()
    if pass_err:
        print(f"[bench] fxfuse.passes unavailable: {pass_err}", flush=True)
    rows: list[dict[str, Any]] = []
    dyn = False if static else None
    # always generate code, so the output-code check sees our kernel (no FX-cache hits)
    torch._inductor.config.fx_graph_cache = False
    for name in names:
        spec = SCHEMES[name]
        form = spec["form"]
        for H in Hs:
            # fresh dynamo state per (scheme, H): M=1 compiles static, the second M goes
            # dynamic in M only (H stays static), later Ms reuse that graph
            torch._dynamo.reset()
            stock = torch.compile(form, dynamic=dyn)
            fused = None
            if fx_pass is not None:
                fused = torch.compile(form, dynamic=dyn,
                                      options={"post_grad_custom_pre_pass": fx_pass})
            fused_broken: Optional[str] = None
            for M in Ms:
                t0 = time.time()
                fargs, oargs = make_inputs(name, M, H)
                nbytes = case_bytes(name, M, H)
                row: dict[str, Any] = dict(scheme=name, M=M, H=H, bytes=nbytes, us={}, err={},
                                           notes=[])
                ref = form(*fargs)
                deq_ref = dequant(ref, spec["scheme"], M, H)
                variants: dict[str, Optional[Callable[[], Any]]] = {
                    "eager": lambda: form(*fargs),
                    "compile": lambda: stock(*fargs),
                    "fused": (lambda: fused(*fargs)) if fused is not None else None,
                    "op": lambda: torch.ops.fxfuse.rms_norm_quant(*oargs),
                }
                for vname, fn in variants.items():
                    if fn is None:
                        row["us"][vname] = None
                        continue
                    if vname == "fused" and fused_broken is not None:
                        row["us"][vname] = None
                        continue
                    try:
                        if vname == "fused":
                            out, inlined = _kernel_in_code(fused, fargs)
                            if inlined is not None:
                                row["fused_kernel_in_code"] = inlined
                        else:
                            out = fn()
                        if vname != "eager":
                            row["err"][vname] = rel_err(dequant(out, spec["scheme"], M, H), deq_ref)
                        row["us"][vname] = bench_us(fn, rep)
                    except Exception as e:  # noqa: BLE001 - record and continue
                        msg = f"{vname}: {type(e).__name__}: {str(e)[:300]}"
                        row["notes"].append(msg)
                        row["us"][vname] = None
                        print(f"[bench] {name} M={M} H={H} {msg}", flush=True)
                        if vname == "fused":
                            fused_broken = msg
                            traceback.print_exc(limit=4)
                row["gbps"] = {k: (nbytes / (v * 1e-6) / 1e9 if v else None)
                               for k, v in row["us"].items()}
                row["frac_copy"] = {k: (g / copy_gbps if g else None)
                                    for k, g in row["gbps"].items()}
                c = row["us"].get("compile")
                row["speedup_vs_compile"] = {k: (c / v if (c and v) else None)
                                             for k, v in row["us"].items()}
                row["wall_s"] = round(time.time() - t0, 2)
                rows.append(row)
                print(_fmt_row(row), flush=True)
                del fargs, oargs, ref, deq_ref
    return rows


def run_warp_sweep(rep: int, quick: bool, copy_gbps: float) -> list[dict[str, Any]]:
    """Time the raw launcher at num_warps in {2,4,8,16}; report best vs the heuristic."""
    out: list[dict[str, Any]] = []
    Hs = [2048, 4096, 7168, 8192]
    Ms = [1, 4096] if quick else [1, 4096, 16384]
    for name in ["per_token_fp8_res", "per_group128_fp8"]:
        for H in Hs:
            for M in Ms:
                _, oargs = make_inputs(name, M, H)
                nbytes = case_bytes(name, M, H)
                times: dict[int, Optional[float]] = {}
                for nw in (2, 4, 8, 16):
                    try:
                        times[nw] = bench_us(lambda: K.rms_norm_quant_triton(*oargs, num_warps=nw), rep)
                    except Exception as e:  # noqa: BLE001
                        times[nw] = None
                        print(f"[warps] {name} M={M} H={H} nw={nw}: {type(e).__name__}: {e}")
                valid = {k: v for k, v in times.items() if v}
                best = min(valid, key=valid.get) if valid else None
                heur = K.default_num_warps(1 << (H - 1).bit_length())
                rec = dict(scheme=name, M=M, H=H, us=times, best=best, heuristic=heur,
                           best_gbps=nbytes / (valid[best] * 1e-6) / 1e9 if best else None,
                           heuristic_slowdown=(valid.get(heur, math.nan) / valid[best]) if best else None)
                rec["best_frac_copy"] = rec["best_gbps"] / copy_gbps if rec["best_gbps"] else None
                out.append(rec)
                print(f"[warps] {name:18s} M={M:6d} H={H:5d} " +
                      " ".join(f"{k}:{v:7.2f}" if v else f"{k}:   n/a" for k, v in times.items()) +
                      f"  best={best} heur={heur}", flush=True)
    return out


# ----------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------


def _fmt(v: Optional[float], w: int = 8, p: int = 1) -> str:
    return f"{v:{w}.{p}f}" if v is not None else " " * (w - 3) + "n/a"


def _fmt_row(r: dict[str, Any]) -> str:
    us, g, sp = r["us"], r["gbps"], r["speedup_vs_compile"]
    return (f"{r['scheme']:18s} M={r['M']:6d} H={r['H']:5d} | us eager {_fmt(us['eager'])} "
            f"compile {_fmt(us['compile'])} fused {_fmt(us['fused'])} op {_fmt(us['op'])} | "
            f"GB/s fused {_fmt(g['fused'], 7, 0)} op {_fmt(g['op'], 7, 0)} | "
            f"x stock fused {_fmt(sp['fused'], 5, 2)} op {_fmt(sp['op'], 5, 2)}")


def summarize(rows: list[dict[str, Any]], copy_gbps: float) -> dict[str, Any]:
    """Headline numbers: geomean speedups vs stock compile, min BW fraction at M>=4096,
    worst time at M=1."""

    def geo(vals: list[float]) -> Optional[float]:
        vals = [v for v in vals if v]
        return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None

    s: dict[str, Any] = {"copy_gbps": copy_gbps}
    for v in ("fused", "op", "eager"):
        s[f"geomean_speedup_{v}_vs_compile"] = geo([r["speedup_vs_compile"].get(v) for r in rows])
        big = [r["frac_copy"].get(v) for r in rows if r["M"] >= 4096]
        big = [b for b in big if b is not None]
        s[f"min_frac_copy_M>=4096_{v}"] = min(big) if big else None
        one = [r["us"].get(v) for r in rows if r["M"] == 1]
        one = [o for o in one if o is not None]
        s[f"max_us_M=1_{v}"] = max(one) if one else None
    big_c = [r["frac_copy"].get("compile") for r in rows if r["M"] >= 4096]
    big_c = [b for b in big_c if b is not None]
    s["min_frac_copy_M>=4096_compile"] = min(big_c) if big_c else None
    errs = [r["err"].get(v) for r in rows for v in ("fused", "op") if r["err"].get(v) is not None]
    s["max_deq_rel_err_vs_eager"] = max(errs) if errs else None
    inl = [r.get("fused_kernel_in_code") for r in rows if "fused_kernel_in_code" in r]
    s["fused_kernel_in_code"] = (all(inl) if inl else None)
    return s


def print_table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    print("\n" + "=" * 120)
    print(f"{'scheme':18s} {'M':>6s} {'H':>5s} | {'eager':>8s} {'compile':>8s} {'fused':>8s} "
          f"{'op':>8s} us | {'fused':>6s} {'op':>6s} %copy | {'fused':>5s} {'op':>5s} x stock | "
          "deq err fused/op vs eager")
    for r in rows:
        us, fc, sp = r["us"], r["frac_copy"], r["speedup_vs_compile"]
        pct = (lambda v: f"{100 * v:6.1f}" if v is not None else "   n/a")
        err = max([e for k, e in r["err"].items() if e is not None and k in ("fused", "op")],
                  default=None)
        print(f"{r['scheme']:18s} {r['M']:6d} {r['H']:5d} | {_fmt(us['eager'])} "
              f"{_fmt(us['compile'])} {_fmt(us['fused'])} {_fmt(us['op'])}    | "
              f"{pct(fc['fused'])} {pct(fc['op'])}       | {_fmt(sp['fused'], 5, 2)} "
              f"{_fmt(sp['op'], 5, 2)}         | {err if err is None else f'{err:.1e}'}")
    print("-" * 120)
    for k, v in summary.items():
        print(f"{k:40s} {v}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="write JSON results here")
    ap.add_argument("--quick", action="store_true", help="fewer shapes, shorter reps")
    ap.add_argument("--sweep-warps", action="store_true", help="also sweep num_warps of the raw kernel")
    ap.add_argument("--only-warps", action="store_true", help="only the num_warps sweep")
    ap.add_argument("--static-shapes", action="store_true",
                    help="torch.compile(dynamic=False): one compile per shape (slower)")
    ap.add_argument("--rep", type=int, default=None, help="do_bench_cudagraph rep (ms)")
    ap.add_argument("--schemes", default=",".join(SCHEMES), help="comma list of " + ",".join(SCHEMES))
    args = ap.parse_args()

    if not torch.cuda.is_available():
        sys.exit("bench_rmsnorm_quant: needs a CUDA device")
    import triton

    rep = args.rep or (10 if args.quick else 20)
    Ms = [1, 4096, 16384] if args.quick else [1, 16, 128, 1024, 4096, 16384]
    Hs = [4096, 7168] if args.quick else [2048, 4096, 7168, 8192]
    names = [n for n in args.schemes.split(",") if n]
    t0 = time.time()
    copy_gbps = copy_bandwidth_gbps(rep)
    print(f"[bench] {torch.cuda.get_device_name()} copy bandwidth {copy_gbps:.0f} GB/s", flush=True)

    result: dict[str, Any] = dict(
        gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        copy_gbps=copy_gbps, rep_ms=rep, quick=args.quick, static_shapes=args.static_shapes,
        bytes_model="fxfuse.kernels.rmsnorm_quant.bytes_moved (min HBM read+write)",
    )
    rows: list[dict[str, Any]] = []
    if not args.only_warps:
        rows = run_sweep(Ms, Hs, names, rep, args.static_shapes, copy_gbps)
        result["cases"] = rows
        result["summary"] = summarize(rows, copy_gbps)
    if args.sweep_warps or args.only_warps:
        result["warp_sweep"] = run_warp_sweep(rep, args.quick, copy_gbps)
    result["wall_s"] = round(time.time() - t0, 1)
    if rows:
        print_table(rows, result["summary"])
    print(f"[bench] total {result['wall_s']} s", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str))
        print(f"[bench] wrote {args.out}")


if __name__ == "__main__":
    main()
