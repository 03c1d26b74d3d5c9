"""What fxfuse did and why: applied fusions and near misses, per compiled graph.

`fxfuse.report()` returns a `Report` of every graph the passes saw since `fxfuse.report.clear()`.
`str(report)` is a readable table; `report.to_dict()` is JSON-ready.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Fusion:
    """One applied rewrite."""

    name: str
    locations: list[str]
    replaced: list[str]
    kernel: str
    detail: str = ""


@dataclass
class NearMiss:
    """A region that looked like a fusion family but was rejected, with the first failed check."""

    family: str
    location: str | None
    anchor: str
    reason: str

    def line(self) -> str:
        where = f" at {self.location}" if self.location else ""
        return f"{self.family}{where}: {self.reason}"


@dataclass
class PassTiming:
    name: str
    applied: int
    seconds: float


@dataclass
class GraphReport:
    """Everything the pipeline recorded for one graph."""

    graph_id: int
    fusions: list[Fusion] = field(default_factory=list)
    near_misses: list[NearMiss] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    timings: list[PassTiming] = field(default_factory=list)


@dataclass
class Report:
    graphs: list[GraphReport] = field(default_factory=list)
    cache_hits: int = 0
    """Graphs Inductor served from its FX graph cache since clear(): the passes did not run for
    them (their cached code keeps the rewrites), so they are missing from `graphs`."""

    @property
    def fusions(self) -> list[Fusion]:
        return [f for g in self.graphs for f in g.fusions]

    @property
    def near_misses(self) -> list[NearMiss]:
        return [m for g in self.graphs for m in g.near_misses]

    @property
    def errors(self) -> list[str]:
        return [e for g in self.graphs for e in g.errors]

    def near_miss_lines(self) -> list[str]:
        """One plain-words line per near miss: `family at file.py:LINE: reason`."""
        return [m.line() for m in self.near_misses]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: {"graphs": [{graph_id, fusions, near_misses, errors, timings}, ...]}."""
        return {"graphs": [dataclasses.asdict(g) for g in self.graphs], "cache_hits": self.cache_hits}

    def to_json(self, **kwargs: Any) -> str:
        import json

        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        return self.format()

    def format(self, verbose: bool = False) -> str:
        """The readable table; `verbose=True` also lists the replaced nodes and fusion details."""
        lines: list[str] = []
        cached = (
            f"{self.cache_hits} graph(s) came from Inductor's FX graph cache: fxfuse did not run on them "
            "(their cached code keeps its rewrites); compile under torch._inductor.utils.fresh_cache() "
            "to see what fused"
        )
        if not self.graphs:
            return "fxfuse report: no graphs compiled since the last clear()" + (f"; {cached}" if self.cache_hits else "")
        if self.cache_hits:
            lines.append(cached)
        for g in self.graphs:
            lines.append(f"graph {g.graph_id}: {len(g.fusions)} fusion(s), {len(g.near_misses)} near miss(es)")
            rows = [("fusion", "source", "kernel", "replaced")]
            for f in g.fusions:
                rows.append((f.name, ", ".join(f.locations) or "?", f.kernel, f"{len(f.replaced)} nodes"))
            if len(rows) > 1:
                lines.extend(_table(rows, indent="  "))
            if verbose:
                for f in g.fusions:
                    lines.append(f"  {f.name} at {', '.join(f.locations) or '?'}: {f.detail}".rstrip(": "))
                    lines.append(f"    replaced: {', '.join(f.replaced)}")
            if g.near_misses:
                rows = [("near miss", "source", "reason")]
                for m in g.near_misses:
                    rows.append((m.family, m.location or m.anchor, m.reason))
                lines.extend(_table(rows, indent="  "))
            for e in g.errors:
                lines.append(f"  internal error (candidate skipped): {e}")
        return "\n".join(lines)


def _table(rows: list[tuple[str, ...]], indent: str = "") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for k, r in enumerate(rows):
        out.append(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if k == 0:
            out.append(indent + "  ".join("-" * w for w in widths))
    return out


class _ReportRegistry:
    """Callable that snapshots the recorded graphs; `.clear()` forgets them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._graphs: list[GraphReport] = []
        self._next_id = 0
        self._hits_at_clear = _fx_cache_hits()

    def new_graph(self) -> GraphReport:
        with self._lock:
            g = GraphReport(graph_id=self._next_id)
            self._next_id += 1
            self._graphs.append(g)
            return g

    def __len__(self) -> int:
        with self._lock:
            return len(self._graphs)

    def since(self, start: int) -> list[GraphReport]:
        """Graph reports recorded after the first `start` ones (pair with len() taken before)."""
        with self._lock:
            return list(self._graphs[start:])

    def __call__(self) -> Report:
        with self._lock:
            return Report(graphs=list(self._graphs), cache_hits=max(_fx_cache_hits() - self._hits_at_clear, 0))

    def clear(self) -> None:
        """Forget the recorded graphs; graph ids start from 0 again."""
        with self._lock:
            self._graphs.clear()
            self._next_id = 0
            self._hits_at_clear = _fx_cache_hits()


def _fx_cache_hits() -> int:
    """Inductor's count of FX graph cache hits in this process (0 if the counter is unavailable)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["inductor"]["fxgraph_cache_hit"])
    except Exception:  # noqa: BLE001 - private counter; absent means unknown
        return 0


report = _ReportRegistry()
