#!/usr/bin/env bash
# The GPU check in one command, on a CUDA machine with this working tree and no network:
#
#     bash benchmarks/gpu_check.sh [OUT_DIR] [gpu_check.py options...]      # OUT_DIR default: out/gpu_check
#
# 1. the CUDA tests, `pytest -m cuda tests/test_cuda.py` (a failure is recorded, the script goes on);
# 2. benchmarks/gpu_check.py: matmul peak, XL training step + MFU, sampling images/s (docs/benchmarks.md), and
#    the accuracy of du/dt on DiT^DH-XL in float32, TF32 and bf16 autocast (docs/derivative_accuracy.md).
# Writes OUT_DIR/gpu_check.json (everything measured), gpu_check.log, cuda_tests.log and cuda_tests.xml.
# Needs torch, numpy, scipy (pytest for step 1); mfrae is found through PYTHONPATH=src, no install needed.
# The whole run stays within GPU_CHECK_BUDGET_S seconds (default 465, under 8 minutes); the tests get at most
# GPU_CHECK_TEST_TIMEOUT_S of it (default 170). Python: $PYTHON, else .venv/bin/python, else python3.
# Exit status: 0 when every test passed and every section ran, 1 otherwise (the JSON says what failed).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${1:-out/gpu_check}
if [ "$#" -gt 0 ]; then shift; fi
case "$OUT_DIR" in
  -*) echo "gpu_check.sh: the first argument is the output folder, got option '$OUT_DIR'" >&2; exit 2 ;;
esac
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)

if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x "$REPO/.venv/bin/python" ]; then
  PY=$REPO/.venv/bin/python
else
  PY=$(command -v python3 || command -v python || true)
fi
if [ -z "$PY" ]; then
  echo "gpu_check.sh: no python found (set PYTHON=...)" >&2
  exit 2
fi

export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
cd "$REPO"

TOTAL=${GPU_CHECK_BUDGET_S:-465}
TEST_TIMEOUT=${GPU_CHECK_TEST_TIMEOUT_S:-170}
START=$SECONDS

# Without torch nothing below can run: say so in one line (the JSON is still written by gpu_check.py).
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu_check.sh: $PY cannot import torch; set PYTHON to the interpreter that has PyTorch" >&2
fi

JUNIT=$OUT_DIR/cuda_tests.xml
rm -f "$JUNIT"
if "$PY" -c "import pytest" 2>/dev/null; then
  echo "== CUDA tests (pytest -m cuda, up to ${TEST_TIMEOUT} s)"
  set +e
  timeout "$TEST_TIMEOUT" "$PY" -m pytest -m cuda tests/test_cuda.py -q -ra -p no:cacheprovider \
    --junitxml "$JUNIT" 2>&1 | tee "$OUT_DIR/cuda_tests.log"
  TESTS_RC=${PIPESTATUS[0]}
  set -e
  echo "== CUDA tests: pytest exit code $TESTS_RC"
else
  echo "gpu_check.sh: pytest is not installed: the CUDA tests are skipped" | tee "$OUT_DIR/cuda_tests.log"
  TESTS_RC=missing
fi

BUDGET=$((TOTAL - (SECONDS - START) - 15))  # 15 s for start-up and the final write
if [ "$BUDGET" -lt 0 ]; then BUDGET=0; fi
set +e
"$PY" benchmarks/gpu_check.py --out "$OUT_DIR" --budget-s "$BUDGET" --junit "$JUNIT" --tests-rc "$TESTS_RC" "$@"
CHECK_RC=$?
set -e
echo "== gpu_check.sh done in $((SECONDS - START)) s: $OUT_DIR/gpu_check.json"
if [ "$CHECK_RC" -ne 0 ] || [ "$TESTS_RC" != 0 ]; then
  exit 1
fi
