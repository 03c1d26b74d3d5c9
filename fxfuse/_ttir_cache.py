"""Remember Inductor's read/write analysis of fxfuse's own Triton kernels.

Inductor works out which arguments a user-defined Triton kernel writes by building the kernel's TTIR
and walking it (`triton_kernel_wrap.identify_accessed_tensors`; older torch:
`identify_mutated_tensors`). It does so for every kernel node it lowers, and again when
functionalization traces a launch. One analysis takes 40-90 ms on the CPU; a 32-layer model with four
fused regions per layer would pay 5-10 s of compile for answers it already had.

The analysis reads less than its arguments: `generate_ttir` replaces SymInts by 2 and fake tensors by
an empty tensor of the same dtype, so the kernel, the tensor dtypes and the exact non-tensor values
decide the result (and the names it reports are the kernel's formal parameters, the same at every
call site). The key: the kernel (an `Autotuner`, which torch builds afresh around every launch that
sets num_warps, by its JITFunction and its configs' values, so the next compile hits too), the
argument names in order, each tensor's dtype, each constexpr and plain value type-tagged (floats by
their bits), each runtime int by what Triton specializes that can change an access (its integer type,
and whether it is 1; see `_int_class`), and the Triton target. Anything else (a real tensor, a TMA
descriptor, a value `_keys.freeze` cannot key exactly) is analysed as before.

Answers also go to disk, under Inductor's cache directory (`fxfuse_ttir/`), so that a new process
compiling the same kernels (a changed model, another shape, an FX graph cache miss) does not build
their TTIR again. The file name hashes the key above with the kernel's source (Triton's `cache_key`,
which covers the functions it calls), torch's and Triton's versions: a changed kernel or toolchain
never reads an old answer. A file that cannot be read is ignored and the analysis runs. Off with
FXFUSE_TTIR_CACHE_DIR=0 (or elsewhere with a path), and wherever Inductor's caches are disabled
(`force_disable_caches`).

A kernel that declares its accesses (`fxfuse.kernels.accesses`: which parameters it loads and stores,
as a function of its constexprs) is answered from the declaration, built in this torch's format, and
its TTIR is not built at all: the first compile on a machine then pays for one analysis (the first
declared launch of the process is also analysed, as a canary: if torch's answer differs, declarations
are off for the rest of the process). FXFUSE_VERIFY_ACCESSES=1 analyses every declared launch too and
raises on any difference (the test suites run so); FXFUSE_DECLARED_ACCESSES=0 turns declarations off.

Only kernels defined under `fxfuse.kernels` are cached; every other kernel goes straight to torch's
function. Each hit returns a deep copy, so no caller can change what a later call sees. Set
FXFUSE_TTIR_CACHE=0 to leave torch untouched. (An open torch PR, pytorch/pytorch#193227, caches the
same analysis for every kernel; this module becomes a no-op once torch does.)
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
import pickle
from typing import Any, Callable

import torch

from ._keys import NoKey, freeze
from ._log import log

_NAMES = ("identify_accessed_tensors", "identify_mutated_tensors")
"""torch's analysis entry point, newest name first; the first one the module has is wrapped."""

MAX_ENTRIES = 4096
"""Distinct kernel signatures kept; the cache starts over past this (a compile has tens)."""

stats: dict[str, int] = {"hits": 0, "misses": 0, "uncached": 0, "disk_hits": 0, "declared": 0, "verified": 0,
                         "unverifiable": 0}
"""Calls served from the cache, analysed and stored, analysed without a key, (of the hits) read from
disk, answered from a kernel's declared accesses, and (of those) checked against torch's analysis
(tests read these)."""

DISK_FORMAT = 1
"""Bump when the stored answers or the key change meaning."""

_cache: dict[Any, Any] = {}
_installed: list[tuple[Any, str, Callable[..., Any]]] = []  # (module, attribute, torch's function) rebound


def _entry() -> tuple[str, Callable[..., Any], Callable[..., Any]] | None:
    """(attribute name, what Inductor calls now, torch's own function) of this torch's analysis."""
    from torch._higher_order_ops import triton_kernel_wrap as tkw

    name = next((n for n in _NAMES if callable(getattr(tkw, n, None))), None)
    if name is None:
        return None
    current = getattr(tkw, name)
    original = current.__wrapped__ if getattr(current, "__wrapped_by_fxfuse__", False) else current
    return name, current, original


def analysis_functions() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """(the analysis Inductor calls now, torch's own function): one function while the cache is not
    installed; None when this torch has none of the known entry points."""
    entry = _entry()
    return None if entry is None else entry[1:]


def _owned(kernel: Any) -> bool:
    """A JITFunction (or an Autotuner around one) defined in fxfuse's kernel modules."""
    fn = getattr(kernel, "fn", None)
    fn = getattr(fn, "fn", fn)  # Autotuner -> JITFunction -> Python function
    return getattr(fn, "__module__", "").startswith("fxfuse.kernels.")


def _leaf(x: Any, depth: int) -> Any:
    import sympy
    from torch._inductor.ir import TensorBox
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool, sympy.Expr)):
        return ("sym",)  # generate_ttir builds the TTIR with 2 in its place, whatever the symbol
    if isinstance(x, (FakeTensor, TensorBox)):
        return ("T", str(x.dtype))  # an empty tensor of this dtype, 16-byte aligned
    return NotImplemented  # real tensors (alignment is specialised on), descriptors: no key


def _config_key(cfg: Any) -> Any:
    """A Triton Config by value: its constexpr kwargs and launch options (a pre-hook: no key)."""
    if getattr(cfg, "pre_hook", None) is not None:
        raise NoKey
    opts = cfg.all_kwargs() if hasattr(cfg, "all_kwargs") else {
        **cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "num_ctas": getattr(cfg, "num_ctas", 1)}
    return freeze(sorted(opts.items()))


def _kernel_key(kernel: Any, configs: list[Any] | None) -> Any:
    """The kernel by what the analysis reads of it. A launch with num_warps (every fxfuse launch) is
    wrapped by torch in a fresh `Autotuner` holding one Config; keyed by identity, no later trace
    (the next compile, a recompile, another graph) would ever hit. So an Autotuner is keyed by its
    JITFunction and its configs' values (generate_ttir reads the function and the first config's
    kwargs)."""
    if configs is not None:
        return ("autotuner", id(kernel), kernel, tuple(_config_key(c) for c in configs))
    return (id(kernel), kernel)


def _int_class(v: int) -> tuple[str, str, bool]:
    """A runtime (non-constexpr) int argument by what can change the kernel's loads and stores: Triton
    types it i32/i64/u64 by range and folds a 1 into a constant. Its other specialization, divisibility
    by 16, only tags the TTIR argument (`tt.divisibility`, for vectorizing later) and changes no access,
    so 16 and 32 tokens share an entry, as every symbolic size does already (torch analyses those as 2)."""
    ty = "i32" if -(2**31) <= v < 2**31 else "u64" if 2**63 <= v < 2**64 else "i64"
    return ("int-arg", ty, v == 1)


def _args_key(fn: Any, configs: list[Any] | None, kwargs: dict[str, Any]) -> Any:
    """The arguments in order: constexprs and every non-int value exact (`freeze`), runtime ints by
    `_int_class` (sizes and strides that follow the token count then hit across token counts)."""
    runtime = {p.name for p in getattr(fn, "params", ()) if not p.is_constexpr}
    if configs:
        runtime -= set(configs[0].kwargs)  # generate_ttir lays the first config over the arguments
    return tuple((name, _int_class(v) if type(v) is int and name in runtime else freeze(v, _leaf))
                 for name, v in kwargs.items())


def _key(kernel: Any, kwargs: dict[str, Any], tma: Any) -> Any:
    if tma:
        raise NoKey
    import triton
    from triton.runtime.autotuner import Autotuner

    # an Autotuner: its JITFunction and configs; a JITFunction: itself, no configs
    fn, configs = (kernel.fn, kernel.configs) if isinstance(kernel, Autotuner) else (kernel, None)
    target = triton.runtime.driver.active.get_current_target()
    return (_kernel_key(fn, configs), repr(target), _args_key(fn, configs, kwargs))


def _stable(kernel_key: Any) -> Any:
    """`_kernel_key` with the JITFunction (keyed by identity in memory) replaced by what names it
    across processes: module, name and Triton's hash of its source and of the functions it calls."""
    def fn_id(fn: Any) -> tuple[str, str, str]:
        return (fn.__module__, getattr(fn.fn, "__qualname__", fn.__name__), str(fn.cache_key))

    if kernel_key[0] == "autotuner":
        return ("autotuner", fn_id(kernel_key[2]), kernel_key[3])
    return fn_id(kernel_key[1])


def disk_dir() -> str | None:
    """Where answers are kept across processes (None: not on disk). FXFUSE_TTIR_CACHE_DIR: a
    directory of its own, or 0 for none."""
    env = os.environ.get("FXFUSE_TTIR_CACHE_DIR", "")
    if env == "0":
        return None
    try:
        from torch._inductor import config as inductor_config

        if getattr(inductor_config, "force_disable_caches", False):
            return None
        if env:
            return env
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        return os.path.join(cache_dir(), "fxfuse_ttir")
    except Exception:  # noqa: BLE001 - no cache dir in this torch: memory only
        return None


def _disk_path(key: Any) -> str | None:
    d = disk_dir()
    if d is None:
        return None
    import triton

    blob = repr((DISK_FORMAT, torch.__version__, triton.__version__, _stable(key[0]), key[1:]))
    return os.path.join(d, hashlib.sha256(blob.encode()).hexdigest() + ".pkl")


def _disk_load(path: str | None) -> tuple[Any, Any] | None:
    """Two independent copies of the stored answer (one to keep, one to hand out), or None."""
    if path is None or not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            blob = f.read()
        return pickle.loads(blob), pickle.loads(blob)
    except Exception as e:  # noqa: BLE001 - unreadable or from an incompatible torch: analyse again
        log.debug("fxfuse: TTIR analysis file %s not read (%s); analysing", path, e)
        return None


def _disk_store(path: str | None, value: Any) -> None:
    if path is None:
        return
    try:
        from torch._inductor.codecache import write_atomic

        # Inductor's own cache writer: a concurrent reader sees the old file or the whole new one
        write_atomic(path, pickle.dumps(value), make_dirs=True)
    except Exception as e:  # noqa: BLE001 - a read-only or full disk, or an unpicklable answer: memory only
        log.debug("fxfuse: TTIR analysis not written to disk (%s)", e)


def _cached(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(kernel: Any, kwargs: dict[str, Any], *rest: Any, **kw: Any) -> Any:
        if not _owned(kernel):
            return original(kernel, kwargs, *rest, **kw)
        tma = rest[0] if rest else kw.get("tma_descriptor_metadata")
        answer = None if tma else _declared_answer(original.__name__, kernel, kwargs)
        if answer is None:
            return analysed(kernel, kwargs, *rest, **kw)
        verify = os.environ.get("FXFUSE_VERIFY_ACCESSES", "0") == "1"
        if verify or not _canary:
            # torch's own answer (cached like any other): every launch when verifying, else the
            # first declared launch of the process, which checks this torch reads answers as we build them
            truth = analysed(kernel, kwargs, *rest, **kw)
            if _is_fallback(truth, kwargs):
                # torch could not build the TTIR (no Triton target for the device: CPU-only tests
                # without `triton_target`) and assumed every tensor written: nothing to check against
                stats["unverifiable"] += 1
                return answer
            if _summary(truth) != _summary(answer):
                msg = (f"fxfuse: declared accesses of {_kernel_name(kernel)} differ from torch's analysis: "
                       f"declared {_summary(answer)}, torch {_summary(truth)}")
                if verify:
                    mismatches.append(msg)  # tests/conftest.py fails the test even if a pass swallowed the raise
                    raise AssertionError(msg)
                log.warning("%s; declarations off for this process", msg)
                _declarations_off.append(True)
                return truth
            _canary.append(True)
            stats["verified"] += 1
            verified.add(_kernel_name(kernel))
        stats["declared"] += 1
        return answer

    def analysed(kernel: Any, kwargs: dict[str, Any], *rest: Any, **kw: Any) -> Any:
        try:
            tma = rest[0] if rest else kw.get("tma_descriptor_metadata")
            key = _key(kernel, kwargs, tma)
            hash(key)
        except Exception as e:  # noqa: BLE001 - NoKey, an unhashable value, no Triton target: analyse
            if not isinstance(e, NoKey):
                log.debug("fxfuse: TTIR analysis key failed (%s: %s); analysing", type(e).__name__, e)
            stats["uncached"] += 1
            return original(kernel, kwargs, *rest, **kw)
        hit = _cache.get(key)
        if hit is not None:
            stats["hits"] += 1
            return copy.deepcopy(hit)
        try:
            path = _disk_path(key)
        except Exception as e:  # noqa: BLE001 - no source hash: memory only
            log.debug("fxfuse: TTIR analysis disk key failed (%s)", e)
            path = None
        loaded = _disk_load(path)
        if loaded is not None:
            stats["hits"] += 1
            stats["disk_hits"] += 1
            _remember(key, loaded[0])
            return loaded[1]
        out = original(kernel, kwargs, *rest, **kw)
        try:
            stored = copy.deepcopy(out)
        except Exception as e:  # noqa: BLE001 - a result this torch cannot copy: answer, keep nothing
            log.debug("fxfuse: TTIR analysis result not copyable (%s); not cached", e)
            stats["uncached"] += 1
            return out
        _remember(key, stored)
        _disk_store(path, stored)
        stats["misses"] += 1
        return out

    wrapper.__wrapped_by_fxfuse__ = True  # type: ignore[attr-defined]
    return wrapper


# ----------------------------------------------------------------------------- declared accesses

_canary: list[bool] = []  # a declared answer matched torch's in this process
_declarations_off: list[bool] = []  # one did not: analyse everything
mismatches: list[str] = []
"""Declared answers that differed from torch's while verifying (FXFUSE_VERIFY_ACCESSES=1)."""
verified: set[str] = set()
"""Kernels (module.qualname) whose declared accesses matched torch's analysis in this process."""


def _kernel_name(kernel: Any) -> str:
    fn = getattr(kernel, "fn", kernel)  # Autotuner -> JITFunction
    py = getattr(fn, "fn", fn)
    return f"{getattr(py, '__module__', '?')}.{getattr(py, '__qualname__', getattr(py, '__name__', '?'))}"


def _declared_answer(entry: str, kernel: Any, kwargs: dict[str, Any]) -> Any:
    """torch's analysis result for this launch, built from the kernel's declaration
    (`fxfuse.kernels.accesses`) in this torch's format; None without one (or when they are off)."""
    if _declarations_off or os.environ.get("FXFUSE_DECLARED_ACCESSES", "1") == "0":
        return None
    try:
        return _build_answer(entry, kernel, kwargs)
    except Exception as e:  # noqa: BLE001 - a declaration or format this torch does not take: analyse
        log.debug("fxfuse: declared accesses of %s not used (%s: %s)", _kernel_name(kernel), type(e).__name__, e)
        return None


def _build_answer(entry: str, kernel: Any, kwargs: dict[str, Any]) -> Any:
    from torch._inductor.ir import TensorBox
    from triton.runtime.autotuner import Autotuner

    from .kernels.accesses import declared

    fn = kernel
    if isinstance(kernel, Autotuner):  # generate_ttir lays the first config over the arguments
        fn = kernel.fn
        if kernel.configs:
            kwargs = {**kwargs, **kernel.configs[0].kwargs}
    decl = declared(fn)
    if decl is None:
        return None
    acc = decl(kwargs)
    names = list(fn.arg_names)
    unknown = (acc.reads | acc.writes) - set(names)
    if unknown:
        raise ValueError(f"declared names {sorted(unknown)} are not parameters")
    tensors = [n for n in names if isinstance(kwargs.get(n), (torch.Tensor, TensorBox))]
    reads = [n for n in tensors if n in acc.reads]
    writes = [n for n in tensors if n in acc.writes]
    if entry == "identify_mutated_tensors":  # torch <= 2.12: the written tensors, in parameter order
        return writes
    if entry != "identify_accessed_tensors":
        return None
    from torch._higher_order_ops.triton_kernel_wrap import TensorAccesses
    from torch._inductor.dependencies import ReadWrites, StarDep
    from torch.utils._ordered_set import OrderedSet

    fuse = acc.one_store and len(writes) == 1 and writes[0] not in reads  # torch's _decide_can_fuse_epilogue
    return TensorAccesses(ReadWrites(reads=OrderedSet(StarDep(n) for n in reads),
                                     writes=OrderedSet(StarDep(n) for n in writes), index_exprs=OrderedSet()),
                          can_fuse_epilogue=fuse)


def _is_fallback(answer: Any, kwargs: dict[str, Any]) -> bool:
    """torch's answer when its analysis failed: every tensor argument read and written."""
    from torch._inductor.ir import TensorBox

    tensors = [n for n, v in kwargs.items() if isinstance(v, (torch.Tensor, TensorBox))]
    s = _summary(answer)
    if s[0] == "writes":
        return False  # torch <= 2.12 reports writes only: a failure cannot be told from a real answer
    return [d[1] for d in s[1]] == tensors and [d[1] for d in s[2]] == tensors and not s[4]


def _summary(answer: Any) -> Any:
    """An analysis result as plain data, to compare a declared answer with torch's."""
    if isinstance(answer, (list, tuple)):
        return ("writes", list(answer))
    rw = answer.read_writes
    deps = lambda ds: [(type(d).__name__, d.name, getattr(d, "mode", None)) for d in ds]  # noqa: E731
    return ("accesses", deps(rw.reads), deps(rw.writes), list(rw.index_exprs), bool(answer.can_fuse_epilogue))


def _remember(key: Any, value: Any) -> None:
    if len(_cache) >= MAX_ENTRIES:
        _cache.clear()
    _cache[key] = value


def install() -> bool:
    """Wrap torch's analysis (idempotent); False when this torch has none of the known names or
    FXFUSE_TTIR_CACHE=0. Modules that imported the function by name are rebound too. Never raises:
    a compile must not fail over a cache."""
    try:
        return _install()
    except Exception as e:  # noqa: BLE001
        log.debug("fxfuse: TTIR analysis cache not installed (%s: %s)", type(e).__name__, e)
        return False


def _install() -> bool:
    if _installed:
        return True
    if os.environ.get("FXFUSE_TTIR_CACHE", "1") == "0":
        return False
    from torch._higher_order_ops import triton_kernel_wrap as tkw
    from torch._inductor import ir

    entry = _entry()
    if entry is None:
        log.debug("fxfuse: no TTIR analysis function in this torch (%s); kernel analysis not cached", torch.__version__)
        return False
    name, current, original = entry
    if current is not original:
        return True
    wrapper = _cached(original)
    for mod in (tkw, ir):
        if getattr(mod, name, None) is original:
            _installed.append((mod, name, original))
            setattr(mod, name, wrapper)
    log.debug("fxfuse: caching %s for fxfuse kernels", name)
    return True


def uninstall() -> None:
    """Put torch's functions back and forget every entry (tests)."""
    for mod, name, original in _installed:
        setattr(mod, name, original)
    _installed.clear()
    _cache.clear()
    _canary.clear()
    _declarations_off.clear()
