"""Inductor's mutation analysis of our user-defined Triton kernels (fake CUDA, sm_90 TTIR built on
CPU): the functional wrapper may clone only the kernel's outputs. An input it believes written is
cloned on every call: a PIECES silu launch once returned its store offsets from a function that
also took g_ptr/u_ptr, the analysis mapped them to the inputs, and the compiled kernel ran 2-3x
slower than the raw op on an H200."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import fxfuse
from forms import QUANTS
from fxfuse.kernels import silu_mul_quant as K

BF16 = torch.bfloat16


def _clones(model, shapes: list[tuple[int, ...]]) -> list[set[str]]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fxfuse.fx_utils import trace_aten

    with FakeTensorMode():
        args = [torch.empty(s, dtype=BF16 if s else torch.float32, device="cuda") for s in shapes]
        gm = trace_aten(model, args, functionalize=True)
    fxfuse.counters.clear()
    fxfuse.FusionPasses(options={"gate": False}, strict=True)(gm.graph)
    return [set(n.kwargs["tensors_to_clone"]) for n in gm.graph.nodes
            if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]


LAUNCHES = [None, {"PIECES": 1, "ROWS": 1}, {"PIECES": 0, "CHUNK": 256, "ROWS": 1}, {"PIECES": 0, "ROWS": 2}]


@pytest.mark.parametrize("quant", ["token", "group128", "static_div", "int8_token"])
@pytest.mark.parametrize("launch", range(len(LAUNCHES)))
@pytest.mark.parametrize("M", [1, 64])
def test_silu_mul_quant_clones_only_outputs(sm90_target, quant, launch, M):
    override = LAUNCHES[launch]
    if quant != "token" and override and override.get("CHUNK"):
        pytest.skip("the row loop is per-token only")
    qf = QUANTS[quant]
    saved = dict(K.LAUNCH_OVERRIDE)
    K.LAUNCH_OVERRIDE.update(override or {})
    try:
        clones = _clones(lambda g, u, s: qf(F.silu(g) * u, s), [(M, 768), (M, 768), ()])
    except ValueError as e:  # a launch form this shape cannot take (e.g. ROWS with a column split)
        pytest.skip(str(e))
    finally:
        K.LAUNCH_OVERRIDE.clear()
        K.LAUNCH_OVERRIDE.update(saved)
    assert fxfuse.counters["silu_mul_quant"] == 1
    assert clones and all(c <= {"q_ptr", "s_out_ptr"} for c in clones), clones


@pytest.mark.parametrize("quant", ["token", "group128", "static_div"])
@pytest.mark.parametrize("residual", [False, True])
def test_rmsnorm_quant_clones_only_outputs(sm90_target, quant, residual):
    """RMSNorm(+residual)+quant: the traced launch clones only its outputs (quantized rows, scales,
    and the residual sum where the graph returns it), never x, the residual input or the weight."""
    from forms import norm_hf

    qf = QUANTS[quant]

    def model(x, r, w, s):
        if residual:
            h = x + r
            return (*qf(norm_hf(h, w, 1e-6), s), h)
        return qf(norm_hf(x, w, 1e-6), s)

    from torch._subclasses.fake_tensor import FakeTensorMode

    from fxfuse.fx_utils import trace_aten

    with FakeTensorMode():
        args = [torch.empty(8, 512, dtype=BF16, device="cuda"), torch.empty(8, 512, dtype=BF16, device="cuda"),
                torch.empty(512, dtype=BF16, device="cuda"), torch.empty((), dtype=torch.float32, device="cuda")]
        gm = trace_aten(model, args, functionalize=True)
    fxfuse.counters.clear()
    fxfuse.FusionPasses(options={"gate": False}, strict=True)(gm.graph)
    assert fxfuse.counters["rmsnorm_quant"] == 1
    launches = [n for n in gm.graph.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
    assert launches
    for n in launches:
        inputs = {k for k, v in n.kwargs["kwargs"].items() if isinstance(v, torch.fx.Node) and v.op == "placeholder"}
        assert not inputs & set(n.kwargs["tensors_to_clone"]), (n.kwargs["tensors_to_clone"], inputs)
