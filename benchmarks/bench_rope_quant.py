"""Benchmark fused RoPE(+fp8 quant) of q and k against eager and stock torch.compile.

Per (model shape, scheme, M): the HF-written form (apply_rotary_pos_emb on [B, H, S, D] views,
then fp8 quant) under eager, stock torch.compile, torch.compile with the fxfuse pass (ungated),
and the raw op; median us via do_bench_cudagraph (CUDA graphs), GB/s from the minimum-traffic
model (fxfuse.kernels.rope_quant.bytes_moved), fraction of the measured 1 GiB copy bandwidth,
speedup vs stock compile, and whether Inductor's output code holds the fused Triton kernel.

Gating: the JSON's "gates" holds, per "<scheme>/<M class>" (M<=16, M<=256, M>=4096:
fxfuse.gating.m_classes) and per scheme (every M), the geomean speedup of fused vs stock compile
keyed by head_dim (the `hidden` that fxfuse/patterns/rope_quant.py passes to gating.rejects). Shapes: Llama-3-8B-like (32/8 heads x 128) and Qwen3.5-like (16/2 x 256,
partial rotary 64), M in {1, 16, 256, 4096, 16384}; `--shapes gpt_oss` (64/8 heads x 64) measures the
head_dim-64 classes (GPT-OSS; its chunk form reads half-width cos/sin, the same kernel path otherwise).

--cache: RoPE + KV-cache write (vLLM-like token-major q/k/v, cos/sin table by positions, k and v
scattered into paged caches by slot; bf16 caches, or fp8 e4m3 caches with static k/v scales),
Llama-3-8B-like only, M in {1, 256, 4096}: fused (one kernel: RoPE + both cache writes) vs stock
compile and eager, with CUDA graphs. Its JSON's "gates" fills the rope_kvcache /
rope_fp8_static_kvcache classes ("gates_merge": write_gates.py adds them to the rope_quant table).

Usage:  python benchmarks/bench_rope_quant.py --out X.json [--quick] [--dry-run]
        python benchmarks/bench_rope_quant.py --cache --out X.json [--dry-run]
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

from fxfuse.gating import M_CLASSES, m_class  # noqa: E402
from fxfuse.kernels import rope_quant as K  # noqa: E402

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
SHAPES = {"llama3_8b": dict(hq=32, hk=8, d=128, rot=128), "qwen3.5": dict(hq=16, hk=2, d=256, rot=64),
          "gpt_oss": dict(hq=64, hk=8, d=64, rot=64)}
DEFAULT_SHAPES = ("llama3_8b", "qwen3.5")  # the table; gpt_oss (head_dim 64) on request
SCHEMES = ("rope", "rope_fp8_static", "rope_fp8_dynamic", "rope_qknorm")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF apply_rotary_pos_emb for one tensor, with partial rotary (rest passed through)."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    xr, xp = x[..., :rot], x[..., rot:]
    return torch.cat((xr * cos + rotate_half(xr) * sin, xp), dim=-1)


def _static(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def _dynamic(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = (x.float().abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(1e-6)
    return (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


def form_rope(q, k, cos, sin, qs, ks):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return _rope(q, cos, sin), _rope(k, cos, sin)


def form_rope_fp8_static(q, k, cos, sin, qs, ks):
    qe, ke = form_rope(q, k, cos, sin, qs, ks)
    return _static(qe, qs), _static(ke, ks)


def form_rope_fp8_dynamic(q, k, cos, sin, qs, ks):
    qe, ke = form_rope(q, k, cos, sin, qs, ks)
    return (*_dynamic(qe), *_dynamic(ke))


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Qwen3RMSNorm over head_dim."""
    v = x.float()
    v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)
    return w * v.to(x.dtype)


def form_rope_qknorm(q, k, cos, sin, qs, ks):
    """Qwen3 attention prologue: q_norm/k_norm per head on [B, S, H, D], transpose, RoPE (bf16 out).

    qs/ks carry the norm weights here ([D] bf16) instead of fp8 scales."""
    qn = _rms(q.transpose(1, 2), qs).transpose(1, 2)
    kn = _rms(k.transpose(1, 2), ks).transpose(1, 2)
    return form_rope(qn, kn, cos, sin, qs, ks)


FORMS: dict[str, Callable[..., tuple]] = {
    "rope": form_rope, "rope_fp8_static": form_rope_fp8_static, "rope_fp8_dynamic": form_rope_fp8_dynamic,
    "rope_qknorm": form_rope_qknorm,
}


def make_inputs(shape: str, M: int, dev: str, scheme: str = "rope") -> tuple:
    """HF layout: B=1, S=M, projections viewed as [B, H, S, D]; fresh random data, never zeros."""
    c = SHAPES[shape]
    dt = torch.bfloat16
    q = torch.randn(1, M, c["hq"], c["d"], device=dev, dtype=dt).transpose(1, 2)
    k = torch.randn(1, M, c["hk"], c["d"], device=dev, dtype=dt).transpose(1, 2)
    ang = torch.rand(1, M, c["rot"] // 2, device=dev) * 100.0
    emb = torch.cat((ang, ang), -1)
    qs = torch.tensor(0.02, device=dev)
    ks = torch.tensor(0.03, device=dev)
    if scheme == "rope_qknorm":
        qs = (1 + 0.2 * torch.randn(c["d"], device=dev)).to(dt)
        ks = (1 + 0.2 * torch.randn(c["d"], device=dev)).to(dt)
    return q, k, emb.cos().to(dt), emb.sin().to(dt), qs, ks


def op_args(scheme: str, fargs: tuple) -> tuple:
    q, k, cos, sin, qs, ks = fargs
    rot = cos.shape[-1]
    quant = {"rope": 0, "rope_fp8_static": 1, "rope_fp8_dynamic": 2, "rope_qknorm": 0}[scheme]
    norm = dict(q_norm_w=qs, k_norm_w=ks, norm_dtype=torch.bfloat16) if scheme == "rope_qknorm" else {}
    ops, consts = ([K.SCALE_CODES[1], K.SCALE_CODES[3]], [FP8_MAX, 1e-6]) if quant == 2 else ([], [])
    return (q.transpose(1, 2), k.transpose(1, 2), cos.reshape(-1, rot), sin.reshape(-1, rot), None,
            qs.reshape(1) if quant == 1 else None, ks.reshape(1) if quant == 1 else None, rot, True, False,
            torch.bfloat16, quant, 1.0, ops, consts, False, quant, 1.0, ops, consts, False, -FP8_MAX, FP8_MAX,
            quant == 0, quant == 0, [0, 2, 1], [0, 2, 1]), norm


def case_bytes(shape: str, scheme: str, M: int) -> int:
    c = SHAPES[shape]
    qz = scheme not in ("rope", "rope_qknorm")
    return K.bytes_moved(M, c["hq"], c["hk"], c["d"], torch.bfloat16, c["rot"], q_quant=qz, k_quant=qz,
                         need_rope=not qz)


def bench_us(fn: Callable[[], Any], rep: int) -> float:
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


def _compiled(fn: Callable, args: tuple) -> tuple[Any, Optional[bool], int]:
    """Run once; (out, fused kernel in output code?, number of Triton kernel launches in the code)."""
    from unittest import mock

    from torch._inductor.graph import GraphLowering

    codes: list[str] = []
    with mock.patch.object(GraphLowering, "save_output_code", codes.append):
        out = fn(*args)
    if not codes:
        return out, None, -1
    code = "\n".join(codes)
    return out, "_rope_quant_kernel" in code, code.count(".run(")


def _err(out: tuple, ref: tuple) -> float:
    worst = 0.0
    for o, r in zip(out, ref):
        of, rf = o.float(), r.float()
        worst = max(worst, float((of - rf).norm() / rf.norm().clamp_min(1e-30)))
    return worst


def _fail(row: dict[str, Any], label: str, vname: str, e: Exception) -> None:
    """Record a variant that failed (the row stays, with the note and no time)."""
    msg = f"{vname}: {type(e).__name__}: {str(e)[:300]}"
    row["notes"].append(msg)
    row["us"][vname] = None
    print(f"[bench] {label} {msg}", flush=True)
    traceback.print_exc(limit=3)


def _finish(row: dict[str, Any], nbytes: int, copy_gbps: float, t0: float) -> tuple[dict, dict, Callable]:
    """GB/s, fraction of copy bandwidth and speedup vs stock compile per variant; (us, speedups, fmt)."""
    row["gbps"] = {k: (nbytes / (v * 1e-6) / 1e9 if v else None) for k, v in row["us"].items()}
    row["frac_copy"] = {k: (g / copy_gbps if g and copy_gbps else None) for k, g in row["gbps"].items()}
    c = row["us"].get("compile")
    row["speedup_vs_compile"] = {k: (c / v if (c and v) else None) for k, v in row["us"].items()}
    row["wall_s"] = round(time.time() - t0, 2)
    f = lambda v, p=1: f"{v:8.{p}f}" if v is not None else "     n/a"  # noqa: E731
    return row["us"], row["speedup_vs_compile"], f


def run(Ms: list[int], shapes: list[str], schemes: list[str], rep: int, copy_gbps: float, dev: str,
        dry: bool) -> list[dict[str, Any]]:
    import fxfuse

    fx_pass = fxfuse.FusionPasses(options={"gate": False})
    torch._inductor.config.fx_graph_cache = False
    rows = []
    for shape in shapes:
        for scheme in schemes:
            form = FORMS[scheme]
            torch._dynamo.reset()
            stock = torch.compile(form)
            fused = torch.compile(form, options={"post_grad_custom_pre_pass": fx_pass})
            for M in Ms:
                t0 = time.time()
                fargs = make_inputs(shape, M, dev, scheme)
                oargs, okw = op_args(scheme, fargs)
                nbytes = case_bytes(shape, scheme, M)
                row: dict[str, Any] = dict(shape=shape, scheme=scheme, M=M, head_dim=SHAPES[shape]["d"],
                                           bytes=nbytes, us={}, err={}, notes=[])
                ref = form(*fargs)
                fxfuse.counters.clear()
                fxfuse.report.clear()
                for vname, fn in (("eager", lambda: form(*fargs)), ("compile", lambda: stock(*fargs)),
                                  ("fused", lambda: fused(*fargs)),
                                  ("op", lambda: torch.ops.fxfuse.rope_quant(*oargs, **okw))):
                    try:
                        if vname == "fused":
                            out, inl, nlaunch = _compiled(fused, fargs)
                            if inl is not None:
                                row["fused_kernel_in_code"] = inl
                                row["fused_launches"] = nlaunch
                            row["fused_regions"] = fxfuse.counters["rope_quant"]
                            row["fused_detail"] = [f.detail for f in fxfuse.report().fusions]
                        elif vname == "compile":
                            out, _, nlaunch = _compiled(stock, fargs)
                            row["compile_launches"] = nlaunch
                        else:
                            out = fn()
                        if vname in ("compile", "fused"):
                            row["err"][vname] = _err(out, ref)
                        row["us"][vname] = None if dry else bench_us(fn, rep)
                    except Exception as e:  # noqa: BLE001
                        _fail(row, f"{shape} {scheme} M={M}", vname, e)
                us, sp, f = _finish(row, nbytes, copy_gbps, t0)
                rows.append(row)
                print(f"{shape:10s} {scheme:17s} M={M:6d} | us eager {f(us.get('eager'))} compile {f(us.get('compile'))} "
                      f"fused {f(us.get('fused'))} op {f(us.get('op'))} | %copy fused "
                      f"{f((row['frac_copy'].get('fused') or 0) * 100)} | x stock {f(sp.get('fused'), 2)} | "
                      f"regions {row.get('fused_regions')} launches {row.get('fused_launches')}/{row.get('compile_launches')}",
                      flush=True)
    return rows


def size_class(M: int) -> str:
    """The gate's M class of a measured token count (fxfuse.gating.m_class)."""
    return m_class(M)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def geo(v: list[float]) -> Optional[float]:
        v = [x for x in v if x]
        return round(math.exp(sum(map(math.log, v)) / len(v)), 3) if v else None

    s: dict[str, Any] = {"geomean_speedup_vs_compile": {}, "min_frac_copy_M>=4096": {}}
    for scheme in {r["scheme"] for r in rows}:
        rs = [r for r in rows if r["scheme"] == scheme]
        s["geomean_speedup_vs_compile"][scheme] = {
            f"{hd}/{cls}": geo([r["speedup_vs_compile"].get("fused") for r in rs
                                if r["head_dim"] == hd and size_class(r["M"]) == cls])
            for hd in sorted({r["head_dim"] for r in rs}) for cls, _ in M_CLASSES
        }
        big = [r["frac_copy"].get("fused") for r in rs if r["M"] >= 4096 and r["frac_copy"].get("fused")]
        s["min_frac_copy_M>=4096"][scheme] = min(big) if big else None
    one = [r.get("fused_launches") for r in rows if r["M"] == 1]
    s["fused_launches_M=1"] = one
    s["max_err_fused_vs_eager"] = max([r["err"].get("fused") or 0.0 for r in rows], default=None)
    return s


def gates(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{"<scheme>/<M class>": {head_dim: geomean fused/stock speedup over the M of that class}} (the
    summary's geomean_speedup_vs_compile "<head_dim>/<M class>" figures: the classes the pattern's
    gate decides by, fxfuse.gating.m_classes) and {scheme: {head_dim: geomean over every M}} (read
    only without a token count). Rows where Inductor's fresh output code lacked our kernel are left
    out; a row with no fresh code (the dynamic-M graph compiled at an earlier M ran again:
    fused_kernel_in_code unset) counts."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        sp = r["speedup_vs_compile"].get("fused")
        if sp and r.get("fused_kernel_in_code") is not False:
            for key in (r["scheme"], f"{r['scheme']}/{size_class(r['M'])}"):
                out.setdefault(key, {}).setdefault(str(r["head_dim"]), []).append(sp)
    return {s: {h: round(math.exp(sum(map(math.log, v)) / len(v)), 3) for h, v in sorted(hs.items())}
            for s, hs in sorted(out.items())}


# ----------------------------------------------------------------------------- + KV-cache write

CACHE_SCHEMES = ("rope_kvcache", "rope_fp8_static_kvcache")
CACHE_BLOCK = 16


def cache_form(scheme: str) -> Callable[..., torch.Tensor]:
    """vLLM-like prologue: RoPE of q/k from a cos/sin table by positions, then k and v into paged caches."""
    fp8 = scheme == "rope_fp8_static_kvcache"

    def form(q, k, v, cos_t, sin_t, pos, slots, kc, vc, ks, vs):
        cos, sin = cos_t[pos].unsqueeze(-2), sin_t[pos].unsqueeze(-2)
        qe = q * cos + rotate_half(q) * sin
        ke = k * cos + rotate_half(k) * sin
        kf, vf = kc.view(-1, *k.shape[1:]), vc.view(-1, *v.shape[1:])
        if fp8:
            kf[slots] = _static(ke, ks)
            vf[slots] = _static(v, vs)
        else:
            kf[slots] = ke
            vf[slots] = v
        return qe

    return form


def cache_inputs(scheme: str, M: int, dev: str, c: dict[str, int]) -> tuple:
    dt = torch.bfloat16
    cdt = FP8 if scheme == "rope_fp8_static_kvcache" else dt
    q = torch.randn(M, c["hq"], c["d"], device=dev, dtype=dt)
    k = torch.randn(M, c["hk"], c["d"], device=dev, dtype=dt)
    v = torch.randn(M, c["hk"], c["d"], device=dev, dtype=dt)
    ang = torch.rand(8192, c["rot"] // 2, device=dev) * 100.0
    emb = torch.cat((ang, ang), -1)
    pos = torch.randint(0, 8192, (M,), device=dev)
    blocks = 2 * 4096 // CACHE_BLOCK  # one cache size for every M (as a server allocates it): no recompiles
    slots = torch.randperm(blocks * CACHE_BLOCK, device=dev)[:M]
    kc = torch.randn(blocks, CACHE_BLOCK, c["hk"], c["d"], device=dev).to(cdt)
    vc = torch.randn(blocks, CACHE_BLOCK, c["hk"], c["d"], device=dev).to(cdt)
    return (q, k, v, emb.cos().to(dt), emb.sin().to(dt), pos, slots, kc, vc,
            torch.tensor(0.03, device=dev), torch.tensor(0.02, device=dev))


def cache_bytes(scheme: str, M: int, c: dict[str, int]) -> int:
    """Minimum HBM traffic: read q, k, v, cos/sin rows, positions, slots; write q rope, k and v rows."""
    es, ces = 2, (1 if scheme == "rope_fp8_static_kvcache" else 2)
    hq, hk, d = c["hq"], c["hk"], c["d"]
    return M * ((hq + 2 * hk) * d * es + 2 * c["rot"] * es + 16 + hq * d * es + 2 * hk * d * ces)


def _cache_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == FP8 else t


def run_cache(Ms: list[int], rep: int, copy_gbps: float, dev: str, dry: bool) -> list[dict[str, Any]]:
    """Fused (RoPE + both cache writes in one kernel) vs stock compile and eager, CUDA graphs."""
    import fxfuse

    fx_pass = fxfuse.FusionPasses(options={"gate": False})
    torch._inductor.config.fx_graph_cache = False
    c = SHAPES["llama3_8b"]
    rows = []
    for scheme in CACHE_SCHEMES:
        form = cache_form(scheme)
        torch._dynamo.reset()
        stock = torch.compile(form)
        fused = torch.compile(form, options={"post_grad_custom_pre_pass": fx_pass})
        last: dict[str, Any] = {}
        for M in Ms:
            t0 = time.time()
            args = cache_inputs(scheme, M, dev, c)
            nbytes = cache_bytes(scheme, M, c)
            row: dict[str, Any] = dict(shape="llama3_8b", scheme=scheme, M=M, head_dim=c["d"], bytes=nbytes, us={},
                                       err={}, notes=[])
            eager_args = [a.clone() for a in args]
            ref = form(*eager_args)
            fxfuse.counters.clear()
            fxfuse.report.clear()
            for vname in ("eager", "compile", "fused"):
                try:
                    a = [t.clone() for t in args]
                    if M > 1:  # one graph for every M > 1 (M = 1 is specialized anyway): fewer compiles
                        for i in (0, 1, 2, 5, 6):
                            torch._dynamo.mark_dynamic(a[i], 0)
                    fn = {"eager": form, "compile": stock, "fused": fused}[vname]
                    if vname == "eager":
                        out = fn(*a)
                    else:
                        out, inl, nlaunch = _compiled(fn, tuple(a))
                        row[f"{vname}_launches"] = nlaunch
                        if vname == "fused":
                            if fxfuse.report().graphs:  # compiled now (else the graph of a previous M runs)
                                last = dict(fused_kernel_in_code=inl, fused_regions=fxfuse.counters["rope_quant"],
                                            fused_detail=[f.detail for f in fxfuse.report().fusions])
                            row.update(last, fused_recompiled=bool(fxfuse.report().graphs))
                        row["err"][vname] = _err((out,), (ref,))
                        # stock Inductor keeps fp32 between the RoPE products (ulp differences); the fused
                        # kernel rounds like eager, so its cache bytes match but for rare fp8 1-ulp flips
                        row[f"{vname}_cache_mismatch"] = max(
                            float((_cache_bits(x) != _cache_bits(y)).float().mean()) for x, y in zip(a[7:9], eager_args[7:9]))
                    row["us"][vname] = None if dry else bench_us(lambda: fn(*a), rep)
                except Exception as e:  # noqa: BLE001
                    _fail(row, f"cache {scheme} M={M}", vname, e)
            us, sp, f = _finish(row, nbytes, copy_gbps, t0)
            rows.append(row)
            print(f"cache {scheme:24s} M={M:5d} | us eager {f(us.get('eager'))} compile {f(us.get('compile'))} "
                  f"fused {f(us.get('fused'))} | %copy fused {f((row['frac_copy'].get('fused') or 0) * 100)} | "
                  f"x stock {f(sp.get('fused'), 2)} | launches {row.get('fused_launches')}/{row.get('compile_launches')} "
                  f"| {row.get('fused_detail')}", flush=True)
    return rows


def cache_gates(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Like gates(), only for rows where the cache write was fused and the caches matched eager's."""
    ok = [r for r in rows if any("+kv_cache" in d for d in r.get("fused_detail", []))
          and r.get("fused_cache_mismatch", 1.0) < 1e-3]
    return gates(ok)


def cache_dry_problems(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["notes"] or r.get("fused_regions") != 1 or (r["err"].get("fused") or 0) > 0.05
            or not any("+kv_cache" in d for d in r.get("fused_detail", []))
            or r.get("fused_cache_mismatch", 1.0) >= 1e-3]


def main_cache(args: argparse.Namespace) -> None:
    if args.dry_run:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        rows = run_cache([1, 5, 9], 1, 0.0, dev, dry=True)
        bad = cache_dry_problems(rows)
        for r in bad:
            print("[dry-run] problem:", r["scheme"], r["M"], r["notes"], r.get("fused_detail"), r["err"])
        print(f"[dry-run] {len(rows)} cache cases, {len(bad)} problems")
        sys.exit(1 if bad else 0)
    if not torch.cuda.is_available():
        sys.exit("bench_rope_quant --cache: needs a CUDA device (or --dry-run)")
    import triton

    rep = args.rep or 10
    t0 = time.time()
    copy_gbps = copy_bandwidth_gbps(rep)
    print(f"[bench] {torch.cuda.get_device_name()} copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    rows = run_cache([1, 256, 4096], rep, copy_gbps, "cuda", dry=False)
    result = dict(
        family="rope_quant", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), copy_gbps=copy_gbps, rep_ms=rep,
        cache=True, bytes_model="bench_rope_quant.cache_bytes (min HBM read+write)", gate_hidden="head_dim",
        cases=rows, gates=cache_gates(rows), gates_merge=True, problems=len(cache_dry_problems(rows)),
        wall_s=round(time.time() - t0, 1),
    )
    print("gates:", json.dumps(result["gates"]), "problems:", result["problems"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str))
        print(f"[bench] wrote {args.out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="build and run every variant once at tiny size, no timing (CPU ok)")
    ap.add_argument("--rep", type=int, default=None)
    ap.add_argument("--cache", action="store_true", help="RoPE + KV-cache write cases (M in 1, 256, 4096; < 60 s)")
    ap.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                    help=f"model shapes ({', '.join(SHAPES)}); a subset merges its head_dim classes into the gates")
    ap.add_argument("--schemes", default=",".join(SCHEMES),
                    help="a subset re-measures those classes only (gates_merge: write_gates.py keeps the rest)")
    args = ap.parse_args()
    schemes = [s for s in args.schemes.split(",") if s]
    if set(schemes) - set(SCHEMES):
        sys.exit(f"bench_rope_quant: unknown schemes {sorted(set(schemes) - set(SCHEMES))}")
    shapes = [s for s in args.shapes.split(",") if s]
    if set(shapes) - set(SHAPES):
        sys.exit(f"bench_rope_quant: unknown shapes {sorted(set(shapes) - set(SHAPES))}")
    if args.cache:
        main_cache(args)
        return
    if args.dry_run:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        rows = run([1, 5], shapes, list(SCHEMES), 1, 0.0, dev, dry=True)
        bad = [r for r in rows if r["notes"] or r.get("fused_regions") != 1 or (r["err"].get("fused") or 0) > 0.05
               or (r["scheme"] == "rope_qknorm" and not any("+qk_norm" in d for d in r.get("fused_detail", [])))]
        for r in bad:
            print("[dry-run] problem:", r["shape"], r["scheme"], r["M"], r["notes"], r.get("fused_regions"), r["err"])
        print(f"[dry-run] {len(rows)} cases, {len(bad)} problems")
        sys.exit(1 if bad else 0)
    if not torch.cuda.is_available():
        sys.exit("bench_rope_quant: needs a CUDA device (or --dry-run)")
    import triton

    rep = args.rep or (10 if args.quick else 20)
    Ms = [1, 256, 16384] if args.quick else [1, 16, 256, 4096, 16384]
    t0 = time.time()
    copy_gbps = copy_bandwidth_gbps(rep)
    print(f"[bench] {torch.cuda.get_device_name()} copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    rows = run(Ms, shapes, schemes, rep, copy_gbps, "cuda", dry=False)
    result = dict(
        family="rope_quant", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), copy_gbps=copy_gbps, rep_ms=rep,
        quick=args.quick, bytes_model="fxfuse.kernels.rope_quant.bytes_moved (min HBM read+write)",
        gate_hidden="head_dim", cases=rows, summary=summarize(rows), gates=gates(rows),
        gates_merge=set(schemes) != set(SCHEMES) or set(shapes) != set(DEFAULT_SHAPES),
        command="benchmarks/bench_rope_quant.py " + " ".join(sys.argv[1:]),
        wall_s=round(time.time() - t0, 1),
    )
    print(json.dumps(result["summary"], indent=1))
    print("gates:", json.dumps(result["gates"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str))
        print(f"[bench] wrote {args.out}")


if __name__ == "__main__":
    main()
