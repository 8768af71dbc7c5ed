#!/usr/bin/env bash
# One prepared GPU check (issue 23): every CUDA test, the DiT benchmark, the planner against CUDA memory and ring
# attention on one GPU, each section under its own time limit.
#
#   tools/gpu_check.sh [OUTDIR] [--tiny]        OUTDIR defaults to gpu-results/
#
# Runs from the working tree with the host's own python3 (or $PYTHON): every packages/*/src, tools/ and tests/ go
# on PYTHONPATH, nothing is installed. Each section appends one line to OUTDIR/summary.txt as it ends (name, exit
# code, seconds, its ENV / RESULT / SKIP / NOT MEASURED / FAILED lines), its whole output goes to OUTDIR/<section>.log, so a run
# cut short still reports the sections before. Sections whose feature is missing print a SKIP line. On one GPU the
# whole run takes under 7 minutes (the limits below add up to 420 s). --tiny runs the same sections at tiny sizes
# on a CPU (the CUDA tests then skip) in about a minute: tools/tests/test_gpu_check.py runs it with the test suite.
set -u

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }
OUT=gpu-results
TINY=""
SECTION=""  # internal: run one section (the script runs itself under timeout once per section)
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) TINY=--tiny ;;
    --section) SECTION=$2; shift ;;
    -h | --help) usage; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) OUT=$1 ;;
  esac
  shift
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
PY=${PYTHON:-python3}
SRC=$(printf '%s:' "$ROOT"/packages/*/src)
export PYTHONPATH="${SRC}$ROOT/tools:$ROOT/tests${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
if [ -n "$TINY" ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  LIMITS=(env=30 cuda_tests=200 gpu_dit=200 planner=200 ring=150)  # only against hangs: CPUs here are shared
else
  LIMITS=(env=15 cuda_tests=140 gpu_dit=190 planner=55 ring=20)
fi
limit() { local pair; for pair in "${LIMITS[@]}"; do [ "${pair%%=*}" = "$1" ] && echo "${pair#*=}"; done; }

SUMMARY=$OUT/summary.txt

# section NAME: run it (this script with --section NAME) under its limit, log it, append its summary line.
section() {
  local name=$1 seconds log=$OUT/$1.log begin rc lines took
  seconds=$(limit "$name")
  begin=$(date +%s.%N)
  timeout -k 10 "$seconds" bash "$ROOT/tools/gpu_check.sh" "$OUT" $TINY --section "$name" >"$log" 2>&1
  rc=$?
  took=$(awk -v a="$begin" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && echo "TIMEOUT after ${seconds} s" >>"$log"
  lines=$(grep -E '^(ENV|RESULT|SKIP|NOT MEASURED|TIMEOUT|FAILED) ' "$log" | tr '\n' ';' | sed 's/;$//; s/;/ | /g')
  echo "$name rc=$rc seconds=$took limit=$seconds${lines:+ | $lines}" >>"$SUMMARY"
  echo "$name rc=$rc seconds=$took"
  return $rc
}

# a python module's availability, as a SKIP line when it is missing
missing() { "$PY" -c "import $1" >/dev/null 2>&1 && return 1; echo "SKIP $2: $1 is not importable with $PY"; }

env_report() {
  "$PY" - <<'EOF'
import glob, platform
from importlib import metadata

line = f"ENV python={platform.python_version()} torch={metadata.version('torch')}"
if glob.glob("/dev/nvidia*"):  # importing torch costs seconds: only where a GPU may be
    import torch

    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    memory = f" memory={torch.cuda.mem_get_info()[1] / 2**30:.1f}GiB" if cuda else ""
    line += f" cuda={torch.version.cuda} device={name}{memory}"
else:
    line += " device=cpu"
print(line)
EOF
  date -u +'ENV date=%Y-%m-%dT%H:%M:%SZ host='"$(hostname)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv
  return 0
}

cuda_tests() {
  missing pytest cuda_tests && return 0
  local files=() f
  for f in tests/test_cuda*.py packages/*/tests/test_cuda*.py tools/tests/test_cuda*.py; do
    [ -e "$f" ] && files+=("$f")
  done
  [ ${#files[@]} -eq 0 ] && { echo "SKIP cuda_tests: no test_cuda*.py"; return 0; }
  # no xdist, not the repo's addopts (plugins may be absent here), 90 s a test where pytest-timeout is installed;
  # diffusers-free files only. -v: a cut-off run still shows each test's outcome.
  "$PY" -m pytest -m cuda -p no:cacheprovider -p no:xdist -o addopts= -o timeout=90 --import-mode=importlib \
    -v --tb=short -rfEs --durations=8 --junitxml="$OUT/cuda_tests.xml" "${files[@]}"
  local rc=$?
  "$PY" - "$OUT/cuda_tests.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite[0]
n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
print(f"RESULT cuda_tests_passed={n['tests'] - n['failures'] - n['errors'] - n['skipped']}")
print(f"RESULT cuda_tests_failed={n['failures'] + n['errors']}")
print(f"RESULT cuda_tests_skipped={n['skipped']}")
EOF
  return $rc
}

bench() {  # bench SECTION SCRIPT: run tools/bench/SCRIPT, or say it is missing
  [ -e "tools/bench/$2" ] || { echo "SKIP $1: tools/bench/$2 does not exist"; return 0; }
  "$PY" "tools/bench/$2" $TINY
}

planner() {
  "$PY" -c "import litegen.plan" >/dev/null 2>&1 || { echo "SKIP planner: litegen.plan is not importable"; return 0; }
  bench planner planner_gpu.py
}

ring() {
  "$PY" -c "import litegen_sp.ring" >/dev/null 2>&1 || { echo "SKIP ring: litegen_sp.ring is not importable"; return 0; }
  bench ring ring_one_gpu.py
}

if [ -n "$SECTION" ]; then
  case "$SECTION" in
    env) env_report ;;
    cuda_tests) cuda_tests ;;
    gpu_dit) bench gpu_dit gpu_dit.py ;;
    planner) planner ;;
    ring) ring ;;
    *) echo "gpu_check.sh: no section $SECTION" >&2; exit 2 ;;
  esac
  exit $?
fi

: >"$SUMMARY"
START=$(date +%s)
echo "gpu_check: $OUT (python: $PY${TINY:+, tiny})"
FAILED=0
for name in env cuda_tests gpu_dit planner ring; do
  section "$name" || FAILED=$((FAILED + 1))
done
echo "total failed_sections=$FAILED seconds=$(($(date +%s) - START))" >>"$SUMMARY"
cat "$SUMMARY"
[ $FAILED -eq 0 ]
