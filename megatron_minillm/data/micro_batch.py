"""The micro-batch: prompt + response sequences [b, s] and what the loss reads, typed.

One place builds it (:func:`pack`), from prompt and response token tensors, on the device of the
model; the pipeline schedule feeds ``tokens`` / ``position_ids`` to the model, and an objective's
loss reads the rest. With ``logit_positions`` the last stage computes the logits at those positions
only, as [1, n, V/TP]: :meth:`MicroBatch.pick` brings per-token tensors into the same layout.
"""

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class MicroBatch:
    """One micro-batch. Per-token fields are [b, s], aligned with ``labels`` (0 outside ``loss_mask``);
    the optional ones are set by whoever produces them (the sampler, the teacher, the objective)."""

    tokens: Tensor  # [b, s] int64 input ids, right-padded
    labels: Tensor  # [b, s] int64: the token each position predicts
    loss_mask: Tensor  # [b, s] float 0/1: positions whose prediction the loss counts
    position_ids: Tensor  # [b, s]
    kind: str  # which of the objective's batch kinds this is (``algorithms.BatchKind.name``)
    logit_positions: Tensor | None = None  # [n] flat indices into [b, s] of the logits computed; None: all
    # from the rollout (minillm)
    log_q_old: Tensor | None = None  # log q of the sampled token under the rollout policy
    importance_weight: Tensor | None = None  # w_t = q(y_t) / p~(y_t) of teacher-mixed sampling
    # from the teacher (scoring)
    teacher_logits: Tensor | None = None  # [1, n, V/TP] at logit_positions (or [b, s, V/TP]), cache dtype
    teacher_log_p: Tensor | None = None  # log p(label) at temperature 1
    # from the objective
    rewards: Tensor | None = None
    advantages: Tensor | None = None
    # (micro-batches x DP) / (tokens of this kind in the optimizer step over all DP ranks): a loss
    # term summed over this micro-batch's tokens, times loss_scale, is its share of the step's token
    # mean after megatron's mean over micro-batches and DP ranks (``algorithms.token_normalize``).
    loss_scale: float = 1.0

    @property
    def num_tokens(self) -> int:
        """Tokens the loss counts (host-side: a Python number for bookkeeping)."""
        return int(self.loss_mask.sum().item())

    def pick(self, values: Tensor) -> Tensor:
        """Per-token ``values`` [b, s, ...] in the layout of the logits: [1, n, ...] at the logit
        positions, unchanged without them."""
        if self.logit_positions is None:
            return values
        return values.flatten(0, 1)[self.logit_positions].unsqueeze(0)

    def scatter(self, values: Tensor) -> Tensor:
        """The inverse of :meth:`pick` for [1, n] values: [b, s], 0 elsewhere."""
        if self.logit_positions is None:
            return values
        out = values.new_zeros(self.tokens.numel())
        out[self.logit_positions] = values[0]
        return out.view_as(self.tokens)

    def replace(self, **changes: object) -> "MicroBatch":
        """A shallow copy with ``changes`` (tensors are shared, not copied)."""
        return dataclasses.replace(self, **changes)


def logit_positions(loss_mask: Tensor) -> Tensor:
    """The flat [b, s] indices where ``loss_mask`` is non-zero, row-major."""
    return loss_mask.reshape(-1).nonzero().squeeze(1)


def sequence_length(lengths: Sequence[int], max_length: int, fixed: bool, multiple: int = 8) -> int:
    """The [s] of a set of micro-batches holding sequences of ``lengths`` tokens: their longest - 1
    (the last token is only a label) rounded up to a multiple of ``multiple`` (sequence parallelism
    needs one that TP divides), at most ``max_length``; with ``fixed`` (PP > 1: the pipeline sends
    fixed-size activations) always ``max_length``."""
    if fixed:
        return max_length
    longest = max((n - 1 for n in lengths), default=1)
    return min(max_length, -(-longest // multiple) * multiple)


def pack(
    prompts: Sequence[Tensor],
    responses: Sequence[Tensor],
    *,
    kind: str,
    micro_batch_size: int,
    seq_length: int,
    pad_id: int,
    device: torch.device,
    logits_at_responses: bool = True,
    **per_token: Sequence[Tensor],
) -> list[MicroBatch]:
    """Micro-batches [mbs, seq_length] of prompt + response (1-D int tensors, any device), right-padded.

    The loss covers the positions that predict response tokens; ``per_token`` values (1-D, one per
    response token, e.g. ``log_q_old``) go there. With ``logits_at_responses`` the models compute
    logits at those positions only. Sequences longer than ``seq_length + 1`` tokens lose the end of
    their response. Right padding changes no value at the real positions (causal attention).
    """
    batches = []
    for start in range(0, len(prompts), micro_batch_size):
        rows = range(start, min(start + micro_batch_size, len(prompts)))
        tokens = torch.full((len(rows), seq_length + 1), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros(len(rows), seq_length, device=device)
        extra = {name: torch.zeros(len(rows), seq_length, device=device) for name in per_token}
        for r, i in enumerate(rows):
            p = prompts[i].to(device)
            y = responses[i][: seq_length + 1 - len(p)].to(device)
            tokens[r, : len(p)] = p
            tokens[r, len(p) : len(p) + len(y)] = y
            mask[r, len(p) - 1 : len(p) - 1 + len(y)] = 1
            for name, values in per_token.items():
                extra[name][r, len(p) - 1 : len(p) - 1 + len(y)] = values[i][: len(y)].to(device)
        positions = torch.arange(seq_length, device=device).expand(len(rows), seq_length)
        batches.append(
            MicroBatch(
                tokens=tokens[:, :-1],
                labels=tokens[:, 1:],
                loss_mask=mask,
                position_ids=positions,
                kind=kind,
                logit_positions=logit_positions(mask) if logits_at_responses else None,
                **extra,
            )
        )
    return batches
