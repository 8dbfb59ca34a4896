#!/bin/bash
# One device call for the work written without a GPU: run it with `.whl` carried, e.g.
#   run(command="bash bench/device_pending.sh", carry=[".whl"])
# .whl (git-ignored) holds lark, gguf and z3-solver wheels for Python 3.12 (the forced attention program is
# proved with Z3 before use); fill it here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     lark==1.3.1 gguf==0.19.0 z3-solver==4.15.4.0
# Every part has its own time bound, so one slow part cannot take the others' results with it.
bash bench/dev_setup.sh || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# 1. the GPU tests: in-kernel sampling (mk_sample, resident output mode 2), in-kernel KV pages
#    (mk_pages.cuh, kernel_pages=True), the multi-step kernel's mk_walk, the shared host helpers
timeout 230 python -m pytest -q -m gpu tests/test_gpu_megakernel.py tests/test_gpu_persistent.py \
  tests/test_gpu_step_backend.py tests/test_superopt_megakernel.py 2>&1 | tail -30 | tee "$OUT/gpu_tests.txt"
# 2. the found split-KV paged attention forced into the real megakernel (issue 5)
timeout 70 python bench/superopt_megakernel_check.py --force decode_attention --models qwen3_0_6b \
  --out "$OUT/superopt_mk_attn_qwen3_0_6b.json" 2>&1 | tail -6
# 3. sampled generation throughput: host sampling vs in-kernel sampling vs in-kernel sampling + KV pages
timeout 100 python bench/engine_bench.py "$OUT/engine_sampled.json" llama3_2_1b 1,8 --sampled 2>&1 | tail -4
