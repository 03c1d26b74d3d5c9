"""Turn benchmark JSON into fxfuse/gates.json: the shape classes where each fusion ships.

A shape class is (family, scheme, size); its figure is the geomean over token counts of
stock-compile time / fused time. fxfuse/gating.py lets a rewrite through only where that figure
is >= 1, so a fused kernel never ships where it measured slower than Inductor. A result file
either carries `"gates": {family: {scheme: {size: speedup}}}` (every family but the first) or is
a bench_rmsnorm_quant result, whose cases are turned into gates here.

    python benchmarks/write_gates.py benchmarks/results/*_h100.json

A result with `"gates_merge": true` (bench_rope_quant.py --cache: only the rope_*_kvcache classes)
adds its classes to the family's existing table instead of replacing the table, so the RoPE family
is written from both results, the main one first:

    python benchmarks/write_gates.py benchmarks/results/rope_quant_h200_quick.json \
        benchmarks/results/rope_quant_cache_h200.json

rope_quant classes are "<scheme>/<M class>" per head_dim (fxfuse.gating.m_classes), recomputed
from the result's cases (rope_gates).
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
from collections import defaultdict

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from fxfuse.gating import m_class  # noqa: E402

SCHEME_OF = {"per_token_fp8_res": "per-token", "per_group128_fp8": "per-group", "static_fp8": "static"}
GATES = pathlib.Path(__file__).resolve().parents[1] / "fxfuse" / "gates.json"


def rope_gates(result: dict) -> dict | None:
    """rope_quant gates keyed "<scheme>/<M class>" (fxfuse.gating.m_classes) and "<scheme>", recomputed
    from the result's cases by the bench's own gates()/cache_gates(): for the main bench these are
    its summary's geomean_speedup_vs_compile "<head_dim>/<M class>" figures. Older results, whose
    "gates" were keyed by head_dim alone (a geomean over every M, which hid a 0.82x class), convert
    the same way. None when there are no cases (the result's own "gates" are used)."""
    if result.get("family") != "rope_quant" or not result.get("cases"):
        return None
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import bench_rope_quant as B

    return (B.cache_gates if result.get("cache") else B.gates)(result["cases"])


def gates_from(result: dict) -> dict:
    src = {"gpu": result.get("gpu"), "date": result.get("date"), "torch": result.get("torch")}
    gates = rope_gates(result) or result.get("gates") or result.get("summary", {}).get("gates")
    family = result.get("family")
    classed = {k.split("/M")[0] for k in gates or {} if "/M" in k}
    if family == "rope_quant" and gates and any(k not in classed for k in gates if "/M" not in k):
        raise SystemExit(f"write_gates: rope_quant gates need '<scheme>/<M class>' keys, got {sorted(gates)}")
    if gates and family and family not in gates:  # a bare {scheme: {size: x}} table of one family
        gates = {family: gates}
    if gates:
        return {**gates, "_source": src, "_merge": bool(result.get("gates_merge"))}
    ratios: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in result.get("cases", []):
        us = row.get("us", {})
        if us.get("compile") and us.get("fused") and row.get("fused_kernel_in_code", True):
            scheme = SCHEME_OF.get(row["scheme"], row["scheme"])
            for key in (scheme, f"{scheme}/{m_class(row['M'])}"):  # the per-M-class entries decide (gating.py)
                ratios[key][row["H"]].append(us["compile"] / us["fused"])
    table = {
        scheme: {str(h): round(math.exp(sum(map(math.log, v)) / len(v)), 3) for h, v in sorted(hs.items())}
        for scheme, hs in ratios.items()
    }
    return {"rmsnorm_quant": table, "_source": src} if table else {}


def main() -> None:
    existing = json.loads(GATES.read_text()) if GATES.exists() else {}
    fresh: dict[str, dict] = {}
    for path in sys.argv[1:]:
        gates = gates_from(json.loads(pathlib.Path(path).read_text()))
        src = gates.pop("_source", None)
        merge = gates.pop("_merge", False)
        for family, table in gates.items():
            # a family's table is replaced by this run's; several files of one family (one per
            # model, say) add their sizes to it; a merge-only result (a subset of the classes)
            # adds its classes to what the table holds
            if merge and family not in fresh:
                fresh[family] = {k: dict(v) for k, v in existing.get(family, {}).items()}
            merged = fresh.setdefault(family, {})
            for scheme, sizes in table.items():
                merged.setdefault(scheme, {}).update(sizes)
            existing[family] = merged
            key = f"{family}:{','.join(sorted(table))}" if merge else family
            existing.setdefault("_sources", {})[key] = src
    GATES.write_text(json.dumps(existing, indent=1, sort_keys=True) + "\n")
    print(json.dumps(gates, indent=1))


if __name__ == "__main__":
    main()
