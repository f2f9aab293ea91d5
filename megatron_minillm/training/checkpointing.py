"""Training checkpoints: save and resume model, optimizer, scheduler, RNG and trainer state.

``save_dir/iter_XXXXXXX/`` is a native model checkpoint (``load_model`` and ``convert.py
mcore-to-hf`` read it as it is) plus ``optimizer/``, ``rng/`` and ``training_state.json``;
``save_dir/latest`` names the last complete one. It is written as ``iter_XXXXXXX.partial`` and
renamed when complete, and only then does ``latest`` move: a save killed half-way leaves the
previous checkpoint in charge. Layout and caveats: docs/checkpointing.md.
"""

import json
import random
import signal
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.utils import unwrap_model

from megatron_minillm.checkpoint.dist_checkpoint import (
    CheckpointMetadata,
    NotACheckpointError,
    atomic_directory,
    load_checkpoint,
    write_checkpoint_files,
)
from megatron_minillm.checkpoint.integrity import (
    safe_dcp_load,
    verify_manifest,
    write_manifest,
    write_text_atomically,
)
from megatron_minillm.models.hf_config import Architecture
from megatron_minillm.platform.device import device, is_cuda

LATEST_FILE = "latest"
OPTIMIZER_DIR = "optimizer"
RNG_DIR = "rng"
STATE_FILE = "training_state.json"
# 'fully_reshardable': Adam moments stored shaped like the parameters, so any TP x PP x DP loads them
# (0.16.1's default 'fully_sharded_model_space' cannot save: "ShardedTensor.flattened_range is not
# supported"; 'dp_reshardable' fixes TP and PP). Cost: DP rank 0 gathers its shard's state in host
# memory at save (over gloo: 'mem_efficient'); at load each rank reads its TP x PP shard's whole state.
OPTIMIZER_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "distrib_optim_fully_reshardable_mem_efficient": True,
    "chained_optim_avoid_prefix": True,
}


def iteration_dir(save_dir: str | Path, iteration: int) -> Path:
    return Path(save_dir) / f"iter_{iteration:07d}"


def read_latest(save_dir: str | Path) -> int | None:
    """The iteration ``save_dir/latest`` names, or None when nothing was saved yet."""
    path = Path(save_dir) / LATEST_FILE
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise NotACheckpointError(f"{path} should hold an iteration number, found {text!r}")
    return int(text)


def _layout() -> dict[str, int]:
    ps = parallel_state
    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
    }


def _rng_file(dp_rank: int | None = None) -> str:
    """This rank's RNG file, named by its (PP, TP, DP) coordinates (or another DP rank's)."""
    ps = parallel_state
    dp = ps.get_data_parallel_rank() if dp_rank is None else dp_rank
    return f"pp{ps.get_pipeline_model_parallel_rank():03d}_tp{ps.get_tensor_model_parallel_rank():03d}_dp{dp:03d}.json"


def _rng_state() -> dict[str, Any]:
    """Every generator a rank draws from, as JSON (no pickle to trust at load time)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(mt), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
        "cuda": torch.cuda.get_rng_state().tolist() if is_cuda() else None,
        # megatron's tracker: TP-split dropout and init streams (on CPU it forks the CPU generator)
        "tracker": {k: v.tolist() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    # host: generator states are CPU byte tensors, the CUDA generator's and megatron's tracker's too
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8, device="cpu"))  # host
    if state["cuda"] is not None and is_cuda():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8, device="cpu"))  # host
    tracker = {k: torch.tensor(v, dtype=torch.uint8, device="cpu") for k, v in state["tracker"].items()}  # host
    tensor_parallel.get_cuda_rng_tracker().set_states(tracker)


def _drop_empty_param_state(sharded: dict) -> dict:
    """Off DP rank 0 the gathered optimizer state is None; without it the common state is the same
    on every rank (megatron otherwise logs a mismatch warning per rank and save)."""
    if "param_state" in sharded and sharded["param_state"] is None:
        del sharded["param_state"]
    for value in sharded.values():
        if isinstance(value, dict):
            _drop_empty_param_state(value)
    return sharded


def save_training_checkpoint(
    save_dir: str | Path,
    iteration: int,
    model: torch.nn.Module,
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    state: dict[str, Any],
    *,
    metadata: CheckpointMetadata,
    hf_dir: str | Path,
    checksums: bool = True,
) -> Path:
    """Save everything resuming needs as ``save_dir/iter_{iteration:07d}`` and point ``latest`` at it.

    Collective: every rank calls it at the same iteration. ``model`` may be DDP-wrapped; ``state``
    is the trainer's JSON-serialisable state (data position, resolved config, ...), rank 0's is
    kept. ``metadata`` and ``hf_dir`` (config.json, tokenizer: the student's source directory) make
    the directory a plain model checkpoint too. ``checksums=False``: the manifest records sizes only. Saving the iteration ``latest`` already names (e.g.
    SIGTERM right after a periodic save) does nothing: replacing it could not be atomic.
    """
    out = iteration_dir(save_dir, iteration)
    if read_latest(save_dir) == iteration and out.is_dir():
        return out
    gpt = unwrap_model(model)
    rank0 = torch.distributed.get_rank() == 0
    with atomic_directory(out, overwrite=True) as tmp:
        write_checkpoint_files(gpt, tmp, metadata, hf_dir)
        if rank0:
            (tmp / OPTIMIZER_DIR).mkdir()
            (tmp / RNG_DIR).mkdir()
        torch.distributed.barrier()
        sharded = optimizer.sharded_state_dict(gpt.sharded_state_dict(), metadata=OPTIMIZER_METADATA)
        dist_checkpointing.save(_drop_empty_param_state(sharded), str(tmp / OPTIMIZER_DIR))
        (tmp / RNG_DIR / _rng_file()).write_text(json.dumps(_rng_state()))
        if rank0:
            info = {"iteration": iteration, "layout": _layout(), "scheduler": scheduler.state_dict(), "state": state}
            (tmp / STATE_FILE).write_text(json.dumps(info, indent=2) + "\n")
        write_manifest(tmp, checksums)
    if rank0:
        write_text_atomically(Path(save_dir) / LATEST_FILE, f"{iteration}\n")
    torch.distributed.barrier()  # no rank goes on (or exits on SIGTERM) before `latest` moved
    return out


def load_training_checkpoint(
    save_dir: str | Path,
    model: torch.nn.Module,
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    arch: Architecture | None = None,
    *,
    checksums: bool = True,
) -> tuple[int, dict[str, Any]] | None:
    """Restore the checkpoint ``save_dir/latest`` names; return ``(iteration, state)``, or None
    when ``save_dir`` has no checkpoint yet (a fresh run). Collective.

    Any TP x PP x DP loads it. ``arch`` (what ``model`` was built from) makes a checkpoint of
    another shape fail with the differing fields named. RNG states are exact only at the saving
    layout (see :func:`_restore_rng`). Every file read is verified against the checkpoint's
    manifest (SHA-256 unless ``checksums`` is False) and nothing is unpickled.
    """
    iteration = read_latest(save_dir)
    if iteration is None:
        return None
    ckpt = iteration_dir(save_dir, iteration)
    if not ckpt.is_dir():
        partial = ckpt.with_name(ckpt.name + ".partial")
        hint = f"; {partial} is a half-written save, not a checkpoint" if partial.exists() else ""
        raise NotACheckpointError(
            f"{Path(save_dir) / LATEST_FILE} names iteration {iteration}, but {ckpt} does not exist{hint}"
        )
    if not (ckpt / STATE_FILE).is_file():
        raise NotACheckpointError(f"{ckpt} is not a training checkpoint (no {STATE_FILE})")
    gpt = unwrap_model(model)
    load_checkpoint(gpt, ckpt, arch, checksums=checksums)  # checks completeness and shape, loads the weights
    verify_manifest(ckpt, (OPTIMIZER_DIR, RNG_DIR), checksums)
    _init_optimizer_state(optimizer)
    sharded = optimizer.sharded_state_dict(gpt.sharded_state_dict(), is_loading=True, metadata=OPTIMIZER_METADATA)
    _load_optimizer_state(optimizer, safe_dcp_load(sharded, ckpt / OPTIMIZER_DIR))
    info = json.loads((ckpt / STATE_FILE).read_text())
    scheduler.load_state_dict(info["scheduler"])
    _restore_rng(ckpt, info["layout"])
    return iteration, info["state"]


def _init_optimizer_state(optimizer: MegatronOptimizer) -> None:
    """Give a never-stepped optimizer zero Adam state, 'step' included: with torch's Adam (no
    transformer-engine or apex, e.g. on CPU) megatron 0.16.1's DistributedOptimizer.state_dict()
    asserts one common per-param 'step' even when building the state dict to load into."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if opt.init_state_fn is None or not isinstance(opt.optimizer, torch.optim.Adam | torch.optim.AdamW):
            continue
        opt.init_state_fn(opt.optimizer, opt.config)
        for group in opt.optimizer.param_groups:
            for param in group["params"]:
                # where torch's Adam keeps it: on the parameter's device when fused or capturable
                on_device = group.get("fused") or group.get("capturable")
                step = torch.tensor(0.0, device=param.device if on_device else "cpu")  # host unless fused
                opt.optimizer.state[param].setdefault("step", step)


def _load_optimizer_state(optimizer: MegatronOptimizer, loaded: dict) -> None:
    """``optimizer.load_state_dict(loaded)``, around two megatron 0.16.1 bugs of the torch-Adam path
    (no transformer-engine or apex, e.g. on CPU): the distributed optimizer's parameter-state load
    copies every state key, 'step' included, which the checkpoint keeps in the param groups only
    (KeyError: 'step'); and it gives all parameters one shared 'step' tensor, which Adam then
    increments in place once per parameter (wrong bias correction after resuming)."""
    chain = getattr(optimizer, "chained_optimizers", [optimizer])
    for opt, state in zip(chain, [loaded] if len(chain) == 1 else [loaded[i] for i in range(len(chain))]):
        param_state = state.pop("param_state", None)
        opt.load_state_dict(state)
        steps = {p: s.pop("step") for p, s in opt.optimizer.state.items() if "step" in s}
        if param_state is not None:
            opt.load_parameter_state_from_fully_reshardable(param_state)
        for param, step in steps.items():
            opt.optimizer.state[param]["step"] = step.clone()
    if len(chain) > 1:
        optimizer._synchronize_steps()


def _restore_rng(ckpt: Path, saved: dict[str, int]) -> None:
    """Each rank takes the RNG states of the saved rank at its own coordinates: exact at the saving
    layout. At another DP size (same TP x PP) DP rank d takes saved DP rank d % saved_dp, so the
    TP-dependent tracker streams still fit; at another TP or PP no saved stream fits a rank, and the
    freshly seeded states are kept."""
    now, source = _layout(), _rng_file()
    same_model_split = (now["tp"], now["pp"]) == (saved["tp"], saved["pp"])
    if now != saved and torch.distributed.get_rank() == 0:
        kept = "restored per TP x PP rank only" if same_model_split else "not restored (seeded states kept)"
        warnings.warn(
            f"RNG states {kept}: saved at {saved}, resuming at {now}; random draws differ from an uninterrupted run",
            RuntimeWarning,
            stacklevel=3,
        )
    if not same_model_split:
        return
    if now != saved:
        source = _rng_file(parallel_state.get_data_parallel_rank() % saved["dp"])
    _set_rng_state(json.loads((ckpt / RNG_DIR / source).read_text()))


class PreemptionFlag:
    """Remembers a SIGTERM (what SLURM sends before preempting or timing out a job; torchrun
    forwards it) so the trainer can save and exit at an iteration boundary instead of dying mid-step.

    Ranks may get the signal at different iterations, hence :meth:`should_stop` agrees over the world.
    """

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        self.signum = signum
        self.received = False
        self._previous = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = True

    def should_stop(self) -> bool:
        """Collective (once per iteration): True on every rank if any rank got the signal."""
        flag = torch.tensor([int(self.received)], dtype=torch.int32, device=device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        """Put back the handler that was installed before."""
        signal.signal(self.signum, self._previous)
