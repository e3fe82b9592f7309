#!/usr/bin/env bash
# Everything about vitp that only a GPU can show, in one command, in under 8 minutes on one H100/H200.
#
#   bash benchmarks/gpu_check.sh            # on a CUDA machine (no network needed, unless DeepSpeed is missing: then one pip try)
#   bash benchmarks/gpu_check.sh --dry-run  # every step on tiny models on the CPU (CI runs this)
#
# Steps, each with its own time budget (the rest are skipped with a note once the total is spent):
#   environment  CUDA, the GPU, DeepSpeed (pip-installed from the package index if missing and possible)
#   prepare      a small image + conversation data set and its tokenizer
#   gpu-tests    pytest -m gpu (tests/gpu and the other gpu-marked tests): ViT/VLM vs transformers in bf16, flash SDPA, packed kernels,
#                TMAug drop, `vitp features` on the GPU vs the CPU, GPU FAISS vs CPU FAISS
#   torchrun, zero1, zero2, zero3, fsdp2
#                two steps of `vitp pretrain` under torchrun --nproc_per_node 1, saved, resumed to a
#                third, loaded by transformers (configs/zero*.json, configs/fsdp.json)
#   features     ViT forward images/s and MFU (InternViT-300M, 448 px, bf16, batch 32 and 64)
#   train        train-step tokens/s and peak memory (InternViT-300M + Qwen2-0.5B shape, bf16)
#   downstream   segmentation train-step images/s, MFU and peak memory (UPerNet + ViT-Adapter on InternViT-300M,
#                512 px, bf16 autocast; FLOPs counted by FlopCounterMode on one step)
# The table goes to stdout, and to $OUT/gpu_check.md and $OUT/gpu_check.json when OUT is set.
# Environment: PYTHON (default: python3), GPU_CHECK_BUDGET_S (total seconds; 450, dry run 240).
set -u -o pipefail

DRY_RUN=0
for argument in "$@"; do
  case "$argument" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$argument' (expected --dry-run or --help)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DRY_FLAG=()
if [ "$DRY_RUN" = 1 ]; then
  DRY_FLAG=(--dry-run)
  export VITP_GPU_TESTS_ON_CPU=1  # tests/gpu run on the CPU with tiny models
  BUDGET="${GPU_CHECK_BUDGET_S:-240}"
else
  BUDGET="${GPU_CHECK_BUDGET_S:-450}"
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/vitp-gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
STEPS="$WORK/steps.tsv"
RESULTS="$WORK/results.jsonl"
: > "$STEPS"
DEADLINE=$((SECONDS + BUDGET))
BENCH=("$PYTHON" benchmarks/gpu_bench.py)

record() {  # step, result, seconds, note (tabs and newlines removed)
  local note="${4//$'\t'/ }"
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${note//$'\n'/ }" >> "$STEPS"
}

# run_step NAME BUDGET_S COMMAND...: runs COMMAND with at most BUDGET_S (or what is left of the total),
# logs it to $WORK/NAME.log, records pass/fail/timeout; skips it when less than 20 s are left.
run_step() {
  local name="$1" budget="$2"
  shift 2
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 20 ]; then
    record "$name" skipped 0 "the ${BUDGET} s budget was spent"
    echo "== $name: skipped (time budget spent)"
    return 0
  fi
  [ "$budget" -gt "$left" ] && budget="$left"
  echo "== $name (at most ${budget} s)"
  local start=$SECONDS rc
  timeout -k 10 "$budget" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  local seconds=$((SECONDS - start)) result=pass note
  note="$(grep -v '^\s*$' "$WORK/$name.log" | grep -v 'Loading weights' | tail -n 1 | cut -c1-160)"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    result=timeout; note="stopped after its ${budget} s budget; last line: $note"
  elif [ "$rc" -ne 0 ]; then
    result=fail
  fi
  [ "$result" != pass ] && tail -n 40 "$WORK/$name.log" | sed "s/^/   $name| /"
  record "$name" "$result" "$seconds" "$note"
  echo "   $result in ${seconds} s: $note"
}

# --- environment: CUDA is required (except in the dry run); DeepSpeed from the package index if missing
if ! "${BENCH[@]}" environment "${DRY_FLAG[@]}"; then
  echo "gpu_check.sh: no CUDA GPU; nothing measured" >&2
  exit 2
fi
HAVE_DEEPSPEED=0
if [ "$DRY_RUN" = 0 ]; then
  if "$PYTHON" -c "import deepspeed" 2>/dev/null; then
    HAVE_DEEPSPEED=1
  else
    echo "== deepspeed missing: pip install deepspeed (package index only, at most 120 s)"
    if timeout 120 "$PYTHON" -m pip install --quiet --disable-pip-version-check --retries 1 --timeout 15 deepspeed > "$WORK/pip.log" 2>&1 \
       && "$PYTHON" -c "import deepspeed" 2>/dev/null; then
      HAVE_DEEPSPEED=1
      record deepspeed-install pass 0 "installed from the package index"
    else
      record deepspeed-install missing 0 "not installable here: $(tail -n 1 "$WORK/pip.log" | cut -c1-120)"
    fi
  fi
fi

# --- the steps (budgets sum to about the total: later steps are cut or skipped when earlier ones overrun)
run_step prepare 60 "${BENCH[@]}" prepare --work "$WORK"
# every gpu-marked test on a GPU; on the CPU the device-agnostic ones of tests/gpu (others call .cuda())
TESTS=tests
[ "$DRY_RUN" = 1 ] && TESTS=tests/gpu
run_step gpu-tests 120 "$PYTHON" -m pytest "$TESTS" -m gpu -q -p no:cacheprovider -rs
run_step torchrun 75 "${BENCH[@]}" resume --work "$WORK" --name torchrun "${DRY_FLAG[@]}"
for stage in 1 2 3; do
  if [ "$DRY_RUN" = 1 ]; then
    record "zero$stage" skipped 0 "dry run: DeepSpeed needs CUDA"
  elif [ "$HAVE_DEEPSPEED" = 0 ]; then
    record "zero$stage" skipped 0 "deepspeed is not installed and could not be installed"
  else
    run_step "zero$stage" 75 "${BENCH[@]}" resume --work "$WORK" --name "zero$stage" -- \
      --deepspeed "configs/zero$stage.json"
  fi
done
if [ "$DRY_RUN" = 1 ]; then
  record fsdp2 skipped 0 "dry run: FSDP needs CUDA"
else
  run_step fsdp2 75 "${BENCH[@]}" resume --work "$WORK" --name fsdp2 -- \
    --fsdp "full_shard auto_wrap" --fsdp_config configs/fsdp.json
fi

# the never-run sharded trainings above first; then the measurements
run_step features 60 "${BENCH[@]}" features --results "$RESULTS" "${DRY_FLAG[@]}"
run_step train 90 "${BENCH[@]}" train --results "$RESULTS" "${DRY_FLAG[@]}"
run_step downstream 60 "${BENCH[@]}" downstream --results "$RESULTS" "${DRY_FLAG[@]}"

echo
"${BENCH[@]}" table --results "$RESULTS" --steps "$STEPS" ${OUT:+--out "$OUT"}
echo "total: $SECONDS s (budget ${BUDGET} s)"
if grep -qP '\t(fail|timeout)\t' "$STEPS"; then
  exit 1
fi
exit 0
