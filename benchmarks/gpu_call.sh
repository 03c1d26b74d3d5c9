# The device call script of the latest session (rewritten per call; BENCHMARKS.md cites the exact python command of each
# result, which is what to rerun). benchmarks/gpu_run.sh holds the full menu of steps.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT/res
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > $OUT/res/env.txt
PT="python3 -m pytest -q -p no:cacheprovider -rf"
timeout 40 python3 benchmarks/tune_moe_align.py --out $OUT/res/tune_moe_align_h200.json > $OUT/res/tune_moe_align.log 2>&1; echo "align rc=$?"; cat $OUT/res/tune_moe_align.log | tail -6
timeout 200 python3 benchmarks/tune_rope.py --out $OUT/res/tune_rope_h200.json > $OUT/res/tune_rope.log 2>&1; echo "tune rope rc=$?"; grep -v "^\[tune\] precompiled" $OUT/res/tune_rope.log | tail -32
timeout 70 python3 benchmarks/tune_silu.py --schemes per_token_fp8 --Is 14336,18432 --out $OUT/res/tune_silu_chunk_h200.json > $OUT/res/tune_silu_chunk.log 2>&1; echo "tune silu rc=$?"; grep -E "M=|TUNED" $OUT/res/tune_silu_chunk.log | tail -8
timeout 150 $PT -m gpu -o faulthandler_timeout=120 tests/test_rope_quant.py tests/test_kernel_silu_mul_quant.py \
  "tests/test_gpu_moe_experts.py::test_launcher_real_shapes" > $OUT/res/gpu_tests_g.log 2>&1
echo "tests rc=$?"; grep -E "passed|failed|FAILED|ERROR|Timeout" $OUT/res/gpu_tests_g.log | tail -15
