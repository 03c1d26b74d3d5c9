"""Sweep the MoE align program (histogram + padded offsets + tile experts [+ scatter]) launch knobs.

At decode-sized tiled batches (Qwen3-30B-A3B, M=8: 64 pairs over 128 experts) the single-program
align took ~6 us per layer on an H200, about as long as a 160 MB weight stream's tail. Per pair
count S: every (WARPS, BLOCK_S, BLOCK_T) is checked against the torch-op align (same padded count,
tile experts and per-tile pair sets) and timed with CUDA graphs (median).

Usage:  python benchmarks/tune_moe_align.py --out X.json      (CUDA; < 30 s)
        python benchmarks/tune_moe_align.py --dry-run          (CPU, TRITON_INTERPRET=1)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import os
import sys
from pathlib import Path

if "--dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_moe_experts import bench_us  # noqa: E402
from fxfuse.kernels import moe_experts as K  # noqa: E402

CASES = [(64, 128), (512, 128), (16384, 128), (16, 8), (4096, 8)]  # (pairs S, experts E): Qwen M=8/64/2048, Mixtral


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--rep", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="accepted for gpu_run.sh (the sweep is short already)")
    a = ap.parse_args()
    dev = "cpu" if a.dry_run else "cuda"
    res = dict(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               gpu="cpu (dry run)" if a.dry_run else torch.cuda.get_device_name(), torch=torch.__version__,
               command="benchmarks/tune_moe_align.py " + " ".join(sys.argv[1:]), cases=[])
    cases = [(37, 8), (300, 6)] if a.dry_run else CASES
    for S, E in cases:
        bm = K._tile_rows(S, E)
        g = torch.Generator().manual_seed(S)
        ids = torch.randint(0, E, (S,), generator=g).to(dev)
        want = K._align(ids, E, bm)
        dflt = K.align_config(S, E)
        rows = []
        for w, bs, bt in itertools.product((1, 2, 4, 8), sorted({dflt["BLOCK_S"], 1024}), (16, 64)):
            cfg = dict(WARPS=w, BLOCK_S=bs, BLOCK_T=bt)
            K.ALIGN_OVERRIDE.clear()
            K.ALIGN_OVERRIDE.update(cfg)
            got = K._align_triton(lambda k: k, ids, E, bm)
            ok = K.aligns_equivalent(want, got)
            us = None if a.dry_run or not ok else bench_us(lambda: K._align_triton(lambda k: k, ids, E, bm), a.rep)
            rows.append(dict(cfg=cfg, ok=ok, us=us))
        K.ALIGN_OVERRIDE.clear()
        d_us = next((r["us"] for r in rows if r["cfg"] == {"WARPS": dflt["WARPS"], "BLOCK_S": dflt["BLOCK_S"],
                                                             "BLOCK_T": dflt["BLOCK_T"]}), None)
        timed = [r for r in rows if r["us"]]
        best = min(timed, key=lambda r: r["us"]) if timed else None
        res["cases"].append(dict(S=S, E=E, BM=bm, default=dflt, default_us=d_us, best=best, all=rows,
                                 all_ok=all(r["ok"] for r in rows)))
        print(f"[align] S={S:6d} E={E:4d} BM={bm:3d} default {d_us} us best {best and round(best['us'], 2)} "
              f"{best and best['cfg']} all ok {all(r['ok'] for r in rows)}", flush=True)
    if a.out:
        a.out.write_text(json.dumps(res, indent=1))
    if not all(c["all_ok"] for c in res["cases"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
