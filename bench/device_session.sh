#!/bin/bash
# One device call for issue 4's scheduling work: the GPU tests of the default plan, then A/B runs and a trace:
#   run(command="bash bench/device_ab.sh", carry=[".whl"])
bash bench/dev_setup.sh || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
T0=$SECONDS
left() { echo $((580 - SECONDS + T0)); }
timeout 200 python -m pytest -q -m gpu tests/test_gpu_megakernel.py tests/test_gpu_persistent.py \
  tests/test_gpu_step_backend.py 2>&1 | tail -8 | tee "$OUT/gpu_tests.txt"
timeout 120 python bench/op_check.py "$OUT/opcheck.json" llama3_2_1b,qwen3_0_6b 1,8 2>&1 | tail -12
echo "checks done at $((SECONDS - T0)) s"
timeout $(left) python bench/ab_step.py "$OUT/ab_desc.json" llama3_2_1b,qwen3_8b 1,8 MPKIR_DESC_PREFETCH=0 MPKIR_DESC_PREFETCH=1
timeout $(left) python bench/trace_summary.py llama3_2_1b 1 2>&1 | tee "$OUT/trace_llama_b1.txt"
