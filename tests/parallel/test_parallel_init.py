"""Parallel layouts and the SLURM -> torchrun environment translation (no process groups)."""

import shutil

import pytest

from megatron_minillm.parallel import LayoutError, ParallelLayout
from megatron_minillm.parallel.initialize import env_from_slurm, expand_slurm_nodelist


def test_layout_derives_dp():
    assert ParallelLayout(tp=2, pp=2, world_size=8).dp == 2
    assert ParallelLayout(tp=1, pp=3, world_size=12).dp == 4
    assert ParallelLayout(tp=4, pp=1, world_size=4).dp == 1
    assert ParallelLayout().dp == 1


def test_layout_world_not_divisible_by_tp_pp():
    with pytest.raises(LayoutError) as err:
        ParallelLayout(tp=2, pp=2, world_size=6)
    assert "world size 6" in str(err.value) and "TP x PP" in str(err.value) and "= 4" in str(err.value)


@pytest.mark.parametrize("sizes", [dict(tp=0), dict(pp=0), dict(world_size=0), dict(tp=-2, world_size=4)])
def test_layout_sizes_below_one_raise(sizes):
    with pytest.raises(LayoutError, match="must be >= 1"):
        ParallelLayout(**sizes)


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("gpu[001-003,007],login1", ["gpu001", "gpu002", "gpu003", "gpu007", "login1"]),
        ("node7", ["node7"]),
        ("a[1-2],b[10-11]", ["a1", "a2", "b10", "b11"]),
    ],
)
def test_expand_slurm_nodelist(nodelist, hosts):
    assert expand_slurm_nodelist(nodelist) == hosts


def _srun_env(procid: str, job_id: str = "4242") -> dict[str, str]:
    return {
        "SLURM_PROCID": procid,
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": str(int(procid) % 4),
        "SLURM_JOB_NODELIST": "gpu[001-002]",
        "SLURM_JOB_ID": job_id,
    }


def test_env_from_slurm_fills_torchrun_variables():
    env = _srun_env("5")
    env_from_slurm(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "8", "1")
    if shutil.which("scontrol") is None:  # the built-in parser path (scontrol would agree anyway)
        assert env["MASTER_ADDR"] == "gpu001"
    port = int(env["MASTER_PORT"])
    assert 1024 < port < 65536

    other_task = _srun_env("0")
    env_from_slurm(other_task)
    assert other_task["MASTER_PORT"] == env["MASTER_PORT"]
    assert other_task["MASTER_ADDR"] == env["MASTER_ADDR"]

    other_job = _srun_env("5", job_id="4243")
    env_from_slurm(other_job)
    assert other_job["MASTER_PORT"] != env["MASTER_PORT"]


def test_env_from_slurm_leaves_torchrun_env_alone():
    env = _srun_env("3") | {"RANK": "1", "WORLD_SIZE": "2"}
    before = dict(env)
    env_from_slurm(env)
    assert env == before


def test_env_from_slurm_keeps_existing_master():
    env = _srun_env("3") | {"MASTER_ADDR": "head.example", "MASTER_PORT": "31337"}
    env_from_slurm(env)
    assert env["RANK"] == "3"
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("head.example", "31337")


def test_env_without_slurm_is_untouched():
    env = {"PATH": "/bin"}
    env_from_slurm(env)
    assert env == {"PATH": "/bin"}
