"""Model parity: megatron GPTModel at TP/PP layouts vs Hugging Face transformers on the same weights.

One 4-rank gloo run per family walks the layouts TP1, TP2, PP2 and TP2 x PP2 and checks logits and
gradients against the HF model (the oracle), so importing megatron is paid once per family.
"""

import pytest
import torch
from harness import run_distributed
from hf_zoo import VOCAB, hf_model

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
FAMILIES = ["llama", "llama_tied_rope_scaled", "opt", "gpt2"]


def _micro_batches(num: int, batch: int = 2, seq: int = 16, seed: int = 1) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        tokens = torch.randint(0, VOCAB, (batch, seq + 1), generator=gen)
        loss_mask = torch.ones(batch, seq)
        loss_mask[0, :3] = 0  # a prompt-like span that carries no loss
        out.append(
            {
                "tokens": tokens[:, :-1],
                "labels": tokens[:, 1:],
                "loss_mask": loss_mask,
                "position_ids": torch.arange(seq).expand(batch, seq),
            }
        )
    return out


def _hf_loss(hf: torch.nn.Module, batches: list[dict]) -> torch.Tensor:
    """Mean over micro-batches of the token-mean CE, written plainly with HF logits."""
    losses = []
    for b in batches:
        logits = hf(b["tokens"]).logits
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), b["labels"], reduction="none")
        losses.append((ce * b["loss_mask"]).sum() / b["loss_mask"].sum())
    return torch.stack(losses).mean()


def _parity(family: str) -> list[str]:
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig

    from megatron_minillm.checkpoint.hf_mapping import (
        hf_to_mcore,
        load_full_tensors,
        local_full_names,
        shard_tensor,
        strict_getter,
    )
    from megatron_minillm.losses import masked_lm_loss
    from megatron_minillm.models import architecture_from_dict, build_model, mask_padded_vocab
    from megatron_minillm.parallel import init_distributed
    from megatron_minillm.training import forward_backward, setup_model_and_optimizer

    hf = hf_model(family)
    arch = architecture_from_dict(hf.config.to_dict())
    full = hf_to_mcore(arch, strict_getter(hf.state_dict(), "HF model"))
    batches = _micro_batches(2)
    ref_logits = [hf(b["tokens"]).logits.detach() for b in batches]
    hf.zero_grad()
    _hf_loss(hf, batches).backward()
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    full_grads = hf_to_mcore(arch, strict_getter(hf_grads, "HF grads"))

    checked = []
    for tp, pp in LAYOUTS:
        init_distributed(tp=tp, pp=pp)
        model = build_model(arch)
        load_full_tensors(model, strict_getter(full, "converted HF weights"))

        seen: list[torch.Tensor] = []

        def loss_func(batch, logits):
            seen.append(mask_padded_vocab(logits.detach(), arch.vocab_size))
            loss = masked_lm_loss(logits, batch["labels"], batch["loss_mask"], arch.vocab_size)
            return loss, {"lm loss": loss.detach().clone()}

        # Logits, forward only.
        forward_backward(model, batches, loss_func, forward_only=True)
        if parallel_state.is_pipeline_last_stage():
            rank = parallel_state.get_tensor_model_parallel_rank()
            for got, ref in zip(seen, ref_logits):
                shard = got.shape[-1]
                start = rank * shard
                valid = max(0, min(VOCAB - start, shard))
                torch.testing.assert_close(got[..., :valid], ref[..., start : start + valid],
                                           atol=1e-5, rtol=1e-5,
                                           msg=lambda m: f"logits at TP{tp}xPP{pp}: {m}")  # fmt: skip
                assert torch.isneginf(got[..., valid:]).all(), "padded vocab must be -inf"

        # Gradients through DDP + finalize_model_grads (DP all-reduce, tied-embedding all-reduce).
        ddp, _, _ = setup_model_and_optimizer(model, OptimizerConfig(lr=1e-3))
        ddp.zero_grad_buffer()
        forward_backward(ddp, batches, loss_func)
        params = dict(model.named_parameters())
        for name, full_name in local_full_names(model).items():
            expected = shard_tensor(full_grads[full_name], params[name], full_name,
                                    model.config.gated_linear_unit)  # fmt: skip
            torch.testing.assert_close(params[name].main_grad, expected, atol=2e-6, rtol=1e-4,
                                       msg=lambda m: f"grad of {name} at TP{tp}xPP{pp}: {m}")  # fmt: skip
        checked.append(f"TP{tp}xPP{pp}")
        parallel_state.destroy_model_parallel()
    return checked


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_grads_match_transformers_at_every_layout(family):
    results = run_distributed(_parity, 4, family)
    assert results == [[f"TP{t}xPP{p}" for t, p in LAYOUTS]] * 4
