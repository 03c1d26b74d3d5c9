"""Triton kernels; importing registers the torch.ops.fxfuse.* custom ops."""

from . import moe_experts, moe_routing, rmsnorm_quant, rope_quant, silu_mul_quant  # noqa: F401  (registers torch.ops.fxfuse.*)
