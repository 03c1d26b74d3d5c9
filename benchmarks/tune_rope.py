"""Sweep the RoPE(+fp8) kernel's launch configs: SPLIT x BLOCK_H x num_warps (issue 8).

Why: at M >= 4096 the fp8 schemes reach only 57-80% of copy bandwidth; the SPLIT paths (1:
contiguous halves, no partner gather; 2: whole heads, the partner from registers, full rotary of a
power-of-2 head_dim), smaller head blocks (k's 8 heads in an 8-head block) and other warp counts
are candidates. This times the raw launcher (K.rope_quant_triton / rope_quant_cache_triton) for
every valid config under CUDA graphs (do_bench_cudagraph, median), checks each config's outputs
(and written caches, outputs poisoned with 0xFF bytes first) and writes JSON for
fxfuse.kernels.rope_quant.launch_config's defaults.

The check: bitwise against the default config's outputs, except for QK-norm (TOLERANT): its
per-head sum of squares adds in an order set by the path and the layout (BLOCK_H, num_warps), so
rstd may move by an ulp between configs (a rare 1-ulp bf16 flip of the output) and every config,
the default included, is checked against rope_quant_reference with the tests' tolerance (relative
L2 error < QKNORM_REL_TOL, at most QKNORM_FLIP_FRAC of the elements differing); "bitwise_default"
records whether it also matched the default bit for bit.

Compiles dominate a cold run: they are done first by --jobs worker processes (each launches its
share of the configs once at a small M of the same Triton specialization, filling Triton's disk
cache), so the timing loop only loads kernels.

Usage:  python benchmarks/tune_rope.py --out X.json [--all | --quick] [--rep MS] [--jobs N]
                [--schemes rope_qknorm,rope] [--shapes llama3_8b,qwen3.5]
        python benchmarks/tune_rope.py --dry-run [--schemes ...]   (CPU, TRITON_INTERPRET=1, tiny M, no timing)
"""

from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv:  # before triton is imported: the kernels are built for the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from multiprocessing import get_context  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bench_rope_quant import (  # noqa: E402
    CACHE_SCHEMES,
    SCHEMES,
    SHAPES,
    bench_us,
    cache_bytes,
    cache_inputs,
    case_bytes,
    copy_bandwidth_gbps,
    make_inputs,
    op_args,
)

from fxfuse.kernels import rope_quant as K  # noqa: E402

BLOCK_HS = (1, 2, 4, 8, 16)
WARPS = (1, 2, 4, 8)
SPLITS = (K.SPLIT_GATHER, K.SPLIT_HALVES, K.SPLIT_REG)
TOLERANT = ("rope_qknorm",)  # checked against the reference with a tolerance, not bitwise vs the default
QKNORM_REL_TOL = 2e-3  # tests/test_rope_quant.py: QK-norm + RoPE vs eager, relative L2 error
QKNORM_FLIP_FRAC = 1e-3  # elements that may differ (1-ulp flips from an ulp of rstd), as the GPU tests allow
FP8_MAX = 448.0
Config = dict[str, int]


def case_list(full: bool, quick: bool = False, schemes: Any = None, shapes: Any = None) -> list[tuple[str, str, int]]:
    """(shape, scheme, M): both shapes x the 4 schemes, + the llama KV-cache variants (as bench --cache);
    `schemes` / `shapes` (None: all) keep only those."""
    Ms = [1, 256, 4096, 16384] if full else [16384] if quick else [4096, 16384]
    cases = [(sh, sc, M) for sh in SHAPES for sc in SCHEMES for M in Ms]
    cases += [("llama3_8b", sc, M) for sc in CACHE_SCHEMES for M in Ms]
    return [c for c in cases if (schemes is None or c[1] in schemes) and (shapes is None or c[0] in shapes)]


def heads(shape: str, scheme: str) -> tuple[int, int, int]:
    c = SHAPES[shape]
    return c["hq"], c["hk"], (c["hk"] if scheme in CACHE_SCHEMES else 0)


def default_config(shape: str, scheme: str) -> Config:
    """The config the launcher picks for this case by itself (quant kinds, QK-norm and cache
    included: without them the 2026-12-01 sweep labelled plain RoPE's blocks the QK-norm default)."""
    c = SHAPES[shape]
    qq = {"rope_fp8_static": K.QUANT_STATIC, "rope_fp8_dynamic": K.QUANT_DYNAMIC}.get(scheme, K.QUANT_NONE)
    kq = K.QUANT_STATIC if scheme == "rope_fp8_static_kvcache" else qq  # the cache form quantizes k only
    return K.launch_config(c["d"], c["rot"], *heads(shape, scheme), q_quant=qq, k_quant=kq,
                           norm=scheme == "rope_qknorm", cache=scheme in CACHE_SCHEMES)


def grid(shape: str, scheme: str) -> list[Config]:
    """SPLIT x BLOCK_H x num_warps, pruned: SPLIT only where the rotary half allows it, no block
    wider than the largest head count, 2..32 elements per thread (fewer idles lanes, more spills);
    the default config always included."""
    c = SHAPES[shape]
    bd = triton.next_power_of_2(c["d"])
    hmax = triton.next_power_of_2(max(heads(shape, scheme)))
    out = []
    for split, bh, nw in itertools.product(SPLITS, BLOCK_HS, WARPS):
        ept = bh * bd / (nw * 32)
        if ((split == K.SPLIT_HALVES and not K.split_ok(c["d"], c["rot"]))
                or (split == K.SPLIT_REG and not K.reg_partner_ok(c["d"], c["rot"]))
                or bh > hmax or not 2 <= ept <= 32):
            continue
        out.append(dict(SPLIT=split, BLOCK_H=bh, num_warps=nw))
    d = default_config(shape, scheme)
    return out if d in out else [d] + out


def build(shape: str, scheme: str, M: int, dev: str) -> tuple[Callable[[Config, list], tuple], list[torch.Tensor],
                                                                Callable[[], tuple]]:
    """(launch(config, outs) -> outputs, mutated caches, reference()) of one case on `dev`."""
    torch.manual_seed(0)
    if scheme not in CACHE_SCHEMES:
        oargs, okw = op_args(scheme, make_inputs(shape, M, dev, scheme))
        return (lambda cfg, out: K.rope_quant_triton(*oargs, **okw, out=out, config=cfg), [],
                lambda: K.rope_quant_reference(*oargs, **okw))
    c = SHAPES[shape]
    q, k, v, cos_t, sin_t, pos, slots, kc, vc, ks, vs = cache_inputs(scheme, M, dev, c)
    fp8 = scheme == "rope_fp8_static_kvcache"
    bf = torch.bfloat16
    a = [q[None], k[None], cos_t, sin_t, pos, None, ks.reshape(1) if fp8 else None, c["rot"], True, False, bf,
         0, 1.0, [], [], False, int(fp8), 1.0, [], [], False, -FP8_MAX, FP8_MAX, True, False, [0, 1, 2], [0, 1, 2],
         v[None], kc, vc, slots, vs.reshape(1) if fp8 else None, fp8, False, fp8, 1.0, False, -FP8_MAX, FP8_MAX, False]

    def reference() -> tuple:
        r = list(a)
        r[28], r[29] = kc.clone(), vc.clone()
        return (*K.rope_quant_cache_reference(*r), r[28], r[29])

    return lambda cfg, out: K.rope_quant_cache_triton(*a, out=out, config=cfg), [kc, vc], reference


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.numel() else t


def poisoned(like: tuple) -> list[torch.Tensor]:
    """Fresh outputs laid out like `like`, every byte 0xFF (NaN in bf16/f32/e4m3): unwritten shows."""
    outs = []
    for t in like:
        o = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
        if o.numel():
            _bits(o).fill_(0xFF)
        outs.append(o)
    return outs


def same(a: tuple, b: tuple) -> bool:
    return all(torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b))


def close(a: tuple, ref: tuple) -> tuple[bool, dict[str, float]]:
    """(within the QK-norm tolerance?, worst relative L2 error and fraction of differing elements)
    of outputs `a` against the reference's (fp8 outputs: the dequant_close bounds, 2% / 2%)."""
    worst = dict(rel=0.0, frac=0.0)
    ok = True
    for x, y in zip(a, ref):
        if not y.numel():
            continue
        if x.shape != y.shape or x.dtype != y.dtype:
            return False, worst
        xd, yd = x.double(), y.double()
        if not torch.isfinite(xd).all():  # a poisoned (unwritten) element is NaN
            return False, worst
        rel = ((xd - yd).norm() / yd.norm().clamp_min(1e-30)).item()
        frac = (xd != yd).double().mean().item()
        worst = dict(rel=max(worst["rel"], rel), frac=max(worst["frac"], frac))
        fp8 = x.dtype == torch.float8_e4m3fn
        ok = ok and (rel <= 0.02 and frac <= 0.02 if fp8 else rel < QKNORM_REL_TOL and frac <= QKNORM_FLIP_FRAC)
    return ok, worst


def run_once(launch: Callable, caches: list[torch.Tensor], init: list[torch.Tensor], like: tuple,
             cfg: Config) -> tuple:
    """Outputs + caches of one launch from the initial caches into poisoned outputs."""
    for cch, i in zip(caches, init):
        cch.copy_(i)
    out = launch(cfg, poisoned(like))
    return (*out, *[cch.clone() for cch in caches])


def _warm(job: tuple[str, str, int, list[Config]]) -> int:
    """Worker: launch each config once (compiles into Triton's disk cache for the timing process)."""
    shape, scheme, M, cfgs = job
    launch, _, _ = build(shape, scheme, M, "cuda")
    like = None
    for cfg in cfgs:
        like = launch(cfg, None) if like is None else launch(cfg, poisoned(like))
    torch.cuda.synchronize()
    return len(cfgs)


def warm_compile(cases: list[tuple[str, str, int]], jobs: int) -> None:
    """Compile every (shape, scheme, specialization) x config in `jobs` processes. M = 1 specializes
    differently from M > 1 (ints == 1); every M > 1 here has strides divisible by 16 like M = 16."""
    seen = sorted({(sh, sc, 1 if M == 1 else 16) for sh, sc, M in cases})
    work = []
    for sh, sc, m in seen:
        cfgs = grid(sh, sc)
        step = max(1, math.ceil(len(cfgs) / 4))
        work += [(sh, sc, m, cfgs[i:i + step]) for i in range(0, len(cfgs), step)]
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as ex:
        n = sum(ex.map(_warm, work))
    print(f"[tune] compiled {n} kernels in {len(work)} jobs on {jobs} workers, {time.time() - t0:.1f} s", flush=True)


def sweep(cases: list[tuple[str, str, int]], dev: str, rep: int, copy_gbps: float, dry: bool) -> list[dict[str, Any]]:
    rows = []
    for shape, scheme, M in cases:
        t0 = time.time()
        launch, caches, reference = build(shape, scheme, M, dev)
        init = [cch.clone() for cch in caches]
        nbytes = cache_bytes(scheme, M, SHAPES[shape]) if scheme in CACHE_SCHEMES else case_bytes(shape, scheme, M)
        dflt = default_config(shape, scheme)
        like = launch(dflt, None)
        want = run_once(launch, caches, init, like, dflt)
        tolerant = scheme in TOLERANT
        row: dict[str, Any] = dict(shape=shape, scheme=scheme, M=M, bytes=nbytes, default=dflt, all=[], notes=[],
                                   check="reference, tolerance" if tolerant else "bitwise vs default")
        ref = None
        if dry or tolerant:  # the default config vs the torch oracle too (caches written from `init`)
            for cch, i in zip(caches, init):
                cch.copy_(i)
            ref = reference()
        if dry:
            row["default_matches_reference"] = close(want, ref)[0] if tolerant else same(want, ref)
            if not row["default_matches_reference"]:
                row["notes"].append("default config differs from rope_quant_reference")
        for cfg in grid(shape, scheme):
            ent: dict[str, Any] = dict(config=cfg)
            try:
                got = run_once(launch, caches, init, like, cfg)
                if tolerant:
                    ent["ok"], ent["vs_reference"] = close(got, ref)
                    ent["bitwise_default"] = same(got, want)
                else:
                    ent["ok"] = same(got, want)
                if ent["ok"] and not dry:
                    outs = poisoned(like)
                    ent["us"] = bench_us(lambda: launch(cfg, outs), rep)
                    ent["frac_copy"] = nbytes / (ent["us"] * 1e-6) / 1e9 / copy_gbps
            except Exception as e:  # noqa: BLE001 -- a config that does not build is a result too
                ent.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
            if not ent["ok"]:
                why = "outside the tolerance of the reference" if tolerant else "output differs from the default config"
                row["notes"].append(f"{cfg}: {ent.get('error', why)}")
            row["all"].append(ent)
        timed = [e for e in row["all"] if e.get("us")]
        d_us = next((e["us"] for e in timed if e["config"] == dflt), None)
        row["default_us"] = d_us
        if timed:
            b = min(timed, key=lambda e: e["us"])
            row["best"] = dict(config=b["config"], us=b["us"], frac_copy=b["frac_copy"],
                               speedup_vs_default=(d_us / b["us"]) if d_us else None)
        row["wall_s"] = round(time.time() - t0, 2)
        rows.append(row)
        best = row.get("best")
        msg = (f"default {d_us:7.1f} us ({nbytes / (d_us * 1e-6) / 1e9 / copy_gbps * 100:5.1f}% copy) | best "
               f"{best['us']:7.1f} us ({best['frac_copy'] * 100:5.1f}%) {best['config']}" if best and d_us else "")
        print(f"[tune] {shape:10s} {scheme:24s} M={M:6d} configs {len(row['all']):3d} bad {len(row['notes']):2d} "
              f"{msg} [{row['wall_s']} s]", flush=True)
    return rows


def suggest(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (shape, scheme): the config with the best geomean time over M >= 4096 (every M ok)."""
    out = []
    for shape, scheme in sorted({(r["shape"], r["scheme"]) for r in rows}):
        rs = [r for r in rows if r["shape"] == shape and r["scheme"] == scheme and r["M"] >= 4096]
        per: dict[str, list[float]] = {}
        for r in rs:
            for e in r["all"]:
                if e.get("us"):
                    per.setdefault(json.dumps(e["config"], sort_keys=True), []).append(e["us"] / r["default_us"])
        full = {k: math.exp(sum(map(math.log, v)) / len(v)) for k, v in per.items() if len(v) == len(rs)}
        if full:
            k = min(full, key=full.get)
            out.append(dict(shape=shape, scheme=scheme, config=json.loads(k), geomean_time_vs_default=round(full[k], 3)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--all", action="store_true", help="also M = 1 and 256")
    ap.add_argument("--quick", action="store_true", help="M = 16384 only")
    ap.add_argument("--rep", type=int, default=10, help="do_bench_cudagraph rep (ms) per config")
    ap.add_argument("--jobs", type=int, default=min(12, os.cpu_count() or 1), help="compile worker processes")
    ap.add_argument("--dry-run", action="store_true", help="every config once at tiny M on CPU (interpreter)")
    ap.add_argument("--schemes", default=None, help=f"comma-separated subset of {SCHEMES + CACHE_SCHEMES}")
    ap.add_argument("--shapes", default=None, help=f"comma-separated subset of {tuple(SHAPES)}")
    args = ap.parse_args()
    schemes = args.schemes.split(",") if args.schemes else None
    shapes = args.shapes.split(",") if args.shapes else None
    for name, got, known in (("scheme", schemes, SCHEMES + CACHE_SCHEMES), ("shape", shapes, tuple(SHAPES))):
        bad = sorted(set(got or ()) - set(known))
        if bad:
            sys.exit(f"tune_rope: unknown {name}s {bad} (known: {known})")
    t0 = time.time()
    if args.dry_run:
        dev = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
        cases = [(sh, sc, 3) for sh, sc, _ in case_list(False, schemes=schemes, shapes=shapes)[::2]]
        rows = sweep(cases, dev, 1, 1.0, dry=True)
        bad = [r for r in rows if r["notes"]]
        for r in bad:
            print("[dry-run] problem:", r["shape"], r["scheme"], r["M"], r["notes"][:3])
        n = sum(len(r["all"]) for r in rows)
        print(f"[dry-run] {len(rows)} cases, {n} configs run, {len(bad)} with problems, {time.time() - t0:.0f} s")
        sys.exit(1 if bad else 0)
    if not torch.cuda.is_available():
        sys.exit("tune_rope: needs a CUDA device (or --dry-run)")
    cases = case_list(args.all, args.quick, schemes, shapes)
    warm_compile(cases, args.jobs)
    copy_gbps = copy_bandwidth_gbps(args.rep)
    print(f"[tune] {torch.cuda.get_device_name()} copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    rows = sweep(cases, "cuda", args.rep, copy_gbps, dry=False)
    result = dict(
        family="rope_quant", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join([Path(sys.executable).name] + sys.argv), copy_gbps=copy_gbps, rep_ms=args.rep,
        bytes_model="bench_rope_quant.case_bytes / cache_bytes (min HBM read+write)",
        cases=rows, suggest=suggest(rows), problems=sum(len(r["notes"]) for r in rows),
        wall_s=round(time.time() - t0, 1),
    )
    for s in result["suggest"]:
        print("[tune] suggest", json.dumps(s))
    print(f"[tune] problems {result['problems']}, wall {result['wall_s']} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str))
        print(f"[tune] wrote {args.out}")


if __name__ == "__main__":
    main()
