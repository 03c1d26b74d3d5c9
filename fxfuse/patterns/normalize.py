"""Normalize written forms so recognizers see one shape of graph.

Only rewrites that are exact identities: `aten.view` -> `aten.reshape`, reshapes to the same
shape, converts to the dtype a tensor already has, and lossless round trips (bf16 -> fp32 -> bf16).
Also drops `aten._assert_tensor_metadata` (emitted by torch.export, so AOTInductor graphs carry
them on intermediates): Inductor's own post-grad `remove_assert_ops` drops them later anyway, and
left in place they would count as outside users of every intermediate and block fusion.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..fx_utils import aten, convert_dtype, is_convert, is_op, val

_WIDENS = {
    torch.bfloat16: {torch.float32, torch.float64},
    torch.float16: {torch.float32, torch.float64},
    torch.float32: {torch.float64},
}


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if a.dim() != b.dim():
        return False
    return all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape))


class Normalize:
    name = "normalize"

    def __call__(self, graph: fx.Graph, ctx: object) -> None:
        for node in list(graph.nodes):
            if is_op(node, aten._assert_tensor_metadata.default) and not node.users:
                graph.erase_node(node)
                continue
            if is_op(node, aten.view.default):
                node.target = aten.reshape.default
            if is_op(node, aten.reshape.default, aten.view.default):
                src, out = val(node.args[0]), val(node)
                if isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and _same_shape(src, out):
                    node.replace_all_uses_with(node.args[0])
                    graph.erase_node(node)
                continue
            if is_convert(node):
                src = node.args[0]
                sv = val(src)
                if not isinstance(sv, torch.Tensor):
                    continue
                dt = convert_dtype(node)
                if sv.dtype == dt:
                    node.replace_all_uses_with(src)
                    graph.erase_node(node)
                elif is_convert(src) and dt == val(src.args[0]).dtype and sv.dtype in _WIDENS.get(dt, ()):
                    node.replace_all_uses_with(src.args[0])
                    graph.erase_node(node)
                    if not src.users:
                        graph.erase_node(src)


PASS = Normalize()
