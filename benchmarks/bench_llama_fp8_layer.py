"""A transformers LlamaDecoderLayer quantized to fp8 (torchao's Float8DynamicActivationFloat8Weight,
row-wise and per-tensor), stock torch.compile vs torch.compile + fxfuse, with CUDA graphs.

Per (granularity, tokens): fxfuse counters and near misses, output error of each compiled layer
vs eager, median layer time (do_bench_cudagraph) for stock and fxfuse, speedup. Layer: hidden
4096, intermediate 14336, 32 query / 8 kv heads (Llama-3-8B shapes), bf16, sdpa attention.

torchao is used when importable (`--quantizer torchao|fallback|auto`); the fallback quantizes
each linear's input like torchao does (tests/fp8_linear.py's form) and runs torch._scaled_mm.

The JSON is rewritten after every (scheme, tokens) row, so a run stopped by a timeout keeps the
rows it finished (`complete: false`, `running` names the case it was in).

Usage:  python benchmarks/bench_llama_fp8_layer.py --out X.json [--quick] [--dry-run]
            [--schemes row,tensor] [--tokens 1,16,256,4096]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks", REPO / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_rmsnorm_quant import bench_us  # noqa: E402
from fp8_linear import FP8, FP8_MAX, quantize_input  # noqa: E402

BF16 = torch.bfloat16


class ScaledMMLinear(torch.nn.Module):
    """Fallback fp8 linear for CUDA: torchao-style input quant + torch._scaled_mm."""

    def __init__(self, linear: torch.nn.Linear, granularity: str) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        if granularity == "row":
            ws = (w.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)  # [N, 1]
        else:
            ws = (w.abs().amax() / FP8_MAX).clamp(min=1e-12).reshape(())
        self.register_buffer("w_q", (w / ws).clamp(-FP8_MAX, FP8_MAX).to(FP8))
        self.register_buffer("w_scale", ws.reshape(1, -1) if granularity == "row" else ws)
        self.granularity = granularity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, s = quantize_input(x, self.granularity)
        lead = x.shape[:-1]
        q2 = q.reshape(-1, x.shape[-1])
        s2 = s.reshape(-1, 1) if self.granularity == "row" else s.reshape(())
        y = torch._scaled_mm(q2, self.w_q.t(), scale_a=s2, scale_b=self.w_scale, out_dtype=x.dtype)
        return y.reshape(*lead, -1)


def quantize_layer(layer: torch.nn.Module, granularity: str, quantizer: str, dev: str) -> str:
    """Quantize every linear in place; returns which quantizer was used."""
    if quantizer in ("auto", "torchao") and dev == "cuda":
        try:
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

            gran = PerRow() if granularity == "row" else PerTensor()
            quantize_(layer, Float8DynamicActivationFloat8WeightConfig(granularity=gran))
            import torchao

            return f"torchao {torchao.__version__}"
        except Exception as e:  # noqa: BLE001
            if quantizer == "torchao":
                raise
            print(f"[bench] torchao unavailable ({type(e).__name__}: {e}); fallback fp8 linear", flush=True)
    if dev == "cuda":
        cls = ScaledMMLinear
    else:
        from fp8_linear import Fp8Linear as cls  # noqa: N813 - CPU dry run: dequantized matmul
    _swap(layer, lambda lin: cls(lin, granularity))
    return "fallback " + cls.__name__


def _swap(module: torch.nn.Module, make: Any) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, make(child))
        else:
            _swap(child, make)


def build(granularity: str, quantizer: str, dev: str, tiny: bool) -> tuple[torch.nn.Module, Any, str]:
    import transformers
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    if tiny:
        dims = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    else:
        dims = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=128)
    cfg = transformers.LlamaConfig(**dims, rms_norm_eps=1e-5, vocab_size=128, max_position_embeddings=8192)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(dev):
        layer = LlamaDecoderLayer(cfg, layer_idx=0).to(BF16).eval()
        rope = LlamaRotaryEmbedding(cfg)
    with torch.no_grad():
        for mod in layer.modules():
            if type(mod).__name__.endswith("RMSNorm"):
                mod.weight.copy_(1.0 + 0.1 * torch.randn_like(mod.weight))
    used = quantize_layer(layer, granularity, quantizer, dev)
    return layer, rope, used


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


SCHEMES = ("row", "tensor")


def default_tokens(dry: bool, quick: bool) -> list[int]:
    return [1, 9] if dry else ([1, 256, 4096] if quick else [1, 16, 256, 4096])


def run(args: argparse.Namespace, on_progress: Any = None) -> dict[str, Any]:
    """Every (scheme, tokens) case; `on_progress(doc)` gets the partial result after each row
    (and with `running` set before each case), so the caller can write it out."""
    import fxfuse

    dry = args.dry_run
    dev = "cpu" if dry else "cuda"
    tokens = args.tokens or default_tokens(dry, args.quick)
    rep = args.rep or (10 if args.quick else 25)
    passes = fxfuse.FusionPasses(options={"gate": not args.ungated})
    torch._inductor.config.fx_graph_cache = False
    rows: list[dict[str, Any]] = []
    quantizers: dict[str, str] = {}
    doc: dict[str, Any] = dict(cases=rows, quantizers=quantizers, running=None)
    for gran in args.schemes:
        layer, rope, used = build(gran, args.quantizer, dev, tiny=dry)
        quantizers[gran] = used
        for T in tokens:
            t0 = time.time()
            doc["running"] = dict(granularity=gran, tokens=T, phases=[])

            def phase(name: str, t0: float = t0) -> None:
                """Mark where the case is, with seconds since it began: a timeout shows the stalled step."""
                doc["running"]["phases"].append([name, round(time.time() - t0, 1)])
                print(f"[layer] {gran} T={T}: {name} at {time.time() - t0:.1f} s", flush=True)
                if on_progress:
                    on_progress(doc)

            if on_progress:
                on_progress(doc)
            H = layer.hidden_size if hasattr(layer, "hidden_size") else layer.input_layernorm.weight.shape[0]
            x = torch.randn(1, T, H, device=dev, dtype=BF16)
            cos, sin = rope(x, torch.arange(T, device=dev)[None])

            def fn(x, cos, sin):
                return layer(x, position_embeddings=(cos, sin))

            row: dict[str, Any] = dict(granularity=gran, tokens=T, quantizer=used, us={}, err={}, notes=[])
            try:
                with torch.no_grad():
                    phase("eager")
                    ref = fn(x, cos, sin)
                    torch._dynamo.reset()
                    phase("stock compile")
                    stock = torch.compile(fn, dynamic=False)
                    out_s = stock(x, cos, sin)
                    torch._dynamo.reset()
                    phase("fxfuse compile")
                    fxfuse.counters.clear()
                    fxfuse.report.clear()
                    fused = torch.compile(fn, dynamic=False, options={"post_grad_custom_pre_pass": passes})
                    out_f = fused(x, cos, sin)
                    row["counters"] = dict(fxfuse.counters)
                    row["fusions"] = [f"{f.name}: {f.detail}" for f in fxfuse.report().fusions]
                    row["near_misses"] = sorted({f"{m.family}: {m.reason}" for m in fxfuse.report().near_misses})
                    row["err"] = {"compile": _rel(out_s, ref), "fused": _rel(out_f, ref)}
                    if not dry:
                        phase("timing")
                        row["us"]["compile"] = bench_us(lambda: stock(x, cos, sin), rep)
                        row["us"]["fused"] = bench_us(lambda: fused(x, cos, sin), rep)
                        row["speedup_vs_compile"] = row["us"]["compile"] / row["us"]["fused"]
                        if T in args.profile:  # where the layer's kernel time goes, stock vs fused
                            from e2e import profile_share

                            row["profile"] = {k: profile_share(lambda f=f: f(x, cos, sin), dev, iters=3, top=20)
                                              for k, f in (("compile", stock), ("fused", fused))}
            except Exception as e:  # noqa: BLE001 - record and continue
                row["notes"].append(f"{type(e).__name__}: {str(e)[:400]}")
                traceback.print_exc(limit=6)
            row["wall_s"] = round(time.time() - t0, 1)
            rows.append(row)
            doc["running"] = None
            if on_progress:
                on_progress(doc)
            print(f"[layer] {gran:6s} T={T:5d} counters={row.get('counters')} err={row['err']} "
                  f"us={row['us']} x{row.get('speedup_vs_compile')}", flush=True)
            for nm in row.get("near_misses", []):
                print(f"          near miss: {nm}", flush=True)
        del layer
    return doc


def _int_list(text: str) -> list[int]:
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or any(t <= 0 for t in out):
        raise argparse.ArgumentTypeError(f"expected positive token counts, got {text!r}")
    return out


def _schemes(text: str) -> list[str]:
    out = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in out if t not in SCHEMES]
    if not out or bad:
        raise argparse.ArgumentTypeError(f"schemes are a comma-separated subset of {','.join(SCHEMES)}, got {text!r}")
    return out


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write atomically (temp file + rename): a kill mid-write leaves the previous version."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny layer, no timing")
    ap.add_argument("--rep", type=int, default=None)
    ap.add_argument("--schemes", "--granularity", dest="schemes", type=_schemes, default=list(SCHEMES),
                    help="torchao scaling schemes to run, comma-separated (row = per-row, tensor = per-tensor)")
    ap.add_argument("--tokens", type=_int_list, default=None,
                    help="token counts, comma-separated (default 1,16,256,4096; --quick 1,256,4096; --dry-run 1,9)")
    ap.add_argument("--quantizer", default="auto", choices=["auto", "torchao", "fallback"])
    ap.add_argument("--ungated", action="store_true", help="ignore fxfuse/gates.json (measure every fusion)")
    ap.add_argument("--profile", type=_int_list, default=[],
                    help="token counts whose stock and fused layers are also profiled (top kernels, us per call)")
    ap.add_argument("--stall-dump", type=float, default=0,
                    help="print every thread's Python stack every this many seconds (finds where a compile stalls)")
    args = ap.parse_args()
    if args.stall_dump > 0:
        import faulthandler

        faulthandler.dump_traceback_later(args.stall_dump, repeat=True, file=sys.stderr)
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("bench_llama_fp8_layer: needs a CUDA device (or --dry-run)")
    t0 = time.time()
    head = dict(
        gpu="cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(), torch=torch.__version__,
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), ungated=args.ungated,
        schemes=args.schemes, tokens=args.tokens or default_tokens(args.dry_run, args.quick),
        command="python3 benchmarks/bench_llama_fp8_layer.py " + " ".join(sys.argv[1:]),
    )

    def progress(doc: dict[str, Any], complete: bool = False) -> None:
        if args.out:
            write_json(args.out, dict(head, **doc, complete=complete, wall_s=round(time.time() - t0, 1)))

    res = run(args, progress)
    progress(res, complete=True)
    if args.out:
        print(f"[bench] wrote {args.out}")


if __name__ == "__main__":
    main()
