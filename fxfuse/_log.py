"""Logging for fxfuse.

`TORCH_LOGS="fxfuse"` shows one INFO line per pass per graph; `TORCH_LOGS="+fxfuse"` adds DEBUG
lines (graphs before/after, every rejected candidate with its reason). Graph dumps also go to
`trace_structured` artifacts, so `TORCH_TRACE` + tlparse shows the rewritten graphs.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger("fxfuse")


def trace_artifact(name: str, payload_fn: Callable[[], str]) -> None:
    """Emit a string artifact for tlparse; costs nothing unless TORCH_TRACE is set."""
    try:
        torch._logging.trace_structured(
            "artifact",
            metadata_fn=lambda: {"name": name, "encoding": "string"},
            payload_fn=payload_fn,
        )
    except Exception:  # never let logging break a compile
        log.debug("trace_structured failed for %s", name, exc_info=True)
