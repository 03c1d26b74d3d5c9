"""Which transformers model classes fxfuse fuses: one tiny decoder layer per family, random weights
from a small config (no downloads), compiled on the CPU with fxfuse, checked against eager.

    python benchmarks/survey_models.py --out benchmarks/results/survey_cpu.json [--models llama,gpt_oss]

Each row: the fusion counters, the fused regions' details (e.g. `+qk_norm`, `rot=8`), the near
misses of the families that apply (rmsnorm_quant's "not quantized" misses are left out: these
models are bf16, nothing to quantize), and the logits' relative error against eager. On the CPU
the rewrites insert reference ops, so this says what is recognized, not what is faster; on CUDA
the benchmark gates decide which of these ship.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

import fxfuse
from fxfuse import demo

SMALL: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, pad_token_id=0)

# family -> (config class, overrides); attention "eager" where transformers has no SDPA path
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", dict(head_dim=16)),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", dict(head_dim=16)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=16)),
    "olmo2": ("Olmo2Config", {}),
    "cohere": ("CohereConfig", {}),
    "granite": ("GraniteConfig", {}),
    "phi": ("PhiConfig", dict(partial_rotary_factor=0.5)),
    "phi3": ("Phi3Config", {}),
    "stablelm": ("StableLmConfig", dict(partial_rotary_factor=0.25)),
    "gpt_neox": ("GPTNeoXConfig", dict(rotary_pct=0.25)),
    "glm": ("GlmConfig", dict(head_dim=16)),
    "glm4": ("Glm4Config", dict(head_dim=16)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "gpt_oss": ("GptOssConfig", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=16)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=32)),
    "olmoe": ("OlmoeConfig", dict(num_experts=4, num_experts_per_tok=2)),
    "granitemoe": ("GraniteMoeConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "phimoe": ("PhimoeConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "minimax": ("MiniMaxConfig", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16)),
    "glm4_moe": ("Glm4MoeConfig", dict(n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
                                       moe_intermediate_size=32, first_k_dense_replace=0, head_dim=16)),
    "deepseek_v3": ("DeepseekV3Config", dict(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                                             moe_intermediate_size=32, q_lora_rank=32, kv_lora_rank=16,
                                             qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16,
                                             first_k_dense_replace=0, num_key_value_heads=4)),
}
EAGER_ATTENTION = {"gpt_oss"}


def survey(name: str, tokens: int = 8) -> dict[str, Any]:
    import transformers
    from torch._inductor.utils import fresh_cache

    cfg_cls, extra = MODELS[name]
    row: dict[str, Any] = {"model": name, "config": cfg_cls}
    try:
        cfg = getattr(transformers, cfg_cls)(**{**SMALL, **extra})
        cfg._attn_implementation = "eager" if name in EAGER_ATTENTION else "sdpa"
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).eval()
        ids = torch.randint(0, SMALL["vocab_size"], (1, tokens))
        torch._dynamo.reset()
        fxfuse.counters.clear()
        fxfuse.report.clear()
        fn = torch.compile(lambda i: model(i).logits, options={"post_grad_custom_pre_pass": fxfuse.passes})
        with fresh_cache(), torch.no_grad():
            out, ref = fn(ids).float(), model(ids).logits.float()
        rep = fxfuse.report()
        row.update(
            counters=dict(fxfuse.counters),
            fusions=sorted(f"{f.name}: {f.detail}" for f in rep.fusions),
            near_misses=sorted({f"{m.family}: {m.reason}" for m in rep.near_misses
                                if not (m.family == "rmsnorm_quant" and "not quantized" in m.reason)}),
            rel_err=float((out - ref).norm() / ref.norm()),
            argmax_agree=float((out.argmax(-1) == ref.argmax(-1)).float().mean()),
        )
    except Exception as e:  # noqa: BLE001 - a config this transformers cannot build: recorded, not fatal
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    import transformers

    demo.quiet_warnings()
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        t0 = time.perf_counter()
        rows.append(survey(name))
        rows[-1]["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(rows[-1]), flush=True)
    out = {"torch": torch.__version__, "transformers": transformers.__version__, "device": "cpu",
           "date": time.strftime("%Y-%m-%d"), "command": "python " + " ".join(sys.argv), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
