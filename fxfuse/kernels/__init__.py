"""Triton kernels; importing registers the torch.ops.fxfuse.* custom ops."""

from . import rmsnorm_quant  # noqa: F401  (registers torch.ops.fxfuse.rms_norm_quant)
from . import silu_mul_quant  # noqa: F401  (registers torch.ops.fxfuse.silu_mul_quant)
