"""A teacher on its own TP x PP x DP layout, as the sampler sees it: a decoder whose logits arrive
in the student's layout.

Teacher-mixed sampling draws each token from p~ = alpha * p + (1 - alpha) * q on the student's
vocabulary slices, so p must be where q is. :class:`CrossLayoutDecoder` has the interface of
:class:`~megatron_minillm.sampling.kv_cache.KVCacheDecoder`: each step every rank hands it its
student DP group's inputs; the teacher's DP groups decode their shares of all student DP groups'
rows in one KV cache each, and the logits go back to each row's student last stage, re-split from
V/TP_t to V/TP_s (``parallel.exchange``). All student DP groups therefore step in lockstep: the
samplers end when every row of the world is done (:func:`all_done`).
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel
from megatron.core.utils import unwrap_model
from torch import Tensor

from megatron_minillm.parallel.exchange import LayoutExchange
from megatron_minillm.sampling.kv_cache import KVCacheDecoder


@dataclass
class CrossLayoutTeacher:
    """A teacher model built on its own process groups and the exchange to the student's layout."""

    model: torch.nn.Module
    exchange: LayoutExchange


class CrossLayoutDecoder:
    """The teacher's incremental decoding for the student's rows (see the module doc)."""

    lockstep = True  # the samplers stop when every rank's rows are done (``all_done``)

    def __init__(self, teacher: CrossLayoutTeacher, student: KVCacheDecoder, max_length: int) -> None:
        self.model: GPTModel = unwrap_model(teacher.model)
        self.exchange = teacher.exchange
        # The logits arrive in the student's layout: its vocabulary split and its last stage.
        self.tp_group, self.pp_group = student.tp_group, student.pp_group
        self.is_last, self.device = student.is_last, student.device
        self.num_rows = student.context.max_batch_size * self.exchange.student.dp
        self.rows = self.exchange.teacher_rows(self.num_rows)
        self.max_length = max_length
        self.decoder: KVCacheDecoder | None = None  # built at the prefill, for the widest prompt batch
        self.dtype = next(self.model.parameters()).dtype

    def _mine(self, local: Tensor) -> Tensor:
        """This teacher DP group's rows of every student DP group's ``local`` [B, ...]."""
        return self.exchange.gather_rows(local)[self.rows.start : self.rows.stop]

    def forward(
        self, tokens: Tensor, position_ids: Tensor, valid: Tensor, every_position: bool = False
    ) -> Tensor | None:
        """As :meth:`KVCacheDecoder.forward` for this student DP group's rows (collective over the world)."""
        new = tokens.shape[1]
        width = new
        if self.decoder is None:  # the prefill: left-pad every DP group's prompts to the widest
            widest = torch.tensor([new], device=self.device)
            dist.all_reduce(widest, dist.ReduceOp.MAX)
            width = int(widest)
            pad = width - new
            tokens, position_ids = (torch.nn.functional.pad(t, (pad, 0)) for t in (tokens, position_ids))
            valid = torch.nn.functional.pad(valid, (pad, 0), value=False)
            if len(self.rows):
                self.decoder = KVCacheDecoder(self.model, len(self.rows), self.max_length + pad)
        packed = self._mine(torch.cat((tokens, position_ids, valid.long()), dim=1))  # [b_e, 3 * width]
        logits = None
        if len(self.rows):
            mine_tokens, mine_positions, mine_valid = packed.split(width, dim=1)
            logits = self.decoder.forward(mine_tokens, mine_positions, mine_valid.bool(), every_position)
        positions = new if every_position else 1
        rows = None
        if logits is not None:  # the teacher's last stage: [b_e, V/TP_t] or [b_e, s, V/TP_t]
            rows = list(logits[:, -positions:] if every_position else logits[:, None])
        moved = self.exchange.to_student(
            rows,
            [positions] * self.num_rows,
            split_vocab=True,
            width=0,
            dtype=self.dtype,
            device=self.device,
        )
        if moved is None:
            return None
        out = torch.stack(moved)  # [B, positions, V/TP_s]
        return out if every_position else out[:, 0]

    def drop(self, keep: Tensor) -> None:
        """As :meth:`KVCacheDecoder.drop`, for the teacher's rows (collective over the world)."""
        mine = self._mine(keep.long()).bool()
        if self.decoder is not None:
            self.decoder.drop(mine)


def decoders_for(modules: list, batch_size: int, max_length: int) -> list:
    """The samplers' decoders: the student's, and the teacher's on the student's layout (a model) or
    on its own (a :class:`CrossLayoutTeacher`)."""
    student = KVCacheDecoder(modules[0], batch_size, max_length)
    decoders: list = [student]
    for teacher in modules[1:]:
        if isinstance(teacher, CrossLayoutTeacher):
            decoders.append(CrossLayoutDecoder(teacher, student, max_length))
        else:
            decoders.append(KVCacheDecoder(teacher, batch_size, max_length))
    return decoders


def all_done(done: Tensor, decoders: list) -> bool:
    """Whether every row is done: this batch's, and with a cross-layout teacher every rank's (the
    teacher serves all DP groups in one forward, so none may stop early)."""
    flag = done.all().to(torch.int32)
    if any(getattr(d, "lockstep", False) for d in decoders):
        dist.all_reduce(flag, dist.ReduceOp.MIN)
    return bool(flag)
