"""Shared pieces of the parity tests: fixed micro-batches, the plain HF loss, logits comparison."""

import torch
from hf_zoo import VOCAB


def micro_batches(num: int, batch: int = 2, seq: int = 16, seed: int = 1, vocab: int = VOCAB) -> list:
    from megatron_minillm.data.micro_batch import MicroBatch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
        loss_mask = torch.ones(batch, seq)
        loss_mask[0, :3] = 0  # a prompt-like span that carries no loss
        out.append(
            MicroBatch(
                tokens=tokens[:, :-1],
                labels=tokens[:, 1:],
                loss_mask=loss_mask,
                position_ids=torch.arange(seq).expand(batch, seq),
                kind="lm",
            )
        )
    return out


def hf_loss(hf: torch.nn.Module, batches: list) -> torch.Tensor:
    """Mean over micro-batches of the token-mean CE, written plainly with HF logits."""
    losses = []
    for b in batches:
        logits = hf(b.tokens).logits
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), b.labels, reduction="none")
        losses.append((ce * b.loss_mask).sum() / b.loss_mask.sum())
    return torch.stack(losses).mean()


def lm_loss_func(vocab_size: int, seen: list | None = None):
    """A schedule loss function (masked LM loss) that can also keep the masked logits it saw."""
    from megatron_minillm.losses import masked_lm_loss
    from megatron_minillm.models import mask_padded_vocab

    def loss_func(batch, logits):
        if seen is not None:
            seen.append(mask_padded_vocab(logits.detach(), vocab_size))
        loss = masked_lm_loss(logits, batch.pick(batch.labels), batch.pick(batch.loss_mask), vocab_size)
        return loss, {"lm loss": loss.detach().clone()}

    return loss_func


def assert_logits_match_hf(
    model, batches: list, ref_logits: list[torch.Tensor], vocab_size: int, atol: float, what: str
) -> None:
    """Forward ``batches`` through the pipeline; on the last stage compare this TP rank's vocab
    slice with the HF logits, and check that padded entries are -inf."""
    from megatron.core import parallel_state

    from megatron_minillm.training import forward_backward

    seen: list[torch.Tensor] = []
    forward_backward(model, batches, lm_loss_func(vocab_size, seen), forward_only=True)
    if not parallel_state.is_pipeline_last_stage():
        return
    rank = parallel_state.get_tensor_model_parallel_rank()
    for got, ref in zip(seen, ref_logits, strict=True):
        start = rank * got.shape[-1]
        valid = max(0, min(vocab_size - start, got.shape[-1]))
        torch.testing.assert_close(
            got[..., :valid], ref[..., start : start + valid], atol=atol, rtol=atol, msg=lambda m: f"logits {what}: {m}"
        )
        assert torch.isneginf(got[..., valid:]).all(), "padded vocab must be -inf"
