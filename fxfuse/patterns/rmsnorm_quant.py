"""RMSNorm (+ residual add) followed by fp8/int8 quantization -> one fused kernel.

Written forms vary (HF Llama rounds before the weight, F.rms_norm after it, Gemma adds 1 to the
weight, quant divides or multiplies, clamps the scale before or after dividing by 448...). So this
is node surgery, not a fixed pattern: starting from each `rsqrt`, walk the graph and *capture*
the parameters of what was written (eps, rounding points, weight offset, the op chain that turns
amax into the scale, clamp bounds) instead of enumerating variants. Every capture is checked:
dims, keepdim, dtypes, shapes (symbolic too), strides, device, and that no intermediate value
escapes the region. The first failed check becomes the near-miss reason.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ..fx_utils import (
    LIFTED_SCALAR_HINT,
    Reject,
    aten,
    convert_dtype,
    depends_on_any,
    gate_class,
    insert_traced,
    is_convert,
    is_last_dim_reduction,
    is_lifted_scalar,
    is_op,
    is_row_contiguous,
    kernel_devices_ok,
    literal,
    other_arg,
    runtime_scalar,
    scalar_on,
    stable_toposort,
    tval,
    val,
)
from .. import gating
from .quant import (
    PER_GROUP,
    QUANT_DTYPES,
    SCHEME_NAMES,
    QuantMatch,
    match_quant as _match_quant,
    strip_f32_convert as _strip_f32_convert,
    written_outputs,
)

FAMILY = "rmsnorm_quant"
NORM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_HIDDEN = 65536  # one row per program, whole row in registers


@dataclass
class NormMatch:
    x: fx.Node
    residual: fx.Node | None
    h: fx.Node  # the residual sum (or x)
    eps: float | None  # None: a runtime value, `eps_node` (never bake a stand-in)
    weight: fx.Node | None
    weight_offset: float
    weight_sum_dtype: torch.dtype | None
    round_before_weight: bool
    y: fx.Node  # normalized, weighted output
    nodes: set[fx.Node] = field(default_factory=set)
    # eps as a one-element fp32 tensor read at run time (a float attribute that dynamic=True lifted
    # into a graph input); `eps` is then None
    eps_node: fx.Node | None = None


# ----------------------------------------------------------------------------- RMSNorm part


def match_norm(rsqrt: fx.Node) -> NormMatch:
    nodes: set[fx.Node] = {rsqrt}
    add_eps = rsqrt.args[0]
    if not is_op(add_eps, aten.add.Tensor, aten.add.Scalar) or len(add_eps.args) != 2 or add_eps.kwargs:
        raise Reject("rsqrt input is not mean(x^2) + eps")
    a, b = add_eps.args
    mean, eps = (a, literal(b)) if literal(b) is not None else (b, literal(a))
    eps_node = None
    if eps is None or not isinstance(mean, fx.Node):
        mean, eps_node = _runtime_eps(add_eps)
    nodes.add(add_eps)
    if is_op(mean, aten.reshape.default, aten.unsqueeze.default) and is_op(mean.args[0], aten.mean.dim):
        raise Reject("mean is not over the last dim with keepdim=True (mean(-1) then unsqueeze: use keepdim=True)")
    if not is_op(mean, aten.mean.dim):
        raise Reject("rsqrt does not read a mean")
    nodes.add(mean)
    sq = mean.args[0]
    sqv = tval(sq)
    if not is_last_dim_reduction(mean, sqv.dim()):
        raise Reject("mean is not over the last dim with keepdim=True")
    if is_op(sq, aten.pow.Tensor_Scalar) and literal(sq.args[1]) == 2.0:
        v = sq.args[0]
    elif is_op(sq, aten.mul.Tensor) and sq.args[0] is sq.args[1]:
        v = sq.args[0]
    else:
        raise Reject("mean does not read a square")
    nodes.add(sq)
    vv = tval(v)
    if vv.dtype != torch.float32:
        raise Reject(f"variance computed in {vv.dtype}, not float32")
    mean_dt = mean.kwargs.get("dtype")
    for node in (mean, add_eps, rsqrt):
        if tval(node).dtype != torch.float32 or mean_dt not in (None, torch.float32):
            raise Reject(f"variance mean computed in {mean_dt or tval(node).dtype}, not float32")
    h, up = _strip_f32_convert(v)
    hv = tval(h)
    if hv.dtype not in NORM_DTYPES:
        raise Reject(f"input dtype {hv.dtype} not supported")
    if up is not None:
        nodes.add(up)
    # n = v * rsqrt
    if len(rsqrt.users) != 1:
        if any(u.op == "output" for u in rsqrt.users):
            raise Reject(
                "rsqrt is saved for backward (compiled with grad enabled); fusion is for inference: "
                "run under torch.no_grad() or torch.inference_mode()"
            )
        raise Reject("rsqrt has other users")
    (n,) = rsqrt.users
    if not is_op(n, aten.mul.Tensor) or other_arg(n, rsqrt) is not v:
        raise Reject("normalization does not multiply the same tensor by rsqrt")
    nodes.add(n)
    H = hv.shape[-1]

    # residual: h = x + residual, same shape and dtype
    x, residual = h, None
    if is_op(h, aten.add.Tensor) and len(h.args) == 2 and not h.kwargs:
        a, b = h.args
        av, bv = val(a), val(b)
        if (
            isinstance(av, torch.Tensor)
            and isinstance(bv, torch.Tensor)
            and av.dtype == bv.dtype == hv.dtype
            and av.shape == bv.shape == hv.shape
        ):
            x, residual = a, b
            nodes.add(h)

    # n -> y, three written orders
    weight, offset, wsum_dtype, round_before = None, 0.0, None, False
    cur = n
    (u,) = cur.users if len(cur.users) == 1 else (None,)
    if u is None:
        raise Reject("normalized fp32 value has other users")
    if is_convert(u) and convert_dtype(u) == hv.dtype and hv.dtype != torch.float32:
        # HF Llama: round to input dtype first, then weight
        nodes.add(u)
        cur = u
        if len(u.users) == 1 and is_op(next(iter(u.users)), aten.mul.Tensor):
            m = next(iter(u.users))
            weight, offset, wsum_dtype = _weight_expr(other_arg(m, u), H)
            round_before = True
            nodes.add(m)
            cur = m
    elif is_op(u, aten.mul.Tensor):
        weight, offset, wsum_dtype = _weight_expr(other_arg(u, n), H)
        nodes.add(u)
        cur = u
        if len(u.users) == 1 and is_convert(next(iter(u.users))):
            c = next(iter(u.users))
            if convert_dtype(c) in NORM_DTYPES:
                nodes.add(c)
                cur = c
    elif is_convert(u) and convert_dtype(u) in NORM_DTYPES:
        nodes.add(u)
        cur = u
    y = cur
    if tval(y).dtype not in NORM_DTYPES:
        raise Reject(f"normalized output dtype {tval(y).dtype} not supported")
    for node in nodes - {h, y}:
        outside = [user for user in node.users if user not in nodes]
        if outside:
            raise Reject(_escape_reason(node, outside, is_input=node is up or node is h))
    return NormMatch(x, residual, h, eps, weight, offset, wsum_dtype, round_before, y, nodes, eps_node)


def _runtime_eps(add_eps: fx.Node) -> tuple[fx.Node, fx.Node]:
    """(mean, eps) for `mean + eps` whose eps is a one-element fp32 tensor, not a literal: under
    dynamic=True Dynamo lifts `self.eps` into a 0-d float64 input that the graph converts to fp32
    before the add (the same rounding eager applies to a Python float). The kernel reads it at run
    time, so a new value between calls needs no recompile. A SymFloat stays a near miss."""
    a, b = add_eps.args
    for mean, e in ((a, b), (b, a)):
        if is_op(mean, aten.mean.dim) and runtime_scalar(e, {mean}):
            if tuple(tval(add_eps).shape) != tuple(tval(mean).shape):
                raise Reject("eps tensor broadcasts the variance to another shape")
            return mean, e
    if is_lifted_scalar(a) or is_lifted_scalar(b):
        raise Reject(f"eps is a graph input, not a constant or a one-element fp32 tensor: {LIFTED_SCALAR_HINT}")
    raise Reject("eps is not a constant")


def _escape_reason(node: fx.Node, outside: list[fx.Node], is_input: bool, depth: int = 8) -> str:
    """Plain-words reason for a norm intermediate that is used outside the norm."""
    if is_input:
        frontier, seen = list(outside), set(outside)
        for _ in range(depth):
            if any(is_op(n, aten.amax.default, aten.max.dim) for n in frontier):
                return "the quant scale is computed from the pre-norm input, not the normalized output"
            if any(is_convert(n) and convert_dtype(n) in QUANT_DTYPES for n in frontier):
                return "quantization reads the pre-norm input, not the normalized output"
            frontier = [u for n in frontier for u in n.users if u not in seen]
            seen.update(frontier)
        return f"the fp32 copy of the input ({node.name}) is also used outside the norm"
    return f"intermediate {node.name} ({getattr(node.target, '__name__', node.target)}) is also used outside the norm"


def _weight_expr(w: Any, H: Any) -> tuple[fx.Node, float, torch.dtype | None]:
    """Parse the weight factor: w, w.float(), w + c, w.float() + c. Returns (w, offset, sum dtype)."""
    offset, wsum_dtype = 0.0, None
    if is_op(w, aten.add.Tensor, aten.add.Scalar) and not w.kwargs:
        a, b = w.args
        c, base = (literal(b), a) if literal(b) is not None else (literal(a), b)
        if c is not None and isinstance(base, fx.Node):
            offset = c
            dt = tval(w).dtype
            wsum_dtype = None if dt == torch.float32 else dt
            w = base
    w, _ = _strip_f32_convert(w)
    if not isinstance(w, fx.Node):
        raise Reject("weight is not a tensor")
    wv = tval(w)
    if wv.dim() != 1 or wv.shape[0] != H:
        raise Reject(f"weight shape {tuple(wv.shape)} is not [hidden]")
    if not wv.is_floating_point():
        raise Reject("weight is not floating point")
    if wv.dtype not in NORM_DTYPES:
        raise Reject(f"weight dtype {wv.dtype} not supported (bf16/fp16/fp32)")
    return w, offset, wsum_dtype


# ----------------------------------------------------------------------------- checks + rewrite


def match_quant(norm: NormMatch) -> QuantMatch:
    """The quantization of the normalized output (reading x or the residual sum is a near miss)."""
    reason = "quantization reads the pre-norm input, not the normalized output"
    return _match_quant(norm.y, norm.nodes, {norm.x: reason, norm.h: reason})


def check(norm: NormMatch, q: QuantMatch, gate: bool = True) -> None:
    xv = tval(norm.x)
    H = xv.shape[-1]
    if not isinstance(H, int):
        raise Reject("hidden size is symbolic; the kernel needs a static row length")
    if H > MAX_HIDDEN:
        raise Reject(f"hidden size {H} above {MAX_HIDDEN}")
    tensors = [xv] + [tval(n) for n in (norm.residual, norm.weight) if n is not None]
    scalars = [tval(n) for n in (q.scale, q.scale_ub, norm.eps_node) if n is not None]
    if not kernel_devices_ok(*tensors, scalars=scalars):
        raise Reject("inputs are on different devices")
    dev = xv.device.type
    if dev not in ("cpu", "cuda"):
        raise Reject(f"device {dev} not supported")
    for node in (norm.x, norm.residual):
        if node is not None and not is_row_contiguous(tval(node)):
            raise Reject(f"{node.name} is not contiguous")
    if norm.weight is not None and tval(norm.weight).stride(0) != 1:
        raise Reject("weight is not contiguous")
    if q.scheme == PER_GROUP and (q.group_size & (q.group_size - 1) or H % q.group_size):
        raise Reject(f"group size {q.group_size} must be a power of two dividing {H}")
    # dependency order: inputs must not be computed from the region
    region = norm.nodes | q.nodes
    for inp in (norm.x, norm.residual, norm.weight, q.scale, q.scale_ub, norm.eps_node):
        if inp is not None and depends_on_any(inp, region):
            raise Reject(f"input {inp.name} depends on the region itself")
    if dev == "cuda":
        scheme = gate_class(SCHEME_NAMES[q.scheme], xv, scalars)
        why = gating.rejects(FAMILY, scheme=scheme, hidden=H, dtype=xv.dtype, enabled=gate,
                             M=math.prod(xv.shape[:-1]))  # token count: int, or SymInt (dynamic)
        if why:
            raise Reject(why)


def rewrite(graph: fx.Graph, norm: NormMatch, q: QuantMatch) -> list[fx.Node]:
    """Insert the fused op and reroute every escaping value. Returns the replaced nodes."""
    from ..kernels import rmsnorm_quant as _k  # noqa: F401  (registers torch.ops.fxfuse.rms_norm_quant)

    xv = tval(norm.x)
    H = xv.shape[-1]
    need_h = norm.residual is not None and any(u not in norm.nodes for u in norm.h.users)
    inputs = [n for n in (norm.x, norm.residual, norm.weight, q.scale, q.scale_ub, norm.eps_node) if n is not None]
    has_res, has_w, has_s = norm.residual is not None, norm.weight is not None, q.scale is not None
    has_ub, has_eps_t = q.scale_ub is not None, norm.eps_node is not None
    params = dict(
        eps=0.0 if norm.eps is None else norm.eps,  # eps_tensor replaces it when None
        weight_offset=norm.weight_offset,
        weight_sum_dtype=norm.weight_sum_dtype,
        round_before_weight=norm.round_before_weight,
        norm_dtype=tval(norm.y).dtype,
        need_residual_out=need_h,
        **q.op_params(),
    )

    plan = q.output_plan()  # plain values: the trace cache keys the closure

    def replacement(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        it = iter(args)
        x = next(it)
        res = next(it) if has_res else None
        w = next(it) if has_w else None
        sc = next(it) if has_s else None
        ub = next(it) if has_ub else None
        eps_t = next(it) if has_eps_t else None
        lead = x.shape[:-1]
        runtime = {} if eps_t is None else {"eps_tensor": scalar_on(eps_t, x)}
        qo, so, ho = torch.ops.fxfuse.rms_norm_quant(
            x.reshape(-1, H),
            None if res is None else res.reshape(-1, H),
            w,
            None if sc is None else scalar_on(sc, x),
            scale_ub=None if ub is None else scalar_on(ub, x),
            **params,
            **runtime,
        )
        qo, so = written_outputs(plan, qo, so, lead)  # token dims as in x, or flattened
        ho = ho.reshape(x.shape) if need_h else ho
        return qo, so, ho

    on_cuda = xv.device.type == "cuda"
    q_new, s_new, h_new = insert_traced(graph, replacement, inputs, before=q.sink, functionalize=on_cuda)
    q.reroute(graph, q_new, s_new)
    if need_h:
        for u in list(norm.h.users):
            if u not in norm.nodes:
                u.replace_input_with(norm.h, h_new)
    stable_toposort(graph)
    replaced = sorted(norm.nodes | q.nodes, key=lambda n: n.name)
    return replaced


class RMSNormQuant:
    name = FAMILY

    def __call__(self, graph: fx.Graph, ctx: Any) -> None:
        for node in list(graph.nodes):
            if node.graph is not graph or not is_op(node, aten.rsqrt.default):
                continue
            with ctx.candidate(FAMILY, node):
                norm = match_norm(node)
                q = match_quant(norm)
                check(norm, q, gate=ctx.options.get("gate", True))
                replaced = rewrite(graph, norm, q)
                kernel = "triton:fxfuse_rms_norm_quant" if tval(norm.x).device.type == "cuda" else "fxfuse::rms_norm_quant"
                detail = f"{SCHEME_NAMES[q.scheme]} {q.qdtype} H={tval(norm.x).shape[-1]}" + (
                    " +residual" if norm.residual is not None else ""
                ) + (f" shared by {len(q.sinks)} quantizations" if len(q.sinks) > 1 else "")
                ctx.applied(FAMILY, replaced, kernel, detail)


PASS = RMSNormQuant()
