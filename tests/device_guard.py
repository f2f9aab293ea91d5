"""DEVICE-PLACEMENT GUARD: the CUDA code path's placement rule, checked on a CPU-only machine.

On a GPU node the model lives on ``cuda:N`` while torch's default device stays the CPU, so a tensor
that our package creates without naming a device lands on the wrong device and breaks the first op
(or NCCL collective) it meets. On a CPU-only machine the two coincide and such a bug is invisible.
:class:`DeviceGuard` separates them again: while it is active, every tensor factory called *from
megatron_minillm* without a ``device`` creates its tensor on ``meta`` (a device with shapes but no
data). The model and everything placed deliberately stay on the CPU, so a misplaced tensor fails
loudly at its first contact with real data: ``Tensor on device meta is not on the expected device
cpu``, or ``Cannot copy out of meta tensor`` when it is read; and :meth:`check_collective` rejects it
at a torch.distributed collective, where gloo would accept it silently (NCCL would not).

Why not ``FakeTensorMode`` with ``device="cuda"``: fake tensors carry no data, so a real training
iteration cannot run under it (the sampler stops on drawn ids, the trainer reads losses and
lengths); the guard runs the real computation and moves only the accidents off the CPU.

Host-side tensors (RNG states, token-id bookkeeping, metrics) are created with ``device="cpu"``
on purpose; ``tests/test_device_placement.py`` also checks that each such line says why (``# host``).
"""

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors
from torch.utils._pytree import tree_leaves

PACKAGE = "megatron_minillm"
STRAY = "_device_guard_stray"  # marks a tensor created on meta for want of a device, and its results
# torch.distributed calls that move a tensor between ranks; each takes its tensor(s) first.
# isend/irecv stay as they are (P2POp checks their identity); batch_isend_irecv's ops are checked.
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "broadcast",
    "send",
    "recv",
    "all_to_all_single",
    "batch_isend_irecv",
)


def _called_from_package() -> bool:
    # Frame 1: __torch_function__; 2: its caller (torch's factories are C functions, no frame). The
    # platform layer is megatron's: cpu_compat's factory wrappers call torch on megatron's behalf.
    name = sys._getframe(2).f_globals.get("__name__", "")
    return name.startswith(PACKAGE) and not name.startswith(f"{PACKAGE}.platform")


class DeviceGuard(TorchFunctionMode):
    """Route device-less tensor factories called from the package to ``meta``; see the module doc.

    torch lets some ops take a ``meta`` operand beside CPU ones (an index, a copy's source) where CUDA
    would refuse a CPU one, so the guard marks each stray tensor and what is computed from it, and
    refuses any op that meets a stray with a tensor on the model's device.
    """

    def __init__(self, expected: torch.device) -> None:
        super().__init__()
        self.expected = expected
        self.factory_calls = 0  # the package's tensor factories seen: proof that the guard was live
        self.collectives = 0

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        stray = False
        if func in _device_constructors() and _called_from_package():
            self.factory_calls += 1
            stray = kwargs.get("device") is None
            if stray:
                kwargs["device"] = "meta"
        else:
            tensors = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
            stray = any(getattr(x, STRAY, False) for x in tensors)
            if stray and any(x.device == self.expected for x in tensors):
                raise RuntimeError(
                    f"{getattr(func, '__name__', func)} meets a tensor created without a device (on the default "
                    f"device) with tensors on the model's device {self.expected}: pass device= where it is created"
                )
        out = func(*args, **kwargs)
        if stray:
            for x in tree_leaves(out):
                if isinstance(x, torch.Tensor) and x.is_meta:
                    setattr(x, STRAY, True)
        return out

    def check_collective(self, name: str, tensors: Any) -> None:
        self.collectives += 1
        for t in tensors if isinstance(tensors, list | tuple) else [tensors]:
            t = t.tensor if isinstance(t, dist.P2POp) else t
            if isinstance(t, torch.Tensor) and t.device != self.expected:
                raise RuntimeError(
                    f"torch.distributed.{name} got a tensor on {t.device}, the model is on {self.expected}"
                )


@contextmanager
def device_guard(expected: torch.device) -> Iterator[DeviceGuard]:
    """Activate :class:`DeviceGuard` and the collective check for the duration of the block."""
    guard = DeviceGuard(expected)
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def checked(name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(tensor: Any, *args: Any, **kwargs: Any) -> Any:
            guard.check_collective(name, tensor)
            return fn(tensor, *args, **kwargs)

        return wrapper

    for name, fn in originals.items():
        setattr(dist, name, checked(name, fn))
    try:
        with guard:
            yield guard
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
