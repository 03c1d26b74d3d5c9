"""`python -m fxfuse demo`: real transformers decoders, compiled with and without fxfuse.

Why: users judge a compile plugin by whether *their* model gets faster and stays correct, not by a
toy block. The demo builds small decoders from real transformers classes (random weights from a
config, no downloads), compiles each with stock `torch.compile` and with fxfuse, and prints what
fused (`fxfuse.report()`), the numerics against eager and, on CUDA, step latency with CUDA graphs.

Models (`build_models`):
  * `dense_fp8`: LlamaForCausalLM whose decoder linears use fp8 dynamic per-token activation quant
    and fp8 per-row weights (torchao's Float8DynamicActivationFloat8WeightConfig on CUDA sm89+ when
    torchao is importable, else `Fp8Linear` below, written the way torchao quantizes);
  * `moe`: Qwen3MoeForCausalLM (Qwen3-30B-A3B layer shapes on CUDA), bf16.
On CUDA the layers are real size (hidden 4096 / 2048, 2 layers) and the vocabulary is cut to 32000 so
two layers are not dominated by the LM head; on CPU everything is tiny.

Nothing here is expected to fuse: the demo prints whatever `fxfuse.counters` and the report contain.
`--json PATH` writes the same facts (counters per model, numerics, timings) for tests and scripts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
DEMO_VOCAB = 32000


# ----------------------------------------------------------------------------------------------
# fp8 linear (the demo's own; the pass code never sees this class, only the ATen ops it traces to)
# ----------------------------------------------------------------------------------------------


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token (row-wise) fp8 e4m3 quant, written the way torchao's float8 rowwise does."""
    amax = x.abs().amax(dim=-1, keepdim=True).to(torch.float32)
    scale = (amax / FP8_MAX).clamp(min=1e-12)
    q = (x.to(torch.float32) / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


class Fp8Linear(nn.Module):
    """fp8 e4m3 weights with a per-output-row scale, dynamic per-token activation quant.

    CUDA: `torch._scaled_mm` (row-wise scales, bf16 out). CPU: the same quantized values
    dequantized and multiplied in fp32, so CPU numerics match what the GPU computes.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        q, s = quantize_fp8_per_token(weight.detach())
        self.weight = nn.Parameter(q, requires_grad=False)  # [N, K] fp8
        self.weight_scale = nn.Parameter(s.reshape(1, -1).contiguous(), requires_grad=False)  # [1, N] fp32
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.out_dtype = weight.dtype
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Fp8Linear":
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        # quantize in the input's own shape, then flatten (as torchao does): per-token either way
        q, s = quantize_fp8_per_token(x)
        q, s = q.reshape(-1, self.in_features), s.reshape(-1, 1)
        if x.is_cuda:
            y = torch._scaled_mm(
                q, self.weight.t(), scale_a=s, scale_b=self.weight_scale, bias=self.bias, out_dtype=self.out_dtype
            )
        else:
            w = self.weight.to(torch.float32) * self.weight_scale.reshape(-1, 1)
            y = ((q.to(torch.float32) * s) @ w.t()).to(self.out_dtype)
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 per-row"


def _quantizable(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and "lm_head" not in name and "embed" not in name


def swap_fp8_linears(model: nn.Module) -> int:
    """Replace every decoder nn.Linear (not lm_head/embeddings) by `Fp8Linear`; returns the count."""
    targets = [(n, m) for n, m in model.named_modules() if _quantizable(n, m)]
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Fp8Linear.from_linear(lin))  # type: ignore[arg-type]
    return len(targets)


def torchao_fp8_available(device: str) -> bool:
    """torchao's fp8 rowwise path needs torchao and a CUDA GPU with fp8 tensor cores (sm89+)."""
    if device != "cuda" or not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        return False
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_  # noqa: F401
    except Exception:  # noqa: BLE001 - any import problem means "not available"
        return False
    return True


def quantize_fp8(model: nn.Module, device: str, backend: str = "auto") -> str:
    """fp8-quantize the decoder linears; returns the backend used ("torchao" or "fxfuse-demo")."""
    if backend == "torchao" or (backend == "auto" and torchao_fp8_available(device)):
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=lambda m, n: _quantizable(n, m))
        return "torchao"
    swap_fp8_linears(model)
    return "fxfuse-demo"


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------


class LogitsOnly(nn.Module):
    """`input_ids -> logits` without a KV cache: one compiled graph per model, easy to time."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


@dataclass
class DemoModel:
    """One model of the demo and how it was built."""

    name: str
    title: str
    module: nn.Module
    vocab: int
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _finish(model: nn.Module, device: str, dtype: torch.dtype) -> nn.Module:
    model = model.to(device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def dense_config(device: str, quick: bool, layers: int = 2) -> Any:
    """Llama-3-8B layer shapes on CUDA (hidden 4096, GQA 32/8 x 128, MLP 14336); tiny on CPU."""
    from transformers import LlamaConfig

    if device == "cuda":
        kw: dict[str, Any] = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                  num_key_value_heads=8, head_dim=128, vocab_size=DEMO_VOCAB)
    else:
        kw = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, vocab_size=256)
    return LlamaConfig(num_hidden_layers=layers, rms_norm_eps=1e-5, max_position_embeddings=4096,
                       tie_word_embeddings=False, attn_implementation="sdpa", **kw)


def moe_config(device: str, quick: bool, layers: int = 2) -> Any:
    """Qwen3-30B-A3B layer shapes on CUDA (hidden 2048, 128 experts top-8, moe inter 768); tiny on CPU."""
    from transformers import Qwen3MoeConfig

    if device == "cuda":
        kw: dict[str, Any] = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                  num_experts=128, num_experts_per_tok=8, num_attention_heads=32,
                                  num_key_value_heads=4, head_dim=128, vocab_size=DEMO_VOCAB)
    else:
        kw = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
                  num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  vocab_size=256)
    cfg = Qwen3MoeConfig(num_hidden_layers=layers, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                         rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=False,
                         attn_implementation="sdpa", **kw)
    if hasattr(cfg, "_experts_implementation"):
        cfg._experts_implementation = "grouped_mm"  # sort + grouped GEMM: one graph, CUDA-graph safe
    return cfg


def build_dense(device: str, quick: bool, fp8_backend: str = "auto", layers: int = 2, seed: int = 0) -> DemoModel:
    """LlamaForCausalLM with fp8 decoder linears."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dense_config(device, quick, layers)
    with torch.device(device), _default_dtype(torch.bfloat16):
        model = LlamaForCausalLM(cfg)
    model = _finish(model, device, torch.bfloat16)
    backend = quantize_fp8(model, device, fp8_backend)
    h = cfg.hidden_size
    title = f"Llama dense fp8 ({layers} layers, hidden {h}, {backend} fp8 linears)"
    return DemoModel("dense_fp8", title, LogitsOnly(model), cfg.vocab_size, notes=[f"fp8 linears: {backend}"])


def build_moe(device: str, quick: bool, layers: int = 2, seed: int = 0) -> DemoModel:
    """Qwen3MoeForCausalLM in bf16."""
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = moe_config(device, quick, layers)
    with torch.device(device), _default_dtype(torch.bfloat16):
        model = Qwen3MoeForCausalLM(cfg)
    model = _finish(model, device, torch.bfloat16)
    impl = getattr(cfg, "_experts_implementation", None) or "default"
    title = (f"Qwen3-MoE ({layers} layers, hidden {cfg.hidden_size}, {cfg.num_experts} experts top-"
             f"{cfg.num_experts_per_tok}, experts: {impl})")
    return DemoModel("moe", title, LogitsOnly(model), cfg.vocab_size, notes=[f"experts implementation: {impl}"])


def router_config(device: str, quick: bool, layers: int = 1) -> Any:
    """DeepSeek-V3 layer shapes on CUDA (hidden 7168, 256 experts top-8, sigmoid + bias, 8 groups,
    top-4 groups, scale 2.5, MLA); tiny on CPU. One layer on CUDA: 256 experts are 22 GB in bf16."""
    from transformers import DeepseekV3Config

    if device == "cuda":
        kw: dict[str, Any] = dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                                  n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4,
                                  q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, v_head_dim=128,
                                  qk_nope_head_dim=128, num_attention_heads=128, num_key_value_heads=128,
                                  vocab_size=DEMO_VOCAB)
        layers = 1
    else:
        kw = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=16,
                  num_experts_per_tok=4, n_group=4, topk_group=2, q_lora_rank=32, kv_lora_rank=16,
                  qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=256)
    cfg = DeepseekV3Config(num_hidden_layers=layers, first_k_dense_replace=0, n_shared_experts=1,
                           routed_scaling_factor=2.5, norm_topk_prob=True, rms_norm_eps=1e-6,
                           max_position_embeddings=4096, tie_word_embeddings=False, attn_implementation="sdpa", **kw)
    if hasattr(cfg, "_experts_implementation"):
        cfg._experts_implementation = "grouped_mm"
    return cfg


def build_router(device: str, quick: bool, layers: int = 1, seed: int = 0) -> DemoModel:
    """DeepseekV3ForCausalLM in bf16: the grouped sigmoid+bias router (not in the default demo)."""
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    cfg = router_config(device, quick, layers)
    with torch.device(device), _default_dtype(torch.bfloat16):
        model = DeepseekV3ForCausalLM(cfg)
    model = _finish(model, device, torch.bfloat16)
    impl = getattr(cfg, "_experts_implementation", None) or "default"
    title = (f"DeepSeek-V3-style MoE ({cfg.num_hidden_layers} layer(s), hidden {cfg.hidden_size}, "
             f"{cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}, grouped sigmoid router, experts: {impl})")
    return DemoModel("deepseek_router", title, LogitsOnly(model), cfg.vocab_size,
                     notes=[f"experts implementation: {impl}"])


BUILDERS: dict[str, Callable[..., DemoModel]] = {"dense_fp8": build_dense, "moe": build_moe,
                                                 "deepseek_router": build_router}


# ----------------------------------------------------------------------------------------------
# numerics and timing
# ----------------------------------------------------------------------------------------------


def logits_error(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Max over tokens of ||out - ref|| / ||ref|| (fp32), and the fraction of tokens with the same argmax."""
    o = out.float().reshape(-1, out.shape[-1])
    r = ref.float().reshape(-1, ref.shape[-1])
    rel = ((o - r).norm(dim=-1) / r.norm(dim=-1).clamp_min(1e-30)).max().item()
    agree = (o.argmax(-1) == r.argmax(-1)).float().mean().item()
    return {"max_rel_err": float(rel), "argmax_agree": float(agree), "finite": bool(torch.isfinite(o).all().item())}


def bench_cudagraph_us(fn: Callable[[], Any], rep_ms: int = 50) -> float:
    """Median microseconds of fn replayed in a CUDA graph (no launch overhead)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")) * 1e3


def fxfuse_kernel_names() -> set[str]:
    """Names of the Triton kernels defined in fxfuse.kernels.* (what the profiler shows), + "fxfuse"."""
    import fxfuse.kernels  # noqa: F401  the kernel modules must be imported to be found

    names = {"fxfuse"}
    for mod_name, mod in list(sys.modules.items()):
        if not mod_name.startswith("fxfuse.kernels") or mod is None:
            continue
        for obj in vars(mod).values():
            fn = getattr(obj, "fn", obj)  # Autotuner / Heuristics wrap a JITFunction in .fn
            fn = getattr(fn, "fn", fn)
            name = getattr(fn, "__name__", "")
            # launched kernels only (by convention *_kernel): inlined @triton.jit helpers never show up
            if type(obj).__module__.startswith("triton") and "kernel" in name:
                names.add(name)
    return names


def allow_recompiles(limit: int = 64) -> None:
    """Every variant x token count is one more dynamo cache entry on the same forward code; past
    the default limit (8) dynamo silently runs eager, which would time eager as "compiled"."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(limit, getattr(cfg, name)))
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = max(4 * limit, cfg.accumulated_recompile_limit)


def quiet_warnings() -> None:
    """transformers' grouped_mm dispatch calls lru_cached version checks; dynamo warns on each."""
    import warnings

    warnings.filterwarnings("ignore", message=".*functools.lru_cache.*")


def random_ids(vocab: int, tokens: int, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, vocab, (1, tokens), generator=g).to(device)


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------


@dataclass
class ModelResult:
    """What the demo measured for one model (JSON-ready through dataclasses.asdict)."""

    name: str
    title: str
    notes: list[str]
    counters: dict[str, int] = field(default_factory=dict)
    counters_all_graphs: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    fusions: list[dict[str, Any]] = field(default_factory=list)
    near_misses: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    report_text: str = ""
    numerics: dict[str, dict[str, Any]] = field(default_factory=dict)
    compile_s: dict[str, float] = field(default_factory=dict)
    cache: str = "fresh"
    latency_us: dict[str, dict[str, float | None]] = field(default_factory=dict)


class _Progress:
    """A rich spinner while a step runs (on a terminal), then one plain line with its time.

    Results are printed with plain print(): rich would wrap report tables at 80 columns in CI logs.
    """

    def __init__(self, enabled: bool) -> None:
        self.console: Any = None
        if enabled and sys.stdout.isatty():
            try:
                from rich.console import Console

                self.console = Console(highlight=False, soft_wrap=True)
            except Exception:  # noqa: BLE001 - progress is cosmetic
                self.console = None

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        t0 = time.perf_counter()
        if self.console is not None:
            with self.console.status(text + " ..."):
                yield
        else:
            print(f"  {text} ...", flush=True)
            yield
        self.print(f"  {text}: {time.perf_counter() - t0:.1f} s")

    def print(self, text: str = "") -> None:
        print(text, flush=True)

    def rule(self, text: str) -> None:
        if self.console is not None:
            self.console.rule(text)
        else:
            print(f"\n==== {text} " + "=" * max(0, 70 - len(text)), flush=True)


@contextlib.contextmanager
def no_graph_cache() -> Iterator[None]:
    """Turn off the FX graph and AOTAutograd caches (a hit would skip the pass) but keep the
    compiled-kernel caches, so a second demo run does not rebuild every C++/Triton kernel."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        yield


def _compile(module: nn.Module, passes: Any | None) -> Callable[..., Any]:
    options = {"post_grad_custom_pre_pass": passes} if passes is not None else None
    # dynamic=False: decode and prefill each get their own specialized graph, as a server's
    # CUDA-graph batch sizes do; the numerics run compiles the first one.
    return torch.compile(module, dynamic=False, options=options)


def run_model(
    dm: DemoModel,
    device: str,
    *,
    quick: bool,
    check_tokens: int,
    bench_tokens: Sequence[int],
    with_stock: bool,
    rep_ms: int,
    progress: _Progress,
    passes: Any = None,
) -> ModelResult:
    """Compile `dm` with fxfuse (and stock), check numerics vs eager, time on CUDA."""
    import fxfuse

    res = ModelResult(dm.name, dm.title, list(dm.notes))
    ids = random_ids(dm.vocab, check_tokens, device, seed=1)
    with torch.no_grad():
        ref = dm.module(ids)
    start = len(fxfuse.report)
    fxfuse.counters.clear()
    fused = _compile(dm.module, passes if passes is not None else fxfuse.passes)
    with progress.step(f"compile + run with fxfuse ({check_tokens} tokens)"), torch.no_grad():
        t0 = time.perf_counter()
        out = fused(ids)
        res.compile_s["fxfuse"] = time.perf_counter() - t0
    graphs = fxfuse.report.since(start)
    if not graphs:
        res.cache = "hit: the FX graph cache served this graph, so the fxfuse pass did not run"
    res.counters = dict(fxfuse.counters)
    rep = fxfuse.Report(graphs)
    res.fusions = [dataclasses.asdict(f) for f in rep.fusions]
    res.near_misses = rep.near_miss_lines()
    res.errors = rep.errors
    res.report_text = rep.format()
    res.numerics["fxfuse"] = logits_error(out, ref)
    stock = None
    if with_stock:
        stock = _compile(dm.module, None)
        with progress.step(f"compile + run with stock torch.compile ({check_tokens} tokens)"), torch.no_grad():
            t0 = time.perf_counter()
            out_s = stock(ids)
            res.compile_s["stock"] = time.perf_counter() - t0
        res.numerics["stock"] = logits_error(out_s, ref)
        res.numerics["fxfuse_vs_stock"] = logits_error(out, out_s)
    if device == "cuda":
        for m in bench_tokens:
            x = random_ids(dm.vocab, m, device, seed=2 + m)
            row: dict[str, float | None] = {}
            variants: list[tuple[str, Callable[..., Any]]] = [("eager", dm.module)]
            if stock is not None:
                variants.append(("stock", stock))
            variants.append(("fxfuse", fused))
            for vname, fn in variants:
                with progress.step(f"time {vname}, {m} token(s), CUDA graph"), torch.no_grad():
                    try:
                        row[vname] = bench_cudagraph_us(lambda: fn(x), rep_ms)
                    except Exception as e:  # noqa: BLE001 - report and go on with the others
                        row[vname] = None
                        res.errors.append(f"timing {vname} M={m}: {type(e).__name__}: {str(e)[:200]}")
            res.latency_us[str(m)] = row
        # the timing runs compiled more graphs (other token counts): count their fusions too
        res.counters_all_graphs = dict(fxfuse.counters)
    return res


def format_result(res: ModelResult) -> str:
    """Human text for one model: counters, report, numerics, latency."""
    out = [res.title]
    out.extend(f"  note: {n}" for n in res.notes)
    if res.cache != "fresh":
        out.append(f"  cache {res.cache}")
    counters = ", ".join(f"{k}={v}" for k, v in sorted(res.counters.items())) or "no fusions"
    out.append(f"fxfuse.counters: {counters}")
    if res.counters_all_graphs and res.counters_all_graphs != res.counters:
        more = ", ".join(f"{k}={v}" for k, v in sorted(res.counters_all_graphs.items()))
        out.append(f"fxfuse.counters over every graph compiled (incl. the timed token counts): {more}")
    out.append(res.report_text)
    out.append("numerics vs eager (logits):")
    for k, v in res.numerics.items():
        label = {"fxfuse": "torch.compile + fxfuse", "stock": "stock torch.compile",
                 "fxfuse_vs_stock": "fxfuse vs stock"}.get(k, k)
        out.append(f"  {label:24s} max rel err {v['max_rel_err']:.2e}   argmax agree {100 * v['argmax_agree']:.1f}%"
                   + ("" if v["finite"] else "   NON-FINITE VALUES"))
    if res.compile_s:
        out.append("compile + first run: " + ", ".join(f"{k} {v:.1f} s" for k, v in res.compile_s.items())
                   + " (the second reuses kernels the first built; benchmarks/e2e.py measures cold compiles)")
    if res.latency_us:
        out.append("latency per step, CUDA graph replay (median us; no KV cache, 1 sequence):")
        out.append(f"  {'step':>14s} {'eager':>10s} {'stock':>10s} {'fxfuse':>10s}  fxfuse vs stock")
        for m, row in res.latency_us.items():
            step = f"decode {m}" if m == "1" else f"prefill {m}"
            def f(v: float | None) -> str:
                return f"{v:10.1f}" if v else f"{'n/a':>10s}"

            s, x = row.get("stock"), row.get("fxfuse")
            sp = f"{s / x:.3f}x" if s and x else "n/a"
            out.append(f"  {step:>14s} {f(row.get('eager'))} {f(s)} {f(x)}  {sp}")
    return "\n".join(out)


def run(
    *,
    device: str | None = None,
    quick: bool = False,
    models: Sequence[str] = ("dense_fp8", "moe"),
    fp8_backend: str = "auto",
    layers: int = 2,
    json_path: str | None = None,
    fresh_cache: bool = True,
    ungated: bool = False,
    progress: bool = True,
) -> list[ModelResult]:
    """Run the demo; returns one `ModelResult` per model (and prints as it goes)."""
    import fxfuse

    quiet_warnings()
    allow_recompiles()

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    prog = _Progress(progress)
    on_cuda = device == "cuda"
    bench_tokens = [1, 512] if quick else [1, 2048]
    # numerics on the prefill shape: its graph is also timed, so CUDA compiles 2 graphs per variant
    check_tokens = bench_tokens[-1] if on_cuda else 8
    with_stock = on_cuda or not quick  # on CPU --quick, stock compile adds time and no timing
    rep_ms = 20 if quick else 50
    prog.print(f"fxfuse demo on {device}"
               + (f" ({torch.cuda.get_device_name()})" if on_cuda else "")
               + f", torch {torch.__version__}" + (", quick" if quick else ""))
    results: list[ModelResult] = []
    cache_ctx: Any = no_graph_cache() if fresh_cache else contextlib.nullcontext()
    passes = fxfuse.FusionPasses(options={"gate": False}) if ungated else fxfuse.passes
    if ungated and on_cuda:
        prog.print("ungated: rewrites ship even where the benchmark gates (fxfuse/gates.json) would hold them back")
    fxfuse.report.clear()
    with cache_ctx:
        for name in models:
            prog.rule(name)
            kwargs: dict[str, Any] = dict(layers=layers)
            if name == "dense_fp8":
                kwargs["fp8_backend"] = fp8_backend
            with prog.step(f"build {name} (random weights, no download)"):
                dm = BUILDERS[name](device, quick, **kwargs)
            torch._dynamo.reset()
            try:
                res = run_model(dm, device, quick=quick, check_tokens=check_tokens, bench_tokens=bench_tokens,
                                with_stock=with_stock, rep_ms=rep_ms, progress=prog, passes=passes)
            except Exception as e:  # noqa: BLE001 - show it, go on with the next model, exit non-zero
                import traceback

                traceback.print_exc()
                res = ModelResult(dm.name, dm.title, list(dm.notes), error=f"{type(e).__name__}: {e}")
                prog.print(f"{dm.title}: FAILED: {res.error}")
            results.append(res)
            if res.error is None:
                prog.print(format_result(res))
            del dm
            if on_cuda:
                torch.cuda.empty_cache()
    if json_path:
        meta = {"device": device, "torch": torch.__version__, "quick": quick,
                "gpu": torch.cuda.get_device_name() if on_cuda else None}
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "models": [dataclasses.asdict(r) for r in results]}, f, indent=1, default=str)
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="fewer tokens and shorter timing (CI uses this)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    p.add_argument("--models", default="dense_fp8,moe", help="comma list of " + ",".join(BUILDERS))
    p.add_argument("--fp8", choices=["auto", "torchao", "own"], default="auto",
                   help="fp8 linears of the dense model: torchao (CUDA sm89+), the demo's own module, or auto")
    p.add_argument("--layers", type=int, default=2, help="decoder layers per model (2-4)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")
    p.add_argument("--ungated", action="store_true",
                   help="fxfuse with gate=False: on CUDA, also rewrites not (yet) measured faster than stock")
    p.add_argument("--use-cache", action="store_true", help="keep the FX graph cache (a hit skips the pass)")


def main_from_args(args: argparse.Namespace) -> int:
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(BUILDERS))
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {sorted(BUILDERS)}")
    backend = {"own": "fxfuse-demo"}.get(args.fp8, args.fp8)
    results = run(device=args.device, quick=args.quick, models=models, fp8_backend=backend, layers=args.layers,
                  json_path=args.json, fresh_cache=not args.use_cache, ungated=args.ungated)
    bad = [r.name for r in results if r.error or any(not v["finite"] for v in r.numerics.values())]
    if bad:
        print(f"failed or non-finite logits: {bad}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fxfuse demo", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return main_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
