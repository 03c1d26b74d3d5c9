"""Where the fused Qwen3-30B-A3B block's time goes at one token, next to stock compile: each
kernel of one block call (torch.profiler, no CUDA graph) with its mean device time, plus the
block's CUDA-graph time. Diagnostic for issue 10's 2.5x-at-M=1 target (the raw experts op is
~23 us, the fused block ~31.5 us: which launches make up the difference)."""
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
import fxfuse  # noqa: E402
from bench_moe_experts import MODELS, bench_us, make_block  # noqa: E402


def kernels(fn, iters: int = 20) -> list[tuple[str, float]]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / iters) for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    torch._inductor.config.fx_graph_cache = False
    block = make_block("qwen3_30b_a3b", "grouped_mm", MODELS["qwen3_30b_a3b"], "cuda", torch.bfloat16)
    res = {}
    for M in (1, 8):
        x = torch.randn(1, M, MODELS["qwen3_30b_a3b"]["H"], device="cuda", dtype=torch.bfloat16)
        for name, opts in (("compile", {}), ("fused", {"post_grad_custom_pre_pass": fxfuse.FusionPasses(options={"gate": False})})):
            fn = torch.compile(block, dynamic=False, options=opts)
            with torch.no_grad():
                ks = kernels(lambda: fn(x))
                us = bench_us(lambda: fn(x), 100)
            res[f"{name}/M{M}"] = dict(graph_us=us, kernels=ks)
            print(f"== {name} M={M}: CUDA graph {us:.1f} us; kernel sum {sum(k[1] for k in ks):.1f} us", flush=True)
            for k, t in ks:
                print(f"   {t:7.2f}  {k[:110]}")
    if out:
        out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
