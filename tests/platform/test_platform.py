"""Device/backend selection and the megatron-core CPU compatibility patches (single process)."""

import pytest
import torch

from megatron_minillm.platform import backend, cpu_compat, device, is_cuda


@pytest.fixture(scope="module", autouse=True)
def patched():
    cpu_compat.apply()


def test_cpu_backend_and_device():
    assert not torch.cuda.is_available()  # precondition of this file: no GPU here
    assert not is_cuda()
    assert backend() == "gloo"
    assert device() == torch.device("cpu")


def test_factories_remapped_inside_megatron_only():
    from megatron.core.tensor_parallel import layers

    assert torch.cuda.current_device() == torch.device("cpu")
    assert layers.torch.zeros(2, device="cuda").device.type == "cpu"
    assert layers.torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert layers.torch.nn is torch.nn  # everything that is not a factory is plain torch
    with pytest.raises((RuntimeError, AssertionError)):  # our code still sees the real torch
        torch.zeros(2, device="cuda")


def test_apply_is_idempotent():
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.tensor_parallel import layers

    before = (
        clip_grads.clip_grad_by_total_norm_fp32,
        optimizer.clip_grad_by_total_norm_fp32,
        DistributedOptimizer.__init__,
        layers.torch,
    )
    cpu_compat.apply()
    after = (
        clip_grads.clip_grad_by_total_norm_fp32,
        optimizer.clip_grad_by_total_norm_fp32,
        DistributedOptimizer.__init__,
        layers.torch,
    )
    assert all(a is b for a, b in zip(before, after))
    clip = clip_grads.clip_grad_by_total_norm_fp32
    assert getattr(clip, "_minillm_cpu_patched", False)
    assert getattr(DistributedOptimizer.__init__, "_minillm_cpu_patched", False)
    # One wrapper around megatron's own function, not a wrapper around a wrapper.
    assert not getattr(clip.__wrapped__, "_minillm_cpu_patched", False)


def test_megatron_grad_clipping_runs_on_cpu():
    # Asserts 'torch.cuda.FloatTensor' grads and allocates on 'cuda': both patched.
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=5.0)
    assert torch.allclose(p.grad, torch.tensor([0.6, 0.8, 0.0]), atol=1e-6)


def test_megatron_adam_is_fused_on_cpu_and_steps_like_torch_adamw():
    from megatron.core import optimizer

    params = [torch.nn.Parameter(torch.randn(5, 3, generator=torch.Generator().manual_seed(i))) for i in range(2)]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = optimizer.torch.optim.AdamW(params, lr=0.1, weight_decay=0.1)  # what megatron builds on CPU
    plain = torch.optim.AdamW(reference, lr=0.1, weight_decay=0.1)
    assert isinstance(ours, torch.optim.AdamW) and ours.param_groups[0]["fused"] is True
    assert optimizer.torch.optim.AdamW(params, fused=False).param_groups[0]["fused"] is False
    assert optimizer.torch.optim.SGD is torch.optim.SGD
    for step in range(3):
        for p, r in zip(params, reference):
            p.grad = r.grad = torch.full_like(p, 0.5 - step)
        ours.step()
        plain.step()
    for p, r in zip(params, reference):
        torch.testing.assert_close(p, r)


def test_rng_tracker_forks_cpu_generator():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()

    def forked_draw(seed: int) -> torch.Tensor:
        tracker.reset()
        tracker.add("x", seed)
        with tracker.fork("x"):
            return torch.rand(3)

    try:
        torch.manual_seed(7)
        before = torch.rand(2)
        a, b, c = forked_draw(123), forked_draw(123), forked_draw(124)
        after = torch.rand(2)
    finally:
        tracker.reset()
    assert torch.equal(a, b)
    assert torch.equal(a, torch.rand(3, generator=torch.Generator().manual_seed(123)))
    assert not torch.equal(a, c)
    # The default stream continues as if the forks had not happened.
    reference = torch.rand(4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.cat((before, after)), reference)


def test_cuda_type_strings_are_scoped():
    t = torch.ones(2)
    original = torch.Tensor.type
    assert t.type() == "torch.FloatTensor"
    with cpu_compat._cuda_type_strings():
        assert t.type() == "torch.cuda.FloatTensor"
        assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
        assert t.type(torch.float64).dtype == torch.float64  # conversions still work
        with cpu_compat._cuda_type_strings():  # nested: the outer scope keeps the patch
            pass
        assert t.type() == "torch.cuda.FloatTensor"
    assert torch.Tensor.type is original
    assert t.type() == "torch.FloatTensor"

    wrapped = cpu_compat._with_cuda_type_strings(lambda x: x.type())
    assert wrapped(t) == "torch.cuda.FloatTensor"
    assert t.type() == "torch.FloatTensor"
