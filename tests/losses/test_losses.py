"""Vocab-parallel losses against an independent unsharded reference (plain torch autograd, float64).

One 4-rank gloo run walks TP=1 (x DP4), TP=2 and TP=4; in each layout every rank gives its vocabulary
slice to the losses and compares values and gradients with the reference on the full logits. The
inputs hold the hard cases: padded vocabulary (a whole TP=4 slice is padding), logits of +-1e4,
-inf (top-k masked) entries, an all-masked sequence, temperature != 1, chunks smaller than the batch.
gradcheck (float64) runs at TP=1 inside the same run; the compiled kernels get one cheap check.
"""

import pytest
import torch
from harness import run_distributed

VOCAB, PADDED = 17, 24  # 24 splits over TP 1/2/4; at TP=4 the last slice [18, 24) is all padding
BATCH, SEQ, T = 3, 5, 0.7
LAM, BETA = 0.3, 0.4
DIVERGENCES = [
    "reverse_kl",
    "forward_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "generalized_jsd",
    "total_variation_distance",
]
ALL = ["token_log_probs", "entropy", *DIVERGENCES]
FP32 = dict(atol=1e-5, rtol=1e-5)
# bf16 logits: losses are computed in fp32 from the same (rounded) values, so values match to fp32
# rounding; the gradient is stored in bf16 by the forward and scaled by the upstream gradient in the
# backward: two bf16 roundings (2^-8 relative each).
BF16_VALUE, BF16_GRAD = dict(atol=1e-5, rtol=1e-5), dict(atol=1e-6, rtol=2**-7)
EAGER = dict(cpu_kernel=False)  # the reference checks run the eager kernels; the others are checked against them


# ----------------------------------------------------------------------------- reference (full vocab)
def _plogr(w: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum_v w (log_a - log_b) with 0 log 0 = 0; masked_fill keeps NaN out of values and grads."""
    return (w * (log_a - log_b).masked_fill(w == 0, 0.0)).sum(-1)


def _log(m: torch.Tensor) -> torch.Tensor:
    return torch.log(m.masked_fill(m == 0, 1.0))


def reference(name: str, student: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per-token value [b, s] on full, unpadded logits (padding already at -inf), float64."""
    lq = torch.log_softmax(student / T, -1)
    q = lq.exp()
    if name == "token_log_probs":
        return lq.gather(-1, other[..., None])[..., 0]
    if name == "entropy":
        return -_plogr(q, lq, torch.zeros_like(lq))
    lp = torch.log_softmax(other / T, -1)
    p = lp.exp()
    if name == "reverse_kl":
        return _plogr(q, lq, lp)
    if name == "forward_kl":
        return _plogr(p, lp, lq)
    if name == "skew_forward_kl":
        return _plogr(p, lp, _log(LAM * p + (1 - LAM) * q))
    if name == "skew_reverse_kl":
        return _plogr(q, lq, _log(LAM * q + (1 - LAM) * p))
    if name == "generalized_jsd":
        log_m = _log(BETA * p + (1 - BETA) * q)
        return BETA * _plogr(p, lp, log_m) + (1 - BETA) * _plogr(q, lq, log_m)
    assert name == "total_variation_distance"
    return 0.5 * (q - p).abs().sum(-1)


def _reference_reduce(per_token: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    per_token = per_token * mask
    lengths = mask.sum(-1)
    return {
        "none": per_token,
        "sum": per_token.sum(),
        "per_sequence_sum": per_token.sum(-1),
        "per_sequence_mean": per_token.sum(-1) / lengths.clamp(min=1),
        "token_mean": per_token.sum() / mask.sum().clamp(min=1),
        "sequence_mean": (per_token.sum(-1)[lengths > 0] / lengths[lengths > 0]).mean(),
    }[reduction]


# ----------------------------------------------------------------------------- inputs
def _inputs(seed: int = 0, student_only_inf: bool = False) -> dict:
    """Full logits [b, s, PADDED] (padded columns hold garbage: the losses must ignore them)."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(BATCH, SEQ, PADDED, generator=gen, dtype=torch.float64) * 3
    teacher = torch.randn(BATCH, SEQ, PADDED, generator=gen, dtype=torch.float64) * 3
    sign = torch.randn(2, VOCAB, generator=gen).sign().double()
    student[0, 1, :VOCAB], teacher[0, 1, :VOCAB] = 1e4 * sign[0], 1e4 * sign[1]  # extreme logits
    top_k = torch.rand(VOCAB, generator=gen) < 0.5  # a top-k/top-p mask, on both (as MiniLLM)
    student[1, 2, :VOCAB][top_k] = float("-inf")
    (student if student_only_inf else teacher)[1, 2, :VOCAB][top_k] = float("-inf")
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    ids[1, 2] = student[1, 2, :VOCAB].argmax()  # a target the mask keeps
    mask = torch.ones(BATCH, SEQ)
    mask[0, :2] = 0  # prompt
    mask[2] = 0  # an all-masked sequence
    weights = torch.randn(BATCH, SEQ, generator=gen, dtype=torch.float64)  # upstream grads per token
    return dict(student=student, teacher=teacher, ids=ids, mask=mask, weights=weights)


def _unpadded(x: torch.Tensor) -> torch.Tensor:
    return x[..., :VOCAB]


# ----------------------------------------------------------------------------- checks per layout
def _call(name: str, student: torch.Tensor, data: dict, teacher: torch.Tensor, **kw) -> torch.Tensor:
    import megatron_minillm.losses as L

    kw.setdefault("vocab_size", VOCAB)
    kw.setdefault("temperature", T)
    kw.setdefault("options", L.KernelOptions(**EAGER))
    fn = getattr(L, name)
    if name == "token_log_probs":
        return fn(student, data["ids"], data["mask"], **kw)
    if name == "entropy":
        return fn(student, data["mask"], **kw)
    coef = {"skew_forward_kl": {"lam": LAM}, "skew_reverse_kl": {"lam": LAM}, "generalized_jsd": {"beta": BETA}}
    return fn(student, teacher, data["mask"], **coef.get(name, {}), **kw)


def _check_against_reference(data: dict, names: list[str], dtype: torch.dtype, chunk_tokens: int) -> None:
    """Per-token values and gradients of this rank's slice equal the reference's."""
    from megatron.core import parallel_state

    from megatron_minillm.losses import KernelOptions

    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    shard = slice(rank * PADDED // tp, (rank + 1) * PADDED // tp)
    value_tol, grad_tol = (FP32, FP32) if dtype == torch.float32 else (BF16_VALUE, BF16_GRAD)
    for name in names:
        # The reference sees the same (rounded) numbers as the losses.
        full_student = data["student"].to(dtype).double().requires_grad_()
        full_teacher = data["teacher"].to(dtype).double()
        other = data["ids"] if name == "token_log_probs" else _unpadded(full_teacher)
        ref = reference(name, _unpadded(full_student), other) * data["mask"]
        (ref * data["weights"]).sum().backward()

        student = full_student.detach()[..., shard].to(dtype).requires_grad_()
        teacher = full_teacher[..., shard].to(dtype).requires_grad_()  # must still get no grad
        options = KernelOptions(chunk_tokens=chunk_tokens, **EAGER)
        got = _call(name, student, data, teacher, reduction="none", options=options)
        (got * data["weights"].to(got.dtype)).sum().backward()
        where = f"{name} at TP{tp} rank {rank}, {dtype}, chunks of {chunk_tokens}"
        torch.testing.assert_close(got.double(), ref.detach(), **value_tol, msg=lambda m: f"{where}: {m}")
        torch.testing.assert_close(
            student.grad.double(), full_student.grad[..., shard], **grad_tol, msg=lambda m: f"grad of {where}: {m}"
        )
        assert teacher.grad is None, f"{where}: the teacher got a gradient"
        assert not student.grad[2].any(), f"{where}: the all-masked sequence got a gradient"


def _check_reductions(data: dict) -> None:
    """Every reduction of one loss (the single-step term) equals the reference's, value and grad."""
    from megatron.core import parallel_state

    from megatron_minillm.algorithms.minillm import single_step_loss
    from megatron_minillm.losses import REDUCTIONS, reverse_kl

    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    shard = slice(rank * PADDED // tp, (rank + 1) * PADDED // tp)
    teacher = data["teacher"].float()
    for reduction in REDUCTIONS:
        full_student = data["student"].float().double().requires_grad_()
        ref = _reference_reduce(
            reference("reverse_kl", _unpadded(full_student), _unpadded(teacher.double())),
            data["mask"].double(),
            reduction,
        )
        (ref * 0.5).sum().backward()
        student = full_student.detach()[..., shard].float().requires_grad_()
        got = _call("reverse_kl", student, data, teacher[..., shard], reduction=reduction)
        (got * 0.5).sum().backward()
        torch.testing.assert_close(got.double(), ref.detach(), **FP32, msg=lambda m: f"{reduction}: {m}")
        torch.testing.assert_close(
            student.grad.double(), full_student.grad[..., shard], **FP32, msg=lambda m: f"grad of {reduction}: {m}"
        )
    # The named single-step term (algorithms/minillm.py): the reverse KL per response token at T.
    student = data["student"][..., shard].float()
    got = single_step_loss(student, teacher[..., shard], data["mask"], temperature=T, vocab_size=VOCAB)
    expected = reverse_kl(student, teacher[..., shard], data["mask"], temperature=T, vocab_size=VOCAB, reduction="none")
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def _check_empty_and_errors(data: dict) -> None:
    """All-masked batches give 0 and a zero gradient; bad input fails with a clear message."""
    import megatron_minillm.losses as L
    from megatron_minillm.losses import REDUCTIONS

    student = data["student"][..., :PADDED].float().requires_grad_()
    empty = dict(data, mask=torch.zeros(BATCH, SEQ))
    for name in ALL:
        for reduction in REDUCTIONS:
            value = _call(name, student, empty, data["teacher"].float(), reduction=reduction)
            assert torch.equal(value, torch.zeros_like(value)), (name, reduction)
        value.sum().backward()
        assert torch.equal(student.grad, torch.zeros_like(student)), name
    s, t = student.detach(), data["teacher"].float()
    errors = [
        (lambda: L.reverse_kl(s, t[:, :2]), r"student logits \(3, 5, 24\) and teacher logits \(3, 2, 24\)"),
        (lambda: L.reverse_kl(s, t, temperature=0.0), "temperature must be a finite number > 0"),
        (lambda: L.skew_forward_kl(s, t, lam=1.0), r"skew lambda must be in \[0, 1\)"),
        (lambda: L.generalized_jsd(s, t, beta=0.0), r"JSD beta must be in \(0, 1\)"),
        (lambda: L.reverse_kl(s, t, torch.ones(3, 4)), r"loss mask \(3, 4\) must be \[b, s\]"),
        (lambda: L.reverse_kl(s, t, reduction="mean"), "reduction must be one of"),
        (lambda: L.reverse_kl(s, t, vocab_size=25), r"vocab_size 25 must be in \[1, 24\]"),
        (lambda: L.token_log_probs(s, data["ids"] + VOCAB, vocab_size=VOCAB), r"target ids .* \[0, 17\)"),
        (lambda: L.KernelOptions(chunk_tokens=0), "chunk_tokens must be >= 1"),
    ]
    for fn, message in errors:
        with pytest.raises(ValueError, match=message):
            fn()


def _gradcheck() -> None:
    """Closed-form backward vs finite differences, float64, tiny inputs, chunks of 2 (TP=1 only)."""
    from megatron_minillm.losses import KernelOptions

    data = _inputs(seed=1)
    data["student"], data["teacher"] = data["student"][:2, :3, :8] / 3, data["teacher"][:2, :3, :8] / 3
    data["student"][1, 2, :2] = data["teacher"][1, 2, :2] = float("-inf")
    data.update(ids=data["ids"][:2, :3] % 7, mask=data["mask"][:2, :3])
    data["ids"][1, 2] = data["student"][1, 2, :7].argmax()  # a target the top-k mask keeps
    for name in ALL:

        def fn(x: torch.Tensor) -> torch.Tensor:
            return _call(
                name,
                x,
                data,
                data["teacher"],
                vocab_size=7,
                reduction="per_sequence_mean",
                options=KernelOptions(chunk_tokens=2, **EAGER),
            )

        assert torch.autograd.gradcheck(fn, (data["student"].clone().requires_grad_(),)), name


def _all_layouts() -> list[str]:
    from megatron.core import parallel_state

    from megatron_minillm.parallel import init_distributed

    data, student_only = _inputs(), _inputs(student_only_inf=True)
    checked = []
    for tp in (1, 2, 4):
        init_distributed(tp=tp)
        if tp == 1 and torch.distributed.get_rank() == 0:  # no TP collectives: one rank is enough
            _gradcheck()
            _check_empty_and_errors(data)
        for chunk_tokens in (3, 64):  # partial last chunk, gathered rows / a single chunk
            _check_against_reference(data, ALL, torch.float32, chunk_tokens)
        # A student-only top-k mask: q_v = 0 where p_v > 0 (forward KL would be infinite).
        _check_against_reference(
            student_only,
            [
                "token_log_probs",
                "entropy",
                "reverse_kl",
                "skew_forward_kl",
                "skew_reverse_kl",
                "generalized_jsd",
                "total_variation_distance",
            ],
            torch.float32,
            4,
        )
        _check_against_reference(data, ["token_log_probs", "reverse_kl", "forward_kl"], torch.bfloat16, 4)
        _check_reductions(data)
        checked.append(f"TP{tp}")
        parallel_state.destroy_model_parallel()
    return checked


def test_losses_match_unsharded_reference_at_tp_1_2_4():
    assert run_distributed(_all_layouts, 4) == [["TP1", "TP2", "TP4"]] * 4


def _compiled_matches_eager() -> list[str]:
    """The CPU reverse-KL kernel (the default at TP=1, fp32) and the compiled chunk kernels (bf16 at
    TP=1; the reverse KL's split kernels and a generic divergence at TP=2) against the eager kernels.
    Selected rows in chunks of 3 (gathered rows, a partial last chunk) and in one."""
    from megatron.core import parallel_state

    import megatron_minillm.losses as L
    from megatron_minillm.parallel import init_distributed

    data = _inputs()
    checked = []
    compiled = dict(compiled=True)
    cases = {
        1: [("reverse_kl", torch.float32, {}), ("reverse_kl", torch.bfloat16, compiled)],
        2: [("reverse_kl", torch.float32, compiled), ("forward_kl", torch.float32, compiled)],
    }
    for tp, names in cases.items():
        init_distributed(tp=tp)  # the real path: the CPU platform layer is applied and dynamo must cope
        rank = parallel_state.get_tensor_model_parallel_rank()
        shard = slice(rank * PADDED // tp, (rank + 1) * PADDED // tp)
        student, teacher = data["student"][..., shard], data["teacher"][..., shard]
        for (name, dtype, kw), chunk_tokens in ((case, c) for case in names for c in (3, None)):
            results = []
            for options in (L.KernelOptions(chunk_tokens, **EAGER), L.KernelOptions(chunk_tokens, **kw)):
                x = student.to(dtype).requires_grad_()
                value = _call(name, x, data, teacher.to(dtype), reduction="per_sequence_sum", options=options)
                value.sum().backward()
                results.append((value, x.grad.float()))
            (expected, expected_grad), (value, grad) = results
            where = f"{name} {dtype} {kw} TP{tp} chunks of {chunk_tokens}"
            value_tol, grad_tol = (FP32, FP32) if dtype == torch.float32 else (BF16_VALUE, BF16_GRAD)
            torch.testing.assert_close(value, expected, **value_tol, msg=lambda m: f"{where}: {m}")
            torch.testing.assert_close(grad, expected_grad, **grad_tol, msg=lambda m: f"grad of {where}: {m}")
        checked.append(f"TP{tp}")
        parallel_state.destroy_model_parallel()
    return checked


def test_compiled_kernels_match_eager():
    assert run_distributed(_compiled_matches_eager, 2) == [["TP1", "TP2"]] * 2


def _compile_failure_falls_back_to_eager() -> int:
    """Without a working C++ compiler, compiled losses warn once and give the eager results."""
    import warnings

    import megatron_minillm.losses as L
    from megatron_minillm.parallel import init_distributed

    init_distributed()
    torch._inductor.config.cpp.cxx = (None, "/nonexistent/c++")
    torch.compiler.config.force_disable_caches = True  # no cached kernel may stand in for the compiler
    data = _inputs()
    x = data["student"].float().requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values = [_call(name, x, data, data["teacher"].float(), options=L.KernelOptions(compiled=True)) for name in ALL]
    for name, value in zip(ALL, values):
        torch.testing.assert_close(value, _call(name, x, data, data["teacher"].float()), **FP32)
    return sum("compiling the loss kernels failed" in str(w.message) for w in caught)


def test_compile_failure_falls_back_to_eager_with_one_warning():
    assert run_distributed(_compile_failure_falls_back_to_eager, 1) == [1]


def _bf16_backward_allocations() -> list[int]:
    """Largest allocation (bytes) in the backward of bf16 per-token losses, next to the gradient's size."""
    from torch.profiler import profile

    import megatron_minillm.losses as L
    from megatron_minillm.parallel import init_distributed

    init_distributed()
    tokens, vocab = 512, 4096
    logits = torch.randn(4, tokens // 4, vocab).bfloat16().requires_grad_()
    ids = torch.randint(0, vocab, (4, tokens // 4))
    mask = torch.ones(4, tokens // 4)
    mask[0, :7] = 0  # unselected rows too
    loss = (L.token_log_probs(logits, ids, mask, temperature=0.7) * torch.rand(4, tokens // 4)).sum()
    with profile(profile_memory=True) as prof:
        loss.backward()
    sizes = []

    def walk(event) -> None:
        if event.tag == torch._C._profiler._EventType.Allocation:
            sizes.append(event.extra_fields.alloc_size)
        for child in event.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    return [max(sizes), logits.grad.nbytes]


def test_bf16_per_token_backward_has_no_fp32_logits_temporary():
    """The backward scales the bf16 gradient by fp32 per-token upstream gradients: by chunks of rows, not
    through fp32 copies of the whole [tokens, V] gradient (benchmarks/bench_plan_memory.py)."""
    largest, grad_bytes = run_distributed(_bf16_backward_allocations, 1)[0]
    assert largest < grad_bytes, f"an allocation of {largest} bytes in the backward, gradient {grad_bytes}"
