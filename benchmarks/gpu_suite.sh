#!/usr/bin/env bash
# What a lent H100/H200 should run. A GPU session here has about 15 minutes of device time, so the part
# that matters fits ONE device call of at most 8 minutes; a second, optional call holds the rest:
#
#   bash benchmarks/gpu_suite.sh quick   # (1) install offline, no build; (2) the CUDA tests; (3) bench_paths.py:
#                                        # layer fwd+bwd of PEFT LoRA, public, fused and slab at 64..16384 tokens,
#                                        # the crossover table and the measured auto table; (4) a shortened
#                                        # Table 7 if time is left; (5) the kernel cost report
#   bash benchmarks/gpu_suite.sh full    # optional: build the CUDA extension, bench_layer.py on the 7B shapes,
#                                        # table7.py (7B, accumulation 16 and 1), pytest-benchmark, a QLoRA layer
#   bash benchmarks/gpu_suite.sh quick --dry-run   # the same steps on the CPU at tiny size (CI runs it)
#
# Results go to $OUT when set (the device tool brings back at most 8 files: each part writes its log,
# the record of its steps, its results, summary.md and path_table.json, and keeps Table 7's chart and
# Markdown in scratch), else benchmarks/results/ (benchmarks/results/dry-run/ for a dry run). Every
# step runs under `timeout`, capped by what is left of the part's budget (SUITE_BUDGET_S, default 470 s
# for quick, 510 s for full), and is stopped with SIGINT first, so that pytest still writes its
# report; a failing step is logged and the rest still run; the exit status is non-zero if any step
# failed or timed out. Steps write as they go (the log, pytest's junit report, each benchmark's JSON).
# SUITE_ONLY=step,step (e.g. SUITE_ONLY=table7) runs only those of the part's steps after the set-up,
# to redo one in a later device call.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PART=quick
DRY_RUN=0
for arg in "$@"; do
  case $arg in
    quick | full) PART=$arg ;;
    --dry-run) DRY_RUN=1 ;;
    *) echo "usage: bash benchmarks/gpu_suite.sh [quick|full] [--dry-run]" >&2; exit 2 ;;
  esac
done

if [[ -n ${OUT:-} ]]; then RESULTS_DIR=$OUT
elif ((DRY_RUN)); then RESULTS_DIR=$ROOT/benchmarks/results/dry-run
else RESULTS_DIR=$ROOT/benchmarks/results
fi
mkdir -p "$RESULTS_DIR"
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
LOG=$RESULTS_DIR/suite-$PART.log
STEPS=$SCRATCH/steps.tsv
: >"$LOG"
: >"$STEPS"

# OUT: the benchmark scripts write their default files there (benchmarks/common.py's RESULTS).
export OUT=$RESULTS_DIR PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ((DRY_RUN)); then
  export CUDA_VISIBLE_DEVICES=""  # a dry run is a CPU run, even on a GPU machine
  SIZE=tiny
else
  SIZE=7b
fi
if [[ $PART == quick ]]; then BUDGET=${SUITE_BUDGET_S:-470}; else BUDGET=${SUITE_BUDGET_S:-510}; fi
SUMMARY_RESERVE=20  # seconds kept for the summary at the end
FAILED=0

note() { echo "$*" | tee -a "$LOG"; }

STEP_NOTE=""  # set just before a step to annotate its record
record() {  # step status exit_code seconds note
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$STEPS"
  note "=== [$PART] $1: $2 (exit $3, ${4}s)${5:+: $5}"
  STEP_NOTE=""
}

skip() {  # step reason
  record "$1" skipped - 0 "$2"
}

step() {  # step limit_s command...: run it under timeout, logged, whatever the outcome
  local name=$1 limit=$2
  shift 2
  if [[ -n ${SUITE_ONLY:-} && ",$SUITE_ONLY,install,build-cuda-extension," != *",$name,"* ]]; then
    skip "$name" "not in SUITE_ONLY=$SUITE_ONLY"
    return 0
  fi
  local left=$((BUDGET - SECONDS - SUMMARY_RESERVE))
  if ((left < 15)); then
    FAILED=1
    record "$name" "not run" - 0 "out of time (part budget ${BUDGET}s)"
    return 1
  fi
  ((limit > left)) && limit=$left
  note "=== [$PART] $name (timeout ${limit}s): $*"
  local start=$SECONDS code status
  timeout --signal=INT --kill-after=20 "$limit" "$@" >>"$LOG" 2>&1
  code=$?
  case $code in
    0) status=passed ;;
    124 | 137) status="timed out"; FAILED=1 ;;
    *) status=failed; FAILED=1 ;;
  esac
  record "$name" "$status" "$code" $((SECONDS - start)) "$STEP_NOTE"
  return $code
}

cuda_only() {  # step limit_s command...: a step that needs a GPU (skipped in a dry run)
  local name=$1
  shift
  if ((DRY_RUN)); then skip "$name" "dry run: needs CUDA"; else step "$name" "$@"; fi
}

if_time_left() {  # step limit_s reserve_s command...: run it only with at least 30 s left after the reserve
  local name=$1 limit=$2 reserve=$3 left
  shift 3
  left=$((BUDGET - SECONDS - SUMMARY_RESERVE - reserve))
  if ((left < 30)); then skip "$name" "no time left (${left}s after keeping ${reserve}s for the later steps)"; return 0; fi
  ((limit > left)) && limit=$left
  step "$name" "$limit" "$@"
}

note "gpu_suite $PART$( ((DRY_RUN)) && echo ' (dry run, CPU)') -> $RESULTS_DIR | budget ${BUDGET}s"

# --- set-up (both parts: each device call may land on a fresh machine) ---
if ((DRY_RUN)); then
  skip install "dry run: this environment is left alone (PYTHONPATH=$ROOT)"
else
  # The image has torch, triton, peft, transformers and pytest-benchmark and no network: no deps,
  # no build isolation, no native build (the full part builds the CUDA extension, timed on its own).
  if ! step install 60 env FLATLORA_NO_NATIVE=1 python -m pip install --no-build-isolation --no-deps -e .; then
    FAILED=0  # the first step, and PYTHONPATH already points at this checkout: not a failure of the suite
    note "install failed: going on with PYTHONPATH=$ROOT (the fallback; not counted as a failure)"
  fi
fi
# --- the parts ---
# table7.py with its chart and Markdown kept in scratch and its JSON copied out (the device tool brings
# back 8 files at most; the summary prints Table 7 from the JSON).
TABLE7="python benchmarks/table7.py --out-dir '$SCRATCH/table7' \"\$@\" && cp '$SCRATCH'/table7/*.json '$RESULTS_DIR'/"
if [[ $PART == quick ]]; then
  # The CUDA tests of the paths, the kernels beside the reference, the guard on every fused variant, and
  # every (cuda, backend) case of the layer's tests; all skip without CUDA.
  tests=(tests/test_cuda.py tests/test_flat_lora_linear.py tests/test_layer.py -k cuda)
  step tests-cuda 140 python -m pytest "${tests[@]}" -q -p no:cacheprovider -rf \
    --junitxml="$RESULTS_DIR/tests-cuda.xml"
  # The paths need Triton: on the CPU, the interpreter (a dry run checks the script, not the speed).
  if ((DRY_RUN)); then
    paths_run=(env TRITON_INTERPRET=1 FLATLORA_BACKEND=triton python benchmarks/bench_paths.py --preset tiny --reps 1)
  else
    paths_run=(python benchmarks/bench_paths.py --preset 7b)
  fi
  step bench-paths 150 "${paths_run[@]}"
  # Table 7's chart and Markdown stay in scratch (the summary prints its table from the JSON).
  if ((DRY_RUN)); then t7_args=(--preset tiny --steps 2); else t7_args=(--preset 7b --steps 3); fi
  if_time_left table7-short 120 100 bash -c "$TABLE7" table7 "${t7_args[@]}" --grad-accum 16
  # Compiles for sm_90 without a GPU, so never under the interpreter.
  step kernel-budget 120 env -u TRITON_INTERPRET python benchmarks/kernel_budget.py \
    --out "$RESULTS_DIR/kernel-budget.json"
else
  cuda_only build-cuda-extension 300 bash -c 'MAX_JOBS=${MAX_JOBS:-16} python setup.py build_ext --inplace &&
    python -c "from flatlora_kernels.native import native_cuda_available as ok; assert ok(), \"built without CUDA\""'
  if ((DRY_RUN)); then layer_args=(--preset tiny --reps 2); else layer_args=(--preset 7b); fi
  step bench-layer 150 python benchmarks/bench_layer.py "${layer_args[@]}"
  if ((DRY_RUN)); then t7_args=(--preset tiny --steps 2); else t7_args=(--preset 7b --steps 12); fi
  step table7 270 bash -c "$TABLE7" table7 "${t7_args[@]}" --grad-accum 16 1
  if ((DRY_RUN)); then
    bench_args=(-k "t16 or 80x96" --benchmark-min-rounds=1 --benchmark-max-time=0.01)
  else
    bench_args=(--benchmark-min-rounds=10 --benchmark-max-time=0.1
                --benchmark-warmup=on --benchmark-warmup-iterations=2)
  fi
  step pytest-benchmark 300 env FLATLORA_BENCH_SIZE=$SIZE python -m pytest benchmarks -q -p no:cacheprovider \
    --benchmark-only --benchmark-json="$RESULTS_DIR/pytest-benchmark.json" "${bench_args[@]}"
  # Last, so it takes only what the budget has left after the others.
  if ((DRY_RUN)); then qlora_args=(--quick --reps 1); else qlora_args=(); fi
  step qlora-layer 120 python benchmarks/bench_qlora_memory.py "${qlora_args[@]}" \
    --out "$RESULTS_DIR/qlora-layer.json"
fi

# --- the record of this part's steps, and summary.md over everything in the results folder ---
dry_flag=()
((DRY_RUN)) && dry_flag=(--dry-run)
if ! python benchmarks/gpu_summary.py "$RESULTS_DIR" --part "$PART" --steps "$STEPS" "${dry_flag[@]}" \
    >>"$LOG" 2>&1; then
  note "=== [$PART] summary: failed (see $LOG)"
  FAILED=1
fi
# The head of summary.md (steps, tests, goals) last on the console: the device tool returns the tail.
[[ -f $RESULTS_DIR/summary.md ]] && awk '/^## (GPU paths|Layer|Table 7|Micro)/ {exit} {print}' "$RESULTS_DIR/summary.md"
if ((FAILED)); then verdict="some steps failed"; else verdict="all steps passed or were skipped"; fi
note "gpu_suite $PART: $verdict (${SECONDS}s)"
exit $FAILED
