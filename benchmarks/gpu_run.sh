#!/usr/bin/env bash
# One device call: environment, GPU tests, then benchmarks; everything lands in $OUT.
#   bash benchmarks/gpu_run.sh [STEP]...   (default: all)
# Steps: tests | rmsnorm | rmsnorm-quick | unwrap | aoti | silu | llama | rope | routing | experts | tune | tune-silu |
#        tune-rope | tune-align | demo |
#        e2e-quick | e2e | e2e-router | all (all = tests + the per-family benchmarks; whole-model steps are separate)
# Every JSON goes to $OUT/res/; the folder is also packed into $OUT/results.tgz (the device tool
# returns at most 8 files). QUICK=1 shrinks every sweep.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/fxfuse_out}"; RES="$OUT/res"; mkdir -p "$RES"
if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels (torchao): the device has no network
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$RES/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$RES/env.txt"
python3 -c "import transformers; print('transformers', transformers.__version__)" 2>&1 | tee -a "$RES/env.txt"
python3 -c "import torchao; print('torchao', torchao.__version__)" 2>&1 | tail -1 | tee -a "$RES/env.txt"
Q=${QUICK:+--quick}
bench() {  # bench NAME TIMEOUT SCRIPT [ARGS...]
  local name=$1 t=$2 script=$3; shift 3
  if [ -f "$script" ]; then
    echo "=== $name"; timeout "$t" python3 "$script" --out "$RES/$name.json" $Q "$@" > "$RES/$name.log" 2>&1
    echo "rc=$?"; tail -25 "$RES/$name.log"
  fi
}
for step in "${@:-all}"; do
  case "$step" in
    tests|all)
      timeout 420 python3 -m pytest -m gpu -q -p no:cacheprovider tests > "$RES/gpu_tests.log" 2>&1
      echo "=== gpu tests rc=$?"; grep -E "passed|failed|FAILED|ERROR" "$RES/gpu_tests.log" | tail -40 ;;&
    rmsnorm-quick) bench rmsnorm_quant_quick 300 benchmarks/bench_rmsnorm_quant.py --quick ;;
    rmsnorm) bench rmsnorm_quant 420 benchmarks/bench_rmsnorm_quant.py ;;
    unwrap) bench unwrap 240 benchmarks/bench_unwrap.py ;;
    aoti) for m in stock fxfuse; do timeout 200 python3 benchmarks/aoti_check.py $m cuda 2>&1 | tail -25; done ;;
    silu|all) bench silu_mul_quant 300 benchmarks/bench_silu_mul_quant.py ;;&
    llama|all) bench llama_fp8_layer 480 benchmarks/bench_llama_fp8_layer.py --ungated ;;&
    rope|all) bench rope_quant 300 benchmarks/bench_rope_quant.py ;;&
    routing|all) bench moe_routing 300 benchmarks/bench_moe_routing.py ;;&
    experts|all) bench moe_experts_qwen 300 benchmarks/bench_moe_experts.py --models qwen3_30b_a3b
                 bench moe_experts_mixtral 240 benchmarks/bench_moe_experts.py --models mixtral_8x7b ;;
    tune) bench tune_moe_decode 300 benchmarks/tune_moe_decode.py
          bench tune_moe_prefill 120 benchmarks/tune_moe_decode.py --prefill ;;
    tune-silu) bench tune_silu 240 benchmarks/tune_silu.py ;;
    tune-rope) bench tune_rope 240 benchmarks/tune_rope.py ;;
    tune-align) bench tune_moe_align 60 benchmarks/tune_moe_align.py ;;
    demo) echo "=== demo"; timeout 300 python3 -m fxfuse demo --quick --json "$RES/demo.json" > "$RES/demo.log" 2>&1
          echo "rc=$?"; tail -60 "$RES/demo.log" ;;
    e2e-quick) bench e2e_quick 590 benchmarks/e2e.py --quick ;;
    e2e-router) bench e2e_router 590 benchmarks/e2e.py --quick --models deepseek_router ;;
    e2e) bench e2e_dense_fp8 590 benchmarks/e2e.py --models dense_fp8
         bench e2e_moe 590 benchmarks/e2e.py --models moe ;;
  esac
done
tar -C "$OUT" -czf "$OUT/results.tgz" res && echo "packed $OUT/results.tgz"
