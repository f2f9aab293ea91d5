# Shared by the recipes' sbatch scripts (sourced from the repository root, after `cd "$REPO"`).
#
# Paths come from the environment, with cluster-style defaults:
#   MODEL_ROOT  Hugging Face model directories (config.json + weights + tokenizer)   /models
#   CKPT_ROOT   native checkpoints: converted models, SFT and MiniLLM runs             /ckpt
#   DATA_ROOT   raw/ (downloaded jsonl files) and the preprocessed datasets            /data
#   EXPORT_ROOT distilled students exported back to Hugging Face                       /models/distilled
#   EVAL_ROOT   evaluation tables and plots                                            ./eval
# Every training step appends ${EXTRA_ARGS} (key=value overrides of TrainConfig) to its command.
# No MASTER_ADDR / MASTER_PORT here: each task derives them from SLURM_JOB_NODELIST / SLURM_JOB_ID
# (megatron_minillm/parallel), and `srun` starts the tasks directly (no torchrun).

set -euo pipefail
MODEL_ROOT=${MODEL_ROOT:-/models}
CKPT_ROOT=${CKPT_ROOT:-/ckpt}
DATA_ROOT=${DATA_ROOT:-/data}
EXPORT_ROOT=${EXPORT_ROOT:-/models/distilled}
EVAL_ROOT=${EVAL_ROOT:-eval}
EXTRA_ARGS=${EXTRA_ARGS:-}
PREPROCESS_WORKERS=${PREPROCESS_WORKERS:-16}
DOLLY_VALID=${DOLLY_VALID:-1000}  # the paper's 1000 held-out Dolly rows
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

# convert_hf NAME TASKS TP: $MODEL_ROOT/NAME -> $CKPT_ROOT/NAME (bf16), streamed over TASKS processes
# (TASKS / TP pipeline stages: must divide the layers). Teacher and student of a recipe are converted
# with the same TP, so their vocabularies are padded to the same size (a multiple of 128 x TP).
# A finished conversion is kept: re-submitting the job converts only what is missing.
convert_hf() {
    local name=$1 tasks=$2 tp=$3
    if [[ -f "$CKPT_ROOT/$name/minillm_checkpoint.json" ]]; then
        echo "convert: $CKPT_ROOT/$name exists, kept"
        return
    fi
    srun --nodes=$(((tasks + 7) / 8)) --ntasks="$tasks" \
        python tools/checkpoint/convert.py hf-to-mcore --hf "$MODEL_ROOT/$name" --out "$CKPT_ROOT/$name" \
        --dtype bf16 --tp "$tp" --overwrite
}

# preprocess_dolly TOKENIZER OUT_PREFIX: databricks-dolly-15k -> OUT_PREFIX_{train,valid} (+ _valid.jsonl
# references), Alpaca template, prompts over 256 tokens dropped, prompt + response cut at 512 (LMOps).
preprocess_dolly() {
    local tokenizer=$1 prefix=$2
    if [[ -f "${prefix}_summary.json" ]]; then echo "preprocess: ${prefix} exists, kept"; return; fi
    mkdir -p "$(dirname "$prefix")"
    srun --nodes=1 --ntasks=1 python tools/preprocess_data.py instructions \
        --input "$DATA_ROOT/raw/databricks-dolly-15k.jsonl" --format dolly --template alpaca \
        --tokenizer "$tokenizer" --output-prefix "$prefix" --split "$DOLLY_VALID" \
        --max-prompt-length 256 --max-length 512 --workers "$PREPROCESS_WORKERS"
}

# preprocess_pretrain TOKENIZER INPUT OUT_PREFIX: raw text jsonl ({"text": ...}) -> the L_PT dataset
# (the trainer cuts it into max_length + 1 = 513-token chunks).
preprocess_pretrain() {
    local tokenizer=$1 input=$2 prefix=$3
    if [[ -f "${prefix}_summary.json" ]]; then echo "preprocess: ${prefix} exists, kept"; return; fi
    mkdir -p "$(dirname "$prefix")"
    srun --nodes=1 --ntasks=1 python tools/preprocess_data.py pretrain \
        --input "$input" --tokenizer "$tokenizer" --output-prefix "$prefix" --workers "$PREPROCESS_WORKERS"
}

# latest_iteration RUN_DIR: the last complete checkpoint of a training run (RUN_DIR/iter_XXXXXXX).
latest_iteration() {
    local run=$1
    if [[ ! -f "$run/latest" ]]; then
        echo "error: no finished checkpoint in $run (train that stage first, or set the path)" >&2
        return 2
    fi
    printf '%s/iter_%07d\n' "$run" "$(cat "$run/latest")"
}
