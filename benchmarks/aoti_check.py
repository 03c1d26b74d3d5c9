"""AOTInductor check: export + aoti_compile_and_package + load + run, with and without fxfuse.

    python benchmarks/aoti_check.py [fxfuse|stock] [cpu|cuda]   -> prints one JSON line; exit 0 if correct
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import fxfuse  # noqa: E402
from forms import dequant_close, make_inputs, make_model  # noqa: E402


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "fxfuse"
    device = sys.argv[2] if len(sys.argv) > 2 else "cuda"
    fn = make_model("hf", "token", residual=True)

    class M(torch.nn.Module):
        def forward(self, x, res, w, scale):
            return fn(x, res, w, scale)

    args = make_inputs(32, 2048, torch.bfloat16, device=device, seed=14)
    configs = {"post_grad_custom_pre_pass": fxfuse.FusionPasses(options={"gate": False})} if mode == "fxfuse" else {}
    with torch.no_grad(), tempfile.TemporaryDirectory() as d:
        ep = torch.export.export(M(), args)
        path = torch._inductor.aoti_compile_and_package(ep, package_path=os.path.join(d, "m.pt2"), inductor_configs=configs)
        print(json.dumps({"stage": "compiled", "fused": fxfuse.counters["rmsnorm_quant"]}), flush=True)
        runner = torch._inductor.aoti_load_package(path)
        print(json.dumps({"stage": "loaded"}), flush=True)
        out = runner(*args)
        problems = dequant_close(tuple(out), tuple(fn(*args)))
    print(json.dumps({"stage": "ran", "mode": mode, "fused": fxfuse.counters["rmsnorm_quant"], "problems": problems}))
    sys.exit(1 if problems or (mode == "fxfuse" and not fxfuse.counters["rmsnorm_quant"]) else 0)


if __name__ == "__main__":
    main()
