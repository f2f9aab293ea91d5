"""Tokenize instruction data or pretraining text into megatron-core indexed datasets (.bin/.idx).

    # instruction data (Dolly, Alpaca, self-instruct, prompt/completion, chat; jsonl or a JSON list)
    python tools/preprocess_data.py instructions --input dolly.jsonl --tokenizer TOKENIZER \\
        --output-prefix data/dolly --split 1000 --workers 8
    # pretraining text, one {"text": ...} per line (the L_PT corpus)
    python tools/preprocess_data.py pretrain --input owt.jsonl --tokenizer TOKENIZER --output-prefix data/owt

TOKENIZER: a Hugging Face tokenizer directory, a megatron_minillm checkpoint directory or a
sentencepiece .model file. Writes <prefix>_train (and <prefix>_valid) .bin/.idx, the reference
<prefix>_<split>.jsonl (instruction data) and, last, <prefix>_summary.json (the tokenizer and length
limits the trainer checks the dataset against); removes files of the prefix an earlier run left and
this one does not write (a stale _valid split); prints the summary. Exits with status 2 and one
message naming the file and line on bad input, an empty instruction or response, or an input that
leaves a split empty. See docs/data.md.
"""

import argparse
import sys
from pathlib import Path

from megatron_minillm.cli import run_cli
from megatron_minillm.data import (
    FORMATS,
    TEMPLATES,
    InstructionConfig,
    PreprocessConfig,
    preprocess_instructions,
    preprocess_pretrain,
)
from megatron_minillm.paths import check_output_path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    instructions = sub.add_parser("instructions", help="instruction data -> prompt/response datasets")
    instructions.add_argument("--format", default="auto", choices=["auto", *FORMATS])
    instructions.add_argument(
        "--template",
        default="alpaca",
        choices=TEMPLATES,
        help="alpaca: LMOps/MiniLLM's prompt; chat: the tokenizer's chat template; none: the instruction as is",
    )
    instructions.add_argument("--max-prompt-length", type=int, default=256, help="longer prompts are dropped")
    instructions.add_argument(
        "--max-length", type=int, default=512, help="prompt + response; longer responses are truncated"
    )
    pretrain = sub.add_parser("pretrain", help='raw text jsonl ({"text": ...}) -> a pretraining dataset')
    for p in (instructions, pretrain):
        p.add_argument("--input", action="append", required=True, help="jsonl or JSON-list file (repeatable)")
        p.add_argument("--tokenizer", required=True)
        p.add_argument("--output-prefix", required=True)
        p.add_argument(
            "--split", type=float, default=0.0, help="rows held out for validation: a fraction (< 1) or a count (>= 1)"
        )
        p.add_argument("--seed", type=int, default=1234, help="seed of the validation split")
        p.add_argument("--workers", type=int, default=1, help="tokenizing processes")
        p.add_argument("--skip-bad-lines", action="store_true", help="count malformed rows and go on")
        p.add_argument(
            "--append-eos",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="end each response (or text) with EOS",
        )
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    common = dict(
        inputs=args.input,
        output_prefix=args.output_prefix,
        tokenizer=args.tokenizer,
        split=args.split,
        seed=args.seed,
        workers=args.workers,
        skip_bad_lines=args.skip_bad_lines,
        append_eos=args.append_eos,
    )

    def body() -> None:
        check_output_path(Path(args.output_prefix).parent, "--output-prefix's directory", exist_ok=True)
        if args.command == "instructions":
            config = InstructionConfig(
                **common,
                format=args.format,
                template=args.template,
                max_prompt_length=args.max_prompt_length,
                max_length=args.max_length,
            )
            summary = preprocess_instructions(config)
        else:
            summary = preprocess_pretrain(PreprocessConfig(**common))
        print(summary.report())

    # The configs' ValueErrors are about the arguments (split, workers, format, template).
    return run_cli(body, input_errors=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
