#!/usr/bin/env bash
# The one command a GPU session runs, from the repository root:
#
#   bash benchmarks/gpu_check.sh [OUTDIR]             # default OUTDIR: benchmarks/results/gpu-<date>
#   bash benchmarks/gpu_check.sh --dry-run OUTDIR     # (or GPU_CHECK_DRY_RUN=1) rehearsal on a CPU
#
# Steps, each under its own `timeout`, each run even when an earlier one failed:
#   env          nvidia-smi, nvcc, Python/torch/triton versions, git commit   -> env.txt
#   install      pip install --no-build-isolation -e . with the CUDA extension built ahead of time
#                for sm_90 only (FFKERN_BUILD_EXT=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16), test
#                deps only if missing                                         -> install.log
#   extension    loads the extension; it must have its CUDA kernels (a JIT build happens here if
#                the ahead-of-time one is not found)                          -> install.log
#   test_gpu     pytest tests/test_gpu.py                                     -> test_gpu.log
#   conformance  pytest tests/test_conformance.py, its CUDA cases            -> test_conformance.log
#   bench        benchmarks/gpu_bench.py                                      -> bench.log, bench.json, bench.txt
# then summary.json (every step's status, exit code, seconds and reason). That is 8 files, the
# most the device tool hands back from $OUT, so OUTDIR can be $OUT itself.
#
# The whole run stops by GPU_CHECK_TOTAL_S seconds (default 465, under 8 minutes on an H200): a
# step gets at most what is left, and a step that cannot start in time is recorded as a failure.
# Exit status: 0 when every step that ran passed, 1 otherwise.
#
# Dry run: tiny sizes on the CPU with TRITON_INTERPRET=1 and no GPU visible (CUDA_VISIBLE_DEVICES
# is emptied), no install and no extension build (the ffkern importable here is used); the steps
# that need CUDA are skipped and say so. About 30 s on a 2-core machine; it checks the script.
set -u -o pipefail

DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
OUTDIR=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) sed -n '2,/^set -u/p' "$0" | sed '$d'; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) OUTDIR=$arg ;;
  esac
done
[ "$DRY_RUN" = 1 ] || DRY_RUN=0

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUTDIR=${OUTDIR:-$REPO/benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$REPO" || exit 2

PYTHON=${PYTHON:-python3}
START=$SECONDS
if [ "$DRY_RUN" = 1 ]; then
  TOTAL_S=${GPU_CHECK_TOTAL_S:-150}
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
else
  TOTAL_S=${GPU_CHECK_TOTAL_S:-465}
  # the GPU machine has no network: pip must neither look for a newer pip nor wait on an index
  export FFKERN_BUILD_EXT=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
  if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
    export PATH=/usr/local/cuda/bin:$PATH  # torch finds CUDA_HOME through nvcc
  fi
fi
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
RESERVE_S=10  # kept for the summary
STEPS=$(mktemp)  # name <TAB> status <TAB> rc <TAB> seconds <TAB> reason, one line a step
trap 'rm -f "$STEPS"' EXIT
FAILED=0

record() {  # record NAME STATUS RC SECONDS REASON
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$(printf '%s' "$5" | tr '\t\n' '  ')" >>"$STEPS"
  printf '== %-12s %-8s %4ss  %s\n' "$1" "$2" "$4" "$5"
  case "$2" in ok | skipped) ;; *) FAILED=1 ;; esac
}

skip() {  # skip NAME REASON: a step that does not apply here (not a failure)
  record "$1" skipped "" 0 "$2"
}

step() {  # step NAME MAX_SECONDS LOG CMD...: runs CMD under timeout, output to LOG and the terminal
  local name=$1 max=$2 log=$3
  shift 3
  local left=$((TOTAL_S - (SECONDS - START) - RESERVE_S))
  if ((left < 15)); then
    record "$name" failed "" 0 "not started: out of time (total limit ${TOTAL_S}s)"
    return 1
  fi
  local limit=$((max < left ? max : left)) t0=$SECONDS rc shown
  shown=$(printf '%s ' "$@" | tr '\n' ' ' | tr -s ' ' | cut -c1-160)
  echo "== $name (limit ${limit}s): $shown" | tee -a "$log"
  # timeout signals the whole process group: pytest workers and compilers go with it
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  local took=$((SECONDS - t0))
  if ((rc == 0)); then
    record "$name" ok 0 "$took" ""
  elif ((rc == 124 || rc == 137)); then
    record "$name" timeout "$rc" "$took" "killed after its limit of ${limit}s (see $(basename "$log"))"
  else
    record "$name" failed "$rc" "$took" "exit status $rc (see $(basename "$log"))"
  fi
  return "$rc"
}

seconds_left() { echo $((TOTAL_S - (SECONDS - START) - RESERVE_S)); }

# -------------------------------------------------------------------------------- env
ENV_PY='
import os, platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| cudnn", torch.backends.cudnn.version())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton: not importable:", exc)
import numpy
print("numpy", numpy.__version__)
try:
    import ffkern
    print("ffkern", ffkern.__version__, "from", os.path.dirname(ffkern.__file__))
except ImportError as exc:
    print("ffkern: not importable yet:", exc)
for name in ("pytest", "hypothesis", "pytest_benchmark", "xdist"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"))
    except ImportError:
        print(name, "missing")
print("cuda available:", torch.cuda.is_available(), "| devices:", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name} sm_{p.major}{p.minor} {p.total_memory / 2**30:.1f} GiB {p.multi_processor_count} SMs")
print("env:", {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "TORCH_CUDA_ARCH_LIST",
                                              "MAX_JOBS", "FFKERN_BUILD_EXT", "FFKERN_BACKEND", "CUDA_HOME")})
if os.environ.get("GPU_CHECK_NEED_CUDA") == "1" and not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch")
'
env_report() {
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  uname -a
  echo "nproc $(nproc)"
  echo "git $(git rev-parse HEAD 2>/dev/null || echo '(no git)') $(git status --porcelain 2>/dev/null | wc -l) changed files"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  if command -v nvcc >/dev/null; then nvcc --version | tail -n 2; else echo "nvcc: not found"; fi
  GPU_CHECK_NEED_CUDA=$((1 - DRY_RUN)) "$PYTHON" -c "$ENV_PY"
}
export -f env_report
export PYTHON DRY_RUN ENV_PY
echo "gpu_check: $([ "$DRY_RUN" = 1 ] && echo 'DRY RUN, ')output in $OUTDIR, total limit ${TOTAL_S}s"
step env 60 "$OUTDIR/env.txt" bash -c env_report

# ------------------------------------------------------------------ install, extension
INSTALL_SH='
set -o pipefail
"$PYTHON" -m pip install --no-build-isolation --no-deps -e . || exit 1
# test dependencies only if missing (there may be no index to install them from)
if ! "$PYTHON" -c "import pytest, hypothesis, pytest_benchmark" 2>/dev/null; then
  "$PYTHON" -m pip install --retries 0 --timeout 15 pytest hypothesis pytest-benchmark ||
    echo "pip could not install the test dependencies"
  "$PYTHON" -c "import pytest, hypothesis" || exit 1
fi
'
EXTENSION_PY='
import torch
from ffkern import _backend
from ffkern.cpp import build
reason = _backend._instance("cpp").unavailable_reason(torch.device("cuda"))
print("cpp extension:", build.STATE.origin or "(not loaded)", "| CUDA kernels:", build.STATE.has_cuda)
print("  (a path under torch_extensions means the ahead-of-time build was not found and a JIT build ran)")
if reason is not None:
    raise SystemExit(f"backend cpp cannot run on CUDA: {reason}")
'
if [ "$DRY_RUN" = 1 ]; then
  skip install "dry run: no install, no extension build (uses the ffkern importable here)"
  skip extension "dry run: needs CUDA"
else
  step install 300 "$OUTDIR/install.log" bash -c "$INSTALL_SH"
  step extension 240 "$OUTDIR/install.log" "$PYTHON" -c "$EXTENSION_PY"
fi

# ------------------------------------------------------------------------------ tests
PYTEST=("$PYTHON" -m pytest -ra -q -p no:cacheprovider --durations=15)
XDIST_GPU=() XDIST_CONF=()
if [ "$DRY_RUN" = 0 ] && "$PYTHON" -c "import xdist" 2>/dev/null; then
  # Triton compiles on the CPU: workers overlap it. loadgroup keeps the tens-of-GB tests (marked
  # xdist_group) on one worker, so no two of them hold GPU memory at once.
  XDIST_GPU=(-n 4 --dist loadgroup)
  XDIST_CONF=(-n 8)
fi
step test_gpu 210 "$OUTDIR/test_gpu.log" "${PYTEST[@]}" "${XDIST_GPU[@]}" tests/test_gpu.py
if [ "$DRY_RUN" = 1 ]; then
  skip conformance "dry run: the conformance suite's CUDA cases need CUDA"
else
  # the CPU cases run in CI; here only the backends on CUDA (ids triton-cuda, cpp-cuda)
  step conformance 180 "$OUTDIR/test_conformance.log" "${PYTEST[@]}" "${XDIST_CONF[@]}" -k cuda tests/test_conformance.py
fi

# ---------------------------------------------------------------------------- bench
left=$(seconds_left)
bench_budget=$((left - 25 < 170 ? left - 25 : 170))  # the script's own budget, inside the step's limit
if ((bench_budget < 20)); then
  record bench failed "" 0 "not started: out of time (total limit ${TOTAL_S}s)"
else
  BENCH=("$PYTHON" benchmarks/gpu_bench.py --out "$OUTDIR" --time-budget "$bench_budget")
  [ "$DRY_RUN" = 1 ] && BENCH+=(--dry-run)
  step bench $((bench_budget + 20)) "$OUTDIR/bench.log" "${BENCH[@]}"
fi

# -------------------------------------------------------------------------- summary
SUMMARY_PY='
import json, sys
path, steps_file, dry, total, limit = sys.argv[1:6]
steps = []
for line in open(steps_file):
    name, status, rc, seconds, reason = line.rstrip("\n").split("\t")
    steps.append({"name": name, "status": status, "rc": int(rc) if rc else None, "seconds": int(seconds),
                  "reason": reason})
failed = [s["name"] for s in steps if s["status"] not in ("ok", "skipped")]
json.dump({"dry_run": dry == "1", "total_s": int(total), "limit_s": int(limit), "ok": not failed,
           "failed": failed, "steps": steps}, open(path, "w"), indent=1)
'
"$PYTHON" -c "$SUMMARY_PY" "$OUTDIR/summary.json" "$STEPS" "$DRY_RUN" $((SECONDS - START)) "$TOTAL_S" ||
  FAILED=1
echo
echo "gpu_check: $((SECONDS - START)) s; steps:"
cut -f1,2,4,5 "$STEPS" | awk -F'\t' '{ printf "  %-12s %-8s %4ss  %s\n", $1, $2, $3, $4 }'
echo "results in $OUTDIR ($(ls "$OUTDIR" | wc -l) files)"
if ((FAILED)); then
  echo "gpu_check: FAILED"
  exit 1
fi
echo "gpu_check: all steps passed"
