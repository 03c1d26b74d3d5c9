"""Declared read/write sets of fxfuse's Triton kernels (fxfuse.kernels.accesses) against torch's own
analysis of their TTIR (sm_90, built on the CPU), launch by launch, over the launch forms the ops
take; and the compile path answering from them without building any TTIR."""

from __future__ import annotations

import sys
from typing import Any, Callable

import pytest
import torch

import fxfuse
from fxfuse import _ttir_cache
from fxfuse.kernels import accesses, moe_experts, moe_routing, rmsnorm_quant, rope_quant, router_gemv, silu_mul_quant

BF16 = torch.bfloat16
MODULES = (moe_experts, moe_routing, rmsnorm_quant, rope_quant, router_gemv, silu_mul_quant)
LAUNCH_OPTIONS = ("num_warps", "num_stages")


class Recorder:
    """Stands in for `wrap_triton`: keeps (kernel, every argument by name) of each launch, runs nothing."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, dict[str, Any]]] = []

    def __call__(self, kernel: Any) -> Any:
        rec = self

        class Launch:
            def __getitem__(self, grid: Any) -> Callable[..., None]:
                def run(*args: Any, **kw: Any) -> None:
                    named = dict(zip(kernel.arg_names, args))
                    named.update({k: v for k, v in kw.items() if k not in LAUNCH_OPTIONS})
                    rec.calls.append((kernel, named))

                return run

        return Launch()


@pytest.fixture
def record(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    for m in MODULES:
        if hasattr(m, "wrap_triton"):
            monkeypatch.setattr(m, "wrap_triton", rec)
    return rec


def _entry() -> tuple[str, Callable[..., Any]]:
    fns = _ttir_cache.analysis_functions()
    assert fns is not None, "this torch has no Triton kernel analysis"
    return fns[1].__name__, fns[1]


def _check(calls: list[tuple[Any, dict[str, Any]]], seen: set[str]) -> None:
    """Each recorded launch: the declared answer equals torch's analysis, exactly."""
    assert calls, "no launch recorded"
    name, torch_fn = _entry()
    for kernel, kw in calls:
        truth = torch_fn(kernel, kw, {})
        assert not _ttir_cache._is_fallback(truth, kw), f"torch could not analyse {kernel.fn.__name__}"
        answer = _ttir_cache._build_answer(name, kernel, kw)
        assert answer is not None, f"{kernel.fn.__name__} has no declaration"
        assert _ttir_cache._summary(answer) == _ttir_cache._summary(truth), (kernel.fn.__name__, {
            k: v for k, v in kw.items() if not isinstance(v, torch.Tensor)})
        seen.add(_ttir_cache._kernel_name(kernel))


SEEN: set[str] = set()  # kernels checked by this module's tests (the coverage test reads it)


def _cuda(*shape: int, dtype: torch.dtype = BF16) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="cuda")


# ----------------------------------------------------------------------------- RoPE

ROPE_CASES = [  # (k, positions, rot_dim, neox, q_quant, k_quant, scale tensors, need rope, norm, eps tensors)
    dict(k=True, pos=True, rot=128, neox=True, qq=0, kq=0, st=False, need=True, norm=False, epst=False),
    dict(k=False, pos=False, rot=128, neox=False, qq=0, kq=0, st=False, need=True, norm=False, epst=False),
    dict(k=True, pos=True, rot=64, neox=True, qq=1, kq=1, st=True, need=False, norm=False, epst=False),
    dict(k=True, pos=False, rot=128, neox=True, qq=1, kq=2, st=False, need=True, norm=False, epst=False),
    dict(k=True, pos=True, rot=128, neox=True, qq=2, kq=2, st=False, need=False, norm=True, epst=False),
    dict(k=True, pos=True, rot=64, neox=True, qq=0, kq=0, st=False, need=True, norm=True, epst=True),
    dict(k=True, pos=False, rot=128, neox=False, qq=2, kq=1, st=True, need=True, norm=True, epst=True),
]


def _rope_args(c: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    T, D = 5, 128
    q, k = _cuda(1, T, 4, D), (_cuda(1, T, 2, D) if c["k"] else None)
    cos = _cuda(64, c["rot"])
    scale = (lambda s: _cuda(1, dtype=torch.float32) if c["st"] and s == 1 else None)
    kq = c["kq"] if c["k"] else 0
    pos = [q, k, cos, cos, _cuda(T, dtype=torch.int64) if c["pos"] else None, scale(c["qq"]), scale(kq),
           c["rot"], c["neox"], False, BF16, c["qq"], 1.0, [], [], False, kq, 1.0, [], [], False, -448.0, 448.0,
           c["need"] or c["qq"] == 0, c["need"] or kq == 0, [0, 1, 2], [0, 1, 2]]
    kw: dict[str, Any] = {}
    if c["norm"]:
        kw.update(q_norm_w=_cuda(D), k_norm_w=_cuda(D) if c["k"] else None)
        if c["epst"]:
            kw.update(q_eps_tensor=_cuda((), dtype=torch.float32), k_eps_tensor=_cuda((), dtype=torch.float32))
    return pos, kw


@pytest.mark.parametrize("case", range(len(ROPE_CASES)))
def test_rope_declarations_match_torch(sm90_target, record, case) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        pos, kw = _rope_args(ROPE_CASES[case])
        rope_quant.rope_quant(*pos, **kw)
    _check(record.calls, SEEN)


@pytest.mark.parametrize("fp8,bhsd,vquant", [(False, False, False), (True, False, True), (False, True, False)])
def test_rope_cache_declarations_match_torch(sm90_target, record, fp8, bhsd, vquant) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        pos, kw = _rope_args(dict(k=True, pos=True, rot=128, neox=True, qq=0, kq=1 if fp8 else 0, st=fp8,
                                  need=True, norm=False, epst=False))
        cdt = torch.float8_e4m3fn if fp8 else BF16
        kc = _cuda(1, 2, 16, 128, dtype=cdt) if bhsd else _cuda(16, 2, 128, dtype=cdt)
        vc = _cuda(1, 2, 16, 128, dtype=cdt) if bhsd else _cuda(16, 2, 128, dtype=cdt)
        rope_quant.rope_quant_cache(*pos, _cuda(1, 5, 2, 128), kc, vc, _cuda(5, dtype=torch.int64),
                                    _cuda(1, dtype=torch.float32) if vquant else None, fp8, fp8, vquant, 1.0,
                                    False, -448.0, 448.0, False, cache_bhsd=bhsd, **kw)
    _check(record.calls, SEEN)


# ----------------------------------------------------------------------------- MoE

@pytest.mark.parametrize("M,dot", [(1, False), (1, True), (4, True), (64, None), (200, None)])
def test_moe_experts_declarations_match_torch(sm90_target, record, M, dot) -> None:
    """Decode kernels in both forms, and the grouped path with the one-launch (64 tokens x 8) and
    two-launch (1600 pairs: align, then scatter) align."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    E, H, I, K = 16, 256, 128, 8
    cfg = None if dot is None else {"A_DOT": dot, "B_DOT": dot}
    path = moe_experts.PATH_DECODE if dot is not None else moe_experts.PATH_PREFILL
    with FakeTensorMode():
        x, tw, ids = _cuda(M, H), _cuda(M, K), _cuda(M, K, dtype=torch.int64)
        moe_experts._launch(record, x, tw, ids, _cuda(E, 2 * I, H), _cuda(E, H, I), BF16, BF16, BF16, path,
                            config=cfg)
    _check(record.calls, SEEN)


@pytest.mark.parametrize("dot,bias", [(False, False), (True, True)])
def test_moe_routed_declarations_match_torch(sm90_target, record, dot, bias) -> None:
    """Kernel A with the routing folded in (decode), and the routing kernel of a grouped path."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    E, H, I, K = 16, 256, 128, 4
    r = moe_experts._Routing(K, 1 if bias else 0, torch.float32, torch.float32, 1, 0, 0, 0.0, True, 0.0, 1.0,
                             torch.float32, BF16, True)
    with FakeTensorMode():
        for M in (1, 64):
            moe_experts._launch_routed(record, _cuda(M, H), _cuda(M, E, dtype=torch.float32),
                                       _cuda(E, dtype=torch.float32) if bias else None, r,
                                       _cuda(E, 2 * I, H), _cuda(E, H, I), BF16, BF16, BF16,
                                       config={"A_DOT": dot, "B_DOT": dot})
        moe_routing.launch(record, _cuda(3, E, dtype=torch.float32), None, K, 0, torch.float32, torch.float32, 1, 0,
                           0, 0.0, True, 0.0, 1.0, torch.float32, BF16, True)
    _check(record.calls, SEEN)


# ----------------------------------------------------------------------------- the rest

def test_quant_and_router_declarations_match_torch(sm90_target, record) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        router_gemv._launch(record, _cuda(2, 256), _cuda(16, 256))
        for scheme, res, static_t in ((rmsnorm_quant.SCHEME_PER_TOKEN, True, False),
                                      (rmsnorm_quant.SCHEME_STATIC, False, True),
                                      (rmsnorm_quant.SCHEME_PER_GROUP, True, False)):
            x = _cuda(3, 512)
            rmsnorm_quant.rms_norm_quant(x, _cuda(3, 512) if res else None, _cuda(512),
                                         _cuda(1, dtype=torch.float32) if static_t else None, 1e-6, 0.0, None, True,
                                         BF16, torch.float8_e4m3fn, scheme, 128, 1.0, [], [], False, -448.0, 448.0,
                                         False, res, eps_tensor=None if res else _cuda((), dtype=torch.float32))
        for scheme, static_t, ub in ((1, False, True), (0, True, False), (2, False, False)):
            g = _cuda(3, 2 * 768)  # gate and up in one tensor (up=None)
            silu_mul_quant.silu_mul_quant(g, None, _cuda(1, dtype=torch.float32) if static_t else None, 0, BF16,
                                          BF16, torch.float8_e4m3fn, scheme, 128, 1.0, [4] if ub else [],
                                          [448.0] if ub else [], False, -448.0, 448.0, False,
                                          scale_ub=_cuda(1, dtype=torch.float32) if ub else None,
                                          ub_slot=0 if ub else -1)
    _check(record.calls, SEEN)


def test_every_declared_kernel_is_checked() -> None:
    """Runs after the tests above (file order): each declared kernel met torch's analysis at least once."""
    declared = {_ttir_cache._kernel_name(k) for k in accesses.declared_kernels()}
    missing = declared - SEEN - _ttir_cache.verified
    if "pytest_randomly" in sys.modules or len(SEEN) == 0:
        pytest.skip("the checks above did not run first")
    assert not missing, sorted(missing)


# ----------------------------------------------------------------------------- the compile path

def test_compile_path_builds_no_ttir(sm90_target, monkeypatch, fresh_cache) -> None:
    """With declarations on (not verifying), tracing fused regions needs no TTIR after the first
    declared launch of the process (the canary, answered by torch)."""
    from torch._higher_order_ops import triton_kernel_wrap as tkw

    from fxfuse.testing import post_grad_graph, on_fake_device

    monkeypatch.setenv("FXFUSE_VERIFY_ACCESSES", "0")
    monkeypatch.setenv("FXFUSE_TTIR_CACHE_DIR", "0")
    built: list[str] = []
    real = tkw.generate_ttir
    monkeypatch.setattr(tkw, "generate_ttir", lambda kernel, *a, **k: (built.append(kernel.fn.__name__),
                                                                        real(kernel, *a, **k))[1])
    from fxfuse import demo

    dm = demo.BUILDERS["moe"]("cpu", False, layers=1)
    ids = demo.random_ids(dm.vocab, 16, "cpu", seed=1).reshape(1, -1)
    gm = on_fake_device(post_grad_graph(dm.module, ids, dynamic=False))
    d0 = _ttir_cache.stats["declared"]
    fxfuse.FusionPasses(options={"gate": False}, strict=True)(gm.graph)
    assert fxfuse.counters["moe_experts"] >= 1 and fxfuse.counters["rope_quant"] >= 1, dict(fxfuse.counters)
    launches = _ttir_cache.stats["declared"] - d0
    assert launches >= 3 and len(built) <= 1, (launches, built)  # the canary at most


def test_wrong_declaration_is_caught(sm90_target, monkeypatch, fresh_cache) -> None:
    """A declaration that misses a write: verifying raises; at run time the canary hands back torch's
    answer and turns declarations off for the process."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fxfuse.fx_utils import trace_aten

    monkeypatch.setitem(accesses._DECLARED, router_gemv._router_gemv_kernel,
                        lambda a: accesses.accesses(("x_ptr", "w_ptr"), ()))
    with FakeTensorMode():
        args = [_cuda(2, 256), _cuda(16, 256)]

    def run() -> list[str]:
        gm = trace_aten(lambda x, w: router_gemv.router_logits(x, w), args, functionalize=True)
        return [list(n.kwargs["tensors_to_clone"]) for n in gm.graph.nodes
                if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]

    monkeypatch.setenv("FXFUSE_TTIR_CACHE_DIR", "0")
    with pytest.raises(Exception, match="declared accesses"):
        run()
    assert _ttir_cache.mismatches
    _ttir_cache.mismatches.clear()
    monkeypatch.setenv("FXFUSE_VERIFY_ACCESSES", "0")
    _ttir_cache.uninstall()  # a process that has not met a declared launch yet (no canary)
    _ttir_cache.install()
    assert run() == [["out_ptr"]]  # torch's answer: the output is written
    assert _ttir_cache._declarations_off


def test_declarations_off_switch(sm90_target, monkeypatch) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setenv("FXFUSE_DECLARED_ACCESSES", "0")
    with FakeTensorMode():
        kw = dict(zip(router_gemv._router_gemv_kernel.arg_names,
                      (_cuda(2, 256), _cuda(16, 256), _cuda(2, 16), 256, 256, 16, 16, 256)))
    assert _ttir_cache._declared_answer(_entry()[0], router_gemv._router_gemv_kernel, kw) is None
    monkeypatch.setenv("FXFUSE_DECLARED_ACCESSES", "1")
    assert _ttir_cache._declared_answer(_entry()[0], router_gemv._router_gemv_kernel, kw) is not None


# ----------------------------------------------------------------------------- fuzz the access flags

ROPE_FLAGS = {  # the constexprs that choose what the RoPE kernel loads and stores, and their values
    "HAS_POS": (False, True), "NEED_Q": (False, True), "NEED_K": (False, True), "HAS_K": (False, True),
    "Q_NORM": (False, True), "K_NORM": (False, True), "Q_QUANT": (0, 1, 2), "K_QUANT": (0, 1, 2),
    "Q_SCALE_T": (False, True), "K_SCALE_T": (False, True), "STORE_KQ": (False, True), "V_QUANT": (False, True),
    "V_SCALE_T": (False, True), "Q_EPS_T": (False, True), "K_EPS_T": (False, True), "SPLIT": (0, 1, 2),
    "NEOX": (False, True), "K_CACHE_FP8": (False, True),
}
NORM_FLAGS = {"HAS_RES": (False, True), "HAS_W": (False, True), "HAS_SCALE_T": (False, True), "NEED_H": (False, True),
              "SCHEME": (0, 1, 2), "UB_SLOT": (-1, 0, 2), "EPS_T": (False, True)}
SILU_FLAGS = {"SCHEME": (0, 1, 2), "HAS_SCALE_T": (False, True), "UB_SLOT": (-1, 0, 2), "CHUNK": (0, 512)}
ROUTING_FLAGS = {"HAS_BIAS": (False, True), "NEED_SCORES": (False, True), "GATHER_W": (False, True)}


def _record_rope_cache(rec: Recorder) -> None:  # the ops reach `rec` through the patched wrap_triton
    """One cache launch, partial rotary (every SPLIT path exists), every optional input passed."""
    pos, kw = _rope_args(dict(k=True, pos=True, rot=64, neox=True, qq=1, kq=1, st=True, need=True, norm=True, epst=True))
    rope_quant.rope_quant_cache(*pos, _cuda(1, 5, 2, 128), _cuda(16, 2, 128, dtype=torch.float8_e4m3fn),
                                _cuda(16, 2, 128, dtype=torch.float8_e4m3fn), _cuda(5, dtype=torch.int64),
                                _cuda(1, dtype=torch.float32), True, True, True, 1.0, False, -448.0, 448.0, False, **kw)


def _record_norm(rec: Recorder) -> None:  # the ops reach `rec` through the patched wrap_triton
    # static scheme with a scale tensor; the unused pointers (ub, eps) get a dummy tensor, which the flags may turn on
    rmsnorm_quant.rms_norm_quant(_cuda(3, 512), _cuda(3, 512), _cuda(512), _cuda(1, dtype=torch.float32), 1e-6, 0.0,
                                 None, True, BF16, torch.float8_e4m3fn, 0, 128, 1.0, [], [], False, -448.0, 448.0,
                                 False, True)


def _record_silu(rec: Recorder) -> None:  # the ops reach `rec` through the patched wrap_triton
    silu_mul_quant.silu_mul_quant(_cuda(3, 1536), None, _cuda(1, dtype=torch.float32), 0, BF16, BF16,
                                  torch.float8_e4m3fn, 0, 128, 1.0, [], [], False, -448.0, 448.0, False)


def _record_routing(rec: Recorder) -> None:
    moe_routing.launch(rec, _cuda(3, 16, dtype=torch.float32), _cuda(16, dtype=torch.float32), 4, 1,
                       torch.float32, torch.float32, 1, 0, 0, 0.0, True, 0.0, 1.0, torch.float32, BF16, True)


@pytest.mark.parametrize("what", ["rope", "norm", "silu", "routing"])
def test_declarations_over_flag_combinations(sm90_target, record, what) -> None:
    """Any combination of a kernel's access flags, laid over one recorded launch that passes every
    optional input: the declaration equals torch's analysis (hypothesis, derandomized). Combinations
    the kernel does not compile are skipped (torch's failed-analysis answer)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from torch._subclasses.fake_tensor import FakeTensorMode

    launch, flags_of, n = {"rope": (_record_rope_cache, ROPE_FLAGS, 120), "norm": (_record_norm, NORM_FLAGS, 40),
                           "silu": (_record_silu, SILU_FLAGS, 30), "routing": (_record_routing, ROUTING_FLAGS, 8)}[what]
    with FakeTensorMode():
        launch(record)
    ((kernel, base),) = record.calls
    name, torch_fn = _entry()
    checked = []

    @settings(max_examples=n, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.fixed_dictionaries({k: st.sampled_from(v) for k, v in flags_of.items()}))
    def one(flags: dict[str, Any]) -> None:
        kw = {**base, **flags}
        truth = torch_fn(kernel, kw, {})
        if _ttir_cache._is_fallback(truth, kw):
            return  # a combination the kernel does not compile (e.g. SPLIT 2 on partial rotary)
        answer = _ttir_cache._build_answer(name, kernel, kw)
        assert _ttir_cache._summary(answer) == _ttir_cache._summary(truth), flags
        checked.append(flags)

    one()
    assert len(checked) >= n // 3, len(checked)
