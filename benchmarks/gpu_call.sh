# One device call of this session (lead's script; see benchmarks/gpu_run.sh for the full menu).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT/res
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
timeout 330 python3 -m pytest -m gpu -q -p no:cacheprovider tests > $OUT/res/gpu_tests.log 2>&1; echo "gpu tests rc=$?"
grep -E "passed|failed|FAILED|ERROR" $OUT/res/gpu_tests.log | tail -20
timeout 100 python3 benchmarks/bench_moe_experts.py --quick --models qwen3_30b_a3b --impls grouped_mm --out $OUT/res/moe_experts_qwen_h200_quick.json > $OUT/res/moe_experts_qwen.log 2>&1; echo "moe bench rc=$?"; tail -8 $OUT/res/moe_experts_qwen.log
timeout 80 python3 benchmarks/tune_moe_decode.py --prefill --out $OUT/res/tune_moe_prefill_h200.json 2>&1 | tail -4
timeout 150 python3 benchmarks/e2e.py --quick --models moe --decode 1,8 --prefill 2048 --out $OUT/res/e2e_moe_h200_quick.json > $OUT/res/e2e_moe.log 2>&1; echo "e2e rc=$?"; tail -15 $OUT/res/e2e_moe.log
