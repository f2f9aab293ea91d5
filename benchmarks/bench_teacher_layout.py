"""The teacher on its own layout: what the teacher <-> student exchange costs per MiniLLM iteration,
and the student's per-rank memory at its own TP against the shared layout, in one run.

    python -m torch.distributed.run --nproc-per-node 3 benchmarks/bench_teacher_layout.py \\
        [--workdir /tmp/bench_iteration] [--iterations 2]

Models and data as ``bench_iteration.py`` prepares them (the demo's: SmolLM2-135M-Instruct as the
teacher, its 8-layer copy as the student). SmolLM2's 3 key/value heads allow TP = 1 or 3, so on 3
ranks the shared layout puts both models at TP=3, and the own layout keeps the teacher at TP=3 while
the student runs TP=1 x DP=3 (each teacher forward then serves all three student DP groups, and its
logits are re-split 3 -> 1 on the way). The iteration is the demo's MiniLLM one, smaller (12 rollouts
of up to 32 new tokens; 2 PPO epochs), with speculative rollouts (the default, keeping the teacher's
logits) or token by token with a scoring forward (``--speculative-k 0``). The exchange's time is
measured around ``LayoutExchange.gather_rows`` and ``to_student`` (wall time on the last rank,
waits for other ranks included). The last line is one JSON.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_iteration import prepare  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _timed(seconds: dict[str, float], name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start

    return wrapper


def run(work: Path, student_tp: int, teacher_tp: int, iterations: int, k: int) -> dict[str, float]:
    """Seconds per timed iteration, its exchange seconds, and the student's parameters per rank."""
    from megatron.core import parallel_state

    from megatron_minillm.config import load_config
    from megatron_minillm.parallel.exchange import LayoutExchange
    from megatron_minillm.training.trainer import Timers, Trainer

    seconds: dict[str, float] = {}
    originals = {name: getattr(LayoutExchange, name) for name in ("gather_rows", "to_student")}
    for name, fn in originals.items():
        setattr(LayoutExchange, name, _timed(seconds, name, fn))
    overrides = [
        f"student={work / 'student'}",
        f"teacher={work / 'teacher'}",
        f"data={work / 'data' / 't0_train'}",
        f"pt_data={work / 'data' / 'pt_train'}",
        f"parallel.tp={student_tp}",
        f"parallel.teacher_tp={teacher_tp}",
        "training.dtype=fp32",
        "training.max_prompt_length=128",
        "training.max_length=160",
        "training.micro_batch_size=2",
        "training.global_batch_size=6",
        "rollout.batch_size=12",
        "rollout.micro_batch_size=4",
        "minillm.ppo_epochs=2",
        "optimizer.lr=2e-5",
        "optimizer.lr_warmup_iters=0",
        f"rollout.speculative_k={k}",
        f"rollout.reuse_teacher_logits={str(k > 0).lower()}",
    ]
    try:
        trainer = Trainer(load_config(str(ROOT / "examples" / "configs" / "minillm.yaml"), overrides))
        student_params = sum(p.numel() for p in trainer.model.parameters())
        trainer.iteration(0)  # warm-up
        trainer.timers = Timers()
        seconds.clear()
        start = time.perf_counter()
        for i in range(1, iterations):
            trainer.iteration(i)
        timed = max(iterations - 1, 1)
        total = (time.perf_counter() - start) / timed
        phases = {f"{name}_s": s / timed for name, s in trainer.timers.seconds.items()}
        parallel_state.destroy_model_parallel()
    finally:
        for name, fn in originals.items():
            setattr(LayoutExchange, name, fn)
    exchange = sum(seconds.values()) / timed
    return {
        "seconds": total,
        **phases,
        "exchange_s": exchange,
        "exchange_share": exchange / total,
        "student_params_per_rank": student_params,
        "student_weights_mb_per_rank": student_params * 4 / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_iteration"))
    parser.add_argument("--iterations", type=int, default=2, help="per layout, the first a warm-up")
    parser.add_argument("--speculative-k", type=int, default=2)
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        args.workdir.mkdir(parents=True, exist_ok=True)
        prepare(args.workdir)
    torch.distributed.init_process_group("gloo")
    torch.distributed.barrier()  # the models exist before any rank reads them
    results = {
        "shared": run(args.workdir, world, world, args.iterations, args.speculative_k),
        "own": run(args.workdir, 1, world, args.iterations, args.speculative_k),
    }
    if rank == world - 1:
        for name, r in results.items():
            print(f"{name:>6}: " + " | ".join(f"{key} {value:.3g}" for key, value in r.items()))
        ratio = results["own"]["seconds"] / results["shared"]["seconds"]
        memory = results["own"]["student_params_per_rank"] / results["shared"]["student_params_per_rank"]
        print(
            f"own layout (student TP=1 x DP={world}, teacher TP={world}) / shared (both TP={world}): "
            f"iteration {ratio:.3f}, exchange {100 * results['own']['exchange_share']:.1f} % of the iteration, "
            f"student weights per rank {memory:.2f}x"
        )
        print(
            json.dumps(
                {
                    "iteration_own_vs_shared": round(ratio, 3),
                    "exchange_share": round(results["own"]["exchange_share"], 4),
                    "student_memory_own_vs_shared": round(memory, 3),
                    "world_size": world,
                    "speculative_k": args.speculative_k,
                    **{f"{name}_{key}": value for name, r in results.items() for key, value in r.items()},
                }
            )
        )
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
