"""Triton kernels; importing registers the torch.ops.fxfuse.* custom ops."""

from . import rmsnorm_quant  # noqa: F401  (registers torch.ops.fxfuse.rms_norm_quant)
from . import moe_experts  # noqa: F401  (registers torch.ops.fxfuse.moe_experts)
