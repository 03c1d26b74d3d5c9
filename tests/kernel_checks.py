"""Checks on traced user-defined Triton kernel launches, shared by the kernel-family tests."""

from __future__ import annotations

from typing import Iterable

import torch.fx as fx
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table


def assert_full_signatures(nodes: Iterable[fx.Node]) -> None:
    """Every traced launch passes every kernel parameter: Inductor's codegen for a wrapped kernel
    passes only what was traced, so a parameter left to its Python default (a constexpr included)
    arrives as None and the kernel fails to compile on the GPU (not visible on CPU)."""
    for n in nodes:
        kernel = kernel_side_table.get_kernel(n.kwargs["kernel_idx"])
        fn = getattr(kernel, "fn", kernel)  # an autotuner wraps the JITFunction
        given = set(n.kwargs["kwargs"]) | set(kernel_side_table.get_constant_args(n.kwargs["constant_args_idx"]))
        missing = [a for a in fn.arg_names if a not in given]
        assert not missing, f"{fn.__name__}: launched without {missing}"
