#!/bin/bash
# One device call (machines are scarce): the pending GPU checks first (issues 5, 6), then issue 4's A/B and
# traces in whatever time is left:  run(command="bash bench/device_session.sh", carry=[".whl"])
# .whl (git-ignored) holds lark, gguf and z3-solver wheels for Python 3.12 (forced found programs are proved
# with Z3 before use); fill it here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     lark==1.3.1 gguf==0.19.0 z3-solver==4.15.4.0
bash bench/dev_setup.sh || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
T0=$SECONDS
left() { echo $((575 - SECONDS + T0)); }
timeout 170 python -m pytest -q -m gpu tests/test_gpu_megakernel.py tests/test_gpu_persistent.py \
  tests/test_gpu_step_backend.py tests/test_superopt_megakernel.py 2>&1 | tail -30 | tee "$OUT/gpu_tests.txt"
echo "tests done at $((SECONDS - T0)) s"
timeout 50 python bench/superopt_megakernel_check.py --force decode_attention --models qwen3_0_6b \
  --out "$OUT/superopt_mk_attn_qwen3_0_6b.json" 2>&1 | tail -6
timeout 60 python bench/superopt_megakernel_check.py --force norm_linear --models qwen3_0_6b \
  --out "$OUT/superopt_mk_normlin_qwen3_0_6b.json" 2>&1 | tail -6
timeout 80 python bench/engine_bench.py "$OUT/engine_sampled.json" llama3_2_1b 1,8 --sampled 2>&1 | tail -4
echo "checks done at $((SECONDS - T0)) s"
timeout $(left) python bench/ab_step.py "$OUT/ab_mma.json" qwen3_8b,llama3_2_1b 8 MPKIR_MMA_PIPE=0 MPKIR_MMA_PIPE=3
timeout $(left) python bench/ab_step.py "$OUT/ab_gemv.json" llama3_2_1b 1 MPKIR_GEMV_PIPE=0 MPKIR_GEMV_PIPE=1
timeout $(left) python bench/trace_summary.py llama3_2_1b 1 2>&1 | tee "$OUT/trace_llama_b1.txt"
