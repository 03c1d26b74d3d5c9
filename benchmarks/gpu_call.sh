# The device call script of the latest session (rewritten per call; BENCHMARKS.md cites the exact python command of each
# result, which is what to rerun). benchmarks/gpu_run.sh holds the full menu of steps.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT/res
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > $OUT/res/env.txt
python3 -c "import torch, triton, torchao; print(torch.__version__, triton.__version__, torchao.__version__)" >> $OUT/res/env.txt 2>&1; cat $OUT/res/env.txt
PT="python3 -m pytest -q -p no:cacheprovider -rf"
timeout 150 $PT -m gpu -o faulthandler_timeout=120 "tests/test_regressions.py::test_gpu_dynamic_true_float_attributes_read_at_run_time" \
  tests/test_gpu_moe_experts.py > $OUT/res/gpu_tests_e.log 2>&1
echo "tests rc=$?"; grep -E "passed|failed|FAILED|ERROR|Timeout" $OUT/res/gpu_tests_e.log | tail -15
timeout 170 python3 benchmarks/bench_llama_fp8_layer.py --schemes row,tensor --tokens 4096 --profile 4096 --ungated \
  --out $OUT/res/llama_fp8_layer_4096_h200.json > $OUT/res/llama_fp8_layer_4096_h200.log 2>&1; echo "llama rc=$?"; grep "\[layer\]" $OUT/res/llama_fp8_layer_4096_h200.log
timeout 110 python3 benchmarks/e2e.py --quick --models dense_fp8 --decode 1,8 --prefill 2048 --top 15 --out $OUT/res/e2e_dense_fp8_h200_quick.json > $OUT/res/e2e_dense.log 2>&1; echo "e2e dense rc=$?"; tail -12 $OUT/res/e2e_dense.log
timeout 90 python3 benchmarks/e2e.py --quick --models moe --decode 1,8 --prefill 64 --top 15 --out $OUT/res/e2e_moe_top_h200.json > $OUT/res/e2e_moe_top.log 2>&1; echo "e2e moe rc=$?"; tail -8 $OUT/res/e2e_moe_top.log
