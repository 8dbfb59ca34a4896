#!/bin/bash
# One device call for exact numerics (issue 4's greedy identity with PyTorch): the exact GPU tests, then
# bench/exact_parity.py (32 greedy steps vs PyTorch in float64, batch 1 and 8) on the examples:
#   run(command="bash bench/exact_session.sh", carry=[".whl"])
source bench/session_common.sh || exit 1
timeout $(left) python -m pytest -q -m gpu tests/test_gpu_megakernel.py -k exact 2>&1 | tail -8 \
  | tee "$OUT/gpu_tests_exact.txt"
echo "tests done at $((SECONDS - T0)) s"
timeout $(left) python bench/exact_parity.py "$OUT/exact_parity.json" ${MODELS:-llama3_2_1b,qwen3_0_6b} 32 \
  2>&1 | tail -12
echo "parity done at $((SECONDS - T0)) s"
[ "$(left)" -gt 150 ] && timeout $(left) python bench/exact_parity.py "$OUT/exact_parity_8b.json" qwen3_8b 32 1 \
  2>&1 | tail -4
echo "8b done at $((SECONDS - T0)) s"
