"""Turn a bench_rmsnorm_quant (or bench_rope_quant) JSON into fxfuse/gates.json: the shape classes where fusion ships.

A shape class is (scheme, hidden size); its figure is the geomean over token counts of
stock-compile time / fxfuse-compile time. fxfuse/gating.py lets a rewrite through only where
that figure is >= 1, so a fused kernel never ships where it measured slower than Inductor.

    python benchmarks/write_gates.py benchmarks/results/rmsnorm_quant_h100.json
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
from collections import defaultdict

SCHEME_OF = {"per_token_fp8_res": "per-token", "per_group128_fp8": "per-group", "static_fp8": "static"}
GATES = pathlib.Path(__file__).resolve().parents[1] / "fxfuse" / "gates.json"


def gates_from(result: dict) -> dict:
    if result.get("family") == "rope_quant":  # bench_rope_quant.py computes its table (keyed by head_dim)
        return {"rope_quant": result["gates"],
                "_source_rope_quant": {"gpu": result.get("gpu"), "date": result.get("date"), "torch": result.get("torch")}}
    ratios: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in result.get("cases", []):
        us = row.get("us", {})
        if us.get("compile") and us.get("fused") and row.get("fused_kernel_in_code", True):
            ratios[SCHEME_OF.get(row["scheme"], row["scheme"])][row["H"]].append(us["compile"] / us["fused"])
    table = {
        scheme: {str(h): round(math.exp(sum(map(math.log, v)) / len(v)), 3) for h, v in sorted(hs.items())}
        for scheme, hs in ratios.items()
    }
    return {
        "rmsnorm_quant": table,
        "_source": {"gpu": result.get("gpu"), "date": result.get("date"), "torch": result.get("torch")},
    }


def main() -> None:
    result = json.loads(pathlib.Path(sys.argv[1]).read_text())
    gates = gates_from(result)
    existing = json.loads(GATES.read_text()) if GATES.exists() else {}
    existing.update(gates)
    GATES.write_text(json.dumps(existing, indent=1, sort_keys=True) + "\n")
    print(json.dumps(gates, indent=1))


if __name__ == "__main__":
    main()
