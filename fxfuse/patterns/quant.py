"""Quantization matcher shared by every family: from a tensor `y`, find the quant that reads it.

The same written forms follow an RMSNorm, a SiLU-and-mul or a RoPE: divide or multiply by a
scale; clamp; round for int8; a static scale (tensor or literal), a per-token amax, or a
per-group amax over `y.reshape(..., G, g)`; also after a row-preserving flatten of the token dims
(`y.reshape(-1, H)`, as quantized linears write it for a 3-D activation). This module *captures*
them (scheme, group size, the amax -> scale op chain, clamp bounds, the written output shapes)
into a `QuantMatch`; the family's own module matches what produces `y` and decides the rewrite.
Op codes come from the kernel module, one definition.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..fx_utils import (
    LIFTED_SCALAR_HINT,
    Reject,
    aten,
    record_inserted,
    convert_dtype,
    depends_on_any,
    is_convert,
    is_last_dim_reduction,
    is_lifted_scalar,
    is_op,
    is_row_contiguous,
    literal,
    norm_dims,
    runtime_scalar,
    tval,
    value_key,
    op_bound,
)

QUANT_DTYPES = (torch.float8_e4m3fn, torch.int8)

# the op's interface codes (scale-chain ops, schemes) come from the kernel side, one definition
from ..kernels.quant_common import (  # noqa: E402
    MAX_SCALE_OPS,
    SCALE_CLAMP_MAX as S_CLAMP_MAX,
    SCALE_CLAMP_MIN as S_CLAMP_MIN,
    SCALE_DIV as S_DIV,
    SCALE_MUL as S_MUL,
    SCALE_RDIV as S_RDIV,
    SCALE_RECIP as S_RECIP,
    SCALE_ROUND_BF16 as S_ROUND_BF16,
    SCALE_ROUND_F16 as S_ROUND_F16,
    SCHEME_PER_GROUP as PER_GROUP,
    SCHEME_PER_TOKEN as PER_TOKEN,
    SCHEME_STATIC as STATIC,
    op_scale_chain,
)
SCHEME_NAMES = {STATIC: "static", PER_TOKEN: "per-token", PER_GROUP: "per-group"}

# How to rebuild a written output shape from the fused op's token dims at run time: a static size
# (int >= 0), ("dim", i) for token dim i, or -1 (inferred: the one flattened product of token dims).
ShapeRecipe = tuple[Any, ...]


@dataclass
class QuantMatch:
    scheme: int
    group_size: int
    scale: fx.Node | None  # static scale tensor
    static_value: float
    scale_ops: list[int]
    scale_consts: list[float]
    quant_mul: bool
    qmin: float
    qmax: float
    round_to_int: bool
    qdtype: torch.dtype
    sink: fx.Node  # the convert to the quant dtype
    scale_out: fx.Node | None  # node holding the effective dynamic scale
    nodes: set[fx.Node] = field(default_factory=set)
    # identical chains reading the same y (one per quantized linear): every sink / scale node,
    # `sink` and `scale_out` included; the rewrite points all of them at the one fused output
    sinks: list[fx.Node] = field(default_factory=list)
    scale_outs: list[fx.Node] = field(default_factory=list)
    # `minimum(amax, scale_ub)` with a one-element tensor bound (vLLM's scale_ub), or a mul/div by a
    # runtime scalar (a float attribute lifted by dynamic=True): the tensor, and the scale-chain
    # slot whose constant the kernel loads from it
    scale_ub: fx.Node | None = None
    ub_slot: int = -1
    # the sink's / scale output's written shapes as recipes over y's token dims (`build_shape`)
    q_shape: ShapeRecipe = ()
    s_shape: ShapeRecipe | None = None
    # `sym_size` users of replaced nodes, with the dim of the quantized output that has that size
    shape_reads: list[tuple[fx.Node, int]] = field(default_factory=list)

    def op_params(self) -> dict[str, Any]:
        """The quant half of a fused op's keyword arguments (same names in every family's op)."""
        ops, consts = op_scale_chain(self.scale_ops, self.scale_consts)
        return dict(
            quant_dtype=self.qdtype,
            scheme=self.scheme,
            group_size=self.group_size,
            static_scale_value=self.static_value,
            scale_ops=ops,
            scale_consts=consts,
            quant_mul=self.quant_mul,
            qmin=op_bound(self.qmin),
            qmax=op_bound(self.qmax),
            round_to_int=self.round_to_int,
            ub_slot=self.ub_slot,
        )

    def output_plan(self) -> OutputPlan:
        """Plain values (no nodes) that `written_outputs` needs, so a replacement closing over them
        can be keyed by the trace cache: (q recipe, scale recipe, static scale shape)."""
        static = None
        if self.s_shape is None and self.scheme == STATIC:
            static = tuple(tval(self.scale).shape) if self.scale is not None else (1,)
        return self.q_shape, self.s_shape, static

    def reroute(self, graph: fx.Graph, q_new: fx.Node, s_new: fx.Node) -> None:
        """Point every quantized output, scale output and size read at the fused op's outputs."""
        for sink in self.sinks or [self.sink]:
            sink.replace_all_uses_with(q_new)
        for so in self.scale_outs or ([self.scale_out] if self.scale_out is not None else []):
            so.replace_all_uses_with(s_new)
        reroute_shape_reads(graph, self, q_new)

    def signature(self) -> tuple:
        """What decides the quantized bits: equal signatures compute the same (q, scale)."""
        return (
            self.scheme, self.group_size, value_key(self.scale), self.static_value, tuple(self.scale_ops),
            tuple(self.scale_consts), self.quant_mul, self.qmin, self.qmax, self.round_to_int, self.qdtype,
            tuple(tval(self.sink).shape),
            None if self.scale_out is None else tuple(tval(self.scale_out).shape),
            value_key(self.scale_ub), self.ub_slot,
        )


def strip_f32_convert(node: Any) -> tuple[Any, fx.Node | None]:
    """(source, convert node) if node is an upcast to fp32, else (node, None)."""
    if is_convert(node) and convert_dtype(node) == torch.float32:
        return node.args[0], node
    return node, None


_ROUND_OPS = {torch.bfloat16: S_ROUND_BF16, torch.float16: S_ROUND_F16}


def find_sinks(y: fx.Node, depth: int = 8) -> list[fx.Node]:
    """Converts to a quant dtype reachable from y through a few elementwise/reshape ops."""
    out, frontier, seen = [], [y], {y}
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in seen:
                    continue
                seen.add(u)
                if is_convert(u) and convert_dtype(u) in QUANT_DTYPES:
                    out.append(u)
                else:
                    nxt.append(u)
        frontier = nxt
    return out


def _known_eq(a: Any, b: Any) -> bool:
    return bool(statically_known_true(a == b))


def _same_dims(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return len(a) == len(b) and all(_known_eq(x, z) for x, z in zip(a, b))


def value_source(a: Any, y: fx.Node, nodes: set[fx.Node]) -> tuple[str, int, tuple[Any, ...]]:
    """Classify the tensor being quantized as a view of y: (kind, group size, token dims).

    ('row', 0, dims): y itself, or y with its token dims merged (`y.reshape(-1, H)`); the last dim
    is unchanged, so each row is one of y's rows, in order. ('group', g, dims): y viewed as
    [*dims, H/g, g]. `dims` are the view's token dims (their product is y's token count). Any
    chain of reshapes and fp32 upcasts leads there; a reshape that mixes rows or splits the last
    dim otherwise is a near miss.
    """
    chain: list[fx.Node] = []
    cur = a
    while cur is not y and len(chain) < 8:
        src, up = strip_f32_convert(cur)
        if up is not None:
            chain.append(up)
            cur = src
        elif is_op(cur, aten.reshape.default):
            chain.append(cur)
            cur = cur.args[0]
        else:
            break
    if cur is not y:
        raise Reject("quantization reads a different tensor than the normalized output")
    yv, av = tval(y), tval(a)
    H, ylead = yv.shape[-1], tuple(yv.shape[:-1])
    kind, g, dims = "row", 0, ylead
    if any(is_op(n, aten.reshape.default) for n in chain):
        n_tok = math.prod(ylead)
        if av.dim() >= 1 and _known_eq(av.shape[-1], H) and _known_eq(math.prod(av.shape[:-1]), n_tok):
            dims = tuple(av.shape[:-1])
        elif (
            av.dim() >= 2
            and isinstance(av.shape[-1], int)
            and _known_eq(av.shape[-2] * av.shape[-1], H)
            and _known_eq(math.prod(av.shape[:-2]), n_tok)
        ):
            kind, g, dims = "group", av.shape[-1], tuple(av.shape[:-2])
        else:
            raise Reject(
                f"quantized tensor is y{tuple(yv.shape)} reshaped to {tuple(av.shape)}: the reshape changes the "
                "last dim (only merging the token dims, [..., H] -> [-1, H], or splitting it into "
                "[..., groups, group_size] keeps every row whole)"
            )
    nodes.update(chain)
    return kind, g, dims


def shape_recipe(shape: Sequence[Any], lead: Sequence[Any], numel: Any, what: str) -> ShapeRecipe:
    """The recipe that rebuilds `shape` (a written output's shape) from token dims `lead`.

    Static sizes stay; a symbolic size equal to a token dim reads that dim at run time; at most
    one other symbolic size (a flatten of token dims, e.g. B*T) is inferred with -1, which is
    exact because `shape` must hold `numel` elements (checked symbolically).
    """
    if not _known_eq(math.prod(shape), numel):
        raise Reject(f"{what} shape {tuple(shape)} does not hold the {numel} elements the fused op writes")
    out: list[Any] = []
    for d in shape:
        if isinstance(d, int):
            out.append(d)
            continue
        j = next((k for k, t in enumerate(lead) if _known_eq(d, t)), None)
        if j is not None:
            out.append(("dim", j))
        elif -1 in out:
            raise Reject(f"{what} shape {tuple(shape)} is not the token dims or one flatten of them")
        else:
            out.append(-1)
    if -1 in out and 0 in out:
        raise Reject(f"{what} shape {tuple(shape)} has a 0 dim; its flattened dim cannot be inferred")
    return tuple(out)


OutputPlan = tuple  # (ShapeRecipe, ShapeRecipe | None, static scale shape | None)


def written_outputs(
    plan: OutputPlan, qo: torch.Tensor, so: torch.Tensor, lead: Sequence[Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused op's [M, H] q and its scales in the shapes the graph wrote (called while tracing
    the rewrite; `lead` are the fused inputs' token dims, `plan` is `QuantMatch.output_plan()`)."""
    q_shape, s_shape, static = plan
    qo = qo.reshape(build_shape(q_shape, lead))
    if s_shape is not None:
        return qo, so.reshape(build_shape(s_shape, lead))
    if static is not None:
        return qo, so.reshape(static)
    return qo, so  # a dynamic scale nobody reads


def build_shape(recipe: ShapeRecipe, lead: Sequence[Any]) -> list[Any]:
    """A shape recipe evaluated on the fused op's token dims (called while tracing the rewrite)."""
    return [lead[r[1]] if isinstance(r, tuple) else r for r in recipe]


def scale_chain(
    s: Any, nodes: set[fx.Node], y: fx.Node, ub_out: list[fx.Node] | None = None
) -> tuple[Any, list[int], list[float]]:
    """Walk from the effective scale back to its base; return (base, ops, consts) in apply order.

    `minimum(., t)` with a one-element tensor `t` not computed from y (vLLM's scale_ub) is a
    SCALE_CLAMP_MAX whose constant is NaN here: the caller takes `t` from `ub_out` and the slot
    from the NaN (the kernel loads the bound). Without `ub_out` it is rejected. A mul/div of the
    amax by such a runtime scalar (`amax / self.fp8_max` under dynamic=True, where Dynamo lifts
    the float attribute into a graph input) takes the same one runtime slot.
    A float64 -> float32 convert of a 0-d tensor not computed from y (a lifted float) ends the
    walk: it is the static scale itself.
    """
    ops: list[tuple[int, float]] = []
    cur = s
    while isinstance(cur, fx.Node):
        dt = tval(cur).dtype
        rnd = _ROUND_OPS.get(dt)
        step: tuple[int, float] | None = None
        nxt: Any = None
        if is_convert(cur):
            src_dt = tval(cur.args[0]).dtype
            if dt == torch.float32 and src_dt in (torch.bfloat16, torch.float16, torch.float32):
                nxt = cur.args[0]  # exact upcast
            elif dt == torch.float32 and src_dt == torch.float64 and runtime_scalar(cur, {y}):
                break  # a lifted float attribute, rounded to fp32 as eager does: a static base
            elif dt in _ROUND_OPS:
                step, nxt, rnd = (_ROUND_OPS[dt], 0.0), cur.args[0], None
            else:
                raise Reject(f"scale converted to {dt}")
        elif is_op(cur, aten.mul.Tensor, aten.mul.Scalar):
            a, b = cur.args
            if literal(b) is not None:
                step, nxt = (S_MUL, literal(b)), a
            elif literal(a) is not None:
                step, nxt = (S_MUL, literal(a)), b
            elif _runtime_operand(cur, b, a, y):
                step, nxt = _runtime_step(S_MUL, b, ub_out), a
            elif _runtime_operand(cur, a, b, y):
                step, nxt = _runtime_step(S_MUL, a, ub_out), b
        elif is_op(cur, aten.div.Tensor, aten.div.Scalar) and not cur.kwargs:
            a, b = cur.args
            if literal(b) is not None:
                step, nxt = (S_DIV, literal(b)), a
            elif literal(a) is not None:
                step, nxt = (S_RDIV, literal(a)), b
            elif _runtime_operand(cur, b, a, y):
                step, nxt = _runtime_step(S_DIV, b, ub_out), a
            elif _runtime_operand(cur, a, b, y):
                step, nxt = _runtime_step(S_RDIV, a, ub_out), b
        elif is_op(cur, aten.reciprocal.default):
            step, nxt = (S_RECIP, 0.0), cur.args[0]
        elif is_op(cur, aten.minimum.default):
            a, b = cur.args
            a_free = isinstance(a, fx.Node) and not depends_on_any(a, {y})
            b_free = isinstance(b, fx.Node) and not depends_on_any(b, {y})
            if a_free == b_free:
                break  # not a bound on a value computed from y: leave it as the base
            ub, nxt = (b, a) if b_free else (a, b)
            ub = strip_f32_convert(ub)[0]
            uv = tval(ub)
            if ub_out:
                raise Reject(
                    f"the scale chain reads more than one runtime value ({ub.name} and {ub_out[0].name}); "
                    "the kernel loads one"
                )
            if ub_out is None or uv.numel() != 1 or not uv.is_floating_point():
                raise Reject(f"scale upper bound {ub.name} is not a single one-element float tensor")
            ub_out.append(ub)
            step = (S_CLAMP_MAX, math.nan)
        elif is_op(cur, aten.clamp_min.default) and literal(cur.args[1]) is not None:
            step, nxt = (S_CLAMP_MIN, literal(cur.args[1])), cur.args[0]
        elif is_op(cur, aten.clamp_max.default) and literal(cur.args[1]) is not None:
            step, nxt = (S_CLAMP_MAX, literal(cur.args[1])), cur.args[0]
        elif is_op(cur, aten.clamp.default):
            lo = cur.args[1] if len(cur.args) > 1 else cur.kwargs.get("min")
            hi = cur.args[2] if len(cur.args) > 2 else cur.kwargs.get("max")
            if lo is not None and literal(lo) is None or hi is not None and literal(hi) is None:
                raise Reject("scale clamp bounds are not constants")
            pending = []
            if lo is not None:
                pending.append((S_CLAMP_MIN, literal(lo)))
            if hi is not None:
                pending.append((S_CLAMP_MAX, literal(hi)))
            if rnd is not None:
                ops.append((rnd, 0.0))
            ops.extend(reversed(pending))
            nodes.add(cur)
            cur = cur.args[0]
            continue
        if nxt is None:
            break  # reached the base
        if rnd is not None:
            ops.append((rnd, 0.0))
        if step is not None:
            ops.append(step)
        nodes.add(cur)
        cur = nxt
    ops.reverse()
    if len(ops) > MAX_SCALE_OPS:
        raise Reject(f"scale is computed by {len(ops)} ops; at most {MAX_SCALE_OPS} supported")
    return cur, [o for o, _ in ops], [c for _, c in ops]


def _runtime_operand(node: fx.Node, c: Any, other: Any, y: fx.Node) -> bool:
    """`node` = other (op) c with `c` a runtime scalar (see `runtime_scalar`) and `other` the
    scale computed from y, same shape and dtype as the result (c broadcasts, promotes nothing)."""
    if not isinstance(other, fx.Node) or not depends_on_any(other, {y}) or not runtime_scalar(c, {y}):
        return False
    nv, ov = tval(node), tval(other)
    return nv.dtype == ov.dtype == torch.float32 and tuple(nv.shape) == tuple(ov.shape)


def _runtime_step(op: int, c: fx.Node, ub_out: list[fx.Node] | None) -> tuple[int, float]:
    """Scale-chain step whose constant the kernel loads from `c` at run time (NaN marks the slot)."""
    if ub_out is None:
        raise Reject(f"scale constant {c.name} is a runtime value: {LIFTED_SCALAR_HINT}")
    if ub_out:
        raise Reject(
            f"the scale chain reads more than one runtime value ({c.name} and {ub_out[0].name}); "
            f"the kernel loads one: {LIFTED_SCALAR_HINT}"
        )
    ub_out.append(c)
    return op, math.nan


def _peel_unsqueeze(s: Any, nodes: set[fx.Node]) -> tuple[Any, bool]:
    """`s.unsqueeze(-1)` -> (s, True): the `[M, H/g]` scale form broadcast back over its group."""
    if is_op(s, aten.unsqueeze.default) and s.args[1] in (-1, tval(s).dim() - 1):
        nodes.add(s)
        return s.args[0], True
    return s, False


def amax_source(base: Any, nodes: set[fx.Node], keepdim: bool = True) -> Any:
    """If base is amax(|t|) (or max(|t|, dim).values) over the last dim, return t.

    keepdim=False is the `[M, H/g]` form whose scale is unsqueezed before the divide.
    """
    if is_op(base, aten.amax.default):
        red = base
    elif (
        isinstance(base, fx.Node)
        and base.target is operator.getitem
        and base.args[1] == 0
        and is_op(base.args[0], aten.max.dim)
    ):
        red = base.args[0]
        if len(red.users) != 1:
            raise Reject("max() indices are used")
        nodes.add(base)
    else:
        return None
    ab = red.args[0]
    if not is_op(ab, aten.abs.default):
        raise Reject("scale reduces max without abs()")
    ndim = tval(ab).dim()
    red_dims = red.args[1] if len(red.args) > 1 else red.kwargs.get("dim")
    if ndim > 1 and is_op(red, aten.amax.default) and (not red_dims or norm_dims(red_dims, ndim) == list(range(ndim))):
        if all(type(d) is int and d == 1 for d in tval(ab).shape[:-1]):
            # one row (decode of one sequence, static shape): the whole-tensor amax IS its row's amax,
            # and the one scale is rebuilt in the graph's shape (0-d or all-ones) by the rewrite
            nodes.update({red, ab})
            return ab.args[0]
        raise Reject("amax over the whole tensor (per-tensor dynamic scale): every row waits for a grid-wide "
                     "reduction, so there is no one-pass kernel to fuse into")
    if keepdim and not is_last_dim_reduction(red, ndim):
        raise Reject("amax is not over the last dim with keepdim=True")
    if not keepdim:
        kd = red.args[2] if len(red.args) > 2 else red.kwargs.get("keepdim", False)
        if kd or norm_dims(red_dims, ndim) != [ndim - 1]:
            raise Reject("amax is not over the last dim (its scale is unsqueezed after it)")
    nodes.update({red, ab})
    return ab.args[0]


def _merge_clamp(qmin: float, qmax: float, lo: Any, hi: Any, n_before: int) -> tuple[float, float]:
    """Fold an inner clamp [lo, hi] into the outer range [qmin, qmax] met so far.

    clamp(clamp(v, a, b), c, d) == clamp(v, max(a, c), min(b, d)) only when both ranges are
    well-formed and overlap; otherwise the result is a constant the single-clamp kernel
    would get wrong, so that form is rejected.
    """
    a = -math.inf if lo is None else literal(lo)
    b = math.inf if hi is None else literal(hi)
    if n_before == 0:
        return a, b  # one clamp: min(max(v, a), b) is exactly what the kernel does, even for a > b
    if a > b or qmin > qmax or max(a, qmin) > min(b, qmax):
        raise Reject(
            f"successive quant clamps [{a:g}, {b:g}] then [{qmin:g}, {qmax:g}] do not overlap; "
            "they cannot be merged into one clamp"
        )
    return max(a, qmin), min(b, qmax)


def match_quant(
    y: fx.Node, owner: set[fx.Node], inputs: Mapping[fx.Node, str], what: str = "normalized output"
) -> QuantMatch:
    """Match the quantization of `y`: one chain, or several identical ones (one per linear).

    `owner` is the producer region (its nodes may use the quant's intermediates); `inputs` maps
    the producer's own inputs to the reason given when the quant reads one of them instead of `y`;
    `what` names `y` in reasons. Several chains that compute the same bits (same scheme, constants,
    static scale node, dtypes, shapes) become one match whose `sinks`/`scale_outs` list them all;
    chains that differ are a near miss.
    """
    sinks = find_sinks(y)
    if not sinks:
        raise Reject(f"{what} is not quantized to fp8/int8")
    matches = [_match_chain(y, sink, inputs) for sink in sinks]
    q = matches[0]
    for other in matches[1:]:
        if other.signature() != q.signature():
            diff = _first_difference(q, other)
            raise Reject(f"{what} feeds {len(sinks)} quantizations that differ ({diff})")
    nodes = set().union(*(m.nodes for m in matches))
    q.nodes = nodes
    q.sinks = [m.sink for m in matches]
    q.scale_outs = [m.scale_out for m in matches if m.scale_out is not None]
    # intermediates must not escape
    escape_ok = set(q.sinks) | set(q.scale_outs)
    region = nodes | owner
    for node in nodes - escape_ok:
        if _outside_users(node, region, q):
            raise Reject(f"intermediate {node.name} of the quant is used elsewhere")
    if _outside_users(y, region, q):
        raise Reject(f"{what} is also used outside the quantization")
    yv = tval(y)
    lead, n_tok = tuple(yv.shape[:-1]), math.prod(yv.shape[:-1])
    sv = tval(q.sink)
    if not is_row_contiguous(sv):
        raise Reject(f"quantized output {q.sink.name} is not contiguous; the fused op writes rows in order")
    q.q_shape = shape_recipe(tuple(sv.shape), lead, n_tok * yv.shape[-1], "quant output")
    if q.scale_out is not None:
        per_row = yv.shape[-1] // q.group_size if q.scheme == PER_GROUP else 1
        q.s_shape = shape_recipe(tuple(tval(q.scale_out).shape), lead, n_tok * per_row, "scale")
    return q


def _outside_users(node: fx.Node, region: set[fx.Node], q: QuantMatch) -> list[fx.Node]:
    """Users of `node` outside the region, except size reads (`sym_size`, e.g. of a flattened view
    for a later `q.reshape(view.shape)`) of a size the quantized output also has: those are
    recorded in `q.shape_reads` and rerouted to the fused output by `reroute_shape_reads`."""
    out = []
    for u in node.users:
        if u in region:
            continue
        if is_op(u, aten.sym_size.int) and isinstance(u.args[1], int):
            size = tval(node).shape[u.args[1]]
            j = next((k for k, d in enumerate(tval(q.sink).shape) if _known_eq(d, size)), None)
            if j is not None:
                q.shape_reads.append((u, j))
                continue
        out.append(u)
    return out


def reroute_shape_reads(graph: fx.Graph, q: QuantMatch, q_new: fx.Node) -> None:
    """Point the recorded size reads of replaced nodes at the same size of the fused q output."""
    for u, j in q.shape_reads:
        with graph.inserting_after(q_new):
            n = graph.call_function(aten.sym_size.int, (q_new, j))
        n.meta.update(u.meta)
        u.replace_all_uses_with(n)
        graph.erase_node(u)
        record_inserted(graph, [n])  # its users may sit before it: the toposort must see them
    q.shape_reads.clear()


_SIGNATURE_FIELDS = (
    "scheme", "group size", "static scale", "static scale value", "scale ops", "scale constants",
    "multiply vs divide", "clamp min", "clamp max", "rounding", "quant dtype", "output shape", "scale shape",
    "scale upper bound tensor", "scale upper bound position",
)


def _first_difference(a: QuantMatch, b: QuantMatch) -> str:
    for name, x, z in zip(_SIGNATURE_FIELDS, a.signature(), b.signature()):
        if x != z:
            return f"{name}: {x} vs {z}"
    return "unknown"


def _match_chain(y: fx.Node, sink: fx.Node, inputs: Mapping[fx.Node, str]) -> QuantMatch:
    """Match one quant chain ending at `sink` (escape checks are done on the union by the caller)."""
    qdtype = convert_dtype(sink)
    nodes: set[fx.Node] = {sink}
    t = sink.args[0]
    qmin, qmax = -math.inf, math.inf
    n_clamps = 0
    while is_op(t, aten.clamp_min.default, aten.clamp_max.default, aten.clamp.default):
        if is_op(t, aten.clamp.default):
            lo = t.args[1] if len(t.args) > 1 else t.kwargs.get("min")
            hi = t.args[2] if len(t.args) > 2 else t.kwargs.get("max")
        elif is_op(t, aten.clamp_min.default):
            lo, hi = t.args[1], None
        else:
            lo, hi = None, t.args[1]
        if (lo is not None and literal(lo) is None) or (hi is not None and literal(hi) is None):
            raise Reject("quant clamp bound is not a constant")
        qmin, qmax = _merge_clamp(qmin, qmax, lo, hi, n_clamps)
        n_clamps += 1
        nodes.add(t)
        t = t.args[0]
    round_to_int = False
    if is_op(t, aten.round.default):
        round_to_int = True
        nodes.add(t)
        t = t.args[0]
    if not is_op(t, aten.div.Tensor, aten.mul.Tensor) or t.kwargs:
        raise Reject("quant does not divide or multiply by a scale")
    if tval(t).dtype != torch.float32:
        raise Reject(f"quant arithmetic in {tval(t).dtype}, not float32")
    nodes.add(t)
    quant_mul = is_op(t, aten.mul.Tensor)
    a, s = t.args
    if quant_mul and not depends_on_any(a, {y}):
        a, s = s, a
    if depends_on_any(s, {y}) is False and not isinstance(s, fx.Node) and literal(s) is None:
        raise Reject("quant scale is neither a tensor nor a constant")
    src0 = strip_f32_convert(a)[0]
    if src0 in inputs:
        raise Reject(inputs[src0])
    kind, g, dims = value_source(a, y, nodes)

    scheme, static_value, scale_node, scale_out = STATIC, 1.0, None, None
    scale_ub, ub_slot = None, -1
    ops: list[int] = []
    consts: list[float] = []
    if literal(s) is not None:
        static_value = literal(s)
    else:
        if tval(s).dtype != torch.float32:
            raise Reject(f"scale dtype {tval(s).dtype}, not float32")
        chain_nodes: set[fx.Node] = set()
        ub_out: list[fx.Node] = []
        s_eff, unsq = _peel_unsqueeze(s, chain_nodes) if depends_on_any(s, {y}) else (s, False)
        base, ops, consts = scale_chain(s_eff, chain_nodes, y, ub_out)
        if not unsq:
            base, unsq = _peel_unsqueeze(base, chain_nodes)
            if unsq:
                base, ops2, consts2 = scale_chain(base, chain_nodes, y, ub_out)
                ops, consts = ops2 + ops, consts2 + consts
                if len(ops) > MAX_SCALE_OPS:
                    raise Reject(f"scale is computed by {len(ops)} ops; at most {MAX_SCALE_OPS} supported")
        if depends_on_any(base, {y}):
            src = amax_source(base, chain_nodes, keepdim=not unsq)
            if src is None:
                if is_op(base, aten.div.Tensor, aten.mul.Tensor) and any(is_lifted_scalar(x) for x in base.args):
                    raise Reject(f"a scale constant is a graph input, not a constant: {LIFTED_SCALAR_HINT}")
                raise Reject(f"scale is derived from the tensor by an unsupported op ({getattr(base, 'name', base)})")
            src_kind, src_g, src_dims = value_source(src, y, chain_nodes)
            if (src_kind, src_g) != (kind, g):
                raise Reject("scale groups differ from the quantized groups")
            if not _same_dims(src_dims, dims):
                raise Reject(
                    f"scale rows {tuple(src_dims)} differ from the quantized rows {tuple(dims)} "
                    "(the amax and the divide read differently flattened views)"
                )
            scheme = PER_GROUP if kind == "group" else PER_TOKEN
            scale_out = s_eff
            if ub_out:
                scale_ub = ub_out[0]
                ub_slot = next(i for i, c in enumerate(consts) if math.isnan(c))
                consts[ub_slot] = 0.0
            nodes |= chain_nodes
        else:
            if ub_out:
                raise Reject("static scale with a tensor upper bound or a runtime scale-chain value")
            if kind != "row":
                raise Reject("static scale with grouped reshape")
            if not isinstance(base, fx.Node):
                raise Reject("static scale base is not a tensor")
            bv = tval(base)
            if bv.numel() != 1:
                for inp, reason in inputs.items():
                    if depends_on_any(base, {inp}):
                        raise Reject(reason.replace("quantization reads", "the quant scale is computed from"))
            if bv.numel() != 1 or bv.dtype != torch.float32:
                raise Reject(f"static scale must be a one-element float32 tensor, got {tuple(bv.shape)} {bv.dtype}")
            scale_node = base
            # static chain nodes stay in the graph (DCE removes them if unused)
    if scheme != PER_GROUP and kind == "group":
        raise Reject("grouped quant without a per-group scale")
    return QuantMatch(
        scheme, g, scale_node, static_value, ops, consts, quant_mul, qmin, qmax, round_to_int, qdtype, sink, scale_out, nodes,
        scale_ub=scale_ub, ub_slot=ub_slot,
    )


