#!/usr/bin/env bash
# One device call: environment, GPU tests, then benchmarks; everything lands in $OUT.
#   bash benchmarks/gpu_run.sh [tests|bench|bench-quick|silu|silu-quick|layer|unwrap|all]...
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/fxfuse_out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/env.txt"
for step in "${@:-all}"; do
  case "$step" in
    tests|all)
      timeout 300 python3 -m pytest -m gpu -q -x -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -40 ;;&
    bench-quick)
      timeout 300 python3 benchmarks/bench_rmsnorm_quant.py --quick --sweep-warps --out "$OUT/rmsnorm_quant_quick.json" 2>&1 | tail -60 ;;
    bench|all)
      timeout 420 python3 benchmarks/bench_rmsnorm_quant.py --out "$OUT/rmsnorm_quant.json" 2>&1 | tail -60 ;;&
    silu|all)
      timeout 420 python3 benchmarks/bench_silu_mul_quant.py --out "$OUT/silu_mul_quant.json" 2>&1 | tail -60 ;;&
    silu-quick)
      timeout 300 python3 benchmarks/bench_silu_mul_quant.py --quick --sweep-warps --out "$OUT/silu_mul_quant_quick.json" 2>&1 | tail -40 ;;
    layer|all)
      [ -d wheels ] && pip install --no-deps --no-index wheels/torchao-*.whl >/dev/null 2>&1
      timeout 480 python3 benchmarks/bench_llama_fp8_layer.py --ungated --out "$OUT/llama_fp8_layer.json" 2>&1 | tail -60 ;;&
    aoti)
      for m in stock fxfuse; do timeout 200 python3 benchmarks/aoti_check.py $m cuda 2>&1 | tail -25; done ;;
    unwrap|all)
      [ -f benchmarks/bench_unwrap.py ] && timeout 240 python3 benchmarks/bench_unwrap.py --out "$OUT/unwrap.json" 2>&1 | tail -30 ;;
  esac
done
