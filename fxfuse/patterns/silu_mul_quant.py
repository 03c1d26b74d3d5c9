"""act(gate) * up followed by fp8/int8 quantization -> one fused kernel (SwiGLU / GeGLU MLPs).

Written forms: `F.silu(gate) * up` (Inductor decomposes SiLU to `g / (1 + exp(-g))`, older
graphs keep `aten.silu` or `g * sigmoid(g)`), `F.gelu(gate, approximate="tanh") * up`, with gate
and up as two tensors or as the two halves (`chunk`/`split`/slices) of one merged `gate_up`
tensor. Starting from each activation core (exp / tanh / sigmoid / silu / gelu), capture the
activation, its rounding points and the two operands, then hand the product to the shared quant
matcher (`patterns/quant.py`). Every failed check becomes a near miss; nothing else changes.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .. import gating
from ..fx_utils import (
    Reject,
    aten,
    convert_dtype,
    depends_on_any,
    gate_class,
    insert_traced,
    is_convert,
    is_op,
    is_row_contiguous,
    kernel_devices_ok,
    literal,
    other_arg,
    scalar_on,
    stable_toposort,
    tval,
)
from ..kernels.silu_mul_quant import ACT_GELU_TANH, ACT_NAMES, ACT_SILU, MAX_INTER
from .quant import (
    PER_GROUP,
    QUANT_DTYPES,
    SCHEME_NAMES,
    QuantMatch,
    find_sinks,
    match_quant,
    strip_f32_convert,
    written_outputs,
)

FAMILY = "silu_mul_quant"
IN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_GELU_C0, _GELU_C1 = 0.044715, 0.7978845608028654


@dataclass
class ActMulMatch:
    act: int
    gate: fx.Node  # the tensor the activation reads (a half of `merged` when merged)
    up: fx.Node
    merged: fx.Node | None  # gate_up base when gate/up are its two halves
    act_dtype: torch.dtype
    out_dtype: torch.dtype
    act_out: fx.Node  # activation output (after its rounding)
    y: fx.Node  # the product (after its rounding)
    nodes: set[fx.Node] = field(default_factory=set)


def _single_user(n: fx.Node) -> fx.Node | None:
    return next(iter(n.users)) if len(n.users) == 1 else None


def _is_lit(x: Any, value: float, rel: float = 1e-6) -> bool:
    v = literal(x)
    return v is not None and abs(v - value) <= rel * abs(value)


# ----------------------------------------------------------------------------- activation


def _silu_from_exp(exp: fx.Node, nodes: set[fx.Node]) -> tuple[fx.Node, fx.Node]:
    """g / (1 + exp(-g)) -> (g, output)."""
    neg = exp.args[0]
    if not is_op(neg, aten.neg.default):
        raise Reject("exp does not read -gate (not a SiLU)")
    g = neg.args[0]
    add = _single_user(exp)
    if add is None or not is_op(add, aten.add.Tensor, aten.add.Scalar) or not any(_is_lit(a, 1.0) for a in add.args):
        raise Reject("exp(-gate) is not followed by + 1 (not a SiLU)")
    div = _single_user(add)
    if div is None or not is_op(div, aten.div.Tensor) or div.args[0] is not g or div.args[1] is not add or div.kwargs:
        raise Reject("gate is not divided by 1 + exp(-gate) (not a SiLU)")
    nodes.update({neg, exp, add, div})
    return g, div


def _gelu_from_tanh(tanh: fx.Node, nodes: set[fx.Node]) -> tuple[fx.Node, fx.Node]:
    """(g * 0.5) * (tanh((g + g*g*g * 0.044715) * sqrt(2/pi)) + 1) -> (g, output)."""
    inner = tanh.args[0]
    if not is_op(inner, aten.mul.Tensor) or not any(_is_lit(a, _GELU_C1) for a in inner.args):
        raise Reject("tanh input is not scaled by sqrt(2/pi) (not a tanh GELU)")
    s = next(a for a in inner.args if isinstance(a, fx.Node))
    if not is_op(s, aten.add.Tensor) or len(s.args) != 2:
        raise Reject("tanh GELU inner sum not recognized")
    g, cube_c = s.args
    if not (is_op(cube_c, aten.mul.Tensor) and _is_lit(cube_c.args[1], _GELU_C0)):
        g, cube_c = cube_c, g
    if not (is_op(cube_c, aten.mul.Tensor) and _is_lit(cube_c.args[1], _GELU_C0)):
        raise Reject("tanh GELU cubic term not recognized")
    cube = cube_c.args[0]
    if not (is_op(cube, aten.mul.Tensor) and g in cube.args):
        raise Reject("tanh GELU cubic term not recognized")
    sq = other_arg(cube, g)
    if not (is_op(sq, aten.mul.Tensor) and sq.args[0] is g and sq.args[1] is g):
        raise Reject("tanh GELU cubic term not recognized")
    add1 = _single_user(tanh)
    if add1 is None or not is_op(add1, aten.add.Tensor, aten.add.Scalar) or not any(_is_lit(a, 1.0) for a in add1.args):
        raise Reject("tanh is not followed by + 1 (not a tanh GELU)")
    out = _single_user(add1)
    if out is None or not is_op(out, aten.mul.Tensor):
        raise Reject("tanh GELU output not recognized")
    half = other_arg(out, add1)
    if not (is_op(half, aten.mul.Tensor) and half.args[0] is g and _is_lit(half.args[1], 0.5)):
        raise Reject("tanh GELU is not scaled by 0.5 * gate")
    nodes.update({inner, s, cube_c, cube, sq, tanh, add1, out, half})
    return g, out


def match_activation(anchor: fx.Node, nodes: set[fx.Node]) -> tuple[int, fx.Node, fx.Node]:
    """(act code, fp32-or-input gate value, activation output) from an activation core node."""
    if is_op(anchor, aten.exp.default):
        g, out = _silu_from_exp(anchor, nodes)
        return ACT_SILU, g, out
    if is_op(anchor, aten.tanh.default):
        g, out = _gelu_from_tanh(anchor, nodes)
        return ACT_GELU_TANH, g, out
    if is_op(anchor, aten.silu.default):
        nodes.add(anchor)
        return ACT_SILU, anchor.args[0], anchor
    if is_op(anchor, aten.gelu.default):
        approx = anchor.kwargs.get("approximate", anchor.args[1] if len(anchor.args) > 1 else "none")
        if approx != "tanh":
            raise Reject(f"gelu(approximate={approx!r}) is not supported (only the tanh approximation)")
        nodes.add(anchor)
        return ACT_GELU_TANH, anchor.args[0], anchor
    if is_op(anchor, aten.sigmoid.default):
        g = anchor.args[0]
        m = _single_user(anchor)
        if m is not None and is_op(m, aten.mul.Tensor) and g in m.args and other_arg(m, anchor) is g:
            nodes.update({anchor, m})
            return ACT_SILU, g, m
        raise Reject("activation is sigmoid(gate), not silu(gate) = gate * sigmoid(gate)")
    raise Reject("not an activation")


# ----------------------------------------------------------------------------- gate/up operands


def _half_of(node: fx.Node) -> tuple[fx.Node, int] | None:
    """(base, 0 | 1) if node is the first/second half of `base` along its last dim, else None."""
    if node.target is operator.getitem and is_op(node.args[0], aten.split.Tensor, aten.split_with_sizes.default):
        sp = node.args[0]
        base = sp.args[0]
        bv = tval(base)
        W = bv.shape[-1]
        dim = sp.args[2] if len(sp.args) > 2 else sp.kwargs.get("dim", 0)
        if dim % bv.dim() != bv.dim() - 1:
            return None
        if not isinstance(W, int):  # a symbolic row (dynamic=True on the input): sizes are graph nodes
            return None
        sizes = sp.args[1]
        if isinstance(sizes, int):
            sizes = [sizes, W - sizes] if 2 * sizes == W else None
        if not isinstance(sizes, (list, tuple)) or len(sizes) != 2 or not all(type(z) is int for z in sizes):
            return None
        if sizes[0] != sizes[1] or 2 * sizes[0] != W:
            return None
        return base, int(node.args[1])
    if is_op(node, aten.slice.Tensor):
        base = node.args[0]
        bv = tval(base)
        dim = node.args[1] if len(node.args) > 1 else 0
        start = node.args[2] if len(node.args) > 2 else None
        end = node.args[3] if len(node.args) > 3 else None
        step = node.args[4] if len(node.args) > 4 else 1
        if dim % bv.dim() != bv.dim() - 1 or step != 1:
            return None
        W = bv.shape[-1]
        if not isinstance(W, int):  # symbolic: a comparison would guard (specialize) on it
            return None
        half = W // 2
        if (start in (None, 0)) and end == half and 2 * half == W:
            return base, 0
        if start == half and 2 * half == W and (end is None or end == W or (isinstance(end, int) and end >= 2**62)):
            return base, 1
    return None


def match_act_mul(anchor: fx.Node) -> ActMulMatch:
    nodes: set[fx.Node] = set()
    act, gf, a = match_activation(anchor, nodes)
    gate, up_conv = strip_f32_convert(gf)
    if up_conv is not None:
        nodes.add(up_conv)
    gv = tval(gate)
    if gv.dtype not in IN_DTYPES:
        raise Reject(f"gate dtype {gv.dtype} not supported")
    op_form = a is anchor and is_op(anchor, aten.silu.default, aten.gelu.default)
    if tval(gf).dtype != torch.float32 and not op_form:
        raise Reject(f"activation computed in {tval(gf).dtype}, not float32")
    # activation rounding (aten.silu / aten.gelu on bf16/fp16 compute in fp32 and round to their dtype)
    act_out, act_dtype = a, tval(a).dtype
    u = _single_user(a)
    if u is None:
        raise Reject(f"{ACT_NAMES[act]}(gate) is also used outside the product")
    if is_convert(u) and convert_dtype(u) in IN_DTYPES and act_dtype == torch.float32:
        act_out, act_dtype = u, convert_dtype(u)
        nodes.add(u)
        u = _single_user(u)
        if u is None:
            raise Reject(f"{ACT_NAMES[act]}(gate) is also used outside the product")
    if not is_op(u, aten.mul.Tensor) or u.kwargs:
        raise Reject(f"{ACT_NAMES[act]}(gate) is not multiplied by up")
    prod = u
    nodes.add(prod)
    other = other_arg(prod, act_out)
    if other is act_out:
        raise Reject(f"{ACT_NAMES[act]}(gate) is squared, not multiplied by up")
    up, up_up = strip_f32_convert(other)
    if up_up is not None:
        nodes.add(up_up)
    uv = tval(up)
    if uv.dtype != gv.dtype or tuple(uv.shape) != tuple(gv.shape):
        raise Reject(f"up {uv.dtype}{tuple(uv.shape)} does not match gate {gv.dtype}{tuple(gv.shape)}")
    y, out_dtype = prod, tval(prod).dtype
    c = _single_user(prod)
    if c is not None and is_convert(c) and convert_dtype(c) in IN_DTYPES and out_dtype == torch.float32:
        y, out_dtype = c, convert_dtype(c)
        nodes.add(c)
    if out_dtype not in IN_DTYPES:
        raise Reject(f"product dtype {out_dtype} not supported")
    # merged gate_up halves
    merged = None
    hg, hu = _half_of(gate), _half_of(up)
    if hg is not None and hu is not None and hg[0] is hu[0]:
        if (hg[1], hu[1]) == (1, 0):
            raise Reject(
                f"{ACT_NAMES[act]} reads the second half of the merged gate_up tensor ({ACT_NAMES[act]}(up) * gate); "
                "the kernel applies it to the first half"
            )
        if (hg[1], hu[1]) == (0, 1):
            merged = hg[0]
    # intermediates must not escape (y may: the quant matcher decides)
    for n in nodes - {y}:
        outside = [x for x in n.users if x not in nodes]
        if outside:
            raise Reject(f"intermediate {n.name} of {ACT_NAMES[act]}(gate) * up is also used elsewhere")
    return ActMulMatch(act, gate, up, merged, act_dtype, out_dtype, act_out, y, nodes)


def match_quant_of(m: ActMulMatch) -> QuantMatch:
    """The quant of the product; a quant of gate or of act(gate) alone gets its own reason."""
    name = ACT_NAMES[m.act]
    if not find_sinks(m.y):
        if find_sinks(m.act_out):
            raise Reject(f"quantization reads {name}(gate), not {name}(gate) * up")
        if find_sinks(m.gate) or find_sinks(m.up):
            raise Reject(f"quantization reads gate or up alone, not {name}(gate) * up")
    reason_in = f"quantization reads gate or up, not {name}(gate) * up"
    return match_quant(m.y, m.nodes, {m.gate: reason_in, m.up: reason_in}, what=f"{name}(gate) * up")


# ----------------------------------------------------------------------------- checks + rewrite


def check(m: ActMulMatch, q: QuantMatch, gate: bool = True) -> None:
    gv = tval(m.gate)
    inter = gv.shape[-1]
    if not isinstance(inter, int):
        raise Reject("intermediate size is symbolic; the kernel needs a static row length")
    if inter > MAX_INTER:
        raise Reject(f"intermediate size {inter} above {MAX_INTER}")
    operands = [m.merged] if m.merged is not None else [m.gate, m.up]
    scalars = [tval(n) for n in (q.scale, q.scale_ub) if n is not None]
    if not kernel_devices_ok(*[tval(n) for n in operands], scalars=scalars):
        raise Reject("inputs are on different devices")
    dev = gv.device.type
    if dev not in ("cpu", "cuda"):
        raise Reject(f"device {dev} not supported")
    for n in operands:
        if not is_row_contiguous(tval(n)):
            raise Reject(f"{n.name} is not contiguous" + ("" if m.merged is not None else " (strided gate/up view)"))
    if q.scheme == PER_GROUP and (q.group_size & (q.group_size - 1) or inter % q.group_size):
        raise Reject(f"group size {q.group_size} must be a power of two dividing {inter}")
    region = m.nodes | q.nodes
    for inp in [*operands, q.scale, q.scale_ub]:
        if inp is not None and depends_on_any(inp, region):
            raise Reject(f"input {inp.name} depends on the region itself")
    if dev == "cuda":
        scheme = gate_class(SCHEME_NAMES[q.scheme], gv, scalars)
        rows = math.prod(gv.shape[:-1])  # the token count: an int, or a SymInt under dynamic shapes
        why = gating.rejects(FAMILY, scheme=scheme, hidden=inter, dtype=gv.dtype, enabled=gate, M=rows)
        if why:
            raise Reject(why)


def rewrite(graph: fx.Graph, m: ActMulMatch, q: QuantMatch) -> list[fx.Node]:
    from ..kernels import silu_mul_quant as _k  # noqa: F401  (registers torch.ops.fxfuse.silu_mul_quant)

    gv = tval(m.gate)
    inter = gv.shape[-1]
    merged = m.merged is not None
    inputs = ([m.merged] if merged else [m.gate, m.up]) + [n for n in (q.scale, q.scale_ub) if n is not None]
    params = dict(
        act=m.act,
        act_dtype=m.act_dtype,
        out_dtype=m.out_dtype,
        **q.op_params(),
    )
    has_s, has_ub = q.scale is not None, q.scale_ub is not None
    plan = q.output_plan()  # plain values: the trace cache keys the closure

    def replacement(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        it = iter(args)
        x = next(it)
        up = None if merged else next(it)
        sc = next(it) if has_s else None
        ub = next(it) if has_ub else None
        lead = x.shape[:-1]
        qo, so = torch.ops.fxfuse.silu_mul_quant(
            x.reshape(-1, x.shape[-1]),
            None if up is None else up.reshape(-1, inter),
            None if sc is None else scalar_on(sc, x),
            scale_ub=None if ub is None else scalar_on(ub, x),
            **params,
        )
        return written_outputs(plan, qo, so, lead)  # token dims as in gate, or flattened

    on_cuda = gv.device.type == "cuda"
    q_new, s_new = insert_traced(graph, replacement, inputs, before=q.sink, functionalize=on_cuda)
    q.reroute(graph, q_new, s_new)
    stable_toposort(graph)
    return sorted(m.nodes | q.nodes, key=lambda n: n.name)


_ANCHORS = (aten.exp.default, aten.tanh.default, aten.sigmoid.default, aten.silu.default, aten.gelu.default)


def _looks_like_candidate(node: fx.Node) -> bool:
    """Cheap pre-filter: an activation core whose value (within a few ops) reaches a multiply and a
    quantization; anything else (attention softmax exps, router sigmoids) is not reported at all."""
    frontier, seen = [node], {node}
    muls = 0
    for _ in range(14):  # activation -> product -> flatten/group views -> scale math -> convert
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in seen:
                    continue
                seen.add(u)
                if is_convert(u) and convert_dtype(u) in QUANT_DTYPES:
                    return muls > 0
                if is_op(u, aten.mul.Tensor):
                    muls += 1
                nxt.append(u)
        frontier = nxt
    # activation products that are not quantized at all: silent unless gate itself is quantized
    return False


class SiluMulQuant:
    name = FAMILY

    def __call__(self, graph: fx.Graph, ctx: Any) -> None:
        for node in list(graph.nodes):
            if node.graph is not graph or not is_op(node, *_ANCHORS):
                continue
            if is_op(node, aten.exp.default) and not is_op(node.args[0], aten.neg.default):
                continue  # softmax and friends: exp(x - max), not exp(-gate)
            if not _looks_like_candidate(node) and not _gate_quantized(node):
                continue
            with ctx.candidate(FAMILY, node):
                m = match_act_mul(node)
                q = match_quant_of(m)
                check(m, q, gate=ctx.options.get("gate", True))
                replaced = rewrite(graph, m, q)
                on_cuda = tval(m.gate).device.type == "cuda"
                kernel = "triton:fxfuse_silu_mul_quant" if on_cuda else "fxfuse::silu_mul_quant"
                detail = (
                    f"{ACT_NAMES[m.act]} {SCHEME_NAMES[q.scheme]} {q.qdtype} I={tval(m.gate).shape[-1]}"
                    + (" merged gate_up" if m.merged is not None else "")
                    + (f" shared by {len(q.sinks)} quantizations" if len(q.sinks) > 1 else "")
                )
                ctx.applied(FAMILY, replaced, kernel, detail)


def _gate_quantized(anchor: fx.Node) -> bool:
    """The activation's own input (gate) is quantized: a 'quant of gate alone' near-miss candidate."""
    g = anchor.args[0] if anchor.args else None
    if is_op(g, aten.neg.default):
        g = g.args[0]
    if not isinstance(g, fx.Node):
        return False
    src, _ = strip_f32_convert(g)
    return isinstance(src, fx.Node) and bool(find_sinks(src))


PASS = SiluMulQuant()
