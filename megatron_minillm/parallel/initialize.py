"""Process-group setup: torchrun or SLURM environment -> torch.distributed -> megatron parallel_state.

``srun python -m megatron_minillm...`` and ``torchrun ...`` both work with no wrapper script: the
SLURM variables are translated into the torchrun ones (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) before the process group is created.
"""

import datetime
import os
import random
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_minillm.platform import backend, setup_platform


class LayoutError(ValueError):
    """A parallel layout that cannot work (sizes that do not divide)."""


@dataclass(frozen=True)
class ParallelLayout:
    """Tensor x pipeline x data parallel sizes; ``dp`` is derived from the world size."""

    tp: int = 1
    pp: int = 1
    world_size: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "world_size"):
            if getattr(self, name) < 1:
                raise LayoutError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.world_size % (self.tp * self.pp) != 0:
            raise LayoutError(
                f"world size {self.world_size} is not divisible by TP x PP = "
                f"{self.tp} x {self.pp} = {self.tp * self.pp}"
            )

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    def rank_of(self, tp_rank: int, pp_rank: int, dp_rank: int) -> int:
        """The global rank at these coordinates, in megatron's order (TP fastest, then DP, then PP)."""
        return tp_rank + self.tp * (dp_rank + self.dp * pp_rank)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(TP rank, PP rank, DP rank) of a global rank: the inverse of :meth:`rank_of`."""
        return rank % self.tp, rank // (self.tp * self.dp), rank // self.tp % self.dp


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list such as ``gpu[001-003,007],login1`` into host names."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{str(i).zfill(len(lo))}")
    return hosts


def _first_slurm_host(nodelist: str) -> str:
    if shutil.which("scontrol"):
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=False
        ).stdout.split()
        if out:
            return out[0]
    return expand_slurm_nodelist(nodelist)[0]


def env_from_slurm(env: MutableMapping[str, str]) -> None:
    """Fill torchrun's variables from SLURM's when the process was started by ``srun``."""
    if "RANK" in env or "SLURM_PROCID" not in env:
        return
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = _first_slurm_host(env.get("SLURM_JOB_NODELIST", "localhost"))
    if "MASTER_PORT" not in env:
        # Same on every task of the job, different across jobs sharing a node.
        env["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)


def _default_port(world_size: int) -> str:
    """A port nobody gave: a free one for a lone process (two tools on one host must not collide
    on 29500), torch's 29500 for several (they must agree, and only a launcher can tell them)."""
    if world_size > 1:
        return "29500"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def set_random_seed(seed: int) -> None:
    """Seed Python, NumPy, torch and megatron's model-parallel RNG tracker as Megatron-LM does.

    Pipeline stages get distinct seeds; TP ranks get distinct tracker states for TP-split dropout.
    """
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def init_distributed(
    tp: int = 1,
    pp: int = 1,
    seed: int = 1234,
    env: Mapping[str, str] | None = None,
    timeout_minutes: int = 30,
) -> ParallelLayout:
    """Create the default process group and megatron's TP/PP/DP groups; return the layout.

    Works for a single process with no launcher (world size 1) as well.
    """
    environ = os.environ if env is None else env
    if isinstance(environ, MutableMapping):
        env_from_slurm(environ)
    world_size = int(environ.get("WORLD_SIZE", "1"))
    rank = int(environ.get("RANK", "0"))
    local_rank = int(environ.get("LOCAL_RANK", "0"))
    layout = ParallelLayout(tp=tp, pp=pp, world_size=world_size)
    setup_platform(local_rank)
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", environ.get("MASTER_ADDR", "127.0.0.1"))
        os.environ.setdefault("MASTER_PORT", environ.get("MASTER_PORT") or _default_port(world_size))
        torch.distributed.init_process_group(
            backend=backend(),
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        distributed_timeout_minutes=timeout_minutes,
    )
    set_random_seed(seed)
    return layout


def new_model_groups(layout: ParallelLayout) -> ProcessGroupCollection:
    """Process groups of a second model on its own TP x PP x DP layout over the same ranks (a teacher
    beside the student), ordered as megatron orders its global ones (:meth:`ParallelLayout.rank_of`).

    Collective: every rank creates every group, in the same order. The collection holds what
    megatron's GPTModel and pipeline schedule read: tp, pp, dp and dp_cp (no context parallelism),
    cp (this rank alone), embd (first and last stage of each pipeline, for tied embeddings; None at
    PP=1) and pos_embd (None: positions are never split over stages here).
    """
    if layout.world_size != dist.get_world_size():
        raise LayoutError(f"a layout for {layout.world_size} ranks on a world of {dist.get_world_size()}")
    rank, tp, pp, dp = dist.get_rank(), layout.tp, layout.pp, layout.dp
    lists = {
        "tp": [[layout.rank_of(t, p, d) for t in range(tp)] for p in range(pp) for d in range(dp)],
        "pp": [[layout.rank_of(t, p, d) for p in range(pp)] for d in range(dp) for t in range(tp)],
        "dp": [[layout.rank_of(t, p, d) for d in range(dp)] for p in range(pp) for t in range(tp)],
    }
    if pp > 1:
        lists["embd"] = [[ranks[0], ranks[-1]] for ranks in lists["pp"]]
    mine: dict[str, dist.ProcessGroup | None] = {"embd": None}
    for name, rank_lists in lists.items():
        for ranks in rank_lists:
            group = dist.new_group(ranks)
            if rank in ranks:
                mine[name] = group
    return ProcessGroupCollection(
        tp=mine["tp"],
        pp=mine["pp"],
        dp=mine["dp"],
        dp_cp=mine["dp"],
        cp=parallel_state.get_context_parallel_group(),
        embd=mine["embd"],
        pos_embd=None,
    )


def destroy_distributed() -> None:
    """Tear down megatron's groups and the default process group."""
    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
