"""Per-GPU memory of a MiniLLM (or baseline) run, and the layouts that fit.

    python tools/plan_memory.py --teacher llama-13b --student llama-7b --nodes 2 --gpus-per-node 8 \
        --gpu-memory-gb 80 --config examples/configs/minillm.yaml
    python tools/plan_memory.py --teacher /models/teacher --student gpt2 --tp 2 --pp 1 --dp 4 --json
    python tools/plan_memory.py --teacher llama-70b --student llama-7b --nodes 4 --tp 1 --teacher-tp 8 \
        --teacher-pp 1 --micro-batch-size 2 --config examples/recipes/llama-70b_to_llama-7b/minillm.yaml

Models: an HF directory, a config.json, or a known name (gpt2, gpt2-medium, gpt2-large, gpt2-xl,
opt-1.3b, opt-13b, llama-7b, llama-13b, llama-70b, smollm2-135m). With --tp/--pp/--dp (and
--teacher-tp/--teacher-pp for a teacher on its own layout, --sequence-parallel) the breakdown of
that layout is printed (first and last pipeline stage; with two layouts the stage pairs of the
ranks); always, the shared layouts of --nodes x --gpus-per-node GPUs that fit in --headroom x
--gpu-memory-gb, then the search over (student layout, teacher layout, sequence parallelism) with
the recommended one (``planning.search_layouts``: the rule is in its docstring and docs/memory.md)
and the config keys that run it. Batch and length options default to the training config given
with --config (examples/configs/minillm.yaml), else to the config's defaults (bf16). --json prints
all of it as one JSON object instead. Formulas and their validation: docs/memory.md. Exit status 2
with one message on bad input.
"""

import argparse
import dataclasses
import json
import sys

from megatron_minillm.algorithms import OBJECTIVES
from megatron_minillm.cli import run_cli
from megatron_minillm.config import ConfigError, TrainConfig, load_config
from megatron_minillm.planning.memory import (
    GiB,
    PlanConfig,
    PlanError,
    format_breakdown,
    plan_memory,
    resolve_model,
    search_layouts,
    suggest_layouts,
)

# Command-line flags -> the training config keys they set (after --config, if any).
FLAG_KEYS = {
    "algorithm": "algorithm",
    "tp": "parallel.tp",
    "pp": "parallel.pp",
    "teacher_tp": "parallel.teacher_tp",
    "teacher_pp": "parallel.teacher_pp",
    "sequence_parallel": "parallel.sequence_parallel",
    "micro_batch_size": "training.micro_batch_size",
    "global_batch_size": "training.global_batch_size",
    "max_prompt_length": "training.max_prompt_length",
    "max_length": "training.max_length",
    "dtype": "training.dtype",
    "teacher_cache_dtype": "training.teacher_cache_dtype",
    "recompute": "training.recompute",
    "rollout_batch_size": "rollout.batch_size",
    "rollout_micro_batch_size": "rollout.micro_batch_size",
}


def _train_config(args: argparse.Namespace) -> TrainConfig:
    """--config (its paths need not exist), then the flags; without --config, bf16 (GPU planning)."""
    overrides = [] if args.config else ["training.dtype=bf16"]
    overrides += [f"{key}={getattr(args, flag)}" for flag, key in FLAG_KEYS.items() if getattr(args, flag) is not None]
    if args.no_distributed_optimizer:
        overrides.append("optimizer.use_distributed_optimizer=false")
    try:
        return load_config(args.config, overrides, require_paths=False)
    except ConfigError as err:
        raise PlanError(f"{args.config}: {err}" if args.config else str(err)) from None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", help="HF directory, config.json or known name (omit for sft)")
    parser.add_argument("--student", required=True, help="HF directory, config.json or known name")
    parser.add_argument("--config", help="training YAML to take batch sizes, lengths, dtype, recompute from")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="per GPU, GiB")
    parser.add_argument(
        "--headroom",
        type=float,
        default=0.9,
        help="fraction of GPU memory a plan may use (allocator fragmentation, CUDA context, NCCL)",
    )
    parser.add_argument("--tp", type=int)
    parser.add_argument("--pp", type=int)
    parser.add_argument("--dp", type=int)
    parser.add_argument("--teacher-tp", type=int, help="the teacher's own TP (0: the student's)")
    parser.add_argument("--teacher-pp", type=int, help="the teacher's own PP (0: the student's)")
    parser.add_argument(
        "--sequence-parallel", action="store_true", default=None, help="sequence parallelism for the student"
    )
    parser.add_argument(
        "--padded-vocab", type=int, help="the converted checkpoints' padded vocabulary (default: padded for the TPs)"
    )
    parser.add_argument("--max-tp", type=int, default=8, help="largest TP the search tries (within a node)")
    parser.add_argument("--algorithm", choices=list(OBJECTIVES))
    parser.add_argument("--micro-batch-size", type=int)
    parser.add_argument("--global-batch-size", type=int)
    parser.add_argument("--max-prompt-length", type=int)
    parser.add_argument("--max-length", type=int, help="prompt + response (the training sequence length)")
    parser.add_argument("--rollout-batch-size", type=int)
    parser.add_argument("--rollout-micro-batch-size", type=int)
    parser.add_argument("--dtype", choices=["fp32", "bf16"])
    parser.add_argument("--teacher-cache-dtype", choices=["fp32", "bf16"])
    parser.add_argument("--recompute", action="store_true", default=None, help="full activation recomputation")
    parser.add_argument("--no-distributed-optimizer", action="store_true")
    parser.add_argument("--no-pt-data", action="store_true", help="MiniLLM without L_PT")
    parser.add_argument("--max-suggestions", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    args = parser.parse_args()
    return run_cli(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    cfg = _train_config(args)
    if args.gpus_per_node < 1 or args.nodes < 1 or args.gpu_memory_gb <= 0 or args.max_tp < 1:
        raise PlanError("--nodes, --gpus-per-node, --gpu-memory-gb and --max-tp must be positive")
    if args.padded_vocab is not None and args.padded_vocab < 1:
        raise PlanError(f"--padded-vocab must be positive, got {args.padded_vocab}")
    student = resolve_model(args.student)
    teacher = resolve_model(args.teacher) if args.teacher else None
    if teacher is None and cfg.algorithm != "sft":
        raise PlanError(f"algorithm {cfg.algorithm} needs --teacher")
    world = args.nodes * args.gpus_per_node
    layout_flags = (args.tp, args.pp, args.dp, args.teacher_tp, args.teacher_pp)
    explicit = any(x is not None for x in layout_flags)
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    dp = (args.dp if args.dp is not None else max(world // (tp * pp), 1)) if explicit else 1
    # L_PT as the config has it; without --config, planned unless --no-pt-data
    pt_data = (bool(cfg.pt_data) if args.config else True) and not args.no_pt_data
    base = PlanConfig.from_train(cfg, dp, pt_data=pt_data, padded_vocab=args.padded_vocab)
    memory = args.gpu_memory_gb * GiB
    out: dict = {"config": dataclasses.asdict(base), "gpu_memory_bytes": memory, "headroom": args.headroom}
    breakdown = None
    if explicit:
        breakdown = plan_memory(teacher, student, base)
        out["layout"] = {"tp": tp, "pp": pp, "dp": dp, "breakdown": [b.to_dict() for b in breakdown]}
        if teacher is not None:
            out["layout"] |= {
                "teacher_tp": base.teacher_tp,
                "teacher_pp": base.teacher_pp,
                "teacher_dp": base.teacher_dp,
            }
        out["layout"]["sequence_parallel"] = base.sequence_parallel
    hardware = dict(nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_memory_bytes=memory, headroom=args.headroom)
    layouts = suggest_layouts(teacher, student, base, **hardware)
    out["suggestions"] = [dataclasses.asdict(x) for x in layouts[: args.max_suggestions]]
    searched = search_layouts(teacher, student, base, max_tp=args.max_tp, **hardware)
    best = searched[0] if searched else None
    out["search"] = [dataclasses.asdict(x) for x in searched[: args.max_suggestions]]
    out["recommendation"] = None if best is None else dataclasses.asdict(best) | {"overrides": best.overrides()}
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    t, rollout = cfg.training, cfg.rollout
    print(
        f"student {args.student}"
        + (f", teacher {args.teacher}" if teacher else "")
        + f"; {cfg.algorithm}, {t.dtype}, micro-batch {t.micro_batch_size} x {t.max_length} tokens, "
        f"rollouts {rollout.batch_size} (micro-batch {rollout.micro_batch_size}), "
        f"recompute {'on' if t.recompute else 'off'}, distributed optimizer "
        f"{'on' if cfg.optimizer.use_distributed_optimizer else 'off'}"
    )
    if breakdown is not None:
        own = f", teacher TP={base.teacher_tp} PP={base.teacher_pp} DP={base.teacher_dp}"
        print(
            f"\nlayout TP={tp} PP={pp} DP={dp}"
            + (own if teacher is not None and base.own_teacher_layout else "")
            + f", sequence parallel {'on' if base.sequence_parallel else 'off'}:"
        )
        print(format_breakdown(breakdown, memory))
        if tp * pp * dp != world:
            print(f"note: TP x PP x DP = {tp * pp * dp} is not the {world} GPUs of --nodes x --gpus-per-node")
    fit = f"{args.nodes} x {args.gpus_per_node} GPUs that fit in {args.headroom:.0%} of {args.gpu_memory_gb:g} GiB"
    print(
        f"\nlayouts{' shared by teacher and student' if teacher else ''} of {fit} (fewest model-parallel GPUs first):"
    )
    if not layouts:
        print("  none: try more GPUs, --recompute, smaller micro-batches or rollout micro-batches")
    for x in layouts[: args.max_suggestions]:
        print(f"  TP={x.tp:<2d} PP={x.pp:<2d} DP={x.dp:<3d} peak {x.peak_bytes / GiB:7.2f} GiB ({x.peak_phase})")
    print(
        f"\nsearch: student{' and teacher' if teacher else ''} layouts (TP <= {args.max_tp} within a node) "
        f"and sequence parallelism, of {fit}; fewest student model-parallel GPUs, then fewest "
        f"{'student and teacher ' if teacher else ''}pipeline stages, then lowest peak:"
    )
    print(
        f"  {'student TP x PP x DP':22s}{'teacher TP x PP x DP':22s}{'SP':5s}{'micro-batch':>12s}{'peak GiB':>10s}  phase"
    )
    for x in searched[: args.max_suggestions]:
        teacher_layout = f"{x.teacher_tp} x {x.teacher_pp} x {x.teacher_dp}" if teacher else "-"
        print(
            f"  {f'{x.tp} x {x.pp} x {x.dp}':22s}{teacher_layout:22s}{'on' if x.sequence_parallel else 'off':5s}"
            f"{x.micro_batch_size:12d}{x.peak_bytes / GiB:10.2f}  {x.peak_phase}"
        )
    if best is None:
        print("  none: try more GPUs, --recompute, smaller micro-batches or rollout micro-batches")
    else:
        print(f"recommended ({best.peak_bytes / GiB:.2f} GiB, {best.peak_phase}): {' '.join(best.overrides())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
