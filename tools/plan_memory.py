"""Per-GPU memory of a MiniLLM (or baseline) run, and the TP x PP x DP layouts that fit.

    python tools/plan_memory.py --teacher llama-13b --student llama-7b --nodes 2 --gpus-per-node 8 \
        --gpu-memory-gb 80 --config examples/configs/minillm.yaml
    python tools/plan_memory.py --teacher /models/teacher --student gpt2 --tp 2 --pp 1 --dp 4 --json

Models: an HF directory, a config.json, or a known name (gpt2, gpt2-medium, gpt2-large, gpt2-xl,
opt-1.3b, opt-13b, llama-7b, llama-13b, llama-70b, smollm2-135m). With --tp/--pp/--dp the breakdown
of that layout is printed (first and last pipeline stage); always, the layouts of --nodes x
--gpus-per-node GPUs that fit in --headroom x --gpu-memory-gb. Batch and length options default to
the training config given with --config (examples/configs/minillm.yaml), else to the config's
defaults (bf16). Formulas and their validation: docs/memory.md. Exit status 2 with one message on bad input.
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
    suggest_layouts,
)

# Command-line flags -> the training config keys they set (after --config, if any).
FLAG_KEYS = {
    "algorithm": "algorithm",
    "tp": "parallel.tp",
    "pp": "parallel.pp",
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
    if args.gpus_per_node < 1 or args.nodes < 1 or args.gpu_memory_gb <= 0:
        raise PlanError("--nodes, --gpus-per-node and --gpu-memory-gb must be positive")
    student = resolve_model(args.student)
    teacher = resolve_model(args.teacher) if args.teacher else None
    if teacher is None and cfg.algorithm != "sft":
        raise PlanError(f"algorithm {cfg.algorithm} needs --teacher")
    world = args.nodes * args.gpus_per_node
    explicit = any(x is not None for x in (args.tp, args.pp, args.dp))
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    dp = (args.dp if args.dp is not None else max(world // (tp * pp), 1)) if explicit else 1
    # L_PT as the config has it; without --config, planned unless --no-pt-data
    pt_data = (bool(cfg.pt_data) if args.config else True) and not args.no_pt_data
    base = PlanConfig.from_train(cfg, dp, pt_data=pt_data)
    memory = args.gpu_memory_gb * GiB
    out: dict = {"config": dataclasses.asdict(base), "gpu_memory_bytes": memory, "headroom": args.headroom}
    breakdown = None
    if explicit:
        breakdown = plan_memory(teacher, student, base)
        out["layout"] = {"tp": tp, "pp": pp, "dp": dp, "breakdown": [b.to_dict() for b in breakdown]}
    layouts = suggest_layouts(
        teacher,
        student,
        base,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        gpu_memory_bytes=memory,
        headroom=args.headroom,
    )
    out["suggestions"] = [dataclasses.asdict(x) for x in layouts[: args.max_suggestions]]
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
        print(f"\nlayout TP={tp} PP={pp} DP={dp}:")
        print(format_breakdown(breakdown, memory))
        if tp * pp * dp != world:
            print(f"note: TP x PP x DP = {tp * pp * dp} is not the {world} GPUs of --nodes x --gpus-per-node")
    print(
        f"\nlayouts of {args.nodes} x {args.gpus_per_node} GPUs that fit in {args.headroom:.0%} of "
        f"{args.gpu_memory_gb:g} GiB (fewest model-parallel GPUs first):"
    )
    if not layouts:
        print("  none: try more GPUs, --recompute, smaller micro-batches or rollout micro-batches")
    for x in layouts[: args.max_suggestions]:
        print(f"  TP={x.tp:<2d} PP={x.pp:<2d} DP={x.dp:<3d} peak {x.peak_bytes / GiB:7.2f} GiB ({x.peak_phase})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
