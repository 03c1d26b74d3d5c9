"""In-model gate for plain RoPE at decode, from an e2e profile (no device needed to rerun).

Why: the RoPE bench times RoPE alone, where stock Inductor needs a kernel for it. Inside a model at
decode sizes, stock folds the rotation (and the cos/sin computation) into the attention prologue
kernel it emits anyway, so fxfuse's separate RoPE kernel is extra work there. The H200 e2e
profile of the dense fp8 model at 1 and 8 tokens showed it: the RoPE-related kernels of the fxfuse
step (the fused RoPE kernel, the prologue left beside it, the cos/sin kernel) took longer than
stock's one prologue.

This script sums those kernels per step on both sides of every decode row (M <= 16) of the given
e2e results, and writes a merge-only gate result for `rope/M<=16` at the model's head_dim: the
smaller of the isolated bench's figure (`--isolated`, the RoPE bench's result) and the in-model ratio.

    python benchmarks/in_model_gates.py benchmarks/results/e2e_dense_fp8_own_h200_launches.json \
        --isolated benchmarks/results/rope_quant_h200_quick.json \
        --isolated benchmarks/results/rope_quant_h200_gptoss.json --proxy-head-dims 64 \
        --out benchmarks/results/rope_in_model_decode_h200.json
    python benchmarks/write_gates.py benchmarks/results/rope_in_model_decode_h200.json
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
from typing import Any

HEAD_DIM = {"dense_fp8": 128}  # head_dim of e2e results recorded before e2e.py wrote it (hidden 4096 / 32 heads)
ISOLATED = pathlib.Path(__file__).resolve().parent / "results" / "rope_quant_h200_quick.json"  # the RoPE bench


def rope_related(name: str) -> bool:
    """Kernels that compute or consume the rotation before attention, on either side."""
    return "_rope_quant_kernel" in name or "scaled_dot_product" in name and name.startswith("triton_") \
        or ("cos" in name and "sin" in name and name.startswith("triton_"))


def side_us(prof: dict[str, Any]) -> float | None:
    """RoPE-related kernel us per step, or None unless the profile lists every kernel (its list
    sums to the step's kernel time within 1%: a top-N list cut short could hide some)."""
    top = prof.get("top_kernels") or []
    total = prof.get("kernel_us_per_step")
    if not top or not total or abs(sum(us for _, us in top) - total) > 0.01 * total:
        return None
    return sum(us for name, us in top if rope_related(name))


def in_model_ratios(paths: list[str]) -> list[dict[str, Any]]:
    rows = []
    for p in paths:
        doc = json.loads(pathlib.Path(p).read_text())
        for m in doc["models"]:
            head_dim = m.get("head_dim") or HEAD_DIM.get(m["model"])
            if head_dim is None:
                continue
            for r in m["rows"]:
                if r["kind"] != "decode" or r["M"] > 16:
                    continue
                st, fx = side_us(r.get("profile_compile") or {}), side_us(r.get("profile") or {})
                if st and fx:
                    rows.append(dict(source=pathlib.Path(p).name, model=m["model"], M=r["M"], stock_us=round(st, 2),
                                     fxfuse_us=round(fx, 2), ratio=round(st / fx, 3), head_dim=head_dim))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("results", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--isolated", action="append", default=None,
                    help="bench_rope_quant.py result(s) with the isolated figures (repeatable)")
    ap.add_argument("--proxy-head-dims", default="",
                    help="head_dims with no in-model profile that take the measured models' in-model ratio "
                         "(the mechanism, stock folding plain RoPE into the attention prologue at decode, does "
                         "not depend on head_dim); each still takes the smaller of that and its isolated figure")
    a = ap.parse_args()
    rows = in_model_ratios(a.results)
    if not rows:
        raise SystemExit("in_model_gates: no decode row with RoPE-related kernels on both sides")
    isolated: dict[str, float] = {}
    for path in a.isolated or [str(ISOLATED)]:
        summ = json.loads(pathlib.Path(path).read_text())["summary"]["geomean_speedup_vs_compile"]
        isolated.update({k.split("/")[0]: v for k, v in summ.get("rope", {}).items() if k.endswith("/M<=16")})
    gates: dict[str, float] = {}
    for hd in sorted({r["head_dim"] for r in rows}):
        rs = [r["ratio"] for r in rows if r["head_dim"] == hd]
        geo = math.exp(sum(map(math.log, rs)) / len(rs))
        gates[str(hd)] = round(min(geo, isolated.get(str(hd), math.inf)), 3)
    proxies = [h for h in a.proxy_head_dims.split(",") if h]
    every = math.exp(sum(math.log(r["ratio"]) for r in rows) / len(rows))
    for hd in proxies:
        gates.setdefault(hd, round(min(every, isolated.get(hd, math.inf)), 3))
    first = json.loads(pathlib.Path(a.results[0]).read_text())
    out = dict(family="rope_quant", gates_merge=True, gpu=first.get("gpu"), date=first.get("date"),
               torch=first.get("torch"), command="python benchmarks/in_model_gates.py " + " ".join(sys.argv[1:]),
               method="RoPE-related kernel us per decode step (profiler) stock / fxfuse; gate = min(isolated, in-model)",
               rows=rows, gates={"rope/M<=16": gates},
               proxy_head_dims={h: "in-model ratio of the measured head_dims (no model of this head_dim profiled)"
                                for h in proxies})
    pathlib.Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["rows"], indent=1), "\n", out["gates"])


if __name__ == "__main__":
    main()
