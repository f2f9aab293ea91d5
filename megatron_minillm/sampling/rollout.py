"""What the plain and the speculative sampler share: the rollout they return, input checks, the
prompt prefill and the final broadcast of the log-probabilities over the pipeline."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.inference import communication_utils as comm
from torch import Tensor

from megatron_minillm.sampling.kv_cache import KVCacheDecoder
from megatron_minillm.sampling.params import SamplingParams


class GenerationError(ValueError):
    """Inputs generation cannot run on (too long a prompt, mismatched teacher, empty batch)."""


@dataclass
class SpeculationStats:
    """Counts over a rollout's live rows: drafts proposed and accepted, tokens kept, and row-rounds
    (one teacher forward per round serves every live row)."""

    drafted: int = 0
    accepted: int = 0
    kept: int = 0
    row_rounds: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)

    @property
    def tokens_per_teacher_forward(self) -> float:
        return self.kept / max(self.row_rounds, 1)


@dataclass
class Rollout:
    """Generated responses, right-padded to the longest; the prompt is not repeated in ``tokens``.

    Log-probabilities are those of the processed distributions tokens were drawn from (bans,
    temperature, top-k, top-p applied): ``log_q`` of the student, ``log_p`` of the teacher (None
    without one), ``log_mix`` of the mixture (= ``log_q`` without mixing). They are 0 where
    ``mask`` is 0. The importance weight of MiniLLM is ``exp(log_q - log_mix)``.
    """

    prompts: list[list[int]]
    tokens: Tensor  # [b, T] int64, ``pad_id`` after a sequence ended
    mask: Tensor  # [b, T] bool: generated tokens, the stop token included
    log_q: Tensor  # [b, T] float32
    log_p: Tensor | None
    log_mix: Tensor
    speculation: SpeculationStats | None = None  # the speculative sampler's counts
    # Kept by the speculative sampler when asked (last pipeline stage; None elsewhere): the teacher's
    # raw logits [b, T, V/TP] at each response position and log p(token) [b, T] at temperature 1.
    teacher_logits: Tensor | None = None
    teacher_log_p: Tensor | None = None

    def responses(self) -> list[list[int]]:
        return [row[m].tolist() for row, m in zip(self.tokens, self.mask)]


def check_inputs(
    prompts: Sequence[Sequence[int]],
    seeds: Tensor,
    params: SamplingParams,
    models: list[KVCacheDecoder],
    vocab_size: int,
) -> None:
    if not prompts:
        raise GenerationError("no prompts to generate from")
    if any(len(p) == 0 for p in prompts):
        raise GenerationError(f"prompt {next(i for i, p in enumerate(prompts) if len(p) == 0)} is empty")
    if seeds.shape != (len(prompts),):
        raise GenerationError(f"need one seed per prompt: {len(prompts)} prompts, seeds of shape {tuple(seeds.shape)}")
    for name, dec in zip(("student", "teacher"), models):
        limit = dec.model.max_sequence_length
        for i, p in enumerate(prompts):
            if len(p) + params.max_new_tokens > limit:
                raise GenerationError(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens={params.max_new_tokens} that is "
                    f"{len(p) + params.max_new_tokens} > the {name}'s context of {limit} positions"
                )
        if vocab_size > dec.model.vocab_size:
            raise GenerationError(f"vocab_size {vocab_size} > the {name}'s (padded) vocabulary {dec.model.vocab_size}")
        bad = [t for p in prompts for t in p if not 0 <= t < vocab_size]
        if bad:
            raise GenerationError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    if len(models) == 2 and models[0].model.vocab_size != models[1].model.vocab_size:
        raise GenerationError(
            f"student and teacher pad the vocabulary differently ({models[0].model.vocab_size} vs "
            f"{models[1].model.vocab_size}); convert both with the same --make-vocab-size-divisible-by"
        )
    if len(models) == 2 and any(
        _ranks(models[0], name) != _ranks(models[1], name) for name in ("tp_group", "pp_group")
    ):
        raise GenerationError(
            "the teacher is built on another TP x PP layout than the student; sampling draws each token "
            "from both models' vocabulary slices on the same ranks: pass it as a CrossLayoutTeacher "
            "(sampling.cross_layout), whose logits arrive in the student's layout"
        )


def _ranks(decoder: KVCacheDecoder, name: str) -> list[int]:
    """The global ranks of one of a decoder's process groups."""
    return dist.get_process_group_ranks(getattr(decoder, name))


def prefill(decoders: list[KVCacheDecoder], prompts: list[list[int]], pad_id: int) -> tuple[list, Tensor]:
    """Run the left-padded prompts through every decoder: the logits of each one's last position
    (last stage; None elsewhere) and the position id of the first new token [b].

    Positions count real tokens only, so every sample sees the same inputs as it would alone (up to
    the rotary phase, which attention does not see).
    """
    batch, width, device = len(prompts), max(map(len, prompts)), decoders[0].device
    tokens = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(batch, width, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) :] = torch.tensor(p, device=device)
        valid[i, width - len(p) :] = True
    positions = (valid.cumsum(1) - 1).clamp(min=0)
    return [d.forward(tokens, positions, valid) for d in decoders], positions[:, -1] + 1


def finish(
    decoders: list[KVCacheDecoder], prompts: list[list[int]], tokens: Tensor, mask: Tensor, logps: Tensor | None
) -> Rollout:
    """The rollout, once the last stage broadcast its log-probabilities ``logps`` [n, b, T] (n = 2
    without a teacher: q, mix; 3 with one: q, p, mix) to the other stages."""
    num_logps = len(decoders) + 1
    if dist.get_world_size(decoders[0].pp_group) > 1:
        logps = comm.broadcast_from_last_pipeline_stage(
            [num_logps, *mask.shape], torch.float32, logps, pp_group=decoders[0].pp_group
        )
    logps = torch.where(mask, logps, torch.zeros_like(logps))
    return Rollout(
        prompts=prompts,
        tokens=tokens,
        mask=mask,
        log_q=logps[0],
        log_p=logps[1] if num_logps == 3 else None,
        log_mix=logps[-1],
    )
