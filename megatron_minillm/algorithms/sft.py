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
        nll = -token_log_probs(
            logits, batch.pick(batch.labels), batch.pick(batch.loss_mask), vocab_size=self.vocab_size
        )
        lm = summed(nll, batch)
        return lm, {"lm loss": lm.detach()}


class SeqKD(SFT):
    name = "seqkd"
    samples = "teacher"

    def batch_kinds(self) -> list[BatchKind]:
        return [BatchKind(self.name, "sampled", logit_losses=1)]
