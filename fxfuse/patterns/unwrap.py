"""Unwrap opaque custom ops into ATen so fusion can see through them (filled in by the unwrap issue)."""

from __future__ import annotations

import hashlib

import torch.fx as fx

_REGISTRY: dict[str, object] = {}


def registry_digest() -> str:
    """Part of the pipeline uuid: which decompositions are registered."""
    return hashlib.sha256(repr(sorted(_REGISTRY)).encode()).hexdigest()


class Unwrap:
    name = "unwrap"

    def __call__(self, graph: fx.Graph, ctx: object) -> None:
        return None


PASS = Unwrap()
