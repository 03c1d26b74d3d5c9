# The device call script of the latest session (rewritten per call; BENCHMARKS.md cites the exact python command of each
# result, which is what to rerun). benchmarks/gpu_run.sh holds the full menu of steps.
# Prepared for the next session (the 2026-12-01 sixth session had no device lent: both calls below are unrun):
#   bash benchmarks/gpu_call.sh v   verify what was merged without a device: dense fp8 decode with plain RoPE gated off at
#                                   M<=16 (predicted 0.98-0.99x -> ~1.00-1.01x; leave-one-out variants without
#                                   the norm and SiLU fusions show what each costs or saves in the model), the MoE model's prefill with the RoPE QK-norm
#                                   gate back on at 2048 tokens (1.16x -> ~1.20x), then the whole GPU test suite
#   bash benchmarks/gpu_call.sh w   cold compiles with the TTIR analysis cache (P32) and the dynamic-fp8 RoPE sweep
#                                   including SPLIT=2 (P33), with the one-reduction absmax (P34)
#   bash benchmarks/gpu_call.sh x   the absmax change where it ships (RMSNorm quick bench, dynamic RoPE vs stock,
#                                   MoE e2e decode)
# Results are packed into one archive: the device returns at most 8 files.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT/res
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > $OUT/res/env.txt
case "${1:-a}" in
  a)
    timeout 280 python3 benchmarks/bench_moe_experts.py --models qwen3_30b_a3b --out $OUT/res/moe_experts_qwen_h200_full.json > $OUT/res/moe_qwen.log 2>&1
    echo "qwen rc=$?"; grep -E '^\{' $OUT/res/moe_qwen.log | cut -c1-260
    timeout 250 python3 benchmarks/bench_moe_experts.py --models mixtral_8x7b --out $OUT/res/moe_experts_mixtral_h200_full.json > $OUT/res/moe_mixtral.log 2>&1
    echo "mixtral rc=$?"; grep -E '^\{' $OUT/res/moe_mixtral.log | cut -c1-260 ;;
  b)
    timeout 70 python3 benchmarks/bench_router_gemv.py --out $OUT/res/router_gemv_h200.json > $OUT/res/router_gemv.log 2>&1
    echo "gemv rc=$?"; grep -E "M=1:|gates" $OUT/res/router_gemv.log
    timeout 90 python3 benchmarks/bench_rope_quant.py --quick --schemes rope_qknorm --out $OUT/res/rope_qknorm_h200_quick.json > $OUT/res/rope_qknorm.log 2>&1
    echo "rope qknorm rc=$?"; tail -4 $OUT/res/rope_qknorm.log
    timeout 140 python3 benchmarks/tune_moe_decode.py --focus --out $OUT/res/tune_moe_focus_h200.json > $OUT/res/tune_focus.log 2>&1
    echo "tune rc=$?"; grep -E "M=" $OUT/res/tune_focus.log
    timeout 150 python3 benchmarks/e2e.py --quick --fp8 own --models dense_fp8 --decode 1,8 --prefill 2048 --top 12 --out $OUT/res/e2e_dense_fp8_own_h200_quick.json > $OUT/res/e2e_dense.log 2>&1
    echo "e2e dense rc=$?"; grep -E "M=|pass_share" $OUT/res/e2e_dense.log
    timeout 120 python3 benchmarks/e2e.py --quick --rep 300 --models moe --decode 1,8,64 --prefill 2048 --top 12 --out $OUT/res/e2e_moe_h200_quick.json > $OUT/res/e2e_moe.log 2>&1
    echo "e2e moe rc=$?"; grep -E "M=|pass_share" $OUT/res/e2e_moe.log ;;
  d)  # session 5 call 1: GPU tests of the MoE/router files, router GEMV (upcast class), RoPE QK-norm (P22), kernel B focus at M=8, DeepSeek e2e
    timeout 120 python3 -m pytest -m gpu -q -x tests/test_gpu_moe_experts.py > $OUT/res/gpu_tests_moe.log 2>&1
    echo "gpu tests rc=$?"; tail -3 $OUT/res/gpu_tests_moe.log
    timeout 70 python3 benchmarks/bench_router_gemv.py --out $OUT/res/router_gemv_h200.json > $OUT/res/router_gemv.log 2>&1
    echo "gemv rc=$?"; grep -E "M=1:|gates" $OUT/res/router_gemv.log
    timeout 60 python3 benchmarks/bench_rope_quant.py --quick --schemes rope_qknorm --out $OUT/res/rope_qknorm_h200_quick.json > $OUT/res/rope_qknorm.log 2>&1
    echo "rope qknorm rc=$?"; tail -4 $OUT/res/rope_qknorm.log
    timeout 130 python3 benchmarks/tune_moe_decode.py --focus --focus-ms 8 --b-first --out $OUT/res/tune_moe_focus8_h200.json > $OUT/res/tune_focus.log 2>&1
    echo "tune rc=$?"; grep -E "M=" $OUT/res/tune_focus.log
    timeout 175 python3 benchmarks/e2e.py --quick --models deepseek_router --decode 1,8 --prefill 2048 --top 12 --out $OUT/res/e2e_deepseek_router_h200_quick.json > $OUT/res/e2e_ds.log 2>&1
    echo "e2e deepseek rc=$?"; grep -E "M=|counters|pass_share" $OUT/res/e2e_ds.log ;;
  e)  # session 5 call 3: e2e after the decode-config and upcast-GEMV changes (P25), dense own-fp8 e2e, torchao per-tensor stall diagnosis (carry .whl)
    timeout 125 python3 benchmarks/e2e.py --quick --rep 300 --models moe --decode 1,8,64 --prefill 2048 --top 12 --out $OUT/res/e2e_moe_h200_quick.json > $OUT/res/e2e_moe.log 2>&1
    echo "e2e moe rc=$?"; grep -E "M=|pass_share" $OUT/res/e2e_moe.log
    timeout 120 python3 benchmarks/e2e.py --quick --models deepseek_router --decode 1,8 --prefill "" --top 12 --out $OUT/res/e2e_deepseek_router_h200_decode.json > $OUT/res/e2e_ds.log 2>&1
    echo "e2e deepseek rc=$?"; grep -E "M=|counters|pass_share" $OUT/res/e2e_ds.log
    timeout 150 python3 benchmarks/e2e.py --quick --fp8 own --models dense_fp8 --decode 1,8 --prefill 2048 --top 12 --out $OUT/res/e2e_dense_fp8_own_h200_quick.json > $OUT/res/e2e_dense.log 2>&1
    echo "e2e dense rc=$?"; grep -E "M=|pass_share" $OUT/res/e2e_dense.log
    if ls .whl/*.whl >/dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
    fi
    timeout 140 python3 benchmarks/bench_llama_fp8_layer.py --schemes tensor --tokens 16 --stall-dump 45 --out $OUT/res/llama_fp8_layer_tensor_16_h200.json > $OUT/res/llama_t16.log 2>&1
    echo "llama tensor T=16 rc=$?"; grep "\[layer\]" $OUT/res/llama_t16.log | cut -c1-300 ;;
  f)  # session 5 call 4: MoE GPU tests after the decode-config change, dense decode at --rep 300 (decode "no slower"), RoPE QK-norm full M set (gate), torchao per-tensor rows (carry .whl)
    timeout 100 python3 -m pytest -m gpu -q -x tests/test_gpu_moe_experts.py > $OUT/res/gpu_tests_moe.log 2>&1
    echo "gpu tests rc=$?"; tail -2 $OUT/res/gpu_tests_moe.log
    timeout 90 python3 benchmarks/e2e.py --quick --rep 300 --fp8 own --models dense_fp8 --decode 1,8 --prefill "" --top 12 --out $OUT/res/e2e_dense_fp8_own_h200_decode.json > $OUT/res/e2e_dense.log 2>&1
    echo "e2e dense rc=$?"; grep -E "M=|pass_share" $OUT/res/e2e_dense.log
    timeout 100 python3 benchmarks/bench_rope_quant.py --schemes rope_qknorm --out $OUT/res/rope_qknorm_h200.json > $OUT/res/rope_qknorm.log 2>&1
    echo "rope qknorm rc=$?"; grep -E "M=|gates" $OUT/res/rope_qknorm.log | cut -c1-200
    if ls .whl/*.whl >/dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
    fi
    timeout 230 python3 benchmarks/bench_llama_fp8_layer.py --schemes tensor --tokens 1,256,4096 --stall-dump 100 --out $OUT/res/llama_fp8_layer_tensor_h200.json > $OUT/res/llama_tensor.log 2>&1
    echo "llama tensor rc=$?"; grep "\[layer\]" $OUT/res/llama_tensor.log | cut -c1-300 ;;
  g)  # session 5 call 5: dense decode launch counts (why fxfuse's step is 1-2% slower at equal kernel time), torchao per-tensor T=4096 (carry .whl)
    timeout 85 python3 benchmarks/e2e.py --quick --rep 300 --fp8 own --models dense_fp8 --decode 1 --prefill "" --top 60 --out $OUT/res/e2e_dense_fp8_own_h200_launches.json > $OUT/res/e2e_dense.log 2>&1
    echo "e2e dense rc=$?"; grep -E "M=" $OUT/res/e2e_dense.log
    if ls .whl/*.whl >/dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
    fi
    timeout 200 python3 benchmarks/bench_llama_fp8_layer.py --schemes tensor --tokens 4096 --stall-dump 90 --out $OUT/res/llama_fp8_layer_tensor_4096_h200.json > $OUT/res/llama_tensor.log 2>&1
    echo "llama tensor rc=$?"; grep "\[layer\]" $OUT/res/llama_tensor.log | cut -c1-300 ;;
  v)  # next session: verification of the fifth session's gates (no carry needed)
    timeout 140 python3 benchmarks/e2e.py --quick --rep 300 --fp8 own --models dense_fp8 --decode 1,8 --prefill "" --without rmsnorm_quant,silu_mul_quant --top 60 --out $OUT/res/e2e_dense_fp8_own_h200_decode_v.json > $OUT/res/e2e_dense.log 2>&1
    echo "e2e dense rc=$?"; grep -E "M=" $OUT/res/e2e_dense.log; python3 -c "import json;[print(r['M'], r['us'], r.get('us_rounds')) for r in json.load(open('$OUT/res/e2e_dense_fp8_own_h200_decode_v.json'))['models'][0]['rows']]"
    timeout 100 python3 benchmarks/e2e.py --quick --models moe --decode "" --prefill 2048 --top 20 --out $OUT/res/e2e_moe_h200_prefill_v.json > $OUT/res/e2e_moe.log 2>&1
    echo "e2e moe rc=$?"; grep -E "M=" $OUT/res/e2e_moe.log
    timeout 330 python3 -m pytest -m gpu -q tests/ > $OUT/res/gpu_tests_all.log 2>&1
    echo "gpu tests rc=$?"; tail -5 $OUT/res/gpu_tests_all.log ;;
  w)  # next session, call 2: the TTIR analysis cache in real cold compiles (stock / fxfuse / fxfuse without
      # the cache, 2 and 4 layers), then the dynamic-fp8 RoPE sweep with SPLIT=2 (partner from registers)
    timeout 330 python3 benchmarks/compile_overhead.py --device cuda --compile --layers 2,4 --reps 2 --out $OUT/res/compile_overhead_h200.json > $OUT/res/compile_overhead.log 2>&1
    echo "compile overhead rc=$?"; grep -E '^\{' $OUT/res/compile_overhead.log | python3 -c "import sys,json;[print({k:v for k,v in json.loads(l).items() if 'compile' in k or k in ('model','layers','pass_s_first')}) for l in sys.stdin]"
    timeout 200 python3 benchmarks/tune_rope.py --schemes rope_fp8_dynamic --out $OUT/res/tune_rope_dynamic_h200.json > $OUT/res/tune_rope.log 2>&1
    echo "tune rope rc=$?"; tail -8 $OUT/res/tune_rope.log ;;
  x)  # next session, call 3: the one-reduction absmax (P34) where it ships: RMSNorm per-token/per-group quick
      # bench (no regression vs the gates), dynamic-fp8 RoPE vs stock (issue-8 figures), MoE e2e decode
    timeout 200 python3 benchmarks/bench_rmsnorm_quant.py --quick --schemes per_token_fp8_res,per_group128_fp8 --out $OUT/res/rmsnorm_quant_h200_absmax.json > $OUT/res/rmsnorm.log 2>&1
    echo "rmsnorm rc=$?"; tail -6 $OUT/res/rmsnorm.log
    timeout 150 python3 benchmarks/bench_rope_quant.py --schemes rope_fp8_dynamic --out $OUT/res/rope_dynamic_h200.json > $OUT/res/rope_dyn.log 2>&1
    echo "rope dynamic rc=$?"; grep -E "M=|gates" $OUT/res/rope_dyn.log | cut -c1-220
    timeout 200 python3 benchmarks/e2e.py --quick --rep 300 --models moe --decode 1,8,64 --prefill "" --top 20 --out $OUT/res/e2e_moe_h200_decode_x.json > $OUT/res/e2e_moe.log 2>&1
    echo "e2e moe rc=$?"; grep -E "M=" $OUT/res/e2e_moe.log ;;
  h)  # session 5 call 6: dense decode leave-one-out (is the plain RoPE kernel the 1% decode loss?)
    timeout 100 python3 benchmarks/e2e.py --quick --rep 200 --fp8 own --models dense_fp8 --decode 1 --prefill "" --without rope_quant --out $OUT/res/e2e_dense_fp8_own_h200_norope.json > $OUT/res/e2e_dense.log 2>&1
    echo "e2e dense rc=$?"; grep -E "M=" $OUT/res/e2e_dense.log; python3 -c "import json;r=json.load(open('$OUT/res/e2e_dense_fp8_own_h200_norope.json'))['models'][0]['rows'][0];print(r['us'])" ;;
  c)
    if ls .whl/*.whl >/dev/null 2>&1; then  # torchao for the Llama layer (carry [".whl"])
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
    fi
    timeout 260 python3 benchmarks/e2e.py --quick --models deepseek_router --decode 1,8 --prefill 2048 --top 12 --out $OUT/res/e2e_deepseek_router_h200_quick.json > $OUT/res/e2e_ds.log 2>&1
    echo "e2e deepseek rc=$?"; grep -E "M=|counters|pass_share" $OUT/res/e2e_ds.log
    timeout 300 python3 benchmarks/bench_llama_fp8_layer.py --schemes tensor --tokens 16 --out $OUT/res/llama_fp8_layer_tensor_16_h200.json > $OUT/res/llama_t16.log 2>&1
    echo "llama tensor T=16 rc=$?"; grep "\[layer\]" $OUT/res/llama_t16.log | cut -c1-300 ;;
esac
tar -C $OUT -czf $OUT/results.tgz res && rm -rf $OUT/res && echo "packed $OUT/results.tgz"
