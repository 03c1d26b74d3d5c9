# The device call script of the latest session (rewritten per call; BENCHMARKS.md cites the exact python command of each
# result, which is what to rerun). benchmarks/gpu_run.sh holds the full menu of steps.
# Prepared for the next session's first call: what the 2026-12-01 third session could not verify (no device time
# left). The MoE routing fold in a real compile (fixed after its GPU test failed: the traced router's own scores
# buffer counted as a use), the Qwen block at M=1 with and without it (predicted 31.4 -> ~29.5 us, >= 2.5x stock),
# the e2e MoE model incl. decode M=64 (never run on the H200), and the dense fp8 e2e prefill on the H200.
# Results are packed into one archive: the device returns at most 8 files.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT/res
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > $OUT/res/env.txt
PT="python3 -m pytest -q -p no:cacheprovider -rf"
timeout 70 $PT -m gpu tests/test_gpu_moe_experts.py -k "fold or routed" > $OUT/res/gpu_tests_moe_fold.log 2>&1
echo "tests rc=$?"; grep -E "passed|failed|FAILED|ERROR|Timeout" $OUT/res/gpu_tests_moe_fold.log | tail -8
timeout 100 python3 benchmarks/bench_moe_experts.py --quick --models qwen3_30b_a3b --impls grouped_mm \
  --out $OUT/res/moe_experts_qwen_h200_quick.json > $OUT/res/moe_experts.log 2>&1; echo "moe rc=$?"; grep -E '"M": 1,' $OUT/res/moe_experts.log | tail -2
timeout 130 python3 benchmarks/e2e.py --quick --models moe --decode 1,8,64 --prefill 2048 --top 12 --out $OUT/res/e2e_moe_h200_quick.json > $OUT/res/e2e_moe.log 2>&1
echo "e2e moe rc=$?"; tail -12 $OUT/res/e2e_moe.log
timeout 280 python3 benchmarks/e2e.py --quick --models dense_fp8 --decode 1 --prefill 2048 --top 12 --out $OUT/res/e2e_dense_fp8_h200_quick.json > $OUT/res/e2e_dense.log 2>&1
echo "e2e dense rc=$?"; tail -8 $OUT/res/e2e_dense.log
tar -C $OUT -czf $OUT/results.tgz res && rm -rf $OUT/res && echo "packed $OUT/results.tgz"
