"""Why the opt-in MoE routing fold (moe_fold_routing=True) does or does not apply in a real CUDA
compile (diagnostic; prints the debug reason and the nodes between the fused router and the
experts region's weights/ids)."""
import logging
import sys

import torch
from torch._inductor.utils import fresh_cache

sys.path.insert(0, "tests")
import fxfuse  # noqa: E402
from fxfuse.testing import capture_graphs  # noqa: E402
from test_gpu_moe_experts import _block  # noqa: E402

logging.basicConfig(level=logging.DEBUG, format="%(name)s %(levelname)s %(message)s")
for name in ("fxfuse", "fxfuse.patterns", "fxfuse.patterns.moe_experts"):
    logging.getLogger(name).setLevel(logging.DEBUG)
m = _block("qwen", "grouped_mm")
x = torch.randn(1, 1, 256, device="cuda", dtype=torch.bfloat16)
with torch.no_grad(), fresh_cache():
    cap = capture_graphs(m, x, passes=fxfuse.FusionPasses(options={"gate": False, "moe_fold_routing": True}), dynamic=False)
print(fxfuse.report())
print("=== BEFORE")
print(cap.before_text)
print("=== AFTER")
print(cap.after_text)
