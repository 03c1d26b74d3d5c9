"""Sweep the silu_mul_quant launch config (ROWS rows per program x num_warps, and the FLAT / CHUNK /
PIECES row layouts) on the raw launcher.

Why: at M >= 4096 a narrow row (I = 768: one 1024-lane tile, 4096 tiny programs) reached only
76% of copy bandwidth on an H200; several rows per program and fewer/more warps may close that,
and for static / per-group the FLAT layout drops the padding of a row to a power of 2; for rows not
a power of 2, per-token CHUNK (a two-pass row loop) and PIECES (the row as I's power-of-2 pieces,
read once: per-token and per-group) do too.
Every config names all of ROWS, num_warps, FLAT, CHUNK and PIECES, so no TUNED layout leaks into it.
Per (scheme, M, I): every pruned config is launched into NaN-poisoned outputs and must match the
padded ROWS=1 launch bitwise (q bytes and scale bits), then timed with CUDA graphs
(do_bench_cudagraph, median); copy bandwidth is measured in the same run. `suggested_tuned` is
the per-(scheme, padded row width) config with the best geomean time over M, in the form of
fxfuse.kernels.silu_mul_quant.TUNED.

Usage:  python benchmarks/tune_silu.py --out X.json [--jobs 8] [--rep 10] [--quick] [--pieces-only]
        python benchmarks/tune_silu.py --dry-run      (CPU, TRITON_INTERPRET=1, tiny shapes)
"""

from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv:  # before anything decorates a triton.jit function
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from multiprocessing import get_context  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_silu_mul_quant import FP8, GROUP, SCHEMES, bench_us, copy_bandwidth_gbps, make_inputs  # noqa: E402
from fxfuse.kernels import silu_mul_quant as K  # noqa: E402
from fxfuse.kernels.quant_common import row_tile  # noqa: E402

ROWS = (1, 2, 4, 8, 16)
WARPS = (1, 2, 4, 8, 16)
CHUNKS = (512, 1024, 2048, 4096)  # per-token row-loop widths
PIECE_WARPS = (1, 2, 4, 8, 16, 32)  # 4, 8, 16 always; the others within the per-thread bounds
KEYS = ("ROWS", "num_warps", "FLAT", "CHUNK", "PIECES")  # a config names every key: no TUNED layout leaks in
CASE_SCHEMES = ("per_token_fp8", "per_group128_fp8", "static_fp8")


def configs(inter: int, scheme: int, min_pt: int, max_pt: int, prune: bool = True,
            flat: bool = True, pieces_only: bool = False) -> list[dict[str, int]]:
    """(ROWS, num_warps) grid minus oversized tiles (> K.MAX_TILE) and, when `prune`, configs
    outside [min_pt, max_pt] elements per thread per operand; the default config always stays.
    With `flat`, a row width that is not a power of 2 also gets each config as FLAT (unpadded
    chunks) where the scheme allows it (static, per-group); such a row also gets the per-token
    row loop (CHUNK) and, per-token and per-group, PIECES at num_warps 4/8/16 (and 1, 2, 32
    within the per-thread bounds). `pieces_only`: the default config and the PIECES ones."""
    block = row_tile(inter, scheme, GROUP)[0]
    d = K.launch_config(inter, scheme, GROUP, None)
    out = [{k: d[k] for k in KEYS}]

    def add(**cfg: int) -> None:
        cfg = {**dict(ROWS=1, FLAT=0, CHUNK=0, PIECES=0), **cfg}
        if cfg not in out:
            out.append(cfg)

    flats = (0, 1) if flat and block != inter and K.flat_chunk(inter, scheme, GROUP) else (0,)
    for f in flats:
        for r in ROWS:
            for w in WARPS:
                per_thread = r * block / (32 * w)
                if r * block > K.MAX_TILE or (prune and not min_pt <= per_thread <= max_pt):
                    continue
                add(ROWS=r, num_warps=w, FLAT=f)
    if scheme == K.SCHEME_PER_TOKEN and block != inter:  # the per-token row loop (two passes over CHUNKs)
        for ch in CHUNKS:
            for w in WARPS:
                if ch < inter and (not prune or min_pt // 2 <= ch / (32 * w) <= max_pt):
                    add(num_warps=w, CHUNK=ch)
    if scheme in (K.SCHEME_PER_TOKEN, K.SCHEME_PER_GROUP) and block != inter:  # the row as power-of-2 pieces
        for w in PIECE_WARPS:
            if w in (4, 8, 16) or not prune or min_pt // 2 <= inter / (32 * w) <= max_pt:
                add(num_warps=w, PIECES=1)
    return [c for c in out if c["PIECES"] or c == out[0]] if pieces_only else out


def _fits(scheme: int, inter: int) -> bool:
    """The scheme takes rows this wide (per-group: whole groups; the dry run's I = 1200 is not)."""
    return scheme != K.SCHEME_PER_GROUP or inter % GROUP == 0


def _takes(inter: int, scheme: int, M: int, cfg: dict[str, int]) -> bool:
    """launch_config accepts `cfg` at this M (a small static M splits rows: ROWS, FLAT, PIECES refused)."""
    try:
        K.launch_config(inter, scheme, GROUP, M, cfg)
    except ValueError:
        return False
    return True


def _poisoned(M: int, inter: int, scheme: int, dev: str) -> tuple[torch.Tensor, torch.Tensor]:
    """NaN-filled (q, scales): an element the kernel does not write stays NaN and fails the check."""
    from fxfuse.kernels.quant_common import scales_shape

    q = torch.full((M, inter), float("nan"), device=dev).to(FP8)
    s = torch.full(scales_shape(M, inter, scheme, GROUP)[0], float("nan"), device=dev)
    return q, s


def _same(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    return torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(
        a[1].view(torch.int32), b[1].view(torch.int32))


class _Warmup:
    """Stands in for the kernel in K._launch: `[grid](...)` compiles (into the on-disk cache) and
    does not launch, so worker processes can build every config in parallel."""

    def __getitem__(self, grid: tuple) -> Any:
        return lambda *a, **kw: K._silu_mul_quant_kernel.warmup(*a, grid=grid, **kw)


def _precompile(job: tuple[str, int, list[dict[str, int]]]) -> str:
    """Worker: compile one (scheme, I)'s configs at M = SPLIT_MAX_M + 1 (same dtypes, strides and
    alignments as the timed shapes; M is not specialized, and rows this many do not column-split,
    which would compile other tiles or refuse ROWS / FLAT / PIECES), so the timing loop finds them
    in Triton's cache."""
    name, inter, cfgs = job
    M = K.SPLIT_MAX_M + 1
    _, oargs = make_inputs(name, M, inter, "cuda")
    x, up, scale, *rest = oargs
    q, s = _poisoned(M, inter, SCHEMES[name]["scheme"], "cuda")
    for cfg in cfgs:
        K._launch(_Warmup(), x, up, scale, q, s, *rest, override=cfg)
    return f"{name} I={inter}: {len(cfgs)} configs"


def sweep(Ms: list[int], Is: list[int], names: list[str], rep: int, copy_gbps: float, dev: str, dry: bool,
          min_pt: int, max_pt: int, flat: bool, pieces_only: bool = False) -> list[dict[str, Any]]:
    cases = []
    for name in names:
        scheme = SCHEMES[name]["scheme"]
        for inter in Is:
            if not _fits(scheme, inter):
                continue
            cfgs = configs(inter, scheme, min_pt, max_pt, prune=not dry, flat=flat, pieces_only=pieces_only)
            block = row_tile(inter, scheme, GROUP)[0]
            # the padded one-row launch: bitwise oracle (every key named: TUNED's layout does not apply)
            ref_cfg = dict(ROWS=1, num_warps=K.default_num_warps(block), FLAT=0, CHUNK=0, PIECES=0)
            for M in Ms:
                t0 = time.time()
                _, oargs = make_inputs(name, M, inter, dev)
                nbytes = K.bytes_moved(M, inter, torch.bfloat16, FP8, scheme, GROUP)
                ref = K.silu_mul_quant_triton(*oargs, out=_poisoned(M, inter, scheme, dev), config=ref_cfg)
                ref_ok = not (torch.isnan(ref[0].float()).any() or torch.isnan(ref[1]).any())
                default = K.launch_config(inter, scheme, GROUP, M)
                rows: list[dict[str, Any]] = []
                for cfg in (c for c in cfgs if _takes(inter, scheme, M, c)):
                    rec: dict[str, Any] = dict(config=cfg, us=None, frac_copy=None, ok=False)
                    try:
                        out = _poisoned(M, inter, scheme, dev)
                        K.silu_mul_quant_triton(*oargs, out=out, config=cfg)
                        rec["ok"] = bool(ref_ok and _same(out, ref))
                        if not dry:
                            rec["us"] = bench_us(lambda: K.silu_mul_quant_triton(*oargs, out=out, config=cfg), rep)
                            if copy_gbps:
                                rec["frac_copy"] = nbytes / (rec["us"] * 1e-6) / 1e9 / copy_gbps
                    except Exception as e:  # noqa: BLE001 - record and continue
                        rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    rows.append(rec)
                timed = [r for r in rows if r["ok"] and r["us"]]
                best = min(timed, key=lambda r: r["us"]) if timed else None
                d_us = next((r["us"] for r in rows if r["config"] == {k: default[k] for k in KEYS}), None)
                case = dict(scheme=name, M=M, I=inter, bytes=nbytes, default=default, default_us=d_us,
                            best=best and dict(config=best["config"], us=best["us"], frac_copy=best["frac_copy"]),
                            all=rows, wall_s=round(time.time() - t0, 2))
                cases.append(case)
                bad = [r["config"] for r in rows if not r["ok"]]
                print(f"[tune] {name:17s} M={M:6d} I={inter:6d} {len(rows):2d} configs | default "
                      f"{_f(d_us)} us | best {best and best['config']} {_f(best and best['us'])} us "
                      f"{_f(best and best['frac_copy'] and 100 * best['frac_copy'])} %copy | "
                      f"{'all bitwise equal' if not bad else f'MISMATCH/ERROR {bad}'} | {case['wall_s']} s", flush=True)
    return cases


def _f(v: Optional[float]) -> str:
    return f"{v:7.2f}" if v is not None else "    n/a"


def suggest(cases: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per (scheme code, padded row width): the config with the best geomean us over the Ms (only
    configs timed and bitwise-correct at every M), with its speedup over the default."""
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for c in cases:
        scheme = SCHEMES[c["scheme"]]["scheme"]
        groups.setdefault((scheme, row_tile(c["I"], scheme, GROUP)[0]), []).append(c)
    out: dict[str, dict[str, Any]] = {}
    for (scheme, block), cs in sorted(groups.items()):
        keys = None
        for c in cs:
            k = {json.dumps(r["config"], sort_keys=True) for r in c["all"] if r["ok"] and r["us"]}
            keys = k if keys is None else keys & k
        if not keys:
            continue

        def geo(key: str) -> float:
            us = [next(r["us"] for r in c["all"] if json.dumps(r["config"], sort_keys=True) == key) for c in cs]
            return math.exp(sum(map(math.log, us)) / len(us))

        best = min(keys, key=geo)
        dflt = [c["default_us"] for c in cs if c["default_us"]]
        d_geo = math.exp(sum(map(math.log, dflt)) / len(dflt)) if len(dflt) == len(cs) else None
        out[f"({scheme}, {block})"] = dict(config=json.loads(best), geomean_us=geo(best),
                                           speedup_vs_default=(d_geo / geo(best)) if d_geo else None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes, every config once")
    ap.add_argument("--quick", action="store_true", help="M=4096, I in {768, 14336} only")
    ap.add_argument("--rep", type=int, default=10, help="ms per do_bench_cudagraph measurement")
    ap.add_argument("--Ms", default="4096,16384")
    ap.add_argument("--Is", default="768,2048,14336,18432")
    ap.add_argument("--schemes", default=",".join(CASE_SCHEMES))
    ap.add_argument("--min-per-thread", type=int, default=4, help="prune: fewest elements per thread per operand")
    ap.add_argument("--max-per-thread", type=int, default=64, help="prune: most elements per thread (registers)")
    ap.add_argument("--no-flat", action="store_true", help="skip the FLAT (unpadded row) variants")
    ap.add_argument("--pieces-only", action="store_true", help="only the default and the PIECES configs")
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                    help="processes precompiling the configs (0: compile serially while timing)")
    args = ap.parse_args()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        sys.exit("tune_silu: needs a CUDA device (or --dry-run)")
    import triton

    K.LAUNCH_OVERRIDE.clear()
    dev = "cpu" if dry else "cuda"
    Ms = [5, 16] if dry else [4096] if args.quick else [int(v) for v in args.Ms.split(",")]
    Is = [384, 1200] if dry else [768, 14336] if args.quick else [int(v) for v in args.Is.split(",")]
    names = [n for n in args.schemes.split(",") if n]
    t0 = time.time()
    if not dry and args.jobs > 0:
        jobs = [(n, i, configs(i, SCHEMES[n]["scheme"], args.min_per_thread, args.max_per_thread,
                               flat=not args.no_flat, pieces_only=args.pieces_only))
                for n in names for i in Is if _fits(SCHEMES[n]["scheme"], i)]
        try:  # only fills Triton's cache: on failure the timing loop compiles each config itself
            with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as ex:
                for msg in ex.map(_precompile, jobs):
                    print(f"[tune] precompiled {msg}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"[tune] precompile failed ({type(e).__name__}: {str(e)[:300]}); compiling serially", flush=True)
        print(f"[tune] precompile {time.time() - t0:.1f} s", flush=True)
    copy_gbps = 0.0 if dry else copy_bandwidth_gbps(args.rep)
    gpu = "cpu (dry run)" if dry else torch.cuda.get_device_name()
    print(f"[tune] {gpu} copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    with torch.no_grad():
        cases = sweep(Ms, Is, names, args.rep, copy_gbps, dev, dry, args.min_per_thread, args.max_per_thread,
                      not args.no_flat, args.pieces_only)
    result = dict(
        family="silu_mul_quant_tune", gpu=gpu, torch=torch.__version__, triton=triton.__version__,
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join([Path(sys.executable).name, *sys.argv]), copy_gbps=copy_gbps, rep_ms=args.rep, dry_run=dry,
        bytes_model="fxfuse.kernels.silu_mul_quant.bytes_moved (min HBM read+write)",
        all_bitwise_equal=all(r["ok"] for c in cases for r in c["all"]),
        suggested_tuned=None if dry else suggest(cases), cases=cases, wall_s=round(time.time() - t0, 1),
    )
    print(f"[tune] all bitwise equal: {result['all_bitwise_equal']}  wall {result['wall_s']} s")
    for k, v in (result["suggested_tuned"] or {}).items():
        print(f"[tune] TUNED[{k}] = {v}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str))
        print(f"[tune] wrote {args.out}")
    if not result["all_bitwise_equal"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
