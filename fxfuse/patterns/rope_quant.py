"""RoPE of q and k (+ fp8 quant of each) -> one fused kernel launch for both.

Node surgery, like rmsnorm_quant: from each `cat` that rotates a tensor's halves
(`cat(-x2, x1)`, the Hugging Face `rotate_half`), walk to `x * cos + rotate_half(x) * sin`,
capture what was written (rotary dim, partial-rotary pass-through, where cos/sin come from,
which dim holds the heads) and the fp8 quantization that reads the result, then check it.
Regions rotated by the *same* cos/sin nodes (q and k of one attention) become ONE launch;
regions with different cos/sin (e.g. other positions) stay separate launches.

The kernel sees each tensor as a 4-D `[B, S, H, D]` view (permute, no copy), so the HF
`[B, H, S, D]` transposed projections and token-major `[T, H, D]` tensors both work. cos/sin
are passed as `[M, rot]` rows; when they are gathered from a table by a positions tensor
(`table[pos]`, `index_select`, `embedding`) the kernel gathers the rows itself.

Forms: HF `rotate_half` (cat(-x2, x1)), HF GPT-J `rotate_every_two` (stack(-x_odd, x_even).flatten),
and the explicit-halves form (x1*cos - x2*sin, x2*cos + x1*sin; cat or stack) that vLLM's
`_C::rotary_embedding` unwraps to; Meta Llama's complex form (view_as_complex of adjacent pairs
times a complex64 freqs_cis, view_as_real, flatten: Inductor keeps these complex ops as they
are, so the fixed chain is matched; cos/sin are freqs' real/imaginary parts, fp32 output);
partial rotary (cat with the pass-through part); QK-norm (a per-head RMSNorm over head_dim,
through a transpose) computed in the same kernel.

KV-cache write (fxfuse/patterns/rope_cache.py finds it): when rotated k (or its static fp8 quant)
and v (or its static fp8 quant) are scattered by the same slots into two graph-input caches,
`torch.ops.fxfuse.rope_quant_cache` (a `triton_op` with `mutates_args=("k_cache", "v_cache")`)
stores them from the same launch. The replacement is traced with functionalization: on CUDA
that gives `triton_kernel_wrapper_functional(..., tensors_to_clone=[.., k_cache, v_cache])`,
whose outputs replace the `index_put` results feeding the graph's final `copy_` into the cache
inputs; Inductor's reinplace pass (which runs after this pre-pass) drops the clones and the
copies, since each cache is a graph input only copied back (tests/test_rope_quant.py::
test_kv_cache_cuda_path_reinplaces_the_caches checks it on the fake-CUDA graph). On CPU the same
trace gives `auto_functionalized_v2(fxfuse.rope_quant_cache_ref)`, reinplaced the same way.
Slot semantics follow the graph: the ATen `index_put` wraps a negative slot (slot + num_slots),
vLLM's unwrapped `reshape_and_cache_flash` skips it; the kernel does whichever the graph does.
The cache-write region is its own gate class (scheme + "_kvcache"); where it is gated off or a
check fails, the RoPE still fuses and the write stays with Inductor (near miss with the reason).
Reads of the written caches (attention over the whole cache after the write) read the op's cache
outputs, viewed as the graph viewed the index_put results (rope_cache.reroute_reads); reads of
the old contents stay near misses. Several layers writing with the same slots: each k write takes
the nearest v write with those slots that keeps the graph acyclic (v rows, slots and v scale not
computed from the region or k's write; no fused input computed from either new cache), each v
write at most once. transformers' StaticCache ([B, H, max_len, D] written along dim 2 at
cache_position) is the `cache_bhsd` form of the op: k and v in HF layout [B, H, T, D].
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import gating
from ..fx_utils import (
    Reject,
    aten,
    convert_dtype,
    depends_on_any,
    gate_class,
    inline_graph,
    is_convert,
    is_op,
    kernel_devices_ok,
    literal,
    other_arg,
    same_device,
    scalar_on,
    stable_toposort,
    trace_aten,
    tval,
    val,
    op_bound,
)
from ..kernels.quant_common import op_scale_chain
from ..kernels.rope_quant import QUANT_DYNAMIC, QUANT_NONE, QUANT_STATIC
from .quant import amax_source as _amax_source, scale_chain as _scale_chain, strip_f32_convert as _strip_f32_convert
from .rmsnorm_quant import NormMatch, match_norm
from .rope_cache import BYTE_DTYPES, CacheWrite, KVPlan, match_cache_write, reroute_reads, reroute_vals, rows_match, v_rows

FAMILY = "rope_quant"
X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FP8 = torch.float8_e4m3fn
BIG = 2**62
QUANT_NAMES = {QUANT_NONE: "none", QUANT_STATIC: "fp8 static", QUANT_DYNAMIC: "fp8 per-token-head"}


@dataclass
class QuantPart:
    scheme: int
    sink: fx.Node  # the convert to fp8
    scale: fx.Node | None  # static one-element scale tensor
    static_value: float
    ops: list[int]
    consts: list[float]
    mul: bool
    qmin: float
    qmax: float
    scale_out: fx.Node | None  # dynamic scale node (may have users outside)
    nodes: set[fx.Node] = field(default_factory=set)
    via: fx.Node | None = None  # static quant of a reshape of the rope output (vLLM's [T, H*D])
    prefix: fx.Node | None = None  # static quant of rope_out[:n] (n not provably all tokens): cache rows only


@dataclass
class RopeMatch:
    x: fx.Node  # rotated tensor (whole head_dim when partial)
    out: fx.Node  # rope result (cat with pass-through when partial)
    cos: fx.Node  # factor of x
    sin: fx.Node  # factor of rotate_half(x)
    rot: int
    neox: bool
    nodes: set[fx.Node]
    head: int = -1  # dim of x holding the heads (-1: none, one head)
    tok: list[int] = field(default_factory=list)
    table: tuple[fx.Node, fx.Node, fx.Node] | None = None  # (cos table, sin table, positions)
    table_cols: tuple[tuple[int, int] | None, tuple[int, int] | None] = (None, None)  # column slices of the tables
    cos_half: bool = False  # cos/sin hold one value per rotated pair (rot/2 columns)
    complex_freqs: bool = False  # cos/sin are the real/imaginary parts of one complex tensor (cos is sin)
    f32_math: bool = False  # rotation in fp32, `out` is its cast to a narrower dtype (one rounding)
    quant: QuantPart | None = None
    need_rope: bool = True
    quant_miss: tuple[fx.Node, str] | None = None  # fp8 quant seen but not fusable: (sink, reason)
    norm: NormMatch | None = None  # per-head RMSNorm (QK-norm) computing x
    x_src: fx.Node | None = None  # kernel input: x itself, or the norm's input
    x_perm: list[int] | None = None  # x = permute(norm output, x_perm)

    @property
    def src(self) -> fx.Node:
        return self.x_src if self.x_src is not None else self.x


# ----------------------------------------------------------------------------- helpers


def _last_dim(d: Any, ndim: int) -> bool:
    return isinstance(d, int) and d % ndim == ndim - 1


def _split_part(node: Any) -> tuple[fx.Node, int, int] | None:
    """(src, start, end) for part i of a last-dim aten.split / split_with_sizes (what `torch.chunk`
    and `torch.split` become, e.g. GPT-OSS's `first_half, second_half = torch.chunk(x, 2, dim=-1)`)."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem):
        return None
    sp, i = node.args
    if not is_op(sp, aten.split.Tensor, aten.split_with_sizes.default) or not isinstance(i, int) or sp.kwargs:
        return None
    src, size = sp.args[0], sp.args[1]
    dim = sp.args[2] if len(sp.args) > 2 else 0
    src_v = val(src)
    if not isinstance(src_v, torch.Tensor) or not _last_dim(dim, src_v.dim()):
        return None
    n = src_v.shape[-1]
    if not isinstance(n, int):
        return None
    if is_op(sp, aten.split.Tensor):
        if not isinstance(size, int) or size <= 0:
            return None
        sizes = [min(size, n - j) for j in range(0, n, size)]
    else:
        sizes = list(size)
        if not all(isinstance(v, int) for v in sizes) or sum(sizes) != n:
            return None
    if not 0 <= i < len(sizes):
        return None
    start = sum(sizes[:i])
    return src, start, start + sizes[i]


def _slice_of(node: Any, step_ok: int = 1) -> tuple[fx.Node, int, int] | None:
    """(src, start, end) for a last-dim aten.slice with step `step_ok` (or, for step 1, a part of a
    last-dim split), else None."""
    if step_ok == 1 and (part := _split_part(node)) is not None:
        return part
    if not is_op(node, aten.slice.Tensor):
        return None
    a = list(node.args) + [None] * (5 - len(node.args))
    src, dim, start, end, step = a[:5]
    src_v = val(src)
    if not isinstance(src_v, torch.Tensor) or not _last_dim(dim if dim is not None else 0, src_v.dim()):
        return None
    if (step or 1) != step_ok:
        return None
    n = src_v.shape[-1]
    start = 0 if start is None else start
    end = BIG if end is None else end
    if not isinstance(start, int) or not isinstance(end, int) or not isinstance(n, int):
        return None
    return src, max(0, min(start, n)), max(0, min(end, n))


def _trig_kind(node: Any, depth: int = 8) -> str | None:
    """'cos' / 'sin' if node is (a broadcast/cast/scaled/gathered) cos() or sin(), else None."""
    for _ in range(depth):
        if not isinstance(node, fx.Node):
            return None
        if is_op(node, aten.cos.default):
            return "cos"
        if is_op(node, aten.sin.default):
            return "sin"
        if is_op(node, aten.unsqueeze.default, aten.reshape.default, aten.expand.default, aten.view.default,
                 aten.slice.Tensor, aten.index_select.default) or is_convert(node):
            node = node.args[0]
        elif is_op(node, aten.mul.Tensor) and (literal(node.args[1]) is not None or literal(node.args[0]) is not None):
            node = node.args[0] if literal(node.args[1]) is not None else node.args[1]
        elif is_op(node, aten.index.Tensor):
            node = node.args[0]
        elif is_op(node, aten.embedding.default):
            node = node.args[0]
        else:
            return None
    return None


def looks_like_rope(cat: fx.Node) -> bool:
    """Cheap screen (no near miss): a 2-input last-dim cat of (negated) halves of one tensor."""
    if not is_op(cat, aten.cat.default) or len(cat.args[0]) != 2:
        return False
    v = val(cat)
    if not isinstance(v, torch.Tensor) or not _last_dim(cat.args[1] if len(cat.args) > 1 else 0, v.dim()):
        return False
    srcs = []
    for a in cat.args[0]:
        if is_op(a, aten.neg.default):
            a = a.args[0]
        s = _slice_of(a)
        if s is None:
            return False
        srcs.append(s[0])
    return srcs[0] is srcs[1] and any(is_op(a, aten.neg.default) for a in cat.args[0])


# ----------------------------------------------------------------------------- RoPE part


def match_rope(cat: fx.Node) -> RopeMatch:
    a, b = cat.args[0]
    if not is_op(a, aten.neg.default):
        raise Reject("rotation is cat(x2, -x1), not rotate_half's cat(-x2, x1)")
    if is_op(b, aten.neg.default):
        raise Reject("both halves negated")
    s2, s1 = _slice_of(a.args[0]), _slice_of(b)
    x = s1[0]
    Dr = tval(x).shape[-1]
    h = Dr // 2
    if Dr % 2 or s1[1:] != (0, h) or s2[1:] != (h, Dr):
        raise Reject(f"rotate_half halves are {s2[1:]} and {s1[1:]}, not the two halves of {Dr}")
    nodes = {cat, a, a.args[0], b}
    if len(cat.users) != 1:
        raise Reject("rotate_half(x) has other users")
    (m2,) = cat.users
    if not is_op(m2, aten.mul.Tensor):
        raise Reject("rotate_half(x) is not multiplied by sin")
    sin = other_arg(m2, cat)
    if len(m2.users) != 1:
        raise Reject("rotate_half(x) * sin has other users")
    (r,) = m2.users
    if not is_op(r, aten.add.Tensor) or r.kwargs or len(r.args) != 2:
        raise Reject("rotate_half(x) * sin is not added to x * cos")
    m1 = other_arg(r, m2)
    if not is_op(m1, aten.mul.Tensor) or x not in m1.args[:2]:
        raise Reject("x * cos + rotate_half(x) * sin: the first product does not read x")
    cos = other_arg(m1, x)
    if len(m1.users) != 1:
        raise Reject("x * cos has other users")
    nodes |= {m1, m2, r}
    for n in (cos, sin):
        if not isinstance(n, fx.Node):
            raise Reject("cos/sin are not tensors")
    if _trig_kind(cos) == "sin" or _trig_kind(sin) == "cos":
        raise Reject("cos and sin are swapped (x is multiplied by sin)")
    xv, rv = tval(x), tval(r)
    if tuple(rv.shape) != tuple(xv.shape):
        raise Reject("cos/sin broadcast changes the shape of x")
    for n in (cos, sin):
        nv = tval(n)
        if nv.dim() > xv.dim() or nv.shape[-1] != Dr:
            raise Reject(f"{n.name} shape {tuple(nv.shape)} does not broadcast over heads of x {tuple(xv.shape)}")
    for n in (a.args[0], b):
        if any(u not in nodes for u in n.users):
            raise Reject(f"slice {n.name} of x has other users")
    m = RopeMatch(x=x, out=r, cos=cos, sin=sin, rot=Dr, neox=True, nodes=nodes)
    _widen_partial(m)
    return m


def looks_like_explicit(cat: fx.Node) -> bool:
    """Cheap screen: cat of a sub and an add (neox), or of their unsqueezes (gpt-j stack)."""
    if not is_op(cat, aten.cat.default) or len(cat.args[0]) != 2:
        return False
    v = val(cat)
    if not isinstance(v, torch.Tensor) or not _last_dim(cat.args[1] if len(cat.args) > 1 else 0, v.dim()):
        return False
    args = [a.args[0] if is_op(a, aten.unsqueeze.default) else a for a in cat.args[0]]
    kinds = {is_op(a, aten.sub.Tensor) + 2 * is_op(a, aten.add.Tensor) for a in args}
    return kinds == {1, 2} and all(is_op(a, aten.mul.Tensor) for o in args for a in o.args[:2])


def _mul_split(m: fx.Node) -> list[tuple[Any, Any]]:
    a, b = m.args[:2]
    return [(a, b), (b, a)]


def match_explicit(cat: fx.Node) -> RopeMatch:
    """o1 = x1*cos - x2*sin, o2 = x2*cos + x1*sin; cat(o1, o2) (neox) or stack(...).flatten (gpt-j).

    The form vLLM's rotary_embedding decomposes to: cos/sin hold rot/2 values per token."""
    raw = list(cat.args[0])
    gptj = all(is_op(a, aten.unsqueeze.default) for a in raw)
    nodes = {cat}
    if gptj:
        nd = tval(cat).dim()
        if any(not _last_dim(a.args[1], nd) for a in raw):
            raise Reject("stacked halves are not stacked on the last dim")
        nodes |= set(raw)
        o1, o2 = (a.args[0] for a in raw)
    elif any(is_op(a, aten.unsqueeze.default) for a in raw):
        raise Reject("only one half is stacked")
    else:
        o1, o2 = raw
    if not (is_op(o1, aten.sub.Tensor) and is_op(o2, aten.add.Tensor)) or o1.kwargs or o2.kwargs:
        raise Reject("rotation signs differ from (x1*cos - x2*sin, x2*cos + x1*sin)")
    A, B = o1.args
    P, Q = o2.args
    if not all(is_op(n, aten.mul.Tensor) for n in (A, B, P, Q)):
        raise Reject("rotation terms are not products")
    found = None
    for x1, c in _mul_split(A):
        for x2, sn in _mul_split(B):
            s1, s2 = _slice_of(x1, 2 if gptj else 1), _slice_of(x2, 2 if gptj else 1)
            if s1 is not None and s2 is not None and s1[0] is s2[0]:
                found = (x1, c, x2, sn, s1, s2)
    if found is None:
        if not gptj and any(_slice_of(x1, 2) is not None and _slice_of(x2, 2) is not None
                            for x1, _ in _mul_split(A) for x2, _ in _mul_split(B)):
            raise Reject("rotation reads even/odd elements (x[..., 0::2], x[..., 1::2]) but writes them as "
                         "two halves (DeepSeek's interleaved-weights form): not supported")
        raise Reject("rotation does not read two halves of one tensor")
    x1, c, x2, sn, s1, s2 = found
    if {frozenset(P.args[:2]), frozenset(Q.args[:2])} != {frozenset((x2, c)), frozenset((x1, sn))}:
        raise Reject("second half is not x2*cos + x1*sin")
    x = s1[0]
    Dr = tval(x).shape[-1]
    if not isinstance(Dr, int) or Dr % 2:
        raise Reject("rotary dim is not a static even size")
    h = Dr // 2
    if gptj:
        if s1[1:] != (0, Dr) or s2[1:] != (1, Dr):
            raise Reject("interleaved halves are not x[..., 0::2] and x[..., 1::2]")
    elif s1[1:] != (0, h) or s2[1:] != (h, Dr):
        raise Reject(f"halves are {s1[1:]} and {s2[1:]}, not the two halves of {Dr}")
    if _trig_kind(c) == "sin" or _trig_kind(sn) == "cos":
        raise Reject("cos and sin are swapped (x1 is multiplied by sin)")
    for n in (c, sn):
        nv = tval(n)
        if nv.dim() > tval(x).dim() or nv.shape[-1] != h:
            raise Reject(f"{n.name} shape {tuple(nv.shape)} does not broadcast over heads of the halves")
    nodes |= {o1, o2, A, B, P, Q, x1, x2}
    out = cat
    if gptj:
        users = list(cat.users)
        r = users[0] if len(users) == 1 else None
        cv = tval(cat)
        if not is_op(r, aten.reshape.default, aten.view.default) or list(tval(r).shape) != list(cv.shape[:-2]) + [Dr]:
            raise Reject("stacked pairs are not flattened back to the rotary dim")
        nodes.add(r)
        out = r
    for n in nodes - {out}:
        if any(u not in nodes for u in n.users):
            raise Reject(f"intermediate {n.name} of the rotation has other users")
    if tuple(tval(out).shape) != tuple(tval(x).shape):
        raise Reject("rotation output shape differs from x")
    m = RopeMatch(x=x, out=out, cos=c, sin=sn, rot=Dr, neox=not gptj, nodes=nodes, cos_half=True)
    _widen_partial(m)
    return m


def match_interleaved_hf(cat: fx.Node) -> RopeMatch:
    """HF GPT-J rotate_every_two: x*cos + flatten(stack(-x[1::2], x[0::2])) * sin (cos repeat-interleaved)."""
    a, b = (n.args[0] for n in cat.args[0])
    if not is_op(a, aten.neg.default):
        raise Reject("interleaved rotation is not stack(-x_odd, x_even)")
    s2, s1 = _slice_of(a.args[0], 2), _slice_of(b, 2)
    x = s1[0]
    Dr = tval(x).shape[-1]
    if s1[1:] != (0, Dr) or s2[1:] != (1, Dr):
        raise Reject("interleaved halves are not x[..., 0::2] and x[..., 1::2]")
    users = list(cat.users)
    r = users[0] if len(users) == 1 else None
    if not is_op(r, aten.reshape.default, aten.view.default) or tuple(tval(r).shape) != tuple(tval(x).shape):
        raise Reject("stacked pairs are not flattened back to the rotary dim")
    nodes = {cat, *cat.args[0], a, a.args[0], b, r}
    return _finish_sum(r, x, nodes, neox=False)


def looks_like_complex(vr: fx.Node) -> bool:
    """Cheap screen: view_as_real(view_as_complex(...) * f) (Meta Llama's apply_rotary_emb)."""
    if not is_op(vr, aten.view_as_real.default) or not is_op(vr.args[0], aten.mul.Tensor):
        return False
    return any(is_op(a, aten.view_as_complex.default) for a in vr.args[0].args[:2])


def match_complex(vr: fx.Node) -> RopeMatch:
    """view_as_real(view_as_complex(x.reshape(..., D/2, 2)) * freqs).flatten(-2): GPT-J pairs rotated
    by cos = freqs.real, sin = freqs.imag (one value per pair), in fp32 like the complex product."""
    m = vr.args[0]
    a, b = m.args[:2]
    xc, f = (a, b) if is_op(a, aten.view_as_complex.default) else (b, a)
    if not isinstance(f, fx.Node) or tval(f).dtype != torch.complex64:
        raise Reject("the complex factor is not a complex64 tensor")
    rs = xc.args[0]
    if not is_op(rs, aten.reshape.default, aten.view.default):
        raise Reject("view_as_complex does not read a reshape of x into (pairs, 2)")
    x = rs.args[0]
    xv, rv = tval(x), tval(rs)
    D = xv.shape[-1]
    if (xv.dim() + 1 != rv.dim() or tuple(rv.shape[:-2]) != tuple(xv.shape[:-1]) or rv.shape[-1] != 2
            or not isinstance(D, int) or D % 2 or rv.shape[-2] != D // 2):
        raise Reject(f"x {tuple(xv.shape)} is viewed as {tuple(rv.shape)}, not as adjacent pairs [..., D/2, 2]")
    users = list(vr.users)
    out = users[0] if len(users) == 1 else None
    if not is_op(out, aten.reshape.default, aten.view.default) or tuple(tval(out).shape) != tuple(xv.shape):
        raise Reject("view_as_real of the product is not flattened back to x's shape")
    fv = tval(f)
    if fv.dim() > xv.dim() or fv.shape[-1] != D // 2:
        raise Reject(f"freqs {tuple(fv.shape)} do not hold one complex value per pair of x {tuple(xv.shape)}")
    nodes = {rs, xc, m, vr, out}
    for n in (rs, xc, m, vr):
        if any(u not in nodes for u in n.users):
            raise Reject(f"intermediate {n.name} of the complex rotation has other users")
    rm = RopeMatch(x=x, out=out, cos=f, sin=f, rot=D, neox=False, nodes=nodes, cos_half=True, complex_freqs=True)
    casts = list(out.users)
    if len(casts) == 1 and is_convert(casts[0]) and convert_dtype(casts[0]) in (torch.bfloat16, torch.float16):
        rm.out, rm.f32_math = casts[0], True  # `.type_as(x)`: the kernel stores the fp32 result cast once
        rm.nodes.add(casts[0])
    src, up = _strip_f32_convert(x)
    if up is not None and tval(src).dtype in X_DTYPES and all(u in nodes for u in x.users):
        rm.x_src = src  # the kernel upcasts on load (exact)
        rm.nodes.add(x)
    return rm


def _finish_sum(rot_node: fx.Node, x: fx.Node, nodes: set[fx.Node], neox: bool) -> RopeMatch:
    """From rotate(x): x * cos + rotate(x) * sin."""
    if len(rot_node.users) != 1:
        raise Reject("rotate(x) has other users")
    (m2,) = rot_node.users
    if not is_op(m2, aten.mul.Tensor):
        raise Reject("rotate(x) is not multiplied by sin")
    sin = other_arg(m2, rot_node)
    if len(m2.users) != 1:
        raise Reject("rotate(x) * sin has other users")
    (r,) = m2.users
    if not is_op(r, aten.add.Tensor) or r.kwargs or len(r.args) != 2:
        raise Reject("rotate(x) * sin is not added to x * cos")
    m1 = other_arg(r, m2)
    if not is_op(m1, aten.mul.Tensor) or x not in m1.args[:2]:
        raise Reject("x * cos + rotate(x) * sin: the first product does not read x")
    cos = other_arg(m1, x)
    if len(m1.users) != 1:
        raise Reject("x * cos has other users")
    nodes |= {m1, m2, r}
    for n in (cos, sin):
        if not isinstance(n, fx.Node):
            raise Reject("cos/sin are not tensors")
    if _trig_kind(cos) == "sin" or _trig_kind(sin) == "cos":
        raise Reject("cos and sin are swapped (x is multiplied by sin)")
    xv, rv = tval(x), tval(r)
    Dr = xv.shape[-1]
    if tuple(rv.shape) != tuple(xv.shape):
        raise Reject("cos/sin broadcast changes the shape of x")
    for n in (cos, sin):
        nv = tval(n)
        if nv.dim() > xv.dim() or nv.shape[-1] != Dr:
            raise Reject(f"{n.name} shape {tuple(nv.shape)} does not broadcast over heads of x {tuple(xv.shape)}")
    for n in nodes - {m1, m2, r}:
        if any(u not in nodes for u in n.users):
            raise Reject(f"intermediate {n.name} of the rotation has other users")
    m = RopeMatch(x=x, out=r, cos=cos, sin=sin, rot=Dr, neox=neox, nodes=nodes)
    _widen_partial(m)
    return m


def looks_like_interleaved(cat: fx.Node) -> bool:
    """Cheap screen: cat of two last-dim unsqueezes of (negated) stride-2 slices of one tensor."""
    if not is_op(cat, aten.cat.default) or len(cat.args[0]) != 2:
        return False
    v = val(cat)
    if not isinstance(v, torch.Tensor) or not _last_dim(cat.args[1] if len(cat.args) > 1 else 0, v.dim()):
        return False
    srcs = []
    for a in cat.args[0]:
        if not is_op(a, aten.unsqueeze.default):
            return False
        a = a.args[0]
        if is_op(a, aten.neg.default):
            a = a.args[0]
        sl = _slice_of(a, 2)
        if sl is None:
            return False
        srcs.append(sl[0])
    return srcs[0] is srcs[1]


def _widen_partial(m: RopeMatch) -> None:
    """x = q[..., :rot]; out = cat(rope(x), q[..., rot:]) -> rotate q with rot_dim=rot."""
    s = _slice_of(m.x)
    if s is None or s[1] != 0:
        return
    q, _, rot = s
    D = tval(q).shape[-1]
    if rot >= D:
        return
    users = list(m.out.users)
    cat = users[0] if len(users) == 1 else None
    if not (is_op(cat, aten.cat.default) and len(cat.args[0]) == 2 and cat.args[0][0] is m.out):
        raise Reject("partial rotary: the pass-through part is not concatenated back after the rotated part")
    p = _slice_of(cat.args[0][1])
    if p is None or p[0] is not q or p[1:] != (rot, D) or not _last_dim(cat.args[1] if len(cat.args) > 1 else 0, tval(q).dim()):
        raise Reject("partial rotary: the concatenated pass-through is not q[..., rot:]")
    if tval(cat).dtype != tval(q).dtype or tval(m.out).dtype != tval(q).dtype:
        raise Reject("partial rotary changes the dtype")
    if any(u not in m.nodes for u in m.x.users):
        raise Reject("q[..., :rot] has other users")
    if len(cat.args[0][1].users) != 1:
        raise Reject("q[..., rot:] has other users")
    m.nodes |= {m.x, m.out, cat.args[0][1], cat}
    m.x, m.out = q, cat


def _find_rsqrt(y: fx.Node, depth: int = 5) -> fx.Node | None:
    frontier, seen = [y], {y}
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if is_op(n, aten.rsqrt.default):
                return n
            for i in n.all_input_nodes:
                if i not in seen:
                    seen.add(i)
                    nxt.append(i)
        frontier = nxt
    return None


def absorb_norm(m: RopeMatch) -> str | None:
    """x = [permute of] RMSNorm over head_dim (q_norm/k_norm): fuse the norm too. Returns why not."""
    x, perm, pnode = m.x, None, None
    if is_op(x, aten.permute.default):
        x, perm, pnode = x.args[0], list(x.args[1]), x
    rs = _find_rsqrt(x)
    if rs is None:
        return None
    try:
        nm = match_norm(rs)
    except Reject as r:
        return f"norm before RoPE not fused: {r}"
    if nm.y is not x:
        return None
    if nm.residual is not None or nm.weight is None:
        return "norm before RoPE not fused: it has a residual add or no weight"
    inside = m.nodes | ({pnode} if pnode is not None else set())
    if any(u not in inside for u in x.users) or (pnode is not None and any(u not in m.nodes for u in pnode.users)):
        return "norm before RoPE not fused: the normalized tensor is also used elsewhere"
    if tval(nm.x).dtype not in X_DTYPES:
        return None
    m.norm, m.x_src, m.x_perm = nm, nm.x, perm
    m.nodes |= nm.nodes | {x} | ({pnode} if pnode is not None else set())
    return None


def resolve_layout(m: RopeMatch) -> None:
    """Pick the heads dim (cos/sin broadcast over it) and the token dims of x."""
    xv = tval(m.x)
    n = xv.dim()
    if n < 2 or n > 4:
        raise Reject(f"rotated tensor has rank {n}; 2 to 4 supported")
    cands = []
    shapes = [list(tval(c).shape) for c in (m.cos, m.sin)]
    for i in range(n - 1):
        j = i - (n - len(shapes[0]))
        k = i - (n - len(shapes[1]))
        c1 = shapes[0][j] if j >= 0 else 1
        c2 = shapes[1][k] if k >= 0 else 1
        if isinstance(c1, int) and c1 == 1 and isinstance(c2, int) and c2 == 1:
            cands.append(i)
    real = [i for i in cands if not (isinstance(xv.shape[i], int) and xv.shape[i] == 1)]
    pick = real or cands
    if not pick:
        if n == 4:
            raise Reject("cos/sin are not broadcast over any dim of x (no heads dim)")
        head = -1
    else:
        # heads are the innermost of the candidates in memory ([B, S, H, D] under a [B, H, S, D] view)
        head = min(pick, key=lambda i: (xv.stride(i) if isinstance(xv.stride(i), int) else BIG, -i))
    tok = [i for i in range(n - 1) if i != head]
    if len(tok) > 2 or (head < 0 and len(tok) > 2):
        raise Reject("more than two token dims")
    m.head, m.tok = head, tok
    m.table = None if m.complex_freqs else _table_lookup(m)


def _strip_unsqueeze(node: Any) -> Any:
    while is_op(node, aten.unsqueeze.default):
        node = node.args[0]
    return node


def _gather(node: Any) -> tuple[fx.Node, fx.Node] | None:
    """(table, positions) if node gathers rows of a 2-D table by an integer tensor."""
    if is_op(node, aten.index.Tensor) and len(node.args[1]) == 1 and node.args[1][0] is not None:
        return node.args[0], node.args[1][0]
    if is_op(node, aten.index_select.default) and node.args[1] == 0:
        return node.args[0], node.args[2]
    if is_op(node, aten.embedding.default) and len(node.args) == 2:
        return node.args[0], node.args[1]
    return None


def _gather_cols(node: Any) -> tuple[fx.Node, fx.Node, tuple[int, int] | None] | None:
    """(table, positions, column range) for table[pos] or a split/chunk piece of the gathered rows."""
    g = _gather(node)
    if g is not None:
        return g[0], g[1], None
    if not (isinstance(node, fx.Node) and node.target is operator.getitem and is_op(node.args[0], aten.split.Tensor)):
        return None
    sp = node.args[0]
    size = sp.args[1]
    dim = sp.args[2] if len(sp.args) > 2 else sp.kwargs.get("dim", 0)
    g = _gather(sp.args[0])
    if g is None or not isinstance(size, int) or not _last_dim(dim, tval(sp.args[0]).dim()):
        return None
    i = node.args[1]
    width = tval(sp.args[0]).shape[-1]
    if not isinstance(width, int):
        return None
    return g[0], g[1], (i * size, min((i + 1) * size, width))


def _table_lookup(m: RopeMatch) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """cos = cos_table[pos] (and sin likewise, same pos) with pos laid out as x's token dims."""
    gc, gs = _gather_cols(_strip_unsqueeze(m.cos)), _gather_cols(_strip_unsqueeze(m.sin))
    if gc is None or gs is None or gc[1] is not gs[1]:
        return None
    pos = gc[1]
    pv, xv = tval(pos), tval(m.x)
    if pv.dtype not in (torch.int32, torch.int64):
        return None
    width = m.rot // 2 if m.cos_half else m.rot
    for t, cols in ((gc[0], gc[2]), (gs[0], gs[2])):
        tv = tval(t)
        if tv.dim() != 2 or not tv.is_floating_point():
            return None
        w = tv.shape[1] if cols is None else cols[1] - cols[0]
        if w != width:
            return None
    m.table_cols = (gc[2], gs[2])
    if [xv.shape[i] for i in m.tok] != list(pv.shape):
        return None  # positions broadcast over some token dim: materialize cos/sin rows instead
    return gc[0], gs[0], pos


# ----------------------------------------------------------------------------- quant part


def _fp8_sinks(r: fx.Node, depth: int = 7) -> list[fx.Node]:
    out, frontier, seen = [], [r], {r}
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in seen:
                    continue
                seen.add(u)
                if is_convert(u) and convert_dtype(u) == FP8:
                    out.append(u)
                elif u.op == "call_function":
                    nxt.append(u)
        frontier = nxt
    return out


def match_quant(m: RopeMatch) -> None:
    r = m.out
    sinks = _fp8_sinks(r)
    if not sinks:
        return
    if m.f32_math:
        raise Reject("quant of the cast-back fp32 complex rotation is not fused")
    if len(sinks) > 1:
        raise Reject("rope output feeds several fp8 quantizations")
    (sink,) = sinks
    nodes = {sink}
    t = sink.args[0]
    qmin, qmax = -math.inf, math.inf
    while is_op(t, aten.clamp_min.default, aten.clamp_max.default, aten.clamp.default):
        if is_op(t, aten.clamp.default):
            lo = t.args[1] if len(t.args) > 1 else t.kwargs.get("min")
            hi = t.args[2] if len(t.args) > 2 else t.kwargs.get("max")
        elif is_op(t, aten.clamp_min.default):
            lo, hi = t.args[1], None
        else:
            lo, hi = None, t.args[1]
        for bound, is_lo in ((lo, True), (hi, False)):
            if bound is None:
                continue
            if literal(bound) is None:
                raise Reject("quant clamp bound is not a constant")
            qmin, qmax = (max(qmin, literal(bound)), qmax) if is_lo else (qmin, min(qmax, literal(bound)))
        nodes.add(t)
        t = t.args[0]
    if not is_op(t, aten.div.Tensor, aten.mul.Tensor) or t.kwargs:
        raise Reject("fp8 quant does not divide or multiply by a scale")
    if tval(t).dtype != torch.float32:
        raise Reject(f"quant arithmetic in {tval(t).dtype}, not float32")
    nodes.add(t)
    mul = is_op(t, aten.mul.Tensor)
    a, s = t.args
    if mul and not depends_on_any(a, {r}):
        a, s = s, a
    src, up = _strip_f32_convert(a)
    via = prefix = None
    if src is not r and is_op(src, aten.reshape.default, aten.view.default) and src.args[0] is r:
        via = src  # elementwise static quant commutes with the reshape
        nodes.add(src)
        src = r
    elif is_op(src, aten.slice.Tensor) and src.args[0] is r and list(src.args[1:3]) == [0, 0] and (
            len(src.args) < 5 or src.args[4] == 1):
        # r[:n] (vLLM's cache write takes the first len(slots) tokens): the same as r when n is
        # provably all tokens; else the quant is fused only as a KV-cache write's rows
        if not statically_known_true(tval(src).shape[0] == tval(r).shape[0]):
            prefix = src
        nodes.add(src)
        src = r
    if src is not r:
        raise Reject("fp8 quant reads another tensor than the rope output")
    if up is not None:
        nodes.add(up)
    scheme, scale, sv, ops, consts, scale_out = QUANT_STATIC, None, 1.0, [], [], None
    if literal(s) is not None:
        sv = literal(s)
    else:
        if tval(s).dtype != torch.float32:
            raise Reject(f"scale dtype {tval(s).dtype}, not float32")
        if depends_on_any(s, {r}):
            chain: set[fx.Node] = set()
            base, ops, consts = _scale_chain(s, chain, r)
            amax_src = _amax_source(base, chain)
            if amax_src is None or _strip_f32_convert(amax_src)[0] is not r:
                raise Reject("dynamic scale is not amax(|rope output|) over head_dim")
            up2 = _strip_f32_convert(amax_src)[1]
            if up2 is not None:
                chain.add(up2)
            scheme, scale_out = QUANT_DYNAMIC, s
            nodes |= chain
        else:
            sv_ = tval(s)
            if sv_.numel() != 1:
                raise Reject(f"static scale has {sv_.numel()} elements; per-tensor only")
            scale = s
    if mul and scheme == QUANT_STATIC and scale is None and sv == 0.0:
        raise Reject("multiplying by a zero scale")
    if (via is not None or prefix is not None) and scheme != QUANT_STATIC:
        raise Reject("dynamic fp8 quant of a reshaped or sliced rope output")
    escape_ok = {sink} | ({scale_out} if scale_out is not None else set())
    region = nodes | m.nodes | {r}
    for n in nodes - escape_ok:
        if any(u not in region for u in n.users):
            raise Reject(f"intermediate {n.name} of the quant is used elsewhere")
    m.quant = QuantPart(scheme, sink, scale, sv, ops, consts, mul, qmin, qmax, scale_out, nodes, via, prefix)
    m.need_rope = any(u not in nodes for u in r.users)


# ----------------------------------------------------------------------------- checks


def region_scalars(ms: list[RopeMatch]) -> list[torch.Tensor]:
    """The one-element runtime values a region reads: static scales and lifted norm eps (0-d CPU
    tensors under dynamic=True, moved to the device inside the replacement: their own gate class)."""
    out = [tval(mm.quant.scale) for mm in ms if mm.quant is not None and mm.quant.scale is not None]
    return out + [tval(mm.norm.eps_node) for mm in ms if mm.norm is not None and mm.norm.eps_node is not None]


def check(m: RopeMatch) -> None:
    xv, ov = tval(m.x), tval(m.out)
    if xv.dtype not in X_DTYPES:
        raise Reject(f"dtype {xv.dtype} not supported")
    if ov.dtype not in X_DTYPES:
        raise Reject(f"rope output dtype {ov.dtype} not supported")
    D = xv.shape[-1]
    if not isinstance(D, int) or D > 1024:
        raise Reject("head_dim must be static and at most 1024")
    if not statically_known_true(xv.stride(-1) == 1):
        raise Reject("head_dim of x is not contiguous")
    for n in (m.cos, m.sin):
        if tval(n).dtype not in X_DTYPES and not m.complex_freqs:
            raise Reject(f"{n.name} dtype {tval(n).dtype} not supported")
    if not statically_known_true(tval(m.src).stride(-1) == 1):
        raise Reject("head_dim of the rotated tensor is not contiguous")
    scalars = region_scalars([m])
    if not kernel_devices_ok(xv, tval(m.cos), tval(m.sin), scalars=scalars):
        raise Reject("inputs are on different devices")
    if xv.device.type not in ("cpu", "cuda"):
        raise Reject(f"device {xv.device.type} not supported")
    region = m.nodes | (m.quant.nodes if m.quant else set())
    if m.norm is not None:
        if tval(m.norm.weight).stride(0) != 1 or not same_device(xv, tval(m.norm.weight)):
            raise Reject("norm weight is not contiguous on the same device")
        if not statically_known_true(tval(m.src).stride(-1) == 1):
            raise Reject("head_dim of the norm input is not contiguous")
    for inp in (m.src, m.cos, m.sin, m.quant.scale if m.quant else None, m.norm.weight if m.norm else None,
                m.norm.eps_node if m.norm else None):
        if inp is not None and depends_on_any(inp, region):
            raise Reject(f"input {inp.name} depends on the region itself")


KV_SUFFIX = "_kvcache"  # gate class of a region that also writes the KV cache (scheme_name + this)


def scheme_name(ms: list[RopeMatch]) -> str:
    """Gate key: rope | rope_fp8_static | rope_fp8_dynamic, with _qknorm when the norm is fused."""
    kinds = {mm.quant.scheme if mm.quant else QUANT_NONE for mm in ms}
    base = "rope_fp8_dynamic" if QUANT_DYNAMIC in kinds else "rope_fp8_static" if QUANT_STATIC in kinds else "rope"
    return base + ("_qknorm" if any(mm.norm is not None for mm in ms) else "")


def tokens(mm: RopeMatch) -> Any:
    """The token count M of a match (the product of its token dims): an int, or a SymInt (dynamic)."""
    shape = tval(mm.x).shape
    return math.prod(shape[i] for i in mm.tok)


def gate_rejects(scheme: str, xv: torch.Tensor, scalars: list, M: Any, gate: bool) -> str | None:
    """The benchmark gate of a region: None if it ships, else why not. Classes (scheme, head_dim, M
    class) as gating.rejects keys them: a static M must have measured >= 1x stock in its class; a
    symbolic M in every class of that head_dim (conservative: any may run)."""
    why = gating.rejects(FAMILY, scheme=gate_class(scheme, xv, scalars), hidden=int(xv.shape[-1]),  # size = head_dim
                         dtype=xv.dtype, enabled=gate, M=M)
    if why and not isinstance(M, int):
        return f"token count is symbolic, so every M class must pass: {why}"
    return why


def _same_factor(a: fx.Node, b: fx.Node) -> bool:
    """The same cos (or sin) values, broadcast the same way (unsqueezes of one node count as one)."""
    if a is b:
        return True
    av, bv = tval(a), tval(b)

    def base(n: Any) -> Any:  # reshapes/unsqueezes of one tensor to equal shapes hold the same values
        while is_op(n, aten.unsqueeze.default, aten.reshape.default, aten.view.default):
            n = n.args[0]
        return n

    return (
        base(a) is base(b)
        and len(av.shape) == len(bv.shape)
        and all(statically_known_true(x == y) for x, y in zip(av.shape, bv.shape))
    )


def _norm_key(n: NormMatch) -> tuple:
    return (n.weight_offset, n.weight_sum_dtype, n.round_before_weight, tval(n.y).dtype)


def can_pair(a: RopeMatch, b: RopeMatch) -> bool:
    """q and k of one attention: same cos/sin nodes, token sizes, rotary dim and dtypes."""
    if (a.rot != b.rot or a.neox != b.neox or a.cos_half != b.cos_half or a.complex_freqs != b.complex_freqs
            or a.f32_math != b.f32_math):
        return False
    if a.table is not None and b.table is not None:
        if a.table != b.table or a.table_cols != b.table_cols:
            return False
    elif not (_same_factor(a.cos, b.cos) and _same_factor(a.sin, b.sin)):
        return False
    if (a.norm is None) != (b.norm is None):
        return False
    if a.norm is not None and b.norm is not None and _norm_key(a.norm) != _norm_key(b.norm):
        return False
    if tval(a.src).dtype != tval(b.src).dtype:
        return False
    av, bv = tval(a.x), tval(b.x)
    if av.dtype != bv.dtype or tval(a.out).dtype != tval(b.out).dtype or av.shape[-1] != bv.shape[-1]:
        return False
    if [av.shape[i] for i in a.tok] != [bv.shape[i] for i in b.tok] or (a.table is None) != (b.table is None):
        return False
    if a.quant and b.quant and (a.quant.qmin, a.quant.qmax) != (b.quant.qmin, b.quant.qmax):
        return False
    ra, rb = a.nodes | (a.quant.nodes if a.quant else set()), b.nodes | (b.quant.nodes if b.quant else set())
    return not depends_on_any(b.src, ra) and not depends_on_any(a.src, rb)


# ----------------------------------------------------------------------------- KV-cache write


def find_cache_writes(graph: fx.Graph, ctx: Any, matches: list[RopeMatch]) -> list[CacheWrite]:
    """Every index_put cache write copied back into a graph input. A write that cannot fuse is a
    near miss when it writes a rotated tensor; other graph-input writes are left alone silently."""
    rotated = {mm.out for mm in matches} | {mm.quant.sink for mm in matches if mm.quant is not None}
    out = []
    for node in graph.nodes:
        if not is_op(node, aten.copy_.default):
            continue
        src = node.args[1]
        while is_op(src, aten.alias.default, aten.reshape.default, aten.view.default, aten.view.dtype):
            src = src.args[0]
        if not is_op(src, aten.index_put.default):
            continue
        if depends_on_any(src.args[2], rotated):
            with ctx.candidate(FAMILY, node):
                w = match_cache_write(node)
                if w is not None:
                    out.append(w)
            continue
        try:
            w = match_cache_write(node)
        except Reject:
            w = None
        except Exception:  # noqa: BLE001 - an internal error here only skips this write
            if ctx.strict:
                raise
            w = None
        if w is not None:
            out.append(w)
    return out


def plan_kv(ms: list[RopeMatch], writes: list[CacheWrite], taken: set[int] | None = None) -> KVPlan | None:
    """The k and v cache writes of the pair (q, k) `ms`, checked; None if k is not written to a cache.
    `taken`: ids of writes that are no v write here (written rotated tensors, writes already planned).
    Of several v writes with k's slots (one per layer), the nearest one in node order that keeps
    the graph acyclic is taken."""
    if len(ms) != 2:
        return None
    taken = set() if taken is None else taken

    def written(mm: RopeMatch) -> list[CacheWrite]:
        sink = mm.quant.sink if mm.quant is not None else None
        return [w for w in writes if w.rows is mm.out or (sink is not None and w.rows is sink)]

    if not written(ms[1]) and written(ms[0]):
        ms.reverse()  # equal head counts (MHA): the one written to the cache takes the k slot
    km = ms[1]
    kws = written(km)
    if not kws:
        return None
    if len(kws) > 1:
        raise Reject("k is written to several caches")
    kw = kws[0]
    k_fp8 = kw.rows is not km.out
    xv, kc = tval(km.x), tval(kw.cache)
    if kw.bhsd:  # StaticCache: k as HF holds it, [B, H, T, D]
        if xv.dim() != 4 or km.head != 1 or km.tok != [0, 2]:
            raise Reject("k written to a [B, H, max_len, D] cache is not [B, H, T, D]")
        T, D = xv.shape[2], xv.shape[3]
    elif xv.dim() != 3 or km.head != 1 or km.tok != [0]:
        raise Reject("k is not token-major [tokens, heads, head_dim]")
    else:
        T, H, D = xv.shape
    if k_fp8:
        if km.quant.scheme != QUANT_STATIC or km.quant.via is not None:
            raise Reject("k's fp8 cache rows are not a static per-tensor quant of the rotated k")
        if kc.dtype not in BYTE_DTYPES:
            raise Reject(f"fp8 k rows go to a {kc.dtype} cache")
    elif kc.dtype != tval(km.out).dtype:
        raise Reject(f"k cache dtype {kc.dtype} differs from the rotated k's {tval(km.out).dtype}")
    n = tval(kw.slots).shape[0]
    if not (kw.prefix or (k_fp8 and km.quant.prefix is not None)) and not rows_match(T, n):
        raise Reject("slot count differs from the token count")
    store_kq = km.quant is not None and any(u not in kw.nodes for u in km.quant.sink.users)
    if store_kq and km.quant.prefix is not None:
        raise Reject("the fp8 quant of the first len(slots) tokens of k is also used outside the cache write")
    region = set().union(*(mm.nodes | (mm.quant.nodes if mm.quant else set()) for mm in ms))
    outs = [mm.out for mm in ms] + [mm.quant.sink for mm in ms if mm.quant is not None]
    for o in outs:  # q (or k's norm, cos/sin, scales) computed from the new k cache: the op would read its own output
        if depends_on_any(o, kw.nodes, ordered=True):
            raise Reject(f"{o.name} reads the new contents of cache {kw.cache.name}")
    vws = [w for w in writes if w is not kw and w.slots is kw.slots and id(w) not in taken]
    if not vws:
        raise Reject("k cache write has 0 v cache writes with the same slots, not one")
    here = _order(kw.copy.graph, kw.post[0])
    vws.sort(key=lambda w: abs(_order(w.copy.graph, w.post[0]) - here))
    posts = {p for w in writes for p in w.post}
    first: Reject | None = None
    for vw in vws:
        try:
            v, vq = _check_v(ms, kw, vw, region, outs, D, n, posts)
        except Reject as r:
            first = first or r
            continue
        return KVPlan(k=kw, v=vw, v_src=v, k_fp8=k_fp8, v_quant=vq, store_kq=store_kq)
    if len(vws) == 1:
        raise first
    raise Reject(f"none of the {len(vws)} v cache writes with the same slots fits; the nearest: {first}")


def _check_v(ms: list[RopeMatch], kw: CacheWrite, vw: CacheWrite, region: set[fx.Node], outs: list[fx.Node],
             D: Any, n: Any, posts: set[fx.Node] = frozenset()) -> tuple[fx.Node, Any]:
    """(v rows, v's static fp8 quant or None) of `vw` as the v write of k's write `kw`, checked.
    `posts`: every cache write's index_put result and views (the new contents as written)."""
    if vw.neg_skip != kw.neg_skip:
        raise Reject("k and v cache writes treat negative slots differently")
    if vw.bhsd != kw.bhsd:
        raise Reject("k and v caches have different layouts ([B, H, max_len, D] and [slots, H, D])")
    if vw.cache is kw.cache:
        raise Reject("k and v are written to the same cache")
    v, vq = v_rows(vw)
    if v in posts:  # the op would read that write's index_put itself, which its own fusion reroutes away
        raise Reject(f"v is {v.name}, the new contents of another cache write as written")
    vv, vc = tval(v), tval(vw.cache)
    if kw.bhsd:
        B = tval(ms[1].x).shape[0]
        if vv.dim() != 4 or not statically_known_true(vv.shape[0] == B) or vv.shape[3] != D or not rows_match(vv.shape[2], n):
            raise Reject(f"v is {tuple(vv.shape)}, not [{B}, heads, {n}, {D}]")
    elif vv.dim() != 3 or vv.shape[2] != D or (not vw.prefix and not rows_match(vv.shape[0], n)):
        raise Reject(f"v is {tuple(vv.shape)}, not [{n}, heads, {D}]")
    if vv.dtype not in X_DTYPES or not statically_known_true(vv.stride(-1) == 1):
        raise Reject("v is not a contiguous-head_dim bf16/fp16/fp32 tensor")
    if (vc.dtype in BYTE_DTYPES) != (vq is not None) or (vq is None and vc.dtype != vv.dtype):
        raise Reject(f"v cache dtype {vc.dtype} does not match v's {vv.dtype} (or its fp8 quant)")
    if vq is not None and vq.scale is not None and tval(vq.scale).device != vv.device:
        raise Reject("v scale on another device")
    if not same_device(tval(ms[1].x), tval(kw.cache), vc, vv, tval(kw.slots)):
        raise Reject("caches, slots and k/v are on different devices")
    for x in (v, kw.slots) + ((vq.scale,) if vq is not None and vq.scale is not None else ()):
        if depends_on_any(x, region | kw.nodes, ordered=True):
            raise Reject(f"{x.name} depends on the fused region")
    for o in outs:
        if depends_on_any(o, vw.nodes, ordered=True):
            raise Reject(f"{o.name} reads the new contents of cache {vw.cache.name}")
    return v, vq


# ----------------------------------------------------------------------------- rewrite


def _to4(x: torch.Tensor, head: int, tok: list[int]) -> torch.Tensor:
    """View x as [B, S, H, D] (token dims first, then heads); no copy."""
    n = x.dim()
    perm = tok + ([head] if head >= 0 else []) + [n - 1]
    y = x.permute(perm)
    if head < 0:
        y = y.unsqueeze(-2)
    while y.dim() < 4:
        y = y.unsqueeze(0)
    return y


def _from4(y: torch.Tensor, like_shape: list[Any], head: int, tok: list[int]) -> torch.Tensor:
    """Inverse of _to4 for a contiguous [B, S, H, D] result."""
    n = len(like_shape)
    perm = tok + ([head] if head >= 0 else []) + [n - 1]
    shape = [like_shape[i] for i in perm]
    y = y.reshape(shape)
    inv = [0] * n
    for i, p in enumerate(perm):
        inv[p] = i
    return y.permute(inv)


def _cos_rows(c: torch.Tensor, x: torch.Tensor, head: int, tok: list[int]) -> torch.Tensor:
    """cos broadcast to x's token dims as [M, rot] rows (a view when it is not broadcast)."""
    shape = list(x.shape[:-1]) + [c.shape[-1]]
    if head >= 0:
        shape[head] = 1
    ce = c.expand(shape)
    perm = tok + ([head] if head >= 0 else []) + [x.dim() - 1]
    return ce.permute(perm).reshape(-1, c.shape[-1])


def _order_of(mm: RopeMatch) -> list[int]:
    """Memory order (outermost first) of the [B, S, H] dims of the output the graph expects."""
    use_sink = mm.quant is not None and not mm.need_rope and mm.quant.via is None
    return _dims_order(tval(mm.quant.sink if use_sink else mm.out), mm)


def _scale_order_of(mm: RopeMatch) -> list[int] | None:
    """Memory order of the [B, S, H] dims of the dynamic scale the graph expects (its [..., 1]
    keepdim amax has x's dims): the op then writes it in place, no restride copy."""
    if mm.quant is None or mm.quant.scheme != QUANT_DYNAMIC:
        return None
    return _dims_order(tval(mm.quant.scale_out), mm)


def _dims_order(ov: torch.Tensor, mm: RopeMatch) -> list[int]:
    """Memory order (outermost first) of ov's token and head dims, as the [B, S, H] dims of _to4."""
    import functools

    dims = mm.tok + ([mm.head] if mm.head >= 0 else [])
    st: list[Any] = [ov.stride(i) for i in dims]
    sz: list[Any] = [ov.shape[i] for i in dims]
    if mm.head < 0:
        st.append(ov.shape[-1])  # a virtual one-head dim
        sz.append(1)
    while len(st) < 3:
        st.insert(0, BIG)  # a virtual leading batch dim of size 1
        sz.insert(0, 1)

    def cmp(a: int, b: int) -> int:
        if statically_known_true(sz[a] == 1) or statically_known_true(sz[b] == 1):
            return 0
        if statically_known_true(st[a] > st[b]):
            return -1
        if statically_known_true(st[a] < st[b]):
            return 1
        return 0

    return sorted(range(3), key=functools.cmp_to_key(cmp))


def rewrite(graph: fx.Graph, ms: list[RopeMatch], kv: KVPlan | None = None,
            posts: set[fx.Node] = frozenset()) -> list[fx.Node]:
    """Insert one fused op for 1 or 2 matches (q [, k]) and reroute outputs; with `kv`, the op
    also writes the k/v caches and the graph's final copy_ into each cache reads the op's result.
    `posts`: the graph's cache writes' index_put results and views; an input among them is a near
    miss (a fused write reroutes the readers it found at match time, not the op made here)."""
    from ..kernels import rope_quant as _k  # noqa: F401  (registers torch.ops.fxfuse.rope_quant)

    qm = ms[0]
    km = ms[1] if len(ms) > 1 else None
    out_dtype = tval(qm.out).dtype
    use_table = qm.table is not None
    inputs: list[fx.Node] = [qm.src] + ([km.src] if km else [])
    if use_table:
        inputs += list(qm.table)
    else:
        inputs += [qm.cos, qm.sin]
    scales = [mm.quant.scale for mm in ms if mm.quant is not None and mm.quant.scale is not None]
    inputs += scales
    norms = [mm.norm.weight for mm in ms if mm.norm is not None]
    inputs += norms
    # lifted eps (dynamic=True): read at run time, never baked; one input per side that has one
    eps_nodes = [mm.norm.eps_node if mm is not None and mm.norm is not None else None for mm in (qm, km)]
    inputs += [n for n in eps_nodes if n is not None]
    stale = [n for n in inputs if n in posts]
    if stale:
        raise Reject(f"{stale[0].name}, the new contents of a cache write as written, is an input of the fused op")
    has_qs = qm.quant is not None and qm.quant.scale is not None
    has_ks = km is not None and km.quant is not None and km.quant.scale is not None
    store_kq, has_vs, cparams = True, False, {}
    if kv is not None:
        inside = kv.k.nodes | (km.quant.nodes if km.quant else set())
        km.need_rope = any(u not in inside for u in km.out.users)
        store_kq = kv.store_kq
        vq = kv.v_quant
        has_vs = vq is not None and vq.scale is not None
        inputs += [kv.v_src, kv.k.cache, kv.v.cache, kv.k.slots] + ([vq.scale] if has_vs else [])
        cparams = dict(k_cache_fp8=kv.k_fp8, store_k_fp8=store_kq, v_quant=vq is not None,
                       v_static=vq.static_value if vq else 1.0, v_mul=vq.quant_mul if vq else False,
                       v_qmin=op_bound(vq.qmin) if vq else -448.0, v_qmax=op_bound(vq.qmax) if vq else 448.0, neg_skip=kv.k.neg_skip)
        if kv.k.bhsd:
            cparams["cache_bhsd"] = True

    def qparams(mm: RopeMatch | None, p: str) -> dict[str, Any]:
        qq = mm.quant if mm is not None else None
        ops, consts = op_scale_chain(qq.ops if qq else [], qq.consts if qq else [])
        return {
            f"{p}_quant": qq.scheme if qq else QUANT_NONE,
            f"{p}_static": qq.static_value if qq else 1.0,
            f"{p}_ops": ops,
            f"{p}_consts": consts,
            f"{p}_mul": qq.mul if qq else False,
        }

    bounds = [(mm.quant.qmin, mm.quant.qmax) for mm in ms if mm.quant]
    qmin, qmax = bounds[0] if bounds else (-448.0, 448.0)
    params = dict(
        rot_dim=qm.rot, neox=qm.neox, cos_half=qm.cos_half, out_dtype=out_dtype,
        math_dtype=torch.float32 if qm.f32_math else None,
        **qparams(qm, "q"), **qparams(km, "k"), qmin=op_bound(qmin), qmax=op_bound(qmax),
        need_q_rope=qm.need_rope, need_k_rope=km.need_rope if km else False,
        q_order=_order_of(qm), k_order=_order_of(km) if km else [0, 1, 2],
    )
    for p, mm in (("q", qm), ("k", km)):
        so = _scale_order_of(mm) if mm is not None and (mm is qm or store_kq) else None
        if so is not None:  # a layout the order cannot express still gets the restride copy below
            params[f"{p}_scale_order"] = so
    if qm.norm is not None:
        nm = qm.norm
        k_eps = km.norm.eps if km is not None and km.norm is not None else 1e-6
        params.update(q_eps=1e-6 if nm.eps is None else nm.eps, k_eps=1e-6 if k_eps is None else k_eps,
                      norm_woff=nm.weight_offset, norm_round_before=nm.round_before_weight,
                      norm_wsum_dtype=nm.weight_sum_dtype, norm_dtype=tval(nm.y).dtype)
    shapes = [list(tval(mm.x).shape) for mm in ms]
    sink_shapes = {id(mm): list(tval(mm.quant.sink).shape) for mm in ms if mm.quant is not None}

    # the replacement closes over plain values only (no match objects), so the trace cache can
    # key it and reuse one trace for every layer's identical q/k rotation
    has_k = km is not None
    table_cols = qm.table_cols
    q_view = (qm.x_perm, qm.head, qm.tok)
    k_view = (km.x_perm, km.head, km.tok) if km is not None else None
    has_qw, has_kw = qm.norm is not None, km is not None and km.norm is not None
    has_qe, has_ke = eps_nodes[0] is not None, eps_nodes[1] is not None
    # per output side: (need_rope, has_quant, quant reshaped to its sink's shape or None, dynamic scale, head, tok, shape)
    has_kv, complex_freqs = kv is not None, qm.complex_freqs
    bhsd = kv is not None and kv.k.bhsd
    out_plan = [
        (mm.need_rope, mm.quant is not None and (mm is qm or store_kq),
         sink_shapes[id(mm)] if mm.quant is not None and mm.quant.via is not None else None,
         mm.quant is not None and mm.quant.scheme == QUANT_DYNAMIC, mm.head, mm.tok, shp)
        for mm, shp in zip(ms, shapes)
    ]

    def replacement(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        it = iter(args)
        xq = next(it)
        xk = next(it) if has_k else None
        if use_table:
            ct, st, pos = next(it), next(it), next(it)
            (cc, sc) = table_cols
            c = ct if cc is None else ct[:, cc[0]:cc[1]]
            s = st if sc is None else st[:, sc[0]:sc[1]]
            p = pos.reshape(-1)
        else:
            c0, s0 = next(it), next(it)
        qs = next(it) if has_qs else None
        ks = next(it) if has_ks else None
        qw = next(it) if has_qw else None
        kw = next(it) if has_kw else None
        qe = next(it) if has_qe else None
        ke = next(it) if has_ke else None
        if has_kv:
            v, kc, vc, slots = next(it), next(it), next(it), next(it)
            vs = next(it) if has_vs else None
        if q_view[0] is not None:
            xq = xq.permute(q_view[0])
        if k_view is not None and k_view[0] is not None:
            xk = xk.permute(k_view[0])
        if not use_table:
            if complex_freqs:  # c0 is s0: the complex freqs; the kernel reads its real/imag parts
                c0, s0 = torch.real(c0).contiguous(), torch.imag(c0).contiguous()
            c, s, p = _cos_rows(c0, xq, q_view[1], q_view[2]), _cos_rows(s0, xq, q_view[1], q_view[2]), None
            if complex_freqs:
                c, s = c.contiguous(), s.contiguous()
        q4 = _to4(xq, q_view[1], q_view[2])
        k4 = _to4(xk, k_view[1], k_view[2]) if k_view is not None else None
        sc = (None if qs is None else scalar_on(qs, q4), None if ks is None else scalar_on(ks, q4))
        eps_t = {}
        if qe is not None:
            eps_t["q_eps_tensor"] = scalar_on(qe, q4)
        if ke is not None:
            eps_t["k_eps_tensor"] = scalar_on(ke, q4)
        if not has_kv:
            outs = torch.ops.fxfuse.rope_quant(q4, k4, c, s, p, *sc, **params, q_norm_w=qw, k_norm_w=kw, **eps_t)
        else:
            outs = torch.ops.fxfuse.rope_quant_cache(
                q4, k4, c, s, p, *sc, **params, v=v.permute(0, 2, 1, 3) if bhsd else v.unsqueeze(0), k_cache=kc, v_cache=vc, slots=slots,
                v_scale=None if vs is None else vs.reshape(1), **cparams, q_norm_w=qw, k_norm_w=kw, **eps_t)
        res = []
        for (need_rope, has_quant, sink_shape, dynamic, head, tok, shp), (o, qo, so) in zip(
            out_plan, (outs[0:3], outs[3:6])
        ):
            if need_rope:
                res.append(_from4(o, shp, head, tok))
            if has_quant:
                qx = _from4(qo, shp, head, tok)
                res.append(qx if sink_shape is None else qx.reshape(sink_shape))
                if dynamic:
                    sshape = shp[:-1] + [1]
                    res.append(_from4(so.unsqueeze(-1), sshape, head, tok))
        if has_kv:
            res += [kc, vc]  # the caches as the op left them (functionalized: the op's new values)
        return tuple(res)

    on_cuda = tval(qm.x).device.type == "cuda"
    gm = trace_aten(replacement, [tval(n) for n in inputs], functionalize=on_cuda or kv is not None)
    outs_v = [n.meta.get("val") for n in next(iter(reversed(gm.graph.nodes))).args[0]]
    olds: list[tuple[fx.Node, bool]] = []  # (old node, exact strides required)
    for mm in ms:
        if mm.need_rope:
            olds.append((mm.out, True))
        if mm.quant is not None and (mm is qm or store_kq):
            olds.append((mm.quant.sink, True))
            if mm.quant.scheme == QUANT_DYNAMIC:
                olds.append((mm.quant.scale_out, False))
    for (old, exact), nv in zip(olds, outs_v):
        ov = tval(old)
        if tuple(ov.shape) != tuple(nv.shape) or ov.dtype != nv.dtype:
            raise Reject(f"fused output for {old.name} has shape {tuple(nv.shape)} {nv.dtype}, expected {tuple(ov.shape)} {ov.dtype}")
        if exact and not _same_strides(ov, nv):
            raise Reject(f"fused output layout {nv.stride()} differs from {old.name}'s {ov.stride()}")
    # the readers of the written caches read the op's cache outputs, viewed as they viewed the writes
    reads = [reroute_vals(kv.k, outs_v[-2]), reroute_vals(kv.v, outs_v[-1])] if kv is not None else []
    first = min((n for mm in ms for n in mm.nodes), key=lambda n: _order(graph, n))
    new = inline_graph(graph, gm, inputs, first)
    for (old, _), nn in zip(olds, new):
        ov = tval(old)
        if _is_scale(old, ms) and not _same_strides(ov, tval(nn)):
            nn = _restride(graph, nn, old)
        old.replace_all_uses_with(nn)
    if kv is not None:
        for w, nn, vals in ((kv.k, new[-2], reads[0]), (kv.v, new[-1], reads[1])):
            w.copy.args = (w.cache, nn)
            reroute_reads(graph, w, nn, vals)
    stable_toposort(graph)
    replaced: set[fx.Node] = set() if kv is None else kv.nodes - {kv.k.copy, kv.v.copy}
    for mm in ms:
        replaced |= mm.nodes | (mm.quant.nodes if mm.quant else set())
    return sorted(replaced, key=lambda n: n.name)


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Strides equal wherever they matter (size-1 dims ignored), provably for symbolic sizes."""
    return all(
        statically_known_true(sa == sb)
        for sa, sb, n in zip(a.stride(), b.stride(), a.shape)
        if not statically_known_true(n == 1)
    )


def _is_scale(old: fx.Node, ms: list[RopeMatch]) -> bool:
    return any(mm.quant is not None and mm.quant.scale_out is old for mm in ms)


def _restride(graph: fx.Graph, nn: fx.Node, old: fx.Node) -> fx.Node:
    """Copy a (small) dynamic-scale tensor into the strides the rest of the graph expects."""
    ov = tval(old)

    def fn(t: torch.Tensor) -> torch.Tensor:
        out = torch.empty_strided(ov.shape, ov.stride(), dtype=ov.dtype, device=ov.device)
        return out.copy_(t)

    gm = trace_aten(fn, [tval(nn)], functionalize=True)
    (res,) = inline_graph(graph, gm, [nn], old)
    return res


_ORDER_CACHE: dict[int, dict[fx.Node, int]] = {}


def _order(graph: fx.Graph, n: fx.Node) -> int:
    key = id(graph)
    cache = _ORDER_CACHE.get(key)
    if cache is None or n not in cache:
        cache = {nd: i for i, nd in enumerate(graph.nodes)}
        _ORDER_CACHE[key] = cache
    return cache.get(n, 0)


# ----------------------------------------------------------------------------- pass


class RopeQuant:
    name = FAMILY

    def __call__(self, graph: fx.Graph, ctx: Any) -> None:
        _ORDER_CACHE.pop(id(graph), None)
        gate = ctx.options.get("gate", True)
        matches: list[RopeMatch] = []
        anchors: dict[int, fx.Node] = {}
        for node in list(graph.nodes):
            if looks_like_rope(node):
                matcher = match_rope
            elif looks_like_explicit(node):
                matcher = match_explicit
            elif looks_like_interleaved(node):
                matcher = match_interleaved_hf
            elif looks_like_complex(node):
                matcher = match_complex
            else:
                continue
            with ctx.candidate(FAMILY, node):
                m = matcher(node)
                resolve_layout(m)
                norm_miss = absorb_norm(m)
                if norm_miss:
                    ctx.near_miss(FAMILY, node, norm_miss)
                try:
                    match_quant(m)
                except Reject as r:  # the RoPE still fuses; the quant stays with Inductor
                    m.quant, m.need_rope = None, True
                    m.quant_miss = (_fp8_sinks(m.out)[0], f"fp8 quant after RoPE not fused: {r}")
                check(m)
                matches.append(m)
                anchors[id(m)] = node
        # pair q and k that share cos/sin: the one with more heads first
        groups: list[list[RopeMatch]] = []
        used: set[int] = set()
        for i, a in enumerate(matches):
            if id(a) in used:
                continue
            used.add(id(a))
            grp = [a]
            for b in matches[i + 1:]:
                if id(b) not in used and can_pair(a, b):
                    grp.append(b)
                    used.add(id(b))
                    break
            groups.append(grp)
        writes = find_cache_writes(graph, ctx, matches) if groups else []
        rotated = {mm.out for mm in matches} | {mm.quant.sink for mm in matches if mm.quant is not None}
        taken = {id(w) for w in writes if w.rows in rotated}  # k writes (of any region) are no v writes
        posts = {p for w in writes for p in w.post}
        for grp in groups:
            def heads(mm: RopeMatch) -> Any:
                return tval(mm.x).shape[mm.head] if mm.head >= 0 else 1
            grp.sort(key=lambda mm: -heads(mm) if isinstance(heads(mm), int) else 0)
            with ctx.candidate(FAMILY, anchors[id(grp[0])]):
                xv = tval(grp[0].x)
                cuda = xv.device.type == "cuda"
                scalars = region_scalars(grp)
                kv = None
                try:
                    kv = plan_kv(grp, writes, taken)
                    if kv is not None and cuda:
                        why = gate_rejects(scheme_name(grp) + KV_SUFFIX, xv, scalars, tokens(grp[0]), gate)
                        if why:
                            raise Reject(why)
                except Reject as r:  # the RoPE still fuses; the cache write stays with Inductor
                    ctx.near_miss(FAMILY, anchors[id(grp[0])], f"KV-cache write not fused: {r}")
                    kv = None
                for mm in grp:
                    if mm.quant is not None and mm.quant.prefix is not None and (
                            kv is None or mm is not grp[-1] or not kv.k_fp8):
                        mm.quant_miss = (mm.quant.sink, "fp8 quant after RoPE not fused: it reads the first "
                                         "len(slots) tokens only, fused only as the rows of a KV-cache write")
                        mm.quant, mm.need_rope = None, True
                if cuda and kv is None:
                    why = gate_rejects(scheme_name(grp), xv, scalars, tokens(grp[0]), gate)
                    if why:
                        raise Reject(why)
                replaced = rewrite(graph, grp, kv, posts)
                if kv is not None:
                    taken.add(id(kv.v))
                kernel = ("triton:fxfuse_rope_quant" if cuda else
                          "fxfuse::rope_quant_cache_ref" if kv is not None else "fxfuse::rope_quant")
                detail = " + ".join(
                    f"{'qk'[i]}[{heads(mm)}x{tval(mm.x).shape[-1]}] {QUANT_NAMES[mm.quant.scheme if mm.quant else 0]}"
                    for i, mm in enumerate(grp)
                ) + (f" rot={grp[0].rot}" if grp[0].rot != xv.shape[-1] else "") + (" +table" if grp[0].table else "") + (
                    " +qk_norm" if grp[0].norm is not None else "") + (
                    "" if kv is None else f" +kv_cache{' fp8' if kv.k_fp8 else ''}{' skip<0' if kv.k.neg_skip else ''}")
                ctx.applied(FAMILY, replaced, kernel, detail)
                for mm in grp:
                    if mm.quant_miss is not None:
                        ctx.near_miss(FAMILY, *mm.quant_miss)
        _ORDER_CACHE.pop(id(graph), None)


PASS = RopeQuant()
