#!/usr/bin/env bash
# The GPU suite: build ctmq on a GPU machine (torch, triton, nvcc and ninja
# present; no network needed), run the GPU tests and benchmarks, and report.
#
#   bash benchmarks/gpu_suite.sh                  # stage 1, then stage 2
#   SUITE_STAGE=1 bash benchmarks/gpu_suite.sh    # binary kernels and deploy
#   SUITE_STAGE=2 bash benchmarks/gpu_suite.sh    # quantizers and the training step
#
# Stage 1: build, the mma layout probe, the binary conv and deploy GPU tests,
# the binary conv benchmark, the deploy benchmark. Stage 2: the quantizer
# kernel tests, the fake-quant benchmark, the QAT-step benchmark. Each stage
# builds what it needs, so either runs alone on a bare machine.
#
# SUITE_DEADLINE_S (default: 470 s for stage 1, 330 s for stage 2, summed over the
# stages asked for; a cold H200 ran stage 1 in 166 s, its build 44 s, and stage 2
# in 89 s with the build cached): steps that would start after it are skipped,
# and a running step is stopped there. Each step prints the seconds it took. Whatever ends the
# suite (the deadline, a failure, Ctrl-C, SIGTERM), it prints the summary table
# and leaves at most 6 files in $OUT (default: a new temp folder): summary.txt,
# the benchmarks' JSON (each written row by row, so a stopped benchmark keeps
# what it measured) and logs.tar.gz with every step's log.
# Exit status: 0 all steps passed, 1 a step failed, 2 steps were skipped.
# SUITE_DRY_RUN=1 runs each step as `sleep $SUITE_DRY_RUN_SLEEP` (default 1):
# the suite's own plumbing, testable without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."

cuda_home() {  # the toolkit folder, asked of nvcc itself (`which nvcc` may be a wrapper script)
  if [ -n "${CUDA_HOME:-}" ]; then echo "$CUDA_HOME"; return; fi
  local nvcc top
  nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  [ -x "$nvcc" ] || return 0
  top=$("$nvcc" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
  [ -z "$top" ] && top=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
  readlink -f "$top"
}

build() {  # ctmq._C (with its CUDA kernels unless CTMQ_SKIP_CUDA_BUILD=1); C++ alone if that fails
  local home
  home=$(cuda_home)
  if [ -n "$home" ] && [ -x "$home/bin/nvcc" ]; then
    export CUDA_HOME=$home
    echo "CUDA_HOME=$CUDA_HOME"
  else
    echo "warning: no CUDA toolkit found (nvcc): the CUDA kernels will not be built"
  fi
  # the CUDA build gets its own limit, so that the C++ fallback still fits the step's
  if ! MAX_JOBS=${MAX_JOBS:-$(nproc)} timeout "${SUITE_BUILD_TIMEOUT:-150}" python3 setup.py build_ext --inplace; then
    echo "the build failed: building the C++ kernels alone (CTMQ_SKIP_CUDA_BUILD=1)"
    CTMQ_SKIP_CUDA_BUILD=1 python3 setup.py build_ext --inplace
    return 1  # reported as failed; the steps after it still run
  fi
  python3 -c "import ctmq; from ctmq import binary, ops; print('bmma built:', ops.bmma_built()); print(binary.backend_info())"
}

if [ "${1:-}" = --build ]; then build; exit; fi

OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
STAGES=${SUITE_STAGE:-1 2}
budget=0
for stage in $STAGES; do
  case $stage in 1) budget=$((budget + 470)) ;; 2) budget=$((budget + 330)) ;; esac
done
DEADLINE_S=${SUITE_DEADLINE_S:-$budget}
STEP_TIMEOUT=${STEP_TIMEOUT:-200}   # seconds: no single step may take the whole window
LOGS=$(mktemp -d)
START=$SECONDS
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
RESULTS=()   # "name|status|seconds|detail"
status=0

summary() {
  {
    echo "== GPU suite summary (stages: $STAGES; $((SECONDS - START)) s of a $DEADLINE_S s deadline)"
    printf '%-18s %-22s %6s  %s\n' step status seconds detail
    for r in "${RESULTS[@]}"; do
      IFS='|' read -r name st secs detail <<< "$r"
      printf '%-18s %-22s %6s  %s\n' "$name" "$st" "$secs" "$detail"
    done
    if ls "$OUT"/*.json > /dev/null 2>&1; then
      python3 benchmarks/summarize.py "$OUT" 2>&1
    fi
  } | tee "$OUT/summary.txt"
  rm -f "$OUT"/*.tmp  # a benchmark stopped while rewriting its JSON
  tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2> /dev/null
  rm -rf "$LOGS"
}
on_exit() {
  trap - EXIT INT TERM
  if [ -n "${CURRENT:-}" ]; then  # stopped inside a step: stop it (timeout passes it on)
    if [ -n "${STEP_PID:-}" ]; then kill -TERM "$STEP_PID" 2> /dev/null; wait "$STEP_PID" 2> /dev/null; fi
    RESULTS+=("$CURRENT|interrupted|$((SECONDS - CURRENT_T0))|$(tail -n 1 "$LOGS/$CURRENT.log" 2> /dev/null)")
    status=1
  fi
  summary
  exit "$status"
}
trap on_exit EXIT
trap 'status=1; exit 1' INT TERM

step() {  # step NAME CMD...: run with a timeout within the deadline, log to $LOGS/NAME.log
  local name=$1; shift
  # 15 s kept back: a stopped step's kill-after grace and the summary
  local left=$((DEADLINE_S - (SECONDS - START) - 15))
  if [ "$left" -le 5 ]; then
    echo "== $name: skipped (deadline)"
    RESULTS+=("$name|skipped (deadline)|0|")
    [ "$status" -eq 0 ] && status=2
    return 1
  fi
  local limit=$(( left < STEP_TIMEOUT ? left : STEP_TIMEOUT ))
  echo "== $name (limit ${limit} s): $*"
  CURRENT=$name CURRENT_T0=$SECONDS STEP_PID=
  if [ -n "${SUITE_DRY_RUN:-}" ]; then
    set -- sleep "${SUITE_DRY_RUN_SLEEP:-1}"
  fi
  # in the background: `wait` returns at once on a signal, so the trap runs now
  timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1 &
  STEP_PID=$!
  wait "$STEP_PID"
  local rc=$? secs=$((SECONDS - CURRENT_T0))
  CURRENT=
  # pytest's closing line, or the log's last line
  local detail
  detail=$(grep -E "[0-9]+ (passed|failed|error|skipped).* in [0-9.]+s" "$LOGS/$name.log" | tail -n 1 | tr -d '=')
  [ -z "$detail" ] && detail=$(tail -n 1 "$LOGS/$name.log")
  if [ "$rc" -eq 0 ]; then
    echo "   ok (${secs} s) $detail"
    RESULTS+=("$name|ok|$secs|$detail")
    return 0
  fi
  local why="FAILED (exit $rc)"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && why="FAILED (time limit)"
  echo "   $why (${secs} s); last lines:"; tail -n 20 "$LOGS/$name.log" | sed 's/^/   | /'
  RESULTS+=("$name|$why|$secs|$detail")
  status=1
  return 1
}

if [ -z "${SUITE_DRY_RUN:-}" ]; then
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
fi
PYTEST=(python3 -m pytest -q -p no:cacheprovider)
# stage 2 alone needs the C++ kernels only, not the (slower) CUDA build
case " $STAGES " in *" 1 "*) ;; *) export CTMQ_SKIP_CUDA_BUILD=${CTMQ_SKIP_CUDA_BUILD:-1} ;; esac
built=
for stage in $STAGES; do
  if [ -z "$built" ]; then step build bash benchmarks/gpu_suite.sh --build; built=1; fi
  case $stage in
    1)
      # the mma fragment layout the CUDA emulator assumes, against the GPU itself
      step tests_mma "${PYTEST[@]}" tests/test_csrc_cuda.py -k mma_matches
      step tests_binary "${PYTEST[@]}" tests/test_kernels_binary.py tests/test_deploy.py -k "triton or cuda or bmma"
      step bench_binary_conv python3 benchmarks/bench_binary_conv.py --device cuda --json "$OUT/binary_conv.json"
      step bench_deploy python3 benchmarks/bench_deploy.py --device cuda --models resnet18 --json "$OUT/deploy.json"
      ;;
    2)
      step tests_quant "${PYTEST[@]}" tests/test_kernels_quant.py
      step bench_fake_quant python3 benchmarks/bench_fake_quant.py --device cuda --no-compile --json "$OUT/fake_quant.json"
      step bench_qat_step python3 benchmarks/bench_qat_step.py --device cuda --json "$OUT/qat_step.json"
      ;;
    *) echo "SUITE_STAGE must be 1, 2 or '1 2', got '$stage'"; status=1 ;;
  esac
done
