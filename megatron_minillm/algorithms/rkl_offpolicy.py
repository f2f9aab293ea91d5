"""Off-policy reverse KL: KL(q || p) over the full vocabulary at the dataset's response positions
(the single-step term of MiniLLM without its on-policy samples; an ablation baseline)."""

from torch import Tensor

from megatron_minillm.algorithms.objective import BatchKind, Metrics, Objective, summed
from megatron_minillm.data.micro_batch import MicroBatch
from megatron_minillm.losses import reverse_kl


class ReverseKLOffPolicy(Objective):
    name = "rkl_offpolicy"

    def batch_kinds(self) -> list[BatchKind]:
        return [BatchKind(self.name, "dataset", logit_losses=1, teacher_logits=True)]

    def loss(self, batch: MicroBatch, logits: Tensor) -> tuple[Tensor, Metrics]:
        teacher = batch.teacher_logits.to(logits.dtype)
        mask = batch.pick(batch.loss_mask)
        per_token = reverse_kl(
            logits, teacher, mask, vocab_size=self.vocab_size, reduction="none", tp_group=self.tp_group
        )
        rkl = summed(per_token, batch)
        return rkl, {"rkl loss": rkl.detach()}
