"""The memory planner (megatron_minillm.planning) against measured peak memory of real MiniLLM iterations on CPU.

    python benchmarks/bench_plan_memory.py            # ~8 min on 2 cores; --only NAME runs one config

Each config builds a random-init teacher and student from HF-style config dicts with our builder
(``models.build_model``), wraps the student with our optimizer setup (megatron DDP + distributed
optimizer + AdamW, ``training.optimizer``), and runs the trainer's own MiniLLM iteration
(``Trainer._minillm_iteration``: teacher-mixed rollouts with KV caches, one teacher scoring pass
kept in bf16, PPO steps with the single-step term and L_PT) on synthetic prompts. The EOS id is a
vocabulary-padding id, which is never sampled: every response has the full length, as the planner
assumes. One warm-up iteration (AdamW allocates its moments at the first step), then the measured
one.

Memory: the rise of the resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) over the RSS after imports and process-group setup, before any model is
built; every allocation of >= 64 KiB is its own mmap (``GLIBC_TUNABLES``), so RSS follows live
tensor memory and frees return at once (no caching allocator). The high-water mark is read and
reset at phase boundaries (rollouts, scoring, training), so each phase has its own measured peak.
The non-tensor part of RSS (RSS minus the bytes of every live tensor, at each phase start) is
printed and subtracted before comparing. Prediction: ``plan_memory(...)`` for the
same sizes; the last line is one JSON (``max_rel_error`` on tensor memory, ``..._raw_rss`` on RSS).
"""

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

CONFIGS = {
    "llama_fp32_tp1": dict(
        world=1,
        tp=1,
        pp=1,
        dtype="fp32",
        teacher=dict(
            model_type="llama",
            hidden_size=512,
            intermediate_size=1376,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            vocab_size=8000,
            max_position_embeddings=512,
        ),
        student=dict(
            model_type="llama",
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=4,
            vocab_size=8000,
            max_position_embeddings=512,
        ),
    ),
    "gpt2_bf16_tp1": dict(
        world=1,
        tp=1,
        pp=1,
        dtype="bf16",
        teacher=dict(model_type="gpt2", n_embd=512, n_layer=4, n_head=8, vocab_size=8000, n_positions=512),
        student=dict(model_type="gpt2", n_embd=256, n_layer=2, n_head=8, vocab_size=8000, n_positions=512),
    ),
    "llama_bf16_tp2": dict(
        world=2,
        tp=2,
        pp=1,
        dtype="bf16",
        teacher=dict(
            model_type="llama",
            hidden_size=512,
            intermediate_size=1376,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            vocab_size=16000,
            max_position_embeddings=512,
        ),
        student=dict(
            model_type="llama",
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=4,
            vocab_size=16000,
            max_position_embeddings=512,
            tie_word_embeddings=True,
        ),
    ),
}
# Batches and lengths shared by every config (config keys).
RUN = (
    "training.micro_batch_size=4",
    "training.global_batch_size=8",
    "training.max_prompt_length=128",
    "training.max_length=256",
    "rollout.batch_size=16",
    "rollout.micro_batch_size=8",
    "minillm.ppo_epochs=1",
    "optimizer.lr=1e-4",
    "optimizer.lr_warmup_iters=0",
)
PRECISE = "glibc.malloc.mmap_threshold=65536"
PHASES = ("rollout", "score", "train")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PhaseMeter:
    """Peak RSS per phase: at each boundary, read the high-water mark into the phase that ends and reset it."""

    def __init__(self, baseline_kib: int) -> None:
        self.baseline, self.current, self.peaks = baseline_kib, None, {}

    def mark(self, phase) -> None:
        if self.current is not None:
            rise = (_status_kib("VmHWM") - self.baseline) * 1024
            self.peaks[self.current] = max(self.peaks.get(self.current, 0), rise)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        self.current = phase


class _Prompts:
    """data[i] -> (prompt ids, response ids), full-length prompts of ids below the vocabulary."""

    def __init__(self, n: int, length: int, vocab: int) -> None:
        import numpy as np

        rng = np.random.default_rng(0)  # numpy arrays, as the indexed datasets return
        self.items = [(rng.integers(1, vocab, size=length), rng.integers(1, vocab, size=8)) for _ in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class _Pretrain:
    def __init__(self, n: int, length: int, vocab: int) -> None:
        import numpy as np

        self.rows = np.random.default_rng(0).integers(1, vocab, size=(n, length), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _live_tensor_bytes() -> int:
    """Bytes of the distinct storages of every tensor Python can reach."""
    import gc

    import torch

    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def worker(name: str) -> None:
    import torch
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig

    from megatron_minillm.algorithms import MiniLLM
    from megatron_minillm.config import load_config
    from megatron_minillm.models import architecture_from_dict, build_model
    from megatron_minillm.parallel import init_distributed
    from megatron_minillm.planning import PlanConfig, plan_memory
    from megatron_minillm.training import trainer as trainer_module
    from megatron_minillm.training.optimizer import setup_model_and_optimizer
    from megatron_minillm.training.teacher import Teacher

    spec = CONFIGS[name]
    layout_keys = (f"parallel.tp={spec['tp']}", f"parallel.pp={spec['pp']}", f"training.dtype={spec['dtype']}")
    cfg = load_config(None, ["student=unused", "teacher=unused", "data=unused", "pt_data=unused", *layout_keys, *RUN])
    t_cfg, opt = cfg.training, cfg.optimizer
    layout = init_distributed(tp=cfg.parallel.tp, pp=cfg.parallel.pp, seed=cfg.seed)
    torch.set_num_threads(1)
    baseline = _status_kib("VmRSS")
    teacher_arch, student_arch = architecture_from_dict(spec["teacher"]), architecture_from_dict(spec["student"])

    t = trainer_module.Trainer.__new__(trainer_module.Trainer)  # the trainer's loop without checkpoints on disk
    t.cfg, t.layout, t.dp, t.device = cfg, layout, layout.dp, torch.device("cpu")
    t.dp_rank, t.is_last_stage = parallel_state.get_data_parallel_rank(), parallel_state.is_pipeline_last_stage()
    t.dp_group = parallel_state.get_data_parallel_group()
    t.arch = student_arch
    t.tp_group = parallel_state.get_tensor_model_parallel_group()
    t.objective = MiniLLM(cfg, student_arch.vocab_size, tp_group=t.tp_group)
    t._check_batches()
    student = build_model(student_arch, dtype=t_cfg.dtype)
    t.teacher = Teacher(
        build_model(teacher_arch, dtype=t_cfg.dtype),
        student_layout=layout,
        cache_dtype=t_cfg.teacher_cache_dtype,
        vocab_size=student_arch.vocab_size,
    )
    t.model, t.optimizer, t.scheduler = setup_model_and_optimizer(
        student,
        OptimizerConfig(
            lr=opt.lr,
            weight_decay=opt.weight_decay,
            adam_beta1=opt.adam_beta1,
            adam_beta2=opt.adam_beta2,
            clip_grad=opt.clip_grad,
            bf16=t_cfg.dtype == "bf16",
            use_distributed_optimizer=opt.use_distributed_optimizer,
        ),
        train_iters=100,
    )
    vocab = student_arch.vocab_size
    assert student.vocab_size > vocab, "the EOS id must be a vocabulary-padding id"
    t.tokenizer = type("Tokenizer", (), {"pad_id": 0, "eos_id": vocab})()  # a padding id: never sampled
    t.data = _Prompts(64, t_cfg.max_prompt_length, vocab)
    t.pt_data = _Pretrain(64, t_cfg.max_length + 1, vocab)
    t.timers, t.sample_stats = trainer_module.Timers(), {}

    t._on_policy_iteration(0)  # warm-up: AdamW allocates its moments at the first step
    # What the process holds beyond tensors (thread stacks, kernel code paged in on first use,
    # allocator and Python objects): RSS over the live tensors, after the warm-up and again as each
    # phase starts; the comparison subtracts it (benchmarks/README.md).
    overhead = (_status_kib("VmRSS") - baseline) * 1024 - _live_tensor_bytes()

    meter = PhaseMeter(baseline)
    rollouts, score, train_step = t._rollouts, t._score, trainer_module.train_step
    seen: set = set()

    phase_overhead = {}

    def first_call(phase, fn):
        def run(*args, **kwargs):
            if phase not in seen:
                seen.add(phase)
                phase_overhead[phase] = (_status_kib("VmRSS") - baseline) * 1024 - _live_tensor_bytes()
                meter.mark(phase)
            return fn(*args, **kwargs)

        return run

    # Phases: rollouts; scoring (the rollouts, then the first step's L_PT micro-batches); training
    # (forward/backward, optimizer steps, and the L_PT scoring of later steps).
    t._rollouts, t._score = first_call("rollout", rollouts), first_call("score", score)
    in_steps = []  # non-tensor RSS at the start of every optimizer step (it grows within bf16 iterations)

    def each_step(*args, **kwargs):
        in_steps.append((_status_kib("VmRSS") - baseline) * 1024 - _live_tensor_bytes())
        return train_step(*args, **kwargs)

    trainer_module.train_step = first_call("train", each_step)
    t._on_policy_iteration(1)
    meter.mark(None)

    plan_cfg = PlanConfig.from_train(cfg, layout.dp)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    plan = next(b for b in plan_memory(teacher_arch, student_arch, plan_cfg) if b.stage == stage)
    ph = plan.phases
    predicted = {
        "rollout": ph["rollout"],
        "score": max(ph["score"], ph["score (L_PT/KD, per step)"]),
        "train": max(ph["train"], ph["optimizer step"], ph["score (L_PT/KD, per step)"]),
    }
    result = {
        "rank": torch.distributed.get_rank(),
        "measured": meter.peaks,
        "predicted": predicted,
        "overhead": overhead,
        "phase_overhead": phase_overhead,
        "step_overhead": max(in_steps),
        "terms": plan.terms,
    }
    print("RESULT " + json.dumps(result), flush=True)


def measure(name: str) -> list[dict]:
    world = CONFIGS[name]["world"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        GLIBC_TUNABLES=PRECISE,
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", name],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    outputs = [p.communicate() for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"{name} failed:\n" + "\n".join(err[-3000:] for _, err in outputs))
    return [
        json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[len("RESULT ") :]) for out, _ in outputs
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=sorted(CONFIGS), action="append")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    mib = 2**20
    summary: dict[str, float] = {}
    worst = worst_raw = 0.0
    for name in args.only or CONFIGS:
        results = measure(name)
        r = max(results, key=lambda x: max(x["measured"].values()))  # the rank with the highest peak
        over = r["phase_overhead"]
        print(
            f"\n{name} (rank {r['rank']} of {len(results)}), MiB; non-tensor RSS after the warm-up "
            f"{r['overhead'] / mib:.1f}, at the start of each phase: "
            + ", ".join(f"{k} {v / mib:.1f}" for k, v in over.items())
        )
        print(
            f"  {'phase':8s} {'predicted':>10s} {'measured':>10s} {'measured - non-tensor':>22s} {'ratio':>7s} "
            f"{'raw ratio':>10s}"
        )
        print(f"  non-tensor RSS at the start of optimizer steps: up to {r['step_overhead'] / mib:.1f}")
        tensor_peaks = {k: v - over[k] for k, v in r["measured"].items()}
        for phase in (*PHASES, "peak"):
            if phase == "peak":
                m, p, mt = max(r["measured"].values()), max(r["predicted"].values()), max(tensor_peaks.values())
            else:
                m, p, mt = r["measured"][phase], r["predicted"][phase], tensor_peaks[phase]
            print(f"  {phase:8s} {p / mib:10.1f} {m / mib:10.1f} {mt / mib:22.1f} {p / mt:7.3f} {p / m:10.3f}")
        print("  predicted terms: " + ", ".join(f"{k} {v / mib:.1f}" for k, v in r["terms"].items() if v))
        summary[f"peak_ratio_{name}"] = round(p / mt, 3)
        summary[f"raw_peak_ratio_{name}"] = round(p / m, 3)
        worst, worst_raw = max(worst, abs(p / mt - 1)), max(worst_raw, abs(p / m - 1))
    print(json.dumps({"max_rel_error": round(worst, 3), "max_rel_error_raw_rss": round(worst_raw, 3), **summary}))


if __name__ == "__main__":
    main()
