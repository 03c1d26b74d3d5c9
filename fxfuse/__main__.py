"""Command line: `python -m fxfuse demo [--quick] [--device cpu|cuda]` and
`python -m fxfuse explain MODULE:FACTORY [--device cpu|cuda] [--json]`.

`demo` compiles small transformers decoders (dense fp8 Llama, Qwen3-MoE) with and without fxfuse
and prints what fused, the numerics against eager and, on CUDA, step latency (see fxfuse/demo.py).

`FACTORY` is a function in `MODULE` (a dotted module name, or a path to a .py file) that takes no
arguments and returns `(model, example_inputs)`; `example_inputs` is a tuple/list of positional
inputs, or a dict of keyword inputs. The model is compiled with fxfuse on the chosen device and
run once; the fxfuse report (applied fusions and near misses with their reasons) is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import pathlib
import sys
from typing import Any, Callable, Sequence


def load_factory(spec: str) -> Callable[[], Any]:
    """Resolve `module.path:function` or `path/to/file.py:function`."""
    mod_name, sep, attr = spec.rpartition(":")
    if not sep or not mod_name or not attr:
        raise SystemExit(f"expected MODULE:FACTORY, got {spec!r}")
    if mod_name.endswith(".py") or os.sep in mod_name or "/" in mod_name:
        path = pathlib.Path(mod_name).resolve()
        if not path.exists():
            raise SystemExit(f"no such file: {path}")
        sys.path.insert(0, str(path.parent))
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[path.stem] = module
        module_spec.loader.exec_module(module)
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise SystemExit(f"cannot import {mod_name!r} for {spec}: {e}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SystemExit(f"{spec}: {getattr(obj, '__name__', mod_name)!r} has no attribute {part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SystemExit(f"{spec} is not callable")
    return obj


def _to_device(x: Any, device: str) -> Any:
    import torch
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, x)


def explain(
    spec: str,
    *,
    device: str | None = None,
    as_json: bool = False,
    verbose: bool = False,
    show_graphs: bool = False,
    grad: bool = False,
    dynamic: bool | None = None,
) -> str:
    """Build the model from the factory, compile it with fxfuse, run it once; return the printed text."""
    import torch

    import fxfuse
    from fxfuse.testing import capture_graphs

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    made = load_factory(spec)()
    if not (isinstance(made, (tuple, list)) and len(made) == 2):
        raise SystemExit(f"{spec} must return (model, example_inputs), got {type(made).__name__}")
    model, example_inputs = made
    if isinstance(model, torch.nn.Module):
        model = model.to(device)
    example_inputs = _to_device(example_inputs, device)
    if isinstance(example_inputs, dict):
        names = list(example_inputs)
        target: Callable[..., Any] = lambda *a: model(**dict(zip(names, a)))  # noqa: E731
        args = tuple(example_inputs.values())
    else:
        target = model
        args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    fxfuse.report.clear()
    ctx = contextlib.nullcontext() if grad else torch.no_grad()
    with ctx:
        cap = capture_graphs(target, *args, dynamic=dynamic)
    if as_json:
        import json

        d = cap.report.to_dict()
        d["counters"] = dict(cap.counters)
        d["device"] = device
        if show_graphs:
            d["graph_text"] = [{"before": g.before_text, "after": g.after_text} for g in cap.graphs]
        return json.dumps(d, indent=2, default=str)
    out = [f"fxfuse explain {spec} on {device}: " + (", ".join(f"{k}={v}" for k, v in sorted(cap.counters.items())) or "no fusions")]
    out.append(cap.report.format(verbose=verbose))
    if show_graphs:
        for i, g in enumerate(cap.graphs):
            out.append(f"\n--- graph {i} before fxfuse ---\n{g.before_text}--- graph {i} after fxfuse ---\n{g.after_text}")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fxfuse", description="fxfuse tools")
    sub = parser.add_subparsers(dest="cmd", required=True)
    dm = sub.add_parser("demo", help="compile real transformers decoders with and without fxfuse: fusions, numerics, latency")
    from .demo import add_arguments as _demo_arguments

    _demo_arguments(dm)
    ex = sub.add_parser("explain", help="compile a model with fxfuse and print what fused and what did not, and why")
    ex.add_argument("factory", metavar="MODULE:FACTORY", help="function returning (model, example_inputs)")
    ex.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    ex.add_argument("--json", action="store_true", help="print the report as JSON")
    ex.add_argument("--verbose", "-v", action="store_true", help="list replaced nodes per fusion")
    ex.add_argument("--graphs", action="store_true", help="also print the post-grad graphs before/after fxfuse")
    ex.add_argument("--grad", action="store_true", help="compile with autograd enabled (default: torch.no_grad())")
    ex.add_argument("--dynamic", action="store_true", default=None, help="compile with dynamic=True")
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        from .demo import main_from_args

        return main_from_args(args)
    if args.cmd == "explain":
        print(
            explain(
                args.factory,
                device=args.device,
                as_json=args.json,
                verbose=args.verbose,
                show_graphs=args.graphs,
                grad=args.grad,
                dynamic=args.dynamic,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
