"""Sampling parameters: one dataclass, validated once (the fields of HF's GenerationConfig we use)."""

import math
from dataclasses import dataclass

# The drafts per teacher forward of the trainer's and tools/generate.py's speculative sampling, from
# benchmarks/bench_sampler.py (SamplingParams itself defaults to 0, the token-by-token sampler).
DEFAULT_SPECULATIVE_K = 2


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn. Defaults are the MiniLLM rollout settings (temperature 1, no top-k/top-p).

    The warpers (temperature, top-k, top-p) and the bans (no-repeat n-gram, min new tokens) apply to
    the student and the teacher alike; with ``mix_alpha`` > 0 the token is drawn from
    ``mix_alpha * p + (1 - mix_alpha) * q`` of the processed distributions (needs a teacher).
    """

    max_new_tokens: int
    min_new_tokens: int = 0
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    no_repeat_ngram_size: int = 0  # 0: off; the paper's evaluation uses 6
    mix_alpha: float = 0.0  # teacher weight alpha of p~ = alpha * p + (1 - alpha) * q
    stop_ids: tuple[int, ...] = ()  # end a sequence (EOS and any other stop token); the stop token is kept
    # With a teacher: the student drafts this many tokens per teacher forward, accepted or corrected
    # so that tokens follow the mixture exactly (speculative sampling); 0: the teacher decodes token by token.
    speculative_k: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}"
            )
        if not (0 < self.temperature < math.inf):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0 (0 = off), got {self.no_repeat_ngram_size}")
        if not 0 <= self.mix_alpha <= 1:
            raise ValueError(f"mix_alpha must be in [0, 1], got {self.mix_alpha}")
        if self.speculative_k < 0:
            raise ValueError(f"speculative_k must be >= 0 (0 = off), got {self.speculative_k}")
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
