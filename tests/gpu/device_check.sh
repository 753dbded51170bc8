#!/usr/bin/env bash
# The GPU check in one go (issue 18): `make test-gpu`, then the four benchmarks with
# `--device cuda` in quick modes, each step's output in $OUT/ (else /tmp/gpu_check), a summary
# in summary.txt. Sized for about 8 minutes on one GPU (each step has its own time limit).
#
#   tests/gpu/device_check.sh                  # on a machine with CUDA
#   DEVICE_CHECK_DRY=1 tests/gpu/device_check.sh   # without CUDA: every step still runs (the
#                                              # suite skips, each benchmark refuses --device cuda)
#
# Without CUDA (and without DEVICE_CHECK_DRY=1) it stops at once, exit 2, saying why.
# The Python: $PY, else .venv/bin/python, else python3 (the device machine's, with torch). The
# package is imported from this checkout (PYTHONPATH). Packages that Python lacks (opacus, needed
# at import; breaching, optional: attack_vs_breaching then runs our side only) can come as wheels
# in $WHEELS (default .whl), installed with --no-index into /tmp/site first. The device image
# (python3 with torch, lightning, timm, pytest-timeout; no network) lacks opacus; its needs are
# there. Before the run, in the repo root (.whl ignored through .git/info/exclude, carried):
#   echo /.whl/ >>.git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl opacus==1.6.0
#   (optional, for Breaching's side: breaching==0.1.2 hydra-core omegaconf antlr4-python3-runtime
#    lpips, each --no-deps; without them that benchmark runs our side only)
set -u -o pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }

if [ -n "${PY:-}" ]; then :; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl || { say "device_check: installing $WHEELS failed"; exit 3; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4

say "device_check $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), python $PY"
if ! "$PY" - <<'EOF' 2>&1 | tee -a "$SUMMARY"; then
import sys
import torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
for i in range(torch.cuda.device_count()):
    print(f"  cuda:{i} {torch.cuda.get_device_name(i)}")
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
  if [ "${DEVICE_CHECK_DRY:-0}" != 1 ]; then
    say "device_check: no CUDA device here (torch.cuda.is_available() is False, or torch does"
    say "  not import with $PY; see above); nothing run."
    say "  Run it on a machine with a GPU, or with DEVICE_CHECK_DRY=1 to exercise the steps."
    exit 2
  fi
  say "device_check: no CUDA; DEVICE_CHECK_DRY=1, so the steps run anyway (expect skips/refusals)"
fi
command -v nvidia-smi >/dev/null && nvidia-smi -L 2>&1 | tee -a "$SUMMARY"
if ! "$PY" -c "import lightning_privacy.callbacks" 2>"$OUT/import_error.txt"; then
  say "device_check: lightning_privacy does not import with $PY:"
  tail -n 3 "$OUT/import_error.txt" | tee -a "$SUMMARY"
  say "  bring the missing packages as wheels in $WHEELS (see the header of this script)"
  exit 3
fi
rm -f "$OUT/import_error.txt"

FAILED=0
step() {  # step NAME SECONDS COMMAND...: runs it under a time limit, output to $OUT/NAME.txt
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  say "== $name (limit ${limit}s): $*"
  timeout -k 10 "$limit" "$@" >"$OUT/$name.txt" 2>&1
  rc=$?
  say "   rc=$rc in $(($(date +%s) - start)) s$([ $rc = 124 ] && echo ' (timed out)')"
  [ $rc = 0 ] || FAILED=$((FAILED + 1))
}

# `make test-gpu` without rebuilding a venv (the device machine is offline): VENV is the
# Python's own prefix and its stamp is taken as up to date.
VENV=$(cd "$(dirname "$PY")/.." && pwd)
step test_gpu 210 make -o "$VENV/.installed" test-gpu VENV="$VENV"
step defense_overhead 75 "$PY" benchmarks/defense_overhead.py --quick --device cuda --threads 4
step i2f_cost 45 "$PY" benchmarks/i2f_cost.py --quick --device cuda
step i2f_scale 90 "$PY" benchmarks/i2f_scale.py --quick --device cuda --threads 4
step attack_vs_breaching 60 "$PY" benchmarks/attack_vs_breaching.py --quick --device cuda --curve ''
say "device_check: $FAILED step(s) failed; outputs in $OUT"
[ "$FAILED" = 0 ]
