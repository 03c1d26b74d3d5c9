"""Benchmark the fused MoE experts path against stock torch.compile of transformers' MoE blocks.

Per (model, experts implementation, M): the transformers SparseMoeBlock (routing included) under
stock torch.compile and under torch.compile with fxfuse (ungated), median us under CUDA graphs
(do_bench_cudagraph), with --fold at decode also with the routing folded into the experts' first
kernel (`fused_fold`: opt-in option moe_fold_routing=True; `fused` keeps the router's own launch); the raw op alone
(routing precomputed); and the weight-streaming floor =
bytes of the distinct selected experts' weights / measured copy bandwidth (1 GiB clone).

Models: Qwen3-30B-A3B layer (128 experts, top-8, hidden 2048, inter 768) and Mixtral-8x7B
(8 experts, top-2, hidden 4096, inter 14336), bf16.  The JSON has per-(scheme, hidden) geomean
speedups of fused vs stock compile for gating, scheme = "<impl>/<path>" (path = decode|prefill,
the path the op takes at that M; `hidden` = the model's hidden size).

Usage:  python benchmarks/bench_moe_experts.py --out X.json [--quick] [--dry-run]
        [--models qwen3_30b_a3b,mixtral_8x7b] [--impls grouped_mm,batched_mm] [--ms 1,4,16]
        [--rep MS] [--sweep]
--dry-run builds everything at tiny sizes on CPU (no timing) so a GPU call cannot die on a typo.
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

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fxfuse.kernels import moe_experts as K  # noqa: E402

MODELS: dict[str, dict[str, int]] = {
    "qwen3_30b_a3b": dict(E=128, K=8, H=2048, I=768),
    "mixtral_8x7b": dict(E=8, K=2, H=4096, I=14336),
}
TINY = dict(E=8, K=2, H=64, I=32)
MS = [1, 4, 16, 64, 256, 2048]
QUICK_MS = [1, 64, 2048]
GATHER_LIMIT_BYTES = 24 << 30  # batched_mm materializes W[ids]: skip where that alone exceeds this


def make_block(model: str, impl: str, shape: dict[str, int], device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The transformers block with random weights (std 0.02, never zero) and the given experts impl."""
    from transformers import MixtralConfig, Qwen3MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    if model.startswith("qwen"):
        cfg = Qwen3MoeConfig(hidden_size=shape["H"], moe_intermediate_size=shape["I"], num_experts=shape["E"],
                             num_experts_per_tok=shape["K"], norm_topk_prob=True)
        cls = Qwen3MoeSparseMoeBlock
    else:
        cfg = MixtralConfig(hidden_size=shape["H"], intermediate_size=shape["I"], num_local_experts=shape["E"],
                            num_experts_per_tok=shape["K"])
        cls = MixtralSparseMoeBlock
    cfg._experts_implementation = impl
    with torch.device("meta"):
        block = cls(cfg)
    block = block.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02, generator=g)
    return block.eval()


def share_weights(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """Point dst's parameters at src's (two impls of one model without a second copy of the weights)."""
    for name, p in src.named_parameters():
        mod_name, _, attr = name.rpartition(".")
        setattr(dst.get_submodule(mod_name) if mod_name else dst, attr, p)


def route(block: torch.nn.Module, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _, w, ids = block.gate(x2d)
    return w, ids


def op_args(block: torch.nn.Module, x2d: torch.Tensor) -> tuple:
    w, ids = route(block, x2d)
    ex = block.experts
    return (x2d, w, ids, ex.gate_up_proj.permute(0, 2, 1), ex.down_proj.permute(0, 2, 1),
            torch.promote_types(x2d.dtype, w.dtype), torch.promote_types(x2d.dtype, w.dtype), x2d.dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def bench_us(fn: Callable[[], Any], rep: int) -> float:
    """Median us per call under a CUDA graph (no launch overhead between kernels' launches)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")) * 1e3


def copy_bandwidth_gbps(rep: int) -> float:
    n = (1 << 30) // 2
    a = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    us = bench_us(lambda: b.copy_(a), rep)
    del a, b
    return 2 * n * 2 / (us * 1e-6) / 1e9


def _kernel_in_code(fn: Callable, args: tuple) -> tuple[Any, Optional[bool]]:
    from unittest import mock

    from torch._inductor.graph import GraphLowering

    codes: list[str] = []
    with mock.patch.object(GraphLowering, "save_output_code", codes.append):
        out = fn(*args)
    if not codes:
        return out, None
    code = "\n".join(codes)
    names = ("_moe_decode_gate_up_kernel", "_moe_decode_gate_up_dot_kernel", "_moe_decode_routed_gate_up_kernel",
             "_moe_decode_routed_gate_up_dot_kernel", "_moe_gemm1_kernel")
    return out, any(n in code for n in names) and "torch.ops.fxfuse" not in code


def path_name(M: int, shape: dict[str, int]) -> str:
    return "decode" if K.choose_path(M, shape["K"], shape["E"]) == K.PATH_DECODE else "prefill"


def run(models: list[str], impls: list[str], Ms: list[int], rep: int, dry: bool,
        partial: Callable[[dict[str, Any]], None] = lambda r: None, fold: bool = False) -> dict[str, Any]:
    import fxfuse

    device = "cpu" if dry else "cuda"
    dtype = torch.bfloat16
    fx_pass = fxfuse.FusionPasses(options={"gate": False})
    # decode rows also time the block with the routing folded into kernel A (the opt-in fold's effect)
    fx_pass_fold = fxfuse.FusionPasses(options={"gate": False, "moe_fold_routing": True})
    torch._inductor.config.fx_graph_cache = False
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 256)
    copy_gbps = None if dry else copy_bandwidth_gbps(rep)
    rows: list[dict[str, Any]] = []
    for model in models:
        shape = TINY if dry else MODELS[model]
        blocks: dict[str, torch.nn.Module] = {}
        for impl in impls:
            blocks[impl] = make_block(model, impl, shape, device, dtype)
            if impl != impls[0]:
                share_weights(blocks[impl], blocks[impls[0]])
        ref_block = blocks[impls[0]]
        for M in Ms:
            torch._dynamo.reset()
            g = torch.Generator(device=device).manual_seed(M)
            x = torch.randn(1, M, shape["H"], device=device, dtype=dtype, generator=g)
            with torch.no_grad():
                args = op_args(ref_block, x.view(M, shape["H"]))
                ids = args[2]
                n_sel = int(torch.unique(ids).numel())
                floor_bytes = K.selected_weight_bytes(ids, shape["E"], shape["H"], shape["I"])
                row: dict[str, Any] = dict(model=model, M=M, H=shape["H"], E=shape["E"], K=shape["K"], I=shape["I"],
                                           path=path_name(M, shape), experts_hit=n_sel, floor_bytes=floor_bytes,
                                           floor_us=(floor_bytes / (copy_gbps * 1e9) * 1e6) if copy_gbps else None,
                                           us={}, err={}, notes=[], kernel_in_code={})
                ref = ref_block(x)
                t0 = time.time()
                # the raw op (routing precomputed): the kernels alone
                try:
                    out = torch.ops.fxfuse.moe_experts(*args)
                    want = ref_block.experts(args[0], ids, args[1])
                    row["err"]["op"] = rel_err(out, want)
                    row["us"]["op"] = None if dry else bench_us(lambda: torch.ops.fxfuse.moe_experts(*args), rep)
                except Exception as e:  # noqa: BLE001
                    row["notes"].append(f"op: {type(e).__name__}: {str(e)[:300]}")
                    traceback.print_exc(limit=4)
                for impl in impls:
                    block = blocks[impl]
                    gathered = M * shape["K"] * 3 * shape["H"] * shape["I"] * 2
                    if impl == "batched_mm" and gathered > GATHER_LIMIT_BYTES:
                        row["notes"].append(f"{impl}: skipped, W[ids] alone is {gathered / 2**30:.0f} GiB")
                        continue
                    variants = ("compile", "fused") + (("fused_fold",) if fold and row["path"] == "decode" else ())
                    for variant in variants:
                        key = f"{impl}/{variant}"
                        try:
                            passes = {"fused": fx_pass, "fused_fold": fx_pass_fold}.get(variant)
                            opts = {"post_grad_custom_pre_pass": passes} if passes is not None else {}
                            fn = torch.compile(block, dynamic=False, options=opts)
                            fxfuse.counters.clear()
                            fxfuse.report.clear()
                            out, inl = _kernel_in_code(fn, (x,))
                            if variant == "fused":
                                row["kernel_in_code"][impl] = inl
                                row.setdefault("fused_count", {})[impl] = fxfuse.counters["moe_experts"]
                            if variant == "fused_fold":
                                row.setdefault("routing_folded", {})[impl] = any(
                                    f.name == "moe_experts" and "routing folded" in f.detail
                                    for f in fxfuse.report().fusions)
                            row["err"][key] = rel_err(out, ref)
                            row["us"][key] = None if dry else bench_us(lambda: fn(x), rep)
                        except Exception as e:  # noqa: BLE001
                            row["notes"].append(f"{key}: {type(e).__name__}: {str(e)[:300]}")
                            row["us"][key] = None
                            print(f"[bench] {model} M={M} {key}: {e}", flush=True)
                            traceback.print_exc(limit=4)
                        if device == "cuda":
                            torch.cuda.empty_cache()
                for impl in impls:
                    c, f = row["us"].get(f"{impl}/compile"), row["us"].get(f"{impl}/fused")
                    row.setdefault("speedup", {})[impl] = (c / f) if c and f else None
                    ff = row["us"].get(f"{impl}/fused_fold")
                    if ff and f:  # > 1: folding the routing into kernel A would pay off
                        row.setdefault("fold_speedup", {})[impl] = f / ff
                if row["floor_us"]:
                    row["x_floor"] = {k: (v / row["floor_us"] if v else None) for k, v in row["us"].items()}
                    row["gbps_op"] = (floor_bytes / (row["us"]["op"] * 1e-6) / 1e9) if row["us"].get("op") else None
                row["wall_s"] = round(time.time() - t0, 1)
            rows.append(row)
            partial(dict(cases=rows, copy_gbps=copy_gbps, gates=gates_from(rows)))
            print(json.dumps({k: row[k] for k in ("model", "M", "path", "us", "floor_us", "err", "notes")
                              if k in row}), flush=True)
        del blocks, ref_block
    return dict(cases=rows, copy_gbps=copy_gbps, gates=gates_from(rows))


DECODE_SWEEP = [
    {}, {"A_BN": 8}, {"A_BN": 32}, {"A_BK": 128}, {"A_BK": 512}, {"A_WARPS": 2}, {"A_WARPS": 8},
    {"B_BN": 2}, {"B_BN": 8}, {"B_BN": 16}, {"B_BK": 256}, {"B_BK": 512}, {"B_WARPS": 2}, {"B_WARPS": 8},
]
PREFILL_SWEEP = [
    {}, {"BM": 16}, {"BM": 32}, {"BM": 64}, {"BM": 128, "WARPS": 8}, {"BN1": 128}, {"BN2": 64}, {"BN2": 128},
    {"BK1": 32, "BK2": 32}, {"BK1": 128, "BK2": 128}, {"STAGES": 2}, {"STAGES": 4}, {"WARPS": 8},
]


def sweep(models: list[str], Ms: list[int], rep: int, dry: bool) -> list[dict[str, Any]]:
    """Block-size sweep of the raw launcher (routing precomputed) around the table's defaults."""
    device = "cpu" if dry else "cuda"
    out: list[dict[str, Any]] = []
    for model in models:
        shape = TINY if dry else MODELS[model]
        E, k, H, I = shape["E"], shape["K"], shape["H"], shape["I"]
        g = torch.Generator(device=device).manual_seed(1)
        w1 = (torch.randn(E, 2 * I, H, device=device, generator=g) * 0.02).bfloat16().permute(0, 2, 1)
        w2 = (torch.randn(E, H, I, device=device, generator=g) * 0.02).bfloat16().permute(0, 2, 1)
        for M in Ms:
            x = torch.randn(M, H, device=device, generator=g).bfloat16()
            ids = torch.rand(M, E, device=device, generator=g).topk(k, dim=-1).indices
            tw = torch.rand(M, k, device=device, generator=g).bfloat16()
            path = K.choose_path(M, k, E)
            bf = torch.bfloat16
            ref = K.moe_experts_reference(x, tw, ids, w1, w2, bf, bf, bf)
            cfgs = DECODE_SWEEP if path == K.PATH_DECODE else PREFILL_SWEEP
            for cfg in cfgs[: 3 if dry else None]:  # the interpreter is slow: a few show the sweep runs
                try:
                    fn = lambda: K.moe_experts_triton(x, tw, ids, w1, w2, path=path, config=cfg)  # noqa: E731
                    err = rel_err(fn(), ref)
                    us = None if dry else bench_us(fn, rep)
                    out.append(dict(model=model, M=M, path=path_name(M, shape), config=cfg, us=us, err=err))
                except Exception as e:  # noqa: BLE001
                    out.append(dict(model=model, M=M, config=cfg, error=f"{type(e).__name__}: {str(e)[:200]}"))
                print(json.dumps(out[-1]), flush=True)
        del w1, w2
    return out


def gates_from(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{scheme "<impl>/<class>": {hidden: geomean(stock compile us / fused us)}} over M in that class
    (K.gate_classes: decode, prefill, prefill-large)."""
    acc: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        for impl, s in (r.get("speedup") or {}).items():
            if s and (r.get("kernel_in_code") or {}).get(impl, True):
                (cls,) = K.gate_classes(r["M"], r["K"], r["E"])  # static M: one class
                acc.setdefault(f"{impl}/{cls}", {}).setdefault(str(r["H"]), []).append(s)
    return {sch: {h: round(math.exp(sum(map(math.log, v)) / len(v)), 3) for h, v in hs.items()}
            for sch, hs in acc.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help=f"M in {QUICK_MS}")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, no timing")
    ap.add_argument("--models", default="qwen3_30b_a3b,mixtral_8x7b")
    ap.add_argument("--impls", default="grouped_mm,batched_mm")
    ap.add_argument("--ms", default=None)
    ap.add_argument("--rep", type=int, default=100, help="ms per do_bench_cudagraph measurement")
    ap.add_argument("--sweep", action="store_true", help="also sweep the raw kernels' block sizes")
    ap.add_argument("--fold", action="store_true", help="decode rows also time the opt-in routing fold (fused_fold)")
    a = ap.parse_args()
    Ms = [int(m) for m in a.ms.split(",")] if a.ms else (QUICK_MS if a.quick else MS)
    if a.dry_run:
        Ms = [1, 33]
    meta = dict(
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        gpu=None if a.dry_run else torch.cuda.get_device_name(),
        torch=torch.__version__,
        command=" ".join(sys.argv),
        family="moe_experts",
    )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)

    def partial(r: dict[str, Any]) -> None:  # a timeout still leaves every finished row on disk
        Path(a.out).write_text(json.dumps({**r, **meta, "partial": True}, indent=1))

    res = run(a.models.split(","), a.impls.split(","), Ms, a.rep, a.dry_run, partial, fold=a.fold)
    if a.sweep:
        res["sweep"] = sweep(a.models.split(","), Ms, max(a.rep // 4, 10), a.dry_run)
    res.update(meta)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res["gates"], indent=1))


if __name__ == "__main__":
    main()
