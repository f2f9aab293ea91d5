"""Batched generation at any TP x PP: the student alone, or student and teacher decoding together
(teacher-mixed sampling, MiniLLM Section 2.2 / Algorithm 1 with p~ = alpha * p + (1 - alpha) * q).

Every rank of a model-parallel group calls :func:`generate` with the same prompts and seeds;
data-parallel ranks call it with their own. Each step the last pipeline stage draws the tokens and
broadcasts them to the other stages; the per-token log-probabilities stay on the last stage until
the end, when they are broadcast once.

The TP and PP groups are the model's own (``KVCacheDecoder`` reads the ``pg_collection`` megatron's
GPTModel keeps), so a model built on an explicit layout samples over it with no extra argument; a
teacher must share the student's layout, since a token is drawn from both models' vocabulary slices
on the same ranks. The data-parallel group of :func:`generate_all` is an argument (a model does not
know its replicas), megatron's global DP group by default.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference import communication_utils as comm
from torch import Tensor

from megatron_minillm.parallel.vocab import gather_ids
from megatron_minillm.sampling.kv_cache import KVCacheDecoder
from megatron_minillm.sampling.noise import sample_seeds
from megatron_minillm.sampling.params import SamplingParams
from megatron_minillm.sampling.processors import NoRepeatNGram, draw, mix, processed_log_probs


class GenerationError(ValueError):
    """Inputs generation cannot run on (too long a prompt, mismatched teacher, empty batch)."""


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

    def responses(self) -> list[list[int]]:
        return [row[m].tolist() for row, m in zip(self.tokens, self.mask)]


def _check_inputs(
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
            "from both models' vocabulary slices on the same ranks, so both need the same TP and PP groups"
        )


def _ranks(decoder: KVCacheDecoder, name: str) -> list[int]:
    """The global ranks of one of a decoder's process groups."""
    return dist.get_process_group_ranks(getattr(decoder, name))


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    seeds: Tensor,
    *,
    vocab_size: int,
    teacher: torch.nn.Module | None = None,
    pad_id: int = 0,
) -> Rollout:
    """Sample up to ``params.max_new_tokens`` tokens after each prompt (lists of token ids).

    ``seeds`` [b] are per-sample seeds (see :func:`noise.sample_seeds`): a sample's tokens depend
    only on its prompt, its seed and the models, not on the layout or the rest of the batch.
    ``vocab_size`` is the true vocabulary size; ids at or above it (vocabulary padding) are never drawn.
    """
    if params.mix_alpha > 0 and teacher is None:
        raise GenerationError(f"mix_alpha={params.mix_alpha} needs a teacher")
    modules = [model] if teacher is None else [model, teacher]
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        return _generate(
            modules, [list(map(int, p)) for p in prompts], params, seeds.to(torch.int64), vocab_size, pad_id
        )
    finally:
        for m, mode in zip(modules, was_training):
            m.train(mode)


def _generate(
    modules: list[torch.nn.Module],
    prompts: list[list[int]],
    params: SamplingParams,
    seeds: Tensor,
    vocab_size: int,
    pad_id: int,
) -> Rollout:
    batch, width = len(prompts), max(map(len, prompts), default=0)
    decoders = [KVCacheDecoder(m, batch, width + params.max_new_tokens) for m in modules]
    _check_inputs(prompts, seeds, params, decoders, vocab_size)
    student = decoders[0]
    is_last, tp_group, pp_group, device = student.is_last, student.tp_group, student.pp_group, student.device
    pipelined = dist.get_world_size(pp_group) > 1
    stop_ids = torch.tensor(params.stop_ids, dtype=torch.long, device=device)
    seeds = seeds.to(device)

    # Left-padded prompts: positions count real tokens only, so every sample sees the same inputs
    # as it would alone (up to the rotary phase, which attention does not see).
    tokens = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(batch, width, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) :] = torch.tensor(p, device=device)
        valid[i, width - len(p) :] = True
    positions = (valid.cumsum(1) - 1).clamp(min=0)
    next_position = positions[:, -1] + 1
    logits = [d.forward(tokens, positions, valid) for d in decoders]

    ngrams = NoRepeatNGram(params.no_repeat_ngram_size, prompts) if params.no_repeat_ngram_size and is_last else None
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    out_tokens, out_mask, out_logps = [], [], []
    for step in range(params.max_new_tokens):
        if is_last:
            banned = ngrams.banned() if ngrams else [[] for _ in prompts]
            if step < params.min_new_tokens and params.stop_ids:
                banned = [b + list(params.stop_ids) for b in banned]
            logps = [processed_log_probs(z, params, vocab_size, banned, tp_group) for z in logits]
            mixed = mix(logps[0], logps[1] if len(logps) > 1 else None, params.mix_alpha)
            ids = draw(mixed, seeds, step, params.greedy, tp_group)
            out_logps.append(torch.stack([gather_ids(lp, ids, tp_group) for lp in (*logps, mixed)]))
        else:
            ids = None
        if pipelined:
            ids = comm.broadcast_from_last_pipeline_stage([batch], torch.long, ids, pp_group=pp_group)
        live = ~done
        ids = torch.where(live, ids, torch.full_like(ids, pad_id))
        out_tokens.append(ids)
        out_mask.append(live)
        done = done | torch.isin(ids, stop_ids)
        if ngrams:
            ngrams.append(ids.tolist())
        if bool(done.all()) or step + 1 == params.max_new_tokens:
            break
        fed = torch.ones(batch, 1, dtype=torch.bool, device=device)  # finished rows feed padding that nobody reads
        logits = [d.forward(ids[:, None], next_position[:, None] + step, fed) for d in decoders]

    mask = torch.stack(out_mask, dim=1)
    num_logps = len(decoders) + 1
    logps = torch.stack(out_logps, dim=-1) if is_last else None  # [num_logps, b, T]
    if pipelined:
        logps = comm.broadcast_from_last_pipeline_stage(
            [num_logps, batch, mask.shape[1]], torch.float32, logps, pp_group=pp_group
        )
    logps = torch.where(mask, logps, torch.zeros_like(logps))
    return Rollout(
        prompts=prompts,
        tokens=torch.stack(out_tokens, dim=1),
        mask=mask,
        log_q=logps[0],
        log_p=logps[1] if len(decoders) == 2 else None,
        log_mix=logps[-1],
    )


@dataclass
class Sample:
    """One generated response (what :func:`generate_all` returns per prompt)."""

    tokens: list[int]
    log_q: list[float]
    log_p: list[float] | None
    log_mix: list[float]


def generate_all(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    seed: int,
    *,
    vocab_size: int,
    batch_size: int,
    teacher: torch.nn.Module | None = None,
    pad_id: int = 0,
    progress: bool = False,
    dp_group: dist.ProcessGroup | None = None,
) -> list[Sample]:
    """Generate for a whole prompt set over the data-parallel ranks of ``dp_group`` (None: megatron's
    global DP group); every rank gets all samples. TP and PP groups are the models' own.

    Prompt i goes to DP rank i % DP with seed ``sample_seeds(seed, i)``; each rank batches its
    prompts by length (less padding), which changes no token, since a sample depends only on its seed.
    """
    from tqdm import tqdm

    if dp_group is None:
        dp_group = parallel_state.get_data_parallel_group()
    dp, dp_rank = dist.get_world_size(dp_group), dist.get_rank(dp_group)
    mine = sorted(range(dp_rank, len(prompts), dp), key=lambda i: len(prompts[i]))
    local: dict[int, Sample] = {}
    bar = tqdm(total=len(prompts), desc="generating", disable=not progress or dist.get_rank() != 0)
    for start in range(0, len(mine), batch_size):
        ids = mine[start : start + batch_size]
        rollout = generate(
            model,
            [prompts[i] for i in ids],
            params,
            sample_seeds(seed, torch.tensor(ids, device="cpu")),  # host: generate() moves the seeds
            vocab_size=vocab_size,
            teacher=teacher,
            pad_id=pad_id,
        )
        for row, i in enumerate(ids):
            keep = rollout.mask[row]
            local[i] = Sample(
                tokens=rollout.tokens[row][keep].tolist(),
                log_q=rollout.log_q[row][keep].tolist(),
                log_p=rollout.log_p[row][keep].tolist() if rollout.log_p is not None else None,
                log_mix=rollout.log_mix[row][keep].tolist(),
            )
        bar.update(len(ids) * dp)
    bar.close()
    gathered: list = [None] * dp
    dist.all_gather_object(gathered, local, group=dp_group)
    merged = {i: s for part in gathered for i, s in part.items()}
    return [merged[i] for i in range(len(prompts))]
