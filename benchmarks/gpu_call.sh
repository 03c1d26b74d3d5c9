# The device call script of the latest session (rewritten per call; BENCHMARKS.md cites the exact python command of each
# result, which is what to rerun). benchmarks/gpu_run.sh holds the full menu of steps.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT/res
PT="python3 -m pytest -q -p no:cacheprovider -rf"
timeout 130 $PT -m gpu -o faulthandler_timeout=100 tests/test_gpu_moe_experts.py \
  "tests/test_regressions.py::test_gpu_dynamic_true_float_attributes_read_at_run_time" > $OUT/res/gpu_tests_d.log 2>&1
echo "tests rc=$?"; grep -E "passed|failed|FAILED|ERROR|Timeout" $OUT/res/gpu_tests_d.log | tail -15
timeout 130 python3 benchmarks/e2e.py --quick --models moe --decode 1,8 --prefill 2048 --out $OUT/res/e2e_moe_h200_quick.json > $OUT/res/e2e_moe.log 2>&1; echo "e2e rc=$?"; tail -14 $OUT/res/e2e_moe.log
