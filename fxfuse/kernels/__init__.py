"""Triton kernels; importing registers the torch.ops.fxfuse.* custom ops."""

from . import moe_experts, moe_routing, rmsnorm_quant, rope_quant, silu_mul_quant  # noqa: F401  (registers torch.ops.fxfuse.*)
from .fake_cache import cache_cpu_fake as _cache_cpu_fake

for _op in (moe_experts.moe_experts, moe_routing.moe_routing, rmsnorm_quant.rms_norm_quant, rope_quant.rope_quant,
            silu_mul_quant.silu_mul_quant):
    _cache_cpu_fake(_op)
