#!/usr/bin/env bash
# GPU check for the lent H100/H200 box: install (builds csrc), `pytest -m gpu`, the InfoNCE tile sweep,
# `sslfast bench` and a profile (kernels vs host) of the cases still off target. Everything lands under $OUT
# (default ./gpu_out); the last lines printed are the tables.
#   STEPS="tests e2e tune bench profile"   which steps (default: these five; "maxbatch" adds the largest batch per
#                              method and path, benchmarks/max_batch.py with MAXBATCH_ARGS; "launchcache" the cached
#                              launch path's GPU check: tests/test_launch_cache.py and `sslfast bench` with
#                              SSLFAST_LAUNCH_CACHE=1, into bench_cached.{txt,json} beside the bench step's rows)
#   E2E_ARGS                   passed to `sslfast bench --ops e2e` (default: SimCLR ResNet-50 B=256 224 px on
#                              2,000 generated JPEGs, every row: torch + reference ... native + --cuda-graph, DALI)
#   TEST_FILES="tests/..."     test files for `pytest -m gpu` (default: all)
#   BENCH_OPS / BENCH_CASES    passed to `sslfast bench --ops / --cases` (default: everything)
#   TUNE_ARGS                  passed to benchmarks/tune_infonce.py (the tune step also runs tune_mae.py)
#   PROFILE_CASES              regexes for benchmarks/profile_ops.py (default: the cases off target); the
#                              profile step first times single launches (--launch-costs)
#   PROFILE_PYTHON=N           also cProfile N calls per profiled case
#   SKIP_INSTALL=1, BENCH_TAG  for a second call in the same session (bench$BENCH_TAG.{txt,json})
#   TESTS_S / E2E_S / TUNE_S / BENCH_S / PROFILE_S / MAXBATCH_S  each step's time limit in seconds (short leases)
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STEPS=${STEPS:-tests e2e tune bench profile}
has() { [[ " $STEPS " == *" $1 "* ]]; }
# a per-test time limit where pytest-timeout is installed (pytest refuses the flag otherwise)
PYTEST_TIMEOUT=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout 240")

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/env.txt"
if [ -z "${SKIP_INSTALL:-}" ]; then
  SSLFAST_REQUIRE_CUDA_BUILD=1 timeout 300 python3 -m pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
    || { echo "install failed"; tail -40 "$OUT/install.log"; }
  python3 -c "import sslfast._C" 2>&1 && echo "csrc: sslfast._C imports" | tee -a "$OUT/env.txt"
fi

if has tests; then
  timeout ${TESTS_S:-900} python3 -m pytest -m gpu -q -rfE -p no:cacheprovider --continue-on-collection-errors ${PYTEST_TIMEOUT} \
    ${TEST_FILES:-tests} >"$OUT/pytest_gpu.txt" 2>&1
  echo "pytest -m gpu exit $?"; grep -E "passed|failed|error" "$OUT/pytest_gpu.txt" | tail -30
fi
if has e2e; then
  timeout ${E2E_S:-600} python3 -m sslfast.cli bench --ops e2e ${E2E_ARGS:-} --json "$OUT/e2e.json" >"$OUT/e2e.txt" 2>&1
  echo "e2e exit $?"; grep -v '^{' "$OUT/e2e.txt" | tail -20
fi
if has tune; then
  timeout ${TUNE_S:-600} python3 benchmarks/tune_infonce.py --json "$OUT/tune.json" ${TUNE_ARGS:-} >"$OUT/tune.txt" 2>&1
  echo "tune exit $?"; grep -E "BEST|Error|error" "$OUT/tune.txt" | tail -20
  timeout ${TUNE_S:-600} python3 benchmarks/tune_mae.py >"$OUT/tune_mae.txt" 2>&1  # rows as JSON lines
  echo "tune_mae exit $?"; grep -E "BEST|Error|error" "$OUT/tune_mae.txt" | tail -5
fi
if has bench; then
  tag=${BENCH_TAG:-}
  timeout ${BENCH_S:-1200} python3 -m sslfast.cli bench --warmup 2 --repeat 7 ${BENCH_OPS:+--ops $BENCH_OPS} \
    ${BENCH_CASES:+--cases $BENCH_CASES} --json "$OUT/bench$tag.json" >"$OUT/bench$tag.txt" 2>&1
  echo "bench exit $?"; grep -v '^{' "$OUT/bench$tag.txt" | tail -70
fi
if has profile; then
  default_cases='"barlow_twins N=256" "barlow_twins N=2048" "vicreg N=256" "^mae [a-z]" "^ema ViT-B" "nt_xent 2x16384" "moco_queue N=4096"'
  eval "set -- ${PROFILE_CASES:-$default_cases}"
  timeout ${PROFILE_S:-600} python3 benchmarks/profile_ops.py --launch-costs --python ${PROFILE_PYTHON:-0} \
    --cases "$@" --json "$OUT/profile.json" >"$OUT/profile.txt" 2>&1
  echo "profile exit $?"; grep -E " us |wall|Error" "$OUT/profile.txt" | tail -40
fi
if has launchcache; then
  SSLFAST_LAUNCH_CACHE=1 timeout ${TESTS_S:-900} python3 -m pytest -m gpu -q -rfE -p no:cacheprovider ${PYTEST_TIMEOUT} \
    tests/test_launch_cache.py >"$OUT/pytest_launch_cache.txt" 2>&1
  echo "pytest -m gpu (launch cache on) exit $?"; grep -E "passed|failed|error" "$OUT/pytest_launch_cache.txt" | tail -10
  SSLFAST_LAUNCH_CACHE=1 timeout ${BENCH_S:-1200} python3 -m sslfast.cli bench --warmup 2 --repeat 7 \
    ${BENCH_OPS:+--ops $BENCH_OPS} ${BENCH_CASES:+--cases $BENCH_CASES} --json "$OUT/bench_cached.json" \
    >"$OUT/bench_cached.txt" 2>&1
  echo "bench (launch cache on) exit $?"; grep -v '^{' "$OUT/bench_cached.txt" | tail -70
fi
if has maxbatch; then
  timeout ${MAXBATCH_S:-600} python3 benchmarks/max_batch.py ${MAXBATCH_ARGS:-} --json "$OUT/max_batch.json" \
    >"$OUT/max_batch.txt" 2>&1
  echo "maxbatch exit $?"; grep -E '^\{|Error' "$OUT/max_batch.txt" | tail -20
fi
