# Shell helpers shared by scripts/demo.sh and scripts/paper_table.sh: source it (it runs nothing).
#
#   step MESSAGE                       a timestamped step header ("=== [demo 12:34:56] ...")
#   last_checkpoint DIR                DIR/iter_XXXXXXX of the iteration in DIR/latest
#   trained DIR ITERS                  DIR holds a checkpoint of >= ITERS iterations
#   set_launcher TP                    RUN=(...): one plain process at TP=1, else megatron_minillm.launch
#   demo_budgets QUICK                 the demo's budgets (QUICK=1: the smoke run's)
#   common_args DATA TP                COMMON=(...): what every training run of the demo shares
#   train_kd / train_seqkd / train_minillm SAVE STUDENT TEACHER [PT_DATA] [key=value ...]
#                                      a training run with the demo's recipe, skipped when SAVE is
#                                      trained; extra key=value overrides go last (they win)
#
# A training run interrupted (Ctrl-C, SIGTERM) resumes from SAVE's last checkpoint when run again.

step() { echo; echo "=== [$(basename "$0" .sh) $(date +%T)] $*"; }
last_checkpoint() { printf "%s/iter_%07d" "$1" "$(cat "$1/latest")"; }  # `latest` holds the iteration
trained() { [ -f "$1/latest" ] && [ "$(cat "$1/latest")" -ge "$2" ]; }  # else the trainer resumes from $1

# One process needs no launcher (its MASTER_PORT, if set, is read from the environment).
# Several: megatron_minillm.launch (torchrun with exit status 0 after a SIGTERM the workers saved on).
set_launcher() {
  if [ "$1" = 1 ]; then RUN=(python); else
    RUN=(python -m megatron_minillm.launch --nproc-per-node "$1" --master-port "${MASTER_PORT:-29533}")
  fi
}

# Budgets: the full run and the smoke run differ only in these numbers.
demo_budgets() {
  if [ "$1" = 1 ]; then
    EVAL_PROMPTS=2 SEEDS="10" EVAL_NEW_TOKENS=8 PROMPT_LEN=96 MAX_LEN=112
    SFT_ITERS=2 KD_ITERS=2 MINILLM_ITERS=1 ROLLOUTS=6 PPO_EPOCHS=1 GLOBAL_BATCH=6 LOG_INTERVAL=1
    ANSWER_PROMPTS=12 ANSWER_TOKENS=8
  else
    EVAL_PROMPTS=48 SEEDS="10 20" EVAL_NEW_TOKENS=64 PROMPT_LEN=128 MAX_LEN=192
    SFT_ITERS=60 KD_ITERS=30 MINILLM_ITERS=4 ROLLOUTS=16 PPO_EPOCHS=4 GLOBAL_BATCH=8 LOG_INTERVAL=1
    ANSWER_PROMPTS=100000 ANSWER_TOKENS=96  # every training prompt (349 of T0's 600 fit 128 tokens)
  fi
}

# What every training run shares: the student, data, layout, lengths, logging (examples/configs/*.yaml
# hold the rest of each recipe; section.key=value overrides them).
common_args() {
  COMMON=(data="$1" parallel.tp="$2" parallel.pp=1 training.dtype=fp32
          training.max_prompt_length="$PROMPT_LEN" training.max_length="$MAX_LEN" training.micro_batch_size=2
          training.global_batch_size="$GLOBAL_BATCH" logging.log_interval="$LOG_INTERVAL" checkpoint.save_interval=0)
}

# Word-level KD from STUDENT ($KD_ITERS steps, lr 2e-5 cosine to 2e-6).
train_kd() {
  local save="$1" student="$2" teacher="$3"; shift 3
  trained "$save" "$KD_ITERS" || "${RUN[@]}" -m megatron_minillm.train --config examples/configs/kd.yaml "${COMMON[@]}" \
    student="$student" teacher="$teacher" checkpoint.save="$save" training.train_iters="$KD_ITERS" optimizer.lr=2e-5 \
    optimizer.min_lr=2e-6 "$@"
}

# SeqKD from STUDENT: KD's budget ($SEQKD_ITERS steps, default $KD_ITERS) and optimiser, on the teacher's samples.
train_seqkd() {
  local save="$1" student="$2" teacher="$3" iters="${SEQKD_ITERS:-$KD_ITERS}"; shift 3
  trained "$save" "$iters" || "${RUN[@]}" -m megatron_minillm.train --config examples/configs/seqkd.yaml "${COMMON[@]}" \
    student="$student" teacher="$teacher" checkpoint.save="$save" training.train_iters="$iters" optimizer.lr=2e-5 \
    optimizer.min_lr=2e-6 "$@"
}

# MiniLLM from STUDENT: $MINILLM_ITERS rollout iterations of $ROLLOUTS samples, $PPO_EPOCHS PPO epochs, L_PT on PT_DATA.
train_minillm() {
  local save="$1" student="$2" teacher="$3" pt_data="$4"; shift 4
  trained "$save" "$MINILLM_ITERS" || "${RUN[@]}" -m megatron_minillm.train --config examples/configs/minillm.yaml "${COMMON[@]}" \
    student="$student" teacher="$teacher" pt_data="$pt_data" checkpoint.save="$save" \
    training.train_iters="$MINILLM_ITERS" rollout.batch_size="$ROLLOUTS" rollout.micro_batch_size="$ROLLOUTS" \
    minillm.ppo_epochs="$PPO_EPOCHS" optimizer.lr=2e-5 optimizer.lr_warmup_iters=0 "$@"
}
