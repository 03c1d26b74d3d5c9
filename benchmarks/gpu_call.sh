# The device call script of the latest session (rewritten per call; BENCHMARKS.md cites the exact python command of each
# result, which is what to rerun). benchmarks/gpu_run.sh holds the full menu of steps.
# 2026-12-01 fourth session, call 5 (the last ~6 minutes of device time): issue 7's Llama layer at 16 tokens,
# row-wise and per-tensor, then per-tensor at 4096 tokens (never finished in earlier calls), as shipped (gated).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT/res
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > $OUT/res/env.txt
timeout 175 python3 benchmarks/bench_llama_fp8_layer.py --schemes row,tensor --tokens 16 --out $OUT/res/llama_fp8_layer_16_h200.json > $OUT/res/llama16.log 2>&1
echo "llama16 rc=$?"; grep "\[layer\]" $OUT/res/llama16.log | cut -c1-300
timeout 100 python3 benchmarks/bench_llama_fp8_layer.py --schemes tensor --tokens 4096 --out $OUT/res/llama_fp8_layer_tensor_4096_h200.json > $OUT/res/llama4096t.log 2>&1
echo "llama4096 tensor rc=$?"; grep "\[layer\]" $OUT/res/llama4096t.log | cut -c1-300
tar -C $OUT -czf $OUT/results.tgz res && rm -rf $OUT/res && echo "packed $OUT/results.tgz"
