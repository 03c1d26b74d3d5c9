"""Tests for fxfuse.kernels.silu_mul_quant.

* the Triton kernel under TRITON_INTERPRET=1 on CPU, in ONE subprocess (the env var must be set
  before triton.jit decorates anything); each case runs into poisoned buffers twice with
  different poison values (unwritten elements show up) and is compared with the reference;
* @pytest.mark.gpu: the launcher vs the reference at large shapes, and torch.compile of the
  written ops putting the Triton kernel (not a Python fallback) into Inductor's output code.

``python tests/test_kernel_silu_mul_quant.py --interp-json`` prints the interpreter metrics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fxfuse.kernels import silu_mul_quant as K  # noqa: E402
from fxfuse.kernels.quant_common import SCALE_CLAMP_MAX, SCALE_CLAMP_MIN, SCALE_DIV, SCALE_MUL, SCALE_RECIP  # noqa: E402
from kernel_checks import assert_full_signatures  # noqa: E402

FP8, I8 = torch.float8_e4m3fn, torch.int8
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32

TOKEN = dict(scheme=1, gs=0, ops=[SCALE_DIV, SCALE_CLAMP_MIN], consts=[448.0, 1e-12], qd=FP8, qmin=-448.0, qmax=448.0)
GROUP = dict(scheme=2, ops=[SCALE_DIV, SCALE_CLAMP_MIN], consts=[448.0, 1e-10], qd=FP8, qmin=-448.0, qmax=448.0)
STATIC_I8 = dict(scheme=0, gs=0, ops=[], consts=[], qd=I8, qmin=-128.0, qmax=127.0, rint=True, scale_t=True)
TOKEN_I8 = dict(scheme=1, gs=0, ops=[SCALE_CLAMP_MIN, SCALE_DIV], consts=[1e-12, 127.0], qd=I8, qmin=-128.0,
                qmax=127.0, rint=True)
# torchao row-wise: s = 448 / clamp(amax); q = y * s; scale out = 1 / s
TORCHAO = dict(scheme=1, gs=0, ops=[SCALE_CLAMP_MIN, 2, SCALE_RECIP], consts=[1e-12, 448.0, 0.0], qd=FP8,
               qmin=-448.0, qmax=448.0)


def _case(cid: str, *, dtype: torch.dtype, M: int, inter: int, act: int = K.ACT_SILU, merged: bool = False,
          act_dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None, **q: Any) -> dict[str, Any]:
    base = dict(gs=64, rint=False, scale_t=False, ssv=0.05, qmul=False, ub=None, ub_slot=-1)
    base.update(q)
    return dict(id=cid, dtype=dtype, M=M, inter=inter, act=act, merged=merged,
                act_dtype=act_dtype or dtype, out_dtype=out_dtype or dtype, **base)


INTERP_CASES = [
    _case("tok_bf16", dtype=BF16, M=5, inter=192, **TOKEN),
    _case("tok_bf16_merged", dtype=BF16, M=4, inter=256, merged=True, **TOKEN),
    _case("tok_f16_gelu", dtype=F16, M=3, inter=160, act=K.ACT_GELU_TANH, **TOKEN),
    _case("grp64_bf16_merged", dtype=BF16, M=3, inter=192, merged=True, **{**GROUP, "gs": 64}),
    _case("grp128_f16", dtype=F16, M=2, inter=384, **{**GROUP, "gs": 128}),
    _case("static_int8_f32", dtype=F32, M=4, inter=96, **STATIC_I8),
    _case("tok_int8_bf16_gelu_merged", dtype=BF16, M=3, inter=128, act=K.ACT_GELU_TANH, merged=True, **TOKEN_I8),
    _case("torchao_bf16_f32act", dtype=BF16, M=3, inter=128, act_dtype=F32, **TORCHAO, qmul=True),
    # vLLM per-token with scale_ub: min(amax, ub) / 448, clamped to 1 / (448 * 512)
    _case("tok_scale_ub_bf16", dtype=BF16, M=4, inter=128, scheme=1, gs=0, ops=[SCALE_CLAMP_MAX, SCALE_DIV, SCALE_CLAMP_MIN],
          consts=[0.0, 448.0, 1.0 / (448.0 * 512.0)], qd=FP8, qmin=-448.0, qmax=448.0, ub=2.0, ub_slot=0),
    # dynamic=True: `amax / self.fp8_max` with the lifted float read from a tensor (slot const unused)
    _case("tok_runtime_div_bf16", dtype=BF16, M=3, inter=128, scheme=1, gs=0, ops=[SCALE_DIV, SCALE_CLAMP_MIN],
          consts=[0.0, 1e-12], qd=FP8, qmin=-448.0, qmax=448.0, ub=100.0, ub_slot=0),
    _case("static_literal_fp8", dtype=BF16, M=2, inter=64, scheme=0, gs=0, ops=[SCALE_MUL], consts=[2.0], qd=FP8,
          qmin=-448.0, qmax=448.0),
    # small static M, rows wider than K.SPLIT_CHUNK: column-split launches (last chunk partial)
    _case("split_static_fp8", dtype=BF16, M=2, inter=2304, scheme=0, gs=0, ops=[], consts=[], qd=FP8,
          qmin=-448.0, qmax=448.0, scale_t=True),
    _case("split_grp128_merged", dtype=BF16, M=1, inter=2304, merged=True, **{**GROUP, "gs": 128}),
    # width not a multiple of SPLIT_CHUNK: the last chunk holds 1 of its 16 groups (the rest masked)
    _case("split_grp64_merged_1088", dtype=BF16, M=2, inter=1088, merged=True, **{**GROUP, "gs": 64}),
    # SPLIT_MAX_M: 64 rows split, 65 do not (int8 static, odd width)
    _case("split_static_int8_m64", dtype=F16, M=64, inter=1100, **STATIC_I8),
    _case("nosplit_static_int8_m65", dtype=F16, M=65, inter=1100, **STATIC_I8),
]
# ROWS token rows per program (launch_config override), M = 7 not a multiple of ROWS (masked tail
# rows), each scheme: per-token fp8 / int8 / scale_ub, per-group 64 (padded groups) / 128, static
ROWS_BASE = ["tok_bf16", "tok_bf16_merged", "tok_int8_bf16_gelu_merged", "tok_scale_ub_bf16", "grp64_bf16_merged",
             "grp128_f16", "static_int8_f32", "static_literal_fp8"]
ROWS_CASES = [dict(next(c for c in INTERP_CASES if c["id"] == b), id=f"{b}_rows{r}", M=7, rows=r)
              for b in ROWS_BASE for r in (1, 2, 4)]
ROWS_CASES.append(dict(INTERP_CASES[0], id="tok_bf16_rows8_m3", M=3, rows=8))  # one program, 5 rows masked
# FLAT (unpadded chunks numbered across rows, tail chunks masked in the last program): per-group
# 3 x 64 / 3 x 128 groups a row, static 3 x 128 (int8, tensor scale) and 5 x 64 (fp8) chunks a row
FLAT_BASE = {"grp64_bf16_merged": 192, "grp128_f16": 384, "static_int8_f32": 384, "static_literal_fp8": 320}
ROWS_CASES += [dict(next(c for c in INTERP_CASES if c["id"] == b), id=f"{b}_flat_rows{r}", M=7, inter=i, rows=r,
                    flat=1) for b, i in FLAT_BASE.items() for r in (1, 2, 4)]
# CHUNK (per-token row loop: amax pass, then quant pass), widths not a multiple of the chunk
CHUNK_BASE = {"tok_bf16": 200, "tok_int8_bf16_gelu_merged": 136, "tok_scale_ub_bf16": 130, "tok_runtime_div_bf16": 96,
              "torchao_bf16_f32act": 160}
ROWS_CASES += [dict(next(c for c in INTERP_CASES if c["id"] == b), id=f"{b}_chunk{ch}", inter=i, rows=1, chunk=ch)
               for b, i in CHUNK_BASE.items() for ch in (32, 64)]
# PIECES (one row per program as I's power-of-2 pieces, row_pieces): 2, 3 and 4 exact pieces, a
# narrow exact piece (200 = 128 + 64 + 8), a masked tail (248 = 128 + 64 + 32 + 24 -> 32; 1100 =
# 1024 + 64 + 12 -> 16; per-group 16: 496 = 256 + 128 + 64 + 48 -> 64), each scheme, fp8 and int8
PIECES_BASE = {"tok_bf16": 48, "tok_bf16_merged": 112, "tok_f16_gelu": 240, "tok_int8_bf16_gelu_merged": 200,
               "tok_scale_ub_bf16": 248, "tok_runtime_div_bf16": 1100, "torchao_bf16_f32act": 96,
               "grp64_bf16_merged": 960, "grp128_f16": 384, "static_int8_f32": 96, "static_literal_fp8": 80}
_BY_ID = {c["id"]: c for c in INTERP_CASES}
ROWS_CASES += [dict(_BY_ID[b], id=f"{b}_pieces{i}", M=7, inter=i, rows=1, pieces=1) for b, i in PIECES_BASE.items()]
ROWS_CASES.append(dict(_BY_ID["grp64_bf16_merged"], id="grp16_bf16_merged_pieces496", M=7, inter=496, gs=16, rows=1,
                       pieces=1))
# special rows (make_inputs): a NaN gate element in the row's last piece, an all-zero row, an inf up
# element; through the one-row, row-loop and PIECES launches alike (NaN rows fp8 only: NaN -> int8
# is undefined)
SPECIAL = [("tok_bf16", 112, {}), ("tok_bf16", 112, dict(rows=1, chunk=32)), ("tok_bf16", 112, dict(rows=1, pieces=1)),
           ("tok_f16_gelu", 240, {}), ("tok_f16_gelu", 240, dict(rows=1, pieces=1)),
           ("torchao_bf16_f32act", 96, dict(rows=1, pieces=1)), ("grp64_bf16_merged", 960, dict(rows=1, pieces=1)),
           ("tok_scale_ub_bf16", 248, dict(rows=1, pieces=1))]
ROWS_CASES += [dict(_BY_ID[b], id=f"{b}_special{i}_" + ("_".join(f"{k}{v}" for k, v in o.items()) or "default"),
                    M=5, inter=i, special=("nan", "zero", "inf"), **o) for b, i, o in SPECIAL]
ROWS_CASES += [dict(_BY_ID["tok_int8_bf16_gelu_merged"], id=f"tok_int8_zero_row200_{k}", M=4, inter=200,
                    special=("zero",), **o) for k, o in (("default", {}), ("pieces", dict(rows=1, pieces=1)))]
ALL_CASES = INTERP_CASES + ROWS_CASES


def make_inputs(case: dict[str, Any], device: str = "cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    M, inter = case["M"], case["inter"]
    x = (3 * torch.randn(M, 2 * inter, generator=g)).to(case["dtype"])
    special = case.get("special", ())
    if "nan" in special:  # row 0: one NaN gate element, in the row's last piece
        x[0, inter - 1] = float("nan")
    if "zero" in special:  # row 1: all zero (amax 0: the scale chain's clamp)
        x[1] = 0
    if "inf" in special:  # row 2: an inf up element (amax inf)
        x[2, inter] = float("inf")
    x = x.to(device)
    if case["merged"]:
        gate_up = (x, None)
    else:
        gate_up = (x[:, :inter].contiguous(), x[:, inter:].contiguous())
    scale = torch.tensor([0.04], device=device) if case["scale_t"] else None
    return (*gate_up, scale)


def op_args(case: dict[str, Any], device: str = "cpu", seed: int = 0) -> tuple:
    return (*make_inputs(case, device, seed), case["act"], case["act_dtype"], case["out_dtype"], case["qd"],
            case["scheme"], case["gs"], case["ssv"], case["ops"], case["consts"], case["qmul"], case["qmin"],
            case["qmax"], case["rint"],
            None if case["ub"] is None else torch.tensor([case["ub"]], device=device), case["ub_slot"])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == FP8 else t


def compare(case: dict[str, Any], run, device: str = "cpu", seed: int = 0) -> dict[str, float]:
    """Run `run(args, out)` twice into differently poisoned buffers; metrics vs the reference."""
    args = op_args(case, device, seed)
    qr, sr = K.silu_mul_quant_reference(*args)
    outs = []
    for poison in (0.5, -3.0):
        q = torch.full(qr.shape, poison, device=device).to(qr.dtype)
        s = torch.full(sr.shape, poison, device=device)
        outs.append(run(args, (q, s)))
    (q1, s1), (q2, s2) = outs
    # NaN matches NaN (NaN rows: the payload and, for fp8 q, the sign of torch's NaN are not specified;
    # the two kernel runs must still agree bit for bit)
    rel = torch.where((s1 == sr) | (s1.isnan() & sr.isnan()), 0.0, (s1 - sr).abs() / sr.abs())  # inf == inf
    qf, qrf = q1.float(), qr.float()
    return dict(
        stable=float(torch.equal(_bits(q1), _bits(q2)) and torch.equal(s1.view(torch.int32), s2.view(torch.int32))),
        scale_rel=float(rel.max()),
        scale_off_frac=float((rel > 2e-6).float().mean()),
        q_mismatch=float(((qf != qrf) & ~(qf.isnan() & qrf.isnan())).float().mean()),
    )


def _cfg(case: dict[str, Any]) -> dict[str, int] | None:
    """The case's launch override: ROWS rows per program (None: launch_config's default)."""
    if "rows" not in case:
        return None
    return {"ROWS": case["rows"], "FLAT": case.get("flat", 0), "CHUNK": case.get("chunk", 0),
            "PIECES": case.get("pieces", 0)}


def _interp_main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    res = {c["id"]: compare(c, lambda a, out, c=c: K.silu_mul_quant_triton(*a, out=out, config=_cfg(c)))
           for c in ALL_CASES}
    print(json.dumps(res))


@pytest.fixture(scope="module")
def interp_results() -> dict[str, Any]:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--interp-json"], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"interpreter subprocess failed rc={proc.returncode}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cid", [c["id"] for c in ALL_CASES])
def test_interp_kernel(interp_results: dict[str, Any], cid: str) -> None:
    m = interp_results[cid]
    assert m["stable"] == 1.0, "kernel left output elements unwritten"
    assert m["scale_rel"] <= 1e-6, m
    assert m["q_mismatch"] == 0.0, m


def test_split_cases_take_the_launch_they_name() -> None:
    """The interpreter's split_* cases run the column-split launch, nosplit_* the row-per-program one."""
    for c in INTERP_CASES:
        split = K.column_split(c["M"], c["inter"], c["scheme"], c["gs"])
        if c["id"].startswith(("split_", "nosplit_")):
            assert split == c["id"].startswith("split_"), c["id"]
    assert not K.column_split(1, 4096, 2, 2048)  # groups wider than a chunk do not split


def test_launch_config() -> None:
    """Defaults are one row per program at default_num_warps; overrides stack; M only splits when
    it is a static int (a symbolic M never picks a config); split launches refuse ROWS > 1."""
    want = dict(ROWS=1, num_warps=K.default_num_warps(1024), FLAT=0, CHUNK=0, PIECES=0, split=False)
    assert K.launch_config(768, 1, 0, 4096) == {**want, **K.TUNED.get((1, 1024), {})}
    assert K.launch_config(768, 2, 128, None) == K.launch_config(768, 2, 128, 4096)
    assert K.launch_config(14336, 0, 0, 1)["split"] and not K.launch_config(14336, 0, 0, object())["split"]
    assert K.launch_config(768, 1, 0, 8, {"ROWS": 4, "num_warps": 2}) == dict(ROWS=4, num_warps=2, FLAT=0, CHUNK=0,
                                                                              PIECES=0, split=False)
    K.LAUNCH_OVERRIDE["ROWS"] = 2
    try:
        assert K.launch_config(768, 1, 0, 8)["ROWS"] == 2
        assert K.launch_config(768, 1, 0, 8, {"ROWS": 8})["ROWS"] == 8
    finally:
        K.LAUNCH_OVERRIDE.clear()
    for bad in ({"ROWS": 3}, {"num_warps": 6}, {"ROWS": 0}, {"ROWS": 128}):  # 128 x 1024 > MAX_TILE
        with pytest.raises(ValueError):
            K.launch_config(768, 1, 0, 4096, bad)
    with pytest.raises(ValueError, match="column-split"):
        K.launch_config(14336, 0, 0, 1, {"ROWS": 4})
    assert [K.flat_chunk(i, 0, 0) for i in (768, 14336, 18432, 2048, 1100)] == [256, 2048, 2048, 2048, None]
    assert K.flat_chunk(768, 2, 128) == 128 and K.flat_chunk(768, 1, 0) is None
    for inter, scheme, gs, M in ((768, 1, 0, 4096), (1100, 0, 0, 4096), (14336, 0, 0, 1)):  # per-token, 4 | I, split
        with pytest.raises(ValueError, match="FLAT"):
            K.launch_config(inter, scheme, gs, M, {"FLAT": 1})


def test_launch_config_chunk_and_tuned_entries() -> None:
    """The per-token row loop takes a power-of-2 CHUNK and nothing else (ROWS, FLAT, other
    schemes); a TUNED entry that does not fit the exact row (FLAT with no power-of-2 divisor of I,
    a row loop for another scheme) is skipped, not an error."""
    assert K.launch_config(18432, 1, 0, 4096, {"CHUNK": 2048})["CHUNK"] == 2048
    for bad in ({"CHUNK": 1000}, {"CHUNK": 64, "ROWS": 2}):
        with pytest.raises(ValueError, match="CHUNK"):
            K.launch_config(18432, 1, 0, 4096, bad)
    with pytest.raises(ValueError, match="CHUNK"):
        K.launch_config(18432, 2, 128, 4096, {"CHUNK": 64})
    saved = dict(K.TUNED)
    try:
        K.TUNED[(0, 2048)] = {"FLAT": 1, "ROWS": 2, "num_warps": 4}
        K.TUNED[(2, 32768)] = {"CHUNK": 2048, "num_warps": 8}
        assert K.launch_config(1100, 0, 0, 4096)["FLAT"] == 0  # 1100 = 4 x 275: no FLAT chunk
        assert K.launch_config(1536, 0, 0, 4096)["FLAT"] == 1
        assert K.launch_config(18432, 2, 128, 4096)["CHUNK"] == 0
    finally:
        K.TUNED.clear()
        K.TUNED.update(saved)


def test_row_pieces() -> None:
    """I's binary representation, largest first; past MAX_PIECES - 1 exact pieces (or below
    MIN_PIECE) the rest is one power-of-2 tail piece, masked (its index returned)."""
    assert K.row_pieces(18432) == ([16384, 2048], -1)
    assert K.row_pieces(14336) == ([8192, 4096, 2048], -1)
    assert K.row_pieces(768) == ([512, 256], -1)
    assert K.row_pieces(11008) == ([8192, 2048, 512, 256], -1)
    assert K.row_pieces(4096) == ([4096], -1)
    assert K.row_pieces(29568) == ([16384, 8192, 4096, 1024], 3)  # 29568 = ... + 896
    assert K.row_pieces(1100) == ([1024, 64, 16], 2)  # 12 < MIN_PIECE
    assert K.row_pieces(200) == ([128, 64, 8], -1)  # a narrow power-of-2 rest stays exact
    for inter in range(1, 3000):
        widths, tail = K.row_pieces(inter)
        assert len(widths) <= K.MAX_PIECES and all(w & (w - 1) == 0 for w in widths), inter
        assert widths == sorted(widths, reverse=True) or tail == len(widths) - 1, inter
        exact = sum(widths[:tail] if tail >= 0 else widths)
        assert (sum(widths) == inter) if tail < 0 else (exact < inter < exact + widths[tail]), inter
        off = 0
        for w in widths:  # every piece starts at a multiple of its width (aligned vector accesses)
            assert off % w == 0, inter
            off += w


def test_launch_config_pieces() -> None:
    """PIECES takes one row per program, any scheme, and no other layout (ROWS > 1, FLAT, CHUNK, a
    column split raise); an override naming it replaces a TUNED layout (the per-token row loop)
    without naming "CHUNK": 0; the kernel gets the piece widths as constexprs."""
    cfg = K.launch_config(18432, 1, 0, 4096, {"PIECES": 1, "num_warps": 16})
    assert cfg == dict(ROWS=1, num_warps=16, FLAT=0, CHUNK=0, PIECES=1, split=False), cfg
    assert K.launch_config(18432, 2, 128, 4096, {"PIECES": 1})["PIECES"] == 1
    assert K.launch_config(768, 0, 0, 4096, {"PIECES": 1, "ROWS": 1})["FLAT"] == 0  # over TUNED static FLAT
    for bad in ({"PIECES": 1, "ROWS": 2}, {"PIECES": 1, "CHUNK": 64}, {"PIECES": 1, "FLAT": 1, "ROWS": 1}):
        with pytest.raises(ValueError, match="PIECES|CHUNK"):
            K.launch_config(18432, 1, 0, 4096, bad)
    with pytest.raises(ValueError, match="PIECES"):
        K.launch_config(14336, 0, 0, 1, {"PIECES": 1})  # small static M: column split
    with pytest.raises(ValueError, match="PIECES"):
        K.launch_config(768, 0, 0, 4096, {"PIECES": 1})  # TUNED (0, 1024) has ROWS=2: ROWS is not a layout
    K.LAUNCH_OVERRIDE.update(PIECES=1, num_warps=8)
    try:
        assert K.launch_config(18432, 1, 0, 4096)["PIECES"] == 1
        assert K.launch_config(18432, 1, 0, 4096, {"CHUNK": 1024})["PIECES"] == 0  # a later layer's layout wins
    finally:
        K.LAUNCH_OVERRIDE.clear()
    saved = dict(K.TUNED)
    try:
        K.TUNED[(1, 32768)] = {"PIECES": 1, "ROWS": 1, "num_warps": 16}
        assert K.launch_config(18432, 1, 0, 4096)["PIECES"] == 1
    finally:
        K.TUNED.clear()
        K.TUNED.update(saved)
    rec = _Record()
    x = torch.empty((4, 2 * 14336), dtype=BF16, device="meta")
    q = torch.empty((4, 14336), dtype=FP8, device="meta")
    s = torch.empty((4,), dtype=torch.float32, device="meta")
    K._launch(rec, x, None, None, q, s, K.ACT_SILU, BF16, BF16, FP8, 1, 0, 1.0, [SCALE_DIV], [448.0], False, -448.0,
              448.0, False, override={"PIECES": 1, "num_warps": 16})
    (grid, kw), = rec.calls
    assert grid == (4, 1) and kw["num_warps"] == 16 and not kw["CHUNK"], (grid, kw)
    assert [kw[f"P{i}"] for i in range(4)] == [8192, 4096, 2048, 0] and kw["P_MASKED"] == -1, kw
    rec = _Record()
    K._launch(rec, x, None, None, q, s, K.ACT_SILU, BF16, BF16, FP8, 1, 0, 1.0, [SCALE_DIV], [448.0], False, -448.0,
              448.0, False, override={"ROWS": 2})
    assert rec.calls[0][1]["P0"] == 0  # ROWS > 1 drops TUNED's PIECES: the other launch forms


def test_pieces_ptx_sm90() -> None:
    """Compiled for sm_90 (no GPU needed), per-token I = 18432 as 16384 + 2048 at 16 warps: every
    gate/up load a full unpredicated vector, no layout conversion (a [1]-shaped amax per piece
    made Triton move a whole piece through shared memory), one reduction per piece."""
    import inspect
    import re

    import triton
    from triton.backends.compiler import GPUTarget

    cfg = K.launch_config(18432, 1, 0, 4096, {"PIECES": 1, "num_warps": 16})
    meta = K._kernel_meta(18432, None, K.ACT_SILU, BF16, BF16, FP8, 1, 0, [SCALE_DIV, SCALE_CLAMP_MIN], False, False,
                          cfg)
    nw = meta.pop("num_warps")
    meta.update(NATIVE=True, UB_SLOT=-1)
    ptrs = dict(g_ptr="*bf16", u_ptr="*bf16", scale_ptr="*bf16", ub_ptr="*bf16", q_ptr="*fp8e4nv", s_out_ptr="*fp32")
    floats = set("static_scale_value c0 c1 c2 c3 qmin qmax".split())
    div16 = set(ptrs) | set("stride_g stride_u stride_q u_off INTER NG".split())  # as a launch specializes them
    sig, attrs = {}, {}
    for i, name in enumerate(inspect.signature(K._silu_mul_quant_kernel.fn).parameters):
        sig[name] = "constexpr" if name in meta else ptrs.get(name, "fp32" if name in floats else "i32")
        if name in div16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    try:
        k = triton.compile(triton.compiler.ASTSource(fn=K._silu_mul_quant_kernel, signature=sig, constexprs=meta,
                                                     attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options=dict(num_warps=nw))
    except Exception as e:  # no NVIDIA backend / ptxas in this install
        pytest.skip(f"cannot compile for sm_90 here: {type(e).__name__}: {str(e)[:200]}")
    ptx, ttgir = k.asm["ptx"], k.asm["ttgir"]
    loads = re.findall(r"^\s*(@%p\d+ )?ld\.global\.(\S+)", ptx, re.M)
    # 16384 / 512 threads = 32 elements = 4 x v4.b32 per operand, 2048 -> 4 elements = 1 x v2.b32
    assert sorted(v for _, v in loads) == ["v2.b32"] * 2 + ["v4.b32"] * 8, loads
    assert not any(p for p, _ in loads), "predicated loads"
    assert "convert_layout" not in ttgir
    assert ttgir.count('"tt.reduce"') == 2


def test_bad_inputs_raise_value_error() -> None:
    case = INTERP_CASES[0]
    args = list(op_args(case))
    with pytest.raises(ValueError, match="match gate"):
        K.silu_mul_quant_reference(args[0], args[1][:, :64], *args[2:])
    with pytest.raises(ValueError, match="odd"):
        K.silu_mul_quant_reference(torch.randn(2, 7), None, *args[2:])


def test_bytes_moved() -> None:
    assert K.bytes_moved(4, 128, BF16, FP8, 1) == 2 * 4 * 128 * 2 + 4 * 128 + 4 * 4
    assert K.bytes_moved(4, 128, BF16, FP8, 2, 64) == 2 * 4 * 128 * 2 + 4 * 128 + 4 * 8


@pytest.mark.parametrize("merged", [False, True], ids=["separate", "merged"])
def test_cuda_path_traces_to_user_triton_kernel(merged: bool) -> None:
    """On CUDA the replacement is a triton_kernel_wrapper_functional node (Inductor compiles it into
    its output code), not an opaque op call; merged gate_up passes the base tensor, no copy of a
    half. Checked with fake CUDA tensors, so it runs on CPU CI."""
    import torch.fx as fx
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fxfuse.fx_utils import insert_traced

    with FakeTensorMode():
        x = torch.empty(4, 512 if merged else 256, dtype=BF16, device="cuda")
        u = torch.empty(4, 256, dtype=BF16, device="cuda")
        ub = torch.empty(1, device="cuda")
    g = fx.Graph()
    phs = [g.placeholder(n) for n in ("x", "u", "ub")]
    for p, v in zip(phs, (x, u, ub)):
        p.meta["val"] = v
    out = g.output(None)

    def repl(x, u, ub):
        return torch.ops.fxfuse.silu_mul_quant(
            x, None if merged else u, None, K.ACT_SILU, BF16, BF16, FP8, 1, 0, 1.0,
            [SCALE_CLAMP_MAX, SCALE_DIV, SCALE_CLAMP_MIN], [0.0, 448.0, 1e-12], False, -448.0, 448.0, False,
            scale_ub=ub, ub_slot=0)

    outs = insert_traced(g, repl, phs, before=out, functionalize=True)
    targets = {n.target for n in g.nodes if n.op == "call_function"}
    assert torch.ops.higher_order.triton_kernel_wrapper_functional in targets
    assert not any("fxfuse" in str(t) for t in targets)
    assert not any("slice" in str(t) or "clone" in str(t) for t in targets), targets
    assert_full_signatures(n for n in g.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional)
    assert len(outs) == 2


@pytest.mark.parametrize("scheme", [1, 2], ids=["token", "group128"])
def test_cuda_path_pieces_launch_passes_every_constexpr(scheme: int) -> None:
    """A PIECES launch (LAUNCH_OVERRIDE) traced for Inductor passes every kernel parameter, the
    piece widths included (fake CUDA tensors: CPU CI)."""
    import torch.fx as fx
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fxfuse.fx_utils import insert_traced

    with FakeTensorMode():
        x = torch.empty(8, 2 * 768, dtype=BF16, device="cuda")
    g = fx.Graph()
    ph = g.placeholder("x")
    ph.meta["val"] = x
    out = g.output(None)

    def repl(x):
        return torch.ops.fxfuse.silu_mul_quant(x, None, None, K.ACT_SILU, BF16, BF16, FP8, scheme,
                                               128 if scheme == 2 else 0, 1.0, [SCALE_DIV, SCALE_CLAMP_MIN],
                                               [448.0, 1e-12], False, -448.0, 448.0, False)

    K.LAUNCH_OVERRIDE.update(PIECES=1, ROWS=1, num_warps=4)
    try:
        insert_traced(g, repl, [ph], before=out, functionalize=True)
    finally:
        K.LAUNCH_OVERRIDE.clear()
    nodes = [n for n in g.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
    assert_full_signatures(nodes)
    (node,) = nodes
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    kw = {**node.kwargs["kwargs"], **kernel_side_table.get_constant_args(node.kwargs["constant_args_idx"])}
    assert (kw["P0"], kw["P1"], kw["P2"], kw["P3"], kw["P_MASKED"]) == (512, 256, 0, 0, -1), kw


@pytest.mark.parametrize("flat", [0, 1], ids=["rows", "flat"])
def test_symbolic_m_rows_launch(flat: int) -> None:
    """A symbolic token count with ROWS=4: grid cdiv(M, 4) (FLAT per-group 128 at I = 768: 6 groups
    a row, 4 x 8 per program: cdiv(6 M, 32)), M passed to the kernel (tail mask), and no guard on M
    (the config never looks at it). Fake CUDA tensors, so CPU CI runs it."""
    import torch.fx as fx
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    from fxfuse.fx_utils import insert_traced

    env = ShapeEnv()
    M = env.create_symintnode(env.create_symbol(4096, ConstantSource("M"), dynamic_dim=DimDynamic.DYNAMIC), hint=4096)
    with FakeTensorMode(shape_env=env):
        x = torch.empty(M, 1536, dtype=BF16, device="cuda")
    g = fx.Graph()
    ph = g.placeholder("x")
    ph.meta["val"] = x
    out = g.output(None)

    def repl(x):
        return torch.ops.fxfuse.silu_mul_quant(x, None, None, K.ACT_SILU, BF16, BF16, FP8, 2 if flat else 1,
                                               128 if flat else 0, 1.0, [SCALE_DIV, SCALE_CLAMP_MIN], [448.0, 1e-12],
                                               False, -448.0, 448.0, False)

    K.LAUNCH_OVERRIDE.update(ROWS=4, num_warps=2, FLAT=flat)
    try:
        outs = insert_traced(g, repl, [ph], before=out, functionalize=True)
    finally:
        K.LAUNCH_OVERRIDE.clear()
    (node,) = [n for n in g.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
    kw = node.kwargs["kwargs"]
    assert kw["ROWS"] == 4 and isinstance(kw["M"], fx.Node), kw
    (grid,) = node.kwargs["grid"]
    expr = grid[0].meta["val"].node.expr  # cdiv(M, 4) | cdiv(6 M, 32) in M's symbol
    want = [-(-6 * m // 32) if flat else -(-m // 4) for m in (1, 4, 5, 4097)]
    assert [int(expr.subs(M.node.expr, m)) for m in (1, 4, 5, 4097)] == want, expr
    assert not env.guards, env.guards
    assert [tuple(o.meta["val"].shape) for o in outs] == [(M, 768), (M, 6) if flat else (M,)]


# ----------------------------------------------------------------------------- GPU

@pytest.mark.parametrize("M,inter", [(1, 14336), (4096, 14336), (333, 18432), (64, 768)])
@pytest.mark.parametrize("cid", ["tok_bf16", "tok_bf16_merged", "grp128_f16", "tok_int8_bf16_gelu_merged", "torchao_bf16_f32act"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kernel_vs_reference(cid: str, M: int, inter: int) -> None:
    case = dict(next(c for c in INTERP_CASES if c["id"] == cid), M=M, inter=inter)
    m = compare(case, lambda a, out: K.silu_mul_quant_triton(*a, out=out), device="cuda", seed=M)
    assert m["stable"] == 1.0
    # compiled Triton's exp is the fast approximation (as in Inductor's own kernels): a product on a
    # bf16/fp16 rounding boundary can round the other way; when that element is a row's amax, that
    # row's scale moves by one ulp of the product dtype (<= 2^-7 relative), so rare rows may differ
    assert m["scale_rel"] <= 2 ** -7, m
    assert m["scale_off_frac"] <= 2e-3, m
    assert m["q_mismatch"] <= 1e-3, m


@pytest.mark.parametrize("M,inter", [(4096, 18432), (333, 14336), (4096, 768), (77, 11008), (65, 29568)])
@pytest.mark.parametrize("cid", ["tok_bf16", "tok_bf16_merged", "grp128_f16", "tok_int8_bf16_gelu_merged",
                                 "torchao_bf16_f32act", "static_int8_f32"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_pieces_bitwise_vs_one_row(cid: str, M: int, inter: int) -> None:
    """Compiled PIECES launches (num_warps 4 / 16) write the same bits as the padded one-row launch
    (same per-element math; the amax is exact in any order), every element written (poisoned)."""
    case = dict(next(c for c in INTERP_CASES if c["id"] == cid), M=M, inter=inter)
    args = op_args(case, "cuda", seed=inter)
    qr, sr = K.silu_mul_quant_reference(*args)

    def run(cfg: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
        out = (torch.full(qr.shape, 0.5, device="cuda").to(qr.dtype), torch.full(sr.shape, float("nan"), device="cuda"))
        return K.silu_mul_quant_triton(*args, out=out, config=cfg)

    q0, s0 = run(dict(ROWS=1, FLAT=0, CHUNK=0, PIECES=0))
    assert not s0.isnan().any()
    for nw in (4, 16):
        q1, s1 = run(dict(ROWS=1, FLAT=0, CHUNK=0, PIECES=1, num_warps=nw))
        assert torch.equal(_bits(q1), _bits(q0)) and torch.equal(s1.view(torch.int32), s0.view(torch.int32)), nw


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layout", ["separate", "chunk"])
def test_gpu_fused_kernel_in_output_code(layout: str) -> None:
    from torch._inductor.utils import fresh_cache, run_and_get_code

    import fxfuse
    from forms import dequant_close
    from test_silu_mul_quant import make_args, make_mlp

    fn = make_mlp("silu", layout, "token")
    args = [a.cuda() for a in make_args(37, 2048, BF16, layout, seed=5)]
    with torch.no_grad():
        ref = fn(*args)
    torch._dynamo.reset()
    fxfuse.counters.clear()
    with fresh_cache(), torch.no_grad():
        out, codes = run_and_get_code(
            torch.compile(fn, options={"post_grad_custom_pre_pass": fxfuse.FusionPasses(options={"gate": False})}),
            *args)
    assert fxfuse.counters["silu_mul_quant"] == 1, fxfuse.report()
    code = "\n".join(codes)
    assert "_silu_mul_quant_kernel" in code and "torch.ops.fxfuse" not in code
    assert not dequant_close(tuple(out), tuple(ref))


if __name__ == "__main__":
    if "--interp-json" in sys.argv:
        _interp_main()


class _Record:
    """Stands in for the kernel in K._launch: records the grid and the keyword constexprs."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid: tuple) -> Any:
        return lambda *a, **kw: self.calls.append((grid, kw))


def test_tuned_flat_falls_back_when_int32_row_offsets_would_overflow() -> None:
    """A TUNED FLAT launch whose row stride times the rows one program spans reaches 2^31 takes the
    padded one-row launch instead (an explicit FLAT override raises): never a wrong address."""
    M, inter = 4, 768
    x = torch.empty_strided((M, inter), (2**31, 1), dtype=BF16, device="meta")  # huge stride, no storage
    up = torch.empty_strided((M, inter), (2**31, 1), dtype=BF16, device="meta")
    q = torch.empty((M, inter), dtype=FP8, device="meta")
    s = torch.empty((M, inter // 128), dtype=torch.float32, device="meta")
    args = (x, up, None, q, s, K.ACT_SILU, BF16, BF16, FP8, 2, 128, 1.0, [SCALE_DIV], [448.0], False, -448.0, 448.0,
            False)
    saved = dict(K.TUNED)
    try:
        K.TUNED[(2, 1024)] = {"FLAT": 1, "ROWS": 1, "num_warps": 2}
        rec = _Record()
        K._launch(rec, *args)
        (grid, kw), = rec.calls
        assert not kw["FLAT"] and kw["ROWS"] == 1 and grid == (M, 1), (grid, kw)
        ok = torch.empty((M, inter), dtype=BF16, device="meta")  # a normal stride keeps the TUNED FLAT launch
        rec = _Record()
        K._launch(rec, ok, torch.empty_like(ok), *args[2:])
        assert rec.calls[0][1]["FLAT"]
        with pytest.raises(ValueError, match="overflows int32"):
            K._launch(_Record(), *args, override={"FLAT": 1})
    finally:
        K.TUNED.clear()
        K.TUNED.update(saved)
