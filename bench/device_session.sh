#!/bin/bash
# The one device call that checks and measures issue 4 with the default plan: the GPU tests, the bench table
# (megakernel vs PyTorch eager and CUDA graph, same run, floor), per-op checks, sampled generation:
#   run(command="bash bench/device_session.sh", carry=[".whl"])
# .whl (git-ignored) holds lark, gguf and z3-solver wheels for Python 3.12; fill it here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     lark==1.3.1 gguf==0.19.0 z3-solver==4.15.4.0
source bench/session_common.sh || exit 1
for m in llama3_2_1b qwen3_0_6b qwen3_8b; do
  timeout $(left) python -m mpkir bench examples/$m.mpk --batch 1,8 --torch --json "$OUT/bench_$m.json" 2>&1 | tail -4
done
echo "bench done at $((SECONDS - T0)) s"
timeout $(left) python -m pytest -q -m gpu tests/test_gpu_megakernel.py tests/test_gpu_persistent.py \
  tests/test_gpu_step_backend.py tests/test_superopt_megakernel.py 2>&1 | tail -8 | tee "$OUT/gpu_tests.txt"
echo "tests done at $((SECONDS - T0)) s"
timeout $(left) python bench/op_check.py "$OUT/opcheck.json" llama3_2_1b,qwen3_0_6b 1,8 2>&1 | tail -6
timeout $(left) python bench/engine_bench.py "$OUT/engine_sampled.json" llama3_2_1b 1,8 --sampled 2>&1 | tail -4
