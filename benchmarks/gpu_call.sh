# The device call script of the latest session (rewritten per call; BENCHMARKS.md cites the exact python command of each
# result, which is what to rerun). benchmarks/gpu_run.sh holds the full menu of steps.
# 2026-12-01 fourth session, call 3: the decode router GEMV (fxfuse::router_logits) -- GPU tests, its
# sweep + gate (written into gates.json here, so the e2e run below is gated by it), the Qwen block at
# M=1 (issue 10: >= 2.5x stock), the e2e MoE decode steps (issue 11).
# Results are packed into one archive: the device returns at most 8 files.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT/res
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > $OUT/res/env.txt
PT="python3 -m pytest -q -p no:cacheprovider -rf"
timeout 110 $PT -m gpu tests/test_gpu_moe_experts.py -k "router_gemv or (fused_kernel_in_output_code and qwen)" > $OUT/res/gpu_tests_router_gemv.log 2>&1
echo "tests rc=$?"; grep -E "passed|failed|FAILED|ERROR|Timeout" $OUT/res/gpu_tests_router_gemv.log | tail -8
timeout 90 python3 benchmarks/bench_router_gemv.py --sweep --out $OUT/res/router_gemv_h200.json > $OUT/res/router_gemv.log 2>&1
echo "gemv rc=$?"; grep -E "sweep|M=1:|M=8:|gates" $OUT/res/router_gemv.log
python3 benchmarks/write_gates.py $OUT/res/router_gemv_h200.json > /dev/null && cp fxfuse/gates.json $OUT/res/gates_after.json
timeout 110 python3 benchmarks/bench_moe_experts.py --ms 1,8 --models qwen3_30b_a3b --impls grouped_mm \
  --out $OUT/res/moe_experts_qwen_h200_decode.json > $OUT/res/moe_experts.log 2>&1; echo "moe rc=$?"; grep -E '"M": 1,' $OUT/res/moe_experts.log | tail -1 | cut -c1-400
timeout 100 python3 benchmarks/e2e.py --quick --models moe --decode 1,8 --prefill "" --top 12 --out $OUT/res/e2e_moe_h200_quick.json > $OUT/res/e2e_moe.log 2>&1
echo "e2e moe rc=$?"; grep -E "M=|counters|pass_share" $OUT/res/e2e_moe.log | tail -8
tar -C $OUT -czf $OUT/results.tgz res && rm -rf $OUT/res && echo "packed $OUT/results.tgz"
