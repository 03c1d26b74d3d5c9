"""Unwrap opaque custom ops into ATen so Inductor and the fusion passes can see through them.

Serving stacks hide RMSNorm, quant, RoPE and MoE routing in opaque ops (C++ out-variants with
`mutates_args`, Python `torch.library.custom_op`s). Inductor cannot fuse across those. This stage
replaces each such node with an ATen trace of a *decomposition*: a Python function written
against the op's schema that does what the op does (it mutates its mutable arguments in place,
exactly like the op, and returns what the op returns). It runs before recognition, so an
unwrapped RMSNorm followed by an unwrapped quant becomes the fused RMSNorm+quant kernel.

Three node forms are handled:
  * a plain functional call `ns::op(...)`;
  * `auto_functionalized(op, **kwargs)` (v1): returns (op outputs..., new values of mutable args);
  * `auto_functionalized_v2(op, _all_bases=[...], **kwargs)`: returns (op outputs..., new bases),
    or, for ops tagged `out`, just the out tensors. Mutable args that are views of a base (vLLM's
    RoPE writes q and k, two slices of one qkv buffer) are regenerated from a clone of the base
    with the recorded view info, so the trace's functionalization scatters the writes exactly
    where the op's would land; views with graph-computed geometry are left alone.
Their `getitem` users are rerouted to the traced values; the trailing `copy_` into mutated graph
inputs stays, reading the new values, so every value the caller sees is unchanged. Out buffers
that are graph-internal allocations disappear: the trace writes `copy(clone(buf), value)`, which
is folded to `value` when it is an exact overwrite.
"""

from __future__ import annotations

import hashlib
import operator
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx

from .._log import log
from ..fx_utils import Reject, aten, inline_graph, is_op, trace_aten, val

FAMILY = "unwrap"
Decomposition = Callable[..., Any]

_REGISTRY: dict[str, Decomposition] = {}
"""Qualified op name ('ns::op' for every overload, or 'ns::op.overload') -> decomposition."""

# Namespaces whose ops are not opaque: core ATen, Inductor's own, collectives, fxfuse's fused ops.
_TRANSPARENT_NAMESPACES = frozenset(
    {"aten", "prims", "rngprims", "debugprims", "higher_order", "inductor", "fxfuse", "profiler",
     "_c10d_functional", "_c10d_functional_autograd", "c10d", "c10d_functional", "_dtensor", "quantized_decomposed"}
)
_AF = torch.ops.higher_order.auto_functionalized
_AF2 = torch.ops.higher_order.auto_functionalized_v2


# ----------------------------------------------------------------------------- registry


def op_key(op: Any) -> str:
    """Registry key of an OpOverload ('ns::name.overload'), OpOverloadPacket or name string ('ns::name')."""
    if isinstance(op, torch._ops.OpOverload):
        return f"{op._schema.name}.{op._overloadname}"
    if isinstance(op, torch._ops.OpOverloadPacket):
        return op._qualified_op_name
    if isinstance(op, str):
        ns, sep, name = op.partition("::")
        if not sep or not ns or not name or "::" in name or name.startswith(".") or name.endswith("."):
            raise ValueError(f"op name {op!r} is not qualified ('namespace::name' or 'namespace::name.overload')")
        return op
    raise TypeError(f"register_unwrap expects an OpOverload, OpOverloadPacket or 'ns::name' string, not {type(op).__name__}")


def register_unwrap(op: Any, decomposition: Decomposition | None = None) -> Any:
    """Register the ATen decomposition that replaces `op` in compiled graphs.

    `op` is an OpOverload (that overload only), an OpOverloadPacket or a 'ns::name' string (every
    overload). `decomposition` takes the op's arguments in schema order, mutates the mutable ones
    in place like the op does, and returns what the op returns; it is traced to ATen with each
    node's fake values. Without `decomposition` this returns a decorator.
    """
    key = op_key(op)
    schemas = _schemas_for(key)

    def deco(fn: Decomposition) -> Decomposition:
        if not callable(fn):
            raise TypeError("decomposition must be callable")
        for schema in schemas:
            _check_arity(key, fn, schema)
        _REGISTRY[key] = fn
        log.debug("fxfuse unwrap: registered decomposition %s for %s", getattr(fn, "__qualname__", fn), key)
        return fn

    return deco if decomposition is None else deco(decomposition)


def _schemas_for(key: str) -> list[Any]:
    """Schemas a registration under `key` applies to; raises for ops that can never be unwrapped.

    A name that is not loaded yet is allowed (the library may be imported later, like the
    built-ins) but logged as a warning, so a typo does not go unnoticed.
    """
    import warnings

    qual, _, overload = key.partition(".")
    ns = qual.split("::", 1)[0]
    if ns in _TRANSPARENT_NAMESPACES:
        raise ValueError(f"{key}: ops in namespace {ns!r} are not opaque and are never unwrapped")
    try:
        schemas = list(torch._C._jit_get_schemas_for_operator(qual))
    except Exception:  # noqa: BLE001 - no such op
        schemas = []
    if not schemas:
        warnings.warn(f"fxfuse.register_unwrap: no op {qual} is loaded yet; the decomposition applies once it is", stacklevel=3)
        return []
    if overload:
        match = [sc for sc in schemas if (sc.overload_name or "default") == overload]
        if not match:
            have = sorted(sc.overload_name or "default" for sc in schemas)
            raise ValueError(f"{qual} has no overload {overload!r} (overloads: {', '.join(have)})")
        return match
    return schemas


def _check_arity(key: str, fn: Decomposition, schema: Any) -> None:
    """The decomposition is called with the schema's arguments by position (kw-only by name)."""
    import inspect

    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins without a signature: cannot check
    pos = [a.name for a in schema.arguments if not a.kwarg_only]
    kwo = {a.name: None for a in schema.arguments if a.kwarg_only}
    try:
        sig.bind(*pos, **kwo)
    except TypeError as e:
        raise TypeError(f"decomposition {getattr(fn, '__qualname__', fn)} cannot take the arguments of {schema}: {e}") from None


def unregister_unwrap(op: Any) -> None:
    """Forget the decomposition registered for `op` (no error if none)."""
    _REGISTRY.pop(op_key(op), None)


def lookup(op: torch._ops.OpOverload) -> Decomposition | None:
    """The decomposition for this overload: an exact-overload registration wins over the packet's."""
    full = op_key(op)
    return _REGISTRY.get(full) or _REGISTRY.get(op._schema.name)


def registry_digest() -> str | None:
    """Part of the pipeline uuid: registered op names and what each decomposition computes (code,
    closure values, helpers it calls); None when a decomposition cannot be identified."""
    from .._identity import callable_identity

    _sync_builtins()
    h = hashlib.sha256()
    for key in sorted(_REGISTRY):
        ident = callable_identity(_REGISTRY[key])
        if ident is None:
            return None
        h.update(key.encode() + b"\x00" + ident.encode() + b"\x01")
    return h.hexdigest()


def _sync_builtins() -> None:
    from . import unwrap_builtin

    unwrap_builtin.register_builtins()


# ----------------------------------------------------------------------------- node forms


def _is_opaque(op: Any) -> bool:
    return isinstance(op, torch._ops.OpOverload) and op.namespace not in _TRANSPARENT_NAMESPACES


class _Site:
    """One custom-op call in the graph, in whichever form it appears."""

    def __init__(self, node: fx.Node, op: torch._ops.OpOverload, form: str) -> None:
        self.node, self.op, self.form = node, op, form
        self.schema = op._schema

    @property
    def mutable_names(self) -> list[str]:
        return [a.name for a in self.schema.arguments if a.alias_info is not None and a.alias_info.is_write]


def _site(node: fx.Node) -> _Site | None:
    if node.op != "call_function":
        return None
    if node.target is _AF or node.target is _AF2:
        op = node.args[0] if node.args else node.kwargs.get("_mutable_op")
        if isinstance(op, torch._ops.OpOverload) and op.namespace not in ("aten", "prims"):
            return _Site(node, op, "v1" if node.target is _AF else "v2")
        return None
    if _is_opaque(node.target):
        if node.target._schema.is_mutable:
            return None  # not functionalized; never seen post-grad
        return _Site(node, node.target, "plain")
    return None


def _plain_arg(node: fx.Node, idx: int, arg: Any) -> Any:
    if arg.kwarg_only or idx >= len(node.args):
        if arg.name in node.kwargs:
            return node.kwargs[arg.name]
        if arg.has_default_value():
            return arg.default_value
        raise Reject(f"argument {arg.name} missing")
    return node.args[idx]


class _View:
    """How a v2 mutable argument is regenerated from its base (auto_functionalize's ViewInfo)."""

    def __init__(self, base_index: int, kind: str, params: tuple[Any, ...] = ()) -> None:
        self.base_index, self.kind, self.params = base_index, kind, params

    def regenerate(self, bases: list[torch.Tensor]) -> torch.Tensor:
        base = bases[self.base_index]
        if self.kind == "slice":
            return aten.slice.Tensor(base, *self.params)
        if self.kind == "as_strided":
            return torch.as_strided(base, *self.params)
        if self.kind == "alias":
            return aten.alias.default(base)
        return base


def _v2_view(site: _Site, name: str) -> _View | None:
    """The view info of a v2 mutable arg (None when the arg is None); Reject symbolic view params."""
    kw = site.node.kwargs
    idx = kw.get(f"_{name}_base_index")
    if idx is None:
        return None
    if f"_{name}_alias" in kw:
        view = _View(idx, "alias")
    elif f"_{name}_storage_offset" in kw:
        view = _View(idx, "as_strided", (kw[f"_{name}_size"], kw[f"_{name}_stride"], kw[f"_{name}_storage_offset"]))
    elif f"_{name}_slice_dim" in kw:
        view = _View(idx, "slice", (kw[f"_{name}_slice_dim"], kw[f"_{name}_slice_start"], kw[f"_{name}_slice_end"]))
    else:
        view = _View(idx, "base")
    flat = [p for q in view.params for p in (q if isinstance(q, (list, tuple)) else [q])]
    if any(isinstance(p, fx.Node) for p in flat):
        raise Reject(f"mutable argument {name} is a view with graph-computed geometry")
    return view


def _call_values(site: _Site) -> tuple[dict[str, Any], bool]:
    """(argument name -> graph value or view/out-buffer descriptor, is v2 out-form)."""
    node, schema = site.node, site.schema
    values: dict[str, Any] = {}
    out_form = False
    if site.form == "plain":
        for i, a in enumerate(schema.arguments):
            values[a.name] = _plain_arg(node, i, a)
        return values, out_form
    kw = dict(node.kwargs)
    mutable = set(site.mutable_names)
    if site.form == "v2":
        out_form = all(f"_{n}_size" in kw and f"_{n}_base_index" not in kw for n in mutable) and bool(mutable)
        if not out_form:
            for n in mutable:
                if f"_{n}_length" in kw:
                    raise Reject(f"mutable tensor-list argument {n} is not supported")
                values[n] = ("__view__", _v2_view(site, n))
    for a in schema.arguments:
        if a.name in values:
            continue
        if a.name in mutable and out_form:
            values[a.name] = ("__out__", kw[f"_{a.name}_size"], kw[f"_{a.name}_stride"], kw[f"_{a.name}_dtype"], kw[f"_{a.name}_device"])
        elif a.name in kw:
            values[a.name] = kw[a.name]
        elif a.has_default_value():
            values[a.name] = a.default_value
        else:
            raise Reject(f"argument {a.name} missing")
    return values, out_form


# ----------------------------------------------------------------------------- tracing


def _python_impl(op: torch._ops.OpOverload, device: str | None) -> Decomposition | None:
    """The Python implementation of a `torch.library.custom_op`, if op is one."""
    try:
        from torch._library.custom_ops import _maybe_get_opdef

        opdef = _maybe_get_opdef(op._name)
    except Exception:  # noqa: BLE001 - private API; absent means "not a Python custom op"
        return None
    if opdef is None:
        return None
    fns = getattr(opdef, "_backend_fns", {}) or {}
    return fns.get(device) or fns.get(None) or getattr(opdef, "_init_fn", None)


def _device_of(node: fx.Node) -> str | None:
    for i in node.all_input_nodes:
        fv = val(i)
        if isinstance(fv, torch.Tensor):
            return fv.device.type
    return None


def _build_trace(site: _Site, decomp: Decomposition, values: dict[str, Any], out_form: bool) -> tuple[Callable[..., Any], list[fx.Node]]:
    """A function of the tensor inputs that runs decomp on private copies of the mutable args.

    It returns (op returns..., new values): for v2 the new value of every `_all_bases` entry
    (mutable args are regenerated as views of cloned bases, so writes through slices or shared
    bases land where the op's would); otherwise the new value of each non-None mutable arg.
    """
    schema = site.schema
    mutable = site.mutable_names
    bases: list[fx.Node] = list(site.node.kwargs.get("_all_bases", ())) if site.form == "v2" and not out_form else []
    if not all(isinstance(b, fx.Node) and isinstance(val(b), torch.Tensor) for b in bases):
        raise Reject("a mutated base is not a tensor in the graph")
    inputs: list[fx.Node] = list(bases)
    plan: list[tuple[str, Any]] = []  # (kind, payload) per schema argument
    for a in schema.arguments:
        v = values[a.name]
        if isinstance(v, tuple) and len(v) == 2 and v[0] == "__view__":
            plan.append(("view", v[1]))
        elif isinstance(v, fx.Node):
            if not isinstance(val(v), torch.Tensor):
                raise Reject(f"argument {a.name} is a symbolic/graph scalar, not a constant")
            plan.append(("tensor", len(inputs)))
            inputs.append(v)
        elif isinstance(v, (list, tuple)) and v and v[0] == "__out__":
            _, size, stride, dtype, device = v
            if not all(isinstance(s, int) for s in (*size, *stride)):
                raise Reject(f"out buffer {a.name} has symbolic size")
            plan.append(("empty", (tuple(size), tuple(stride), dtype, device)))
        elif isinstance(v, (list, tuple)) and any(isinstance(e, fx.Node) for e in v):
            if not all(isinstance(e, fx.Node) and isinstance(val(e), torch.Tensor) for e in v):
                raise Reject(f"argument {a.name} mixes tensors and graph scalars")
            plan.append(("list", (len(inputs), len(v))))
            inputs.extend(v)
        else:
            plan.append(("const", v))
    n_ret = len(schema.returns)

    def traced(*flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        new_bases = [b.clone() for b in flat[: len(bases)]]
        for b, nb in zip(flat, new_bases):
            if nb.stride() != b.stride():
                raise Reject("a mutated base is not dense; its clone would change strides")
        args: dict[str, Any] = {}
        for a, (kind, p) in zip(schema.arguments, plan):
            if kind == "view":
                args[a.name] = None if p is None else p.regenerate(new_bases)
            elif kind == "tensor":
                args[a.name] = flat[p]
            elif kind == "list":
                args[a.name] = list(flat[p[0] : p[0] + p[1]])
            elif kind == "empty":
                size, stride, dtype, device = p
                args[a.name] = torch.empty_strided(size, stride, dtype=dtype, device=device)
            else:
                args[a.name] = p
        for n in mutable:
            if isinstance(args[n], torch.Tensor) and plan[_arg_index(schema, n)][0] not in ("empty", "view"):
                args[n] = args[n].clone()  # the op's writes land in a private copy
        pos = [args[a.name] for a in schema.arguments if not a.kwarg_only]
        kwo = {a.name: args[a.name] for a in schema.arguments if a.kwarg_only}
        ret = decomp(*pos, **kwo)
        if n_ret == 0:
            rets: list[Any] = []
        elif n_ret == 1:
            rets = [ret]
        else:
            rets = list(ret)
        if len(rets) != n_ret or not all(isinstance(r, torch.Tensor) for r in rets):
            raise Reject(f"decomposition returned {type(ret).__name__}, the schema returns {n_ret} tensor(s)")
        if bases:
            return (*rets, *new_bases)
        return (*rets, *[args[n] for n in mutable if isinstance(args[n], torch.Tensor)])

    return traced, inputs


def _arg_index(schema: Any, name: str) -> int:
    return next(i for i, a in enumerate(schema.arguments) if a.name == name)


def _decomp_table() -> dict[Any, Any]:
    from torch._inductor.decomposition import select_decomp_table

    return select_decomp_table()


def _is_aten_only(gm: fx.GraphModule) -> str | None:
    """None if every call in gm is ATen/prims/getitem, else the first offending target."""
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target is operator.getitem:
            continue
        ns = getattr(n.target, "namespace", None)
        if ns not in ("aten", "prims"):
            return str(n.target)
    return None


def _fold_overwrites(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """copy(dst, src) where src fully overwrites a fresh dst of identical layout -> src."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true as skt

    for n in nodes:
        if n.target is not aten.copy.default or len(n.args) != 2 or n.kwargs:
            continue
        dst, src = n.args
        dv, sv = val(dst), val(src)
        if not (isinstance(dv, torch.Tensor) and isinstance(sv, torch.Tensor) and isinstance(src, fx.Node)):
            continue
        if not isinstance(dst, fx.Node) or dst.target not in (aten.clone.default, aten.empty_strided.default):
            continue
        if dv.dtype != sv.dtype or dv.device != sv.device or dv.dim() != sv.dim() or sv._is_view():
            continue
        same = all(skt(a == b) for a, b in zip(dv.shape, sv.shape)) and all(
            skt(a == b) for a, b in zip(dv.stride(), sv.stride())
        )
        if same and skt(sv.storage_offset() == 0):
            n.replace_all_uses_with(src)
            graph.erase_node(n)


def _inserted_between(start: fx.Node, stop: fx.Node) -> list[fx.Node]:
    out, cur = [], start.next
    while cur is not stop:
        out.append(cur)
        cur = cur.next
    return out


def _erased(n: fx.Node) -> bool:
    return bool(getattr(n, "_erased", False))


def _erase_unused(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    for n in reversed(nodes):
        if not _erased(n) and not n.users and n.op == "call_function":
            graph.erase_node(n)


def _users_by_index(node: fx.Node) -> dict[int, list[fx.Node]]:
    out: dict[int, list[fx.Node]] = {}
    for u in node.users:
        if u.op != "call_function" or u.target is not operator.getitem or not isinstance(u.args[1], int):
            raise Reject(f"{node.name} has a user ({u.name}) other than getitem")
        out.setdefault(u.args[1], []).append(u)
    return out


def _same_meta(old: Any, new: Any) -> str | None:
    """None if `new` can stand in for `old` (dtype, device, shape, symbolic too), else what differs."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true as skt

    if not isinstance(old, torch.Tensor):
        return None  # nothing recorded to compare (None output slot)
    if not isinstance(new, torch.Tensor):
        return f"{type(new).__name__} instead of a tensor"
    if new.dtype != old.dtype:
        return f"dtype {new.dtype} instead of {old.dtype}"
    if new.device != old.device:
        return f"device {new.device} instead of {old.device}"
    if new.dim() != old.dim() or not all(skt(a == b) for a, b in zip(new.shape, old.shape)):
        return f"shape {tuple(new.shape)} instead of {tuple(old.shape)}"
    return None


def _check_outputs(site: _Site, gm: fx.GraphModule, n_ret: int, out_form: bool) -> None:
    """Reject a decomposition whose outputs (or new values of mutated args) disagree with the op's
    recorded ones in dtype, device or shape: users of the node were compiled against those."""
    outs = [val(n) for n in gm.graph.output_node().args[0]]
    old = val(site.node)
    olds = list(old) if isinstance(old, (tuple, list)) else [old]
    rets, muts = outs[:n_ret], outs[n_ret:]
    pairs: list[tuple[str, Any, Any]] = []
    if site.form == "plain":
        pairs = [(f"output {i}", o, n) for i, (o, n) in enumerate(zip(olds, rets))]
    elif out_form:
        pairs = [(f"out argument {name}", o, n) for name, o, n in zip(site.mutable_names, olds, muts)]
    else:
        offset = n_ret if n_ret > 1 else 1
        pairs = [(f"output {i}", olds[i], r) for i, r in enumerate(rets) if i < len(olds)]
        if site.form == "v1":
            values = dict(zip([n for n in site.mutable_names if site.node.kwargs.get(n) is not None], muts))
            for k, name in enumerate(site.mutable_names):
                if name in values and offset + k < len(olds):
                    pairs.append((f"mutated argument {name}", olds[offset + k], values[name]))
        else:
            pairs += [(f"mutated base {k}", olds[offset + k], m) for k, m in enumerate(muts) if offset + k < len(olds)]
    for what, o, n in pairs:
        why = _same_meta(o, n)
        if why:
            raise Reject(f"decomposition's {what} has {why}")


_REDUCTIONS = (aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.var.correction, aten.max.dim)


def _check_cpu_inplace_inputs(site: _Site, values: dict[str, Any], out_form: bool, gm: fx.GraphModule) -> None:
    """Inductor 2.13's CPU codegen fails (KeyError 'bufN' in outer-loop fusion) on a row
    reduction whose in-place results go back into two or more graph inputs it also reads,
    e.g. fused_add_rms_norm(x, residual) on the caller's tensors; stock Inductor fails the same
    way on that ATen form. The opaque op compiles, so leave it alone there (CUDA is fine).
    Writes without a reduction (a KV-cache scatter into key and value caches) compile."""
    if site.form == "plain" or out_form:
        return
    if not any(is_op(n, *_REDUCTIONS) for n in gm.graph.nodes):
        return
    if site.form == "v2":
        mutated = [b for b in site.node.kwargs.get("_all_bases", ()) if isinstance(b, fx.Node)]
    else:
        mutated = [values[n] for n in site.mutable_names if isinstance(values.get(n), fx.Node)]
    inputs = [b for b in mutated if b.op == "placeholder"]
    vals = [val(b) for b in inputs]
    if len(inputs) >= 2 and all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in vals):
        raise Reject(
            f"on CPU, writing back into {len(inputs)} graph inputs ({', '.join(b.name for b in inputs)}) "
            "hits an Inductor CPU codegen bug; the opaque op is kept (CUDA unwraps it)"
        )


def unwrap_site(graph: fx.Graph, site: _Site, decomp: Decomposition, *, aten_only: bool) -> int:
    """Replace one site by the traced decomposition. Returns the number of ATen nodes inserted."""
    node, schema = site.node, site.schema
    n_ret = len(schema.returns)
    if not all(isinstance(r.type, torch.TensorType) for r in schema.returns):
        raise Reject("op returns something other than plain tensors")
    values, out_form = _call_values(site)
    if site.form == "plain":
        if n_ret == 0:
            raise Reject("functional op without returns")
        by_index = _users_by_index(node) if n_ret > 1 else {}
    elif out_form:
        n_out = len(site.mutable_names)
        by_index = _users_by_index(node) if n_out > 1 else {}
    else:
        by_index = _users_by_index(node)
    if site.form in ("v1", "v2") and not out_form and by_index:
        n_new = len(site.mutable_names) if site.form == "v1" else len(site.node.kwargs.get("_all_bases", ()))
        offset = n_ret if n_ret > 1 else 1
        bad = [i for i in by_index if not (i < n_ret or offset <= i < offset + n_new)]
        if bad:
            raise Reject(f"{node.name} output(s) {bad} do not map to an op output or mutated value")
    fn, inputs = _build_trace(site, decomp, values, out_form)
    try:
        gm = trace_aten(fn, [val(i) for i in inputs], functionalize=True, decomposition_table=_decomp_table())
    except Reject:
        raise
    except Exception as e:  # noqa: BLE001 - an untraceable decomposition leaves the op as it was
        raise Reject(f"decomposition did not trace: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if aten_only and (bad := _is_aten_only(gm)) is not None:
        raise Reject(f"implementation does not trace to ATen only (calls {bad})")
    _check_outputs(site, gm, n_ret, out_form)
    _check_cpu_inplace_inputs(site, values, out_form, gm)

    anchor = node.prev
    outs = inline_graph(graph, gm, inputs, before=node)
    new_nodes = _inserted_between(anchor, node)
    st = node.meta.get("stack_trace")
    for n in new_nodes:
        if st and not n.meta.get("stack_trace"):
            n.meta["stack_trace"] = st
    rets, muts = outs[:n_ret], outs[n_ret:]
    present = [n for n in site.mutable_names if values.get(n) is not None]
    new_of = dict(zip(present, muts))

    def reroute(values_out: list[fx.Node]) -> None:
        """Point the node's users (itself if single-valued, else its getitems) at the new values."""
        if len(values_out) == 1:
            node.replace_all_uses_with(values_out[0])
            return
        for i, us in by_index.items():
            for u in us:
                u.replace_all_uses_with(values_out[i])
                graph.erase_node(u)

    if site.form == "plain":
        reroute(rets)
    elif out_form:
        reroute([new_of[n] for n in site.mutable_names])
    else:
        offset = n_ret if n_ret > 1 else 1
        if site.form == "v1":
            slot = {offset + k: new_of.get(name) for k, name in enumerate(site.mutable_names)}
        else:
            slot = {offset + k: m for k, m in enumerate(muts)}  # one output per _all_bases entry
        for i, us in by_index.items():
            if i < n_ret:
                new = rets[i]
            elif slot.get(i) is not None:
                new = slot[i]
            else:
                raise RuntimeError(f"output {i} of {node.name} has no traced value")
            for u in us:
                u.replace_all_uses_with(new)
                graph.erase_node(u)
    if node.users:
        raise RuntimeError(f"{node.name} still has users after unwrapping")
    graph.erase_node(node)
    _fold_overwrites(graph, [n for n in new_nodes if not _erased(n)])
    _erase_unused(graph, [n for n in new_nodes if not _erased(n)])
    return sum(1 for n in new_nodes if not _erased(n))


class Unwrap:
    """The pipeline stage: unwrap every registered (or, in "auto" mode, traceable) opaque op."""

    name = FAMILY

    def __call__(self, graph: fx.Graph, ctx: Any) -> None:
        mode = getattr(ctx.pipeline, "unwrap", "registered")
        if mode is None:
            return
        _sync_builtins()
        changed = False
        for node in list(graph.nodes):
            if _erased(node):
                continue
            site = _site(node)
            if site is None:
                continue
            op_name = op_key(site.op)
            decomp = lookup(site.op)
            aten_only = False
            if decomp is None and mode == "auto":
                decomp = _python_impl(site.op, _device_of(node))
                aten_only = True
            before = ctx.applied_count
            with ctx.candidate(FAMILY, node):
                if decomp is None:
                    why = "no decomposition registered" + (
                        " and not a Python custom op" if mode == "auto" else " (unwrap='registered')"
                    )
                    log.debug("fxfuse unwrap: left opaque op %s (node %s) alone: %s", op_name, node.name, why)
                    raise Reject(f"opaque op {op_name} left alone: {why}")
                try:
                    n_new = unwrap_site(graph, site, decomp, aten_only=aten_only)
                except Reject as r:
                    log.debug("fxfuse unwrap: left opaque op %s (node %s) alone: %s", op_name, node.name, r)
                    raise Reject(f"opaque op {op_name} left alone: {r}") from None
                log.debug("fxfuse unwrap: unwrapped %s (node %s, %s form) into %d ATen nodes", op_name, node.name, site.form, n_new)
                ctx.applied(FAMILY, [node], kernel="aten", detail=op_name)
            changed = changed or ctx.applied_count != before
        if changed:
            from .normalize import PASS as normalize  # canonicalize the inserted views/converts

            normalize(graph, ctx)


PASS = Unwrap()


def iter_registered() -> Iterator[tuple[str, Decomposition]]:
    """(op name, decomposition) pairs currently registered, for debugging and reports."""
    yield from sorted(_REGISTRY.items())
