"""Megatron DDP + optimizer on CPU/gloo: a few steps equal an unsharded HF + torch.optim.AdamW run;
logits computed only at the loss positions give the same losses and gradients as full logits."""

import pytest
import torch
from harness import run_distributed
from hf_zoo import hf_model
from parity import hf_loss, lm_loss_func, micro_batches

STEPS = 4
LR, BETAS, EPS, WD, CLIP = 1e-3, (0.9, 0.95), 1e-8, 0.1, 1.0
# (tp, pp, use_distributed_optimizer, overlap_grad_reduce, dtype, logits at the loss positions only)
RUNS = [
    (2, 1, True, False, "fp32", False),
    (1, 2, False, True, "fp32", True),
    (2, 2, True, True, "fp32", True),
    (2, 1, True, False, "bf16", False),
]
# fp32 must match the unsharded run to rounding; bf16 params (fp32 main params and grads) only closely.
TOLERANCE = {"fp32": dict(atol=2e-6, rtol=1e-5), "bf16": dict(atol=0.0, rtol=1e-2)}


def _reference_losses(family: str, per_step: list[list[dict]]) -> list[float]:
    """TP1 x DP1 oracle: the HF model, AdamW without decay on biases/norms, clipping at 1.0."""
    hf = hf_model(family)
    params = list(hf.named_parameters())
    groups = [
        {"params": [p for n, p in params if p.dim() > 1], "weight_decay": WD},
        {"params": [p for n, p in params if p.dim() <= 1], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)
    losses = []
    for batches in per_step:
        opt.zero_grad()
        loss = hf_loss(hf, batches)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), CLIP)
        opt.step()
        losses.append(loss.item())
    return losses


def _train(family: str) -> list[list[float]]:
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from megatron_minillm.checkpoint.hf_mapping import hf_to_mcore, load_full_tensors, strict_getter
    from megatron_minillm.data.micro_batch import logit_positions
    from megatron_minillm.models import architecture_from_dict, build_model
    from megatron_minillm.parallel import init_distributed
    from megatron_minillm.training import setup_model_and_optimizer, train_step

    hf = hf_model(family)
    arch = architecture_from_dict(hf.config.to_dict())
    full = hf_to_mcore(arch, strict_getter(hf.state_dict(), "HF model"))
    # The same 4 micro-batches every step (so the loss must fall); each DP rank takes its share.
    per_step = [micro_batches(4, seed=100)] * STEPS
    expected = _reference_losses(family, per_step)

    results = []
    for tp, pp, dist_opt, overlap, dtype, at_positions in RUNS:
        layout = init_distributed(tp=tp, pp=pp)
        model = build_model(arch, dtype=dtype)
        load_full_tensors(model, full)
        ddp, optimizer, scheduler = setup_model_and_optimizer(
            model,
            OptimizerConfig(
                lr=LR,
                adam_beta1=BETAS[0],
                adam_beta2=BETAS[1],
                adam_eps=EPS,
                weight_decay=WD,
                clip_grad=CLIP,
                use_distributed_optimizer=dist_opt,
                bf16=dtype == "bf16",
                params_dtype=model.config.params_dtype,
            ),
            DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=overlap),
        )
        dp_rank = parallel_state.get_data_parallel_rank()
        losses = []
        for batches in per_step:
            mine = batches[dp_rank :: layout.dp]
            if at_positions:
                mine = [b.replace(logit_positions=logit_positions(b.loss_mask)) for b in mine]
            metrics, _ = train_step(ddp, optimizer, scheduler, mine, lm_loss_func(arch.vocab_size))
            local = torch.tensor([sum(m["lm loss"].item() for m in metrics) / len(mine) if metrics else 0.0])
            # Mean over DP of the last stage's losses (other stages report nothing).
            torch.distributed.all_reduce(local, group=parallel_state.get_data_parallel_group())
            src = parallel_state.get_pipeline_model_parallel_last_rank()
            torch.distributed.broadcast(local, src, group=parallel_state.get_pipeline_model_parallel_group())
            losses.append(local.item() / layout.dp)
        torch.testing.assert_close(
            torch.tensor(losses),
            torch.tensor(expected),
            **TOLERANCE[dtype],
            msg=lambda m: (
                f"TP{tp} PP{pp} distopt={dist_opt} {dtype} at positions {at_positions}: {losses} vs {expected}: {m}"
            ),
        )
        results.append(losses)
        if (tp, pp) == (2, 2):
            _nan_loss_stops_before_the_step(ddp, optimizer, scheduler, per_step[0], arch.vocab_size)
        parallel_state.destroy_model_parallel()
    return results


def _nan_loss_stops_before_the_step(ddp, optimizer, scheduler, batches, vocab_size: int) -> None:
    """A NaN loss (on the last stage only) stops every rank before the optimizer changes anything."""
    from megatron_minillm.training import NonFiniteLossError, train_step

    before = [p.detach().clone() for p in ddp.module.parameters()]

    def nan_loss(batch, logits):
        loss, _ = lm_loss_func(vocab_size)(batch, logits)
        return loss * float("nan"), {"lm loss": loss.detach() * float("nan")}

    with pytest.raises(NonFiniteLossError, match="iteration 7: non-finite .*stopping before the optimizer step"):
        train_step(ddp, optimizer, scheduler, batches, nan_loss, where="iteration 7")
    assert all(torch.equal(a, b) for a, b in zip(before, ddp.module.parameters()))


def test_optimizer_steps_match_unsharded_adamw():
    results = run_distributed(_train, 4, "llama")
    for losses in results[0]:
        assert losses[-1] < losses[0], "the loss should go down over the steps"


def _objective_losses_at_positions() -> None:
    """Every objective's loss on every batch kind: compact logits [1, n, V/TP] with picked per-token
    tensors give the loss, metrics and logit gradients of the full [b, s, V/TP] logits (TP=2: vocab slices)."""
    from megatron.core import parallel_state

    from megatron_minillm.algorithms import OBJECTIVES
    from megatron_minillm.config import TrainConfig
    from megatron_minillm.data.micro_batch import MicroBatch, logit_positions
    from megatron_minillm.parallel import init_distributed

    init_distributed(tp=2, pp=1)
    rank, vocab, padded, (b, s) = parallel_state.get_tensor_model_parallel_rank(), 50, 64, (3, 10)
    gen = torch.Generator().manual_seed(5)
    student, teacher = torch.randn(2, b, s, padded, generator=gen).split(padded // 2, dim=-1)[rank].unbind(0)
    mask = torch.zeros(b, s)
    for row, (start, end) in enumerate(((2, 9), (0, 4), (5, 10))):
        mask[row, start:end] = 1
    per_token = {
        name: torch.rand(b, s, generator=gen) * mask for name in ("log_q_old", "importance_weight", "advantages")
    }
    per_token["log_q_old"] = per_token["log_q_old"].log()
    tokens, labels = torch.randint(0, vocab, (2, b, s), generator=gen)
    positions = logit_positions(mask)
    full = MicroBatch(tokens, labels, mask, torch.arange(s).expand(b, s), "", loss_scale=0.37, **per_token)
    assert torch.equal(
        full.replace(logit_positions=positions).scatter(labels.flatten()[positions][None]), labels * mask.long()
    )
    seen = set()
    for name, objective_class in OBJECTIVES.items():
        objective = objective_class(TrainConfig(algorithm=name, teacher="t"), vocab_size=vocab, pt_data=True)
        for kind in objective.batch_kinds():
            seen.add(kind.name)
            full_logits = student.clone().requires_grad_()
            loss, metrics = objective.loss(full.replace(kind=kind.name, teacher_logits=teacher), full_logits)
            loss.backward()
            compact_logits = student.flatten(0, 1)[positions][None].clone().requires_grad_()
            compact = full.replace(
                kind=kind.name, teacher_logits=teacher.flatten(0, 1)[positions][None], logit_positions=positions
            )
            loss_c, metrics_c = objective.loss(compact, compact_logits)
            loss_c.backward()
            torch.testing.assert_close(loss_c, loss, msg=lambda m: f"{kind}: {m}")
            assert metrics_c.keys() == metrics.keys() and len(metrics) >= 1
            torch.testing.assert_close(compact_logits.grad[0], full_logits.grad.flatten(0, 1)[positions])
            assert full_logits.grad.flatten(0, 1)[mask.flatten() == 0].abs().max() == 0
    assert seen == {"minillm", "pt", "kd", "sft", "seqkd", "rkl_offpolicy"}
    parallel_state.destroy_model_parallel()


def test_objective_losses_at_logit_positions_equal_full_logits():
    run_distributed(_objective_losses_at_positions, 2)
