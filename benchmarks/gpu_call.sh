# One device call of this session (lead's script; see benchmarks/gpu_run.sh for the full menu).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT/res
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
# 1. the GPU tests that failed on 2026-12-01 (fixed since), and those touched by this session's changes
timeout 230 python3 -m pytest -q -p no:cacheprovider -m gpu \
  "tests/test_gpu_moe_experts.py::test_weights_not_cloned" \
  "tests/test_gpu_moe_experts.py::test_fused_kernel_in_output_code" \
  "tests/test_gpu_moe_experts.py::test_launcher_real_shapes" \
  "tests/test_gpu_moe_experts.py::test_cuda_graph_replay_new_routing" \
  tests/test_flatten_quant.py tests/test_rope_quant.py tests/test_kernel_silu_mul_quant.py \
  "tests/test_regressions.py::test_gpu_dynamic_true_float_attributes_read_at_run_time" \
  > $OUT/res/gpu_tests_sel.log 2>&1; echo "gpu tests rc=$?"
grep -E "passed|failed|FAILED|ERROR" $OUT/res/gpu_tests_sel.log | tail -25
# 2. the test that stalled the 2026-12-01 second call: stack dump after 50 s
timeout 75 python3 -m pytest -q -p no:cacheprovider -o faulthandler_timeout=50 \
  "tests/test_gpu_moe_experts.py::test_fp16_grouped_fallback_and_dynamic_tokens" > $OUT/res/gpu_fp16_dyn.log 2>&1
echo "fp16 dyn rc=$?"; grep -E "passed|failed|File \"/|Thread|Timeout" $OUT/res/gpu_fp16_dyn.log | grep -v site-packages/_pytest | head -40
# 3. benchmarks: SiLU-mul+quant (column split at small M), MoE experts (prefill warps; Mixtral decode forms)
timeout 130 python3 benchmarks/bench_silu_mul_quant.py --quick --out $OUT/res/silu_mul_quant_h200_quick.json > $OUT/res/silu.log 2>&1; echo "silu rc=$?"; tail -6 $OUT/res/silu.log
timeout 110 python3 benchmarks/bench_moe_experts.py --quick --models qwen3_30b_a3b,mixtral_8x7b --impls grouped_mm --out $OUT/res/moe_experts_h200_quick.json > $OUT/res/moe.log 2>&1; echo "moe rc=$?"; tail -12 $OUT/res/moe.log
