# The device call script of the latest session (rewritten per call; BENCHMARKS.md cites the exact python command of each
# result, which is what to rerun). benchmarks/gpu_run.sh holds the full menu of steps.
# 2026-12-01 third session, call 3: RoPE QK-norm on the SPLIT path (GPU tests, the QK-norm sweep with SPLIT 0/1/2, the
# quick bench whose per-M-class gates feed gates.json) and the SiLU bench with the PIECES launches (TUNED).
# Results are packed into one archive: the device returns at most 8 files.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT/res
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > $OUT/res/env.txt
PT="python3 -m pytest -q -p no:cacheprovider -rf"
timeout 90 $PT -m gpu tests/test_rope_quant.py > $OUT/res/gpu_tests_rope.log 2>&1
echo "tests rc=$?"; grep -E "passed|failed|FAILED|ERROR|Timeout" $OUT/res/gpu_tests_rope.log | tail -8
timeout 60 python3 benchmarks/tune_rope.py --schemes rope_qknorm --out $OUT/res/tune_rope_qknorm_h200.json > $OUT/res/tune_rope_qknorm.log 2>&1
echo "tune rope rc=$?"; tail -8 $OUT/res/tune_rope_qknorm.log
timeout 110 python3 benchmarks/bench_rope_quant.py --quick --out $OUT/res/rope_quant_h200_quick.json > $OUT/res/rope_quant.log 2>&1
echo "rope rc=$?"; tail -4 $OUT/res/rope_quant.log
timeout 110 python3 benchmarks/bench_silu_mul_quant.py --quick --Ms 1,256,4096,16384 --Is 768,14336,18432 --out $OUT/res/silu_mul_quant_h200_quick.json > $OUT/res/silu.log 2>&1
echo "silu rc=$?"; tail -4 $OUT/res/silu.log
tar -C $OUT -czf $OUT/results.tgz res && rm -rf $OUT/res && echo "packed $OUT/results.tgz"
