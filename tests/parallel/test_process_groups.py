"""Explicit process groups are really used: losses, sampling primitives and a model on a TP x PP layout
of their own, over the same 4 ranks as megatron's global layout, whose TP groups are none of megatron's.

megatron's global layout is TP=2 x DP=2: TP groups {0, 1}, {2, 3}. The explicit layout is TP=2 x PP=2
with TP groups {0, 2}, {1, 3} and pipelines {0, 1}, {2, 3}. Ranks 1 and 2 hold another vocabulary
slice under the explicit TP group than under megatron's, and every TP collective has another partner,
so any function that read megatron's group instead of the one passed to it gives wrong numbers (the
test checks that the global group does give them). References are unsharded: plain torch on the full
vocabulary, the same sampler code on a group of one rank, and transformers for the model.
"""

import pytest
import torch
from harness import run_distributed
from hf_zoo import VOCAB, hf_model

PADDED = 256  # 250 ids padded for TP=2: the second slice ends in padding
TEMPERATURE = 0.7
PROMPTS = [[5, 17, 42, 99, 3], [7, 1]]
MAX_NEW = 4


def _groups() -> dict:
    """This rank's explicit groups; every rank creates every group, in the same order."""
    import torch.distributed as dist

    rank = dist.get_rank()
    tp = [dist.new_group([0, 2]), dist.new_group([1, 3])][rank % 2]
    pp = [dist.new_group([0, 1]), dist.new_group([2, 3])][rank // 2]
    alone = [dist.new_group([r]) for r in range(dist.get_world_size())][rank]
    return dict(tp=tp, pp=pp, alone=alone)


def _mine(full: torch.Tensor, tp_group) -> torch.Tensor:
    """This rank's slice [..., V/TP] of ``full`` under the explicit split, cut here with the group's own
    rank (not by the code under test, which must not decide what a rank holds)."""
    import torch.distributed as dist

    shard = full.shape[-1] // dist.get_world_size(tp_group)
    rank = dist.get_rank(tp_group)
    return full[..., rank * shard : (rank + 1) * shard]


def _check_losses(tp_group) -> None:
    """reverse_kl (value and gradient) and token_log_probs on this rank's slice of the explicit split
    equal plain torch on the full vocabulary; over megatron's TP group they do not."""
    import megatron_minillm.losses as L

    gen = torch.Generator().manual_seed(0)
    student, teacher = (torch.randn(2, 3, PADDED, generator=gen, dtype=torch.float64) * 3 for _ in range(2))
    ids = torch.randint(0, VOCAB, (2, 3), generator=gen)
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])

    full = student[..., :VOCAB].clone().requires_grad_()
    log_q = torch.log_softmax(full / TEMPERATURE, -1)
    log_p = torch.log_softmax(teacher[..., :VOCAB] / TEMPERATURE, -1)
    ref_kl = ((log_q.exp() * (log_q - log_p)).sum(-1) * mask).sum() / mask.sum()
    ref_kl.backward()
    ref_logp = log_q.gather(-1, ids[..., None])[..., 0].detach() * mask

    def losses(group):  # this rank's slice of the explicit split, the losses over ``group``
        shard = _mine(student, tp_group).clone().requires_grad_()
        kw = dict(temperature=TEMPERATURE, vocab_size=VOCAB, tp_group=group)
        kl = L.reverse_kl(shard, _mine(teacher, tp_group), mask, **kw)
        kl.backward()
        return kl, shard.grad, L.token_log_probs(shard, ids, mask, **kw)

    kl, grad, logp = losses(tp_group)
    torch.testing.assert_close(kl, ref_kl.detach(), atol=1e-10, rtol=1e-10)
    full_grad = torch.nn.functional.pad(full.grad, (0, PADDED - VOCAB))  # padding gets no gradient
    torch.testing.assert_close(grad, _mine(full_grad, tp_group), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(logp, ref_logp, atol=1e-10, rtol=1e-10)
    wrong_kl, _, wrong_logp = losses(None)  # megatron's global TP group
    assert not torch.allclose(wrong_kl, ref_kl) or not torch.allclose(wrong_logp, ref_logp)


def _check_sampling(tp_group, alone) -> None:
    """The vocab-parallel sampling primitives over the explicit split equal plain torch / the same code
    on the whole vocabulary (a group of one rank)."""
    import torch.distributed as dist

    from megatron_minillm.parallel.vocab import gather_ids, log_softmax
    from megatron_minillm.sampling import SamplingParams, sample_seeds
    from megatron_minillm.sampling.processors import draw, processed_log_probs
    from megatron_minillm.sampling.vocab_parallel import argmax, top_k_mask

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, PADDED, generator=gen) * 3
    logits[0, 77] = logits[0, 200] = logits[0].max() + 1  # a tie across the slices: the smallest id wins
    logits[1, :100] = float("-inf")
    shard = _mine(logits, tp_group)

    def gather(x: torch.Tensor) -> torch.Tensor:  # [b, V/TP] -> [b, V] over the explicit split
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(tp_group))]
        dist.all_gather(parts, x.contiguous(), group=tp_group)
        return torch.cat(parts, -1)

    torch.testing.assert_close(gather(log_softmax(shard, tp_group)), torch.log_softmax(logits, -1))
    assert torch.equal(argmax(shard, tp_group), logits.argmax(-1))
    kth = logits.topk(5, -1).values[:, -1:]
    assert torch.equal(gather(top_k_mask(shard, 5, tp_group)), logits.masked_fill(logits < kth, float("-inf")))
    ids = torch.tensor([3, 250, 130, 77])
    assert torch.equal(gather_ids(shard, ids, tp_group), logits.gather(-1, ids[:, None])[:, 0])

    params = SamplingParams(max_new_tokens=1, temperature=1.3, top_k=50, top_p=0.8)
    banned = [[10], [], [128, 129], []]  # ids on either side of the split
    got = processed_log_probs(shard, params, VOCAB, banned, tp_group)  # bans, padding, top-k, top-p
    expected = processed_log_probs(logits, params, VOCAB, banned, alone)
    torch.testing.assert_close(gather(got), expected, atol=1e-6, rtol=1e-6)
    seeds = sample_seeds(3, torch.arange(4))
    assert torch.equal(draw(got, seeds, 0, False, tp_group), draw(expected, seeds, 0, False, alone))
    wrong = log_softmax(shard, None)  # megatron's global TP group
    assert not torch.allclose(gather(wrong), torch.log_softmax(logits, -1))


def _check_model(groups: dict) -> None:
    """A LLaMA built with an explicit pg_collection (TP=2 x PP=2) gives transformers' logits on its
    vocabulary slice and decodes greedily the tokens and log-probabilities transformers does."""
    import torch.distributed as dist
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_minillm.checkpoint.hf_mapping import hf_to_mcore, load_full_tensors, strict_getter
    from megatron_minillm.models import architecture_from_dict, build_model
    from megatron_minillm.sampling import GenerationError, SamplingParams, generate, sample_seeds
    from megatron_minillm.sampling.kv_cache import KVCacheDecoder

    hf = hf_model("llama")
    with torch.no_grad():
        hf.get_output_embeddings().weight.mul_(4.0)  # peaked: greedy argmaxes far from ties
    arch = architecture_from_dict(hf.config.to_dict())
    collection = ProcessGroupCollection(tp=groups["tp"], pp=groups["pp"], cp=groups["alone"], embd=None)
    model = build_model(arch, pg_collection=collection)
    load_full_tensors(model, hf_to_mcore(arch, strict_getter(hf.state_dict(), "HF model")))
    assert model.pg_collection is collection and len(model.decoder.layers) == arch.num_layers // 2

    prompt = torch.tensor([PROMPTS[0]])
    decoder = KVCacheDecoder(model, 1, len(PROMPTS[0]))
    logits = decoder.forward(prompt, torch.arange(prompt.shape[1])[None], torch.ones_like(prompt, dtype=torch.bool))
    assert (logits is not None) == (dist.get_rank(groups["pp"]) == 1)
    if logits is not None:
        with torch.no_grad():  # padded vocabulary rows of the output layer are zeros: logits 0
            ref = torch.nn.functional.pad(hf(prompt).logits[:, -1], (0, PADDED - VOCAB))
        torch.testing.assert_close(logits, _mine(ref, groups["tp"]), atol=1e-5, rtol=1e-5)

    params, seeds = SamplingParams(max_new_tokens=MAX_NEW, greedy=True), sample_seeds(0, torch.arange(2))
    rollout = generate(model, PROMPTS, params, seeds, vocab_size=VOCAB)
    for row, prompt in enumerate(PROMPTS):
        ids = torch.tensor([prompt])
        expected = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0
        )[0]
        assert rollout.tokens[row].tolist() == expected[len(prompt) :].tolist(), f"greedy tokens of prompt {row}"
        with torch.no_grad():
            ref_logp = hf(expected[None, :-1]).logits[0, len(prompt) - 1 :].log_softmax(-1)
        ref = ref_logp.gather(-1, expected[len(prompt) :, None])[:, 0]
        torch.testing.assert_close(rollout.log_q[row], ref, atol=1e-5, rtol=1e-5)

    on_global_groups = build_model(arch)  # megatron's TP=2 x PP=1: no token can be drawn from both
    with pytest.raises(GenerationError, match="another TP x PP layout"):
        generate(model, PROMPTS, params, seeds, vocab_size=VOCAB, teacher=on_global_groups)


def _explicit_groups() -> str:
    from megatron_minillm.parallel import init_distributed

    init_distributed(tp=2)  # megatron's global layout: TP {0, 1}, {2, 3}
    groups = _groups()
    _check_losses(groups["tp"])
    _check_sampling(groups["tp"], groups["alone"])
    _check_model(groups)
    return "ok"


def test_explicit_groups_are_used_by_losses_sampling_and_models():
    assert run_distributed(_explicit_groups, 4) == ["ok"] * 4
