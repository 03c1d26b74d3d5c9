"""Test helpers for fxfuse and for models that rely on it.

* `capture_graphs(fn, *args)` compiles `fn` with a capturing pass around fxfuse and returns the
  post-grad graphs before and after fxfuse, as GraphModules and as stable text.
* `assert_fused(fn, *args, expect={"rmsnorm_quant": 2})` compiles, checks the fusion counters and
  compares the compiled outputs with eager, in one call.
* `graph_text(graph)` renders a graph as stable, readable text (normalized node and symbol names,
  shapes and dtypes shown) for golden snapshots; `assert_golden(path, text)` compares against a
  snapshot file and rewrites it when `FXFUSE_UPDATE_GRAPHS=1`.
* `save_graph(path, graph)` / `load_graph(path)` / `reapply(gm)` turn a captured post-grad graph into a
  self-contained JSON file that re-runs through the passes without the model, so a graph that did
  not fuse can be sent as a reproducible test case.
* `on_fake_device(gm)` + `triton_target()` put a captured graph on fake CUDA tensors with an sm_90
  Triton target, so the passes' CUDA path (traced Triton launches, Inductor's mutation analysis)
  runs on a CPU-only machine; `triton_launches(gm)` lists the launches a rewritten graph holds.

See docs/inspecting.md for the workflow.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import copy
import importlib
import json
import math
import operator
import os
import pathlib
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from .pipeline import counters as _counters
from .report import GraphReport, Report, report as _report

__all__ = [
    "Capture",
    "CapturedGraph",
    "Reapplied",
    "UPDATE_ENV",
    "assert_fused",
    "assert_golden",
    "capture_graphs",
    "graph_text",
    "on_fake_device",
    "post_grad_graph",
    "load_graph",
    "random_inputs",
    "reapply",
    "save_graph",
]

UPDATE_ENV = "FXFUSE_UPDATE_GRAPHS"
"""Set this environment variable to 1 to make `assert_golden` rewrite snapshot files."""

FORMAT = "fxfuse-graph/1"

# ----------------------------------------------------------------------------- stable graph text

_DTYPE_SHORT = {
    torch.float64: "f64",
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "b8",
    torch.complex64: "c64",
}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        _DTYPE_SHORT[getattr(torch, _name)] = _name.replace("float", "f")


def _dtype_str(dt: torch.dtype) -> str:
    return _DTYPE_SHORT.get(dt, str(dt).replace("torch.", ""))


class _SymNames:
    """Renames shape symbols (s77, u3, ...) to s0, s1, ... in order of first appearance."""

    def __init__(self) -> None:
        self.map: dict[Any, Any] = {}

    def expr(self, x: Any) -> str:
        import sympy

        e = x.node.expr if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)) else x
        if not isinstance(e, sympy.Basic):
            return str(e)
        for s in sorted(e.free_symbols, key=lambda s: str(s)):
            if s not in self.map:
                prefix = "u" if str(s).startswith("u") else "s"
                k = sum(1 for v in self.map.values() if str(v).startswith(prefix))
                self.map[s] = sympy.Symbol(f"{prefix}{k}", integer=True, positive=True)
        return str(e.xreplace(self.map))

    def note_order(self, x: Any) -> None:
        """Register symbols of a size in dim order (so names follow the graph, not sympy's sort)."""
        if isinstance(x, torch.SymInt):
            import sympy

            e = x.node.expr
            if isinstance(e, sympy.Symbol):
                self.expr(e)


def _is_contiguous_stride(shape: Sequence[Any], stride: Sequence[Any]) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    expected: Any = 1
    for size, st in reversed(list(zip(shape, stride))):
        if not statically_known_true(size == 1) and not statically_known_true(st == expected):
            return False
        expected = expected * size
    return True


def _val_str(v: Any, syms: _SymNames) -> str:
    if isinstance(v, torch.Tensor):
        for d in v.shape:
            syms.note_order(d)
        shape = ", ".join(syms.expr(d) for d in v.shape)
        s = f"{_dtype_str(v.dtype)}[{shape}]"
        try:
            if v.layout == torch.strided and not _is_contiguous_stride(v.shape, v.stride()):
                s += "{stride=(" + ", ".join(syms.expr(d) for d in v.stride()) + ")}"
        except Exception:  # noqa: BLE001 - strides of exotic tensors
            pass
        if v.device.type != "cpu":
            s += f"@{v.device.type}"
        return s
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        syms.note_order(v)
        return f"Sym({syms.expr(v)})"
    if isinstance(v, (list, tuple)):
        inner = ", ".join(_val_str(x, syms) for x in v)
        return f"({inner})"
    if v is None:
        return "None"
    return type(v).__name__


def _alias(node: fx.Node) -> str | None:
    """Spellings that differ between torch versions for the same value, rendered as one name."""
    t = node.target
    if t in (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default):
        return "reshape"
    if t is torch.ops.prims.convert_element_type.default or (
        t is torch.ops.aten._to_copy.default and set(node.kwargs) == {"dtype"} and len(node.args) == 1
    ):
        return "convert"
    return None


def _target_str(node: fx.Node) -> str:
    alias = _alias(node)
    if alias is not None:
        return alias
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        name = f"{t.namespace}.{t._opname}"
        return name if t._overloadname == "default" else f"{name}.{t._overloadname}"
    if isinstance(t, torch._ops.HigherOrderOperator):
        return f"higher_order.{t.name()}"
    if t is operator.getitem:
        return "getitem"
    mod = getattr(t, "__module__", None)
    name = getattr(t, "__qualname__", getattr(t, "__name__", repr(t)))
    if mod in ("_operator", "operator", "builtins", None):
        return name
    return f"{mod}.{name}"


def _base_name(node: fx.Node) -> str:
    if node.op == "placeholder":
        return "arg"
    if node.op == "get_attr":
        return "const"
    alias = _alias(node)
    if alias is not None:
        return alias
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t._opname.lstrip("_")
    if isinstance(t, torch._ops.HigherOrderOperator):
        return t.name()
    if t is operator.getitem:
        return "getitem"
    return re.sub(r"\W", "_", getattr(t, "__name__", "call")).strip("_") or "call"


def _arg_str(a: Any, names: dict[fx.Node, str], syms: _SymNames) -> str:
    if isinstance(a, fx.Node):
        return names.get(a, f"%{a.name}")
    if isinstance(a, list):
        return "[" + ", ".join(_arg_str(x, names, syms) for x in a) + "]"
    if isinstance(a, tuple):
        inner = ", ".join(_arg_str(x, names, syms) for x in a)
        return f"({inner},)" if len(a) == 1 else f"({inner})"
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k!r}: {_arg_str(v, names, syms)}" for k, v in sorted(a.items(), key=lambda kv: str(kv[0]))) + "}"
    if isinstance(a, torch.dtype):
        return _dtype_str(a)
    if isinstance(a, torch.device):
        return a.type
    if isinstance(a, (torch.layout, torch.memory_format)):
        return str(a).replace("torch.", "")
    if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return syms.expr(a)
    if isinstance(a, float):
        if math.isinf(a):
            return "inf" if a > 0 else "-inf"
        return repr(a)
    if isinstance(a, torch.Tensor):
        return f"tensor({_val_str(a, syms)})"
    return repr(a)


def _hop_kwargs(node: fx.Node, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Replace run-dependent Triton side-table indices by the kernel name and constant args."""
    if "kernel_idx" not in kwargs:
        return kwargs
    kwargs = dict(kwargs)
    try:
        from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

        k = kernel_side_table.get_kernel(kwargs.pop("kernel_idx"))
        fn = getattr(k, "fn", k)
        kwargs["kernel"] = getattr(fn, "__name__", repr(fn))
        if "constant_args_idx" in kwargs:
            kwargs["constant_args"] = kernel_side_table.get_constant_args(kwargs.pop("constant_args_idx"))
    except Exception:  # noqa: BLE001
        kwargs.pop("constant_args_idx", None)
        kwargs["kernel"] = "?"
    return kwargs


def graph_text(graph: fx.Graph | fx.GraphModule) -> str:
    """Stable, readable text of a post-grad graph for snapshots and diffs.

    One line per node: `%name: dtype[shape] = op(args, kw=...)`. Node names are renamed per op in
    graph order (`%mul`, `%mul_1`, ...), shape symbols to `s0, s1, ...` in order of appearance,
    Triton side-table indices to kernel names; `view`/`reshape`/`_unsafe_view` print as `reshape`
    and `convert_element_type`/`_to_copy(dtype=)` as `convert`, spellings that vary between
    torch versions. Non-contiguous strides and non-CPU devices are shown. Stack traces, node names chosen by the tracer, and symbol hashes are left out, so the
    text does not churn between runs or torch versions when the graph itself is the same.
    """
    g = graph.graph if isinstance(graph, fx.GraphModule) else graph
    names: dict[fx.Node, str] = {}
    seen: collections.Counter[str] = collections.Counter()
    syms = _SymNames()
    lines: list[str] = []
    for node in g.nodes:
        if node.op == "output":
            lines.append("return " + _arg_str(node.args[0], names, syms))
            continue
        base = _base_name(node)
        k = seen[base]
        seen[base] += 1
        names[node] = f"%{base}{k}" if node.op == "placeholder" else (f"%{base}" if k == 0 else f"%{base}_{k}")
        v = node.meta.get("val", node.meta.get("example_value"))
        spec = _val_str(v, syms) if v is not None else "?"
        if node.op == "placeholder":
            rhs = "input"
        elif node.op == "get_attr":
            rhs = f"constant({node.target})"
        elif _alias(node) == "convert":
            dt = node.args[1] if len(node.args) > 1 else node.kwargs["dtype"]
            rhs = f"convert({_arg_str(node.args[0], names, syms)}, {_arg_str(dt, names, syms)})"
        else:
            kwargs = _hop_kwargs(node, dict(node.kwargs))
            parts = [_arg_str(a, names, syms) for a in node.args]
            parts += [f"{k2}={_arg_str(v2, names, syms)}" for k2, v2 in sorted(kwargs.items())]
            rhs = f"{_target_str(node)}({', '.join(parts)})"
        lines.append(f"{names[node]}: {spec} = {rhs}")
    return "\n".join(lines) + "\n"


def assert_golden(path: str | os.PathLike[str], text: str, *, update: bool | None = None) -> None:
    """Compare `text` with the snapshot file at `path`; rewrite it instead when updating.

    If a per-version file `<stem>.torch-<major>.<minor><suffix>` exists beside `path` it is used
    for this torch version instead (for graphs that legitimately differ between versions).
    `update=None` reads the `FXFUSE_UPDATE_GRAPHS` environment variable.
    """
    p = pathlib.Path(path)
    major_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    versioned = p.with_name(f"{p.stem}.torch-{major_minor}{p.suffix}")
    if versioned.exists():
        p = versioned
    if update is None:
        update = os.environ.get(UPDATE_ENV, "") not in ("", "0", "false", "False")
    if update:
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.exists() or p.read_text() != text:
            p.write_text(text)
        return
    if not p.exists():
        raise AssertionError(f"no golden snapshot {p}; run with {UPDATE_ENV}=1 (or pytest --update-graphs) to create it")
    expected = p.read_text()
    if expected != text:
        import difflib

        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True), str(p), "captured"))
        raise AssertionError(
            f"captured graph differs from {p}; if the change is intended, rerun with {UPDATE_ENV}=1 "
            f"(or pytest --update-graphs)\n{diff}"
        )


# ----------------------------------------------------------------------------- capture


def _snapshot(graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule holding a copy of `graph` (node meta copied shallowly: fake values shared)."""
    new_graph = copy.deepcopy(graph)
    root = graph.owning_module if graph.owning_module is not None else torch.nn.Module()
    return fx.GraphModule(root, new_graph)


@dataclass
class CapturedGraph:
    """One post-grad graph, before and after fxfuse, with the report of what fxfuse did to it."""

    before: fx.GraphModule
    after: fx.GraphModule
    report: GraphReport | None

    @property
    def before_text(self) -> str:
        return graph_text(self.before)

    @property
    def after_text(self) -> str:
        return graph_text(self.after)


@dataclass
class Capture:
    """Result of `capture_graphs`: the graphs, the compiled outputs and what fxfuse did."""

    graphs: list[CapturedGraph]
    outputs: Any
    counters: collections.Counter[str]
    compiled: Callable[..., Any] | None = None

    @property
    def report(self) -> Report:
        return Report(graphs=[g.report for g in self.graphs if g.report is not None])

    @property
    def before_text(self) -> str:
        return "\n".join(self._texts("before_text"))

    @property
    def after_text(self) -> str:
        return "\n".join(self._texts("after_text"))

    def _texts(self, attr: str) -> list[str]:
        if len(self.graphs) == 1:
            return [getattr(self.graphs[0], attr)]
        return [f"# graph {i}\n{getattr(g, attr)}" for i, g in enumerate(self.graphs)]


class _CapturingPass(CustomGraphPass):
    """Wraps a pass, snapshotting the graph around it. uuid() is None: Inductor's FX graph cache is
    bypassed, so the pass always runs (a cache hit would skip it and capture nothing)."""

    def __init__(self, inner: Callable[[fx.Graph], Any], sink: list[CapturedGraph]) -> None:
        self.inner = inner
        self.sink = sink

    def __call__(self, graph: fx.Graph) -> None:
        before = _snapshot(graph)
        n0 = len(_report)
        self.inner(graph)
        grs = _report.since(n0)
        self.sink.append(CapturedGraph(before=before, after=_snapshot(graph), report=grs[-1] if grs else None))

    def uuid(self) -> Any:
        return None


class _StopCompile(Exception):
    pass


class _GrabPass(CustomGraphPass):
    """Snapshots the post-grad graph and stops the compile there (no lowering, no codegen)."""

    def __init__(self) -> None:
        self.graph: fx.GraphModule | None = None

    def __call__(self, graph: fx.Graph) -> None:
        self.graph = _snapshot(graph)
        raise _StopCompile

    def uuid(self) -> Any:
        return None


def post_grad_graph(fn: Callable[..., Any], *args: Any, **compile_kwargs: Any) -> fx.GraphModule:
    """The post-grad graph Inductor would hand to fxfuse for `fn(*args)` (fake `meta["val"]` on
    every node), without running fxfuse or compiling the rest: seconds instead of a full compile.
    For timing the passes (`benchmarks/compile_overhead.py`) and replaying them (`reapply`)."""
    from torch._inductor.utils import fresh_cache

    grab = _GrabPass()
    torch._dynamo.reset()
    compiled = torch.compile(fn, options={"post_grad_custom_pre_pass": grab}, **compile_kwargs)
    with fresh_cache(), torch.no_grad():
        try:
            compiled(*args)
        except Exception as e:  # noqa: BLE001 - the stop, wrapped by Inductor
            if grab.graph is None:
                raise
            del e
    torch._dynamo.reset()
    if grab.graph is None:
        raise RuntimeError("the compile did not reach the post-grad pass")
    return grab.graph


def _default_passes() -> Any:
    import fxfuse

    return fxfuse.passes


@contextlib.contextmanager
def _counting() -> Iterator[collections.Counter[str]]:
    start = collections.Counter(_counters)
    delta: collections.Counter[str] = collections.Counter()
    try:
        yield delta
    finally:
        for k, v in _counters.items():
            if v - start.get(k, 0):
                delta[k] = v - start.get(k, 0)


def capture_graphs(
    fn: Callable[..., Any],
    *args: Any,
    passes: Callable[[fx.Graph], Any] | None = None,
    reset: bool = True,
    **compile_kwargs: Any,
) -> Capture:
    """Compile `fn` with fxfuse, call it on `args`, and return the post-grad graphs around fxfuse.

    Args:
        fn: a function or nn.Module.
        args: example inputs; `fn(*args)` is run once through the compiled function.
        passes: the pass pipeline to wrap (default `fxfuse.passes`).
        reset: call `torch._dynamo.reset()` first, so that earlier compiles of `fn` are not reused.
        compile_kwargs: forwarded to `torch.compile` (e.g. `dynamic=True`); an `options` dict is
            merged with the capturing `post_grad_custom_pre_pass`.

    Returns a `Capture`: `.graphs[i].before/.after` GraphModules, `.before_text/.after_text`, the
    outputs, the counter increments and the report of these graphs. Compiles inside a fresh
    Inductor cache, so nothing is served from an earlier compile.
    """
    from torch._inductor.utils import fresh_cache

    if reset:
        torch._dynamo.reset()
    sink: list[CapturedGraph] = []
    options = dict(compile_kwargs.pop("options", None) or {})
    options["post_grad_custom_pre_pass"] = _CapturingPass(passes if passes is not None else _default_passes(), sink)
    compiled = torch.compile(fn, options=options, **compile_kwargs)
    with fresh_cache(), _counting() as delta:
        outputs = compiled(*args)
    return Capture(graphs=sink, outputs=outputs, counters=delta, compiled=compiled)


_QUANT_TOL: dict[torch.dtype, tuple[float, float]] = {torch.int8: (1.0, 0.0)}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        # one unit in the last place of a 3-bit (e4m3) / 2-bit (e5m2) mantissa
        _QUANT_TOL[getattr(torch, _name)] = (2.0**-9, 0.126 if "e4m3" in _name else 0.251)


def _compare(actual: Any, expected: Any, atol: float | None, rtol: float | None) -> list[str]:
    from torch.utils._pytree import tree_flatten

    a_flat, a_spec = tree_flatten(actual)
    e_flat, e_spec = tree_flatten(expected)
    if a_spec != e_spec:
        return [f"output structure differs: compiled {a_spec} vs eager {e_spec}"]
    problems = []
    for i, (a, e) in enumerate(zip(a_flat, e_flat)):
        if not isinstance(e, torch.Tensor):
            if a != e:
                problems.append(f"output {i}: {a!r} != {e!r}")
            continue
        if not isinstance(a, torch.Tensor) or a.dtype != e.dtype or a.shape != e.shape:
            problems.append(f"output {i}: compiled {getattr(a, 'dtype', type(a))}{tuple(getattr(a, 'shape', ()))} "
                            f"vs eager {e.dtype}{tuple(e.shape)}")
            continue
        at, rt = atol, rtol
        if e.dtype in _QUANT_TOL:
            qa, qr = _QUANT_TOL[e.dtype]
            at, rt = (qa if at is None else at), (qr if rt is None else rt)
            a, e = a.float(), e.float()
        try:
            torch.testing.assert_close(a.cpu(), e.cpu(), atol=at, rtol=rt, equal_nan=True)
        except AssertionError as err:
            problems.append(f"output {i} ({e.dtype}{tuple(e.shape)}): {err}")
    return problems


def assert_fused(
    fn: Callable[..., Any],
    *args: Any,
    expect: Mapping[str, int],
    atol: float | None = None,
    rtol: float | None = None,
    check_numerics: bool = True,
    passes: Callable[[fx.Graph], Any] | None = None,
    **compile_kwargs: Any,
) -> Capture:
    """Compile `fn` with fxfuse and check fusion counts and numerics against eager in one call.

    `expect` maps fusion names to the exact number of rewrites in this compile (names not listed
    are not checked). Outputs are compared with `torch.testing.assert_close` (dtype-default
    tolerances; fp8/int8 outputs within one quantization step unless atol/rtol are given). On
    failure the message includes the fxfuse report, so near-miss reasons show up in the test log.
    Returns the `Capture` for further checks.
    """
    from torch.utils._pytree import tree_map

    clone = lambda t: t.clone() if isinstance(t, torch.Tensor) else t  # noqa: E731
    eager = fn(*tree_map(clone, args)) if check_numerics else None
    cap = capture_graphs(fn, *args, passes=passes, **compile_kwargs)  # originals: keep mark_dynamic
    problems = [
        f"{name}: expected {n} fusion(s), got {cap.counters.get(name, 0)}"
        for name, n in expect.items()
        if cap.counters.get(name, 0) != n
    ]
    if check_numerics:
        problems += _compare(cap.outputs, eager, atol, rtol)
    if problems:
        raise AssertionError("assert_fused failed:\n  " + "\n  ".join(problems) + "\n\n" + str(cap.report))
    return cap


# ----------------------------------------------------------------------------- save / load / reapply


def _enc(a: Any) -> Any:
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if a is None or isinstance(a, (bool, int, str)):
        return a
    if isinstance(a, float):
        return a if math.isfinite(a) else {"float": repr(a)}
    if isinstance(a, list):
        return [_enc(x) for x in a]
    if isinstance(a, tuple):
        return {"tuple": [_enc(x) for x in a]}
    if isinstance(a, dict):
        return {"dict": [[k, _enc(v)] for k, v in a.items()]}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).replace("torch.", "")}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, torch.layout):
        return {"layout": str(a).replace("torch.", "")}
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a).replace("torch.", "")}
    if isinstance(a, slice):
        return {"slice": [_enc(a.start), _enc(a.stop), _enc(a.step)]}
    raise TypeError(f"cannot serialize argument {a!r} of type {type(a).__name__}")


def _dec(a: Any, nodes: dict[str, fx.Node]) -> Any:
    if isinstance(a, list):
        return [_dec(x, nodes) for x in a]
    if not isinstance(a, dict):
        return a
    ((k, v),) = a.items()
    if k == "node":
        return nodes[v]
    if k == "float":
        return float(v)
    if k == "tuple":
        return tuple(_dec(x, nodes) for x in v)
    if k == "dict":
        return {kk: _dec(vv, nodes) for kk, vv in v}
    if k == "dtype":
        return getattr(torch, v)
    if k == "device":
        return torch.device(v)
    if k in ("layout", "memory_format"):
        return getattr(torch, v)
    if k == "slice":
        return slice(*(_dec(x, nodes) for x in v))
    raise ValueError(f"unknown encoded value {a!r}")


def _enc_target(t: Any) -> str:
    if isinstance(t, torch._ops.OpOverload):
        return f"op:{t.namespace}::{t._opname}.{t._overloadname}"
    if isinstance(t, torch._ops.HigherOrderOperator):
        return f"hop:{t.name()}"
    mod = getattr(t, "__module__", None)
    qual = getattr(t, "__qualname__", None)
    if mod and qual and "<" not in qual:
        if mod == "_operator":
            mod = "operator"
        return f"py:{mod}:{qual}"
    raise TypeError(f"cannot serialize call target {t!r}")


def _dec_target(s: str) -> Any:
    kind, _, rest = s.partition(":")
    if kind == "op":
        ns, _, name = rest.partition("::")
        op, _, overload = name.rpartition(".")
        if ns == "fxfuse":
            from . import kernels  # noqa: F401  (registers torch.ops.fxfuse.*)
        return getattr(getattr(getattr(torch.ops, ns), op), overload)
    if kind == "hop":
        return getattr(torch.ops.higher_order, rest)
    if kind == "py":
        mod, _, qual = rest.partition(":")
        obj: Any = importlib.import_module(mod)
        for part in qual.split("."):
            obj = getattr(obj, part)
        return obj
    raise ValueError(f"unknown target {s!r}")


def _hint(d: Any) -> int | None:
    """The example value of a size (None for unbacked symbols)."""
    if isinstance(d, torch.SymInt):
        h = d.node.hint
        return None if h is None else int(h)
    return int(d)


def _spec(v: Any) -> Any:
    """JSON spec of a placeholder value: tensors by shape/stride/dtype/device (symbols kept)."""

    def dim(d: Any) -> Any:
        if isinstance(d, torch.SymInt):
            return {"sym": str(d.node.expr), "hint": _hint(d)}
        return int(d)

    if isinstance(v, torch.Tensor):
        return {
            "tensor": {
                "shape": [dim(d) for d in v.shape],
                "stride": [dim(d) for d in v.stride()],
                "dtype": str(v.dtype).replace("torch.", ""),
                "device": str(v.device),
                "requires_grad": bool(v.requires_grad),
            }
        }
    if isinstance(v, torch.SymInt):
        return {"symint": dim(v)}
    if isinstance(v, (bool, int, float)) or v is None:
        return {"const": v}
    raise TypeError(f"cannot serialize placeholder value of type {type(v).__name__}")


_MAX_CONST_BYTES = 64 << 20


def _tensor_bytes(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return base64.b64encode(t.reshape(-1).view(torch.uint8).numpy().tobytes()).decode()


def save_graph(path: str | os.PathLike[str], graph: fx.Graph | fx.GraphModule) -> None:
    """Save a post-grad graph (e.g. `capture.graphs[0].before`) as a self-contained JSON file.

    Stored: every node (op, target by qualified name, args, stack trace), placeholder specs
    (shape, stride, dtype, device; symbolic sizes with their hints) and the values of constant
    tensors (`get_attr`). Tensor metadata of intermediate nodes is recomputed on load, so the
    file depends only on op names and loads on other torch versions. Graphs that call Triton
    kernels through `triton_kernel_wrapper_*` do not carry the kernel and cannot be re-run.
    """
    gm = graph if isinstance(graph, fx.GraphModule) else None
    g = graph.graph if isinstance(graph, fx.GraphModule) else graph
    root = gm if gm is not None else g.owning_module
    nodes: list[dict[str, Any]] = []
    constants: dict[str, Any] = {}
    for n in g.nodes:
        d: dict[str, Any] = {"name": n.name, "op": n.op}
        if n.op == "placeholder":
            d["spec"] = _spec(n.meta.get("val", n.meta.get("example_value")))
        elif n.op == "get_attr":
            d["target"] = str(n.target)
            obj: Any = root
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            if not isinstance(obj, torch.Tensor):
                raise TypeError(f"get_attr {n.target} is a {type(obj).__name__}, not a tensor")
            c: dict[str, Any] = {"shape": list(obj.shape), "dtype": str(obj.dtype).replace("torch.", "")}
            if obj.numel() * obj.element_size() <= _MAX_CONST_BYTES:
                c["data"] = _tensor_bytes(obj)
            constants[str(n.target)] = c
        elif n.op == "call_function":
            d["target"] = _enc_target(n.target)
        elif n.op != "output":
            raise TypeError(f"cannot serialize {n.op} node {n.name}")
        if n.op != "placeholder":
            d["args"] = _enc(list(n.args))
            d["kwargs"] = _enc(dict(n.kwargs))
        if n.meta.get("stack_trace"):
            d["stack_trace"] = n.meta["stack_trace"]
        nodes.append(d)
    doc = {"format": FORMAT, "torch": torch.__version__, "nodes": nodes, "constants": constants}
    pathlib.Path(path).write_text(json.dumps(doc, indent=1) + "\n")


def _fake_inputs(specs: list[tuple[fx.Node, Any]], fake_mode: Any) -> list[Any]:
    """Fake values for placeholders; symbolic dims become fresh dynamic dims with the saved hints."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext

    shape_env = fake_mode.shape_env
    symbols: dict[str, Any] = {}
    out: list[Any] = []
    for i, (node, spec) in enumerate(specs):
        kind, s = next(iter(spec.items()))
        if kind == "tensor":
            hint = lambda d: d if isinstance(d, int) else (d["hint"] if d["hint"] is not None else 8)  # noqa: E731
            shape = [hint(d) for d in s["shape"]]
            stride = [hint(d) for d in s["stride"]]
            real = torch.empty_strided(shape, stride, dtype=getattr(torch, s["dtype"]), device="meta")
            dynamic = [not isinstance(d, int) for d in s["shape"]]
            src = ConstantSource(f"fxfuse_input_{i}")
            if any(dynamic) and shape_env is not None:
                ctx = StatelessSymbolicContext(
                    dynamic_sizes=[DimDynamic.DYNAMIC if dy else DimDynamic.STATIC for dy in dynamic]
                )
                fake = fake_mode.from_tensor(real, source=src, symbolic_context=ctx)
                for d, fd in zip(s["shape"], fake.shape):
                    if not isinstance(d, int) and isinstance(fd, torch.SymInt):
                        symbols.setdefault(d["sym"], fd)
            else:
                fake = fake_mode.from_tensor(real, static_shapes=True)
            fake = _to_device(fake, s["device"], fake_mode)
            if s.get("requires_grad"):
                fake.requires_grad_(True)
            out.append(fake)
        elif kind == "symint":
            out.append(s)  # resolved below, once tensor dims have named the symbols
        else:
            out.append(s)
    for i, (node, spec) in enumerate(specs):
        kind, s = next(iter(spec.items()))
        if kind == "symint":
            if isinstance(s, int):
                out[i] = s
            elif s["sym"] in symbols:
                out[i] = symbols[s["sym"]]
            else:
                from torch._dynamo.source import ConstantSource as _CS

                src = _CS(f"fxfuse_sym_{i}")
                hint = s["hint"] if s["hint"] is not None else 8
                sym = shape_env.create_symbol(hint, src, dynamic_dim=DimDynamic.DYNAMIC)
                out[i] = shape_env.create_symintnode(sym, hint=hint, source=src)
                symbols[s["sym"]] = out[i]
    return out


def _to_device(fake: torch.Tensor, device: str, fake_mode: Any) -> torch.Tensor:
    """Fake tensors made from meta tensors are on meta; move them to the saved device."""
    if torch.device(device).type == "meta":
        return fake
    with fake_mode:
        return torch.empty_strided(fake.shape, fake.stride(), dtype=fake.dtype, device=device)


@contextlib.contextmanager
def triton_target(arch: int = 90, warp_size: int = 32) -> Iterator[None]:
    """Let Triton build TTIR for a CUDA target on a machine without a GPU (no kernel runs).

    Inductor's analysis of user-defined Triton kernels (which buffers a traced launch clones) builds
    TTIR for the active target; with this, a fake-CUDA graph (`on_fake_device`) goes through the
    passes' CUDA path on a CPU-only CI machine."""
    from unittest import mock

    import triton
    from triton.backends.compiler import GPUTarget

    class _Driver:
        def get_current_target(self) -> Any:
            return GPUTarget("cuda", arch, warp_size)

        def get_active_torch_device(self) -> torch.device:
            return torch.device("cuda")

    with mock.patch.object(type(triton.runtime.driver), "active", new=_Driver()):
        yield


def triton_launches(gm: fx.GraphModule | fx.Graph) -> list[tuple[Any, dict[str, Any]]]:
    """(kernel, kwargs) of every traced Triton launch in a graph, as Inductor's lowering passes them
    to its read/write analysis: node arguments as their fake values, constant arguments merged."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    graph = gm.graph if isinstance(gm, fx.GraphModule) else gm
    out = []
    for n in graph.nodes:
        if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
            kw = {k: v.meta["val"] if isinstance(v, fx.Node) else v for k, v in n.kwargs["kwargs"].items()}
            kw.update(kernel_side_table.get_constant_args(n.kwargs["constant_args_idx"]))
            out.append((kernel_side_table.get_kernel(n.kwargs["kernel_idx"]), kw))
    return out


def on_fake_device(gm: fx.GraphModule, device: str = "cuda") -> fx.GraphModule:
    """`gm` (a captured CPU graph) re-propagated with fake tensors on `device`, in place: a CUDA
    graph for the passes' CUDA path on a machine without a GPU. Factory ops' device kwargs move too.
    A graph captured with dynamic shapes stays symbolic: its ShapeEnv is reused, so SymInt
    placeholders pass through and tensor sizes keep their symbols (and guards)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols, is_symbolic
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    dev = torch.device(device) if torch.device(device).type != "cuda" else torch.device("cuda", 0)
    for n in gm.graph.nodes:
        d = n.kwargs.get("device")
        if d is not None and torch.device(d).type == "cpu":
            n.kwargs = {**n.kwargs, "device": dev}
    vals = [p.meta["val"] for p in gm.graph.nodes if p.op == "placeholder"]
    syms = [x for v in vals for x in ([v] if isinstance(v, torch.SymInt) else
                                      [*v.shape, *v.stride()] if isinstance(v, torch.Tensor) else []) if is_symbolic(x)]
    if any(free_unbacked_symbols(x) for x in syms):
        raise ValueError("on_fake_device: unbacked symbolic placeholders are not supported")
    mode = FakeTensorMode(shape_env=syms[0].node.shape_env if syms else None)
    ins = [_to_device(v, str(dev), mode) if isinstance(v, torch.Tensor) else v for v in vals]
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*ins)
    return gm


def load_graph(path: str | os.PathLike[str]) -> fx.GraphModule:
    """Load a graph saved by `save_graph` as a GraphModule with fake `meta["val"]` on every node.

    Values are recomputed by fake-tensor propagation in a fresh FakeTensorMode (with a ShapeEnv,
    so saved symbolic sizes stay symbolic), which is what the fxfuse passes need. Stack traces are
    restored, so reports name the original source lines.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    doc = json.loads(pathlib.Path(path).read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: not an fxfuse graph file (format {doc.get('format')!r}, expected {FORMAT!r})")
    g = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    specs: list[tuple[fx.Node, Any]] = []
    for d in doc["nodes"]:
        op = d["op"]
        if op == "placeholder":
            n = g.placeholder(d["name"])
            specs.append((n, d["spec"]))
        elif op == "get_attr":
            n = g.get_attr(d["target"])
        elif op == "call_function":
            n = g.call_function(_dec_target(d["target"]), tuple(_dec(d["args"], nodes)), _dec(d["kwargs"], nodes))
        elif op == "output":
            n = g.output(_dec(d["args"], nodes)[0])
        else:
            raise ValueError(f"unsupported node op {op!r}")
        if op not in ("placeholder", "output"):
            n.name = d["name"]  # keep the original names (graph namespace may have suffixed them)
        if d.get("stack_trace"):
            n.meta["stack_trace"] = d["stack_trace"]
        nodes[d["name"]] = n
    consts: dict[str, Any] = {}
    for name, c in doc["constants"].items():
        dt = getattr(torch, c["dtype"])
        if "data" in c:
            raw = bytearray(base64.b64decode(c["data"]))
            t = torch.frombuffer(raw, dtype=torch.uint8).view(dt).reshape(c["shape"]) if raw else torch.empty(c["shape"], dtype=dt)
        else:
            warnings.warn(f"constant {name} was too large to save; loading zeros")
            t = torch.zeros(c["shape"], dtype=dt)
        consts[name] = t
    gm = fx.GraphModule(consts, g)
    fake_mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    fake_args = _fake_inputs(specs, fake_mode)
    for (n, _), v in zip(specs, fake_args):
        n.meta["val"] = v
    FakeTensorProp(gm, fake_mode).propagate_dont_convert_inputs(*fake_args)
    return gm


def random_inputs(gm: fx.GraphModule, *, seed: int = 0, device: str | None = None) -> list[Any]:
    """Real inputs matching the placeholders' fake values (symbolic sizes at their hints)."""
    hint_int = lambda d: _hint(d) if _hint(d) is not None else 8  # noqa: E731

    gen = torch.Generator().manual_seed(seed)
    out: list[Any] = []
    for n in gm.graph.find_nodes(op="placeholder"):
        v = n.meta["val"]
        if isinstance(v, torch.SymInt):
            out.append(hint_int(v))
        elif isinstance(v, torch.Tensor):
            shape = [hint_int(d) for d in v.shape]
            stride = [hint_int(d) for d in v.stride()]
            dev = device or v.device.type
            if v.dtype.is_floating_point and v.dtype.itemsize >= 2:
                base = torch.randn(shape, generator=gen, dtype=torch.float32)
            else:
                base = torch.randint(-4, 5, shape, generator=gen).float() if v.dtype != torch.bool else torch.ones(shape)
            t = torch.empty_strided(shape, stride, dtype=v.dtype, device=dev)
            t.copy_(base.to(v.dtype) if v.dtype != torch.bool else base.bool())
            out.append(t)
        else:
            out.append(v)
    return out


@dataclass
class Reapplied:
    """Result of `reapply`: the rewritten copy, what fxfuse did to it, and its stable text."""

    graph_module: fx.GraphModule
    report: GraphReport | None
    counters: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def text(self) -> str:
        return graph_text(self.graph_module)


def reapply(graph_module: fx.GraphModule, passes: Callable[[fx.Graph], Any] | None = None) -> Reapplied:
    """Run the fxfuse passes (default `fxfuse.passes`) on a copy of a loaded or captured graph.

    The input GraphModule is left unchanged; the result holds the rewritten, recompiled copy
    (runnable on real inputs, e.g. from `random_inputs`), the report of this run (also added to
    `fxfuse.report()`) and the counter increments.
    """
    gm = _snapshot(graph_module.graph)
    p = passes if passes is not None else _default_passes()
    n0 = len(_report)
    with _counting() as delta:
        p(gm.graph)
    gm.recompile()
    grs = _report.since(n0)
    return Reapplied(graph_module=gm, report=grs[-1] if grs else None, counters=delta)
