# The device call script of the latest session (rewritten per call; BENCHMARKS.md cites the exact python command of each
# result, which is what to rerun). benchmarks/gpu_run.sh holds the full menu of steps.
# 2026-12-01 fourth session, call 2: the decode kernels' focused sweep at one token (issue 10's 2.5x), the
# fused block's kernel breakdown at 1 and 8 tokens, and the dense fp8 e2e prefill on the H200 (issue 11).
# Results are packed into one archive: the device returns at most 8 files.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT/res
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > $OUT/res/env.txt
timeout 170 python3 benchmarks/tune_moe_decode.py --focus --out $OUT/res/tune_moe_focus_h200.json > $OUT/res/tune_focus.log 2>&1
echo "tune rc=$?"; tail -3 $OUT/res/tune_focus.log
timeout 90 python3 benchmarks/diag_moe_decode_profile.py $OUT/res/moe_decode_profile_h200.json > $OUT/res/diag.log 2>&1
echo "diag rc=$?"; grep -A12 "== " $OUT/res/diag.log | cut -c1-100 | head -60
timeout 250 python3 benchmarks/e2e.py --quick --models dense_fp8 --decode "" --prefill 2048 --top 15 --out $OUT/res/e2e_dense_fp8_prefill_h200_quick.json > $OUT/res/e2e_dense.log 2>&1
echo "e2e dense rc=$?"; tail -4 $OUT/res/e2e_dense.log
tar -C $OUT -czf $OUT/results.tgz res && rm -rf $OUT/res && echo "packed $OUT/results.tgz"
