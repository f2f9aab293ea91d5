"""Counter-based randomness: the noise of token v at step t of a sample is a pure function of
(sample seed, t, v).

No RNG state is consumed, so a sample's tokens do not depend on the TP split of the vocabulary, the
pipeline, the data-parallel rank, the batch size or which other samples share the batch. The hash
is Chris Wellons' "lowbias32" integer mixer, evaluated on int64 tensors holding 32-bit values.
"""

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """lowbias32 on the low 32 bits of int64 ``x``; products wrap mod 2^64 and are masked back."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _hash(seeds: Tensor, step: int, token_ids: Tensor, stream: int) -> Tensor:
    """32-bit hash [b, n] of (seeds [b], step, token ids [n], stream)."""
    s = _mix32(_mix32(seeds >> 32) ^ seeds)
    s = _mix32(s ^ (stream * 0x9E3779B9 + step))
    return _mix32(s[:, None] ^ _mix32(token_ids)[None, :])


def uniform(seeds: Tensor, step: int, token_ids: Tensor) -> Tensor:
    """Uniform (0, 1) float64 [b, n] with 53 random bits, never exactly 0 or 1."""
    hi = _hash(seeds, step, token_ids, 1) >> 6  # 26 bits
    lo = _hash(seeds, step, token_ids, 2) >> 5  # 27 bits
    return ((hi * (1 << 27) + lo).double() + 0.5) / float(1 << 53)


def gumbel(seeds: Tensor, step: int, token_ids: Tensor) -> Tensor:
    """Standard Gumbel noise [b, n]: argmax(log p + noise) is a sample from p (the Gumbel-max trick)."""
    return -torch.log(-torch.log(uniform(seeds, step, token_ids)))


def sample_seeds(seed: int, sample_ids: Tensor) -> Tensor:
    """Per-sample seeds from a run seed and global sample ids (e.g. the prompt's index in the dataset)."""
    ids = sample_ids.to(torch.int64)
    return _mix32(_mix32(torch.full_like(ids, seed)) ^ ids) | (_mix32(ids ^ (seed * 0x9E3779B9)) << 32)
