"""Regenerate BENCHMARKS.md from the committed JSON in benchmarks/results/.

    python benchmarks/make_benchmarks_md.py > BENCHMARKS.md
"""

from __future__ import annotations

import json
import math
import pathlib

RES = pathlib.Path(__file__).parent / "results"


def geo(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def main() -> None:
    r = json.loads((RES / "rmsnorm_quant_h100.json").read_text())
    u = json.loads((RES / "unwrap_h100.json").read_text())
    s = r["summary"]
    out = ["# Benchmarks", ""]
    out.append(
        "All figures: median of CUDA-graph replays (`triton.testing.do_bench_cudagraph`), fresh `torch.randn` "
        "inputs (never zeros), bf16 activations. GB/s counts the minimum HBM bytes (each input read once, each "
        "output written once); copy bandwidth is a 1 GiB device-to-device clone in the same run (read + write). "
        "Regenerate this file with `python benchmarks/make_benchmarks_md.py > BENCHMARKS.md`."
    )
    out += ["", "## RMSNorm(+residual) + fp8 quant", ""]
    out.append(f"- GPU: {r['gpu']}; torch {r['torch']}, Triton {r['triton']}; date {r['date']}")
    out.append(
        "- Command (device call): `bash benchmarks/gpu_run.sh tests bench unwrap`, which runs "
        "`python benchmarks/bench_rmsnorm_quant.py --out $OUT/rmsnorm_quant.json`; JSON: "
        "`benchmarks/results/rmsnorm_quant_h100.json`"
    )
    out.append(
        f"- Copy bandwidth in the same run: {r['copy_gbps']:.0f} GB/s. Caveat: the fused kernel itself reaches "
        "2.6-3.0 TB/s at M=16384, above this clone figure, so this copy measurement understates the ceiling (the brief "
        "quotes 3.0 TB/s for this H100). Against 3.0 TB/s the fused kernel is at 88-100% at M=16384."
    )
    out += ["", "| target | measured | met |", "|---|---|---|"]
    f = s["min_frac_copy_M>=4096_fused"]
    out.append(f"| fused >= 90% of copy bandwidth at M >= 4096 | min {f * 100:.0f}% | {'yes' if f >= 0.9 else 'no'} |")
    m1 = s["max_us_M=1_fused"]
    out.append(f"| fused <= 4 us at M = 1 | max {m1:.1f} us | {'yes' if m1 <= 4 else 'no'} |")
    g = s["geomean_speedup_fused_vs_compile"]
    out.append(f"| geomean >= 1.5x stock torch.compile | {g:.2f}x | {'yes' if g >= 1.5 else 'no'} |")
    ef = max(c["err"].get("fused") or 0 for c in r["cases"])
    ec = max(c["err"].get("compile") or 0 for c in r["cases"])
    out += [
        "",
        f"Numerics: max dequantized relative error vs eager: fused {ef:.1e}, stock compile {ec:.1e} (stock Inductor "
        "keeps fp32 where the HF form rounds to bf16; the fused kernel keeps the round trip).",
        "",
        "Speedup of `torch.compile` + fxfuse over stock `torch.compile` on the same visible ops:",
        "",
    ]
    Ms = sorted({c["M"] for c in r["cases"]})
    out.append("| scheme | H | " + " | ".join(f"M={m}" for m in Ms) + " | fused GB/s @M=16384 | geomean |")
    out.append("|---|---:|" + "---:|" * (len(Ms) + 2))
    by: dict[tuple[str, int], dict[int, dict]] = {}
    for c in r["cases"]:
        by.setdefault((c["scheme"], c["H"]), {})[c["M"]] = c
    for (sc, H), d in by.items():
        sp = [d[m]["speedup_vs_compile"]["fused"] for m in Ms]
        out.append(
            f"| {sc} | {H} | " + " | ".join(f"{x:.2f}" for x in sp) + f" | {d[Ms[-1]]['gbps']['fused']:.0f} | {geo(sp):.2f} |"
        )
    out += [
        "",
        "Stock torch.compile (torch 2.11) already turns this HF-written form into one persistent-reduction kernel "
        "near bandwidth, so per-token and static gains are small at large M; per-group 128 gains 1.4-1.8x. Every "
        "(scheme, H) class measured >= 1.0x geomean, so `fxfuse/gates.json` (from `benchmarks/write_gates.py`) "
        "ships all of them. Single points below 1.0 exist (static fp8 at M=1, H=2048: 0.89x); the gate is per "
        "shape class because M is dynamic.",
        "",
        "One kernel change, predicted then measured (same device, `--quick`, "
        "`benchmarks/results/rmsnorm_quant_h100_quick_before_native_casts.json`): the first kernel rounded to "
        "bf16/fp8 with bit tricks (the Triton interpreter's casts are wrong) and used an IEEE division per "
        "element; the raw op ran 0.42-1.38x stock (static 16384x7168: 275 us, 1.3 TB/s). Prediction: hardware casts "
        "when compiled and a fast per-element division make it memory-bound, about 2x faster there. Outcome: "
        "121.5 us (2.3x), >= 95% of copy bandwidth at M >= 4096 for every case.",
        "",
        "## Unwrapping opaque custom ops",
        "",
        f"- GPU: {u['device']}; torch {u['torch']}, Triton {u['triton']}; date {u['date']}",
        "- Command (device call): `bash benchmarks/gpu_run.sh tests unwrap`, which runs "
        "`python benchmarks/bench_unwrap.py --out $OUT/unwrap.json`; JSON: `benchmarks/results/unwrap_h100.json`",
        f"- Copy bandwidth in the same run: {u['copy_gbps']:.0f} GB/s; H={u['H']}, {u['dtype']}",
        "",
        "| part | M | eager us | stock compile us | compile + fxfuse us | vs stock | unwrapped | fused |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in u["rows"]:
        us = row["us"]
        out.append(
            f"| {row['part']} | {row['M']} | {us['eager']:.1f} | {us['compile']:.1f} | {us['fxfuse']:.1f} | "
            f"{row['speedup_fxfuse_vs_compile']:.2f}x | {row['unwrapped']} | {row['fused_rmsnorm_quant']} |"
        )
    t = u["target"]
    out += [
        "",
        f"Target (fxfuse >= 3x stock compile on the RMSNorm+quant part at M=4096): {t['speedup']:.1f}x, "
        f"{'met' if t['met'] else 'not met'}. The 'block' is the whole opaque decoder block (RMSNorm, fused-add "
        "RMSNorm, fp8 quants, RoPE, silu_and_mul, topk_softmax). The opaque ops' eager implementations are the "
        "shipped ATen decompositions run op by op, so 'eager' and 'stock compile' call several small torch "
        "kernels per op.",
    ]
    e2e_runs = sorted(RES.glob("e2e*.json"))
    if e2e_runs:  # whole-model results (benchmarks/e2e.py), plot from benchmarks/plot_e2e.py
        import plot_e2e

        png = "benchmarks/results/e2e.png" if (RES / "e2e.png").exists() else None
        out += [""] + plot_e2e.markdown(plot_e2e.merge([json.loads(p.read_text()) for p in e2e_runs]), png)
    print("\n".join(out))


if __name__ == "__main__":
    main()
