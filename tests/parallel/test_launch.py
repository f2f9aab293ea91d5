"""Launch paths: the smoke test started the way `srun` starts it, and the layout checker CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

from harness import free_port, run_tool, run_tool_in_workers
from hf_zoo import hf_config

ROOT = Path(__file__).resolve().parents[2]


def _slurm_job_id_for_free_port() -> str:
    """A job id whose derived MASTER_PORT (20000 + id % 20000) is free right now."""
    while True:
        port = free_port()
        if 20000 <= port < 40000:
            return str(port - 20000)


def test_smoke_test_under_srun_environment(tmp_path):
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    base.update(
        SLURM_NTASKS="2",
        SLURM_JOB_NODELIST="localhost",
        SLURM_JOB_ID=_slurm_job_id_for_free_port(),
        OMP_NUM_THREADS="1",
        TMPDIR=str(tmp_path),
    )
    # Two ranks (the recipes' test launches TP=2 and PP=2 trainings the same way): the pipeline path.
    cmd = [
        sys.executable,
        "-m",
        "megatron_minillm.smoke",
        "--tp",
        "1",
        "--pp",
        "2",
        "--iterations",
        "3",
        "--seq-length",
        "32",
    ]
    procs = [
        subprocess.Popen(
            cmd,
            env=base | {"SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    lines = outs[0][0].splitlines()
    assert lines[0] == "layout: TP=1 PP=2 DP=1 on 2 ranks"
    losses = [float(line.split("student lm loss ")[1].split()[0]) for line in lines[1:]]
    assert len(losses) == 3 and losses[-1] < losses[0], lines


def _check_layout(*args: str) -> subprocess.CompletedProcess:
    return run_tool_in_workers("tools/check_layout.py", *args, timeout=120)  # the harness's warm ranks


def test_check_layout_cli(tmp_path):
    hf_config("llama").save_pretrained(tmp_path / "llama")  # 4 heads, 2 KV heads, 4 layers
    ok = run_tool(  # a process of its own
        "tools/check_layout.py", "--model", str(tmp_path / "llama"), "--tp", "2", "--pp", "2", "--world-size", "8"
    )
    assert ok.returncode == 0, ok.stderr
    assert "TP=2 PP=2 DP=2" in ok.stdout and "vocab 250 padded to 256" in ok.stdout

    bad_kv = _check_layout("--model", str(tmp_path / "llama"), "--tp", "4", "--world-size", "4")
    assert bad_kv.returncode == 2 and "TP=4 does not divide the 2 key/value heads" in bad_kv.stderr

    bad_world = _check_layout("--model", str(tmp_path / "llama"), "--tp", "2", "--pp", "2", "--world-size", "6")
    assert bad_world.returncode == 2 and "world size 6 is not divisible by TP x PP" in bad_world.stderr

    cfg = json.loads((tmp_path / "llama" / "config.json").read_text()) | {"model_type": "bloom"}
    (tmp_path / "bloom").mkdir()
    (tmp_path / "bloom" / "config.json").write_text(json.dumps(cfg))
    bad_arch = _check_layout("--model", str(tmp_path / "bloom"), "--world-size", "1")
    assert bad_arch.returncode == 2 and "'bloom' is not supported" in bad_arch.stderr
