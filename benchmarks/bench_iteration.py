"""A whole MiniLLM iteration (rollouts + scoring + PPO) of the demo's configuration: speculative
rollouts against token-by-token teacher-mixed rollouts, in one run.

    python benchmarks/bench_iteration.py [--workdir /tmp/bench_iteration] [--k 4] [--iterations 2]

Models and data as scripts/demo.sh builds them (steps 1-3): SmolLM2-135M-Instruct as the teacher,
its 8-layer copy as the student (not SFT-trained: the demo's MiniLLM starts from an SFT student, whose
drafts the teacher accepts more often), T0 instructions with the chat template, T0 passages for L_PT.
The demo's MiniLLM settings: 16 rollouts of up to 64 new tokens after prompts of up to 128, alpha
0.2, 4 PPO epochs of 8-sample steps, fp32, one process. Each variant trains from the same student
for ``--iterations`` iterations; the first is a warm-up, the rest are timed (the trainer's own
rollout/score/train timers). The last line is one JSON with the ratio.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> None:
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def prepare(work: Path) -> None:
    """The demo's steps 1-3 (skipped where their output exists)."""
    convert = "tools/checkpoint/convert.py"
    if not (work / "teacher_hf").is_dir():
        _run(convert, "gguf-to-hf", "--out", str(work / "teacher_hf"))
    if not (work / "teacher").is_dir():
        _run(convert, "hf-to-mcore", "--hf", str(work / "teacher_hf"), "--out", str(work / "teacher"))
    if not (work / "student_hf").is_dir():
        hf, out = str(work / "teacher_hf"), str(work / "student_hf")
        _run("tools/checkpoint/make_student.py", "--hf", hf, "--out", out, "--num-layers", "8")
    if not (work / "student").is_dir():
        _run(convert, "hf-to-mcore", "--hf", str(work / "student_hf"), "--out", str(work / "student"))
    if not (work / "data" / "pt_summary.json").is_file():
        common = ["--tokenizer", str(work / "teacher")]
        _run("tools/preprocess_data.py", "instructions", "--input", "examples/data/t0_train_600.jsonl", *common,
             "--template", "chat", "--max-prompt-length", "128", "--max-length", "192", "--split", "0",
             "--output-prefix", str(work / "data" / "t0"))  # fmt: skip
        _run("tools/preprocess_data.py", "pretrain", "--input", "examples/data/t0_passages_300.jsonl", *common,
             "--output-prefix", str(work / "data" / "pt"))  # fmt: skip


def timed_iterations(work: Path, k: int, iterations: int) -> dict[str, float]:
    """Seconds per timed iteration (total and the trainer's rollout/score/train split) at ``k``."""
    from megatron.core import parallel_state

    from megatron_minillm.config import load_config
    from megatron_minillm.training.trainer import Timers, Trainer

    overrides = [
        "algorithm=minillm",
        f"student={work / 'student'}",
        f"teacher={work / 'teacher'}",
        f"data={work / 'data' / 't0_train'}",
        f"pt_data={work / 'data' / 'pt_train'}",
        "parallel.tp=1",
        "training.dtype=fp32",
        "training.max_prompt_length=128",
        "training.max_length=192",
        "training.micro_batch_size=2",
        "training.global_batch_size=8",
        "rollout.batch_size=16",
        "rollout.micro_batch_size=16",
        "minillm.ppo_epochs=4",
        "optimizer.lr=2e-5",
        "optimizer.lr_warmup_iters=0",
        f"rollout.speculative_k={k}",
    ]
    trainer = Trainer(load_config(str(ROOT / "examples" / "configs" / "minillm.yaml"), overrides))
    trainer.iteration(0)  # warm-up
    trainer.timers, metrics = Timers(), {}
    start = time.perf_counter()
    for i in range(1, iterations):
        metrics = trainer.iteration(i)
    seconds = (time.perf_counter() - start) / (iterations - 1)
    shares = {name: s / (iterations - 1) for name, s in trainer.timers.seconds.items()}
    parallel_state.destroy_model_parallel()
    out = {"seconds": seconds, **{f"{name}_s": s for name, s in shares.items()}}
    for key in ("response length", "draft acceptance", "tokens per teacher forward"):
        if key in metrics:
            out[key] = metrics[key]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_iteration"))
    parser.add_argument("--k", type=int, default=2, help="drafts per teacher forward of the speculative run")
    parser.add_argument("--iterations", type=int, default=2, help="per variant, the first a warm-up")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    prepare(args.workdir)
    results = {f"k={k}": timed_iterations(args.workdir, k, args.iterations) for k in (0, args.k)}
    for name, r in results.items():
        print(f"{name:>5}: " + " | ".join(f"{key} {value:.3g}" for key, value in r.items()))
    ratio = results[f"k={args.k}"]["seconds"] / results["k=0"]["seconds"]
    print(f"speculative (k={args.k}) / token-by-token MiniLLM iteration: {ratio:.3f}")
    print(json.dumps({"iteration_speculative_vs_mixed": round(ratio, 3), "speculative_k": args.k, **results}))


if __name__ == "__main__":
    main()
