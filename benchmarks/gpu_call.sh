# The device call script of the latest session (rewritten per call; BENCHMARKS.md cites the exact python command of each
# result, which is what to rerun). benchmarks/gpu_run.sh holds the full menu of steps.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT/res
timeout 100 python3 benchmarks/e2e.py --quick --models moe --decode 1,8 --prefill 2048 --out $OUT/res/e2e_moe_h200_quick.json > $OUT/res/e2e_moe.log 2>&1; echo "e2e moe rc=$?"; tail -12 $OUT/res/e2e_moe.log
