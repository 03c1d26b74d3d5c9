"""Plot an e2e.py result: speedup over stock torch.compile against tokens per step, one panel per model.

A separate step (matplotlib is not needed on the GPU machine): run it wherever the JSON lands.

    pip install -e ".[bench]"
    python benchmarks/plot_e2e.py benchmarks/results/e2e.json benchmarks/results/e2e.png
    python benchmarks/plot_e2e.py e2e_dense_fp8.json e2e_moe.json e2e.png   # runs split per model

Several runs of one model merge into one curve, the newest run's row for each (kind, M).
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

LABELS = {
    "fxfuse": "torch.compile + fxfuse",
    "compile_max_autotune": "stock, max-autotune-no-cudagraphs",
    "eager": "eager",
}


def series(model: dict[str, Any]) -> dict[str, list[tuple[int, float, str]]]:
    """variant -> [(tokens, speedup vs stock compile, kind)] sorted by tokens."""
    out: dict[str, list[tuple[int, float, str]]] = {}
    for r in model.get("rows", []):
        for v, sp in (r.get("speedup_vs_compile") or {}).items():
            if v not in LABELS or not sp:  # leave-one-out variants (fxfuse_no_<family>) stay in the tables
                continue
            out.setdefault(v, []).append((int(r["M"]), float(sp), r["kind"]))
    return {v: sorted(pts) for v, pts in out.items()}


def plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in result.get("models", []) if m.get("rows")]
    if not models:
        raise SystemExit("no timed rows in the result")
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, m in zip(axes[0], models):
        for v, pts in series(m).items():
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            style = "-o" if v == "fxfuse" else "--."
            ax.plot(xs, ys, style, label=LABELS.get(v, v), linewidth=2 if v == "fxfuse" else 1)
            for x, y, kind in pts:
                if v == "fxfuse":
                    ax.annotate(f"{y:.2f}x", (x, y), textcoords="offset points", xytext=(0, 6), ha="center",
                                fontsize=8)
        ax.margins(y=0.15)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per step (decode: M x 1; last point: prefill)")
        ax.set_ylabel("speedup vs stock torch.compile (CUDA graphs)")
        ax.set_title("\n".join(textwrap.wrap(m.get("title", m["model"]), 60)), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    gpu = result.get("gpu") or result.get("device")
    fig.suptitle(f"fxfuse end to end: {gpu}, torch {result.get('torch')}, {result.get('date', '')}", fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def _us(v: Any) -> str:
    return f"{v:.1f}" if v else "n/a"


def round_range(row: dict[str, Any]) -> str:
    """" (a-b over N rounds)": the lowest and highest per-round fxfuse-vs-stock ratio, round i of one
    against round i of the other (timed back to back), when the row kept its rounds; else ""."""
    rounds = row.get("us_rounds") or {}
    st, fx = rounds.get("compile") or [], rounds.get("fxfuse") or []
    ratios = [a / b for a, b in zip(st, fx) if a and b]
    if len(ratios) < 2:
        return ""
    return f" ({min(ratios):.3f}-{max(ratios):.3f} over {len(ratios)} rounds)"


def markdown(result: dict[str, Any], png: str | None = None, command: str | None = None) -> list[str]:
    """BENCHMARKS.md section for an e2e result: one table per model, targets, compile overhead."""
    out = ["## End to end (whole transformers models)", ""]
    out.append(f"- GPU: {result.get('gpu')}; torch {result.get('torch')}, Triton {result.get('triton')}, "
               f"transformers {result.get('transformers')}; date {result.get('date')}; "
               f"fxfuse {'ungated' if result.get('ungated') else 'gated (fxfuse/gates.json)'}")
    out.append(command or ("- Command (device call): `bash benchmarks/gpu_run.sh e2e`, which runs `python benchmarks/e2e.py "
                           "--models MODEL --out $OUT/e2e_MODEL.json`; plot: `python benchmarks/plot_e2e.py ... e2e.png`"))
    out.append(f"- Method: {result.get('method')}")
    if png:
        out += ["", f"![speedup vs tokens]({png})"]
    for m in result.get("models", []):
        if not m.get("rows"):
            out += ["", f"{m.get('model')}: no rows ({m.get('error', 'not run')})"]
            continue
        out += ["", f"### {m.get('title', m['model'])}", ""]
        variants = [v for v in ("eager", "compile", "compile_max_autotune", "fxfuse")
                    if any(v in r["us"] for r in m["rows"])]
        out.append("| step | M | " + " | ".join(f"{v} us" for v in variants)
                   + " | fxfuse vs stock | fxfuse tokens/s | time in fxfuse kernels |")
        out.append("|---|---:|" + "---:|" * (len(variants) + 3))
        for r in m["rows"]:
            sp = (r.get("speedup_vs_compile") or {}).get("fxfuse")
            tps = (r.get("tokens_per_s") or {}).get("fxfuse")
            share = (r.get("profile") or {}).get("fxfuse_share")
            spread = round_range(r)
            out.append(f"| {r['kind']} | {r['M']} | " + " | ".join(_us(r["us"].get(v)) for v in variants)
                       + f" | {f'{sp:.3f}x' if sp else 'n/a'}{spread} | {f'{tps:,.0f}' if tps else 'n/a'}"
                       + f" | {f'{100 * share:.1f}%' if share is not None else 'n/a'} |")
        cold = [r for r in m["rows"] if r.get("compile_overhead") is not None]
        for r in cold:
            c = r.get("compile_s") or {}
            out.append("")
            out.append(f"Cold compile ({r['kind']} M={r['M']}): stock {c.get('compile', 0):.1f} s, with fxfuse "
                       f"{c.get('fxfuse', 0):.1f} s ({100 * r['compile_overhead']:+.1f}%); fxfuse stages "
                       f"{r.get('fxfuse_pass_s', 0):.2f} s ({100 * (r.get('fxfuse_pass_share_of_compile') or 0):.1f}% "
                       "of the stock compile; target <= 10%).")
        out.append("")
        if "counters" in m:
            out.append(f"Fusions: {m.get('counters') or 'none'}; near misses: {len(m.get('near_misses') or [])}.")
        else:  # the counters are written when a model's steps finish
            out.append("Fusions: not recorded (the run was cut short by its time limit after the rows above).")
    return out


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several runs (e.g. one per model): the first run's metadata, all models."""
    out = dict(results[0])
    out["models"] = [m for r in results for m in r.get("models", [])]
    return out


def latest(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result with one panel per model (and title): for each (kind, M) the row of the newest run
    (by its date), so several partial runs (decode in one call, prefill in another) plot as one curve."""
    out = dict(max(results, key=lambda r: str(r.get("date", ""))))
    models: dict[str, dict[str, Any]] = {}
    for r in sorted(results, key=lambda r: str(r.get("date", ""))):
        for m in r.get("models", []):
            cur = models.setdefault(f"{m['model']}/{m.get('title')}", {**m, "rows": []})  # torchao vs own fp8
            keep = {(x["kind"], x["M"]): x for x in cur["rows"]}
            keep.update({(x["kind"], x["M"]): x for x in m.get("rows", [])})
            cur["rows"] = sorted(keep.values(), key=lambda x: (x["kind"] == "prefill", x["M"]))
    out["models"] = list(models.values())
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        raise SystemExit("usage: plot_e2e.py RESULTS.json [MORE.json ...] OUT.png")
    plot(latest([json.loads(Path(a).read_text()) for a in argv[:-1]]), Path(argv[-1]))


if __name__ == "__main__":
    main()
