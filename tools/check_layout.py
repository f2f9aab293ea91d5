"""Check that HF models split over a TP x PP x DP layout before launching a job.

    python tools/check_layout.py --model TEACHER_DIR --model STUDENT_DIR --tp 8 --pp 2 --world-size 32

Prints, per model, the layers per pipeline stage, attention/KV heads per TP rank and the padded
vocabulary; exits with status 2 and one clear message when the layout cannot work.
"""

import argparse
import sys

from megatron_minillm.cli import run_cli
from megatron_minillm.models import check_layout, load_architecture, padded_vocab_size
from megatron_minillm.parallel import ParallelLayout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        help="HF model directory or config.json (repeat for teacher and student)",
    )
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    args = parser.parse_args()

    def body() -> None:
        layout = ParallelLayout(tp=args.tp, pp=args.pp, world_size=args.world_size)
        print(f"layout: TP={layout.tp} PP={layout.pp} DP={layout.dp} ({layout.world_size} ranks)")
        for path in args.model:
            arch = load_architecture(path)
            check_layout(arch, layout.tp, layout.pp)
            vocab = padded_vocab_size(arch.vocab_size, layout.tp, args.make_vocab_size_divisible_by)
            print(
                f"{path}: {arch.model_type}, {arch.num_layers // layout.pp} layers per stage, "
                f"{arch.num_attention_heads // layout.tp} heads and "
                f"{arch.num_query_groups // layout.tp} KV heads per TP rank, "
                f"vocab {arch.vocab_size} padded to {vocab} ({vocab // layout.tp} per TP rank)"
            )

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
