"""fxfuse: FX passes that make torch.compile fuse RMSNorm+quant, RoPE+quant and MoE routing.

    model = torch.compile(model, options={"post_grad_custom_pre_pass": fxfuse.passes})
"""

from __future__ import annotations

from .patterns.unwrap import register_unwrap
from . import kernels as _kernels  # noqa: F401  registers torch.ops.fxfuse.*: cached graphs call them without running a pass
from .pipeline import FusionPasses, PassContext, counters
from .report import Report, report

passes: FusionPasses = FusionPasses()
"""The default pipeline (all fusions, registered unwraps, non-strict)."""

__all__ = ["FusionPasses", "PassContext", "Report", "counters", "passes", "register_unwrap", "report"]
__version__ = "0.1.0"
