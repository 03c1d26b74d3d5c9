"""Built-in unwrap decompositions for the common serving-stack custom-op schemas (vLLM's `_C`).

Each is written from the op's public semantics, against its schema: it mutates the mutable
arguments in place exactly as the kernel does and returns nothing. The ATen forms are the ones
the fusion passes recognize (HF RMSNorm that rounds to the input dtype before the weight; quant
as divide -> clamp -> convert; per-token scale as amax/448 clamped to vLLM's minimum scale), so an
unwrapped RMSNorm followed by an unwrapped quant fuses into one kernel.

A decomposition is registered only when an op of that name *and* schema exists in the process
(checked lazily on every compile, so a library loaded after `import fxfuse` is still picked up),
and never over a user's own `register_unwrap` for the same op.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .._log import log

T, TW, OT, OTW = "Tensor", "Tensor!", "Optional[Tensor]", "Optional[Tensor]!"


def _fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """vLLM RMSNorm: variance in fp32, round to the input dtype, then scale by the weight."""
    xf = x.float()
    var = xf.pow(2).mean(-1, keepdim=True)
    return (xf * torch.rsqrt(var + eps)).to(x.dtype) * weight


def _quant(x: torch.Tensor, scale: torch.Tensor, qdtype: torch.dtype) -> torch.Tensor:
    fmax = _fp8_max(qdtype)
    return (x.float() / scale).clamp(-fmax, fmax).to(qdtype)


def rms_norm(out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, epsilon: float) -> None:
    """_C::rms_norm(Tensor! result, Tensor input, Tensor weight, float epsilon) -> ()"""
    out.copy_(_rms(input, weight, epsilon))


def fused_add_rms_norm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float) -> None:
    """_C::fused_add_rms_norm: residual <- input + residual (input dtype); input <- rms_norm(that)."""
    h = input + residual
    input.copy_(_rms(h, weight, epsilon))
    residual.copy_(h)


def static_scaled_fp8_quant(out: torch.Tensor, input: torch.Tensor, scale: torch.Tensor) -> None:
    """_C::static_scaled_fp8_quant: out <- clamp(input / scale) in fp8; scale is one fp32 element."""
    out.copy_(_quant(input, scale, out.dtype))


def dynamic_scaled_fp8_quant(out: torch.Tensor, input: torch.Tensor, scale: torch.Tensor) -> None:
    """_C::dynamic_scaled_fp8_quant (per tensor): scale <- amax(|input|) / fp8_max; out <- quant."""
    s = (input.abs().amax().float() / _fp8_max(out.dtype)).reshape(scale.shape)
    scale.copy_(s)
    out.copy_(_quant(input, s, out.dtype))


def dynamic_per_token_scaled_fp8_quant(
    out: torch.Tensor, input: torch.Tensor, scales: torch.Tensor, scale_ub: torch.Tensor | None
) -> None:
    """_C::dynamic_per_token_scaled_fp8_quant: per row s = max(min(amax, ub) / fp8_max, 1/(fp8_max*512))."""
    fmax = _fp8_max(out.dtype)
    amax = input.abs().amax(-1, keepdim=True).float()
    if scale_ub is not None:
        amax = torch.minimum(amax, scale_ub.float())  # vLLM clamps the row max, before dividing
    s = (amax / fmax).clamp_min(1.0 / (fmax * 512.0))
    scales.copy_(s.reshape(scales.shape))
    out.copy_(_quant(input, s, out.dtype))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_tok: Any, head_size: int, is_neox: bool) -> torch.Tensor:
    shape = x.shape
    x = x.reshape(n_tok, -1, head_size)
    rot = cos.shape[-1] * 2
    cos = cos.unsqueeze(-2).to(x.dtype)
    sin = sin.unsqueeze(-2).to(x.dtype)
    xr = x[..., :rot]
    if is_neox:
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2 :]
    else:
        x1, x2 = xr[..., ::2], xr[..., 1::2]
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    o = torch.cat((o1, o2), dim=-1) if is_neox else torch.stack((o1, o2), dim=-1).flatten(-2)
    if rot != head_size:
        o = torch.cat((o, x[..., rot:]), dim=-1)
    return o.reshape(shape)


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> None:
    """_C::rotary_embedding: rotate the first rot_dim dims of each head of query/key in place.

    cos_sin_cache is [max_position, rot_dim] with cos in the first half; neox style rotates the
    two halves, GPT-J style rotates interleaved pairs.
    """
    pos = positions.flatten()
    n_tok = pos.shape[0]
    cos, sin = cos_sin_cache.index_select(0, pos).chunk(2, dim=-1)
    query.copy_(_rope(query, cos, sin, n_tok, head_size, is_neox))
    if key is not None:
        key.copy_(_rope(key, cos, sin, n_tok, head_size, is_neox))


def _cache_write(cache: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, kv_cache_dtype: str, scale: torch.Tensor) -> None:
    """Write token rows of x into cache rows `slots` (flat view of [blocks, block_size, H, D]).

    A negative slot (padding) writes nothing. Without data-dependent shapes that is done by
    pointing padded rows at the first valid token's slot *with that token's value* (duplicate
    writes of one value are deterministic), or, when no token is valid, at row 0 with row 0's
    own old value. fp8 caches (kv_cache_dtype "fp8"/"fp8_e4m3", stored as fp8 or uint8) hold
    saturate(x / scale) in e4m3.
    """
    H, D = cache.shape[-2], cache.shape[-1]
    flat = cache.view(-1, H, D)
    n = slots.shape[0]
    x = x.reshape(-1, H, D)[:n]
    if kv_cache_dtype == "auto":
        val = x.to(cache.dtype)
    elif kv_cache_dtype in ("fp8", "fp8_e4m3") and cache.dtype in (torch.uint8, torch.float8_e4m3fn):
        q = (x.float() / scale.float().reshape(())).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        val = q.view(torch.uint8)
        if cache.dtype == torch.float8_e4m3fn:
            flat = flat.view(torch.uint8)
    else:
        raise NotImplementedError(f"kv_cache_dtype {kv_cache_dtype!r} with a {cache.dtype} cache")
    valid = slots >= 0
    any_valid = valid.any()
    first = valid.to(torch.int32).argmax().reshape(1)  # a tensor index: no data-dependent int
    rows = torch.arange(n, device=slots.device)
    src = torch.where(valid, rows, torch.where(any_valid, first, n))  # row n = "keep row 0 as is"
    idx = torch.where(valid, slots, torch.where(any_valid, slots.index_select(0, first), 0))
    vals = torch.cat((val, flat[:1]), dim=0)[src]
    flat.index_put_((idx.long(),), vals)


def reshape_and_cache_flash(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
) -> None:
    """_C_cache_ops::reshape_and_cache_flash: key/value [T, H, D] rows into caches
    [num_blocks, block_size, H, D] at slot = block * block_size + offset; slot < 0 is skipped."""
    _cache_write(key_cache, key, slot_mapping, kv_cache_dtype, k_scale)
    _cache_write(value_cache, value, slot_mapping, kv_cache_dtype, v_scale)


def silu_and_mul(out: torch.Tensor, input: torch.Tensor) -> None:
    """_C::silu_and_mul: out <- silu(input[..., :d]) * input[..., d:], d = last dim / 2."""
    d = input.shape[-1] // 2
    out.copy_(F.silu(input[..., :d]) * input[..., d:])


def topk_softmax(
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    token_expert_indices: torch.Tensor,
    gating_output: torch.Tensor,
    renormalize: bool,
) -> None:
    """_moe_C::topk_softmax: fp32 softmax over experts, top-k (weights, ids), optional renormalize;
    token_expert_indices[t, j] = j * num_tokens + t (the kernel's source-row index)."""
    k = topk_weights.shape[-1]
    probs = torch.softmax(gating_output.float(), dim=-1)
    w, ids = torch.topk(probs, k, dim=-1)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    m = gating_output.shape[0]
    rows = torch.arange(m, device=gating_output.device, dtype=torch.int64).unsqueeze(-1)
    cols = torch.arange(k, device=gating_output.device, dtype=torch.int64).unsqueeze(0)
    topk_weights.copy_(w)
    topk_ids.copy_(ids)
    token_expert_indices.copy_(cols * m + rows)


# (namespace, op name, positional (type, mutable) signature, decomposition)
Spec = tuple[str, str, Sequence[str], Callable[..., None]]
BUILTINS: list[Spec] = [
    ("_C", "rms_norm", (TW, T, T, "float"), rms_norm),
    ("_C", "fused_add_rms_norm", (TW, TW, T, "float"), fused_add_rms_norm),
    ("_C", "static_scaled_fp8_quant", (TW, T, T), static_scaled_fp8_quant),
    ("_C", "dynamic_scaled_fp8_quant", (TW, T, TW), dynamic_scaled_fp8_quant),
    ("_C", "dynamic_per_token_scaled_fp8_quant", (TW, T, TW, OT), dynamic_per_token_scaled_fp8_quant),
    ("_C", "rotary_embedding", (T, TW, OTW, "int", T, "bool"), rotary_embedding),
    ("_C", "silu_and_mul", (TW, T), silu_and_mul),
    ("_moe_C", "topk_softmax", (TW, TW, TW, T, "bool"), topk_softmax),
    ("_C_cache_ops", "reshape_and_cache_flash", (T, T, TW, TW, T, "str", T, T), reshape_and_cache_flash),
]

_registered: dict[str, Callable[..., None]] = {}  # qualified overload name -> builtin we put there


def _signature(schema: Any) -> tuple[str, ...]:
    out = []
    for a in schema.arguments:
        w = a.alias_info is not None and a.alias_info.is_write
        out.append(str(a.type) + ("!" if w else ""))
    return tuple(out)


def register_builtins(namespaces: Mapping[str, str] | None = None) -> list[str]:
    """Register each built-in whose op exists with the expected schema; returns the op names added.

    `namespaces` maps the built-in namespaces ('_C', '_moe_C') to where the ops live (tests use a
    test namespace with the same schemas). Cheap enough to call on every compile.
    """
    from .unwrap import _REGISTRY

    added: list[str] = []
    for ns, name, sig, fn in BUILTINS:
        qual = f"{(namespaces or {}).get(ns, ns)}::{name}"
        if qual in _registered and _REGISTRY.get(_registered_key(qual)) is _registered[qual]:
            continue
        try:
            schemas = torch._C._jit_get_schemas_for_operator(qual)
        except Exception:  # noqa: BLE001 - no such op
            schemas = []
        for schema in schemas:
            if _signature(schema) != tuple(sig) or schema.returns:
                log.debug("fxfuse unwrap: %s exists but its schema %s is not the built-in one; not registered", qual, schema)
                continue
            key = f"{qual}.{schema.overload_name or 'default'}"
            if key in _REGISTRY or qual in _REGISTRY:
                break  # the user registered their own
            _REGISTRY[key] = fn
            _registered[qual] = fn
            _registered_keys[qual] = key
            added.append(key)
            log.debug("fxfuse unwrap: built-in decomposition registered for %s", key)
            break
    return added


_registered_keys: dict[str, str] = {}


def _registered_key(qual: str) -> str:
    return _registered_keys.get(qual, qual)
