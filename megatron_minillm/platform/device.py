"""Pick the device and the collective backend: CUDA + NCCL when a GPU exists, else CPU + gloo.

Everything above this layer asks these functions instead of calling ``torch.cuda`` itself, so the
same code path runs on a GPU cluster and on a CPU-only machine.
"""

import os
import warnings

import torch


def is_cuda() -> bool:
    """True when this process will run on a GPU (``MINILLM_FORCE_CPU=1`` forces CPU for debugging)."""
    return torch.cuda.is_available() and os.environ.get("MINILLM_FORCE_CPU", "0") != "1"


def backend() -> str:
    """The torch.distributed backend matching :func:`is_cuda`."""
    return "nccl" if is_cuda() else "gloo"


def device() -> torch.device:
    """The device this rank computes on (``cuda:LOCAL_RANK`` or ``cpu``)."""
    if is_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def setup_platform(local_rank: int = 0) -> torch.device:
    """Bind this process to its device; on CPU, apply the megatron-core compatibility patches.

    Call it after importing the megatron-core modules the program uses (see ``cpu_compat``).
    """
    # megatron-core 0.16.1 calls torch.distributed APIs that torch 2.13 deprecated (reduce_scatter_tensor,
    # ShardedTensor, ...): a FutureWarning per call and rank, on GPU and CPU alike, none about our code.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(torch\.distributed|megatron\.core)\.")
    # megatron's zero_grad reads `.grad` of the distributed optimizer's shard views (non-leaf by design).
    warnings.filterwarnings(
        "ignore", message="The .grad attribute of a Tensor that is not a leaf", module=r"megatron\.core\."
    )
    if is_cuda():
        torch.cuda.set_device(local_rank)
    else:
        from megatron_minillm.platform import cpu_compat

        cpu_compat.apply()
    return device()
