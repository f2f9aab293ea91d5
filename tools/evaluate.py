r"""Evaluate checkpoints as the MiniLLM paper does, at any TP x PP (x DP), into one comparison table.

    torchrun --nproc-per-node 4 tools/evaluate.py --teacher /ckpt/teacher \
        --load /ckpt/sft --load /ckpt/kd --load /ckpt/minillm --name sft --name kd --name minillm \
        --data examples/data/self_instruct_user_oriented_252.jsonl --tp 2 --pp 2 --output-dir eval/selfinst

Samples responses with each seed (defaults: the paper's temperature 1, top-p 1, no-repeat-ngram 6,
256 new tokens, seeds 10 20 30 40 50) and reports Rouge-L against the references, and with
--teacher: Rouge-L against the teacher's responses, per-token reverse and forward KL to the teacher
on the model's and on the teacher's samples, and ExAccErr; ECE on the references; response lengths.
Writes results.json, results.md, PNG plots and responses.jsonl into --output-dir (atomically) and
prints the table. See docs/evaluation.md. Errors: one line, exit status 2 for bad input
(megatron_minillm/cli.py).
"""

import argparse
import logging
import sys
from pathlib import Path

import torch.distributed as dist

from megatron_minillm.checkpoint.dist_checkpoint import atomic_directory
from megatron_minillm.cli import run_cli
from megatron_minillm.data.formats import FORMATS
from megatron_minillm.data.templates import TEMPLATES
from megatron_minillm.evaluation.evaluate import EvalConfig, evaluate_checkpoints, write_evaluation
from megatron_minillm.evaluation.report import markdown_table
from megatron_minillm.parallel import destroy_distributed, init_distributed
from megatron_minillm.paths import check_output_path

DEFAULTS = EvalConfig()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--load", action="append", required=True, help="checkpoint to evaluate (repeat for several)")
    parser.add_argument("--name", action="append", help="table name of each --load, in order (default: directory name)")
    parser.add_argument("--teacher", help="teacher checkpoint: evaluated too (first row) and compared against")
    parser.add_argument("--teacher-name", default="teacher")
    parser.add_argument("--data", required=True, help="instruction data with responses (jsonl or json)")
    parser.add_argument("--format", default="auto", choices=["auto", *FORMATS])
    parser.add_argument("--template", default="alpaca", choices=TEMPLATES)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULTS.seeds))
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=DEFAULTS.temperature)
    parser.add_argument("--top-k", type=int, default=DEFAULTS.top_k, help="0: off")
    parser.add_argument("--top-p", type=float, default=DEFAULTS.top_p)
    parser.add_argument("--no-repeat-ngram-size", type=int, default=DEFAULTS.no_repeat_ngram_size, help="0: off")
    parser.add_argument(
        "--max-prompt-length",
        type=int,
        default=DEFAULTS.max_prompt_length,
        help="longer prompts are dropped (the cap is also context - --max-new-tokens)",
    )
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="sequences per batch and DP rank")
    parser.add_argument(
        "--exposure-bias-length", type=int, help="steps of the ExAccErr curve (default: --max-new-tokens)"
    )
    parser.add_argument("--ece-bins", type=int, default=DEFAULTS.ece_bins)
    parser.add_argument("--no-checksums", action="store_true", help="check checkpoint file sizes only, not SHA-256")
    args = parser.parse_args()
    if args.name is not None and len(args.name) != len(args.load):
        parser.error(f"give one --name per --load ({len(args.load)}), got {len(args.name)}")
    return args


def run(args: argparse.Namespace) -> None:
    cfg = EvalConfig(
        seeds=tuple(args.seeds),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        max_prompt_length=args.max_prompt_length,
        batch_size=args.batch_size,
        exposure_bias_length=args.exposure_bias_length,
        ece_bins=args.ece_bins,
    )
    out = check_output_path(args.output_dir, "--output-dir", exist_ok=args.overwrite)  # before hours of evaluation
    names = args.name or [Path(p).name for p in args.load]
    init_distributed(tp=args.tp, pp=args.pp, seed=cfg.seeds[0])
    rank0 = dist.get_rank() == 0
    log = logging.getLogger("megatron_minillm")  # progress lines of rank 0 only, not megatron's own
    log.addHandler(logging.StreamHandler())
    log.propagate = False  # a root handler set up by an import would print every line twice
    log.setLevel(logging.INFO if rank0 else logging.WARNING)
    report = evaluate_checkpoints(
        list(zip(names, args.load)),
        args.data,
        cfg,
        fmt=args.format,
        template=args.template,
        teacher=(args.teacher_name, args.teacher) if args.teacher else None,
        progress=True,
        checksums=not args.no_checksums,
    )
    with atomic_directory(out, args.overwrite) as tmp:
        if rank0:
            write_evaluation(report, tmp)
    if rank0:
        print(markdown_table([e.results for e in report.evaluations]), end="")
        info = report.info
        print(
            f"{info['prompts']} prompts ({info['dropped_prompts']} dropped: longer than "
            f"{info['max_prompt_length']} tokens), seeds {list(cfg.seeds)}; wrote {out}"
        )


def main() -> int:
    args = parse_args()
    return run_cli(lambda: run(args), teardown=destroy_distributed)


if __name__ == "__main__":
    sys.exit(main())
