"""Make a student: a copy of an HF teacher keeping some of its layers (same tokenizer, same vocabulary).

    # 8 of SmolLM2-135M's 30 layers, evenly spaced (first and last included)
    python tools/checkpoint/make_student.py --hf TEACHER_HF_DIR --out STUDENT_HF_DIR --num-layers 8
    # explicit teacher layer indices
    python tools/checkpoint/make_student.py --hf TEACHER_HF_DIR --out STUDENT_HF_DIR --layers 0 2 4 6

The result is an ordinary HF directory: convert it with `convert.py hf-to-mcore` like the teacher.
"""

import argparse
import sys

from megatron_minillm.checkpoint.student import make_student


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--hf", required=True, help="teacher HF directory (config.json + weights)")
    parser.add_argument("--out", required=True)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--num-layers", type=int, help="keep this many evenly spaced layers")
    which.add_argument("--layers", type=int, nargs="+", help="teacher layer indices to keep, increasing")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    try:
        layers = make_student(args.hf, args.out, args.layers or args.num_layers, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: teacher layers {layers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
