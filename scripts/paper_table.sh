#!/usr/bin/env bash
# The MiniLLM paper's comparison (arXiv 2306.08543, Table 1: SFT, KD, SeqKD, MiniLLM) and its
# ablations (no length normalisation, no teacher-mixed sampling, no single-step term) at CPU scale,
# on the demo's teacher and SFT student, with several training seeds (docs/evaluation.md, "The
# paper's table"):
#   1. bash scripts/demo.sh --out DIR/demo --sft-only: the teacher, the SFT student, the data (a
#      finished demo copied to DIR/demo is reused as it is);
#   2. per training seed, from the same SFT student: KD, SeqKD, MiniLLM and the three ablations;
#   3. one evaluation of the teacher, the SFT student and every run on held-out SelfInst prompts
#      (tools/evaluate.py: Rouge-L vs references and vs the teacher, RKL/FKL on own and teacher
#      samples, ExAccErr, ECE, length);
#   4. one table, a row per method, mean ± std over training seeds: DIR/table.md, DIR/table.json.
#
#   bash scripts/paper_table.sh           # 2.35 h on 2 CPU cores (measured steps, below)
#   bash scripts/paper_table.sh --quick   # the same pipeline, tiny budgets: a smoke run
#
# Options: --quick, --out DIR (default runs/paper, or runs/paper-quick), --tp N (default 3, as the
# demo's), --seeds "S1 S2 ..." (training seeds, the config's `seed`; default "1 2"), --fresh (start over).
# Each finished step leaves its output in DIR and is skipped when the script runs again; an
# interrupted training run resumes from its last checkpoint.
#
# Time of the full run, measured at TP=3 on 2 idle cores (2026-12-03, docs/evaluation.md): with a
# finished demo copied to DIR/demo (its steps skipped) 128.6 min: per training seed KD 5.4-5.8 min,
# SeqKD 12.6-16.7, MiniLLM and 3 ablations 27.5-32.4; the evaluation of 14 models 28.2 min. From
# scratch the demo's first 5 steps add 12.5 min (docs/results.md, "Time"): ~141 min.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

QUICK=0 OUT="" TP=3 FRESH=0 TRAIN_SEEDS="1 2"
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --out) OUT="$2"; shift ;;
    --tp) TP="$2"; shift ;;
    --seeds) TRAIN_SEEDS="$2"; shift ;;
    --fresh) FRESH=1 ;;
    *) echo "paper_table.sh: unknown option $1 (known: --quick --out DIR --tp N --seeds \"S1 S2\" --fresh)" >&2; exit 2 ;;
  esac
  shift
done
[ -n "${TRAIN_SEEDS// /}" ] || { echo "paper_table.sh: --seeds needs at least one training seed" >&2; exit 2; }

source "$ROOT/scripts/setup_venv.sh"
source "$ROOT/scripts/lib.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# Budgets: the demo's (scripts/lib.sh: lengths, batch, learning rates, rollouts, PPO epochs, evaluation
# seeds), but fewer steps (KD and SeqKD 30 steps, MiniLLM and its ablations 2 rollout iterations) and
# fewer evaluation prompts (14 models): 12 training runs and one evaluation fit 2.5 h.
demo_budgets "$QUICK"
if [ "$QUICK" = 1 ]; then
  OUT="${OUT:-runs/paper-quick}" EVAL_PROMPTS=2 KD_ITERS=1 SEQKD_ITERS=1 MINILLM_ITERS=1
else
  OUT="${OUT:-runs/paper}" EVAL_PROMPTS=24 KD_ITERS=30 SEQKD_ITERS=30 MINILLM_ITERS=2
fi
[ "$FRESH" = 1 ] && rm -rf "$OUT"
mkdir -p "$OUT"
set_launcher "$TP"

step "1. the demo's first steps: teacher, SFT student, data ($OUT/demo)"
DEMO_ARGS=(--out "$OUT/demo" --tp "$TP" --sft-only)
[ "$QUICK" = 1 ] && DEMO_ARGS+=(--quick)
bash scripts/demo.sh "${DEMO_ARGS[@]}"
DEMO="$OUT/demo" TEACHER="$OUT/demo/teacher"
SFT="$(last_checkpoint "$DEMO/sft")"
common_args "$DEMO/data/t0_train" "$TP"

# One row per method; each run's name is METHOD@SEED (tools/merge_results.py groups by METHOD).
NAMES=(SFT) LOADS=("$SFT")
for seed in $TRAIN_SEEDS; do
  dir="$OUT/train/seed$seed"
  step "2. seed $seed: KD, SeqKD ($KD_ITERS and $SEQKD_ITERS steps), MiniLLM and its ablations ($MINILLM_ITERS iterations)"
  train_kd "$dir/kd" "$SFT" "$TEACHER" seed="$seed"
  train_seqkd "$dir/seqkd" "$SFT" "$TEACHER" seed="$seed"
  train_minillm "$dir/minillm" "$SFT" "$TEACHER" "$DEMO/data/pt_train" seed="$seed"
  train_minillm "$dir/minillm_no_length_norm" "$SFT" "$TEACHER" "$DEMO/data/pt_train" seed="$seed" minillm.length_norm=false
  train_minillm "$dir/minillm_no_teacher_mix" "$SFT" "$TEACHER" "$DEMO/data/pt_train" seed="$seed" rollout.mix_alpha=0
  train_minillm "$dir/minillm_no_single_step" "$SFT" "$TEACHER" "$DEMO/data/pt_train" seed="$seed" minillm.single_step=false
  for run in kd:KD seqkd:SeqKD minillm:MiniLLM "minillm_no_length_norm:MiniLLM w/o length norm" \
             "minillm_no_teacher_mix:MiniLLM w/o teacher mix" "minillm_no_single_step:MiniLLM w/o single-step"; do
    LOADS+=("$(last_checkpoint "$dir/${run%%:*}")") NAMES+=("${run#*:}@$seed")
  done
done

EVAL="$OUT/eval/seeds_${TRAIN_SEEDS// /_}"  # one evaluation per set of training seeds
step "3. evaluation of ${#LOADS[@]} students and the teacher on $EVAL_PROMPTS held-out SelfInst prompts, seeds $SEEDS ($EVAL)"
if [ ! -f "$EVAL/results.json" ]; then
  mkdir -p "$OUT/data"
  head -n "$EVAL_PROMPTS" "$DEMO/data/selfinst_eval.jsonl" > "$OUT/data/selfinst_eval.jsonl"
  LOAD_ARGS=()
  for i in "${!LOADS[@]}"; do LOAD_ARGS+=(--load "${LOADS[$i]}" --name "${NAMES[$i]}"); done
  "${RUN[@]}" tools/evaluate.py --tp "$TP" --teacher "$TEACHER" "${LOAD_ARGS[@]}" \
    --data "$OUT/data/selfinst_eval.jsonl" --template chat --seeds $SEEDS --max-new-tokens "$EVAL_NEW_TOKENS" \
    --batch-size 16 --overwrite --output-dir "$EVAL"
fi

step "4. the table: mean ± std over training seeds $TRAIN_SEEDS ($OUT/table.md, $OUT/table.json)"
python tools/merge_results.py "$EVAL/results.json" --output "$OUT/table"  # seconds: always, from this evaluation
