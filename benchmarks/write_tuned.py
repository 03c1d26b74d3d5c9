"""Merge a tune sweep's `suggested_tuned` into a kernel module's TUNED table (entries at least
--min-speedup over the default launch), rewriting the module's `TUNED: ... = {...}` literal.

Usage:  python benchmarks/write_tuned.py fxfuse/kernels/silu_mul_quant.py results/tune_silu_h200.json [--min-speedup 1.01]
"""

from __future__ import annotations

import argparse
import ast
import json
import re
from pathlib import Path


def merged_table(module: Path, tune_json: Path, min_speedup: float) -> dict:
    """The module's current TUNED entries updated by the sweep's suggestions that clear the bar."""
    src = module.read_text()
    m = re.search(r"^TUNED: [^\n]*= (\{.*?^\})", src, re.S | re.M)
    if not m:
        raise SystemExit(f"{module}: no TUNED literal")
    body = re.sub(r"#[^\n]*", "", m.group(1))
    table = ast.literal_eval(body)
    for key, v in json.loads(tune_json.read_text()).get("suggested_tuned", {}).items():
        if (v.get("speedup_vs_default") or 0) >= min_speedup:
            table[ast.literal_eval(key)] = v["config"]
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("module", type=Path)
    ap.add_argument("tune_json", type=Path)
    ap.add_argument("--min-speedup", type=float, default=1.01)
    a = ap.parse_args()
    table = merged_table(a.module, a.tune_json, a.min_speedup)
    src = a.module.read_text()
    lines = "".join(f"    {k!r}: {json.dumps(v, sort_keys=True)},\n" for k, v in sorted(table.items()))
    src = re.sub(r"^(TUNED: [^\n]*= )\{.*?^\}", lambda m: m.group(1) + "{\n" + lines + "}", src, count=1,
                 flags=re.S | re.M)
    a.module.write_text(src)
    print(f"[write_tuned] {a.module}: {len(table)} entries")


if __name__ == "__main__":
    main()
