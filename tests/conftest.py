"""Shared pytest setup: golden graph snapshots and per-test isolation of fxfuse state.

`pytest --update-graphs` (or `FXFUSE_UPDATE_GRAPHS=1 pytest`) rewrites tests/graphs/*.txt from the
captured graphs instead of comparing against them.
"""

from __future__ import annotations

import os
import pathlib
from typing import Callable, Iterator

import pytest
import torch

import fxfuse
from fxfuse.testing import UPDATE_ENV, assert_golden

GRAPHS_DIR = pathlib.Path(__file__).parent / "graphs"

# every traced or lowered launch of an fxfuse kernel checks its declared accesses against torch's
# analysis (fxfuse.kernels.accesses); a test that disagrees fails in `_fxfuse_isolation`
os.environ.setdefault("FXFUSE_VERIFY_ACCESSES", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-graphs",
        action="store_true",
        default=False,
        help=f"rewrite golden graph snapshots in tests/graphs/ (same as {UPDATE_ENV}=1)",
    )


@pytest.fixture(autouse=True)
def _fxfuse_isolation() -> Iterator[None]:
    """Every test starts with empty fxfuse counters/report and no compiled frames from earlier tests."""
    from fxfuse import _ttir_cache

    fxfuse.counters.clear()
    fxfuse.report.clear()
    torch._dynamo.reset()
    _ttir_cache.mismatches.clear()
    yield
    torch._dynamo.reset()
    assert not _ttir_cache.mismatches, _ttir_cache.mismatches


@pytest.fixture
def golden(request: pytest.FixtureRequest) -> Callable[[str, str], None]:
    """`golden(name, text)`: compare text with tests/graphs/<name>.txt (rewrite it when updating)."""
    update = True if request.config.getoption("--update-graphs") else None  # None: read the env var

    def check(name: str, text: str) -> None:
        assert_golden(GRAPHS_DIR / f"{name}.txt", text, update=update)

    return check


@pytest.fixture
def sm90_target() -> Iterator[None]:
    """Let Triton build TTIR for sm_90 without a GPU: Inductor's mutation analysis of user kernels
    (which buffers a traced launch clones) runs on it."""
    from fxfuse.testing import triton_target

    with triton_target(90):
        yield


@pytest.fixture
def fresh_cache() -> Iterator[None]:
    """fxfuse's TTIR analysis cache emptied (memory) and reinstalled; uninstalled after (the next
    pipeline run installs it again)."""
    from fxfuse import _ttir_cache

    _ttir_cache.uninstall()
    assert _ttir_cache.install()
    yield
    _ttir_cache.uninstall()
