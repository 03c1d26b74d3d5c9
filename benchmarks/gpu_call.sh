# The device call script of the latest session (rewritten per call; BENCHMARKS.md cites the exact python command of each
# result, which is what to rerun). benchmarks/gpu_run.sh holds the full menu of steps.
# 2026-12-01 third session, call 4 (final): the MoE routing folded into decode kernel A (GPU tests, the Qwen block
# with and without the fold), RoPE QK-norm on SPLIT=2 (its classes re-measured and merged into gates.json before the
# e2e run), the e2e MoE model (decode at 8 tokens now on the per-pair decode path), and the SiLU bench after the
# PIECES input-clone fix. Results are packed into one archive: the device returns at most 8 files.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT/res
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > $OUT/res/env.txt
PT="python3 -m pytest -q -p no:cacheprovider -rf"
timeout 140 $PT -m gpu -o faulthandler_timeout=130 tests/test_gpu_moe_experts.py > $OUT/res/gpu_tests_moe.log 2>&1
echo "tests rc=$?"; grep -E "passed|failed|FAILED|ERROR|Timeout" $OUT/res/gpu_tests_moe.log | tail -8
timeout 100 python3 benchmarks/bench_moe_experts.py --quick --models qwen3_30b_a3b --impls grouped_mm \
  --out $OUT/res/moe_experts_h200_quick.json > $OUT/res/moe_experts.log 2>&1; echo "moe rc=$?"; grep -E "M=|fold" $OUT/res/moe_experts.log | tail -8
timeout 60 python3 benchmarks/bench_rope_quant.py --quick --schemes rope_qknorm --out $OUT/res/rope_qknorm_h200_quick.json > $OUT/res/rope_qknorm.log 2>&1
echo "rope rc=$?"; tail -2 $OUT/res/rope_qknorm.log
[ -f $OUT/res/rope_qknorm_h200_quick.json ] && python3 benchmarks/write_gates.py $OUT/res/rope_qknorm_h200_quick.json > /dev/null && cp fxfuse/gates.json $OUT/res/gates_after_call4.json
timeout 110 python3 benchmarks/e2e.py --quick --models moe --decode 1,8 --prefill 2048 --top 12 --out $OUT/res/e2e_moe_h200_quick.json > $OUT/res/e2e_moe.log 2>&1
echo "e2e moe rc=$?"; tail -12 $OUT/res/e2e_moe.log
timeout 110 python3 benchmarks/bench_silu_mul_quant.py --quick --Ms 1,256,4096,16384 --Is 768,14336,18432 --out $OUT/res/silu_mul_quant_h200_quick.json > $OUT/res/silu.log 2>&1
echo "silu rc=$?"; tail -4 $OUT/res/silu.log
tar -C $OUT -czf $OUT/results.tgz res && rm -rf $OUT/res && echo "packed $OUT/results.tgz"
