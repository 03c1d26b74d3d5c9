# The device call script of the latest session (rewritten per call; BENCHMARKS.md cites the exact python command of each
# result, which is what to rerun). benchmarks/gpu_run.sh holds the full menu of steps.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT/res
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > $OUT/res/env.txt
PT="python3 -m pytest -q -p no:cacheprovider -rf"
timeout 150 $PT -m gpu -o faulthandler_timeout=120 tests/test_gpu_moe_experts.py -k "launcher_real_shapes or output_code or replay" \
  > $OUT/res/gpu_tests_f.log 2>&1
echo "tests rc=$?"; grep -E "passed|failed|FAILED|ERROR|Timeout" $OUT/res/gpu_tests_f.log | tail -15
timeout 130 python3 benchmarks/tune_silu.py --out $OUT/res/tune_silu_h200.json > $OUT/res/tune_silu.log 2>&1; echo "tune silu rc=$?"; tail -30 $OUT/res/tune_silu.log
timeout 130 python3 benchmarks/bench_moe_experts.py --quick --models qwen3_30b_a3b,mixtral_8x7b --impls grouped_mm \
  --out $OUT/res/moe_experts_h200_quick.json > $OUT/res/moe_experts.log 2>&1; echo "moe rc=$?"; tail -12 $OUT/res/moe_experts.log
timeout 100 python3 benchmarks/e2e.py --quick --models moe --decode 1,8 --prefill 2048 --top 12 --out $OUT/res/e2e_moe_h200_quick.json > $OUT/res/e2e_moe.log 2>&1; echo "e2e moe rc=$?"; tail -14 $OUT/res/e2e_moe.log
