"""Rows between two models' layouts on the same ranks: the student's TP_s x PP_s x DP_s and a
teacher's TP_t x PP_t x DP_t.

The student's DP groups each hold B rows (sequences, or one decoding step of them); all DP_s * B
rows of the world, in DP order, are the *global rows*. The teacher's DP group e serves a contiguous
share of them (``torch.tensor_split`` over DP_t). Two moves connect the layouts:

* :meth:`LayoutExchange.gather_rows`: every rank gets the global rows (token ids: small) from one
  representative of each student DP group, so each teacher DP group can take its share;
* :meth:`LayoutExchange.to_student`: per-row results on the teacher's last pipeline stage go to the
  student's last stage of the row's DP group, and a vocabulary split over TP_t arrives split over
  TP_s: each (teacher rank, student rank) pair exchanges only the columns both hold, in one message
  of all its rows. Per-token statistics (replicated over the teacher's TP ranks) go from the
  teacher's first TP rank to every student TP rank.

Messages are point-to-point over the default group (``batch_isend_irecv``: NCCL and gloo); a rank
that is both ends of a pair copies locally.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_minillm.parallel.initialize import LayoutError, ParallelLayout


@dataclass(frozen=True)
class _Span:
    """A run of columns one rank sends another: [src_start, src_start + width) of the sender's
    slice lands at [dst_start, dst_start + width) of the receiver's."""

    src_start: int
    dst_start: int
    width: int


class LayoutExchange:
    """Moves rows from the student's layout to a teacher's and results back (see the module doc)."""

    def __init__(self, student: ParallelLayout, teacher: ParallelLayout, padded_vocab: int) -> None:
        if student.world_size != teacher.world_size:
            raise LayoutError(f"student on {student.world_size} ranks, teacher on {teacher.world_size}")
        for name, layout in (("student", student), ("teacher", teacher)):
            if padded_vocab % layout.tp:
                raise LayoutError(
                    f"the padded vocabulary ({padded_vocab}) is not divisible by the {name}'s TP={layout.tp}; "
                    "re-convert both models with a --make-vocab-size-divisible-by that both TPs divide"
                )
        self.student, self.teacher, self.padded_vocab = student, teacher, padded_vocab
        self.rank = dist.get_rank()

    def gather_rows(self, local: Tensor) -> Tensor:
        """The global rows [DP_s * B, ...] from each student DP group's ``local`` [B, ...] (equal on
        the ranks of a group, the same shape on every rank). Collective over the world."""
        parts = [torch.empty_like(local) for _ in range(self.student.world_size)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat([parts[self.student.rank_of(0, 0, d)] for d in range(self.student.dp)])

    def _teacher_bounds(self, num_rows: int) -> list[int]:
        """Row boundaries of the teacher DP groups' shares: group e serves [bounds[e], bounds[e + 1])."""
        per_group, extra = divmod(num_rows, self.teacher.dp)  # the first ``extra`` groups serve one more
        return [e * per_group + min(e, extra) for e in range(self.teacher.dp + 1)]

    def teacher_rows(self, num_rows: int) -> range:
        """The global rows this rank's teacher DP group serves, of ``num_rows``."""
        bounds = self._teacher_bounds(num_rows)
        dp_rank = self.teacher.coords(self.rank)[2]
        return range(bounds[dp_rank], bounds[dp_rank + 1])

    def student_rows(self, num_rows: int) -> range:
        """The global rows this rank's student DP group holds, of ``num_rows``."""
        per_group = num_rows // self.student.dp
        dp_rank = self.student.coords(self.rank)[2]
        return range(dp_rank * per_group, (dp_rank + 1) * per_group)

    def _spans(self, src_tp: int, dst_tp: int, split_vocab: bool, width: int) -> _Span | None:
        """The columns teacher TP rank ``src_tp`` sends student TP rank ``dst_tp`` (None: nothing)."""
        if not split_vocab:
            return _Span(0, 0, width) if src_tp == 0 else None
        w_t, w_s = self.padded_vocab // self.teacher.tp, self.padded_vocab // self.student.tp
        lo, hi = max(src_tp * w_t, dst_tp * w_s), min((src_tp + 1) * w_t, (dst_tp + 1) * w_s)
        return _Span(lo - src_tp * w_t, lo - dst_tp * w_s, hi - lo) if hi > lo else None

    def to_student(
        self,
        rows: list[Tensor] | None,
        counts: list[int],
        *,
        split_vocab: bool,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> list[Tensor] | None:
        """Per-row results from the teacher's last stage to the student's last stage.

        ``counts[g]``: the number of positions of global row g (known on every rank). ``rows``: on
        the teacher's last stage, the results [counts[g], width_t] of this teacher DP group's rows
        (vocabulary slices of the teacher's split when ``split_vocab``, else ``width`` columns of
        per-token statistics, equal on the teacher's TP ranks); ignored elsewhere. Returns, on the
        student's last stage, the rows of its DP group as [counts[g], V/TP_s] (or [counts[g],
        width]); None elsewhere. Collective over the world.
        """
        bounds = self._teacher_bounds(len(counts))
        per_group = len(counts) // self.student.dp
        out_width = self.padded_vocab // self.student.tp if split_vocab else width
        s_tp, s_pp, s_dp = self.student.coords(self.rank)
        t_tp, t_pp, t_dp = self.teacher.coords(self.rank)
        receiving = s_pp == self.student.pp - 1
        sending = t_pp == self.teacher.pp - 1
        mine = range(bounds[t_dp], bounds[t_dp + 1])
        out = None
        if receiving:
            out = [
                torch.empty(counts[g], out_width, dtype=dtype, device=device) for g in self.student_rows(len(counts))
            ]

        def pair_rows(src_dp: int, dst_dp: int) -> range:
            lo, hi = max(bounds[src_dp], dst_dp * per_group), min(bounds[src_dp + 1], (dst_dp + 1) * per_group)
            return range(lo, max(lo, hi))

        sends, recvs, local = [], [], []
        if sending:  # to every student last-stage rank whose rows this teacher DP group serves
            for d in range(self.student.dp):
                for b in range(self.student.tp):
                    span, shared = self._spans(t_tp, b, split_vocab, width), pair_rows(t_dp, d)
                    if span is None or not len(shared):
                        continue
                    parts = [rows[g - mine.start][:, span.src_start : span.src_start + span.width] for g in shared]
                    dst = self.student.rank_of(b, self.student.pp - 1, d)
                    message = torch.cat([p.reshape(-1) for p in parts]).to(dtype)
                    if message.numel():  # the receiver skips an empty message too: same counts
                        (local if dst == self.rank else sends).append((dst, message))
        if receiving:  # from every teacher last-stage rank serving rows of this student DP group
            for e in range(self.teacher.dp):
                for a in range(self.teacher.tp):
                    span, shared = self._spans(a, s_tp, split_vocab, width), pair_rows(e, s_dp)
                    if span is None or not len(shared):
                        continue
                    src = self.teacher.rank_of(a, self.teacher.pp - 1, e)
                    size = sum(counts[g] for g in shared) * span.width
                    if not size:
                        continue
                    buffer = torch.empty(size, dtype=dtype, device=device)
                    recvs.append((src, buffer, span, shared))
        ops = [dist.P2POp(dist.isend, message, dst) for dst, message in sends]
        ops += [dist.P2POp(dist.irecv, buffer, src) for src, buffer, _, _ in recvs if src != self.rank]
        for request in dist.batch_isend_irecv(ops) if ops else []:
            request.wait()
        local_messages = iter(message for _, message in local)
        first = self.student_rows(len(counts)).start
        for src, buffer, span, shared in recvs:
            data = next(local_messages) if src == self.rank else buffer
            offset = 0
            for g in shared:
                n = counts[g] * span.width
                out[g - first][:, span.dst_start : span.dst_start + span.width] = data[offset : offset + n].view(
                    counts[g], span.width
                )
                offset += n
        return out
