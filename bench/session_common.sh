# Sourced by the device-session scripts: set up the machine (bench/dev_setup.sh), the import path, the output
# folder ($OUT, or /tmp/out) and left(): the seconds left of the call's 580.
bash bench/dev_setup.sh || return 1
export PYTHONPATH=/tmp/site:$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
T0=$SECONDS
left() { echo $((580 - SECONDS + T0)); }
