"""Multi-process test harness: run a function on N gloo ranks, propagate tracebacks, never hang.

Importing torch and megatron-core costs seconds per process on 2 cores, so the ranks are a pool of
worker processes kept for the whole pytest session rather than new processes per call:

* Worker ``r`` plays rank ``r``. The pool starts when first needed and grows to the largest world
  size asked for. Workers are forked from a ``multiprocessing`` fork server that has imported torch,
  megatron-core and transformers: that import is paid once per test session, not once per rank.
* Each ``run_distributed`` call is a new world: a fresh MASTER_PORT, the caller's environment,
  working directory and ``sys.path``; ``fn`` creates the process group itself (``init_distributed``)
  and the worker tears it down after the task (``destroy_distributed``).
* Between tasks a worker puts back what a task may leave behind, so that each call runs as in a
  fresh process: ``os.environ``, the working directory, ``sys.argv``, torch's default dtype,
  thread count, grad mode and RNG state (Python's and NumPy's too), the warning filters, and
  megatron's module-level state (``parallel_state``'s groups, rank lists and global memory buffer,
  the RNG tracker, the num-microbatches calculator) as it was after import. Caches are kept:
  imported modules, compiled kernels, the checkpoint writer's queue.
* A task that changes torch's compiler configuration (which cannot simply be put back: compiled
  code depends on it) retires its worker after replying.
* A call that fails or times out kills the workers it used (they may be blocked in a collective);
  the next call starts fresh ones. Each worker leads its own process group, so a kill reaches its
  children too (megatron's checkpoint writer starts a ``multiprocessing`` Manager process).
* At exit the workers are told to stop (a clean exit stops their Manager) and killed if they don't;
  then the fork server is stopped.

A test should still group several checks into one call: each call forms a new process group, and
a worker's first task runs the imports of its own. ``run_tool_in_workers`` runs a command-line tool
in the warm workers, for tests where starting the tool's own processes is not the point.
"""

import atexit
import contextlib
import ctypes
import gc
import importlib
import io
import os
import pickle
import random
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from multiprocessing import forkserver
from multiprocessing.connection import wait
from multiprocessing.reduction import ForkingPickler
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


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 600, **kwargs: Any) -> list:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks; return the per-rank results.

    ``fn`` must be importable (a module-level function). Raises with the failing ranks' tracebacks,
    or with a timeout message naming the ranks that did not finish in ``timeout`` seconds.
    """
    __tracebackhide__ = True  # pytest: show the ranks' tracebacks, not this function
    env = dict(os.environ)
    env.update(
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        TMPDIR=os.environ.get("TMPDIR") or tempfile.gettempdir(),
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
    )
    # Pickled once per rank (torch shares a tensor argument's memory with one reader per pickle),
    # and before anything is sent: an argument that cannot be pickled fails here, not in a rank.
    payloads = [bytes(ForkingPickler.dumps((fn, args, kwargs))) for _ in range(world_size)]
    outcome: dict[int, tuple[str, Any]] = {}
    try:
        workers = _workers(world_size)
        for rank, (worker, payload) in enumerate(zip(workers, payloads)):
            worker.conn.send(({**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, os.getcwd(), sys.path, payload))
        waiting = {obj: rank for rank, w in enumerate(workers) for obj in (w.conn, w.process.sentinel)}
        deadline = time.monotonic() + timeout
        while len(outcome) < world_size and all(status != "error" for status, _ in outcome.values()):
            ready = wait(list(waiting), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break  # a timeout: reported below
            for rank in sorted({waiting[obj] for obj in ready}):
                outcome[rank] = workers[rank].reply()  # an error stops the wait: others may be stuck
                waiting = {obj: r for obj, r in waiting.items() if r != rank}
    finally:
        if len(outcome) < world_size or any(status == "error" for status, _ in outcome.values()):
            _discard(range(world_size))
        for rank in [r for r, (status, _) in outcome.items() if status == "retired"]:
            _pool[rank].stop()
            _pool[rank] = None
    errors = [f"rank {r}:\n{v}" for r, (s, v) in sorted(outcome.items()) if s == "error"]
    if errors:
        raise RuntimeError("distributed test failed\n" + "\n".join(errors))
    if len(outcome) < world_size:
        missing = sorted(set(range(world_size)) - set(outcome))
        raise TimeoutError(f"ranks {missing} did not finish within {timeout} s")
    return [outcome[r][1] for r in range(world_size)]


def run_tool_in_workers(*args: str, nproc: int = 1, timeout: float = 600) -> subprocess.CompletedProcess:
    """``run_tool`` in ``nproc`` warm ranks instead of new processes: ``args`` as for ``run_tool`` (a
    script's path from the repo root, or ``-m module``, then its arguments) and the script or module
    runs as ``__main__``, as ``python`` or torchrun would run it.

    Returns the exit status (the first non-zero rank's) and what the ranks' Python code wrote to
    stdout and stderr, in rank order. An exception the script does not catch becomes status 1 and
    its traceback, as in a process of its own; with several ranks it fails the call instead (the
    other ranks may be waiting in a collective).
    """
    __tracebackhide__ = True
    results = run_distributed(_run_script, nproc, args, timeout=timeout)
    status = next((status for status, _, _ in results if status), 0)
    return subprocess.CompletedProcess(list(args), status, *("".join(r[i] for r in results) for i in (1, 2)))


@atexit.register
def shutdown() -> None:
    """Stop every worker and the fork server (done at exit; harmless earlier: the next call starts
    new ones)."""
    for worker in _pool:
        if worker is not None:
            worker.stop()
    _pool.clear()
    forkserver._forkserver._stop()  # else it outlives the test process by seconds


# --- the pool, in the test process ------------------------------------------------------------


class _Worker:
    def __init__(self, rank: int) -> None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["megatron_minillm.parallel", "transformers"])  # imported once, forked
        self.conn, child = ctx.Pipe()
        # Not daemonic: megatron's checkpoint writer starts child processes of its own.
        self.process = ctx.Process(target=_serve, args=(child, dict(os.environ)), name=f"harness-rank-{rank}")
        self.process.start()
        child.close()

    def reply(self) -> tuple[str, Any]:
        """The task's outcome, once its connection or its process sentinel is ready."""
        if self.conn.poll():
            with contextlib.suppress(EOFError, OSError):
                return self.conn.recv()
        self.process.join(1)
        return "error", f"the worker process died (exit code {self.process.exitcode})"

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.kill()  # in case it had not made its process group yet
        self.process.join()
        self.conn.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.process.join(30)
        self.kill()


_pool: list[_Worker | None] = []


def _workers(n: int) -> list[_Worker]:
    _pool.extend([None] * (n - len(_pool)))
    for rank in range(n):
        if _pool[rank] is not None and not _pool[rank].process.is_alive():
            _discard([rank])  # died while idle
        if _pool[rank] is None:
            _pool[rank] = _Worker(rank)
    return _pool[:n]


def _discard(ranks: Iterable[int]) -> None:
    for rank in ranks:
        if _pool[rank] is not None:
            _pool[rank].kill()
            _pool[rank] = None


# --- inside a worker ---------------------------------------------------------------------------

_MEGATRON_STATE = (
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel.random",
    "megatron.core.num_microbatches_calculator",
)


class _FreshState:
    """How a worker process looks after its imports; ``start_task`` and ``restore`` go back to it."""

    def __init__(self, parent_env: dict[str, str]) -> None:
        import numpy as np
        import torch

        # Variables that the imports set (e.g. TORCHINDUCTOR_CACHE_DIR), unless a task sets them.
        self.env_defaults = {k: v for k, v in os.environ.items() if parent_env.get(k) != v}
        self.argv = list(sys.argv)
        self.torch = torch.get_default_dtype(), torch.get_num_threads(), torch.is_grad_enabled()
        self.compiler = _compiler_config()
        self.rng = torch.get_rng_state(), random.getstate(), np.random.get_state()
        # Megatron's globals that are None or plain values after import: the groups and rank lists
        # (destroy_model_parallel misses a few), the RNG tracker, the num-microbatches calculator.
        self.megatron = {
            name: {k: v for k, v in vars(module).items() if v is None or isinstance(v, (bool, int, float, str))}
            for name in _MEGATRON_STATE
            for module in [importlib.import_module(name)]
        }

    def start_task(self, env: dict[str, str], cwd: str, path: list[str]) -> None:
        os.environ.clear()
        os.environ.update(self.env_defaults | env)
        os.chdir(cwd)
        sys.path[:] = path
        sys.argv[:] = self.argv

    def restore(self) -> None:
        import numpy as np
        import torch

        from megatron_minillm.parallel import destroy_distributed

        destroy_distributed()
        for name, values in self.megatron.items():
            vars(sys.modules[name]).update(values)
        torch.set_default_dtype(self.torch[0])
        torch.set_num_threads(self.torch[1])
        torch.set_grad_enabled(self.torch[2])
        torch.set_rng_state(self.rng[0])
        random.setstate(self.rng[1])
        np.random.set_state(self.rng[2])
        gc.collect()
        gc.freeze()  # what is left is long-lived (modules, caches): later collections skip it
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give a finished task's memory back


def _serve(conn: Any, parent_env: dict[str, str]) -> None:
    """A worker's life: run tasks until told to stop."""
    os.setpgid(0, 0)  # its own process group: killing the group reaches its children too
    importlib.import_module("megatron_minillm.parallel")  # already there if the fork server preloaded it
    fresh = _FreshState(parent_env)
    gc.freeze()
    while True:
        try:
            task = conn.recv()
        except EOFError:  # the test process is gone
            return
        if task is None:
            return
        env, cwd, path, payload = task
        fresh.start_task(env, cwd, path)
        try:
            with warnings.catch_warnings():  # puts the filters back
                fn, args, kwargs = pickle.loads(payload)
                value = fn(*args, **kwargs)
        except BaseException:  # every failure must reach the parent, which then discards this worker
            conn.send(("error", traceback.format_exc()))
            continue
        try:
            fresh.restore()
            retire = _compiler_config() != fresh.compiler
            conn.send(("retired" if retire else "ok", value))
        except BaseException:
            conn.send(("error", "after the task:\n" + traceback.format_exc()))
            continue
        if retire:
            return
        del fn, args, kwargs, value


def _compiler_config() -> list[dict[str, Any]]:
    import torch._dynamo.config
    import torch._functorch.config
    import torch._inductor.config
    import torch.compiler.config

    configs = torch._dynamo.config, torch._functorch.config, torch._inductor.config, torch.compiler.config
    return [config.get_config_copy() for config in configs]


def _run_script(args: tuple[str, ...]) -> tuple[int, str, str]:
    """A task: ``python *args`` (a script, or ``-m module``) as ``__main__``; exit status, stdout, stderr."""
    import torch

    torch.set_num_threads(1)  # as run_tool and torchrun set OMP_NUM_THREADS=1
    os.chdir(ROOT)
    module = args[1] if args[0] == "-m" else None
    script = str(ROOT / args[0])
    sys.argv[:] = [*args[1:]] if module else [script, *args[1:]]  # run_module puts the module's path first
    sys.path.insert(0, str(ROOT) if module else os.path.dirname(script))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if module:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(script, run_name="__main__")
            status = 0
        except SystemExit as done:
            status = done.code or 0
            if not isinstance(status, int):  # sys.exit("message")
                print(status, file=sys.stderr)
                status = 1
        except Exception:
            if int(os.environ["WORLD_SIZE"]) > 1:
                raise
            traceback.print_exc()
            status = 1
    return status, out.getvalue(), err.getvalue()
