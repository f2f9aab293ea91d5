"""What an algorithm is to the trainer: an :class:`Objective`, declared data plus one loss function.

An objective declares where its responses come from (``samples``), the kinds of micro-batch an
optimizer step trains on (:class:`BatchKind`: where their responses come from, what of the teacher
their loss reads, how many loss functions run on their logits), and owns ``loss(batch, logits)``.
The trainer runs the loop from these declarations, the memory planner sizes memory from them; neither
branches on algorithm names.

Reductions: every loss term is a per-token value summed over the micro-batch's loss tokens and
multiplied by ``MicroBatch.loss_scale`` (:func:`token_normalize`): after megatron's mean over
micro-batches and DP ranks, the gradient is the token mean of each term over the whole optimizer
step, whatever the micro-batch size or DP layout (LMOps' token mean per step).
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_minillm.config import TrainConfig
from megatron_minillm.data.micro_batch import MicroBatch

Metrics = dict[str, Tensor]


@dataclass(frozen=True)
class BatchKind:
    """One kind of micro-batch of an optimizer step.

    ``responses``: "sampled" (generated: at most max_length - max_prompt_length tokens), "dataset"
    (a dataset's responses: up to the whole sequence) or "pretraining" (plain text: every position).
    ``teacher_logits``: the loss reads the teacher's vocab-parallel logits at its loss positions
    (cached by one teacher forward: once per rollout batch for sampled responses, else once per step).
    ``teacher_log_p``: the objective reads the teacher's log p of each label (MiniLLM's rewards).
    ``logit_losses``: loss functions run on its logits (each keeps a [tokens, V/TP] gradient).
    """

    name: str
    responses: Literal["sampled", "dataset", "pretraining"]
    logit_losses: int
    teacher_logits: bool = False
    teacher_log_p: bool = False

    @property
    def needs_teacher(self) -> bool:
        return self.teacher_logits or self.teacher_log_p


class Objective(ABC):
    """An algorithm: its batch kinds, its loss, and hooks for per-token values it derives.

    ``samples``: "dataset" (the dataset's responses), "student" (on-policy rollouts of the student,
    teacher-mixed with ``rollout.mix_alpha``, reused for ``epochs`` passes) or "teacher" (the
    teacher's own samples, drawn once per example).
    """

    name: ClassVar[str]
    samples: ClassVar[Literal["dataset", "student", "teacher"]] = "dataset"

    def __init__(
        self,
        cfg: TrainConfig,
        vocab_size: int,
        pt_data: bool | None = None,
        tp_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.cfg = cfg
        self.vocab_size = vocab_size  # the true vocabulary: padded ids never get probability mass
        self.tp_group = tp_group  # the student's vocabulary split (None: megatron's global TP group)
        # whether pretraining text is given (default: cfg.pt_data names it; the planner needs no path)
        self.pt_data = bool(cfg.pt_data) if pt_data is None else pt_data

    @property
    def epochs(self) -> int:
        """Passes over each batch of samples (PPO epochs for on-policy objectives)."""
        return 1

    @abstractmethod
    def batch_kinds(self) -> list[BatchKind]:
        """The kinds of micro-batch of one optimizer step: the main kind first, then, e.g., L_PT's."""

    @property
    def main_kind(self) -> BatchKind:
        return self.batch_kinds()[0]

    @property
    def pretraining_kind(self) -> BatchKind | None:
        """The kind trained on pretraining text (interleaved with the main kind), if any."""
        return next((k for k in self.batch_kinds() if k.responses == "pretraining"), None)

    @abstractmethod
    def loss(self, batch: MicroBatch, logits: Tensor) -> tuple[Tensor, Metrics]:
        """(scalar loss, metrics) of one micro-batch from its vocab-parallel logits [1, n, V/TP]
        (at ``batch.logit_positions``) or [b, s, V/TP]; metrics are detached, each its share of the
        step's token mean."""

    def prepare_samples(self, batches: list[MicroBatch]) -> None:
        """Per-token values derived once per batch of samples, after teacher scoring (last stage)."""

    def prepare_step(self, batches: list[MicroBatch], dp_group: dist.ProcessGroup | None) -> None:
        """Per-token values derived from one optimizer step's main micro-batches (last stage)."""

    def sample_stats(self, batches: list[MicroBatch]) -> dict[str, Tensor]:
        """Sums over the loss tokens of the samples (last stage), logged as token means."""
        return {}


def summed(per_token: Tensor, batch: MicroBatch) -> Tensor:
    """A per-token term [1, n] (or [b, s]) summed over the batch's loss tokens, times its loss_scale."""
    return (per_token * batch.pick(batch.loss_mask)).sum() * batch.loss_scale


def token_normalize(batches: list[MicroBatch], dp: int, dp_group: dist.ProcessGroup | None) -> None:
    """Set each micro-batch's ``loss_scale`` = (micro-batches x DP) / (tokens of its kind in the step
    over all DP ranks), undoing megatron's mean over micro-batches and DP ranks."""
    kinds = sorted({b.kind for b in batches})
    counts = torch.stack([sum(b.loss_mask.sum() for b in batches if b.kind == k) for k in kinds]).double()
    dist.all_reduce(counts, group=dp_group)
    for b in batches:
        tokens = counts[kinds.index(b.kind)].item()
        b.loss_scale = len(batches) * dp / max(tokens, 1.0)
