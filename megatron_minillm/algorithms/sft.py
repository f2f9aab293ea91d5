"""Supervised fine-tuning (the paper's "SFT w/o KD") and sequence-level KD (Kim & Rush 2016,
"SeqKD": SFT on the teacher's own samples, drawn once per example): the token-mean LM loss."""

from torch import Tensor

from megatron_minillm.algorithms.objective import BatchKind, Metrics, Objective, summed
from megatron_minillm.data.micro_batch import MicroBatch
from megatron_minillm.losses import token_log_probs


class SFT(Objective):
    name = "sft"

    def batch_kinds(self) -> list[BatchKind]:
        return [BatchKind(self.name, "dataset", logit_losses=1)]

    def loss(self, batch: MicroBatch, logits: Tensor) -> tuple[Tensor, Metrics]:
        labels, mask = batch.pick(batch.labels), batch.pick(batch.loss_mask)
        lm = summed(-token_log_probs(logits, labels, mask, vocab_size=self.vocab_size, tp_group=self.tp_group), batch)
        return lm, {"lm loss": lm.detach()}


class SeqKD(SFT):
    name = "seqkd"
    samples = "teacher"

    def batch_kinds(self) -> list[BatchKind]:
        return [BatchKind(self.name, "sampled", logit_losses=1)]
