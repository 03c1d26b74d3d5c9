set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT/res
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
timeout 300 python3 benchmarks/tune_moe_decode.py --quick --out $OUT/res/tune_moe_decode_h200.json 2>&1 | tail -20
timeout 240 python3 -m pytest -m gpu -q -p no:cacheprovider tests > $OUT/res/gpu_tests.log 2>&1; echo "gpu tests rc=$?"
grep -E "passed|failed|FAILED|ERROR" $OUT/res/gpu_tests.log | tail -20
