# The device call script of the latest session (rewritten per call; BENCHMARKS.md cites the exact python command of each
# result, which is what to rerun). benchmarks/gpu_run.sh holds the full menu of steps.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT/res
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > $OUT/res/env.txt
PT="python3 -m pytest -q -p no:cacheprovider -rf"
timeout 90 $PT -m gpu -o faulthandler_timeout=80 tests/test_rope_quant.py tests/test_kernel_silu_mul_quant.py > $OUT/res/gpu_tests_h.log 2>&1
echo "tests rc=$?"; grep -E "passed|failed|FAILED|ERROR|Timeout" $OUT/res/gpu_tests_h.log | tail -15
timeout 120 python3 benchmarks/bench_rope_quant.py --quick --out $OUT/res/rope_quant_h200_quick.json > $OUT/res/rope_quant.log 2>&1; echo "rope rc=$?"; tail -5 $OUT/res/rope_quant.log
timeout 110 python3 benchmarks/bench_silu_mul_quant.py --quick --Ms 1,256,4096,16384 --Is 768,14336,18432 --out $OUT/res/silu_mul_quant_h200_quick.json > $OUT/res/silu.log 2>&1; echo "silu rc=$?"; tail -4 $OUT/res/silu.log
timeout 90 python3 benchmarks/e2e.py --quick --models moe --decode 1,8 --prefill 2048 --out $OUT/res/e2e_moe_h200_quick.json > $OUT/res/e2e_moe.log 2>&1; echo "e2e moe rc=$?"; tail -12 $OUT/res/e2e_moe.log
timeout 45 python3 benchmarks/bench_rope_quant.py --cache --out $OUT/res/rope_quant_cache_h200.json > $OUT/res/rope_quant_cache_h200.log 2>&1; echo "cache rc=$?"; tail -3 $OUT/res/rope_quant_cache_h200.log
