"""Benchmark unwrapping opaque custom ops: eager vs stock torch.compile vs torch.compile + fxfuse.

The model is a decoder block written only with opaque ops that have vLLM's `_C` / `_moe_C`
schemas (out-variant RMSNorm, fused-add RMSNorm, fp8 quant, RoPE, silu_and_mul, topk_softmax)
between plain bf16 matmuls. The ops are defined here in a bench namespace; their kernels are the
shipped decompositions run eagerly (vectorized torch ops, CUDA-graph capturable), so "eager" and
"stock compile" execute the ops as opaque calls and only fxfuse sees through them.

Two parts are timed, each three ways, at M in {1, 128, 4096}, H=4096, bf16:
  * block:          the whole decoder block;
  * rmsnorm_quant:  only `rms_norm` op -> `dynamic_per_token_scaled_fp8_quant` op (the issue's
                    target: fxfuse >= 3x faster than stock compile at M=4096).
Times are medians of `triton.testing.do_bench_cudagraph` (us); the device copy bandwidth is
measured in the same run. Inputs are fresh random tensors (never zeros). Every compiled variant
records how many ops fxfuse unwrapped and fused, and its error vs eager.

Usage:  python benchmarks/bench_unwrap.py --out benchmarks/results/unwrap.json [--md FILE]
        python benchmarks/bench_unwrap.py --dry-run     # CPU, tiny shapes, perf_counter timing
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import fxfuse  # noqa: E402
from fxfuse.patterns import unwrap_builtin as B  # noqa: E402

NS = "fxfuse_bench"
FP8 = torch.float8_e4m3fn
EPS = 1e-6

# ----------------------------------------------------------------------------- opaque ops

_lib = torch.library.Library(NS, "DEF")
_SCHEMAS = {
    "rms_norm": ("rms_norm(Tensor! result, Tensor input, Tensor weight, float epsilon) -> ()", B.rms_norm),
    "fused_add_rms_norm": (
        "fused_add_rms_norm(Tensor! input, Tensor! residual, Tensor weight, float epsilon) -> ()",
        B.fused_add_rms_norm,
    ),
    "static_scaled_fp8_quant": (
        "static_scaled_fp8_quant(Tensor! result, Tensor input, Tensor scale) -> ()",
        B.static_scaled_fp8_quant,
    ),
    "dynamic_scaled_fp8_quant": (
        "dynamic_scaled_fp8_quant(Tensor! result, Tensor input, Tensor! scale) -> ()",
        B.dynamic_scaled_fp8_quant,
    ),
    "dynamic_per_token_scaled_fp8_quant": (
        "dynamic_per_token_scaled_fp8_quant(Tensor! result, Tensor input, Tensor! scale, Tensor? scale_ub) -> ()",
        B.dynamic_per_token_scaled_fp8_quant,
    ),
    "rotary_embedding": (
        "rotary_embedding(Tensor positions, Tensor! query, Tensor!? key, int head_size, Tensor cos_sin_cache, "
        "bool is_neox) -> ()",
        B.rotary_embedding,
    ),
    "silu_and_mul": ("silu_and_mul(Tensor! result, Tensor input) -> ()", B.silu_and_mul),
    "topk_softmax": (
        "topk_softmax(Tensor! topk_weights, Tensor! topk_indices, Tensor! token_expert_indices, "
        "Tensor gating_output, bool renormalize) -> ()",
        B.topk_softmax,
    ),
}
for _name, (_schema, _impl) in _SCHEMAS.items():
    _lib.define(_schema)
    _lib.impl(_name, _impl, "CompositeExplicitAutograd")  # opaque to compile: CPU and CUDA
    torch.library.register_fake(f"{NS}::{_name}", lambda *a, **k: None, lib=_lib)
ops = getattr(torch.ops, NS)
B.register_builtins({"_C": NS, "_moe_C": NS})  # same code path as vLLM's real ops


# ----------------------------------------------------------------------------- models


class Dims:
    def __init__(self, H: int, head: int, inter: int, experts: int, topk: int, max_pos: int) -> None:
        self.H, self.head, self.inter, self.E, self.K, self.max_pos = H, head, inter, experts, topk, max_pos


def norm_quant(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The RMSNorm+quant part: out-variant rms_norm op -> per-token fp8 quant op."""
    h = torch.empty_like(x)
    ops.rms_norm(h, x, w, EPS)
    q = torch.empty(x.shape, dtype=FP8, device=x.device)
    s = torch.empty(x.shape[0], 1, dtype=torch.float32, device=x.device)
    ops.dynamic_per_token_scaled_fp8_quant(q, h, s, None)
    return q, s


def make_block(d: Dims) -> Callable[..., Any]:
    def block(x, residual, positions, ln1, ln2, w_qkv, w_o, w_gu, w_down, w_router, cos_sin, sq):
        M, H, dt = x.shape[0], d.H, x.dtype
        q8, s8 = norm_quant(x, ln1)
        qkv = (q8.to(dt) * s8.to(dt)) @ w_qkv
        q, k, v = qkv.split(H, -1)  # like vLLM: RoPE writes q and k, two slices of one qkv buffer
        ops.rotary_embedding(positions, q, k, d.head, cos_sin, True)
        attn = (q * k).sigmoid() * v  # stand-in for attention: the block is about the opaque ops
        o = attn @ w_o
        ops.fused_add_rms_norm(o, residual, ln2, EPS)
        oq = torch.empty(o.shape, dtype=FP8, device=x.device)
        ops.static_scaled_fp8_quant(oq, o, sq)
        xo = oq.to(dt) * sq.to(dt)
        tw = torch.empty(M, d.K, dtype=torch.float32, device=x.device)
        ti = torch.empty(M, d.K, dtype=torch.int32, device=x.device)
        tei = torch.empty(M, d.K, dtype=torch.int32, device=x.device)
        ops.topk_softmax(tw, ti, tei, xo @ w_router, True)
        act = torch.empty(M, d.inter, dtype=dt, device=x.device)
        ops.silu_and_mul(act, xo @ w_gu)
        aq = torch.empty(act.shape, dtype=FP8, device=x.device)
        a_s = torch.empty(1, dtype=torch.float32, device=x.device)
        ops.dynamic_scaled_fp8_quant(aq, act, a_s)
        down = (aq.to(dt) * a_s.to(dt)) @ w_down
        return down * tw.sum(-1, keepdim=True).to(dt), ti

    return block


def block_inputs(d: Dims, M: int, dev: str) -> list[torch.Tensor]:
    """Fresh random inputs (never zeros); weights scaled so activations stay O(1)."""
    bf = torch.bfloat16

    def r(*s: int, scale: float = 1.0, dt: torch.dtype = bf) -> torch.Tensor:
        return (torch.randn(*s, device=dev) * scale).to(dt)

    H = d.H
    return [
        r(M, H),
        r(M, H),
        torch.randint(0, d.max_pos, (M,), device=dev),
        (1 + 0.1 * torch.randn(H, device=dev)).to(bf),
        (1 + 0.1 * torch.randn(H, device=dev)).to(bf),
        r(H, 3 * H, scale=H**-0.5),
        r(H, H, scale=H**-0.5),
        r(H, 2 * d.inter, scale=H**-0.5),
        r(d.inter, H, scale=d.inter**-0.5),
        r(H, d.E, scale=H**-0.5),
        r(d.max_pos, d.head, dt=bf),
        torch.tensor([0.02], device=dev),
    ]


def nq_inputs(d: Dims, M: int, dev: str) -> list[torch.Tensor]:
    return [torch.randn(M, d.H, device=dev, dtype=torch.bfloat16), (1 + 0.1 * torch.randn(d.H, device=dev)).to(torch.bfloat16)]


# ----------------------------------------------------------------------------- timing


def bench_us(fn: Callable[[], Any], rep: int, dry: bool) -> float:
    """Median us per call: CUDA graph replay on GPU, perf_counter loop in --dry-run."""
    fn()
    if dry:
        ts = []
        for _ in range(max(3, rep)):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e6
    import triton.testing

    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")) * 1e3


def copy_bandwidth_gbps(rep: int, dry: bool) -> float:
    """Device copy bandwidth (bytes read + written), the roofline for these memory-bound parts."""
    n = (1 << 16) if dry else (1 << 30) // 2
    dev = "cpu" if dry else "cuda"
    a = torch.randn(n, device=dev, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    us = bench_us(lambda: b.copy_(a), rep, dry)
    return 2 * n * 2 / (us * 1e-6) / 1e9


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _dequant(out: Any) -> torch.Tensor:
    """fp32 view of the first output (dequantized when it is (q, scale))."""
    if isinstance(out, (tuple, list)) and out[0].dtype == FP8:
        return out[0].float() * out[1].float()
    return _first(out).float()


def rel_err(a: Any, b: Any) -> float:
    x, y = _dequant(a), _dequant(b)
    return float((x - y).norm() / y.norm().clamp_min(1e-30))


def measure(part: str, fn: Callable[..., Any], make: Callable[[int], list[torch.Tensor]], M: int, rep: int, dry: bool) -> dict[str, Any]:
    """eager / stock compile / compile+fxfuse for one (part, M)."""
    row: dict[str, Any] = {"part": part, "M": M, "us": {}, "errors": {}}
    args = make(M)
    # mutated inputs (the residual) change on every call: give each variant its own copy
    fresh = lambda: [a.clone() for a in args]  # noqa: E731
    eargs = fresh()
    with torch.no_grad():
        ref = fn(*fresh())
    try:
        row["us"]["eager"] = bench_us(lambda: fn(*eargs), rep, dry)
    except Exception as e:  # noqa: BLE001
        row["errors"]["eager"] = f"{type(e).__name__}: {e}"
    for variant in ("compile", "fxfuse"):
        try:
            torch._dynamo.reset()
            fxfuse.counters.clear()
            opts = {"post_grad_custom_pre_pass": fxfuse.FusionPasses()} if variant == "fxfuse" else {}
            cfn = torch.compile(fn, fullgraph=True, dynamic=False, options=opts)
            vargs = fresh()
            with torch.no_grad():
                out = cfn(*fresh())
                row.setdefault("rel_err_vs_eager", {})[variant] = rel_err(out, ref)
                if variant == "fxfuse":
                    row["unwrapped"] = fxfuse.counters["unwrap"]
                    row["fused_rmsnorm_quant"] = fxfuse.counters["rmsnorm_quant"]
                row["us"][variant] = bench_us(lambda: cfn(*vargs), rep, dry)
        except Exception as e:  # noqa: BLE001 - record and keep going
            row["errors"][variant] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    c, f = row["us"].get("compile"), row["us"].get("fxfuse")
    row["speedup_fxfuse_vs_compile"] = c / f if c and f else None
    e = row["us"].get("eager")
    row["speedup_fxfuse_vs_eager"] = e / f if e and f else None
    print(
        f"[bench_unwrap] {part:14s} M={M:5d} eager {e or float('nan'):9.1f} us  compile {c or float('nan'):9.1f} us  "
        f"fxfuse {f or float('nan'):9.1f} us  x{row['speedup_fxfuse_vs_compile'] or float('nan'):.2f} vs compile  "
        f"unwrapped={row.get('unwrapped')} fused={row.get('fused_rmsnorm_quant')}",
        flush=True,
    )
    return row


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"### Unwrapping opaque ops ({result['device']}, torch {result['torch']}, {result['date']})",
        "",
        f"Copy bandwidth: {result['copy_gbps']:.0f} GB/s. Median us, CUDA graphs, H={result['H']}, bf16.",
        "",
        "| part | M | eager | stock compile | compile + fxfuse | fxfuse vs compile | unwrapped | fused |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        us = r["us"]
        fmt = lambda v: f"{v:.1f}" if v else "-"  # noqa: E731
        sp = r.get("speedup_fxfuse_vs_compile")
        lines.append(
            f"| {r['part']} | {r['M']} | {fmt(us.get('eager'))} | {fmt(us.get('compile'))} | {fmt(us.get('fxfuse'))} | "
            f"{f'{sp:.2f}x' if sp else '-'} | {r.get('unwrapped', '-')} | {r.get('fused_rmsnorm_quant', '-')} |"
        )
    t = result["target"]
    lines += ["", f"Target (rmsnorm_quant, M=4096, fxfuse >= 3x stock compile): {t['speedup']} -> {'met' if t['met'] else 'NOT met'}", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="write JSON results here")
    ap.add_argument("--md", type=Path, default=None, help="also write the markdown table here")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, perf_counter timing (syntax/plumbing check)")
    ap.add_argument("--rep", type=int, default=None, help="do_bench_cudagraph rep in ms (dry run: iterations)")
    ap.add_argument("--ms", default=None, help="comma list of token counts (default 1,128,4096)")
    ap.add_argument("--parts", default="rmsnorm_quant,block", help="comma list of: rmsnorm_quant, block")
    args = ap.parse_args()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        sys.exit("no CUDA device; use --dry-run to check the script on CPU")
    dev = "cpu" if dry else "cuda"
    rep = args.rep or (5 if dry else 200)
    d = Dims(H=256, head=64, inter=256, experts=8, topk=2, max_pos=64) if dry else Dims(
        H=4096, head=128, inter=4096, experts=8, topk=2, max_pos=4096
    )
    Ms = [int(m) for m in args.ms.split(",")] if args.ms else ([1, 8, 32] if dry else [1, 128, 4096])
    torch._inductor.config.fx_graph_cache = False  # the fxfuse pass must run to count unwraps/fusions
    torch.manual_seed(0)
    copy_gbps = copy_bandwidth_gbps(rep, dry)
    print(f"[bench_unwrap] copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    rows = []
    parts = args.parts.split(",")
    block = make_block(d)
    for M in Ms:
        if "rmsnorm_quant" in parts:
            rows.append(measure("rmsnorm_quant", norm_quant, lambda m: nq_inputs(d, m, dev), M, rep, dry))
        if "block" in parts:
            rows.append(measure("block", block, lambda m: block_inputs(d, m, dev), M, rep, dry))
    big = [r for r in rows if r["part"] == "rmsnorm_quant" and r["M"] == max(Ms)]
    sp = big[0]["speedup_fxfuse_vs_compile"] if big else None
    result = {
        "benchmark": "unwrap",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": "cpu (dry run)" if dry else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": getattr(__import__("triton"), "__version__", None) if not dry else None,
        "dry_run": dry,
        "H": d.H,
        "dtype": "bfloat16",
        "timing": "perf_counter median" if dry else f"triton.testing.do_bench_cudagraph median, rep={rep} ms",
        "copy_gbps": copy_gbps,
        "rows": rows,
        "target": {"part": "rmsnorm_quant", "M": max(Ms), "speedup": sp, "met": bool(sp and sp >= 3.0)},
    }
    md = markdown(result)
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str))
    if args.md:
        args.md.write_text(md)


if __name__ == "__main__":
    main()
