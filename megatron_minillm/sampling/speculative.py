"""Speculative teacher-mixed sampling: the student drafts k tokens, the teacher checks them in one
forward, and the tokens follow the mixture p~ = alpha * p + (1 - alpha) * q exactly.

The student is the draft model of its own mixture (Leviathan et al. 2023; Chen et al. 2023): draw
y ~ q, accept it with probability min(1, p~(y) / q(y)) = min(1, alpha * p(y) / q(y) + 1 - alpha); at
the first rejection draw from the residual norm(max(0, p~ - q)) = norm(max(0, p - q)); when all k
drafts pass, draw one more token from p~. Each draft passes with probability 1 - alpha * TV(p, q)
>= 1 - alpha. The per-token log q, log p and log p~ are those of the processed distributions at each
kept position, as the plain sampler returns them.

Rows keep different numbers of drafts: rejected drafts are removed from both KV caches and each row's
kept positions moved to the end of the cache, as left padding is (``KVCacheDecoder.drop``); position
ids count kept tokens only.
Noise is keyed by (sample seed, index of the generated token, stream): drafts on the ``DRAW``
stream, acceptance on ``ACCEPT``, corrections and the bonus token on ``RESIDUAL``. A token's
randomness is thus fixed whatever the batch or layout, and a draft discarded with its round never
decided anything kept, so its noise can serve the next draft at that index.
"""

import torch
import torch.distributed as dist
from megatron.core.inference import communication_utils as comm
from torch import Tensor

from megatron_minillm.parallel.vocab import gather_ids, log_softmax, mask_padded_vocab, tp_all_reduce
from megatron_minillm.sampling import vocab_parallel as vp
from megatron_minillm.sampling.cross_layout import all_done, decoders_for
from megatron_minillm.sampling.noise import ACCEPT, DRAW, RESIDUAL, uniform
from megatron_minillm.sampling.params import SamplingParams
from megatron_minillm.sampling.processors import NoRepeatNGram, draw, mix, processed_log_probs
from megatron_minillm.sampling.rollout import Rollout, SpeculationStats, check_inputs, finish, prefill


def speculative_generate(
    modules: list,
    prompts: list[list[int]],
    params: SamplingParams,
    seeds: Tensor,
    vocab_size: int,
    pad_id: int,
    teacher_logits_dtype: torch.dtype | None = None,
) -> Rollout:
    """:func:`generate.generate` with a teacher and ``params.speculative_k`` > 0 (same contract)."""
    k = params.speculative_k
    batch, width = len(prompts), max(map(len, prompts))
    decoders = decoders_for(modules, batch, width + params.max_new_tokens + k + 1)
    check_inputs(prompts, seeds, params, decoders, vocab_size)
    student, teacher = decoders
    is_last, tp_group, pp_group, device = student.is_last, student.tp_group, student.pp_group, student.device
    pipelined = dist.get_world_size(pp_group) > 1
    seeds = seeds.to(device)
    stop_ids = torch.tensor(params.stop_ids, dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device)
    drafts_at = torch.arange(k, device=device)

    (q_logits, p_first), next_position = prefill(decoders, prompts, pad_id)
    ngrams = NoRepeatNGram(params.no_repeat_ngram_size, prompts) if params.no_repeat_ngram_size and is_last else None
    count = torch.zeros(batch, dtype=torch.long, device=device)  # tokens kept per row
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    out_tokens = torch.full((batch, params.max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_logps = torch.zeros(3, batch, params.max_new_tokens, device=device) if is_last else None
    keep_teacher = is_last and teacher_logits_dtype is not None
    if keep_teacher:
        shard = teacher.model.vocab_size // dist.get_world_size(tp_group)
        out_teacher = torch.zeros(batch, params.max_new_tokens, shard, dtype=teacher_logits_dtype, device=device)
        out_teacher_log_p = torch.zeros(batch, params.max_new_tokens, device=device)
    stats, pending = SpeculationStats(), None

    def banned(step: Tensor, extra: list[Tensor]) -> list[list[int]]:
        """Per row: the no-repeat bans after the kept tokens and ``extra`` drafts, and the stop ids
        while fewer than ``min_new_tokens`` are kept."""
        lists = ngrams.banned_after([d.tolist() for d in extra]) if ngrams else [[] for _ in prompts]
        if params.min_new_tokens and params.stop_ids:
            early = (step < params.min_new_tokens).tolist()
            lists = [b + list(params.stop_ids) if e else b for b, e in zip(lists, early)]
        return lists

    while not all_done(done, decoders):
        live = ~done  # finished rows feed tokens that stay hidden, so their caches do not fill up
        # The student drafts k tokens, first taking in the token kept last round.
        if pending is not None:
            q_logits = student.forward(pending[:, None], (next_position - 1)[:, None], live[:, None])
        log_q, bans, drafts = [], [], []
        for j in range(k + 1):
            if is_last:
                bans.append(banned(count + j, drafts))
                log_q.append(processed_log_probs(q_logits, params, vocab_size, bans[-1], tp_group))
            if j == k:
                break
            ids = draw(log_q[-1], seeds, count + j, params.greedy, tp_group, DRAW) if is_last else None
            if pipelined:
                ids = comm.broadcast_from_last_pipeline_stage([batch], torch.long, ids, pp_group=pp_group)
            drafts.append(ids)
            q_logits = student.forward(ids[:, None], (next_position + j)[:, None], live[:, None])
        drafted = torch.stack(drafts, dim=1)  # [b, k]

        # The teacher scores every draft in one forward (and the kept token it has not seen yet).
        fed = drafted if pending is None else torch.cat((pending[:, None], drafted), dim=1)
        positions = next_position[:, None] + torch.arange(-fed.shape[1] + k, k, device=device)
        p_logits = teacher.forward(fed, positions, live[:, None].expand_as(fed), every_position=True)
        if is_last:
            p_all = p_logits if pending is not None else torch.cat((p_first[:, None], p_logits), dim=1)
            log_p = [processed_log_probs(p_all[:, j], params, vocab_size, bans[j], tp_group) for j in range(k + 1)]
            decision = _decide(log_q, log_p, drafted, count, seeds, params, tp_group)
        else:
            decision = None
        if pipelined:
            decision = comm.broadcast_from_last_pipeline_stage([2, batch], torch.long, decision, pp_group=pp_group)
        accepted, extra = decision  # [b] each
        pending = extra

        # Keep the accepted prefix and the extra token, up to the budget and the first stop token.
        candidates = torch.cat((drafted, torch.zeros_like(extra)[:, None]), dim=1)  # [b, k + 1]
        candidates[rows, accepted] = extra
        offsets = torch.arange(k + 1, device=device)
        in_round = offsets[None, :] <= accepted[:, None]
        stops = torch.isin(candidates, stop_ids) & in_round
        first_stop = torch.where(stops.any(1), stops.int().argmax(1), torch.full_like(accepted, k + 1))
        kept = torch.minimum(torch.minimum(accepted + 1, params.max_new_tokens - count), first_stop + 1)
        kept = torch.where(done, torch.zeros_like(kept), kept)
        keep = offsets[None, :] < kept[:, None]  # [b, k + 1]
        # (row, output index) of each kept token
        at = (rows[:, None].expand_as(keep)[keep], (count[:, None] + offsets)[keep])
        out_tokens[at] = candidates[keep]
        if is_last:
            out_logps[(slice(None), *at)] = _round_logps(log_q, log_p, params.mix_alpha, candidates, tp_group)[:, keep]
            if keep_teacher:
                out_teacher[at] = p_all[keep].to(teacher_logits_dtype)
                raw = [raw_log_probs(p_all[:, j], candidates[:, j], vocab_size, tp_group) for j in range(k + 1)]
                out_teacher_log_p[at] = torch.stack(raw, 1)[keep]
            if ngrams:
                ngrams.extend([c[m].tolist() for c, m in zip(candidates, keep)])
        stats.drafted += int((live * torch.clamp(params.max_new_tokens - count, max=k)).sum())
        stats.accepted += int((live * torch.minimum(accepted, kept)).sum())
        stats.kept += int(kept.sum())
        stats.row_rounds += int(live.sum())
        count += kept
        next_position += kept
        done |= (stops & keep).any(1) | (count >= params.max_new_tokens)
        for decoder in decoders:  # rejected drafts (and those past a row's end) leave the caches
            decoder.drop(drafts_at[None, :] < torch.minimum(accepted, kept)[:, None])

    mask = torch.arange(params.max_new_tokens, device=device)[None, :] < count[:, None]
    length = int(count.max())
    rollout = finish(
        decoders,
        prompts,
        out_tokens[:, :length],
        mask[:, :length],
        out_logps[:, :, :length].contiguous() if is_last else None,
    )
    rollout.speculation = stats
    if keep_teacher:
        # mask[:, :length]: when every row stopped early, length < max_new_tokens
        rollout.teacher_logits = out_teacher[:, :length]
        rollout.teacher_log_p = out_teacher_log_p[:, :length] * mask[:, :length]
    return rollout


def raw_log_probs(logits: Tensor, ids: Tensor, vocab_size: int, tp_group: dist.ProcessGroup | None) -> Tensor:
    """log p(ids) [b] of the unprocessed distribution (temperature 1, no bans; what rewards read)."""
    return gather_ids(log_softmax(mask_padded_vocab(logits.float(), vocab_size, tp_group), tp_group), ids, tp_group)


def _decide(
    log_q: list[Tensor],
    log_p: list[Tensor],
    drafted: Tensor,
    count: Tensor,
    seeds: Tensor,
    params: SamplingParams,
    tp_group: dist.ProcessGroup | None,
) -> Tensor:
    """[2, b]: per row the number of accepted drafts n and the token drawn at index n (the residual's
    correction, or with n = k the bonus from the mixture)."""
    k = drafted.shape[1]
    log_mix = [mix(q, p, params.mix_alpha) for q, p in zip(log_q, log_p)]
    passed = []
    for j in range(k):
        ids = drafted[:, j]
        if params.greedy:  # accepted exactly when the draft is the mixture's argmax: k = 0's tokens
            passed.append(ids == vp.argmax(log_mix[j], tp_group))
        else:
            ratio = gather_ids(log_mix[j], ids, tp_group) - gather_ids(log_q[j], ids, tp_group)
            passed.append(uniform(seeds, count + j, ACCEPT).log() < ratio)
    accepted = torch.stack(passed, dim=1).int().cumprod(1).sum(1)  # leading run of accepted drafts [b]
    rows = torch.arange(len(accepted), device=accepted.device)
    at_q = torch.stack(log_q, dim=1)[rows, accepted]  # [b, V/TP] at each row's index n
    at_mix = torch.stack(log_mix, dim=1)[rows, accepted]
    if params.greedy:
        extra = vp.argmax(at_mix, tp_group)
    else:
        # Residual max(0, p~ - q) where a draft was rejected; the mixture itself for the bonus (and
        # where rounding left the residual no mass: then p~ = q, and a rejection had probability 0).
        residual = (at_mix.exp() - at_q.exp()).clamp(min=0)
        mass = tp_all_reduce(residual.sum(-1), tp_group=tp_group)
        use_residual = (accepted < k) & (mass > 0)
        target = torch.where(use_residual[:, None], residual.log(), at_mix)
        extra = draw(target, seeds, count + accepted, False, tp_group, RESIDUAL)
    return torch.stack((accepted.long(), extra))


def _round_logps(
    log_q: list[Tensor], log_p: list[Tensor], alpha: float, candidates: Tensor, tp_group: dist.ProcessGroup | None
) -> Tensor:
    """[3, b, k + 1]: log q, log p, log p~ of the round's tokens ``candidates`` [b, k + 1] under the
    processed distributions of their index."""
    out = []
    for j, (q, p) in enumerate(zip(log_q, log_p)):
        ids = candidates[:, j]
        out.append(torch.stack([gather_ids(lp, ids, tp_group) for lp in (q, p, mix(q, p, alpha))]))
    return torch.stack(out, dim=-1)
