# The device call script of the latest session (rewritten per call; BENCHMARKS.md cites the exact python command of each
# result, which is what to rerun). benchmarks/gpu_run.sh holds the full menu of steps.
# 2026-12-01 fourth session, call 4: the router GEMV at its swept config (1 row x 1024 x 8 warps):
# GPU tests, bench + gate (written into gates.json here, so the e2e run is gated by it), the Qwen
# block at M=1,8 (issue 10: >= 2.5x stock at M=1), the e2e MoE decode steps (issue 11).
# Results are packed into one archive: the device returns at most 8 files.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT/res
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > $OUT/res/env.txt
PT="python3 -m pytest -q -p no:cacheprovider -rf"
timeout 60 $PT -m gpu tests/test_gpu_moe_experts.py -k "router_gemv" > $OUT/res/gpu_tests_router_gemv.log 2>&1
echo "tests rc=$?"; grep -E "passed|failed|FAILED|ERROR|Timeout" $OUT/res/gpu_tests_router_gemv.log | tail -8
timeout 60 python3 benchmarks/bench_router_gemv.py --out $OUT/res/router_gemv_h200.json > $OUT/res/router_gemv.log 2>&1
echo "gemv rc=$?"; grep -E "M=1:|gates" $OUT/res/router_gemv.log
python3 benchmarks/write_gates.py $OUT/res/router_gemv_h200.json > /dev/null && cp fxfuse/gates.json $OUT/res/gates_after.json
timeout 100 python3 benchmarks/bench_moe_experts.py --ms 1,8 --models qwen3_30b_a3b --impls grouped_mm \
  --out $OUT/res/moe_experts_qwen_h200_decode.json > $OUT/res/moe_experts.log 2>&1; echo "moe rc=$?"; grep -E '"M": (1|8),' $OUT/res/moe_experts.log | cut -c1-300
timeout 100 python3 benchmarks/e2e.py --quick --models moe --decode 1,8 --prefill "" --top 12 --out $OUT/res/e2e_moe_h200_quick.json > $OUT/res/e2e_moe.log 2>&1
echo "e2e moe rc=$?"; grep -E "M=|counters|pass_share" $OUT/res/e2e_moe.log | tail -8
tar -C $OUT -czf $OUT/results.tgz res && rm -rf $OUT/res && echo "packed $OUT/results.tgz"
