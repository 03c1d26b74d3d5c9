"""Benchmark fused MoE routing against eager and stock torch.compile of the written router.

Routers start from the logits (the gate GEMM is not part of the region):
  * qwen3_30b_a3b  softmax_topk     E=128 k=8  fp32 softmax, renormalize, cast to bf16
  * mixtral        softmax_topk     E=8   k=2  softmax(logits.float()), renormalize, fp32
  * deepseek_v3    sigmoid_grouped  E=256 k=8  sigmoid + bias, 8 groups top-4, renorm, x2.5
  * topk_softmax   topk_softmax     E=8   k=2  topk on logits, softmax over the k (Mixtral-v0.1)
per M in {1, 16, 64, 256, 4096}: median us under CUDA graphs (do_bench_cudagraph) for eager,
stock compile, compile + fxfuse (ungated) and the raw op; GB/s of the fused kernel against a
1 GiB device copy; ids agreement and weight error vs eager. The JSON holds per-case numbers,
per-(scheme, E, M class) geomeans and a `gates` block ({"moe_routing": {scheme: {E: x}}}) that
benchmarks/write_gates.py merges into fxfuse/gates.json.

Usage:  python benchmarks/bench_moe_routing.py --out benchmarks/results/moe_routing.json [--quick]
        python benchmarks/bench_moe_routing.py --dry-run     # CPU: build + compile + check, no timing
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
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fxfuse.kernels import moe_routing as K  # noqa: E402

BF16, F32 = torch.bfloat16, torch.float32

# ----------------------------------------------------------------------------- written routers


def qwen3_router(logits: torch.Tensor, k: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    p = F.softmax(logits, dtype=torch.float, dim=-1)
    w, ids = torch.topk(p, k, dim=-1)
    w /= w.sum(dim=-1, keepdim=True)
    return w.to(logits.dtype), ids


def mixtral_router(logits: torch.Tensor, k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    p = F.softmax(logits.float(), dim=-1)
    w, ids = torch.topk(p, k, dim=-1)
    w /= w.sum(dim=-1, keepdim=True)
    return w, ids


def topk_softmax_router(logits: torch.Tensor, k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    v, ids = torch.topk(logits, k, dim=-1)
    return F.softmax(v, dim=-1, dtype=torch.float32).to(logits.dtype), ids


def deepseek_v3_router(logits: torch.Tensor, bias: torch.Tensor, k: int = 8, n_group: int = 8,
                       topk_group: int = 4, scale: float = 2.5) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' DeepseekV3TopkRouter after its fp32 F.linear."""
    E = logits.shape[-1]
    scores = logits.sigmoid()
    sfc = scores + bias
    group_scores = sfc.view(-1, n_group, E // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, E // n_group).reshape(-1, E)
    sfc = sfc.masked_fill(~score_mask.bool(), float("-inf"))
    ids = torch.topk(sfc, k=k, dim=-1, sorted=False)[1]
    w = scores.gather(1, ids)
    w /= w.sum(dim=-1, keepdim=True) + 1e-20
    return w * scale, ids


CASES: dict[str, dict[str, Any]] = {
    "qwen3_30b_a3b": dict(scheme="softmax_topk", E=128, k=8, form=qwen3_router, dtype=BF16, bias=False,
                          op=(K.SCORING_SOFTMAX, F32, F32, 1, 1, True, 0.0, 1.0, F32, BF16)),
    "mixtral": dict(scheme="softmax_topk", E=8, k=2, form=mixtral_router, dtype=BF16, bias=False,
                    op=(K.SCORING_SOFTMAX, F32, F32, 1, 1, True, 0.0, 1.0, F32, F32)),
    "deepseek_v3": dict(scheme="sigmoid_grouped", E=256, k=8, form=deepseek_v3_router, dtype=F32, bias=True,
                        op=(K.SCORING_SIGMOID, F32, F32, 8, 4, True, 1e-20, 2.5, F32, F32)),
    "topk_softmax": dict(scheme="topk_softmax", E=8, k=2, form=topk_softmax_router, dtype=BF16, bias=False,
                         op=(K.SCORING_TOPK_SOFTMAX, BF16, BF16, 1, 1, False, 0.0, 1.0, BF16, BF16)),
}


def make_inputs(name: str, M: int, dev: str) -> tuple[tuple, tuple]:
    """Fresh random logits (never zeros; distinct values) -> (form args, raw op args)."""
    c = CASES[name]
    logits = (torch.randn(M, c["E"], device=dev) * 2.0).to(c["dtype"])
    fargs: tuple = (logits,)
    bias = None
    if c["bias"]:
        bias = torch.randn(c["E"], device=dev) * 0.05
        fargs = (logits, bias)
    scoring, sdt, bdt, ng, tg, renorm, eps, scale, vdt, odt = c["op"]
    oargs = (logits, bias, c["k"], scoring, sdt, bdt, ng, tg, K.GROUP_TOP2_SUM, float("-inf"), renorm, eps, scale,
             vdt, odt, False)
    return fargs, oargs


def compare(out: tuple, ref: tuple) -> dict[str, float]:
    """ids agreement (as sets per row) and max relative weight error against eager."""
    w, ids = out[0].float(), out[1]
    rw, rids = ref[0].float(), ref[1]
    ids_s, o = ids.sort(-1)
    rids_s, ro = rids.sort(-1)
    agree = float((ids_s == rids_s).all(-1).float().mean())
    same = (ids_s == rids_s).all(-1)
    err = ((w.gather(-1, o) - rw.gather(-1, ro)).abs() / rw.gather(-1, ro).abs().clamp_min(1e-30))[same]
    return dict(ids_rows_equal=agree, w_max_rel=float(err.max()) if err.numel() else 0.0)


# ----------------------------------------------------------------------------- timing


def bench_us(fn: Callable[[], Any], rep: int) -> float:
    """Median us per call under a CUDA graph (no launch overhead)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")) * 1e3


def copy_bandwidth_gbps(rep: int) -> float:
    n = (1 << 30) // 2
    a = torch.randn(n, device="cuda", dtype=BF16)
    b = torch.empty_like(a)
    us = bench_us(lambda: b.copy_(a), rep)
    del a, b
    return 2 * n * 2 / (us * 1e-6) / 1e9


def load_pass() -> tuple[Optional[Any], Optional[str]]:
    try:
        import fxfuse

        return fxfuse.FusionPasses(options={"gate": False}), None  # the benchmark decides the gates
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}"


def _kernel_in_code(fn: Callable, args: tuple) -> tuple[Any, Optional[bool]]:
    from unittest import mock

    from torch._inductor.graph import GraphLowering

    codes: list[str] = []
    with mock.patch.object(GraphLowering, "save_output_code", codes.append):
        out = fn(*args)
    if not codes:
        return out, None
    return out, any("_moe_routing_kernel" in c for c in codes) and not any("torch.ops.fxfuse" in c for c in codes)


def m_class(M: int) -> str:
    return "M<=64" if M <= 64 else "M>64"


def run(names: list[str], Ms: list[int], rep: int, dev: str, dry: bool, copy_gbps: Optional[float]) -> list[dict]:
    import fxfuse

    fx_pass, err = load_pass()
    if err:
        print(f"[bench] fxfuse.passes unavailable: {err}", flush=True)
    torch._inductor.config.fx_graph_cache = False
    rows: list[dict[str, Any]] = []
    for name in names:
        c = CASES[name]
        torch._dynamo.reset()
        stock = torch.compile(c["form"])
        fused = torch.compile(c["form"], options={"post_grad_custom_pre_pass": fx_pass}) if fx_pass else None
        broken: Optional[str] = None
        for M in Ms:
            t0 = time.time()
            fargs, oargs = make_inputs(name, M, dev)
            row: dict[str, Any] = dict(case=name, scheme=c["scheme"], E=c["E"], k=c["k"], M=M, us={}, check={},
                                       notes=[])
            with torch.no_grad():
                ref = c["form"](*fargs)
            variants: dict[str, Optional[Callable[[], Any]]] = {
                "eager": lambda: c["form"](*fargs),
                "compile": lambda: stock(*fargs),
                "fused": (lambda: fused(*fargs)) if fused is not None and broken is None else None,
                "op": lambda: torch.ops.fxfuse.moe_routing(*oargs),
            }
            for vname, fn in variants.items():
                if fn is None:
                    row["us"][vname] = None
                    continue
                try:
                    before = fxfuse.counters["moe_routing"]
                    if vname == "fused":
                        out, inl = _kernel_in_code(fused, fargs)
                        if inl is not None:
                            row["fused_kernel_in_code"] = inl
                        if fxfuse.counters["moe_routing"] > before:
                            row["fused_applied"] = True
                    else:
                        out = fn()
                    if vname != "eager":
                        row["check"][vname] = compare(out, ref)
                    row["us"][vname] = None if dry else bench_us(fn, rep)
                except Exception as e:  # noqa: BLE001 - record and continue
                    msg = f"{vname}: {type(e).__name__}: {str(e)[:300]}"
                    row["notes"].append(msg)
                    row["us"][vname] = None
                    print(f"[bench] {name} M={M} {msg}", flush=True)
                    if vname == "fused":
                        broken = msg
                        traceback.print_exc(limit=4)
            nbytes = K.bytes_moved(M, c["E"], c["k"], c["dtype"], oargs[14], c["bias"])
            row["bytes"] = nbytes
            row["gbps"] = {k: (nbytes / (v * 1e-6) / 1e9 if v else None) for k, v in row["us"].items()}
            if copy_gbps:
                row["frac_copy"] = {k: (g / copy_gbps if g else None) for k, g in row["gbps"].items()}
            cu = row["us"].get("compile")
            row["speedup_vs_compile"] = {k: (cu / v if (cu and v) else None) for k, v in row["us"].items()}
            row["wall_s"] = round(time.time() - t0, 2)
            rows.append(row)
            print(_fmt_row(row), flush=True)
    return rows


def _f(v: Optional[float], w: int = 7, p: int = 2) -> str:
    return f"{v:{w}.{p}f}" if v is not None else " " * (w - 3) + "n/a"


def _fmt_row(r: dict[str, Any]) -> str:
    us, sp = r["us"], r["speedup_vs_compile"]
    chk = r["check"].get("fused") or r["check"].get("op") or {}
    return (f"{r['case']:14s} {r['scheme']:16s} E={r['E']:3d} k={r['k']:2d} M={r['M']:5d} | us eager {_f(us['eager'])} "
            f"compile {_f(us['compile'])} fused {_f(us['fused'])} op {_f(us['op'])} | x stock fused "
            f"{_f(sp['fused'], 5)} op {_f(sp['op'], 5)} | ids {chk.get('ids_rows_equal')} "
            f"w_err {chk.get('w_max_rel')} applied {r.get('fused_applied')} in_code {r.get('fused_kernel_in_code')}")


def _geo(vals: list[Optional[float]]) -> Optional[float]:
    v = [x for x in vals if x]
    return math.exp(sum(map(math.log, v)) / len(v)) if v else None


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Geomean speedups per (scheme, E, M class) and per (scheme, E): the latter are the gates."""
    by_class: dict[str, dict[str, Any]] = {}
    gates: dict[str, dict[str, float]] = {}
    keys = sorted({(r["scheme"], r["E"]) for r in rows})
    for scheme, E in keys:
        sel = [r for r in rows if r["scheme"] == scheme and r["E"] == E]
        for cls in ("M<=64", "M>64"):
            part = [r for r in sel if m_class(r["M"]) == cls]
            by_class[f"{scheme}/E={E}/{cls}"] = dict(
                fused=_geo([r["speedup_vs_compile"].get("fused") for r in part]),
                op=_geo([r["speedup_vs_compile"].get("op") for r in part]),
                max_fused_us=max([r["us"]["fused"] for r in part if r["us"].get("fused")], default=None),
            )
        ok = [r for r in sel if r.get("fused_kernel_in_code", True)]
        g = _geo([r["speedup_vs_compile"].get("fused") for r in ok])
        if g is not None:
            gates.setdefault(scheme, {})[str(E)] = round(g, 3)
    small = [r["us"].get("fused") for r in rows if r["M"] <= 64 and r["us"].get("fused")]
    return dict(
        per_class=by_class,
        gates={"moe_routing": gates},
        max_fused_us_M_le_64=max(small) if small else None,
        min_speedup_fused=min([r["speedup_vs_compile"]["fused"] for r in rows if r["speedup_vs_compile"].get("fused")],
                              default=None),
        fused_kernel_in_code=all(r.get("fused_kernel_in_code", True) for r in rows),
        all_ids_equal=all((r["check"].get("fused") or {}).get("ids_rows_equal", 1.0) == 1.0 for r in rows),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="M in {1, 64, 4096}, shorter reps")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny M, compile + check, no timing")
    ap.add_argument("--rep", type=int, default=None)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    names = [n for n in args.cases.split(",") if n]
    t0 = time.time()
    if args.dry_run:
        rows = run(names, [3, 5], 0, "cpu", True, None)
        bad = [r for r in rows if not r.get("fused_applied") and r["M"] == 3 or r["notes"]]
        result = dict(dry_run=True, cases=rows, summary=summarize(rows))
        print(f"[bench] dry run: {len(rows)} rows, {len(bad)} problem rows")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1, default=str))
        sys.exit(1 if bad else 0)
    if not torch.cuda.is_available():
        sys.exit("bench_moe_routing: needs a CUDA device (or --dry-run)")
    import triton

    rep = args.rep or (10 if args.quick else 20)
    Ms = [1, 64, 4096] if args.quick else [1, 16, 64, 256, 4096]
    copy_gbps = copy_bandwidth_gbps(rep)
    print(f"[bench] {torch.cuda.get_device_name()} copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    rows = run(names, Ms, rep, "cuda", False, copy_gbps)
    result = dict(
        family="moe_routing", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), copy_gbps=copy_gbps, rep_ms=rep,
        quick=args.quick, bytes_model="fxfuse.kernels.moe_routing.bytes_moved (min HBM read+write)",
        cases=rows, summary=summarize(rows),
    )
    result["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(result["summary"], indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str))
        print(f"[bench] wrote {args.out}")


if __name__ == "__main__":
    main()
