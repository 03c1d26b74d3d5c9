# The device call script of the latest session (rewritten per call; BENCHMARKS.md cites the exact python command of each
# result, which is what to rerun). benchmarks/gpu_run.sh holds the full menu of steps.
# 2026-12-01 third session, call 2: sweeps only. The MoE tiled path's BM=16 class (decode-sized batches: Qwen3-30B-A3B
# and Mixtral at 8 tokens; plus the per-pair decode path at the same M), and the SiLU PIECES launch (per-token and
# per-group rows that are not a power of 2, read once). GPU kernel tests for the new silu path first.
# Results are packed into one archive: the device returns at most 8 files.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT/res
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > $OUT/res/env.txt
PT="python3 -m pytest -q -p no:cacheprovider -rf"
timeout 100 $PT -m gpu tests/test_kernel_silu_mul_quant.py > $OUT/res/gpu_tests_silu.log 2>&1
echo "tests rc=$?"; grep -E "passed|failed|FAILED|ERROR|Timeout" $OUT/res/gpu_tests_silu.log | tail -8
timeout 260 python3 benchmarks/tune_moe_decode.py --small --out $OUT/res/tune_moe_small_h200.json > $OUT/res/tune_moe_small.log 2>&1
echo "moe small rc=$?"; grep -E "tiled-small" $OUT/res/tune_moe_small.log | tail -6
timeout 180 python3 benchmarks/tune_silu.py --pieces-only --schemes per_token_fp8,per_group128_fp8 --Is 768,14336,18432 \
  --out $OUT/res/tune_silu_pieces_h200.json > $OUT/res/tune_silu_pieces.log 2>&1
echo "silu pieces rc=$?"; tail -30 $OUT/res/tune_silu_pieces.log
tar -C $OUT -czf $OUT/results.tgz res && rm -rf $OUT/res && echo "packed $OUT/results.tgz"
