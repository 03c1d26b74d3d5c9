"""Triton kernels; importing registers the torch.ops.fxfuse.* custom ops."""

from . import moe_experts, moe_routing, rmsnorm_quant, rope_quant, router_gemv, silu_mul_quant  # noqa: F401  (registers torch.ops.fxfuse.*)
from .fake_cache import cache_cpu_fake as _cache_cpu_fake

for _op in (moe_experts.moe_experts, moe_experts.moe_routed_experts, moe_routing.moe_routing,
            rmsnorm_quant.rms_norm_quant, rope_quant.rope_quant, silu_mul_quant.silu_mul_quant):
    _cache_cpu_fake(_op)


def launch_overrides_digest() -> str:
    """The launch knobs that live outside the source files (sweep overrides, the tuned table as it
    is now in memory, FXFUSE_ROPE_CONFIG): they change the kernels a pass inserts, so the FX graph
    cache key must change with them."""
    import os

    return repr((sorted(rope_quant.CONFIG_OVERRIDE.items()), os.environ.get("FXFUSE_ROPE_CONFIG", ""),
                 sorted(silu_mul_quant.LAUNCH_OVERRIDE.items()), sorted(silu_mul_quant.TUNED.items()),
                 sorted(moe_experts.ALIGN_OVERRIDE.items())))
