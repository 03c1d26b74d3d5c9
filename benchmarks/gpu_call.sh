# The device call script of the latest session (rewritten per call; BENCHMARKS.md cites the exact python command of each
# result, which is what to rerun; earlier sessions' calls are in git history). benchmarks/gpu_run.sh holds the
# full menu of steps.
#   bash benchmarks/gpu_call.sh y   issue 8's RoPE table (plain, static fp8, QK-norm) at every M, and the KV-cache cases (ran)
#   bash benchmarks/gpu_call.sh z   compile-stage share with the TTIR analysis keyed by value (P36) (ran 2026-12-02)
#   bash benchmarks/gpu_call.sh t   2026-12-02: the whole GPU suite (TTIR key by value, value_key, disk cache since the last one)
#   bash benchmarks/gpu_call.sh c   2026-12-02: cold vs disk-warm compile share (TTIR answers on disk; P37)
#   bash benchmarks/gpu_call.sh g   2026-12-02: RoPE at head_dim 64 (GPT-OSS shape: 64/8 heads), every M (P39)
#   bash benchmarks/gpu_call.sh r   2026-12-02: the RoPE GPU tests (GPT-OSS chunk form on CUDA)
#   bash benchmarks/gpu_call.sh d   2026-12-02 (ninth session): declared kernel accesses: checked against torch 2.11,
#                                   then the e2e stage share of the MoE and dense decode rows and cold compiles (P40) (ran)
#   bash benchmarks/gpu_call.sh a   2026-12-02 (ninth session): the declaration tests (fuzzed flags too) on torch 2.11
#   bash benchmarks/gpu_call.sh m   2026-12-02 (ninth session): the demo as the README runs it (timed), the MoE decode
#                                   rows against mode "max-autotune-no-cudagraphs" too, the 2 GPU tests call v did not reach
#   bash benchmarks/gpu_call.sh v   2026-12-02 (ninth session): the whole GPU suite, every launch's declared accesses
#                                   checked against torch 2.11's analysis (tests/conftest.py sets FXFUSE_VERIFY_ACCESSES=1)
# Results are packed into one archive: the device returns at most 8 files.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT/res
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > $OUT/res/env.txt
case "${1:-y}" in
  y)  # 2026-12-01 seventh session, last call: issue 8's table at every M for the schemes not re-measured in call x
    timeout 220 python3 benchmarks/bench_rope_quant.py --schemes rope,rope_fp8_static,rope_qknorm --out $OUT/res/rope_quant_h200_all.json > $OUT/res/rope_all.log 2>&1
    echo "rope rc=$?"; grep -E "M=|gates" $OUT/res/rope_all.log | cut -c1-220
    timeout 70 python3 benchmarks/bench_rope_quant.py --cache --out $OUT/res/rope_quant_cache_h200.json > $OUT/res/rope_cache.log 2>&1
    echo "rope cache rc=$?"; grep -E "M=" $OUT/res/rope_cache.log | cut -c1-220 ;;
  z)  # next session: the TTIR key by value (later compiles reuse the analyses) in real compiles: the stage share
      # of the MoE decode rows (15.7% at the warm M=8 recompile before; predicted <= ~7%), then cold compiles
    T=$(python3 -c "import torch,os;print(os.path.dirname(torch.__file__))")
    grep -rn "identify_accessed_tensors\|identify_mutated_tensors" $T --include=*.py | cut -c1-200 > $OUT/res/ttir_entry_2_11.txt
    python3 -c "import torch, fxfuse._ttir_cache as c; print(torch.__version__, c.install(), [(m.__name__, n) for m, n, _ in c._installed])" >> $OUT/res/ttir_entry_2_11.txt 2>&1
    cat $OUT/res/ttir_entry_2_11.txt
    timeout 220 python3 benchmarks/e2e.py --quick --rep 300 --models moe --decode 1,8,64 --prefill "" --top 20 --out $OUT/res/e2e_moe_h200_decode_z.json > $OUT/res/e2e_moe.log 2>&1
    echo "e2e moe rc=$?"; grep -E "M=" $OUT/res/e2e_moe.log
    python3 -c "import json;[print(r['M'], r['fxfuse_pass_s'], r['compile_s'], r['fxfuse_pass_share_of_compile']) for r in json.load(open('$OUT/res/e2e_moe_h200_decode_z.json'))['models'][0]['rows']]"
    timeout 300 python3 benchmarks/compile_overhead.py --device cuda --compile --layers 2,4 --reps 2 --out $OUT/res/compile_overhead_h200_z.json > $OUT/res/compile_overhead.log 2>&1
    echo "compile overhead rc=$?"; grep -E '^\{' $OUT/res/compile_overhead.log | python3 -c "import sys,json;[print({k:v for k,v in json.loads(l).items() if 'compile' in k or 'pass_s' in k or k in ('model','layers')}) for l in sys.stdin]" ;;
  t)  # 2026-12-02: the whole GPU suite after the TTIR cache / value_key / disk changes
    if ls .whl/*.whl >/dev/null 2>&1; then  # torchao (carried: no network there)
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
    fi
    timeout 540 python3 -m pytest -m gpu -q -p no:cacheprovider tests > $OUT/res/gpu_tests_h200_2026-12-02_t.log 2>&1
    echo "gpu tests rc=$?"; tail -5 $OUT/res/gpu_tests_h200_2026-12-02_t.log ;;
  c)  # 2026-12-02: cold compile vs a new process with the TTIR answers on disk (P37)
    timeout 500 python3 benchmarks/compile_overhead.py --device cuda --compile --layers 2 --reps 2 --out $OUT/res/compile_overhead_h200_c.json > $OUT/res/compile_overhead_c.log 2>&1
    echo "compile overhead rc=$?"; grep -E '^\{' $OUT/res/compile_overhead_c.log | python3 -c "import sys,json;[print({k:v for k,v in json.loads(l).items() if 'compile' in k or 'pass_s' in k or 'disk' in k or k in ('model','layers')}) for l in sys.stdin]" ;;
  g)  # 2026-12-02: the head_dim-64 RoPE classes (GPT-OSS's RoPE fuses since the chunk form is read; its gate
      # took head_dim 128's figures as the nearest class until measured)
    timeout 400 python3 benchmarks/bench_rope_quant.py --shapes gpt_oss --schemes rope,rope_fp8_static,rope_fp8_dynamic --out $OUT/res/rope_quant_h200_gptoss.json > $OUT/res/rope_gptoss.log 2>&1
    echo "rope gpt_oss rc=$?"; grep -E "M=|gates|copy bandwidth" $OUT/res/rope_gptoss.log | cut -c1-220 ;;
  r)  # 2026-12-02: every RoPE GPU test, with the GPT-OSS chunk form's
    timeout 400 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_rope_quant.py tests/test_gating.py tests/test_regressions.py > $OUT/res/gpu_tests_h200_2026-12-02_r_rope.log 2>&1
    echo "gpu rope tests rc=$?"; tail -4 $OUT/res/gpu_tests_h200_2026-12-02_r_rope.log ;;
  a)  # declared accesses, every launch form and the fuzzed flag combinations, against torch 2.11's analysis
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_declared_accesses.py > $OUT/res/declared_accesses_h200_a.log 2>&1
    echo "declared accesses rc=$?"; tail -3 $OUT/res/declared_accesses_h200_a.log ;;
  m)  # the demo on the H200 (last run: H100, 2026-11-23, before the experts fused), max-autotune, the tests v missed
    start=$(date +%s)
    timeout 200 python3 -m fxfuse demo --quick --json $OUT/res/demo_h200_quick.json > $OUT/res/demo_h200_quick.log 2>&1
    echo "demo rc=$? wall $(( $(date +%s) - start )) s" | tee -a $OUT/res/demo_h200_quick.log; grep -E "x stock|decode|prefill" $OUT/res/demo_h200_quick.log | tail -8
    timeout 90 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_rope_quant.py -k "kv_cache_write_in_output_code or transformers_static_cache_in_output_code" > $OUT/res/gpu_tests_h200_2026-12-02_m.log 2>&1
    echo "gpu tests rc=$?"; tail -2 $OUT/res/gpu_tests_h200_2026-12-02_m.log
    timeout 240 python3 benchmarks/e2e.py --quick --max-autotune --rep 300 --models moe --decode 1,8,64 --prefill "" --top 12 --out $OUT/res/e2e_moe_h200_max_autotune.json > $OUT/res/e2e_moe_ma.log 2>&1
    echo "e2e max-autotune rc=$?"; grep -E "M=" $OUT/res/e2e_moe_ma.log ;;
  v)  # the whole GPU suite with declared accesses verified launch by launch
    if ls .whl/*.whl >/dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
    fi
    timeout 560 python3 -m pytest -m gpu -q -p no:cacheprovider tests > $OUT/res/gpu_tests_h200_2026-12-02_v.log 2>&1
    echo "gpu tests rc=$?"; tail -5 $OUT/res/gpu_tests_h200_2026-12-02_v.log ;;
  d)  # declared read/write sets of fxfuse's kernels instead of building their TTIR (P40)
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_declared_accesses.py > $OUT/res/declared_accesses_h200.log 2>&1
    echo "declared accesses rc=$?"; tail -3 $OUT/res/declared_accesses_h200.log
    timeout 230 python3 benchmarks/e2e.py --quick --rep 300 --models moe --decode 1,8,64 --prefill "" --top 20 --out $OUT/res/e2e_moe_h200_decode_d.json > $OUT/res/e2e_moe_d.log 2>&1
    echo "e2e moe rc=$?"; grep -E "M=" $OUT/res/e2e_moe_d.log
    timeout 150 python3 benchmarks/e2e.py --quick --rep 300 --fp8 own --models dense_fp8 --decode 1 --prefill "" --top 12 --out $OUT/res/e2e_dense_fp8_own_h200_decode_d.json > $OUT/res/e2e_dense_d.log 2>&1
    echo "e2e dense rc=$?"; grep -E "M=" $OUT/res/e2e_dense_d.log
    for f in $OUT/res/e2e_*_d.json; do python3 -c "import json;[print(r['model'], r['M'], r['fxfuse_pass_s'], r['compile_s'], r['fxfuse_pass_share_of_compile']) for r in json.load(open('$f'))['models'][0]['rows']]"; done ;;
esac
tar -C $OUT -czf $OUT/results.tgz res && rm -rf $OUT/res && echo "packed $OUT/results.tgz"
