"""Generate responses from a checkpoint at any TP x PP (x DP), optionally teacher-mixed.

    torchrun --nproc-per-node 4 tools/generate.py --load CKPT --tp 2 --pp 2 \
        --prompts prompts.jsonl --max-new-tokens 256 --greedy --output out.jsonl
    # teacher-mixed sampling (alpha = 0.2, the MiniLLM rollouts); alpha = 1 samples the teacher (SeqKD data)
    torchrun --nproc-per-node 4 tools/generate.py --load STUDENT --teacher TEACHER --mix-alpha 0.2 \
        --tp 2 --pp 2 --prompts prompts.jsonl --max-new-tokens 256 --temperature 1 --seed 1 --output out.jsonl

Prompts: jsonl/json records {"prompt": text} or {"input_ids": [...]} used as they are (--format raw,
the default), or instruction data (--format auto|dolly|alpaca|self_instruct|prompt_completion|chat)
rendered with --template. Each output line: index, prompt, text, token_ids, log_q (and log_p,
log_mix with a teacher), reference if the data has one. Generation stops at the tokenizer's EOS
and any --stop-ids. Errors: one line, exit status 2 for bad input (megatron_minillm/cli.py).
"""

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from megatron_minillm.checkpoint.dist_checkpoint import load_model, read_metadata
from megatron_minillm.cli import run_cli
from megatron_minillm.data.formats import FORMATS
from megatron_minillm.data.prompts import load_prompts
from megatron_minillm.data.templates import TEMPLATES
from megatron_minillm.data.tokenizer import check_tokenizers_compatible, load_tokenizer
from megatron_minillm.models import load_architecture
from megatron_minillm.parallel import destroy_distributed, init_distributed
from megatron_minillm.paths import check_output_path
from megatron_minillm.sampling import GenerationError, SamplingParams, generate_all
from megatron_minillm.sampling.params import DEFAULT_SPECULATIVE_K


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--load", required=True, help="checkpoint of the model that generates (the student)")
    parser.add_argument("--teacher", help="teacher checkpoint for teacher-mixed sampling")
    parser.add_argument("--mix-alpha", type=float, default=0.0, help="teacher weight alpha of alpha*p + (1-alpha)*q")
    parser.add_argument(
        "--speculative-k",
        type=int,
        default=DEFAULT_SPECULATIVE_K,
        help="with --teacher: tokens the student drafts per teacher forward (exact; 0: token by token)",
    )
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--prompts", required=True, help="jsonl or json file")
    parser.add_argument("--format", default="raw", choices=["raw", "auto", *FORMATS])
    parser.add_argument("--template", default="alpaca", choices=TEMPLATES, help="for instruction formats")
    parser.add_argument("--max-new-tokens", type=int, required=True)
    parser.add_argument("--min-new-tokens", type=int, default=0)
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0)
    parser.add_argument("--stop-ids", type=int, nargs="*", default=[], help="stop tokens besides EOS")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call and DP rank")
    parser.add_argument("--output", required=True, help="jsonl file (replaced atomically when it exists)")
    parser.add_argument("--no-checksums", action="store_true", help="check checkpoint file sizes only, not SHA-256")
    return parser.parse_args()


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The flags as SamplingParams, whose messages name the field (``temperature must be ...``)."""
    try:
        return SamplingParams(
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.min_new_tokens,
            greedy=args.greedy,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            no_repeat_ngram_size=args.no_repeat_ngram_size,
            mix_alpha=args.mix_alpha,
            speculative_k=args.speculative_k,
        )
    except ValueError as err:
        hint = "; --greedy decodes without sampling" if str(err).startswith("temperature") else ""
        raise GenerationError(f"{err}{hint}") from None


def check_inputs(args: argparse.Namespace) -> None:
    """Before any process group or model: the checkpoints complete, --max-new-tokens within every
    model's context (their config.json), --output writable."""
    if args.mix_alpha and not args.teacher:
        raise GenerationError("--mix-alpha needs --teacher")
    for flag, path in (("--load", args.load), ("--teacher", args.teacher)):
        if path is None:
            continue
        read_metadata(path)
        context = load_architecture(path).max_position_embeddings
        if args.max_new_tokens >= context:
            raise GenerationError(
                f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the context of "
                f"{flag} {path} ({context} positions, config.json); lower --max-new-tokens"
            )
    check_output_path(args.output, "--output", exist_ok=True, is_dir=False)


def run(args: argparse.Namespace) -> None:
    params = sampling_params(args)
    check_inputs(args)
    init_distributed(tp=args.tp, pp=args.pp, seed=args.seed)
    tokenizer = load_tokenizer(args.load)
    model, arch, meta = load_model(args.load, checksums=not args.no_checksums)
    teacher = None
    if args.teacher:
        teacher_tokenizer = load_tokenizer(args.teacher)
        teacher, teacher_arch, teacher_meta = load_model(args.teacher, checksums=not args.no_checksums)
        check_tokenizers_compatible(
            teacher_tokenizer, tokenizer, teacher_meta.padded_vocab_size, meta.padded_vocab_size, args.tp
        )
    params = dataclasses.replace(params, stop_ids=(tokenizer.eos_id, *args.stop_ids))
    prompts = load_prompts(args.prompts, tokenizer, args.format, args.template)
    samples = generate_all(
        model,
        [p.ids for p in prompts],
        params,
        args.seed,
        vocab_size=arch.vocab_size,
        batch_size=args.batch_size,
        teacher=teacher,
        pad_id=tokenizer.pad_id,
        progress=True,
    )
    if dist.get_rank() != 0:
        return
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with partial.open("w", encoding="utf-8") as f:
        for i, (prompt, sample) in enumerate(zip(prompts, samples)):
            record = {
                "index": i,
                "prompt": prompt.text,
                "text": tokenizer.decode(sample.tokens),
                "token_ids": sample.tokens,
                "log_q": sample.log_q,
            }
            if sample.log_p is not None:
                record.update(log_p=sample.log_p, log_mix=sample.log_mix)
            if prompt.reference is not None:
                record["reference"] = prompt.reference
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(partial, out)
    print(f"wrote {len(samples)} responses to {out}")


def main() -> int:
    args = parse_args()
    return run_cli(lambda: run(args), teardown=destroy_distributed)


if __name__ == "__main__":
    sys.exit(main())
