"""Benchmark the fused act(gate)*up + quant kernel against eager and stock torch.compile.

Per (scheme, M, I): the written form (what a model author writes) eager, stock torch.compile,
torch.compile with the fxfuse pass (ungated), and the raw op; median us via do_bench_cudagraph,
GB/s from the minimum-traffic model (fxfuse.kernels.silu_mul_quant.bytes_moved), fraction of
the device copy bandwidth measured in the same run, speedup vs stock compile, dequantized error
vs eager, whether Inductor's output code holds our Triton kernel. `summary.gates` holds the
per-(scheme, I) geomeans over M, and per (scheme/M class, I), that benchmarks/write_gates.py turns
into fxfuse/gates.json.

Usage:  python benchmarks/bench_silu_mul_quant.py --out X.json [--quick] [--dry-run]
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
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_rmsnorm_quant import bench_us, copy_bandwidth_gbps, load_pass, rel_err  # noqa: E402
from fxfuse.gating import M_CLASSES, m_class  # noqa: E402
from fxfuse.kernels import silu_mul_quant as K  # noqa: E402
from fxfuse.kernels.quant_common import SCALE_CLAMP_MIN, SCALE_DIV, SCHEME_PER_GROUP, SCHEME_PER_TOKEN, SCHEME_STATIC  # noqa: E402

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
GROUP = 128
KERNEL = "_silu_mul_quant_kernel"


# ----------------------------------------------------------------------------- written forms


def _quant_token(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = (y.abs().amax(dim=-1, keepdim=True).to(torch.float32) / FP8_MAX).clamp(min=1e-12)
    return (y.to(torch.float32) / s).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


def form_token(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF Llama MLP (separate gate_proj / up_proj outputs) + down_proj's per-token fp8 input quant."""
    return _quant_token(F.silu(gate) * up)


def form_token_merged(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM-style merged gate_up + per-token fp8."""
    g, u = gate_up.chunk(2, dim=-1)
    return _quant_token(F.silu(g) * u)


def form_group(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged gate_up + DeepSeek-style 1x128 per-group fp8."""
    g, u = gate_up.chunk(2, dim=-1)
    y = F.silu(g) * u
    yg = y.to(torch.float32).reshape(*y.shape[:-1], -1, GROUP)
    s = (yg.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=1e-10)
    return (yg / s).clamp(-FP8_MAX, FP8_MAX).to(FP8).reshape(y.shape), s.squeeze(-1)


def form_static(gate: torch.Tensor, up: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = F.silu(gate) * up
    return (y.to(torch.float32) / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


SCHEMES: dict[str, dict[str, Any]] = {
    "per_token_fp8": dict(form=form_token, scheme=SCHEME_PER_TOKEN, merged=False,
                          ops=[SCALE_DIV, SCALE_CLAMP_MIN], consts=[FP8_MAX, 1e-12]),
    "per_token_fp8_merged": dict(form=form_token_merged, scheme=SCHEME_PER_TOKEN, merged=True,
                                 ops=[SCALE_DIV, SCALE_CLAMP_MIN], consts=[FP8_MAX, 1e-12]),
    "per_group128_fp8": dict(form=form_group, scheme=SCHEME_PER_GROUP, merged=True,
                             ops=[SCALE_DIV, SCALE_CLAMP_MIN], consts=[FP8_MAX, 1e-10]),
    "static_fp8": dict(form=form_static, scheme=SCHEME_STATIC, merged=False, ops=[], consts=[]),
}
GATE_SCHEME = {"per_token_fp8": "per-token", "per_token_fp8_merged": "per-token",
               "per_group128_fp8": "per-group", "static_fp8": "static"}


def make_inputs(name: str, M: int, inter: int, dev: str) -> tuple[tuple, tuple]:
    """Fresh random (never zero) inputs: (form args, raw-op args)."""
    spec = SCHEMES[name]
    dt = torch.bfloat16
    gate_up = 2 * torch.randn(M, 2 * inter, device=dev, dtype=dt)
    scale = torch.tensor([4.0 / FP8_MAX], device=dev, dtype=torch.float32)
    if spec["merged"]:
        fargs: tuple = (gate_up,)
        x, up = gate_up, None
    else:
        x, up = gate_up[:, :inter].contiguous(), gate_up[:, inter:].contiguous()
        fargs = (x, up, scale) if spec["scheme"] == SCHEME_STATIC else (x, up)
    oargs = (x, up, scale if spec["scheme"] == SCHEME_STATIC else None, K.ACT_SILU, dt, dt, FP8,
             spec["scheme"], GROUP, 0.0, spec["ops"], spec["consts"], False, -FP8_MAX, FP8_MAX, False)
    return fargs, oargs


def dequant(out: tuple, scheme: int, M: int, inter: int) -> torch.Tensor:
    q = out[0].reshape(M, inter).to(torch.float32)
    s = out[1].to(torch.float32)
    if scheme == SCHEME_STATIC:
        return q * s.reshape(())
    if scheme == SCHEME_PER_TOKEN:
        return q * s.reshape(M, 1)
    return q * s.reshape(M, inter // GROUP).repeat_interleave(GROUP, dim=1)


def _compiled_code(fn: Callable, args: tuple) -> tuple[Any, Optional[bool]]:
    """Run fn once; whether Inductor emitted our kernel (None if nothing compiled)."""
    from unittest import mock

    from torch._inductor.graph import GraphLowering

    codes: list[str] = []
    with mock.patch.object(GraphLowering, "save_output_code", codes.append):
        out = fn(*args)
    return out, (any(KERNEL in c for c in codes) if codes else None)


def run_sweep(Ms: list[int], Is: list[int], names: list[str], rep: int, copy_gbps: float, dev: str,
              dry: bool) -> list[dict[str, Any]]:
    import fxfuse

    fx_pass, pass_err = load_pass()
    if pass_err:
        print(f"[bench] fxfuse.passes unavailable: {pass_err}", flush=True)
    torch._inductor.config.fx_graph_cache = False  # always generate code: see our kernel in it
    rows: list[dict[str, Any]] = []
    for name in names:
        spec = SCHEMES[name]
        form = spec["form"]
        for inter in Is:
            torch._dynamo.reset()
            stock = torch.compile(form)
            fused = torch.compile(form, options={"post_grad_custom_pre_pass": fx_pass}) if fx_pass else None
            for M in Ms:
                t0 = time.time()
                fargs, oargs = make_inputs(name, M, inter, dev)
                nbytes = K.bytes_moved(M, inter, torch.bfloat16, FP8, spec["scheme"], GROUP)
                row: dict[str, Any] = dict(scheme=name, M=M, I=inter, bytes=nbytes, us={}, err={}, notes=[])
                with torch.no_grad():
                    ref = form(*fargs)
                deq_ref = dequant(ref, spec["scheme"], M, inter)
                variants: dict[str, Optional[Callable[[], Any]]] = {
                    "eager": lambda: form(*fargs),
                    "compile": lambda: stock(*fargs),
                    "fused": (lambda: fused(*fargs)) if fused is not None else None,
                    "op": lambda: torch.ops.fxfuse.silu_mul_quant(*oargs),
                }
                for vname, fn in variants.items():
                    if fn is None:
                        row["us"][vname] = None
                        continue
                    try:
                        if vname == "fused":
                            before = fxfuse.counters["silu_mul_quant"]
                            out, inlined = _compiled_code(fused, fargs)
                            if inlined is not None:
                                row["fused_kernel_in_code"] = inlined
                            row["fused_count"] = fxfuse.counters["silu_mul_quant"] - before
                        else:
                            out = fn()
                        if vname != "eager":
                            row["err"][vname] = rel_err(dequant(out, spec["scheme"], M, inter), deq_ref)
                        row["us"][vname] = None if dry else bench_us(fn, rep)
                    except Exception as e:  # noqa: BLE001 - record and continue
                        msg = f"{vname}: {type(e).__name__}: {str(e)[:300]}"
                        row["notes"].append(msg)
                        row["us"][vname] = None
                        print(f"[bench] {name} M={M} I={inter} {msg}", flush=True)
                        traceback.print_exc(limit=4)
                row["gbps"] = {k: (nbytes / (v * 1e-6) / 1e9 if v else None) for k, v in row["us"].items()}
                row["frac_copy"] = {k: (g / copy_gbps if (g and copy_gbps) else None) for k, g in row["gbps"].items()}
                c = row["us"].get("compile")
                row["speedup_vs_compile"] = {k: (c / v if (c and v) else None) for k, v in row["us"].items()}
                row["wall_s"] = round(time.time() - t0, 2)
                rows.append(row)
                print(_fmt_row(row), flush=True)
    return rows


def run_warp_sweep(rep: int, copy_gbps: float, dev: str, dry: bool) -> list[dict[str, Any]]:
    """Raw launcher at num_warps in {4, 8, 16, 32}: best vs the default heuristic."""
    out = []
    cases = [(256, 1), (256, 4096)] if dry else [(I, M) for I in (768, 14336, 18432) for M in (1, 4096, 16384)]
    for name in ("per_token_fp8", "per_group128_fp8"):
        for inter, M in cases:
            _, oargs = make_inputs(name, M, inter, dev)
            nbytes = K.bytes_moved(M, inter, torch.bfloat16, FP8, SCHEMES[name]["scheme"], GROUP)
            times: dict[int, Optional[float]] = {}
            for nw in (4, 8, 16, 32):
                try:
                    fn = lambda: K.silu_mul_quant_triton(*oargs, num_warps=nw)  # noqa: E731
                    times[nw] = None if dry else bench_us(fn, rep)
                except Exception as e:  # noqa: BLE001
                    times[nw] = None
                    print(f"[warps] {name} M={M} I={inter} nw={nw}: {type(e).__name__}: {e}", flush=True)
            valid = {k: v for k, v in times.items() if v}
            best = min(valid, key=valid.get) if valid else None
            heur = K.default_num_warps(1 << (inter - 1).bit_length())
            rec = dict(scheme=name, M=M, I=inter, us=times, best=best, heuristic=heur,
                       best_frac_copy=(nbytes / (valid[best] * 1e-6) / 1e9 / copy_gbps) if best and copy_gbps else None)
            out.append(rec)
            print(f"[warps] {name:18s} M={M:6d} I={inter:6d} {times} best={best} heur={heur}", flush=True)
    return out


def _f(v: Optional[float], w: int = 8, p: int = 1) -> str:
    return f"{v:{w}.{p}f}" if v is not None else " " * (w - 3) + "n/a"


def _fmt_row(r: dict[str, Any]) -> str:
    us, fc, sp = r["us"], r["frac_copy"], r["speedup_vs_compile"]
    err = max([e for e in r["err"].values() if e is not None], default=None)
    return (f"{r['scheme']:21s} M={r['M']:6d} I={r['I']:6d} | us eager {_f(us['eager'])} compile {_f(us['compile'])} "
            f"fused {_f(us['fused'])} op {_f(us['op'])} | %copy fused {_f(fc['fused'] and 100 * fc['fused'], 5)} "
            f"compile {_f(fc['compile'] and 100 * fc['compile'], 5)} | x stock {_f(sp['fused'], 5, 2)} | "
            f"err {err if err is None else f'{err:.1e}'} count {r.get('fused_count')} in_code {r.get('fused_kernel_in_code')}")


def _geo(vals: list[Optional[float]]) -> Optional[float]:
    v = [x for x in vals if x]
    return math.exp(sum(map(math.log, v)) / len(v)) if v else None


def summarize(rows: list[dict[str, Any]], copy_gbps: float) -> dict[str, Any]:
    """Headline numbers and the per-(gate scheme, I) geomean speedups of fused vs stock compile."""
    s: dict[str, Any] = {"copy_gbps": copy_gbps}
    for v in ("fused", "op"):
        s[f"geomean_speedup_{v}_vs_compile"] = _geo([r["speedup_vs_compile"].get(v) for r in rows])
        big = [r["frac_copy"].get(v) for r in rows if r["M"] >= 4096 and r["frac_copy"].get(v) is not None]
        s[f"min_frac_copy_M>=4096_{v}"] = min(big) if big else None
    gates: dict[str, dict[str, float]] = {}
    for scheme in sorted(set(GATE_SCHEME.values())):
        for inter in sorted({r["I"] for r in rows}):
            g = _geo([r["speedup_vs_compile"].get("fused") for r in rows
                      if GATE_SCHEME[r["scheme"]] == scheme and r["I"] == inter and r.get("fused_kernel_in_code", True)])
            if g is not None:
                gates.setdefault(scheme, {})[str(inter)] = round(g, 3)
            for cls, _ in M_CLASSES:  # per token-count class (fxfuse.gating.m_classes picks them)
                g = _geo([r["speedup_vs_compile"].get("fused") for r in rows
                          if GATE_SCHEME[r["scheme"]] == scheme and r["I"] == inter and m_class(r["M"]) == cls
                          and r.get("fused_kernel_in_code", True)])
                if g is not None:
                    gates.setdefault(f"{scheme}/{cls}", {})[str(inter)] = round(g, 3)
    s["gates"] = gates
    errs = [e for r in rows for k, e in r["err"].items() if e is not None and k in ("fused", "op")]
    s["max_deq_rel_err_vs_eager"] = max(errs) if errs else None
    inl = [r.get("fused_kernel_in_code") for r in rows if "fused_kernel_in_code" in r]
    s["fused_kernel_in_code"] = all(inl) if inl else None
    s["all_fused"] = all(r.get("fused_count", 0) >= 1 for r in rows) if rows else None
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="fewer shapes, shorter reps")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, no timing: checks the script runs")
    ap.add_argument("--rep", type=int, default=None)
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--sweep-warps", action="store_true", help="also sweep num_warps of the raw kernel")
    ap.add_argument("--Ms", default=None, help="token counts, comma-separated (overrides the default set)")
    ap.add_argument("--Is", default=None, help="intermediate sizes, comma-separated (overrides the default set)")
    args = ap.parse_args()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        sys.exit("bench_silu_mul_quant: needs a CUDA device (or --dry-run)")
    import triton

    dev = "cpu" if dry else "cuda"
    rep = args.rep or (10 if args.quick else 20)
    if dry:
        Ms, Is = [1, 5], [256]
    elif args.quick:
        Ms, Is = [1, 256, 4096], [768, 14336]
    else:
        Ms, Is = [1, 16, 256, 4096, 16384], [768, 14336, 18432]
    if args.Ms and not dry:
        Ms = [int(v) for v in args.Ms.split(",")]
    if args.Is and not dry:
        Is = [int(v) for v in args.Is.split(",")]
    names = [n for n in args.schemes.split(",") if n]
    t0 = time.time()
    copy_gbps = 0.0 if dry else copy_bandwidth_gbps(rep)
    gpu = "cpu (dry run)" if dry else torch.cuda.get_device_name()
    print(f"[bench] {gpu} copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    result: dict[str, Any] = dict(
        family="silu_mul_quant", gpu=gpu, torch=torch.__version__, triton=triton.__version__,
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), copy_gbps=copy_gbps, rep_ms=rep,
        quick=args.quick, dry_run=dry, bytes_model="fxfuse.kernels.silu_mul_quant.bytes_moved (min HBM read+write)",
    )
    with torch.no_grad():
        rows = run_sweep(Ms, Is, names, rep, copy_gbps, dev, dry)
    result["cases"] = rows
    result["summary"] = summarize(rows, copy_gbps)
    if args.sweep_warps:
        if dry:
            import os

            os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU: only checks the sweep builds its calls
        result["warp_sweep"] = run_warp_sweep(rep, copy_gbps, dev, dry)
    result["wall_s"] = round(time.time() - t0, 1)
    for k, v in result["summary"].items():
        print(f"{k:36s} {v}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str))
        print(f"[bench] wrote {args.out}")


if __name__ == "__main__":
    main()
