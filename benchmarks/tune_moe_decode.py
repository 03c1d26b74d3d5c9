"""Sweep the MoE decode kernels' block sizes and forms (vector vs pipelined 16-row tl.dot).

The decode path streams only the selected experts' weights; its speed is set by how many weight
bytes each SM keeps in flight.  This sweep times the raw op (routing precomputed) under CUDA
graphs for each candidate config of kernel A (gate_up + SiLU-mul) with kernel B at its default,
then kernel B (down + combine) with the best A, and reports each against the weight-streaming
floor (selected experts' bytes / this run's measured copy bandwidth).  Every candidate's output is
compared with the default config's (relative error) so a fast but wrong config cannot win.

Usage:  python benchmarks/tune_moe_decode.py --out X.json [--quick | --prefill | --small | --focus] [--rep MS]
The best configs feed ``decode_config`` in fxfuse/kernels/moe_experts.py (no autotuning at compile).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_moe_experts import MODELS, bench_us, copy_bandwidth_gbps, rel_err  # noqa: E402

from fxfuse.kernels import moe_experts as K  # noqa: E402

SHAPES = [("qwen3_30b_a3b", 1), ("qwen3_30b_a3b", 4), ("mixtral_8x7b", 1), ("mixtral_8x7b", 2)]


def a_candidates(quick: bool) -> list[dict[str, int]]:
    vec = [dict(A_DOT=0, A_BN=bn, A_BK=bk, A_WARPS=w)
           for bn, bk, w in itertools.product((8, 16, 32), (256, 512, 1024), (4, 8))]
    dot = [dict(A_DOT=1, A_BN=bn, A_BK=bk, A_STAGES=st, A_WARPS=4)
           for bn, bk, st in itertools.product((16, 32, 64), (64, 128, 256), (3, 4, 6))]
    return (vec[::3] + dot[::2]) if quick else (vec + dot)


def b_candidates(quick: bool) -> list[dict[str, int]]:
    vec = [dict(B_DOT=0, B_BN=bn, B_BK=bk, B_WARPS=w)
           for bn, bk, w in itertools.product((2, 4, 8), (128, 256, 512), (4, 8))]
    dot = [dict(B_DOT=1, B_BN=bn, B_BK=bk, B_STAGES=st, B_WARPS=4)
           for bn, bk, st in itertools.product((16, 32, 64), (64, 128, 256), (3, 4, 6))]
    return (vec[::3] + dot[::2]) if quick else (vec + dot)


FOCUS_SHAPES = [("qwen3_30b_a3b", 1), ("qwen3_30b_a3b", 8)]  # --focus: decode steps of issue 10 (M=1) and issue 11 (M=8)


def focus_a_candidates() -> list[dict[str, int]]:
    """Kernel A's dot form around the quick sweep's best (BN 64, BK 128, 4 stages): at one token
    BN=64 is 96 programs on 132 SMs, so narrower N-blocks and deeper pipelines are the questions."""
    return [dict(A_DOT=1, A_BN=bn, A_BK=bk, A_STAGES=st, A_WARPS=w)
            for bn, bk, (st, w) in itertools.product((16, 32, 64, 128), (64, 128, 256),
                                                     ((3, 4), (4, 4), (5, 4), (6, 4), (4, 8)))]


def focus_b_candidates() -> list[dict[str, int]]:
    """Kernel B's 3-D vector form around the quick sweep's best (BN 2, BK 256, 8 warps)."""
    vec = [dict(B_DOT=0, B_BN=bn, B_BK=bk, B_WARPS=w)
           for bn, bk, w in itertools.product((1, 2, 4), (128, 256, 512), (4, 8, 16))]
    dot = [dict(B_DOT=1, B_BN=bn, B_BK=bk, B_WARPS=4, B_STAGES=st)
           for bn, bk, st in itertools.product((16, 32, 64), (128, 256), (3, 4))]
    return vec + dot


PREFILL_SHAPES = [("qwen3_30b_a3b", 2048), ("qwen3_30b_a3b", 64)]


def prefill_candidates() -> list[dict[str, int]]:
    return [dict(BM=bm, BN1=bn1, BK1=64, BN2=bn2, BK2=64, WARPS=w, STAGES=st)
            for bm, bn1, bn2, (w, st) in itertools.product((64, 128), (64, 128), (64, 128), ((4, 3), (8, 3), (8, 4)))]


SMALL_SHAPES = [("qwen3_30b_a3b", 8), ("mixtral_8x7b", 8)]  # the BM=16 tiled class (a few pairs per expert)


def small_gemm1_candidates() -> list[dict[str, int]]:
    return [dict(BM=16, BN1=bn, BK1=bk, WARPS=w, STAGES=st)
            for bn, bk, (w, st) in itertools.product((32, 64, 128), (64, 128, 256), ((4, 3), (4, 4), (4, 5), (8, 4)))]


def small_gemm2_candidates() -> list[dict[str, int]]:
    return [dict(BN2=bn, BK2=bk, WARPS2=w, STAGES2=st)
            for bn, bk, (w, st) in itertools.product((32, 64, 128), (64, 128, 256), ((4, 3), (4, 4), (4, 5), (8, 4)))]


def make_case(model: str, M: int, seed: int) -> tuple:
    s = MODELS[model]
    E, k, H, I = s["E"], s["K"], s["H"], s["I"]
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(M, H, device="cuda", dtype=torch.bfloat16, generator=g)
    w1 = (torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02).permute(0, 2, 1)
    w2 = (torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02).permute(0, 2, 1)
    ids = torch.stack([torch.randperm(E, device="cuda", generator=g)[:k] for _ in range(M)])
    tw = torch.softmax(torch.randn(M, k, device="cuda", generator=g), -1)
    return x, tw, ids, w1, w2


def time_cfg(args: tuple, cfg: dict[str, int], ref: torch.Tensor, rep: int,
             path: int = K.PATH_DECODE) -> dict[str, Any]:
    x, tw, ids, w1, w2 = args
    out = torch.full_like(ref, float("nan"))
    try:
        K.moe_experts_triton(x, tw, ids, w1, w2, path=path, out=out, config=cfg)
        torch.cuda.synchronize()
        err = rel_err(out, ref)
        us = bench_us(lambda: K.moe_experts_triton(x, tw, ids, w1, w2, path=path, out=out, config=cfg), rep)
        return dict(cfg=cfg, us=us, err=err, ok=bool(err < 1e-2 and torch.isfinite(out).all()))
    except Exception as e:  # out of shared memory / registers: that config is simply not a candidate
        return dict(cfg=cfg, us=None, err=None, ok=False, error=f"{type(e).__name__}: {str(e)[:160]}")


def setup_case(model: str, M: int, copy_gbps: float, rep: int, path: int) -> tuple[tuple, torch.Tensor, float, dict]:
    """(inputs, the default config's output as reference, weight-streaming floor us, default's timing)."""
    s = MODELS[model]
    args = make_case(model, M, seed=M)
    ref = torch.empty(M, s["H"], device="cuda", dtype=torch.bfloat16)
    K.moe_experts_triton(*args, path=path, out=ref)
    floor_us = K.selected_weight_bytes(args[2], s["E"], s["H"], s["I"]) / (copy_gbps * 1e9) * 1e6
    return args, ref, floor_us, time_cfg(args, {}, ref, rep, path)


def best_of(rows: list[dict[str, Any]], fallback: dict[str, Any]) -> dict[str, Any]:
    """The fastest correct row, or `fallback` when it is faster or none is correct."""
    return min([r for r in rows if r["ok"]] + [fallback], key=lambda r: r["us"])


def two_stage(args: tuple, ref: torch.Tensor, rep: int, first: list[dict[str, int]], second: list[dict[str, int]],
              base: dict[str, Any], path: int = K.PATH_DECODE) -> tuple[list, list, dict[str, Any], dict[str, Any]]:
    """Sweep `first` (the other keys at their defaults), then `second` on top of the first stage's
    best: (rows1, rows2, best1, best). A stage keeps what it started from when nothing correct beats it."""
    rows1 = [time_cfg(args, c, ref, rep, path) for c in first]
    best1 = best_of(rows1, base)
    rows2 = [time_cfg(args, {**best1["cfg"], **c}, ref, rep, path) for c in second]
    return rows1, rows2, best1, best_of(rows2, best1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rep", type=int, default=30)
    ap.add_argument("--prefill", action="store_true", help="sweep the tiled (prefill) path's tiles instead")
    ap.add_argument("--small", action="store_true", help="sweep the tiled path's BM=16 (decode-sized) tiles instead")
    ap.add_argument("--focus", action="store_true", help="Qwen3-30B-A3B at one token, a denser grid near the best")
    ap.add_argument("--focus-ms", default=None, help="--focus only at these M (comma list), e.g. 8")
    ap.add_argument("--b-first", action="store_true",
                    help="sweep kernel B at the default A first, then A at the best B (B is the gap at M=8)")
    a = ap.parse_args()
    copy = copy_bandwidth_gbps(100)
    res: dict[str, Any] = dict(
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        gpu=torch.cuda.get_device_name(), torch=torch.__version__, copy_gbps=copy,
        command="benchmarks/tune_moe_decode.py " + " ".join(sys.argv[1:]), shapes=[])
    if a.small:  # two stages: the gate_up GEMM's tiles (down GEMM at its default), then the down GEMM's
        for model, M in SMALL_SHAPES:
            args, ref, floor_us, base = setup_case(model, M, copy, a.rep, K.PATH_PREFILL)
            rows1, rows2, _, best = two_stage(args, ref, a.rep, small_gemm1_candidates(), small_gemm2_candidates(),
                                              base, K.PATH_PREFILL)
            # the per-pair decode path at this M (reads an expert once per pair, no align step)
            dec = time_cfg(args, {}, ref, a.rep, K.PATH_DECODE)
            print(f"tiled-small {model} M={M}: decode path {dec['us']} us (ok {dec['ok']})", flush=True)
            res["shapes"].append(dict(model=model, M=M, path="tiled-small", floor_us=floor_us, default=base, best=best,
                                      decode_path=dec,
                                      default_x_floor=base["us"] / floor_us, best_x_floor=best["us"] / floor_us,
                                      rows=rows1 + rows2))
            print(f"tiled-small {model} M={M}: floor {floor_us:.1f} us, default {base['us']:.1f} us, "
                  f"best {best['us']:.1f} us {best['cfg']}", flush=True)
            Path(a.out).write_text(json.dumps(res, indent=1))
        return
    if a.prefill:
        for model, M in PREFILL_SHAPES:
            args, ref, floor_us, base = setup_case(model, M, copy, a.rep, K.PATH_PREFILL)
            rows = [time_cfg(args, c, ref, a.rep, K.PATH_PREFILL) for c in prefill_candidates()]
            best = best_of(rows, base)
            res["shapes"].append(dict(model=model, M=M, path="prefill", floor_us=floor_us, default=base, best=best,
                                      default_x_floor=base["us"] / floor_us, best_x_floor=best["us"] / floor_us,
                                      rows=rows))
            print(f"prefill {model} M={M}: floor {floor_us:.1f} us, default {base['us']:.1f} us, "
                  f"best {best['us']:.1f} us {best['cfg']}", flush=True)
            Path(a.out).write_text(json.dumps(res, indent=1))
        return
    shapes = FOCUS_SHAPES if a.focus else SHAPES[::2] if a.quick else SHAPES
    if a.focus_ms:
        shapes = [(m, M) for m, M in shapes if M in {int(v) for v in a.focus_ms.split(",")}]
    for model, M in shapes:
        args, ref, floor_us, base = setup_case(model, M, copy, a.rep, K.PATH_DECODE)
        cands_a = focus_a_candidates() if a.focus else a_candidates(a.quick)
        cands_b = focus_b_candidates() if a.focus else b_candidates(a.quick)
        if a.b_first:  # B at the default A, then A at the best B
            rows_b, rows_a, best_b, best = two_stage(args, ref, a.rep, cands_b, cands_a, base)
            print(f"{model} M={M}: B best {best_b['us']:.1f} us {best_b['cfg']} (default {base['us']:.1f})", flush=True)
        else:
            rows_a, rows_b, _, best = two_stage(args, ref, a.rep, cands_a, cands_b, base)
        entry = dict(model=model, M=M, floor_us=floor_us, default=base, best=best,
                     default_x_floor=(base["us"] or 0) / floor_us, best_x_floor=(best["us"] or 0) / floor_us,
                     a_rows=rows_a, b_rows=rows_b)
        res["shapes"].append(entry)
        print(f"{model} M={M}: floor {floor_us:.1f} us, default {base['us']:.1f} us "
              f"({entry['default_x_floor']:.2f}x), best {best['us']:.1f} us ({entry['best_x_floor']:.2f}x) "
              f"{best['cfg']}", flush=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"copy {copy:.0f} GB/s")


if __name__ == "__main__":
    main()
