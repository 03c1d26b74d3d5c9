"""Real transformers decoder layers (Llama, Qwen3), tiny random configs, with every linear
quantizing its own input like torchao's float8 dynamic activation quant: both norms fuse with
the quantizations that read them (q/k/v share one, gate/up share one), the SwiGLU product fuses
with down_proj's input quant, Qwen3's per-head q_norm/k_norm stay untouched, and the output is
as close to eager as stock torch.compile's."""

from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import fresh_cache

import fxfuse
from fp8_linear import quantize_linears

transformers = pytest.importorskip("transformers")

BF16 = torch.bfloat16


def _layer(kind: str, granularity: str, flatten: bool = False):
    common = dict(
        hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        rms_norm_eps=1e-6, vocab_size=64, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    if kind == "llama":
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer as Layer, LlamaRotaryEmbedding as Rope
        cfg = transformers.LlamaConfig(**common)
    else:
        from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer as Layer, Qwen3RotaryEmbedding as Rope
        cfg = transformers.Qwen3Config(**common)
    cfg._attn_implementation = "sdpa"
    layer = Layer(cfg, layer_idx=0)
    with torch.no_grad():  # random norm weights, so a wrong weight read shows
        for mod in layer.modules():
            if type(mod).__name__.endswith("RMSNorm"):
                mod.weight.copy_(1.0 + 0.2 * torch.randn_like(mod.weight))
    layer = quantize_linears(layer, granularity, flatten).to(BF16).eval()
    return layer, Rope(cfg)


def _inputs(rope, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, seq, 128, generator=g).to(BF16)
    pos = torch.arange(seq)[None]
    cos, sin = rope(x, pos)
    return x, cos.to(BF16), sin.to(BF16)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _run(layer, args, passes):
    torch._dynamo.reset()
    fxfuse.counters.clear()
    fxfuse.report.clear()

    def fn(x, cos, sin):
        return layer(x, position_embeddings=(cos, sin))

    opts = {} if passes is None else {"options": {"post_grad_custom_pre_pass": passes}}
    with fresh_cache(), torch.no_grad():
        return torch.compile(fn, fullgraph=True, **opts)(*args)


@pytest.mark.parametrize("kind", ["llama", "qwen3", "llama_flatten"])
def test_rowwise_layer_fuses(kind):
    """`llama_flatten`: each linear flattens [B, T, K] to [B*T, K] before its quant."""
    flatten = kind.endswith("_flatten")
    kind = kind.removesuffix("_flatten")
    layer, rope = _layer(kind, "row", flatten)
    args = _inputs(rope, 9, seed=1)
    with torch.no_grad():
        ref = layer(args[0], position_embeddings=(args[1], args[2]))
    stock = _run(layer, args, None)
    out = _run(layer, args, fxfuse.passes)
    c = dict(fxfuse.counters)
    assert c.get("rmsnorm_quant") == 2 and c.get("silu_mul_quant") == 1, (c, fxfuse.report())
    details = " | ".join(f.detail for f in fxfuse.report().fusions)
    assert "shared by 3 quantizations" in details and "shared by 2 quantizations" in details, details
    if kind == "qwen3":  # q_norm / k_norm have no quant after them: seen, left alone
        assert sum("not quantized" in m.reason for m in fxfuse.report().near_misses) >= 2, fxfuse.report()
    err_stock, err_fx = _rel(stock, ref), _rel(out, ref)
    assert err_fx <= max(1.5 * err_stock, 2e-2), (err_fx, err_stock)


def test_per_tensor_layer_stays_correct():
    """Per-tensor dynamic scales need a whole-tensor amax before any row can be quantized: not a
    one-pass kernel, so each quant is a near miss; the compiled layer stays correct."""
    layer, rope = _layer("llama", "tensor")
    args = _inputs(rope, 7, seed=2)
    with torch.no_grad():
        ref = layer(args[0], position_embeddings=(args[1], args[2]))
    out = _run(layer, args, fxfuse.passes)
    assert fxfuse.counters["rmsnorm_quant"] == 0 and fxfuse.counters["silu_mul_quant"] == 0
    assert any("amax over the whole tensor" in m.reason for m in fxfuse.report().near_misses), fxfuse.report()
    assert _rel(out, ref) < 2e-2


def test_per_tensor_layer_of_one_token_fuses():
    """Decode of one sequence: each per-tensor amax covers one row, so both norms and SwiGLU fuse
    with their quants (the T = 1 rows of the torchao per-tensor benchmark), as close to eager as stock."""
    layer, rope = _layer("llama", "tensor")
    args = _inputs(rope, 1, seed=3)
    with torch.no_grad():
        ref = layer(args[0], position_embeddings=(args[1], args[2]))
    stock = _run(layer, args, None)
    out = _run(layer, args, fxfuse.FusionPasses(strict=True))
    c = dict(fxfuse.counters)
    assert c.get("rmsnorm_quant") == 2 and c.get("silu_mul_quant") == 1, (c, fxfuse.report())
    assert not any("amax over the whole tensor" in m.reason for m in fxfuse.report().near_misses)
    assert _rel(out, ref) <= max(1.5 * _rel(stock, ref), 2e-2)
