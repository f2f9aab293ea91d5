"""Multi-process test harness: run a function on N gloo ranks, propagate tracebacks, never hang.

Starting a process group and importing megatron-core costs seconds per rank on 2 cores, so a test
should group several checks into one ``run_distributed`` call.
"""

import os
import queue
import socket
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_tool(*args: str, nproc: int = 0) -> subprocess.CompletedProcess:
    """A tool from the repo root in one plain process (nproc 0: the exit status is the tool's own)
    or under torchrun with ``nproc`` ranks; either way on a free port, never the shared default."""
    port = str(free_port())
    launcher = [sys.executable]
    if nproc:
        launcher += ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={port}"]
    return subprocess.run(
        [*launcher, *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": port},
    )


def _worker(fn: Callable, rank: int, env: dict[str, str], results: Any, args: tuple, kwargs: dict) -> None:
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    try:
        value = fn(*args, **kwargs)
        results.put((rank, "ok", value))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        from megatron_minillm.parallel import destroy_distributed

        destroy_distributed()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 600, **kwargs: Any) -> list:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` spawned ranks; return the per-rank results.

    ``fn`` must be importable (a module-level function). Raises with the failing ranks' tracebacks,
    or with a timeout message if any rank does not finish in ``timeout`` seconds.
    """
    __tracebackhide__ = True  # pytest: show the ranks' tracebacks, not this function
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    tmp = os.environ.get("TMPDIR") or tempfile.gettempdir()
    env = {
        "WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "TMPDIR": tmp,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    # Not daemonic: megatron's checkpoint writer starts child processes of its own.
    procs = [ctx.Process(target=_worker, args=(fn, r, env, results, args, kwargs)) for r in range(world_size)]
    for p in procs:
        p.start()
    outcome: dict[int, tuple[str, Any]] = {}
    try:
        while len(outcome) < world_size:
            rank, status, value = results.get(timeout=timeout)
            outcome[rank] = (status, value)
            if status == "error":
                break  # the other ranks are likely blocked in a collective: stop them
    except queue.Empty:
        pass  # a rank never answered: reported as a timeout below
    finally:
        # Ranks that answered get time to exit cleanly: a rank killed while exiting leaves its
        # children behind (megatron's checkpoint writer starts a multiprocessing Manager process).
        for p in procs:
            p.join(timeout=60 if len(outcome) == world_size else 0.1)
            if p.is_alive():
                p.kill()
    errors = [f"rank {r}:\n{v}" for r, (s, v) in sorted(outcome.items()) if s == "error"]
    if errors:
        raise RuntimeError("distributed test failed\n" + "\n".join(errors))
    if len(outcome) < world_size:
        missing = sorted(set(range(world_size)) - set(outcome))
        raise TimeoutError(f"ranks {missing} did not finish within {timeout} s")
    return [outcome[r][1] for r in range(world_size)]
