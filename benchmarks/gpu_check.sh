#!/usr/bin/env bash
# GPU check for the lent H100/H200 box: install (builds csrc), `pytest -m gpu`, the InfoNCE tile sweep and
# `sslfast bench` for every registered op. Everything lands under $OUT (default ./gpu_out).
#   benchmarks/gpu_check.sh [tests] [tune] [bench] [--ops OP ...]   (no step named: all three)
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
steps=(); ops=()
while [ $# -gt 0 ]; do
  case "$1" in
    --ops) shift; while [ $# -gt 0 ]; do ops+=("$1"); shift; done ;;
    *) steps+=("$1"); shift ;;
  esac
done
[ ${#steps[@]} -eq 0 ] && steps=(tests tune bench)
has() { [[ " ${steps[*]} " == *" $1 "* ]]; }

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/env.txt"
SSLFAST_REQUIRE_CUDA_BUILD=1 timeout 300 python3 -m pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
  || { echo "install failed"; tail -40 "$OUT/install.log"; }
python3 -c "import sslfast._C" 2>&1 && echo "csrc: sslfast._C imports" | tee -a "$OUT/env.txt"

if has tests; then
  timeout 900 python3 -m pytest -m gpu -q -rfE -p no:cacheprovider tests ${ops:+-k "${ops[*]}"} >"$OUT/pytest_gpu.txt" 2>&1
  echo "pytest -m gpu exit $?"; tail -25 "$OUT/pytest_gpu.txt"
fi
if has tune; then
  timeout 600 python3 benchmarks/tune_infonce.py --json "$OUT/tune.json" >"$OUT/tune.txt" 2>&1
  grep BEST "$OUT/tune.txt"
fi
if has bench; then
  timeout 1200 python3 -m sslfast.cli bench --warmup 2 --repeat 7 ${ops:+--ops "${ops[@]}"} --json "$OUT/bench.json" --plot "$OUT/bench.png" \
    --quiet >"$OUT/bench.txt" 2>&1
  echo "bench exit $?"; cat "$OUT/bench.txt" | tail -60
fi
