"""Make a student: a copy of an HF teacher keeping some of its layers (same tokenizer, same vocabulary).

    # 8 of SmolLM2-135M's 30 layers, evenly spaced (first and last included)
    python tools/checkpoint/make_student.py --hf TEACHER_HF_DIR --out STUDENT_HF_DIR --num-layers 8
    # explicit teacher layer indices
    python tools/checkpoint/make_student.py --hf TEACHER_HF_DIR --out STUDENT_HF_DIR --layers 0 2 4 6

The result is an ordinary HF directory: convert it with `convert.py hf-to-mcore` like the teacher.
Errors: one line, exit status 2 for bad input (megatron_minillm/cli.py).
"""

import argparse
import sys

from megatron_minillm.checkpoint.student import make_student
from megatron_minillm.cli import run_cli
from megatron_minillm.paths import check_input_dir, check_output_path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--hf", required=True, help="teacher HF directory (config.json + weights)")
    parser.add_argument("--out", required=True)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--num-layers", type=int, help="keep this many evenly spaced layers")
    which.add_argument("--layers", type=int, nargs="+", help="teacher layer indices to keep, increasing")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()

    def body() -> None:
        check_input_dir(args.hf, "--hf", "config.json and the weights")
        check_output_path(args.out, "--out", exist_ok=args.overwrite)
        layers = make_student(args.hf, args.out, args.layers or args.num_layers, overwrite=args.overwrite)
        print(f"wrote {args.out}: teacher layers {layers}")

    # make_student's ValueErrors are about its input (layer indices, the config's layer count).
    return run_cli(body, input_errors=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
