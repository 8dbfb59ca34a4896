#!/bin/bash
# Issue 4's unmet targets (Llama-3.2-1B b1 within 2x of the floor, Llama b8 and Qwen3-8B b8 ahead of CUDA
# graphs): A/B of the pipelined weight streams, and where a Llama b1 step's time goes. Carry `.whl`.
bash bench/dev_setup.sh || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
timeout 170 python bench/ab_step.py "$OUT/ab_gemv.json" llama3_2_1b,qwen3_8b 1 MPKIR_GEMV_PIPE=0 MPKIR_GEMV_PIPE=1
timeout 200 python bench/ab_step.py "$OUT/ab_mma.json" llama3_2_1b,qwen3_8b 8 MPKIR_MMA_PIPE=0 MPKIR_MMA_PIPE=2 \
  MPKIR_MMA_PIPE=3
timeout 120 python bench/trace_summary.py llama3_2_1b,qwen3_8b 1,8 2>&1 | tee "$OUT/trace_summary.txt"
