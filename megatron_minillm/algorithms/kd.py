"""Word-level knowledge distillation (Hinton et al. 2015; the paper's "KD" baseline): on the dataset's
responses, (1 - kd_ratio) CE + kd_ratio KL(p || q) per token. The same mix on pretraining text is
MiniLLM's L_PT (:func:`word_level_kd_loss`)."""

import torch.distributed as dist
from torch import Tensor

from megatron_minillm.algorithms.objective import BatchKind, Metrics, Objective, summed
from megatron_minillm.data.micro_batch import MicroBatch
from megatron_minillm.losses import forward_kl, token_log_probs


def word_level_kd_loss(
    batch: MicroBatch,
    logits: Tensor,
    kd_ratio: float,
    vocab_size: int,
    prefix: str = "",
    tp_group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, Metrics]:
    """(1 - kd_ratio) CE + kd_ratio KL(p || q), each term the step's token mean (LMOps ``get_distil_loss``
    and, on pretraining text with lm_coef, MiniLLM's L_PT of Eq. 7); metrics: ``lm loss``, ``kd loss``."""
    mask, labels = batch.pick(batch.loss_mask), batch.pick(batch.labels)
    teacher = batch.teacher_logits.to(logits.dtype)
    lm = summed(-token_log_probs(logits, labels, mask, vocab_size=vocab_size, tp_group=tp_group), batch)
    kd = summed(forward_kl(logits, teacher, mask, vocab_size=vocab_size, reduction="none", tp_group=tp_group), batch)
    loss = (1 - kd_ratio) * lm + kd_ratio * kd
    return loss, {f"{prefix}lm loss": lm.detach(), f"{prefix}kd loss": kd.detach()}


class KD(Objective):
    name = "kd"

    def batch_kinds(self) -> list[BatchKind]:
        return [BatchKind("kd", "dataset", logit_losses=2, teacher_logits=True)]

    def loss(self, batch: MicroBatch, logits: Tensor) -> tuple[Tensor, Metrics]:
        return word_level_kd_loss(batch, logits, self.cfg.kd.kd_ratio, self.vocab_size, tp_group=self.tp_group)
