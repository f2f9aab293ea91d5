"""Model parity: megatron GPTModel at TP/PP layouts vs Hugging Face transformers on the same weights.

One 4-rank gloo run per family walks the layouts TP1, TP2, PP2 and TP2 x PP2 and checks logits and
gradients against the HF model (the oracle), so importing megatron is paid once per family.
"""

import pytest
import torch
from harness import run_distributed
from hf_zoo import hf_model
from parity import assert_logits_match_hf, hf_loss, lm_loss_func, micro_batches

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
FAMILIES = ["llama", "llama_tied_rope_scaled", "opt", "gpt2"]


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
    from megatron_minillm.models import architecture_from_dict, build_model
    from megatron_minillm.parallel import init_distributed
    from megatron_minillm.training import forward_backward, setup_model_and_optimizer

    hf = hf_model(family)
    arch = architecture_from_dict(hf.config.to_dict())
    full = hf_to_mcore(arch, strict_getter(hf.state_dict(), "HF model"))
    batches = micro_batches(2)
    ref_logits = [hf(b.tokens).logits.detach() for b in batches]
    hf.zero_grad()
    hf_loss(hf, batches).backward()
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    full_grads = hf_to_mcore(arch, strict_getter(hf_grads, "HF grads"))

    checked = []
    for tp, pp in LAYOUTS:
        init_distributed(tp=tp, pp=pp)
        model = build_model(arch)
        load_full_tensors(model, full)

        assert_logits_match_hf(model, batches, ref_logits, arch.vocab_size, atol=1e-5, what=f"at TP{tp}xPP{pp}")

        # Gradients through DDP + finalize_model_grads (DP all-reduce, tied-embedding all-reduce).
        ddp, _, _ = setup_model_and_optimizer(model, OptimizerConfig(lr=1e-3))
        ddp.zero_grad_buffer()
        forward_backward(ddp, batches, lm_loss_func(arch.vocab_size))
        params = dict(model.named_parameters())
        for name, full_name in local_full_names(model).items():
            expected = shard_tensor(full_grads[full_name], params[name], full_name, model.config.gated_linear_unit)
            torch.testing.assert_close(
                params[name].main_grad,
                expected,
                atol=2e-6,
                rtol=1e-4,
                msg=lambda m: f"grad of {name} at TP{tp}xPP{pp}: {m}",
            )
        checked.append(f"TP{tp}xPP{pp}")
        parallel_state.destroy_model_parallel()
    return checked


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_grads_match_transformers_at_every_layout(family):
    results = run_distributed(_parity, 4, family)
    assert results == [[f"TP{t}xPP{p}" for t, p in LAYOUTS]] * 4
