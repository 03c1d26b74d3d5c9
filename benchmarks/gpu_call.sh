# The device call script of the latest session (rewritten per call; BENCHMARKS.md cites the exact python command of each
# result, which is what to rerun; earlier sessions' calls are in git history). benchmarks/gpu_run.sh holds the
# full menu of steps.
#   bash benchmarks/gpu_call.sh y   issue 8's RoPE table (plain, static fp8, QK-norm) at every M, and the KV-cache cases
# Results are packed into one archive: the device returns at most 8 files.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT/res
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > $OUT/res/env.txt
case "${1:-y}" in
  y)  # 2026-12-01 seventh session, last call: issue 8's table at every M for the schemes not re-measured in call x
    timeout 220 python3 benchmarks/bench_rope_quant.py --schemes rope,rope_fp8_static,rope_qknorm --out $OUT/res/rope_quant_h200_all.json > $OUT/res/rope_all.log 2>&1
    echo "rope rc=$?"; grep -E "M=|gates" $OUT/res/rope_all.log | cut -c1-220
    timeout 70 python3 benchmarks/bench_rope_quant.py --cache --out $OUT/res/rope_quant_cache_h200.json > $OUT/res/rope_cache.log 2>&1
    echo "rope cache rc=$?"; grep -E "M=" $OUT/res/rope_cache.log | cut -c1-220 ;;
esac
tar -C $OUT -czf $OUT/results.tgz res && rm -rf $OUT/res && echo "packed $OUT/results.tgz"
