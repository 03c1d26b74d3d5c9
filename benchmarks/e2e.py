"""End-to-end: whole transformers decoders, eager vs stock torch.compile vs torch.compile + fxfuse.

Why: a fused kernel that wins in isolation must also win where users see it, in a model step.
Models come from fxfuse/demo.py (real transformers classes, random weights, no download):
  * dense_fp8: LlamaForCausalLM, Llama-3-8B layer shapes, fp8 linears (torchao row-wise on sm89+
    when importable, else the demo's own Fp8Linear), 2 layers, vocab 32000;
  * moe: Qwen3MoeForCausalLM, Qwen3-30B-A3B layer shapes (hidden 2048, 128 experts top-8, moe
    inter 768), grouped_mm experts, bf16, 2 layers, vocab 32000;
  * deepseek_router (only with --models): DeepseekV3ForCausalLM, DeepSeek-V3 layer shapes (256 experts,
    grouped sigmoid+bias router, MLA), 1 layer (22 GB of experts), bf16.
Steps: decode M = 1, 8, 64 (M sequences x 1 token) and prefill M = 2048 (1 sequence x 2048 tokens),
no KV cache (attention sees only the step's own tokens; the layers' GEMMs, norms, quant and MoE are
those of a real step).

Variants (every one timed as CUDA-graph replay, triton.testing.do_bench_cudagraph, median; after all of a
step's variants compiled, they are timed round-robin `--rounds` times and each gets its median of rounds,
so a drift in clocks or temperature shifts them alike; `us_rounds` keeps every round):
  eager; compile (stock torch.compile, default mode, captured in a CUDA graph);
  compile_max_autotune (mode "max-autotune-no-cudagraphs", captured the same way; off with --quick
    unless --max-autotune: it autotunes GEMMs for every step shape, not cheap next to a quick sweep);
  fxfuse (torch.compile + fxfuse.passes, gated as users get it; --ungated: gate=False).
Also: tokens/s, logits error vs eager, compile time (first call, FX graph cache off; the first
step of each model compiles every variant in a fresh cache dir, so those are cold and comparable) with and
without fxfuse and the fxfuse stages' own time from the report, the share of the fxfuse step's GPU
time spent in fxfuse kernels (torch.profiler), the fusions and near misses per model.

Usage:  python benchmarks/e2e.py --out benchmarks/results/e2e.json [--quick] [--models dense_fp8,moe]
        python benchmarks/e2e.py --dry-run --out /tmp/e2e_dry.json     # CPU, tiny, no timing
Plot:   python benchmarks/plot_e2e.py benchmarks/results/e2e.json benchmarks/results/e2e.png
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import functools
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch._inductor.utils import fresh_cache

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import fxfuse  # noqa: E402
from fxfuse import demo  # noqa: E402

DECODE = [1, 8, 64]
PREFILL = [2048]


@dataclasses.dataclass(frozen=True)
class Step:
    """One timed step: `batch` sequences of `seq` new tokens (M = batch * seq)."""

    kind: str  # "decode" | "prefill"
    batch: int
    seq: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def steps(decode: list[int], prefill: list[int]) -> list[Step]:
    return [Step("decode", m, 1) for m in decode] + [Step("prefill", 1, m) for m in prefill]


# ----------------------------------------------------------------------------------------------
# measurement helpers
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def cold_graph_cache() -> Iterator[None]:
    """FX graph + AOTAutograd caches off: every compile runs the passes (kernel caches stay)."""
    with demo.no_graph_cache():
        yield


def bench_us(fn: Callable[[], Any], rep: int) -> float:
    return demo.bench_cudagraph_us(fn, rep)


def interleaved_us(fns: dict[str, Callable[[], Any]], rounds: int, time_one: Callable[[Callable[[], Any]], float]
                   ) -> tuple[dict[str, list[float]], dict[str, Exception]]:
    """Each variant timed `rounds` times round-robin (A B C, A B C, ...), so a clock or thermal drift
    during the run shifts every variant alike instead of whichever was timed last; a 1% difference
    can then be read against the rounds' spread. A variant that raises leaves the later rounds."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    errors: dict[str, Exception] = {}
    for _ in range(max(1, rounds)):
        for k, fn in fns.items():
            if k in errors:
                continue
            try:
                samples[k].append(time_one(fn))
            except Exception as e:  # noqa: BLE001 - recorded by the caller
                errors[k] = e
    return {k: v for k, v in samples.items() if k not in errors}, errors


def copy_bandwidth_gbps(rep: int) -> float:
    """Device-to-device copy of a 1 GiB tensor; bytes read + written (the memory roofline)."""
    n = (1 << 30) // 2
    a = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    us = bench_us(lambda: b.copy_(a), rep)
    del a, b
    return 2 * n * 2 / (us * 1e-6) / 1e9


TOP_KERNELS = 0  # --top: kernels listed per profiled step


def profile_share(fn: Callable[[], Any], device: str, iters: int = 5, top: int = 0) -> dict[str, Any]:
    """GPU kernel time of `iters` calls, split into fxfuse kernels vs the rest (torch.profiler);
    `top` > 0 also lists the `top` costliest kernels (us per call), to see where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    with profile(activities=acts) as prof:
        for _ in range(iters):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    names = demo.fxfuse_kernel_names()
    total = ours = 0.0
    per: dict[str, float] = {}
    every: dict[str, float] = {}
    count: dict[str, int] = {}  # launches per kernel name: a step with more launches pays more gaps in a graph
    for ev in prof.events():
        if str(getattr(ev, "device_type", "")).split(".")[-1] != "CUDA":
            continue
        t = float(ev.time_range.elapsed_us())  # a device event: its own kernel time
        total += t
        every[ev.name] = every.get(ev.name, 0.0) + t
        count[ev.name] = count.get(ev.name, 0) + 1
        if any(n in ev.name for n in names):
            ours += t
            per[ev.name] = per.get(ev.name, 0.0) + t
    ranked = [k for k, _ in sorted(every.items(), key=lambda kv: -kv[1])[:top]]
    return {
        "kernel_us_per_step": total / iters if total else None,
        "fxfuse_us_per_step": ours / iters if total else None,
        "fxfuse_share": ours / total if total else None,
        "fxfuse_kernels": {k: v / iters for k, v in sorted(per.items())},
        "launches_per_step": sum(count.values()) / iters,
        **({"top_kernels": [[k[:120], round(every[k] / iters, 2)] for k in ranked],
            "top_launches": [[k[:120], count[k] / iters] for k in ranked]} if top else {}),
    }


def _dynamo_graphs() -> int:
    """Graphs dynamo compiled so far (a compiled variant that adds none for a new shape ran eager)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _pass_seconds(graphs: list[Any]) -> float:
    return sum(t.seconds for g in graphs for t in g.timings)


# ----------------------------------------------------------------------------------------------
# the sweep
# ----------------------------------------------------------------------------------------------


def variants(quick: bool, ungated: bool, dry_run: bool, max_autotune: bool = False,
             without: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """name -> torch.compile kwargs (None: eager). max-autotune runs without --quick or with
    --max-autotune: its GEMM autotuning per step shape costs more than the whole quick sweep.
    `without` adds one "fxfuse_no_<family>" variant per family (in-model leave-one-out)."""
    passes = fxfuse.FusionPasses(options={"gate": False}) if ungated else fxfuse.passes
    v: dict[str, dict[str, Any]] = {
        "eager": {},
        "compile": {"dynamic": False},
        "fxfuse": {"dynamic": False, "options": {"post_grad_custom_pre_pass": passes}},
    }
    for fam in without:
        p = fxfuse.FusionPasses(disable=[fam], options={"gate": not ungated})
        v[f"fxfuse_no_{fam}"] = {"dynamic": False, "options": {"post_grad_custom_pre_pass": p}}
    if not quick or max_autotune:
        v["compile_max_autotune"] = {"dynamic": False, "mode": "max-autotune-no-cudagraphs"}
    if dry_run:
        v.pop("compile_max_autotune", None)  # CPU max-autotune benchmarks C++ GEMM templates: slow, no value here
    return v


def run_model(
    name: str, device: str, step_list: list[Step], variant_kw: dict[str, dict[str, Any]], rep: int,
    dry_run: bool, layers: int, fp8_backend: str, profile_iters: int, emit: Callable[[dict[str, Any]], None],
    rounds: int = 1,
) -> dict[str, Any]:
    """All steps x variants for one model; `emit(row)` is called after each step (partial results)."""
    kwargs: dict[str, Any] = {"layers": layers}
    if name == "dense_fp8":
        kwargs["fp8_backend"] = fp8_backend
    t0 = time.perf_counter()
    dm = demo.BUILDERS[name](device, False, **kwargs)
    cfg = getattr(getattr(dm.module, "model", dm.module), "config", None)  # LogitsOnly wraps the transformers model
    head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // cfg.num_attention_heads if cfg else None)
    info: dict[str, Any] = {"model": name, "title": dm.title, "notes": dm.notes, "layers": layers, "head_dim": head_dim,
                            "build_s": round(time.perf_counter() - t0, 2), "rows": [], "compile_s": {},
                            "fxfuse_pass_s": 0.0}
    # warm dynamo's tracing of this model (first-time source/bytecode work) so the first timed
    # compile does not pay it alone: the cold compile times of the variants stay comparable
    with torch.no_grad():
        warm_ids = demo.random_ids(dm.vocab, step_list[0].tokens, device, seed=0).reshape(step_list[0].batch, -1)
        torch.compile(dm.module, backend="eager", dynamic=False)(warm_ids)
    torch._dynamo.reset()
    fxfuse.counters.clear()
    start = len(fxfuse.report)
    compiled: dict[str, Callable[..., Any]] = {}
    for vname, kw in variant_kw.items():
        compiled[vname] = dm.module if vname == "eager" else torch.compile(dm.module, **kw)
    for i, st in enumerate(step_list):
        # the first step compiles each variant in its own fresh cache dir: equal, cold compile times
        cold = i == 0
        ids = demo.random_ids(dm.vocab, st.tokens, device, seed=7 + st.tokens).reshape(st.batch, st.seq)
        row: dict[str, Any] = {"model": name, "kind": st.kind, "batch": st.batch, "seq": st.seq, "M": st.tokens,
                               "us": {}, "tokens_per_s": {}, "compile_s": {}, "err": {}, "notes": [],
                               "us_rounds": {}}
        timed: dict[str, Callable[[], Any]] = {}
        with torch.no_grad():
            ref = dm.module(ids)
            for vname, fn in compiled.items():
                try:
                    g0 = len(fxfuse.report)
                    fresh = fresh_cache() if cold and vname != "eager" else contextlib.nullcontext()
                    graphs0 = _dynamo_graphs()
                    with fresh:
                        t1 = time.perf_counter()
                        out = fn(ids)
                        if device == "cuda":
                            torch.cuda.synchronize()
                        row["compile_s"][vname] = round(time.perf_counter() - t1, 3)
                    if vname != "eager" and _dynamo_graphs() == graphs0:
                        row["notes"].append(f"{vname}: dynamo compiled no new graph for this shape (eager fallback?)")
                    if vname == "fxfuse":
                        row["fxfuse_pass_s"] = round(_pass_seconds(fxfuse.report.since(g0)), 4)
                    if vname != "eager":
                        row["err"][vname] = demo.logits_error(out, ref)
                    if not dry_run:
                        timed[vname] = functools.partial(fn, ids)
                except Exception as e:  # noqa: BLE001 - record and go on
                    msg = f"{vname}: {type(e).__name__}: {str(e)[:300]}"
                    row["notes"].append(msg)
                    row["us"].setdefault(vname, None)
                    print(f"[e2e] {name} {st.kind} M={st.tokens} {msg}", flush=True)
                    traceback.print_exc(limit=3)
            samples, errors = interleaved_us(timed, rounds, lambda f: bench_us(f, rep))
            for vname, xs in samples.items():
                us = statistics.median(xs)
                row["us"][vname] = us
                row["us_rounds"][vname] = [round(x, 2) for x in xs]
                row["tokens_per_s"][vname] = st.tokens / (us * 1e-6)
            for vname, e in errors.items():
                row["notes"].append(f"{vname}: timing: {type(e).__name__}: {str(e)[:300]}")
                row["us"][vname] = None
            if "fxfuse" in compiled and profile_iters > 0:
                try:
                    row["profile"] = profile_share(lambda: compiled["fxfuse"](ids), device, profile_iters, TOP_KERNELS)
                    if TOP_KERNELS and "compile" in compiled:  # the stock step's costliest kernels, to compare
                        row["profile_compile"] = profile_share(lambda: compiled["compile"](ids), device, profile_iters,
                                                               TOP_KERNELS)
                except Exception as e:  # noqa: BLE001
                    row["notes"].append(f"profile: {type(e).__name__}: {e}")
        base = row["us"].get("compile")
        row["speedup_vs_compile"] = {k: (base / v if base and v else None) for k, v in row["us"].items()}
        row["compile_cold"] = cold
        s, f = row["compile_s"].get("compile"), row["compile_s"].get("fxfuse")
        row["compile_overhead"] = (f / s - 1.0) if s and f and cold else None
        row["fxfuse_pass_share_of_compile"] = (row.get("fxfuse_pass_s", 0.0) / s) if s else None
        info["rows"].append(row)
        emit(info)
        print(_fmt_row(row), flush=True)
        del ids, ref
    graphs = fxfuse.report.since(start)
    rep_ = fxfuse.Report(graphs)
    info["counters"] = dict(fxfuse.counters)
    info["fusions"] = [{"name": f.name, "locations": f.locations, "kernel": f.kernel} for f in rep_.fusions]
    info["near_misses"] = rep_.near_miss_lines()
    info["errors"] = rep_.errors
    info["fxfuse_pass_s"] = round(_pass_seconds(graphs), 4)
    emit(info)
    del compiled, dm
    torch._dynamo.reset()
    if device == "cuda":
        torch.cuda.empty_cache()
    return info


def _f(v: Optional[float], w: int = 9, p: int = 1) -> str:
    return f"{v:{w}.{p}f}" if v is not None else f"{'n/a':>{w}s}"


def _fmt_row(r: dict[str, Any]) -> str:
    us, sp = r["us"], r["speedup_vs_compile"]
    prof = r.get("profile") or {}
    share = prof.get("fxfuse_share")
    cols = " ".join(f"{k} {_f(v)}" for k, v in us.items())
    return (f"{r['model']:9s} {r['kind']:7s} M={r['M']:5d} | us {cols} | fxfuse x stock {_f(sp.get('fxfuse'), 5, 3)}"
            f" | compile s stock {_f(r['compile_s'].get('compile'), 5, 1)} fxfuse {_f(r['compile_s'].get('fxfuse'), 5, 1)}"
            f" | fxfuse kernels {'n/a' if share is None else f'{100 * share:.1f}%'}"
            f" | launches stock {(r.get('profile_compile') or {}).get('launches_per_step', 'n/a')} fxfuse {prof.get('launches_per_step', 'n/a')}")


def summarize(models: list[dict[str, Any]]) -> dict[str, Any]:
    """Headline numbers against the issue's targets (speedups are stock-compile time / fxfuse time)."""

    def geo(xs: list[float]) -> Optional[float]:
        xs = [x for x in xs if x]
        return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None

    s: dict[str, Any] = {}
    for m in models:
        rows = m["rows"]
        for kind in ("decode", "prefill"):
            sp = [r["speedup_vs_compile"].get("fxfuse") for r in rows if r["kind"] == kind]
            s[f"{m['model']}_{kind}_geomean_fxfuse_vs_compile"] = geo([x for x in sp if x])
            s[f"{m['model']}_{kind}_min_fxfuse_vs_compile"] = min([x for x in sp if x], default=None)
        ov = [r["compile_overhead"] for r in rows if r.get("compile_overhead") is not None]
        s[f"{m['model']}_max_compile_overhead"] = max(ov, default=None)
        ps = [r["fxfuse_pass_share_of_compile"] for r in rows if r.get("fxfuse_pass_share_of_compile") is not None]
        s[f"{m['model']}_max_fxfuse_pass_share_of_compile"] = max(ps, default=None)
        errs = [r["err"].get("fxfuse", {}).get("max_rel_err") for r in rows]
        s[f"{m['model']}_max_logits_rel_err_fxfuse"] = max([e for e in errs if e is not None], default=None)
        s[f"{m['model']}_counters"] = m.get("counters")
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="write JSON results here (also after every step)")
    ap.add_argument("--quick", action="store_true", help="no max-autotune variant, shorter reps")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny models, every step compiled and run once, no timing")
    ap.add_argument("--models", default="dense_fp8,moe", help="comma list of " + ",".join(demo.BUILDERS))
    ap.add_argument("--decode", default=",".join(map(str, DECODE)), help="decode token counts")
    ap.add_argument("--prefill", default=",".join(map(str, PREFILL)), help="prefill token counts")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--fp8", choices=["auto", "torchao", "own"], default="auto")
    ap.add_argument("--ungated", action="store_true", help="fxfuse with gate=False (every rewrite ships)")
    ap.add_argument("--without", default="", help="comma list of families: also time fxfuse without each (leave-one-out)")
    ap.add_argument("--max-autotune", action="store_true",
                    help="also stock torch.compile mode max-autotune-no-cudagraphs with --quick (slow: GEMM autotuning)")
    ap.add_argument("--rep", type=int, default=None, help="do_bench_cudagraph rep (ms), per round")
    ap.add_argument("--rounds", type=int, default=3,
                    help="time the variants round-robin this many times; each variant's median of rounds")
    ap.add_argument("--profile-iters", type=int, default=5)
    ap.add_argument("--top", type=int, default=0, help="also list the N costliest kernels of the fxfuse and stock steps")
    args = ap.parse_args()

    demo.quiet_warnings()
    demo.allow_recompiles()
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("e2e: needs a CUDA device (or --dry-run on CPU)")
    models = [m for m in args.models.split(",") if m]
    decode = [int(x) for x in args.decode.split(",") if x]
    prefill = [int(x) for x in args.prefill.split(",") if x]
    if args.dry_run:
        decode, prefill = decode[:1], [16]
    rep = args.rep or (20 if args.quick else 50)
    var = variants(args.quick, args.ungated, args.dry_run, args.max_autotune,
                   tuple(f for f in args.without.split(",") if f))
    fp8_backend = {"own": "fxfuse-demo"}.get(args.fp8, args.fp8)
    result: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "device": device, "dry_run": args.dry_run, "quick": args.quick,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "variants": {k: {kk: str(vv) for kk, vv in v.items()} for k, v in var.items()},
        "ungated": args.ungated, "rep_ms": rep, "rounds": args.rounds, "models": [],
        "command": "benchmarks/e2e.py " + " ".join(sys.argv[1:]),
        "method": "no KV cache; decode = M sequences x 1 token, prefill = 1 x M; CUDA-graph replay median "
                  "(triton.testing.do_bench_cudagraph), variants timed round-robin, median of rounds; compile_s = first call with the FX graph cache off; "
                  "rows with compile_cold compiled each variant in a fresh cache dir (compile_overhead only there)",
    }
    try:
        import transformers
        import triton

        result["transformers"] = transformers.__version__
        result["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        pass
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        args.out.write_text(json.dumps(result, indent=1, default=str))

    global TOP_KERNELS
    TOP_KERNELS = args.top
    t0 = time.time()
    if device == "cuda":
        result["copy_gbps"] = copy_bandwidth_gbps(rep)
        print(f"[e2e] {result['gpu']} copy bandwidth {result['copy_gbps']:.0f} GB/s", flush=True)
    with cold_graph_cache():
        # pay the process-wide first-compile costs (imports, compile workers) before timing any compile
        with fresh_cache():
            torch.compile(lambda x: (x.sin() + 1).sum())(torch.randn(64, device=device))
        for name in models:
            slot = len(result["models"])
            result["models"].append({"model": name, "rows": []})

            def emit(info: dict[str, Any], slot: int = slot) -> None:
                result["models"][slot] = info
                write()

            try:
                run_model(name, device, steps(decode, prefill), var, rep, args.dry_run, args.layers, fp8_backend,
                          args.profile_iters, emit, rounds=args.rounds)
            except Exception as e:  # noqa: BLE001 - one model failing must not lose the other
                result["models"][slot]["error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            m = result["models"][slot]
            print(f"[e2e] {name}: counters {m.get('counters')} near misses {len(m.get('near_misses', []))}", flush=True)
    result["summary"] = summarize([m for m in result["models"] if m.get("rows")])
    result["wall_s"] = round(time.time() - t0, 1)
    write()
    for k, v in result["summary"].items():
        print(f"{k:48s} {v}")
    print(f"[e2e] wrote {args.out} ({result['wall_s']} s)")


if __name__ == "__main__":
    main()
