"""The CUDA code path's placement rule on a CPU-only machine (see tests/device_guard.py): every tensor
the package creates for a training iteration, a rollout and an evaluation lands on the model's
device, and every explicit host placement is marked as such.

The guard is shown to catch a planted bug: ``device=device`` deleted from the sampler's "done" flags
(``sampling/generate.py``) fails the same rollout that passes unplanted.
"""

import importlib
import inspect
import re
from pathlib import Path

import torch
from harness import ROOT, run_distributed

HOST_PLACEMENT = re.compile(
    r"""\bdevice\s*=\s*["']cpu["']|device\(["']cpu["']\)|map_location\s*=\s*["']cpu["']|\.cpu\(\)|\.to\(["']cpu["']"""
)


def _train_and_evaluate_under_guard(paths: dict[str, Path]) -> dict:
    """One MiniLLM iteration (teacher-mixed rollouts, one PPO step, L_PT) with the teacher on its own
    layout, then an evaluation of the student against the teacher (rollouts with top-k and top-p,
    teacher-forced scoring), all under the guard at TP=2 x PP=2."""
    from device_guard import device_guard

    from megatron_minillm.config import load_config
    from megatron_minillm.evaluation.evaluate import EvalConfig, evaluate_checkpoints
    from megatron_minillm.platform import device
    from megatron_minillm.training.trainer import Trainer

    cfg = load_config(
        None,
        [
            f"student={paths['student']}",
            f"teacher={paths['teacher']}",
            f"data={paths['data']}",
            f"pt_data={paths['pt']}",
            "parallel.tp=2",
            "parallel.pp=2",
            "parallel.teacher_tp=1",  # the teacher on its own layout (TP=1 x PP=2 x DP=2): the exchange too
            "training.train_iters=1",
            "training.max_prompt_length=64",
            "training.max_length=80",
            "training.global_batch_size=4",
            "training.micro_batch_size=2",
            "rollout.batch_size=4",
            "rollout.micro_batch_size=4",
            "minillm.ppo_epochs=1",
            "optimizer.lr_warmup_iters=0",
        ],
    )
    with device_guard(device()) as guard:
        Trainer(cfg).run()
        report = evaluate_checkpoints(
            [("student", paths["student"])],
            paths["valid"],
            EvalConfig(seeds=(1,), max_new_tokens=4, top_k=20, top_p=0.9, batch_size=2, max_prompt_length=64),
            teacher=("teacher", paths["teacher"]),
            template="none",
        )
    return {"factory calls": guard.factory_calls, "collectives": guard.collectives, "models": len(report.evaluations)}


def test_training_sampling_and_evaluation_keep_tensors_on_the_model_device(tiny_pair):
    results = run_distributed(_train_and_evaluate_under_guard, 4, tiny_pair)
    # The guard was live: it saw the package's factory calls and its collectives, and every one passed.
    assert all(r["factory calls"] > 0 and r["collectives"] > 0 and r["models"] == 2 for r in results), results


def _planted_rollout() -> dict[str, str]:
    """A rollout on a random tiny LLaMA, as written and with one device argument deleted."""
    import torch.distributed as dist
    from device_guard import device_guard
    from hf_zoo import hf_config

    from megatron_minillm.models import architecture_from_dict, build_model
    from megatron_minillm.parallel import init_distributed
    from megatron_minillm.platform import device
    from megatron_minillm.sampling import SamplingParams, generate, sample_seeds

    init_distributed(tp=1, pp=1)
    arch = architecture_from_dict(hf_config("llama").to_dict())
    model = build_model(arch)
    params = SamplingParams(max_new_tokens=3, top_k=5, top_p=0.9, stop_ids=(2,))

    def rollout(fn) -> str:
        try:
            with device_guard(device()):
                fn(model, [[5, 6, 7], [8]], params, sample_seeds(0, torch.arange(2)), vocab_size=arch.vocab_size)
            return "passed"
        except (RuntimeError, NotImplementedError) as error:
            return str(error)

    generate_module = importlib.import_module(
        "megatron_minillm.sampling.generate"
    )  # the package re-exports the function
    source = inspect.getsource(generate_module)
    line = "done = torch.zeros(batch, dtype=torch.bool, device=device)"
    assert line in source, "the planted line moved: update this test"
    outcome = {"as written": rollout(generate)}
    module = generate_module.__dict__
    saved = dict(module)
    try:
        exec(
            compile(source.replace(line, line.replace(", device=device", "")), generate_module.__file__, "exec"), module
        )
        outcome["planted"] = rollout(module["generate"])
    finally:
        module.clear()
        module.update(saved)
    try:
        with device_guard(device()):
            dist.all_reduce(torch.zeros(1, device="meta"))
        outcome["collective"] = "passed"
    except RuntimeError as error:
        outcome["collective"] = str(error)
    return outcome


def test_the_guard_catches_a_planted_misplacement():
    [outcome] = run_distributed(_planted_rollout, 1)
    assert outcome["as written"] == "passed", outcome
    assert "meets a tensor created without a device" in outcome["planted"], outcome
    assert "all_reduce got a tensor on meta" in outcome["collective"], outcome


def test_host_placements_are_marked():
    """Each deliberate host placement in the package says so (``# host``); the platform layer, which
    chooses the device, is exempt."""
    unmarked = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sorted((ROOT / "megatron_minillm").rglob("*.py"))
        if "platform" not in path.parts
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if HOST_PLACEMENT.search(line) and "# host" not in line
    ]
    assert not unmarked, "host placements without a '# host' comment:\n" + "\n".join(unmarked)
