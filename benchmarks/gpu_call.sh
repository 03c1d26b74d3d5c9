# The device call script of the latest session (rewritten per call; BENCHMARKS.md cites the exact python command of each
# result, which is what to rerun; earlier sessions' calls are in git history). benchmarks/gpu_run.sh holds the
# full menu of steps.
# Prepared for the next session (the 2026-12-01 sixth session had no device lent: the calls below are unrun):
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
case "${1:-v}" in
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
esac
tar -C $OUT -czf $OUT/results.tgz res && rm -rf $OUT/res && echo "packed $OUT/results.tgz"
