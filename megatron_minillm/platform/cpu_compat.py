"""CPU COMPATIBILITY LAYER for megatron-core 0.16 -- the only place where torch/megatron are patched.

megatron-core assumes CUDA: it allocates with ``device="cuda"`` or ``torch.cuda.current_device()``,
keeps its RNG tracker in the CUDA generator and checks ``tensor.type()`` strings for
``torch.cuda.*``. To run the very same model, schedule, optimizer and checkpoint code on CPU with
gloo, :func:`apply` installs the patches below. It is called by ``platform.setup_platform`` only when
no GPU is used, is idempotent, and may be called again after importing more megatron modules.

Design choice for device remapping: instead of a ``TorchFunctionMode`` (which would add Python
overhead to every torch call in the process, including ours), the module-global ``torch`` of each
loaded ``megatron.core.*`` module is replaced by a proxy whose tensor factories map CUDA devices to
CPU. Our own code and torch itself run unpatched and at full speed.
"""

import functools
import importlib
import logging
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

_CPU = torch.device("cpu")

# Tensor factories that megatron-core calls with a CUDA device.
_FACTORIES = (
    "arange",
    "as_tensor",
    "empty",
    "empty_like",
    "empty_strided",
    "eye",
    "full",
    "full_like",
    "linspace",
    "ones",
    "ones_like",
    "rand",
    "randint",
    "randn",
    "randperm",
    "tensor",
    "zeros",
    "zeros_like",
)

_applied = False


def _to_cpu_device(dev: Any) -> Any:
    if isinstance(dev, int) or (isinstance(dev, str) and dev.startswith("cuda")):
        return _CPU
    if isinstance(dev, torch.device) and dev.type == "cuda":
        return _CPU
    return dev


def _cpu_factory(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)  # pinning needs a CUDA context
        return fn(*args, **kwargs)

    return wrapper


def _fused_by_default(cls: type) -> type:
    """``cls`` (torch's Adam/AdamW) with ``fused=True`` unless told otherwise: on CPU torch picks the
    single-tensor loop (its foreach kernels are CUDA-only), about ten passes over the parameters and
    moments per step; the fused CPU kernel makes one (4.6x faster on 81 M parameters here)."""

    def __init__(self, params: Any, *args: Any, fused: Any = None, **kwargs: Any) -> None:
        cls.__init__(self, params, *args, fused=True if fused is None else fused, **kwargs)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": __name__})


class _CpuOptim(types.ModuleType):
    """Stands in for ``torch.optim`` inside megatron-core: Adam and AdamW are fused by default
    (megatron builds ``torch.optim.AdamW`` when neither transformer-engine nor apex is installed)."""

    def __init__(self) -> None:
        super().__init__("torch.optim")
        self.Adam, self.AdamW = _fused_by_default(torch.optim.Adam), _fused_by_default(torch.optim.AdamW)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.optim, name)


class _CpuTorch(types.ModuleType):
    """Stands in for ``torch`` inside megatron-core modules: factories allocate on CPU, Adam is fused."""

    def __init__(self) -> None:
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))
        self.optim = _CpuOptim()

    def __getattr__(self, name: str) -> Any:
        value = getattr(torch, name)
        setattr(self, name, value)  # cache: later lookups are plain attribute reads
        return value


_CPU_TORCH = _CpuTorch()


def _cpu_rng_state(*_args: Any, **_kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, *_args: Any, **_kwargs: Any) -> None:
    torch.set_rng_state(new_state)


def _noop() -> Callable[..., None]:
    """A fresh no-op per patched name: torch.compile refuses one function bound to several."""

    def noop(*_args: Any, **_kwargs: Any) -> None:
        return None

    return noop


@contextmanager
def _cuda_type_strings() -> Iterator[None]:
    """Make ``Tensor.type()`` report ``torch.cuda.*`` for CPU tensors (megatron's dtype checks)."""
    original = torch.Tensor.type
    if getattr(original, "_minillm_cpu_patched", False):  # already inside a patched call
        yield
        return

    def cuda_type(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kw: Any) -> Any:
        if dtype is None and not kw and self.device.type == "cpu":
            # Under a TorchFunctionMode, ``original(self)`` reaches the mode as ``Tensor.type``, which
            # is this function again: the string may already be a CUDA one.
            name = original(self)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kw)

    cuda_type._minillm_cpu_patched = True  # type: ignore[attr-defined]
    torch.Tensor.type = cuda_type
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_strings(fn: Callable) -> Callable:
    if getattr(fn, "_minillm_cpu_patched", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _cuda_type_strings():
            return fn(*args, **kwargs)

    wrapper._minillm_cpu_patched = True  # type: ignore[attr-defined]
    return wrapper


def _patch_torch_once() -> None:
    cuda = torch.cuda
    # megatron passes current_device() as `device=`: answering a CPU device keeps allocations local.
    cuda.current_device = lambda: _CPU
    # Device binding and syncing have nothing to do on CPU.
    cuda.set_device = _noop()
    cuda.synchronize = _noop()
    # The CPU generator plays the role of the CUDA generator (megatron's RNG tracker forks it).
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    # torch.manual_seed already seeds the CPU generator and calls this: no-op avoids recursion.
    cuda.manual_seed_all = _noop()
    cuda.get_rng_state = cuda.random.get_rng_state = _cpu_rng_state
    cuda.set_rng_state = cuda.random.set_rng_state = _set_cpu_rng_state
    # The tracker warns when the CPU stream moves inside a fork; on CPU that stream *is* the fork.
    logging.getLogger("megatron.core.tensor_parallel.random").addFilter(
        lambda record: "CPU RNG state changed within GPU RNG context" not in record.getMessage()
    )
    # `.cuda()` moves nothing when the compute device is the CPU.
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self


def _patch_megatron_modules() -> None:
    """Patch megatron modules loaded so far (names rebound by import are reached only once loaded)."""
    for name, module in list(sys.modules.items()):
        if not name.startswith("megatron.core") or module is None:
            continue
        namespace = vars(module)
        # Factories with device="cuda" allocate on CPU inside megatron-core only.
        if namespace.get("torch") is torch:
            namespace["torch"] = _CPU_TORCH
        # The RNG tracker swaps "CUDA" RNG states: route them to the CPU generator.
        if "_get_cuda_rng_state" in namespace:
            namespace["_get_cuda_rng_state"] = _cpu_rng_state
        if "_set_cuda_rng_state" in namespace:
            namespace["_set_cuda_rng_state"] = _set_cpu_rng_state
        # Inference p2p asserts `tensor.is_cuda`; on CPU only the not-None part is meaningful.
        if name == "megatron.core.inference.communication_utils":
            namespace["_is_cuda"] = lambda tensor: tensor is not None
        # Gradient clipping asserts grads are 'torch.cuda.FloatTensor' (also imported by name).
        if "clip_grad_by_total_norm_fp32" in namespace:
            namespace["clip_grad_by_total_norm_fp32"] = _with_cuda_type_strings(
                namespace["clip_grad_by_total_norm_fp32"]
            )
        # The mixed-precision optimizers classify params by their 'torch.cuda.*' type string.
        for cls_name in ("DistributedOptimizer", "Float16OptimizerWithFloat16Params"):
            cls = namespace.get(cls_name)
            if isinstance(cls, type) and cls.__module__ == name:
                cls.__init__ = _with_cuda_type_strings(cls.__init__)


# Every megatron-core module this project uses, imported before patching so that names bound by
# `from x import y` are rebound too.
_MEGATRON_MODULES = (
    "megatron.core.dist_checkpointing",
    "megatron.core.distributed",
    "megatron.core.inference.communication_utils",
    "megatron.core.inference.contexts",
    "megatron.core.models.gpt",
    "megatron.core.optimizer",
    "megatron.core.pipeline_parallel",
    "megatron.core.tensor_parallel",
)


def apply() -> None:
    """Install the CPU patches (idempotent; call again after importing more megatron modules)."""
    global _applied
    for module in _MEGATRON_MODULES:
        importlib.import_module(module)
    if not _applied:
        _patch_torch_once()
        _applied = True
    _patch_megatron_modules()
