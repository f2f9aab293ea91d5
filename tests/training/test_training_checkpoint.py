"""Training checkpoints: bit-exact resume, resume at another DP size, atomicity, errors, SIGTERM.

One 4-rank run (TP=2 x DP=2, distributed optimizer) trains 4 steps straight, then 2 steps, saves,
rebuilds everything from scratch, loads and trains 2 more. One 2-rank run (TP=2 x DP=1) loads that
checkpoint, compares parameters and Adam moments, continues, and checks the error paths.
"""

import dataclasses
import os
import re
import shutil
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from harness import run_distributed
from hf_zoo import hf_model
from parity import lm_loss_func, micro_batches

STEPS, SAVE_AT, MICRO_BATCHES = 4, 2, 4
PER_STEP = [micro_batches(MICRO_BATCHES, seed=100 + i) for i in range(STEPS)]  # new data every step


def _student(seed: int, load_weights: bool):
    """The tiny LLaMA student at the current layout, with its DDP, distributed optimizer and a
    warmup + cosine schedule (so the scheduler state matters). ``seed`` sets every RNG first."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from megatron_minillm.checkpoint.dist_checkpoint import CheckpointMetadata
    from megatron_minillm.checkpoint.hf_mapping import hf_to_mcore, load_full_tensors, strict_getter
    from megatron_minillm.models import architecture_from_dict, build_model
    from megatron_minillm.parallel import set_random_seed
    from megatron_minillm.training import setup_model_and_optimizer

    hf = hf_model("llama")
    arch = architecture_from_dict(hf.config.to_dict())
    set_random_seed(seed)
    model = build_model(arch, dtype="fp32")  # random init: differs with the seed
    if load_weights:
        load_full_tensors(model, hf_to_mcore(arch, strict_getter(hf.state_dict(), "HF model")))
    ddp, optimizer, scheduler = setup_model_and_optimizer(
        model,
        # min_lr must be set: megatron's cosine decay fails on the param groups' default None
        OptimizerConfig(lr=1e-3, min_lr=1e-4, weight_decay=0.1, clip_grad=1.0, use_distributed_optimizer=True),
        DistributedDataParallelConfig(grad_reduce_in_fp32=True),
        train_iters=STEPS,
        lr_warmup_iters=1,
        lr_decay_style="cosine",
    )
    meta = CheckpointMetadata.of(model, arch, "fp32", source="tests/hf_zoo.py")
    return arch, ddp, optimizer, scheduler, meta


def _step(arch, ddp, optimizer, scheduler, step: int) -> float:
    """One optimizer step on PER_STEP[step] (each DP rank takes its share); the mean loss over DP."""
    from megatron.core import parallel_state

    from megatron_minillm.training import train_step

    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mine = PER_STEP[step][dp_rank::dp]
    metrics, _ = train_step(ddp, optimizer, scheduler, mine, lm_loss_func(arch.vocab_size))
    loss = torch.tensor([sum(m["lm loss"].item() for m in metrics) / len(mine)])
    torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
    return loss.item() / dp


def _draws() -> list:
    """A draw from every generator a checkpoint restores."""
    import random

    from megatron.core import tensor_parallel

    with tensor_parallel.get_cuda_rng_tracker().fork():
        tracked = torch.rand(3)
    return [random.random(), float(np.random.rand()), torch.rand(3), tracked]


def _full_state(ddp, optimizer) -> dict[str, np.ndarray]:
    """This TP rank's parameters and the distributed optimizer's main params and Adam moments,
    gathered over DP into whole tensors (each DP rank owns a slice of each flattened param); as
    numpy arrays, which reach the test process by value (tensors would go through shared memory)."""
    from megatron.core import parallel_state

    optimizer = getattr(optimizer, "chained_optimizers", [optimizer])[0]  # a chain of one
    names = {p: n for n, p in ddp.module.named_parameters()}
    owned = {}
    for buffers in optimizer.gbuf_ranges:
        for per_bucket in buffers.values():
            for bucket in per_bucket:
                for param, ranges in bucket["param_map"].items():
                    owned[names[param]] = (ranges["param"], optimizer._get_main_param_and_optimizer_states(param))
    out = {}
    for name, param in ddp.module.named_parameters():
        out[name] = param.detach().numpy().copy()
        for key in ("param", "exp_avg", "exp_avg_sq"):
            full = torch.zeros(param.numel())
            if name in owned:
                span, states = owned[name]
                full[span.start : span.end] = states[key].detach()
            torch.distributed.all_reduce(full, group=parallel_state.get_data_parallel_group())
            out[f"{name}:{key}"] = full.view(param.shape).numpy()
    return out


def _save_and_resume(save_dir: Path, hf_dir: Path) -> dict:
    from megatron.core import parallel_state

    from megatron_minillm.parallel import init_distributed
    from megatron_minillm.training.checkpointing import load_training_checkpoint, save_training_checkpoint

    init_distributed(tp=2, pp=1)
    student = _student(seed=1, load_weights=True)
    straight = [_step(*student[:4], s) for s in range(SAVE_AT)]
    straight_draws = _draws()
    straight += [_step(*student[:4], s) for s in range(SAVE_AT, STEPS)]
    straight_params = {n: p.detach().clone() for n, p in student[1].module.named_parameters()}

    arch, ddp, optimizer, scheduler, meta = _student(seed=1, load_weights=True)
    resumed = [_step(arch, ddp, optimizer, scheduler, s) for s in range(SAVE_AT)]
    save_training_checkpoint(
        save_dir, SAVE_AT, ddp, optimizer, scheduler, {"next_step": SAVE_AT}, metadata=meta, hf_dir=hf_dir
    )
    at_save = _full_state(ddp, optimizer)

    arch, ddp, optimizer, scheduler, meta = _student(seed=999, load_weights=False)  # all from scratch
    iteration, state = load_training_checkpoint(save_dir, ddp, optimizer, scheduler, arch)
    assert iteration == SAVE_AT and scheduler.num_steps == SAVE_AT
    resumed_draws = _draws()
    resumed += [_step(arch, ddp, optimizer, scheduler, s) for s in range(state["next_step"], STEPS)]

    for a, b in zip(straight_draws, resumed_draws, strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, (straight_draws, resumed_draws)
    assert straight == resumed, f"losses straight {straight} vs resumed {resumed}"
    for name, param in ddp.module.named_parameters():
        assert torch.equal(param, straight_params[name]), f"{name} differs after resuming"
    coords = (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_data_parallel_rank())
    return {"coords": coords, "losses": straight, "at_save": at_save}


def _outcome(call) -> str:
    """What ``call()`` raised, as text (the error checks are asserted in the test process)."""
    try:
        return f"returned {call()!r}"
    except Exception as err:  # noqa: BLE001 - the type and message are what is checked
        return f"{type(err).__name__}: {err}"


def _resume_at_dp1(save_dir: Path, hf_dir: Path, broken: Path, model_only: Path, empty: Path, damaged: Path) -> dict:
    from megatron.core import parallel_state

    from megatron_minillm.checkpoint.dist_checkpoint import load_model
    from megatron_minillm.models import build_model
    from megatron_minillm.parallel import init_distributed
    from megatron_minillm.training.checkpointing import (
        PreemptionFlag,
        load_training_checkpoint,
        save_training_checkpoint,
    )

    init_distributed(tp=2, pp=1)
    arch, ddp, optimizer, scheduler, meta = _student(seed=7, load_weights=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        iteration, state = load_training_checkpoint(save_dir, ddp, optimizer, scheduler, arch)
    loaded = _full_state(ddp, optimizer)
    losses = [_step(arch, ddp, optimizer, scheduler, s) for s in range(state["next_step"], STEPS)]

    # Saving over the stale iter_0000004.partial; the result is also a plain model checkpoint.
    out = save_training_checkpoint(
        save_dir, STEPS, ddp, optimizer, scheduler, {"next_step": STEPS}, metadata=meta, hf_dir=hf_dir
    )
    plain, _, _ = load_model(out)
    for (name, a), b in zip(ddp.module.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b), f"{name} differs when {out} is loaded as a plain model checkpoint"

    shallow = dataclasses.replace(arch, num_layers=2)
    flag = PreemptionFlag()
    try:
        before = flag.should_stop()
        if torch.distributed.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # only one rank is preempted
        after = flag.should_stop()
    finally:
        flag.restore()
    return {
        "tp": parallel_state.get_tensor_model_parallel_rank(),
        "iteration": iteration,
        "warnings": [str(w.message) for w in caught],
        "loaded": loaded,
        "losses": losses,
        "broken": _outcome(lambda: load_training_checkpoint(broken, ddp, optimizer, scheduler)),
        "model_only": _outcome(lambda: load_training_checkpoint(model_only, ddp, optimizer, scheduler)),
        "empty": _outcome(lambda: load_training_checkpoint(empty, ddp, optimizer, scheduler)),
        "damaged": _outcome(lambda: load_training_checkpoint(damaged, ddp, optimizer, scheduler)),
        "shape": _outcome(
            lambda: load_training_checkpoint(save_dir, build_model(shallow), optimizer, scheduler, shallow)
        ),
        "preempted": (before, after),
    }


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("training_ckpt")
    hf_model("llama").save_pretrained(root / "hf")
    return {"root": root, "hf": root / "hf", "save": root / "save"}


@pytest.fixture(scope="module")
def first_run(dirs) -> list[dict]:
    return run_distributed(_save_and_resume, 4, dirs["save"], dirs["hf"])


def test_resume_is_bit_identical_to_a_straight_run(first_run, dirs):
    save = dirs["save"] / "iter_0000002"
    assert (dirs["save"] / "latest").read_text() == "2\n"
    assert sorted(p.name for p in (save / "rng").iterdir()) == [
        f"pp000_tp{t:03d}_dp{d:03d}.json" for t in range(2) for d in range(2)
    ]
    assert {"config.json", "minillm_checkpoint.json", "model", "optimizer", "training_state.json"} <= {
        p.name for p in save.iterdir()
    }


@pytest.fixture(scope="module")
def second_run(first_run, dirs) -> list[dict]:
    """Loads at TP=2 x DP=1 the checkpoint saved at TP=2 x DP=2, with a stale later .partial next to it."""
    (dirs["save"] / "iter_0000004.partial" / "model").mkdir(parents=True)  # an interrupted later save
    broken, model_only, empty = (dirs["root"] / name for name in ("broken", "model_only", "empty"))
    (broken / "iter_0000007.partial").mkdir(parents=True)
    (broken / "latest").write_text("7\n")
    (model_only / "iter_0000001").mkdir(parents=True)  # e.g. `latest` edited to name a converted model
    (model_only / "latest").write_text("1\n")
    empty.mkdir()
    damaged = dirs["root"] / "damaged"  # bytes changed in every optimizer shard: each rank hashes some
    shutil.copytree(dirs["save"] / "iter_0000002", damaged / "iter_0000002")
    (damaged / "latest").write_text("2\n")
    for shard in (damaged / "iter_0000002" / "optimizer").glob("*.distcp"):
        with open(shard, "r+b") as f:
            f.seek(shard.stat().st_size // 2)
            f.write(bytes(255 - b for b in f.read(16)))
    return run_distributed(_resume_at_dp1, 2, dirs["save"], dirs["hf"], broken, model_only, empty, damaged)


def test_resume_at_another_dp_size(first_run, second_run):
    saved = {r["coords"][0]: r["at_save"] for r in first_run if r["coords"][1] == 0}
    for r in second_run:
        expected = saved[r["tp"]]
        assert r["loaded"].keys() == expected.keys()
        for name, tensor in r["loaded"].items():
            assert np.array_equal(tensor, expected[name]), f"TP rank {r['tp']}: {name} differs after resharding"
    # The same global batch split over 1 instead of 2 DP ranks: only the reduction order differs.
    torch.testing.assert_close(
        torch.tensor(second_run[0]["losses"]), torch.tensor(first_run[0]["losses"][SAVE_AT:]), atol=1e-6, rtol=0
    )
    assert any("RNG states restored per TP x PP rank only" in w for w in second_run[0]["warnings"])


def test_partial_saves_errors_and_preemption(second_run, dirs):
    for r in second_run:
        assert r["iteration"] == SAVE_AT, "latest, not the newer stale iter_0000004.partial, is loaded"
        assert re.fullmatch(
            r"NotACheckpointError: .*/broken/latest names iteration 7, but .*/iter_0000007 does "
            r"not exist; .*/iter_0000007\.partial is a half-written save, not a checkpoint",
            r["broken"],
        ), r["broken"]
        assert re.fullmatch(
            r"NotACheckpointError: .*/iter_0000001 is not a training checkpoint "
            r"\(no training_state.json\)",
            r["model_only"],
        ), r["model_only"]
        assert r["empty"] == "returned None"
        shards = sorted((dirs["root"] / "damaged" / "iter_0000002" / "optimizer").glob("*.distcp"))
        assert r["damaged"].startswith("DamagedCheckpointError: damaged: ") and len(shards) >= 2, r["damaged"]
        assert all(str(shard) in r["damaged"] for shard in shards), r["damaged"]  # found by both ranks
        assert "CheckpointMismatchError" in r["shape"] and "num_layers: checkpoint 4 vs model 2" in r["shape"], r
        assert r["preempted"] == (False, True), "SIGTERM on rank 1 must stop every rank"
    # The later save replaced the stale .partial and moved `latest`.
    assert (dirs["save"] / "latest").read_text() == "4\n"
    assert sorted(p.name for p in dirs["save"].iterdir()) == ["iter_0000002", "iter_0000004", "latest"]
