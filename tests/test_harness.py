"""The test harness itself: pooled ranks are reused, start each task as a fresh process would, and a
failing, dying or hanging rank is reported (and its workers replaced) instead of hanging the suite."""

import os
import platform
import random
import sys
import time
import warnings

import pytest
import torch
from harness import run_distributed, run_tool_in_workers


def _leave_a_mess(path: str) -> int:
    import torch

    from megatron_minillm.parallel import init_distributed

    init_distributed(tp=2)  # process groups, megatron's groups and RNG tracker; not torn down here
    os.environ["LEFT_BEHIND"] = "1"
    os.chdir(path)
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(3)
    torch.set_grad_enabled(False)
    torch.manual_seed(7)
    random.seed(7)
    warnings.simplefilter("error")
    sys.argv.append("--left-behind")
    sys.path.insert(0, path)
    return os.getpid()


def _fresh_state() -> dict:
    import numpy as np
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as tp_random

    return {
        "pid": os.getpid(),
        "rank": int(os.environ["RANK"]),
        "left_behind": "LEFT_BEHIND" in os.environ,
        "cwd": os.getcwd(),
        "argv_and_path": (sys.argv, sys.path),
        "torch": (torch.get_default_dtype(), torch.get_num_threads(), torch.is_grad_enabled()),
        "rng": (torch.rand(2).tolist(), random.random(), float(np.random.rand())),
        "warnings_are_errors": any(f[0] == "error" for f in warnings.filters),
        "distributed": torch.distributed.is_initialized(),
        "megatron": (parallel_state.model_parallel_is_initialized(), tp_random._CUDA_RNG_STATE_TRACKER),
    }


def test_ranks_are_reused_and_start_fresh(tmp_path):
    before = run_distributed(_fresh_state, 2)
    pids = run_distributed(_leave_a_mess, 2, str(tmp_path))
    after = run_distributed(_fresh_state, 2)
    assert pids == [s["pid"] for s in before] == [s["pid"] for s in after]  # the same processes
    assert after == before  # everything the task changed was put back
    assert [s["rank"] for s in after] == [0, 1] and after[0]["cwd"] == os.getcwd()
    assert after[0]["torch"] == (torch.float32, torch.get_num_threads(), True) and not after[0]["distributed"]
    assert after[0]["megatron"] == (False, None) and not after[0]["left_behind"]


def _compiler(cxx: tuple | None) -> tuple:
    import torch._inductor.config

    before = torch._inductor.config.cpp.cxx
    if cxx:
        torch._inductor.config.cpp.cxx = cxx
    return os.getpid(), before


def test_a_task_that_changes_the_compiler_configuration_retires_its_worker():
    pid, default = run_distributed(_compiler, 1, None)[0]
    assert run_distributed(_compiler, 1, (None, "/nonexistent/c++"))[0] == (pid, default)
    new_pid, cxx = run_distributed(_compiler, 1, None)[0]
    assert new_pid != pid and cxx == default


def _fail_on(rank: int, how: str) -> int:
    if int(os.environ["RANK"]) == rank:
        if how == "raise":
            raise ValueError("boom on purpose")
        if how == "exit":
            os._exit(3)
        time.sleep(3600)
    return os.getpid()


def test_failures_are_reported_and_their_workers_replaced():
    first = run_distributed(_fail_on, 2, -1, "")
    with pytest.raises(RuntimeError, match=r"rank 0:\n(.|\n)*ValueError: boom on purpose"):
        run_distributed(_fail_on, 1, 0, "raise")
    with pytest.raises(RuntimeError, match=r"rank 0:\nthe worker process died \(exit code 3\)"):
        run_distributed(_fail_on, 1, 0, "exit")
    warm = run_distributed(_fail_on, 2, -1, "")
    assert warm[0] != first[0] and warm[1] == first[1]  # only the failed calls' worker was replaced
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[1\] did not finish within 5 s"):
        run_distributed(_fail_on, 2, 1, "sleep", timeout=5)
    assert time.monotonic() - start < 60
    assert not set(warm) & set(run_distributed(_fail_on, 2, -1, ""))


TOOL = """
import sys
print("args", sys.argv[1:])
print("to stderr", file=sys.stderr)
if sys.argv[1] == "raise":
    raise ValueError("uncaught")
sys.exit(None if sys.argv[1] == "none" else sys.argv[1] if sys.argv[1] == "message" else int(sys.argv[1]))
"""


def test_a_tool_in_the_workers_exits_as_a_process_would(tmp_path):
    tool = tmp_path / "tool.py"
    tool.write_text(TOOL)
    done = run_tool_in_workers(str(tool), "2", "--flag")
    assert (done.returncode, done.stdout, done.stderr) == (2, "args ['2', '--flag']\n", "to stderr\n")
    assert run_tool_in_workers(str(tool), "none").returncode == 0
    message = run_tool_in_workers(str(tool), "message")
    assert message.returncode == 1 and message.stderr.endswith("to stderr\nmessage\n")
    raised = run_tool_in_workers(str(tool), "raise")
    assert raised.returncode == 1 and raised.stderr.rstrip().endswith("ValueError: uncaught")
    module = run_tool_in_workers("-m", "platform", "terse")  # python -m platform terse
    assert (module.returncode, module.stdout) == (0, platform.platform(terse=True) + "\n")
    both = run_tool_in_workers(str(tool), "0", nproc=2)
    assert (both.returncode, both.stdout) == (0, "args ['0']\n" * 2)
    with pytest.raises(RuntimeError, match="ValueError: uncaught"):  # other ranks may wait for this one
        run_tool_in_workers(str(tool), "raise", nproc=2)
