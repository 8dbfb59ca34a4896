#!/bin/bash
# One device call for the JIT launch modes (issue 4): GPU tests, then an A/B of placed attention
# (MPKIR_JIT=0) vs scheduler-launched (MPKIR_JIT=1, MPKIR_JIT_QUEUE=sched) vs ticket-claimed (ticket) at
# batch 1, 8 and 64, and a trace of the scheduler mode:
#   run(command="bash bench/jit_session.sh", carry=[".whl"])
source bench/session_common.sh || exit 1
timeout $(left) python -m pytest -q -m gpu tests/test_gpu_megakernel.py tests/test_gpu_persistent.py \
  tests/test_gpu_step_backend.py 2>&1 | tail -8 | tee "$OUT/gpu_tests.txt"
echo "tests done at $((SECONDS - T0)) s"
V0="MPKIR_JIT=0" V1="MPKIR_JIT=1,MPKIR_JIT_QUEUE=sched" V2="MPKIR_JIT=1,MPKIR_JIT_QUEUE=ticket"
timeout $(left) python bench/ab_step.py "$OUT/ab_jit.json" llama3_2_1b,qwen3_8b 1,8,64 "$V0" "$V1" "$V2" 2>&1 | tail -20
echo "ab done at $((SECONDS - T0)) s"
MPKIR_JIT=1 timeout $(left) python bench/trace_summary.py llama3_2_1b 1,64 2>&1 | tee "$OUT/trace_jit_sched.txt" | head -60
