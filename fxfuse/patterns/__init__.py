"""One module per fusion family. Each exposes a pass object with a `name` and `__call__(graph, ctx)`.

Order matters: normalize first, unwrap before recognition (so unwrapped ops can fuse), fused-add
forms are handled inside each family's matcher rather than by registration order.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..pipeline import GraphPass


@functools.cache
def _passes() -> tuple["GraphPass", ...]:
    from . import moe_experts, moe_routing, normalize, rmsnorm_quant, rope_quant, silu_mul_quant, unwrap

    return (
        normalize.PASS,
        unwrap.PASS,
        rmsnorm_quant.PASS,
        silu_mul_quant.PASS,
        rope_quant.PASS,
        moe_routing.PASS,
        moe_experts.PASS,
    )


def default_passes() -> list["GraphPass"]:
    """All passes in pipeline order (imported lazily so `import fxfuse` stays cheap)."""
    return list(_passes())
