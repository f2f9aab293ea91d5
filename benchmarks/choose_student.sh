#!/usr/bin/env bash
# The "Choosing the student" table of docs/results.md: layer-dropped students of the demo's teacher,
# each fine-tuned for 60 steps, then evaluated against the teacher on 24 held-out SelfInst prompts.
#
#   bash scripts/demo.sh --out runs/demo        # the teacher and the data (this script reuses them)
#   bash benchmarks/choose_student.sh runs/demo runs/choose   # ~1 h on 2 CPU cores; resumable
#
# Rows: NAME LAYERS DATA ALGO LR, with LAYERS "a-b,c-d" (teacher indices kept), DATA t0ref (T0's
# references) or t0 (the teacher's answers to the same prompts, which the demo writes as
# DIR/data/t0_train). Each run: TP=1, one process, 60 steps x 8 sequences, cosine lr to lr/10 (the
# demo's SFT otherwise). The no-training ranking: python benchmarks/rank_students.py --teacher-hf DIR/teacher_hf.
# Environment: STEPS (default 60), ONLY (a regex: the rows whose name matches), for a quick check.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEMO="${1:?usage: choose_student.sh DEMO_DIR OUT_DIR}" OUT="${2:?usage: choose_student.sh DEMO_DIR OUT_DIR}"
source "$ROOT/scripts/setup_venv.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"

ROWS=(
  "even8-ref-1e-4     0,4,8,12,17,21,25,29  t0ref sft 1e-4"  # the demo before: fragments
  "even8-1e-4         0,4,8,12,17,21,25,29  t0    sft 1e-4"
  "first4last4-1e-4   0-3,26-29             t0    sft 1e-4"
  "first4last4-5e-4   0-3,26-29             t0    sft 5e-4"
  "first2last6-1e-4   0-1,24-29             t0    sft 1e-4"
  "first2last6-5e-4   0-1,24-29             t0    sft 5e-4"
  "first2last6-1e-3   0-1,24-29             t0    sft 1e-3"
  "first2last6-kd-5e-4 0-1,24-29            t0    kd  5e-4"
  "first4last6-1e-3   0-3,24-29             t0    sft 1e-3"
  "first4last8-5e-4   0-3,22-29             t0    sft 5e-4"
  "first4last8-1e-3   0-3,22-29             t0    sft 1e-3"  # the demo's choice
)
LOADS=()
STEPS="${STEPS:-60}"
for row in "${ROWS[@]}"; do
  read -r name layers data algo lr <<< "$row"
  [[ "$name" =~ ${ONLY:-.} ]] || continue
  student="$OUT/students/${layers//,/_}"
  if [ ! -d "$student" ]; then
    keep=()
    for part in ${layers//,/ }; do keep+=($(seq "${part%-*}" "${part#*-}")); done
    python tools/checkpoint/make_student.py --hf "$DEMO/teacher_hf" --out "$student-hf" --layers "${keep[@]}" --overwrite
    python tools/checkpoint/convert.py hf-to-mcore --hf "$student-hf" --out "$student"
  fi
  save="$OUT/$name" teacher=()
  [ "$algo" = sft ] || teacher=(teacher="$DEMO/teacher")
  [ -f "$save/latest" ] || python -m megatron_minillm.train --config "examples/configs/$algo.yaml" "${teacher[@]}" \
    student="$student" data="$DEMO/data/${data}_train" checkpoint.save="$save" \
    parallel.tp=1 training.dtype=fp32 training.max_prompt_length=128 training.max_length=192 \
    training.micro_batch_size=2 training.global_batch_size=8 training.train_iters="$STEPS" optimizer.lr="$lr" \
    optimizer.min_lr="$(python -c "print($lr / 10)")" logging.log_interval=5 checkpoint.save_interval=0
  LOADS+=(--load "$(printf "%s/iter_%07d" "$save" "$STEPS")" --name "$name")
done

head -n 24 "$DEMO/data/selfinst_eval.jsonl" > "$OUT/selfinst24.jsonl"
[ -f "$OUT/eval/results.md" ] || python tools/evaluate.py --teacher "$DEMO/teacher" "${LOADS[@]}" \
  --data "$OUT/selfinst24.jsonl" --template chat --seeds 10 --max-new-tokens 64 --batch-size 12 --output-dir "$OUT/eval"
cat "$OUT/eval/results.md"
