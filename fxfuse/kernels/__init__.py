"""Triton kernels; importing registers the torch.ops.fxfuse.* custom ops."""

from . import rmsnorm_quant  # noqa: F401  (registers torch.ops.fxfuse.rms_norm_quant)
from . import rope_quant  # noqa: F401  (registers torch.ops.fxfuse.rope_quant)
