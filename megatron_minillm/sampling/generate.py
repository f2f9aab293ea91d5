"""Batched generation at any TP x PP: the student alone, or student and teacher decoding together
(teacher-mixed sampling, MiniLLM Section 2.2 / Algorithm 1 with p~ = alpha * p + (1 - alpha) * q).

Every rank of a model-parallel group calls :func:`generate` with the same prompts and seeds;
data-parallel ranks call it with their own. Each step the last pipeline stage draws the tokens and
broadcasts them to the other stages; the per-token log-probabilities stay on the last stage until
the end, when they are broadcast once.

The TP and PP groups are the model's own (``KVCacheDecoder`` reads the ``pg_collection`` megatron's
GPTModel keeps), so a model built on an explicit layout samples over it with no extra argument; a
teacher must share the student's layout, since a token is drawn from both models' vocabulary slices
on the same ranks, or be a :class:`CrossLayoutTeacher` (``sampling.cross_layout``) whose logits
arrive in the student's layout. The data-parallel group of :func:`generate_all` is an argument (a model does not
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
from megatron_minillm.sampling.cross_layout import CrossLayoutTeacher, all_done, decoders_for
from megatron_minillm.sampling.noise import sample_seeds
from megatron_minillm.sampling.params import SamplingParams
from megatron_minillm.sampling.processors import NoRepeatNGram, draw, mix, processed_log_probs
from megatron_minillm.sampling.rollout import GenerationError, Rollout, check_inputs, finish, prefill
from megatron_minillm.sampling.speculative import speculative_generate


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    seeds: Tensor,
    *,
    vocab_size: int,
    teacher: torch.nn.Module | CrossLayoutTeacher | None = None,
    pad_id: int = 0,
    teacher_logits_dtype: torch.dtype | None = None,
) -> Rollout:
    """Sample up to ``params.max_new_tokens`` tokens after each prompt (lists of token ids).

    ``seeds`` [b] are per-sample seeds (see :func:`noise.sample_seeds`): a sample's tokens depend
    only on its prompt, its seed and the models, not on the layout or the rest of the batch.
    ``vocab_size`` is the true vocabulary size; ids at or above it (vocabulary padding) are never drawn.
    ``teacher_logits_dtype``: the speculative sampler keeps the teacher's logits of every response
    position in this dtype (``Rollout.teacher_logits``), which spares the trainer a scoring forward.
    A teacher on its own layout (:class:`CrossLayoutTeacher`) decodes every DP group's rows at once:
    every rank of the world calls :func:`generate` together, with batches of one size.
    """
    if params.mix_alpha > 0 and teacher is None:
        raise GenerationError(f"mix_alpha={params.mix_alpha} needs a teacher")
    modules = [model] if teacher is None else [model, teacher]
    networks = [m.model if isinstance(m, CrossLayoutTeacher) else m for m in modules]
    was_training = [m.training for m in networks]
    for m in networks:
        m.eval()
    args = ([list(map(int, p)) for p in prompts], params, seeds.to(torch.int64), vocab_size, pad_id)
    try:
        if params.speculative_k and teacher is not None:
            return speculative_generate(modules, *args, teacher_logits_dtype=teacher_logits_dtype)
        return _generate(modules, *args)
    finally:
        for m, mode in zip(networks, was_training):
            m.train(mode)


def _generate(
    modules: list,
    prompts: list[list[int]],
    params: SamplingParams,
    seeds: Tensor,
    vocab_size: int,
    pad_id: int,
) -> Rollout:
    decoders = decoders_for(modules, len(prompts), max(map(len, prompts), default=0) + params.max_new_tokens)
    batch = len(prompts)
    check_inputs(prompts, seeds, params, decoders, vocab_size)
    student = decoders[0]
    is_last, tp_group, pp_group, device = student.is_last, student.tp_group, student.pp_group, student.device
    pipelined = dist.get_world_size(pp_group) > 1
    stop_ids = torch.tensor(params.stop_ids, dtype=torch.long, device=device)
    seeds = seeds.to(device)

    logits, next_position = prefill(decoders, prompts, pad_id)

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
        if all_done(done, decoders) or step + 1 == params.max_new_tokens:
            break
        fed = torch.ones(batch, 1, dtype=torch.bool, device=device)  # finished rows feed padding that nobody reads
        logits = [d.forward(ids[:, None], next_position[:, None] + step, fed) for d in decoders]

    logps = torch.stack(out_logps, dim=-1) if is_last else None  # [num_logps, b, T]
    return finish(decoders, prompts, torch.stack(out_tokens, dim=1), torch.stack(out_mask, dim=1), logps)


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
