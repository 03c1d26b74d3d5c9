"""The cache of Inductor's read/write analysis of fxfuse kernels (fxfuse/_ttir_cache.py): it must
give exactly torch's answer for every call, never an answer recorded for other constexprs, dtypes or
values, never touch kernels that are not fxfuse's, and save the analysis Inductor repeats for every
kernel node it lowers (sm_90 TTIR built on the CPU)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
import triton
import triton.language as tl

import fxfuse
from fxfuse import _ttir_cache, demo
from fxfuse.testing import on_fake_device, post_grad_graph, reapply, triton_launches

pytest.importorskip("transformers")


def _tkw() -> Any:
    from torch._higher_order_ops import triton_kernel_wrap

    return triton_kernel_wrap


def _name() -> str:
    return next(n for n in _ttir_cache._NAMES if hasattr(_tkw(), n))


def _original() -> Any:
    fn = getattr(_tkw(), _name())
    return fn.__wrapped__ if getattr(fn, "__wrapped_by_fxfuse__", False) else fn


@pytest.fixture(autouse=True)
def own_disk_dir(tmp_path, monkeypatch) -> Any:
    """Each test stores analyses in a directory of its own (none left by an earlier run)."""
    monkeypatch.setenv("FXFUSE_TTIR_CACHE_DIR", str(tmp_path / "ttir"))
    return tmp_path / "ttir"


def _fused(name: str, layers: int, tokens: int = 8) -> torch.fx.GraphModule:
    dm = demo.BUILDERS[name]("cpu", True, layers=layers)
    ids = demo.random_ids(dm.vocab, tokens, "cpu", seed=1).reshape(1, -1)
    gm = on_fake_device(post_grad_graph(dm.module, ids, dynamic=False))
    return reapply(gm, passes=fxfuse.FusionPasses(strict=True, options={"gate": False})).graph_module


@pytest.mark.parametrize("name", ["dense_fp8", "moe"])
def test_same_answer_as_torch_and_lowering_reuses_the_pass(sm90_target, fresh_cache, name) -> None:
    """Every launch of a 3-layer model: the cached answer is torch's; the pass analysed each distinct
    launch once, so the lowering's per-node analyses are all hits."""
    misses0 = _ttir_cache.stats["misses"]  # the counters run over the whole session
    gm = _fused(name, 3)
    calls = triton_launches(gm)
    assert len(calls) >= 9, len(calls)
    misses = _ttir_cache.stats["misses"]
    hits = _ttir_cache.stats["hits"]
    analyse = getattr(_tkw(), _name())
    assert getattr(analyse, "__wrapped_by_fxfuse__", False)
    for kernel, kw in calls:
        assert analyse(kernel, kw, {}) == _original()(kernel, kw, {})
    assert _ttir_cache.stats["misses"] == misses, "lowering analysed a launch the pass had analysed"
    assert _ttir_cache.stats["hits"] == hits + len(calls)
    assert 0 < misses - misses0 < len(calls)


def test_key_separates_constexprs_dtypes_and_values(sm90_target, fresh_cache) -> None:
    """The residual-add RMSNorm launch writes h; the same launch with NEED_H=False does not. Asking
    in either order, and with another x dtype or eps, gives torch's answer each time."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    gm = _fused("dense_fp8", 1)
    kernel, kw = next((k, kw) for k, kw in triton_launches(gm) if kw.get("NEED_H") is True)
    with FakeTensorMode():
        half = torch.empty(8, 64, dtype=torch.float16, device="cuda")
    variants = [kw, {**kw, "NEED_H": False}, {**kw, "x_ptr": half}, {**kw, "eps": 1e-3}, {**kw, "H": 17}]
    analyse = getattr(_tkw(), _name())
    for order in (variants, variants[::-1]):
        _ttir_cache._cache.clear()
        for v in order:
            assert analyse(kernel, v, {}) == _original()(kernel, v, {})
    writes = [str(analyse(kernel, v, {})) for v in variants[:2]]
    assert "h_ptr" in writes[0] and "h_ptr" not in writes[1]


def test_hits_are_copies(sm90_target, fresh_cache) -> None:
    gm = _fused("dense_fp8", 1)
    kernel, kw = triton_launches(gm)[0]
    analyse = getattr(_tkw(), _name())
    first = analyse(kernel, kw, {})
    expected = str(first)
    rw = getattr(first, "read_writes", None)
    if rw is not None:  # torch >= 2.13: TensorAccesses
        rw.writes.clear()
    else:
        first.clear()
    assert str(analyse(kernel, kw, {})) == expected


@triton.jit
def _user_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n), mask=i < n)


def test_other_kernels_and_unkeyable_args_go_to_torch(sm90_target, fresh_cache) -> None:
    """A user's kernel is never cached; an fxfuse kernel with a real tensor argument (alignment is
    specialised on) is analysed every time."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(16, device="cuda")
        y = torch.empty(16, device="cuda")
    analyse = getattr(_tkw(), _name())
    before = dict(_ttir_cache.stats)
    for _ in range(2):
        assert "y_ptr" in str(analyse(_user_kernel, {"x_ptr": x, "y_ptr": y, "n": 16, "BLOCK": 16}, {}))
    assert _ttir_cache.stats == before
    gm = _fused("dense_fp8", 1)
    kernel, kw = triton_launches(gm)[0]
    real = {k: (torch.empty(2, dtype=v.dtype) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    n0 = _ttir_cache.stats["uncached"]
    analyse(kernel, real, {})
    assert _ttir_cache.stats["uncached"] == n0 + 1


def test_env_off_leaves_torch_alone(monkeypatch) -> None:
    _ttir_cache.uninstall()
    monkeypatch.setenv("FXFUSE_TTIR_CACHE", "0")
    try:
        assert not _ttir_cache.install()
        assert not getattr(getattr(_tkw(), _name()), "__wrapped_by_fxfuse__", False)
    finally:
        monkeypatch.delenv("FXFUSE_TTIR_CACHE")
        _ttir_cache.install()


def test_lowering_analysis_time_drops(sm90_target, fresh_cache) -> None:
    """The saving itself, with a wide margin: the per-node analyses after the pass cost under a
    quarter of torch's (measured here: 0.36 s -> 0.004 s for 8 launches)."""
    gm = _fused("dense_fp8", 2)
    calls = triton_launches(gm)
    analyse = getattr(_tkw(), _name())
    t0 = time.perf_counter()
    for kernel, kw in calls:
        analyse(kernel, kw, {})
    cached = time.perf_counter() - t0
    t0 = time.perf_counter()
    for kernel, kw in calls:
        _original()(kernel, kw, {})
    uncached = time.perf_counter() - t0
    assert cached < uncached / 4, (cached, uncached)


def test_older_torch_name_is_wrapped_too(sm90_target, monkeypatch) -> None:
    """torch before identify_accessed_tensors (2.11 and older) names the analysis
    identify_mutated_tensors and returns a list of names; the same wrapper caches it, and a module
    that imported it by name is rebound."""
    from torch._inductor import ir

    tkw = _tkw()
    _ttir_cache.uninstall()
    calls = []

    def identify_mutated_tensors(kernel, kwargs, tma_descriptor_metadata):
        calls.append(kernel)
        return [k for k, v in kwargs.items() if k.startswith("out")]

    monkeypatch.setenv("FXFUSE_DECLARED_ACCESSES", "0")  # the mock's answers are not the kernel's
    monkeypatch.delattr(tkw, "identify_accessed_tensors", raising=False)
    monkeypatch.setattr(tkw, "identify_mutated_tensors", identify_mutated_tensors, raising=False)
    monkeypatch.setattr(ir, "identify_mutated_tensors", identify_mutated_tensors, raising=False)
    try:
        assert _ttir_cache.install()
        assert getattr(tkw.identify_mutated_tensors, "__wrapped_by_fxfuse__", False)
        assert ir.identify_mutated_tensors is tkw.identify_mutated_tensors
        from fxfuse.kernels.router_gemv import _router_gemv_kernel as kernel

        kw = {"x": 1, "out_ptr": 2}
        first = tkw.identify_mutated_tensors(kernel, kw, {})
        first.append("junk")  # a caller changing its copy
        assert tkw.identify_mutated_tensors(kernel, kw, {}) == ["out_ptr"]
        assert len(calls) == 1
    finally:
        _ttir_cache.uninstall()
    assert tkw.identify_mutated_tensors is identify_mutated_tensors


def test_symbolic_values_share_one_entry(sm90_target, fresh_cache) -> None:
    """A dynamic-shape launch passes SymInts; torch analyses them as 2 whatever the symbol, so two
    different symbols hit one entry, and a concrete 1 (specialised to a constant) gets its own."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    gm = _fused("dense_fp8", 1)
    kernel, kw = next((k, kw) for k, kw in triton_launches(gm) if "stride_x" in kw)
    env = ShapeEnv()
    s1 = env.create_unbacked_symint()
    s2 = env.create_unbacked_symint()
    analyse = getattr(_tkw(), _name())
    want = str(_original()(kernel, {**kw, "stride_x": s1}, {}))
    misses = _ttir_cache.stats["misses"]
    assert str(analyse(kernel, {**kw, "stride_x": s1}, {})) == want
    assert str(analyse(kernel, {**kw, "stride_x": s2}, {})) == want
    assert _ttir_cache.stats["misses"] == misses + 1
    analyse(kernel, {**kw, "stride_x": 1}, {})  # a concrete 1 is folded to a constant: its own entry
    assert _ttir_cache.stats["misses"] == misses + 2


def test_install_failure_never_breaks_a_compile(monkeypatch) -> None:
    """Whatever goes wrong while wrapping torch, install() says False and the pipeline runs on."""
    _ttir_cache.uninstall()

    def boom() -> bool:
        raise RuntimeError("torch moved things")

    monkeypatch.setattr(_ttir_cache, "_install", boom)
    assert _ttir_cache.install() is False
    fn = lambda x: x * 2  # noqa: E731
    with torch.no_grad():
        out = torch.compile(fn, options={"post_grad_custom_pre_pass": fxfuse.FusionPasses()})(torch.ones(3))
    assert torch.equal(out, torch.full((3,), 2.0))


def test_uncopyable_result_is_answered_not_kept(sm90_target, fresh_cache, monkeypatch, own_disk_dir) -> None:
    gm = _fused("dense_fp8", 1)
    kernel, kw = triton_launches(gm)[0]
    _ttir_cache._cache.clear()
    for f in own_disk_dir.glob("*.pkl"):
        f.unlink()

    def no_copy(x, memo=None):
        raise TypeError("cannot copy")

    monkeypatch.setattr(_ttir_cache.copy, "deepcopy", no_copy)
    n0 = _ttir_cache.stats["uncached"]
    analyse = getattr(_tkw(), _name())
    assert str(analyse(kernel, kw, {})) == str(_original()(kernel, kw, {}))
    assert _ttir_cache.stats["uncached"] == n0 + 1 and not _ttir_cache._cache
    assert not list(own_disk_dir.glob("*.pkl"))


def test_next_compile_reuses_every_analysis(sm90_target, fresh_cache) -> None:
    """torch wraps every launch that sets num_warps (all of fxfuse's) in a fresh Autotuner, so a key by
    kernel identity never hit across traces: each compile's pass analysed its launches again (~50 ms
    each). Keyed by value, the second pass over the same model (the next compile, a recompile at
    another size) analyses nothing."""
    _fused("moe", 1)
    misses, hits = _ttir_cache.stats["misses"], _ttir_cache.stats["hits"]
    _fused("moe", 1)
    assert _ttir_cache.stats["misses"] == misses
    assert _ttir_cache.stats["hits"] > hits


def test_autotuner_key_is_by_value(sm90_target, fresh_cache) -> None:
    """Two Autotuners with equal configs share an entry; a config with another constexpr value or
    another num_warps gets its own, and every answer is torch's. The analysis reads the first
    config's kwargs: NEED_H=True writes h, NEED_H=False does not."""
    from triton import Config
    from triton.runtime.autotuner import Autotuner, autotune

    gm = _fused("dense_fp8", 1)
    kernel, kw = next((k, kw) for k, kw in triton_launches(gm) if kw.get("NEED_H") is True)
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    base = {k: v for k, v in kw.items() if k != "NEED_H"}

    def tuner(need_h: bool, warps: int) -> Any:
        return autotune(configs=[Config({"NEED_H": need_h}, num_warps=warps)], key=[])(fn)

    kernels = [tuner(True, 4), tuner(True, 4), tuner(False, 4), tuner(True, 8)]
    analyse = getattr(_tkw(), _name())
    _ttir_cache._cache.clear()
    misses = _ttir_cache.stats["misses"]
    answers = [str(analyse(k, dict(base), {})) for k in kernels]
    assert answers == [str(_original()(k, dict(base), {})) for k in kernels]
    assert _ttir_cache.stats["misses"] == misses + 3  # the second equal tuner hit the first's entry
    assert "h_ptr" in answers[0] and "h_ptr" not in answers[2]


def test_runtime_ints_keyed_by_what_triton_specializes(sm90_target, fresh_cache) -> None:
    """A runtime int (a size or stride that follows the token count) changes only its integer type and
    whether it is 1 (folded to a constant): 16 and 48 share an entry, 17 too (divisibility only tags
    the TTIR argument); 1 and a 64-bit value get their own. Constexprs stay exact. Every answer is
    torch's."""
    gm = _fused("dense_fp8", 1)
    kernel, kw = next((k, kw) for k, kw in triton_launches(gm) if "stride_x" in kw)
    analyse = getattr(_tkw(), _name())
    _ttir_cache._cache.clear()
    fresh = lambda: _ttir_cache.stats["misses"] + _ttir_cache.stats["disk_hits"]  # noqa: E731 - not from memory
    misses = fresh()
    for v, new in ((16, True), (48, False), (17, False), (1, True), (2**40, True), (2**40 + 16, False)):
        args = {**kw, "stride_x": v}
        assert str(analyse(kernel, args, {})) == str(_original()(kernel, args, {})), v
        misses += new
        assert fresh() == misses, v
    fn = getattr(kernel, "fn", kernel)
    const = next(p.name for p in fn.params if p.is_constexpr and type(kw.get(p.name)) is int)
    keys = {_ttir_cache._key(kernel, {**kw, const: v}, {}) for v in (kw[const], 2 * kw[const])}
    assert len(keys) == 2, const


def _constexprs(kernel: Any, kw: dict[str, Any]) -> tuple:
    """A launch's kernel and constexpr values (what a size class may legitimately change: tiles)."""
    fn = getattr(kernel, "fn", kernel)
    cfg = [sorted(c.all_kwargs().items()) for c in getattr(kernel, "configs", [])]
    return (fn, str(cfg), tuple((p.name, kw.get(p.name)) for p in fn.params if p.is_constexpr))


@pytest.mark.parametrize("name", ["dense_fp8", "moe"])
def test_another_token_count_reuses_the_analyses(sm90_target, fresh_cache, name) -> None:
    """A static-shape compile per token count (serving stacks compile each CUDA-graph size): after the
    first, a launch at another count is analysed again only when its constexprs differ (a tile chosen
    by size, e.g. the MoE align kernel's BLOCK_S); sizes and strides differ only in value and hit. The
    answers at every count are torch's, 1 token included (a size of 1 is its own entry)."""
    seen = {_constexprs(k, kw) for k, kw in triton_launches(_fused(name, 1, tokens=8))}
    analyse = getattr(_tkw(), _name())
    for tokens in (48, 1):
        misses = _ttir_cache.stats["misses"]
        gm = _fused(name, 1, tokens=tokens)
        sigs = {_constexprs(k, kw) for k, kw in triton_launches(gm)}
        if tokens != 1:
            assert _ttir_cache.stats["misses"] - misses == len(sigs - seen), tokens
        seen |= sigs
        for kernel, kw in triton_launches(gm):
            assert str(analyse(kernel, kw, {})) == str(_original()(kernel, kw, {})), (tokens, kernel)


# ----------------------------------------------------------------------------- on disk


def test_a_new_process_reads_the_answers_from_disk(sm90_target, fresh_cache, own_disk_dir) -> None:
    """What a new process pays: the memory cache is empty, the files of the last one are there. Every
    launch of the model is then answered from disk, each answer torch's, and nothing is analysed."""
    gm = _fused("moe", 1)
    calls = triton_launches(gm)
    files = sorted(own_disk_dir.glob("*.pkl"))
    assert len(files) >= 2, files
    _ttir_cache._cache.clear()  # a new process
    misses, disk = _ttir_cache.stats["misses"], _ttir_cache.stats["disk_hits"]
    analyse = getattr(_tkw(), _name())
    for kernel, kw in calls:
        assert str(analyse(kernel, kw, {})) == str(_original()(kernel, kw, {}))
    assert _ttir_cache.stats["misses"] == misses
    assert _ttir_cache.stats["disk_hits"] - disk == len(files)  # each file read once, then memory


def test_disk_entries_follow_the_kernel_source(sm90_target, fresh_cache, monkeypatch) -> None:
    """Two kernels of one name and module whose sources differ (an fxfuse upgrade) never share a file:
    the second one's answer is its own."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    @triton.jit
    def k(x_ptr, y_ptr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(y_ptr + i, tl.load(x_ptr + i))

    first = k

    @triton.jit
    def k(x_ptr, y_ptr, BLOCK: tl.constexpr):  # noqa: F811 - same name, writes x instead
        i = tl.arange(0, BLOCK)
        tl.store(x_ptr + i, tl.load(y_ptr + i))

    monkeypatch.setattr(_ttir_cache, "_owned", lambda kernel: True)
    with FakeTensorMode():
        kw = {"x_ptr": torch.empty(16, device="cuda"), "y_ptr": torch.empty(16, device="cuda"), "BLOCK": 16}
    analyse = getattr(_tkw(), _name())
    a = str(analyse(first, kw, {}))
    _ttir_cache._cache.clear()
    b = str(analyse(k, kw, {}))
    assert a == str(_original()(first, kw, {})) and b == str(_original()(k, kw, {}))
    assert a != b


def test_unreadable_file_is_analysed_again(sm90_target, fresh_cache, own_disk_dir) -> None:
    gm = _fused("dense_fp8", 1)
    kernel, kw = triton_launches(gm)[0]
    for f in own_disk_dir.glob("*.pkl"):
        f.write_bytes(b"not a pickle")
    _ttir_cache._cache.clear()
    misses = _ttir_cache.stats["misses"]
    analyse = getattr(_tkw(), _name())
    assert str(analyse(kernel, kw, {})) == str(_original()(kernel, kw, {}))
    assert _ttir_cache.stats["misses"] == misses + 1


def test_disk_off(sm90_target, fresh_cache, own_disk_dir, monkeypatch) -> None:
    """FXFUSE_TTIR_CACHE_DIR=0, or Inductor's caches disabled: memory only, nothing written."""
    from torch._inductor import config as inductor_config

    for env, force in (("0", False), (str(own_disk_dir), True)):
        monkeypatch.setenv("FXFUSE_TTIR_CACHE_DIR", env)
        monkeypatch.setattr(inductor_config, "force_disable_caches", force)
        assert _ttir_cache.disk_dir() is None
        _fused("dense_fp8", 1)
        assert not list(own_disk_dir.glob("*.pkl"))


def test_answers_written_by_another_process_are_read(sm90_target, fresh_cache, own_disk_dir) -> None:
    """The disk key is stable across processes (no identities or addresses in it): a subprocess runs
    the pass over the model, and every launch of the same model here is answered from its files."""
    import json
    import os
    import subprocess
    import sys

    script = (  # the same _fused model as below, in another process
        "import json, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
        "from test_ttir_cache import _fused\n"
        "from fxfuse import _ttir_cache\n"
        "from fxfuse.testing import triton_target\n"
        "with triton_target(90):\n"
        "    _ttir_cache.install()\n"
        "    _fused('moe', 1)\n"
        "print(json.dumps(_ttir_cache.stats))\n"
    )
    env = dict(os.environ, FXFUSE_TTIR_CACHE_DIR=str(own_disk_dir))
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    written = json.loads(r.stdout.strip().splitlines()[-1])["misses"]
    assert written >= 2 and len(list(own_disk_dir.glob("*.pkl"))) == written
    misses, disk = _ttir_cache.stats["misses"], _ttir_cache.stats["disk_hits"]
    gm = _fused("moe", 1)
    assert _ttir_cache.stats["misses"] == misses, "an answer the other process stored was analysed again"
    assert _ttir_cache.stats["disk_hits"] - disk == written
    analyse = getattr(_tkw(), _name())
    for kernel, kw in triton_launches(gm):
        assert str(analyse(kernel, kw, {})) == str(_original()(kernel, kw, {}))
