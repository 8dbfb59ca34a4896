#!/bin/bash
# Device-machine setup (lent GPU): the carried wheels (.whl: lark, gguf) into /tmp/site, mpkir editable.
# Use: bash bench/dev_setup.sh && export PYTHONPATH=/tmp/site:$PWD:$PYTHONPATH
W=.whl; [ -d .whl ] || W=.whl_lite  # (.whl_lite: lark and gguf only, for calls that carry other data)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $W/*.whl \
  || exit 1
python3 -m pip install -q --no-build-isolation --no-deps -e . >/tmp/pip_e.log 2>&1 || { tail -20 /tmp/pip_e.log; exit 1; }
nvidia-smi --query-gpu=name,temperature.gpu,clocks.sm,clocks.mem,power.draw --format=csv,noheader
date -u
