"""The pass pipeline Inductor calls through `post_grad_custom_pre_pass`.

Stages run in order: normalize -> unwrap -> recognize/rewrite (one pass per fusion family)
-> cleanup (DCE + lint). Each candidate runs inside `PassContext.candidate`, so a failed check
becomes a near miss and an internal error skips only that candidate (unless strict=True).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import pathlib
import time
from typing import Any, Callable, Iterable, Iterator, Literal, Protocol

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from . import _ttir_cache
from ._log import log, trace_artifact
from .fx_utils import Reject, source_location, source_locations, trace_cache
from .kernels import launch_overrides_digest
from .report import Fusion, GraphReport, NearMiss, PassTiming, report

counters: collections.Counter[str] = collections.Counter()
"""Applied rewrites by fusion name, e.g. counters["rmsnorm_quant"]. Reset with counters.clear()."""

UnwrapMode = Literal["registered", "auto"] | None

OPTIONS: dict[str, tuple[type, str]] = {
    "gate": (bool, "False ships rewrites on CUDA without a benchmark gate (same as FXFUSE_UNGATED=1)"),
    "moe_fold_routing": (bool, "True folds the fused MoE router into moe_experts' first decode kernel (default "
                               "False: on an H200 the fold saved nothing at 1 token and cost 8 us per layer at 8)"),
}
"""Known `options` keys -> (type, meaning). A family that reads a new option adds it here."""


def _names(arg: Any, what: str) -> frozenset[str]:
    """Fusion names from a list/tuple/set of str (a bare str is one name, not its letters)."""
    if isinstance(arg, str):
        return frozenset({arg})
    try:
        names = frozenset(arg)
    except TypeError:
        raise TypeError(f"{what} must be a fusion name or an iterable of names, not {type(arg).__name__}") from None
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"{what} must contain fusion names (str), got {bad!r}")
    return names


def _check_options(options: dict[str, Any]) -> None:
    for k, v in options.items():
        if k not in OPTIONS:
            raise ValueError(f"unknown option {k!r}; known options: {', '.join(sorted(OPTIONS))}")
        typ, meaning = OPTIONS[k]
        if type(v) is not typ:
            raise TypeError(f"option {k!r} must be {typ.__name__} ({meaning}), not {v!r}")


class GraphPass(Protocol):
    """One stage of the pipeline (a module in fxfuse.patterns)."""

    name: str

    def __call__(self, graph: fx.Graph, ctx: "PassContext") -> None: ...


class PassContext:
    """Per-graph state handed to each pass: config, recording of hits and near misses."""

    def __init__(self, pipeline: "FusionPasses", graph: fx.Graph, graph_report: GraphReport) -> None:
        self.pipeline = pipeline
        self.graph = graph
        self.graph_report = graph_report
        self.applied_count = 0

    @property
    def strict(self) -> bool:
        return self.pipeline.strict

    @property
    def options(self) -> dict[str, Any]:
        return self.pipeline.options

    def applied(self, name: str, replaced: Iterable[fx.Node], kernel: str, detail: str = "") -> Fusion:
        """Record one rewrite: bump the counter and add it to the report; returns its report entry
        (a later rewrite that absorbs it may annotate it)."""
        replaced = list(replaced)
        counters[name] += 1
        self.applied_count += 1
        fusion = Fusion(
            name=name,
            locations=source_locations(replaced),
            replaced=[f"{n.name}={getattr(n.target, '__name__', n.target)}" for n in replaced],
            kernel=kernel,
            detail=detail,
        )
        self.graph_report.fusions.append(fusion)
        log.debug("fxfuse %s: fused %d nodes into %s %s", name, len(replaced), kernel, detail)
        return fusion

    def near_miss(self, family: str, anchor: fx.Node, reason: str) -> None:
        """Record a candidate that looked like `family` but failed a check."""
        m = NearMiss(family=family, location=source_location(anchor), anchor=anchor.name, reason=reason)
        self.graph_report.near_misses.append(m)
        log.debug("fxfuse near miss: %s (node %s)", m.line(), anchor.name)

    def extra_failed(self, e: Exception, what: str, kept: str) -> None:
        """An optional extra of a rewrite (e.g. the routing fold, the router GEMV) raised: the plain
        rewrite still applies, so record it as an internal error and go on (raise if strict)."""
        if self.strict:
            raise e
        msg = f"{what}: {type(e).__name__}: {e} ({kept})"
        self.graph_report.errors.append(msg)
        log.warning("fxfuse internal error, extra skipped: %s", msg, exc_info=log.isEnabledFor(logging.DEBUG))

    @contextlib.contextmanager
    def candidate(self, family: str, anchor: fx.Node) -> Iterator[None]:
        """Guard one candidate: Reject -> near miss; any other error -> logged skip (raise if strict)."""
        try:
            yield
        except Reject as r:
            self.near_miss(family, anchor, str(r))
        except Exception as e:  # noqa: BLE001 - a pass must never break the user's compile
            if self.strict:
                raise
            msg = f"{family} at {anchor.name}: {type(e).__name__}: {e}"
            self.graph_report.errors.append(msg)
            log.warning("fxfuse internal error, candidate skipped: %s", msg, exc_info=log.isEnabledFor(logging.DEBUG))


def _default_passes() -> list[GraphPass]:
    from .patterns import default_passes

    return default_passes()


_DIGESTS: dict[Any, str] = {}


def _source_digest(root: pathlib.Path | None = None) -> str:
    """Hash of every fxfuse source file: any edit to a pass, pattern or kernel changes the uuid.
    Inductor asks for the uuid on every compile: the files are read again only when their names,
    sizes or modification times change."""
    root = root or pathlib.Path(__file__).parent
    files = sorted([*root.rglob("*.py"), *root.rglob("*.json")])
    stamp = (str(root), tuple((str(p), st.st_size, st.st_mtime_ns) for p in files for st in (p.stat(),)))
    if stamp in _DIGESTS:
        return _DIGESTS[stamp]
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    _DIGESTS[stamp] = h.hexdigest()
    return _DIGESTS[stamp]


def _callable_identity(fn: Any) -> str | None:
    """Cache identity of a user pass: its uuid() if it is a CustomGraphPass, else its code, closure
    values and the helpers it calls (None when any of that cannot be known)."""
    from ._identity import callable_identity

    return callable_identity(fn)


def _auto_impls_digest() -> str | None:
    """unwrap="auto" traces Python custom ops' implementations: their identity, None if unknown."""
    from ._identity import callable_identity

    try:
        from torch._library.custom_ops import OPDEFS
    except ImportError:  # private API moved: cannot know what auto mode will trace
        return None
    h = hashlib.sha256()
    for name in sorted(OPDEFS):
        opdef = OPDEFS.get(name)
        if opdef is None:
            continue
        fns = dict(getattr(opdef, "_backend_fns", {}) or {})
        fns["__init__"] = getattr(opdef, "_init_fn", None)
        for dev in sorted(fns, key=str):
            if fns[dev] is None:
                continue
            ident = callable_identity(fns[dev])
            if ident is None:
                return None
            h.update(f"{name}\x00{dev}\x00{ident}\x01".encode())
    return h.hexdigest()


class FusionPasses(CustomGraphPass):
    """A configured fxfuse pipeline; pass it as `post_grad_custom_pre_pass`.

    Args:
        enable: only these fusion names run (default: all).
        disable: these fusion names do not run.
        strict: raise on internal pass errors instead of logging and skipping the candidate.
        unwrap: "registered" (default) unwraps ops with a registered decomposition; "auto" also
            unwraps Python custom ops whose implementation traces to ATen; None turns unwrap off.
        before / after: user graph passes (callables taking an fx.Graph) chained around fxfuse.
        options: extra per-fusion options (e.g. {"gate": False} to skip benchmark gating).
    """

    def __init__(
        self,
        *,
        enable: Iterable[str] | None = None,
        disable: Iterable[str] = (),
        strict: bool = False,
        unwrap: UnwrapMode | bool = "registered",
        before: Callable[[fx.Graph], Any] | None = None,
        after: Callable[[fx.Graph], Any] | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        if unwrap is True:
            unwrap = "registered"
        if unwrap is False:
            unwrap = None
        if unwrap not in ("registered", "auto", None):
            raise ValueError(f"unwrap must be 'registered', 'auto' or None, not {unwrap!r}")
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be True or False, not {strict!r}")
        for name, fn in (("before", before), ("after", after)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be a callable taking an fx.Graph, not {fn!r}")
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"options must be a dict, not {type(options).__name__}")
        self.enable = None if enable is None else _names(enable, "enable")
        self.disable = _names(disable, "disable")
        self.strict = strict
        self.unwrap = unwrap
        self.before = before
        self.after = after
        self.options = dict(options or {})
        _check_options(self.options)
        known = {p.name for p in _default_passes()}
        unknown = ((self.enable or frozenset()) | self.disable) - known
        if unknown:
            raise ValueError(f"unknown fusion name(s) {sorted(unknown)}; known: {sorted(known)}")

    def passes(self) -> list[GraphPass]:
        """The stages this configuration runs, in order."""
        out = []
        for p in _default_passes():
            if p.name in self.disable:
                continue
            if self.enable is not None and p.name not in self.enable and p.name != "normalize":
                continue
            if p.name == "unwrap" and self.unwrap is None:
                continue
            out.append(p)
        return out

    def __call__(self, graph: fx.Graph) -> None:
        _ttir_cache.install()  # Inductor analyses every fxfuse kernel node it lowers after this pass
        if self.before is not None:
            self.before(graph)
        greport = report.new_graph()
        ctx = PassContext(self, graph, greport)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("fxfuse graph %d before:\n%s", greport.graph_id, graph)
        trace_artifact("fxfuse_graph_before", lambda: str(graph))
        with trace_cache(graph):
            changed = self._run_passes(graph, ctx, greport)
        if changed:
            graph.eliminate_dead_code()
            graph.lint()
            if log.isEnabledFor(logging.DEBUG):
                log.debug("fxfuse graph %d after:\n%s", greport.graph_id, graph)
        if self.after is not None:
            self.after(graph)

    def _run_passes(self, graph: fx.Graph, ctx: PassContext, greport: GraphReport) -> bool:
        """Each stage in order, timed; True when any rewrite applied."""
        changed = False
        for p in self.passes():
            t0 = time.perf_counter()
            before_count = ctx.applied_count
            try:
                p(graph, ctx)
            except Exception as e:  # noqa: BLE001
                if self.strict:
                    raise
                greport.errors.append(f"{p.name}: {type(e).__name__}: {e}")
                log.warning("fxfuse pass %s failed and was skipped: %s", p.name, e, exc_info=log.isEnabledFor(logging.DEBUG))
            n = ctx.applied_count - before_count
            dt = time.perf_counter() - t0
            greport.timings.append(PassTiming(p.name, n, dt))
            if p.name != "normalize":
                log.info("fxfuse graph %d: %s matched %d time(s) in %.1f ms", greport.graph_id, p.name, n, dt * 1e3)
            if n:
                changed = True
                trace_artifact(f"fxfuse_after_{p.name}", lambda: str(graph))
        return changed

    def uuid(self) -> Any:
        """Cache key of everything that decides the rewrite: sources, config, chained passes."""
        parts = [
            _source_digest(),
            repr(sorted(self.enable)) if self.enable is not None else "all",
            repr(sorted(self.disable)),
            repr(self.strict),
            repr(self.unwrap),
            repr(sorted(self.options.items())),
            torch.__version__,
            # gating.rejects reads it on every CUDA candidate: a graph cached under the other
            # setting would keep (or lack) the ungated kernels
            "ungated=" + repr(os.environ.get("FXFUSE_UNGATED") == "1"),
            launch_overrides_digest(),
        ]
        for user_pass in (self.before, self.after):
            if user_pass is None:
                parts.append("-")
                continue
            ident = _callable_identity(user_pass)
            if ident is None:
                return None  # unknown user code: let Inductor bypass the cache rather than go stale
            parts.append(ident)
        from .patterns.unwrap import registry_digest

        extra = [registry_digest()] if self.unwrap is not None else ["no-unwrap"]
        if self.unwrap == "auto":
            extra.append(_auto_impls_digest())
        if any(e is None for e in extra):
            return None  # a decomposition or auto-mode implementation we cannot identify: no caching
        parts.extend(e for e in extra if e is not None)
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()

    def __repr__(self) -> str:
        return f"FusionPasses(passes={[p.name for p in self.passes()]}, strict={self.strict}, unwrap={self.unwrap!r})"
