"""Device and backend selection, and the CPU compatibility layer for megatron-core."""

from megatron_minillm.platform.device import backend, device, is_cuda, setup_platform

__all__ = ["backend", "device", "is_cuda", "setup_platform"]
