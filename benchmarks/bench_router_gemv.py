"""Benchmark the decode router GEMV (fxfuse::router_logits) against stock torch.compile of the
same ``F.linear(x, W)`` (Inductor calls cuBLAS), and write its gate.

Per (E, H) of real routers (Qwen3-30B-A3B 128 x 2048, Mixtral 8 x 4096, DeepSeek-V3 256 x 7168)
and M in {1, 2, 4, 8, 16}: median us under CUDA graphs (do_bench_cudagraph) of stock compile and of
the raw kernel, fresh random bf16 inputs, output checked against torch.mm. A small block-size sweep
at Qwen M=1 comes first (--sweep). The JSON carries
``"gates": {"moe_routing": {"router_gemv/M<=16": {H: geomean speedup}}}`` with ``"gates_merge":
true`` (python benchmarks/write_gates.py adds the class to the routing family's table).

Usage:  python benchmarks/bench_router_gemv.py --out X.json [--sweep] [--rep MS]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_moe_experts import bench_us, copy_bandwidth_gbps, rel_err  # noqa: E402

from fxfuse.kernels.router_gemv import fits, router_config, router_logits_triton  # noqa: E402

SHAPES = {"qwen3_30b_a3b": (128, 2048), "mixtral_8x7b": (8, 4096), "deepseek_v3": (256, 7168)}
UPCAST = {"deepseek_v3_fp32": (256, 7168)}  # linear(x.float(), W.float()): gate class router_gemv_upcast
MS = (1, 2, 4, 8, 16)


def gates(cases: list[dict]) -> dict:
    """The routing family's "router_gemv/M<=16" class per H: over the cases the pass would rewrite
    (`fits`), the geomean speedup if every one won, else the worst (a wrong result counts as 0)."""
    per: dict[str, dict[int, list[float]]] = {}
    for c in cases:
        if fits(c["M"], c["E"], c["H"], upcast=bool(c.get("upcast"))):
            scheme = "router_gemv_upcast/M<=16" if c.get("upcast") else "router_gemv/M<=16"
            per.setdefault(scheme, {}).setdefault(c["H"], []).append(c["speedup"] if c["err"] < 1e-2 else 0.0)
    return {"moe_routing": {scheme: {
        str(h): (math.exp(sum(math.log(max(s, 1e-9)) for s in v) / len(v)) if min(v) >= 1.0 else min(v))
        for h, v in sorted(per_h.items())} for scheme, per_h in per.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--rep", type=int, default=50)
    a = ap.parse_args()
    torch._inductor.config.fx_graph_cache = False
    copy = copy_bandwidth_gbps(100)
    res = dict(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               gpu=torch.cuda.get_device_name(), torch=torch.__version__, copy_gbps=copy,
               command="benchmarks/bench_router_gemv.py " + " ".join(sys.argv[1:]), family="moe_routing",
               gates_merge=True, sweep=[], cases=[])
    g = torch.Generator(device="cuda").manual_seed(0)
    if a.sweep:
        E, H = SHAPES["qwen3_30b_a3b"]
        x = torch.randn(1, H, device="cuda", dtype=torch.bfloat16, generator=g)
        w = torch.randn(E, H, device="cuda", dtype=torch.bfloat16, generator=g) * 0.05
        ref = torch.mm(x, w.t())
        for be, bk, nw in itertools.product((1, 2, 4, 8), (256, 512, 1024), (2, 4, 8)):
            cfg = dict(BLOCK_E=be, BLOCK_K=bk, num_warps=nw)
            out = torch.full_like(ref, float("nan"))
            router_logits_triton(x, w, out=out, config=cfg)
            us = bench_us(lambda: router_logits_triton(x, w, out=out, config=cfg), a.rep)
            res["sweep"].append(dict(cfg=cfg, us=us, err=rel_err(out, ref)))
        best = min(res["sweep"], key=lambda r: r["us"] if r["err"] < 1e-2 else math.inf)
        print(f"sweep qwen M=1: default {router_config(E, H)}; best {best['cfg']} {best['us']:.2f} us", flush=True)
    for name, (E, H) in {**SHAPES, **UPCAST}.items():
        w = torch.randn(E, H, device="cuda", dtype=torch.bfloat16, generator=g) * 0.05
        up = name in UPCAST
        odt = torch.float32 if up else None
        stock = torch.compile((lambda t: torch.nn.functional.linear(t.float(), w.float())) if up
                              else (lambda t: torch.nn.functional.linear(t, w)), dynamic=False)
        for M in MS:
            x = torch.randn(M, H, device="cuda", dtype=torch.bfloat16, generator=g)
            ref = torch.mm(x.float(), w.float().t()) if up else torch.mm(x, w.t())
            out = torch.full_like(ref, float("nan"))
            router_logits_triton(x, w, odt, out=out)
            err = rel_err(out, ref)
            us_f = bench_us(lambda: router_logits_triton(x, w, odt, out=out), a.rep)
            us_c = bench_us(lambda: stock(x), a.rep)
            bytes_ = (E * H + M * H + M * E) * 2
            res["cases"].append(dict(model=name, E=E, H=H, M=M, upcast=up, us={"compile": us_c, "fused": us_f}, err=err,
                                     speedup=us_c / us_f, frac_copy=bytes_ / (us_f * 1e-6) / (copy * 1e9)))
            print(f"{name} M={M}: compile {us_c:.2f} us fused {us_f:.2f} us ({us_c / us_f:.2f}x) err {err:.1e}",
                  flush=True)
        torch._dynamo.reset()
    res["gates"] = gates(res["cases"])
    print(json.dumps(res["gates"]), flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
