"""torchrun, with exit status 0 after a SIGTERM that every worker answered by saving and exiting 0.

    python -m megatron_minillm.launch --nproc-per-node 8 -m megatron_minillm.train --config minillm.yaml

Takes torchrun's arguments and runs its agent. Plain torchrun turns a SIGTERM into an exception in
its agent: it signals the workers, waits for them and exits 1 whatever they did, so a preempted run
that saved correctly looks failed to the scheduler (and its requeue logic). Here the agent is left
out of SIGTERM (its ``--signals-to-handle`` without it): this process forwards the signal to the
workers, and the agent sees them end as at the end of a run: status 0 when every worker exited 0
(the trainer saves at the end of the iteration, then exits 0), 1 otherwise. SIGINT, SIGHUP and
SIGQUIT keep torchrun's behaviour, as does a SIGTERM that comes before any worker started.
"""

import signal
import sys
from types import FrameType

import psutil
from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError


def _forward_sigterm(signum: int, frame: FrameType | None) -> None:
    """Pass SIGTERM on to the workers (this process's children); with none yet, stop as torchrun does."""
    workers = psutil.Process().children()
    if not workers:
        raise SignalException("SIGTERM before any worker started", sigval=signal.SIGTERM)
    for worker in workers:
        try:
            worker.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass  # it ended meanwhile: the agent collects its status


def main(argv: list[str] | None = None) -> int:
    args = torchrun.parse_args(argv)
    args.signals_to_handle = ",".join(s for s in args.signals_to_handle.split(",") if s.strip() != "SIGTERM")
    signal.signal(signal.SIGTERM, _forward_sigterm)
    try:
        torchrun.run(args)
    except ChildFailedError as err:  # the workers printed their own errors; this is torchrun's summary
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
