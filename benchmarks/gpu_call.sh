# One device call of this session (lead's script; see benchmarks/gpu_run.sh for the full menu).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT/res
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
PT="python3 -m pytest -q -p no:cacheprovider -rf"
# A. the raw-launcher tests: the 2026-12-01 second call stalled in test_launcher_real_shapes[random-shape0-1]
#    (decode, Qwen shape); a stack dump after 40 s shows where
timeout 90 $PT -o faulthandler_timeout=40 "tests/test_gpu_moe_experts.py::test_launcher_real_shapes" \
  "tests/test_gpu_moe_experts.py::test_cuda_graph_replay_new_routing" > $OUT/res/gpu_tests_launcher.log 2>&1
echo "A rc=$?"; grep -E "passed|failed|FAILED|Timeout|File \"/" $OUT/res/gpu_tests_launcher.log | grep -v "_pytest\|pluggy" | head -30
# B. the GPU tests that failed on 2026-12-01 (fixed since), and those touched by this session's changes
timeout 190 $PT -m gpu -o faulthandler_timeout=100 \
  "tests/test_gpu_moe_experts.py::test_weights_not_cloned" "tests/test_gpu_moe_experts.py::test_fused_kernel_in_output_code" \
  tests/test_flatten_quant.py tests/test_rope_quant.py tests/test_kernel_silu_mul_quant.py \
  "tests/test_regressions.py::test_gpu_dynamic_true_float_attributes_read_at_run_time" \
  > $OUT/res/gpu_tests_sel.log 2>&1; echo "B rc=$?"
grep -E "passed|failed|FAILED|ERROR|Timeout" $OUT/res/gpu_tests_sel.log | tail -25
# C. fp16 grouped_mm fallback with dynamic tokens
timeout 50 $PT -o faulthandler_timeout=35 "tests/test_gpu_moe_experts.py::test_fp16_grouped_fallback_and_dynamic_tokens" \
  > $OUT/res/gpu_fp16_dyn.log 2>&1; echo "C rc=$?"; grep -E "passed|failed|Timeout|File \"/" $OUT/res/gpu_fp16_dyn.log | grep -v "_pytest\|pluggy" | head -25
# D. benchmarks: SiLU-mul+quant (column split at small M), MoE experts (Triton align, prefill warps, Mixtral decode forms)
timeout 120 python3 benchmarks/bench_silu_mul_quant.py --quick --out $OUT/res/silu_mul_quant_h200_quick.json > $OUT/res/silu.log 2>&1; echo "silu rc=$?"; tail -6 $OUT/res/silu.log
timeout 100 python3 benchmarks/bench_moe_experts.py --quick --models qwen3_30b_a3b,mixtral_8x7b --impls grouped_mm --out $OUT/res/moe_experts_h200_quick.json > $OUT/res/moe.log 2>&1; echo "moe rc=$?"; tail -12 $OUT/res/moe.log
