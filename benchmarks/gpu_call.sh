# The device call script of the latest session (rewritten per call; BENCHMARKS.md cites the exact python command of each
# result, which is what to rerun). benchmarks/gpu_run.sh holds the full menu of steps.
# Prepared for the next device call: verifies on a GPU what the 2026-12-01 second session could not (no device
# time left): the compiled MoE tiled path after the align FILL fix and align_config, the SiLU bench with the TUNED
# launches (its JSON was lost to the 8-file limit), the MoE block at M=1 (2.5x target), RoPE dynamic fp8 with the
# scales written in the consumer's layout (predicted: M=256 fused 6.8 -> ~4.5 us, M=16384 120.5 -> ~114 us). Results are packed into
# one archive: the device returns at most 8 files.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT/res
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > $OUT/res/env.txt
PT="python3 -m pytest -q -p no:cacheprovider -rf"
timeout 120 $PT -m gpu -o faulthandler_timeout=100 tests/test_gpu_moe_experts.py tests/test_rope_quant.py > $OUT/res/gpu_tests_moe_rope.log 2>&1
echo "tests rc=$?"; grep -E "passed|failed|FAILED|ERROR|Timeout" $OUT/res/gpu_tests_moe_rope.log | tail -8
timeout 100 python3 benchmarks/e2e.py --quick --models moe --decode 1,8 --prefill 2048 --top 12 --out $OUT/res/e2e_moe_h200_quick.json > $OUT/res/e2e_moe.log 2>&1; echo "e2e moe rc=$?"; tail -10 $OUT/res/e2e_moe.log
timeout 100 python3 benchmarks/bench_silu_mul_quant.py --quick --Ms 1,256,4096,16384 --Is 768,14336,18432 --out $OUT/res/silu_mul_quant_h200_quick.json > $OUT/res/silu.log 2>&1; echo "silu rc=$?"; tail -4 $OUT/res/silu.log
timeout 130 python3 benchmarks/bench_moe_experts.py --quick --models qwen3_30b_a3b,mixtral_8x7b --impls grouped_mm \
  --out $OUT/res/moe_experts_h200_quick.json > $OUT/res/moe_experts.log 2>&1; echo "moe rc=$?"; tail -6 $OUT/res/moe_experts.log
timeout 110 python3 benchmarks/bench_rope_quant.py --quick --out $OUT/res/rope_quant_h200_quick.json > $OUT/res/rope_quant.log 2>&1; echo "rope rc=$?"; tail -4 $OUT/res/rope_quant.log
tar -C $OUT -czf $OUT/results.tgz res && rm -rf $OUT/res && echo "packed $OUT/results.tgz"
