"""Sequence parallelism: a student built with ``sequence_parallel=True`` trains and decodes as one
built without it.

One 4-rank gloo run walks the layouts below; at each, the same HF weights are loaded into a model
without and one with SP, and both give the same losses and gradients (through megatron's DDP and
``finalize_model_grads``, logits at picked positions and full logits) and the same KV-cache decoding
logits. The model without SP is checked against transformers in test_models.py.
"""

import torch
from harness import run_distributed
from hf_zoo import hf_model
from parity import lm_loss_func, micro_batches

# (family, TP, PP): tied and untied output layers, RMSNorm + RoPE (the embedding reduce-scatters
# under SP) and LayerNorm with biases + learned positions (it scatters), and the pipeline schedule
# whose p2p tensors are [s/TP, b, h] under SP.
LAYOUTS = [("llama_tied_rope_scaled", 4, 1), ("gpt2", 2, 1), ("llama", 2, 2)]
PROMPTS = [[5, 17, 99, 3, 42, 7], [201, 64, 11, 8]]  # decoded left-padded to one length


def _decode(model) -> list[torch.Tensor]:
    """Logits of a KV-cache prefill (every position) and two one-token steps; [] off the last stage."""
    from megatron_minillm.sampling.kv_cache import KVCacheDecoder

    width = max(map(len, PROMPTS))
    tokens = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    valid = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in PROMPTS])
    positions = (valid.cumsum(1) - 1).clamp(min=0)
    decoder = KVCacheDecoder(model, len(PROMPTS), width + 2)
    model.eval()  # as the sampler does
    with torch.no_grad():
        out = [decoder.forward(tokens, positions, valid, every_position=True)]
        for step in range(2):
            new = torch.tensor([[30 + step], [140 + step]])
            out.append(decoder.forward(new, positions[:, -1:] + 1 + step, torch.ones_like(new, dtype=torch.bool)))
    model.train()
    return [] if out[0] is None else [t.detach() for t in out]


def _train(ddp, batches: list, vocab_size: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses (last stage) and this rank's gradients of one forward/backward over ``batches``."""
    from megatron_minillm.training import forward_backward

    ddp.zero_grad_buffer()
    metrics = forward_backward(ddp, batches, lm_loss_func(vocab_size))
    grads = {name: p.main_grad.clone() for name, p in ddp.module.named_parameters()}
    return [float(m["lm loss"]) for m in metrics], grads


def _layout(family: str, tp: int, pp: int) -> None:
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig

    from megatron_minillm.checkpoint.hf_mapping import hf_to_mcore, load_full_tensors, strict_getter
    from megatron_minillm.data.micro_batch import logit_positions
    from megatron_minillm.models import architecture_from_dict, build_model
    from megatron_minillm.models.logits import decoder_output_only
    from megatron_minillm.training import setup_model_and_optimizer

    hf = hf_model(family)
    arch = architecture_from_dict(hf.config.to_dict())
    full = hf_to_mcore(arch, strict_getter(hf.state_dict(), "HF model"))
    full_logits = micro_batches(1)
    picked = [b.replace(logit_positions=logit_positions(b.loss_mask)) for b in full_logits]
    where = f"{family} at TP{tp}xPP{pp}"

    results = {}
    for sp in (False, True):
        model = build_model(arch, sequence_parallel=sp)
        load_full_tensors(model, full)
        assert model.config.sequence_parallel == sp
        decoded = _decode(model)
        if model.pre_process:  # after decoding (without SP) the model's output is sharded again
            batch = full_logits[0]
            with torch.no_grad(), decoder_output_only(model):
                hidden = model(batch.tokens, batch.position_ids, None)  # a stage's output [s/TP, b, h] under SP
            assert hidden.shape[0] == batch.tokens.shape[1] // (tp if sp else 1), f"{where}, SP={sp}: {hidden.shape}"

        ddp, _, _ = setup_model_and_optimizer(model, OptimizerConfig(lr=1e-3))
        results[sp] = decoded, _train(ddp, picked, arch.vocab_size), _train(ddp, full_logits, arch.vocab_size)

    (decoded, *trained), (decoded_sp, *trained_sp) = results[False], results[True]
    padding_only = parallel_state.get_tensor_model_parallel_rank() * model.vocab_size // tp >= arch.vocab_size
    for got, expected in zip(decoded_sp, decoded, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"decoding {where}: {m}")
    for how, (losses, grads), (losses_sp, grads_sp) in zip(("picked", "full"), trained, trained_sp, strict=True):
        assert len(losses) == (1 if model.post_process else 0)
        torch.testing.assert_close(losses_sp, losses, rtol=1e-5, atol=0, msg=lambda m: f"{how} loss {where}: {m}")
        assert grads_sp.keys() == grads.keys()
        for name, grad in grads.items():
            # A vocabulary slice of padding only (TP4 over 250 ids padded to 512) gets no gradient.
            vocab_slice = "word_embeddings" in name or "output_layer" in name
            assert grad.abs().sum() > 0 or padding_only and vocab_slice, f"{name}: no gradient {where}"
            torch.testing.assert_close(
                grads_sp[name], grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{how} grad of {name} {where}: {m}"
            )


def _sequence_parallel() -> list[str]:
    from megatron.core import parallel_state

    from megatron_minillm.parallel import init_distributed

    for family, tp, pp in LAYOUTS:
        init_distributed(tp=tp, pp=pp)
        _layout(family, tp, pp)
        parallel_state.destroy_model_parallel()
    return [f"{family} TP{tp}xPP{pp}" for family, tp, pp in LAYOUTS]


def test_sequence_parallel_trains_and_decodes_as_without_it():
    assert run_distributed(_sequence_parallel, 4) == [[f"{f} TP{t}xPP{p}" for f, t, p in LAYOUTS]] * 4
