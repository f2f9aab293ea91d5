"""The frozen teacher as the trainer uses it: loaded on the student's layout or on its own TP x PP on
the same ranks, it scores micro-batches and serves the sampler, and what it computes always arrives
in the student's layout (the student's last pipeline stage, vocabulary split over the student's TP).

On its own layout (``parallel.teacher_tp`` / ``parallel.teacher_pp``), the teacher's DP groups score
contiguous shares of all student DP groups' sequences (``parallel.exchange``): the token ids are
gathered to every rank, each teacher pipeline scores its share, and only what the loss reads comes
back: the logits at the loss positions (cache dtype, re-split V/TP_t -> V/TP_s) and/or log p of each
label (one number per token).
"""

import logging

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection
from torch import Tensor

from megatron_minillm.algorithms import BatchKind
from megatron_minillm.checkpoint.dist_checkpoint import load_model
from megatron_minillm.data.micro_batch import MicroBatch, logit_positions
from megatron_minillm.losses import token_log_probs
from megatron_minillm.models.builder import DTYPES, model_parallel_groups
from megatron_minillm.parallel import ParallelLayout, new_model_groups
from megatron_minillm.parallel.exchange import LayoutExchange
from megatron_minillm.sampling.cross_layout import CrossLayoutTeacher
from megatron_minillm.training.schedule import forward_outputs

log = logging.getLogger("megatron_minillm.train")


def model_checksum(model: torch.nn.Module) -> float:
    """Sum of all weights over the model's TP x PP ranks: equal for the same checkpoint at any layout,
    logged so that a teacher that silently failed to load (e.g. all zeros) is caught."""
    total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
    for group in model_parallel_groups(getattr(model, "pg_collection", None)):
        dist.all_reduce(total, group=group)
    return total.item()


def set_teacher_outputs(batch: MicroBatch, logits: list[Tensor] | None, log_p: list[Tensor] | None) -> None:
    """``batch.teacher_logits`` / ``teacher_log_p`` from per-row values at each row's loss
    positions, in order (logits [n_r, V/TP], log p [n_r]; None: not wanted): the logits as the loss
    reads them ([1, n, V/TP] at the logit positions, or [b, s, V/TP] with zeros elsewhere), log p as
    [b, s]. For scores that did not come from a forward over ``batch`` itself."""
    where = batch.loss_mask.bool()
    if logits is not None:
        values = torch.cat(logits)  # [n, V/TP], row-major like the logit positions
        if batch.logit_positions is None:
            full = values.new_zeros(*batch.tokens.shape, values.shape[-1])
            full[where] = values
            batch.teacher_logits = full
        else:
            batch.teacher_logits = values[None]
    if log_p is not None:
        batch.teacher_log_p = torch.zeros_like(batch.loss_mask)
        batch.teacher_log_p[where] = torch.cat(log_p)


class Teacher:
    """A frozen teacher model for training (see the module doc): built on the student's groups
    (``groups`` None) or on its own (``groups``: its ``new_model_groups``)."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        student_layout: ParallelLayout,
        cache_dtype: str,
        vocab_size: int,
        groups: ProcessGroupCollection | None = None,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.groups, self.own_layout = groups, groups is not None
        self.tp_group = model.pg_collection.tp
        tp, pp = (dist.get_world_size(group) for group in model_parallel_groups(groups))
        self.layout = ParallelLayout(tp=tp, pp=pp, world_size=student_layout.world_size)
        self.exchange = LayoutExchange(student_layout, self.layout, model.vocab_size) if groups else None
        self.cache_dtype, self.vocab_size = DTYPES[cache_dtype], vocab_size

    @classmethod
    def load(
        cls,
        path: str,
        *,
        layout: ParallelLayout,
        student_layout: ParallelLayout,
        dtype: str,
        cache_dtype: str,
        vocab_size: int,
        checksums: bool,
    ) -> "Teacher":
        """Load the checkpoint at ``layout``: on the student's groups when the TP x PP are the
        student's, else on groups of its own."""
        own = (layout.tp, layout.pp) != (student_layout.tp, student_layout.pp)
        groups = new_model_groups(layout) if own else None
        model, _, _ = load_model(path, dtype=dtype, checksums=checksums, pg_collection=groups)
        teacher = cls(
            model, student_layout=student_layout, cache_dtype=cache_dtype, vocab_size=vocab_size, groups=groups
        )
        log.info(
            "teacher %s at TP=%d x PP=%d x DP=%d, checksum %.10e",
            path,
            layout.tp,
            layout.pp,
            layout.dp,
            model_checksum(model),
        )
        return teacher

    @property
    def sampler(self) -> torch.nn.Module | CrossLayoutTeacher:
        """What ``sampling.generate`` takes as the teacher."""
        return CrossLayoutTeacher(self.model, self.exchange) if self.own_layout else self.model

    def score(self, kind: BatchKind, batches: list[MicroBatch]) -> None:
        """One teacher forward over ``batches``; on the student's last stage set what ``kind``'s loss
        reads: ``teacher_logits`` (cache dtype, at the logit positions) and/or ``teacher_log_p``
        [b, s] (temperature 1: the reward uses the teacher as is). Collective over the world."""
        if not kind.needs_teacher:
            return
        if self.own_layout:
            self._score_elsewhere(kind, batches)
            return
        outputs = forward_outputs(self.model, batches, self._outputs(kind))
        for batch, (logits, log_p) in zip(batches, outputs):
            batch.teacher_logits = logits
            batch.teacher_log_p = None if log_p is None else batch.scatter(log_p)

    def _outputs(self, kind: BatchKind):
        """(batch, logits) -> (logits in the cache dtype or None, log p [1, n] or None)."""

        def outputs(batch: MicroBatch, logits: Tensor) -> tuple[Tensor | None, Tensor | None]:
            log_p = None
            if kind.teacher_log_p:
                labels, mask = batch.pick(batch.labels), batch.pick(batch.loss_mask)
                log_p = token_log_probs(
                    logits.float(), labels, mask, vocab_size=self.vocab_size, tp_group=self.tp_group
                )
            return (logits.to(self.cache_dtype) if kind.teacher_logits else None), log_p

        return outputs

    def _score_elsewhere(self, kind: BatchKind, batches: list[MicroBatch]) -> None:
        """:meth:`score` with the teacher on its own layout."""
        exchange, device = self.exchange, batches[0].tokens.device
        # Every student DP group's sequences [G, S + 1] and loss masks [G, S], S the longest of all.
        longest = torch.tensor([max(b.tokens.shape[1] for b in batches)], device=device)
        dist.all_reduce(longest, dist.ReduceOp.MAX)
        seq = int(longest)
        sequences = torch.cat(
            [
                torch.nn.functional.pad(torch.cat((b.tokens, b.labels[:, -1:]), 1), (0, seq - b.tokens.shape[1]))
                for b in batches
            ]
        )
        masks = torch.cat([torch.nn.functional.pad(b.loss_mask, (0, seq - b.loss_mask.shape[1])) for b in batches])
        sequences, masks = exchange.gather_rows(sequences), exchange.gather_rows(masks)
        counts = masks.sum(1).long().tolist()  # host-side: positions per row, to size the messages
        mine = exchange.teacher_rows(len(counts))

        logits_rows = log_p_rows = None
        if len(mine):
            share = slice(mine.start, mine.stop)
            per_row = self._score_rows(kind, sequences[share], masks[share], len(batches[0].tokens))
            if per_row is not None:
                logits_rows, log_p_rows = per_row
        moved = {}
        if kind.teacher_logits:
            moved["logits"] = exchange.to_student(
                logits_rows, counts, split_vocab=True, width=0, dtype=self.cache_dtype, device=device
            )
        if kind.teacher_log_p:
            rows = None if log_p_rows is None else [lp[:, None] for lp in log_p_rows]
            moved["log_p"] = exchange.to_student(
                rows, counts, split_vocab=False, width=1, dtype=torch.float32, device=device
            )
        if not any(v is not None for v in moved.values()):
            return  # not the student's last stage
        start = 0
        for batch in batches:
            rows = range(start, start + len(batch.tokens))
            start = rows.stop
            logits = [moved["logits"][r] for r in rows] if "logits" in moved else None
            log_p = [moved["log_p"][r][:, 0] for r in rows] if "log_p" in moved else None
            set_teacher_outputs(batch, logits, log_p)

    def _score_rows(
        self, kind: BatchKind, sequences: Tensor, masks: Tensor, size: int
    ) -> tuple[list[Tensor] | None, list[Tensor] | None] | None:
        """The teacher forward over its share of rows (``sequences`` [n, S + 1], ``masks`` [n, S]) in
        micro-batches of ``size`` rows; on the teacher's last stage, per row the logits at its loss
        positions [n_r, V/TP_t] (cache dtype) and/or log p [n_r]; None elsewhere."""
        rows = len(sequences)
        padding = -rows % size  # the pipeline needs micro-batches of one shape: fill with empty rows
        sequences = torch.cat((sequences, sequences.new_zeros(padding, sequences.shape[1])))
        masks = torch.cat((masks, masks.new_zeros(padding, masks.shape[1])))
        positions = torch.arange(masks.shape[1], device=masks.device).expand(size, -1)
        micro = [
            MicroBatch(
                tokens=sequences[i : i + size, :-1],
                labels=sequences[i : i + size, 1:],
                loss_mask=masks[i : i + size],
                position_ids=positions,
                kind=kind.name,
                logit_positions=logit_positions(masks[i : i + size]),
            )
            for i in range(0, len(sequences), size)
        ]
        outputs = forward_outputs(self.model, micro, self._outputs(kind), pg_collection=self.groups)
        if not outputs:
            return None
        counts = masks.sum(1).long().tolist()  # host-side: each row's positions
        logits = log_p = None
        if kind.teacher_logits:
            logits = list(torch.cat([out[0][0] for out in outputs]).split(counts))[:rows]
        if kind.teacher_log_p:
            log_p = list(torch.cat([out[1][0] for out in outputs]).split(counts))[:rows]
        return logits, log_p
