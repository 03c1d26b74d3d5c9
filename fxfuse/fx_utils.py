"""Shared FX helpers: node predicates, literal extraction, and traced-replacement insertion.

Every pattern module uses these instead of re-deriving them, so that the checks that keep a
rewrite correct (fake values, dtypes, dependency order) live in one place.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import math
import re
import types
import weakref
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

from ._keys import NoKey, freeze

aten = torch.ops.aten
prims = torch.ops.prims


class Reject(Exception):
    """A candidate failed a check; the message is the plain-words reason shown to users."""


def val(node: Any) -> Any:
    """The fake value recorded on a node (None for non-nodes or nodes without one)."""
    if isinstance(node, fx.Node):
        return node.meta.get("val", node.meta.get("example_value"))
    return None


def tval(node: Any) -> torch.Tensor:
    """The fake tensor of a node, or Reject if it has none."""
    v = val(node)
    if not isinstance(v, torch.Tensor):
        raise Reject(f"{_name(node)} has no tensor metadata")
    return v


def _name(node: Any) -> str:
    return node.name if isinstance(node, fx.Node) else repr(node)


def is_op(node: Any, *targets: Any) -> bool:
    """True if node is a call_function of one of targets (OpOverload or OpOverloadPacket)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    t = node.target
    for target in targets:
        if t is target:
            return True
        if isinstance(target, torch._ops.OpOverloadPacket) and getattr(t, "overloadpacket", None) is target:
            return True
    return False


def is_convert(node: Any) -> bool:
    return is_op(node, prims.convert_element_type.default) or (
        is_op(node, aten._to_copy.default)
        and set(node.kwargs) <= {"dtype"}
        and len(node.args) == 1
    )


def convert_dtype(node: fx.Node) -> torch.dtype:
    return node.args[1] if node.target is prims.convert_element_type.default else node.kwargs["dtype"]


def value_key(node: Any) -> Any:
    """`node`, or for a dtype convert the convert's dtype and its source's key: two converts of one
    graph input (each fp8 linear converting the same lifted float, as Inductor leaves them under
    dynamic shapes) compute the same value and compare equal."""
    if isinstance(node, fx.Node) and is_convert(node):
        return ("convert", convert_dtype(node), value_key(node.args[0]))
    return node


def literal(x: Any) -> float | None:
    """A Python number literal (bool excluded), else None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    return None


LIFTED_SCALAR_HINT = (
    "dynamic=True turns float attributes into graph inputs; mark only the token dim dynamic "
    "(torch._dynamo.mark_dynamic(x, 0)) or set torch._dynamo.config.specialize_float = True"
)


def is_lifted_scalar(node: Any) -> bool:
    """A Python float the user wrote that Dynamo lifted into a graph input (a 0-d placeholder,
    possibly upcast, or a SymFloat): its value is not known when the pass runs."""
    if not isinstance(node, fx.Node):
        return False
    if is_convert(node):
        node = node.args[0]
    v = val(node)
    if isinstance(v, (torch.SymFloat, torch.SymInt)):
        return True
    return node.op == "placeholder" and isinstance(v, torch.Tensor) and v.dim() == 0


def runtime_scalar(node: Any, region: set[fx.Node] | None = None) -> bool:
    """A one-element float32 tensor not computed from `region`: a constant whose value is only
    known at run time (Dynamo's lifted float attribute `self.eps` arrives as a 0-d float64 graph
    input converted to float32). Fusions pass it to the kernel as a tensor, never baked in, so a
    new value between calls (no recompile) still gives eager's result."""
    v = val(node)
    if not isinstance(v, torch.Tensor) or v.dtype != torch.float32 or v.numel() != 1:
        return False
    return not (region and depends_on_any(node, region))


def is_cpu_scalar(t: Any) -> bool:
    """A 0-d CPU tensor: the one kind of CPU tensor that eager lets a CUDA op read (as a scalar)."""
    return isinstance(t, torch.Tensor) and t.dim() == 0 and t.device.type == "cpu"


def kernel_devices_ok(*tensors: Any, scalars: Iterable[Any] = ()) -> bool:
    """All `tensors` on one device; each of `scalars` on that device too or a 0-d CPU tensor
    (moved by `scalar_on` inside the replacement)."""
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    rest = [t for t in scalars if isinstance(t, torch.Tensor) and not is_cpu_scalar(t)]
    return same_device(*ts, *rest)


CPU_SCALAR_CLASS = "/cpu-scalars"


def gate_class(scheme: str, x: torch.Tensor, scalars: Iterable[Any]) -> str:
    """The benchmark-gate scheme key: a CUDA rewrite that moves 0-d CPU scalars (lifted float
    attributes) adds one tiny `ones * scalar` launch each, a class of its own until measured."""
    if x.device.type == "cuda" and any(is_cpu_scalar(t) for t in scalars):
        return scheme + CPU_SCALAR_CLASS
    return scheme


def scalar_on(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`t` (one element) as a [1] tensor on `like`'s device, for tracing into a replacement.

    Same device: the reshape the constant path always did. A 0-d CPU tensor with a CUDA `like`:
    `ones * t` on the device, which Inductor compiles into a tiny kernel taking the value as a
    launch argument: no host-to-device copy, no sync, and the value is read on every call.
    """
    if t.device == like.device:
        return t.reshape(1)
    return torch.ones(1, dtype=torch.float32, device=like.device) * t


def norm_dims(dims: Any, ndim: int) -> list[int] | None:
    """Reduction dims as a sorted list of non-negative ints (None if not a literal list)."""
    if isinstance(dims, int):
        dims = [dims]
    if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
        return None
    return sorted(d % ndim for d in dims)


def is_last_dim_reduction(node: fx.Node, ndim: int) -> bool:
    """mean/amax/sum-style node reducing exactly the last dim with keepdim=True."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    return keepdim is True and norm_dims(dims, ndim) == [ndim - 1]


def other_arg(node: fx.Node, known: Any) -> Any:
    """For a binary commutative node, the argument that is not `known`."""
    a, b = node.args[0], node.args[1]
    if a is known:
        return b
    if b is known:
        return a
    raise Reject(f"{node.name} does not read {_name(known)}")


def depends_on_any(node: Any, targets: set[fx.Node], limit: int = 2000, ordered: bool = False) -> bool:
    """True if `node` (transitively) reads any of `targets`. Bounded, conservative (True on limit).
    `ordered`: the graph is in topological order, so nodes placed before every target are not
    walked (a deep model's whole prefix need not count against the limit)."""
    if not isinstance(node, fx.Node):
        return False
    lo = min(targets) if ordered and targets else None
    if lo is not None and node < lo:
        return False
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in targets:
            return True
        if n in seen:
            continue
        seen.add(n)
        if len(seen) > limit:
            return True
        stack.extend(n.all_input_nodes if lo is None else (i for i in n.all_input_nodes if not i < lo))
    return False


def same_device(*tensors: torch.Tensor) -> bool:
    devs = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    return len(devs) <= 1


def is_row_contiguous(t: torch.Tensor) -> bool:
    """Last dim stride 1 and the leading dims collapse to one row index (reshape to 2-D is a view)."""
    from torch.fx.experimental.symbolic_shapes import guard_or_false

    if t.dim() == 0:
        return False
    return bool(guard_or_false(t.stride(-1) == 1)) and bool(t.is_contiguous())


F32_MAX = torch.finfo(torch.float32).max


def op_bound(x: float) -> float:
    """A clamp bound as an inserted op's argument: +-inf becomes +-FLT_MAX.

    AOTInductor writes a non-finite float argument of a custom op into its package as a JSON
    string, which its loader rejects. The bounds clamp fp32 values before an fp8/int8 cast:
    +-FLT_MAX keeps every finite value, and an infinite one cast to fp8 saturates to the same
    +-448 either way (torch and Triton)."""
    return max(-F32_MAX, min(F32_MAX, float(x))) if math.isinf(x) else x


def fake_mode_of(values: Iterable[Any]) -> Any:
    from torch._guards import detect_fake_mode

    return detect_fake_mode([v for v in values if isinstance(v, torch.Tensor)])


trace_stats: collections.Counter[str] = collections.Counter()
"""`traced`: replacements traced with make_fx; `reused`: served from the per-graph trace cache."""

_TRACE_CACHE: contextvars.ContextVar[dict[Any, fx.GraphModule] | None] = contextvars.ContextVar(
    "fxfuse_trace_cache", default=None
)


@contextlib.contextmanager
def trace_cache(graph: fx.Graph | None = None) -> Iterator[None]:
    """Scope (one graph's pipeline run, one fake mode) in which `trace_aten` reuses the traced
    graph of an identical replacement: each layer of a model repeats the same rewrites, and every
    trace costs a make_fx run (on CUDA also Triton's TTIR mutation analysis of each kernel).
    On exit, forgets what `inline_graph` recorded for `graph`."""
    token = _TRACE_CACHE.set({})
    try:
        yield
    finally:
        _TRACE_CACHE.reset(token)
        if graph is not None:
            _INSERTED.pop(graph, None)


def _closure_leaf(x: Any, depth: int) -> Any:
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return (type(x).__name__, str(x.node.expr))  # one shape env per cache scope
    if isinstance(x, types.FunctionType):
        return _fn_key(x, depth + 1)
    if isinstance(x, functools.partial):
        return ("partial", _freeze(x.func, depth + 1), _freeze(x.args, depth + 1), _freeze(x.keywords, depth + 1))
    return NotImplemented  # fx.Node, tensors, match objects, ...: unknown what the trace reads from them


def _freeze(x: Any, depth: int = 0) -> Any:
    """A hashable, type-tagged image of a closure value (NoKey when it cannot be exact)."""
    return freeze(x, _closure_leaf, depth)


def _fn_key(fn: Any, depth: int = 0) -> Any:
    """Code plus the values it closes over (globals are module-level and fixed for the process)."""
    if isinstance(fn, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return ("op", fn)
    if not isinstance(fn, types.FunctionType):
        return _freeze(fn, depth)
    try:
        contents = [c.cell_contents for c in (fn.__closure__ or ())]
    except ValueError:  # an empty cell (a name assigned later)
        raise NoKey from None
    cells = tuple(_freeze(c, depth + 1) for c in contents)
    return ("fn", fn.__code__, cells, _freeze(fn.__defaults__, depth + 1), _freeze(fn.__kwdefaults__, depth + 1))


def _vals_key(vals: Sequence[Any]) -> Any:
    """Metadata of the traced inputs, symbolic sizes by expression, plus which inputs share storage."""
    from torch.multiprocessing.reductions import StorageWeakRef

    out = []
    storages: dict[Any, int] = {}
    for i, v in enumerate(vals):
        if not isinstance(v, torch.Tensor):
            out.append(_freeze(v))
            continue
        ref = StorageWeakRef(v.untyped_storage())
        first = storages.setdefault(ref, i)
        out.append((
            "T", type(v), v.dtype, str(v.device), v.layout, v.requires_grad,
            _freeze(tuple(v.shape)), _freeze(tuple(v.stride())), _freeze(v.storage_offset()), first,
        ))
    return tuple(out)


def _trace_key(
    fn: Callable[..., Any], vals: Sequence[Any], functionalize: bool, table: Mapping[Any, Any] | None, fake_mode: Any
) -> Any:
    try:
        return (_fn_key(fn), _vals_key(vals), functionalize, id(table), id(fake_mode))
    except NoKey:
        return None


def _repropagate(gm: fx.GraphModule, vals: Sequence[Any], fake_mode: Any) -> None:
    """Fresh fake values on a reused trace, computed from this call's inputs: every inserted node
    gets its own tensors (aliasing as the ops define it), never ones shared with an earlier copy."""
    from torch._dispatch.python import enable_python_dispatcher
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    kinds = {n: type(n.meta.get("val")) for n in gm.graph.nodes}
    with fake_mode, enable_python_dispatcher():
        FakeTensorProp(gm, mode=fake_mode).propagate_dont_convert_inputs(*vals)
    for n, kind in kinds.items():  # FakeTensorProp stores containers as fx's immutable_dict/list
        v = n.meta.get("val")
        if kind in (dict, list, tuple) and type(v) is not kind and isinstance(v, (dict, list, tuple)):
            n.meta["val"] = kind(v)


def trace_aten(
    fn: Callable[..., Any],
    vals: Sequence[Any],
    *,
    functionalize: bool,
    decomposition_table: Mapping[Any, Callable[..., Any]] | None = None,
) -> fx.GraphModule:
    """Trace `fn(*vals)` (fake tensors of one graph) to an ATen GraphModule without inlining it.

    Split out of `insert_traced` so a caller can inspect the traced graph (e.g. reject one
    that still calls non-ATen ops) before touching the target graph. Inside `trace_cache()`, a
    call with the same function (code and closure values), the same input metadata and the same
    fake mode returns the earlier trace with fake values recomputed for these inputs; callers
    must copy it (`inline_graph`), not edit it.
    """
    from torch._subclasses.functional_tensor import FunctionalTensorMode, dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch._dispatch.python import enable_python_dispatcher
    from torch.fx.traceback import preserve_node_meta

    fake_mode = fake_mode_of(vals)
    if fake_mode is None:
        raise Reject("no fake mode on the graph's values")
    cache = _TRACE_CACHE.get()
    key = _trace_key(fn, vals, functionalize, decomposition_table, fake_mode) if cache is not None else None
    if key is not None and key in cache:
        gm = cache[key]
        _repropagate(gm, vals, fake_mode)
        trace_stats["reused"] += 1
        return gm
    target = dispatch_functionalize(fn, FunctionalTensorMode()) if functionalize else fn
    with fake_mode, enable_python_dispatcher(), preserve_node_meta():
        gm = make_fx(target, decomposition_table=decomposition_table, tracing_mode="real")(*vals)
    trace_stats["traced"] += 1
    if key is not None:
        cache[key] = gm
    return gm


def inline_graph(graph: fx.Graph, gm: fx.GraphModule, inputs: Sequence[Any], before: fx.Node) -> list[fx.Node]:
    """Copy gm's nodes into `graph` before `before`, placeholders bound to `inputs`; returns outputs."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    val_map: dict[fx.Node, Any] = dict(zip(placeholders, inputs))
    with graph.inserting_before(before):
        out = graph.graph_copy(gm.graph, val_map)
    record_inserted(graph, [v for k, v in val_map.items() if k.op != "placeholder" and isinstance(v, fx.Node)])
    return list(out) if isinstance(out, (tuple, list)) else [out]


def record_inserted(graph: fx.Graph, nodes: Iterable[fx.Node]) -> None:
    """Tell `stable_toposort` about nodes a rewrite created outside `inline_graph` (e.g. size reads
    rerouted to a fused output): its windowed sort only checks the edges of recorded nodes."""
    _INSERTED.setdefault(graph, []).extend(nodes)


def insert_traced(
    graph: fx.Graph,
    fn: Callable[..., Any],
    inputs: Sequence[fx.Node],
    before: fx.Node,
    *,
    functionalize: bool,
) -> list[fx.Node]:
    """Trace `fn(*inputs' fake values)` to ATen and inline the nodes before `before`.

    With `functionalize=True` the trace runs under FunctionalTensorMode, the way AOTAutograd
    traces, so `torch.library.triton_op` calls decompose into `triton_kernel_wrapper_functional`
    and Inductor compiles the Triton kernel into its output code instead of a Python fallback.
    It also runs Inductor's decompositions, as AOTAutograd does: an op the table decomposes
    (e.g. `aten.zeros` from a launcher's scratch buffer) has no lowering, and Inductor would
    refuse it ("both a fallback and a decomp for same op").
    Returns the nodes for fn's (flattened tuple) outputs.
    """
    from torch._inductor.decomposition import select_decomp_table

    vals = [tval(n) for n in inputs]
    decomps = select_decomp_table() if functionalize else None
    gm = trace_aten(fn, vals, functionalize=functionalize, decomposition_table=decomps)
    return inline_graph(graph, gm, inputs, before)


_INSERTED: weakref.WeakKeyDictionary[fx.Graph, list[fx.Node]] = weakref.WeakKeyDictionary()
"""Nodes `inline_graph` added to a graph since its last `stable_toposort`."""


def _local_stable_toposort(graph: fx.Graph, inserted: list[fx.Node]) -> bool:
    """Inductor's `stable_topological_sort`, run only from the first out-of-order node to the point
    past the last one where nothing is left waiting: nodes before and after that window would not
    move, so the result is the whole-graph sort's. The graph was in order before the rewrite, and a
    rewrite only adds nodes and reroutes uses to them, so the out-of-order nodes are the inserted
    nodes with a later input and the users placed before an inserted node. False: not applicable
    (caller runs the whole-graph sort)."""
    from torch._inductor.pattern_matcher import _args

    bad: list[fx.Node] = []
    for n in inserted:
        if getattr(n, "_erased", False) or n.graph is not graph:
            return False
        if any(not i < n for i in n.all_input_nodes):
            bad.append(n)
        bad.extend(u for u in n.users if not n < u)
    if not bad:
        return True
    first, last = min(bad), max(bad)
    nodes = list(graph.nodes)
    rest = nodes[nodes.index(first):]
    prefix_end = first.prev if first.prev.op != "root" else None  # prefix nodes never move

    ready: set[fx.Node] = set()
    waiting: dict[fx.Node, list[fx.Node]] = collections.defaultdict(list)
    requeued: list[fx.Node] = []  # the sort's `pending` stack above the untouched tail
    pos, past_last = 0, False
    cursor = prefix_end
    while True:
        if requeued:
            node = requeued.pop()
        else:
            if past_last and not waiting:
                break  # the rest is in order and would be placed where it is
            if pos == len(rest):
                break
            node = rest[pos]
            pos += 1
            past_last = past_last or node is last
        waiting_for = [
            x for x in _args(node) if x not in ready and not (prefix_end is not None and x <= prefix_end)
        ]
        if waiting_for:
            waiting[waiting_for[-1]].append(node)
        else:
            ready.add(node)
            if cursor is not None and cursor.next is not node:
                cursor.append(node)
            cursor = node
            requeued.extend(reversed(waiting.pop(node, ())))
    return not waiting and _edges_ok([*inserted, *bad])


def _edges_ok(nodes: Iterable[fx.Node]) -> bool:
    return all(all(i < n for i in n.all_input_nodes) and all(n < u for u in n.users) for n in nodes)


def stable_toposort(graph: fx.Graph) -> None:
    """Restore topological order after a rewrite, as Inductor's `stable_topological_sort` does, but
    in O(window) instead of O(graph) when `inline_graph` recorded what the rewrite inserted (a
    whole-graph sort per rewrite is quadratic in the layer count)."""
    from torch._inductor.pattern_matcher import stable_topological_sort

    inserted = _INSERTED.pop(graph, None)
    if inserted is not None and _local_stable_toposort(graph, inserted):
        return
    stable_topological_sort(graph)


_FRAME_RE = re.compile(r'File "([^"]+)", line (\d+)')


def source_location(node: fx.Node) -> str | None:
    """`file.py:LINE` of the user's code that produced a node: the innermost frame outside torch."""
    st = node.meta.get("stack_trace")
    if not st:
        return None
    frames = _FRAME_RE.findall(st)
    user = [f for f in frames if "/torch/" not in f[0]] or frames
    if not user:
        return None
    path, line = user[-1]
    return f"{path.rsplit('/', 1)[-1]}:{line}"


def source_locations(nodes: Iterable[fx.Node]) -> list[str]:
    """Distinct source locations of nodes, compressed per file into line ranges (`model.py:9-16`)."""
    by_file: dict[str, set[int]] = {}
    for n in nodes:
        loc = source_location(n)
        if loc:
            f, line = loc.rsplit(":", 1)
            by_file.setdefault(f, set()).add(int(line))
    out = []
    for f, lines in by_file.items():
        lo, hi = min(lines), max(lines)
        out.append(f"{f}:{lo}" if lo == hi else f"{f}:{lo}-{hi}")
    return out
