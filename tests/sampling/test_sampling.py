"""Sampler: KV-cache generation at TP 1/2 x PP 1/2 (with DP filling the 4 ranks) against Hugging Face
transformers on the same weights, layout/batch invariance of seeded sampling, teacher mixing.

The reference for every per-token log-probability is a plain full forward of the HF model over
prompt + response so far, processed by transformers' own logits processors.
"""

import math

import pytest
import torch
import transformers as tf
from harness import run_distributed
from hf_zoo import VOCAB, hf_model

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
PAIRS = [("llama", "qwen2"), ("opt", "llama_tied_rope_scaled"), ("gpt2", "llama")]  # (student, teacher)
WORLD = 4
PROMPT_LENGTHS = [5, 1, 9, 3, 7, 2]
STOP_IDS = tuple(range(0, VOCAB, 10))  # frequent enough that some samples stop early
MAX_NEW = 8
SPEC_TOKENS = 3  # the speculative sampler's exactness test: distributions of 3-token continuations


def _peaked(family: str, seed: int = 0) -> tf.PreTrainedModel:
    """A zoo model with sharper next-token distributions, so greedy argmaxes are far from ties."""
    model = hf_model(family, seed)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)
    return model


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def _modes():
    from megatron_minillm.sampling import SamplingParams

    return {
        "greedy": SamplingParams(max_new_tokens=MAX_NEW, greedy=True),
        "sampled": SamplingParams(
            max_new_tokens=MAX_NEW,
            min_new_tokens=2,
            temperature=0.7,
            top_k=40,
            top_p=0.9,
            no_repeat_ngram_size=2,
            stop_ids=STOP_IDS,
        ),
        "mixed": SamplingParams(max_new_tokens=MAX_NEW, mix_alpha=0.3, top_p=0.95, stop_ids=STOP_IDS),
        # Speculative: the student drafts 3 tokens per teacher forward; every processor applies.
        "speculative": SamplingParams(
            max_new_tokens=MAX_NEW,
            min_new_tokens=2,
            mix_alpha=0.3,
            top_p=0.95,
            no_repeat_ngram_size=2,
            stop_ids=STOP_IDS,
            speculative_k=3,
        ),
        "greedy_mixed": SamplingParams(max_new_tokens=MAX_NEW, greedy=True, mix_alpha=0.3, stop_ids=STOP_IDS),
        "greedy_speculative": SamplingParams(
            max_new_tokens=MAX_NEW, greedy=True, mix_alpha=0.3, stop_ids=STOP_IDS, speculative_k=2
        ),
    }


def _megatron(hf: tf.PreTrainedModel):
    from megatron_minillm.checkpoint.hf_mapping import hf_to_mcore, load_full_tensors, strict_getter
    from megatron_minillm.models import architecture_from_dict, build_model

    arch = architecture_from_dict(hf.config.to_dict())
    model = build_model(arch)
    load_full_tensors(model, hf_to_mcore(arch, strict_getter(hf.state_dict(), "HF model")))
    return model


def _generate_at_every_layout() -> list[dict]:
    """Per (student, teacher) pair of PAIRS, per layout: {mode: {prompt index: (tokens, mask,
    log-probs)}} gathered from the DP ranks. All pairs in one spawn, and inside each layout: starting
    ranks and forming a layout's process groups cost more than a pair's checks."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_minillm.parallel import init_distributed
    from megatron_minillm.sampling import generate, sample_seeds

    prompts = _prompts()
    hf_models = [(_peaked(student), _peaked(teacher, seed=1)) for student, teacher in PAIRS]
    results: list[dict] = [{} for _ in PAIRS]
    for tp, pp in LAYOUTS:
        layout = init_distributed(tp=tp, pp=pp)
        dp, dp_rank = layout.dp, parallel_state.get_data_parallel_rank()
        mine = list(range(dp_rank, len(prompts), dp))  # a different batch composition at every DP size
        for pair, (student_hf, teacher_hf) in enumerate(hf_models):
            student, teacher = _megatron(student_hf), _megatron(teacher_hf)
            local = {}
            for mode, params in _modes().items():
                rollout = generate(
                    student,
                    [prompts[i] for i in mine],
                    params,
                    sample_seeds(7, torch.tensor(mine)),
                    vocab_size=VOCAB,
                    teacher=teacher if params.mix_alpha else None,
                )
                logps = [rollout.log_q] + ([rollout.log_p] if rollout.log_p is not None else []) + [rollout.log_mix]
                local[mode] = {  # rows are right-padded to this batch's longest response: keep what is generated
                    i: (
                        rollout.tokens[j][rollout.mask[j]].tolist(),
                        rollout.mask[j].tolist(),
                        [lp[j][rollout.mask[j]].tolist() for lp in logps],
                        bool((rollout.tokens[j][~rollout.mask[j]] == 0).all()),
                        all(bool((lp[j][~rollout.mask[j]] == 0).all()) for lp in logps),
                    )
                    for j, i in enumerate(mine)
                }
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, local)
            results[pair][f"TP{tp}xPP{pp}"] = {m: {i: v for g in gathered for i, v in g[m].items()} for m in local}
        parallel_state.destroy_model_parallel()
    return results


def _processors(params, prompt_length: int) -> tf.LogitsProcessorList:
    """transformers' processors for ``params`` (the same order as HF generate)."""
    procs = tf.LogitsProcessorList()
    if params.no_repeat_ngram_size:
        procs.append(tf.NoRepeatNGramLogitsProcessor(params.no_repeat_ngram_size))
    if params.min_new_tokens:
        procs.append(tf.MinNewTokensLengthLogitsProcessor(prompt_length, params.min_new_tokens, list(params.stop_ids)))
    if not params.greedy:
        if params.temperature != 1.0:
            procs.append(tf.TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            procs.append(tf.TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            procs.append(tf.TopPLogitsWarper(params.top_p))
    return procs


def _reference_log_probs(hf: tf.PreTrainedModel, params, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log of the processed distribution at each response token [T, V], by full recompute."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = hf(ids).logits[0, len(prompt) - 1 : -1].double()
    procs = _processors(params, len(prompt))
    out = [procs(ids[:, : len(prompt) + t], logits[t : t + 1].clone())[0] for t in range(len(response))]
    return torch.stack(out).log_softmax(-1)


@pytest.fixture(scope="module")
def generated() -> list[dict]:
    return run_distributed(_generate_at_every_layout, WORLD)[0]


@pytest.mark.parametrize("pair", range(len(PAIRS)), ids=[f"{s}-{t}" for s, t in PAIRS])
def test_generation_matches_transformers_and_is_layout_invariant(generated, pair):
    student, teacher = PAIRS[pair]
    results = generated[pair]
    first = results["TP1xPP1"]
    for layout, res in results.items():  # identical tokens at every layout / DP size / batch composition
        for mode in res:
            for i in range(len(PROMPT_LENGTHS)):
                assert res[mode][i][0] == first[mode][i][0], f"{mode} tokens of prompt {i} differ at {layout}"
                n = len(res[mode][i][0])
                assert res[mode][i][1] == [True] * n + [False] * (len(res[mode][i][1]) - n), "mask not a prefix"
                assert res[mode][i][3] and res[mode][i][4], "padding after the end must be pad ids and 0 log-probs"
                torch.testing.assert_close(
                    torch.tensor(res[mode][i][2]), torch.tensor(first[mode][i][2]), atol=1e-5, rtol=1e-5
                )

    student_hf, teacher_hf = _peaked(student), _peaked(teacher, seed=1)
    prompts, modes = _prompts(), _modes()
    stopped_early = 0
    for i, prompt in enumerate(prompts):
        # Greedy: token for token what transformers' generate does.
        hf_out = student_hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=MAX_NEW,
            do_sample=False,
            pad_token_id=0,
        )
        assert first["greedy"][i][0] == hf_out[0, len(prompt) :].tolist(), f"greedy tokens of prompt {i}"

        # Speculative greedy decoding keeps a draft exactly when it is the mixture's argmax: k = 0's tokens.
        assert first["greedy_speculative"][i][0] == first["greedy_mixed"][i][0], f"greedy speculative, prompt {i}"
        spec, plain = (torch.tensor(first[m][i][2]) for m in ("greedy_speculative", "greedy_mixed"))
        torch.testing.assert_close(spec, plain, atol=1e-5, rtol=0)

        for mode in ("sampled", "mixed", "speculative"):
            params = modes[mode]
            response, _, logps, _, _ = first[mode][i]
            n = len(response)
            stops = [t for t, tok in enumerate(response) if tok in STOP_IDS]
            assert stops in ([], [n - 1]), f"{mode} prompt {i}: generation must end at the first stop id"
            assert n == MAX_NEW or stops, f"{mode} prompt {i}: ended early without a stop id"
            assert not stops or stops[0] >= params.min_new_tokens
            stopped_early += n < MAX_NEW
            steps = torch.arange(n)
            log_q = _reference_log_probs(student_hf, params, prompt, response)[steps, response]
            torch.testing.assert_close(torch.tensor(logps[0], dtype=torch.float64), log_q, atol=1e-4, rtol=1e-4)
            if params.mix_alpha:
                log_p = _reference_log_probs(teacher_hf, params, prompt, response)[steps, response]
                a = params.mix_alpha
                log_mix = torch.logaddexp(log_p + math.log(a), log_q + math.log(1 - a))
                torch.testing.assert_close(torch.tensor(logps[1], dtype=torch.float64), log_p, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(torch.tensor(logps[2], dtype=torch.float64), log_mix, atol=1e-4, rtol=1e-4)
    assert stopped_early, "no sample hit a stop id: the stop path went untested"


def _tiny_vocab_pair(vocab: int):
    """Student and teacher LLaMAs with a vocabulary of ``vocab`` tokens and clearly different outputs."""
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = tf.LlamaConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=vocab,
            max_position_embeddings=16,
        )
        model = tf.LlamaForCausalLM(config).float().eval()
        with torch.no_grad():
            model.lm_head.weight.mul_(30.0)
        models.append(model)
    return models


def _processors_and_mixture(num_samples: int) -> dict:
    """(a) processed log-probs vs transformers' warpers at TP 4/2/1 on logits with ties and -inf;
    (b) one-token teacher-mixed samples of a tiny-vocabulary pair at TP 4 and TP 1."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_minillm.parallel import init_distributed
    from megatron_minillm.sampling import SamplingParams, generate, sample_seeds
    from megatron_minillm.sampling.processors import processed_log_probs

    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 256, generator=gen) * 3
    logits[0, 10] = logits[0, 77] = logits[0].max() + 1  # a tie for the top
    logits[1, :100] = float("-inf")  # e.g. masked by an earlier processor
    logits[2] = logits[2] * 20  # peaked: top-p keeps one token
    cases = [
        dict(temperature=0.7, top_k=5),
        dict(top_p=0.8),
        dict(top_k=50, top_p=0.5, temperature=1.3),
        dict(top_p=1e-6),
        dict(top_k=1),
    ]
    student_hf, teacher_hf = _tiny_vocab_pair(8)
    out = {"processed": {}, "mixture": {}, "speculative": {}}
    for tp in (4, 2, 1):
        init_distributed(tp=tp, pp=1)
        shard = 256 // tp
        start = parallel_state.get_tensor_model_parallel_rank() * shard
        for c, kw in enumerate(cases):
            got = processed_log_probs(
                logits[:, start : start + shard], SamplingParams(max_new_tokens=1, **kw), 250, [[] for _ in logits]
            )
            parts = [torch.empty_like(got) for _ in range(tp)]
            dist.all_gather(parts, got, group=parallel_state.get_tensor_model_parallel_group())
            out["processed"][(tp, c)] = torch.cat(parts, -1)
        if tp in (4, 1):
            student, teacher = _megatron(student_hf), _megatron(teacher_hf)
            dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
            ids = torch.arange(dp_rank, num_samples, dp)
            for alpha in (0.0, 0.3, 1.0):
                params = SamplingParams(max_new_tokens=1, mix_alpha=alpha)
                r = generate(
                    student, [[1, 2, 3]] * len(ids), params, sample_seeds(11, ids), vocab_size=8, teacher=teacher
                )
                row = torch.stack([r.tokens[:, 0].double(), r.log_q[:, 0], r.log_p[:, 0], r.log_mix[:, 0]])
                if alpha == 0.0:  # pure student sampling draws exactly what sampling without a teacher draws
                    alone = generate(student, [[1, 2, 3]] * len(ids), params, sample_seeds(11, ids), vocab_size=8)
                    assert torch.equal(alone.tokens, r.tokens) and torch.equal(alone.log_q, r.log_q)
                # Three tokens, speculative with 2 drafts per round: rejections, corrections and bonus tokens.
                spec = SamplingParams(max_new_tokens=SPEC_TOKENS, mix_alpha=alpha, speculative_k=2)
                r = generate(
                    student, [[1, 2, 3]] * len(ids), spec, sample_seeds(13, ids), vocab_size=8, teacher=teacher
                )
                spec_row = torch.cat([r.tokens.double().t(), r.log_q.t(), r.log_p.t(), r.log_mix.t()])  # [4 * 3, n]
                for name, value in (("mixture", row), ("speculative", spec_row)):
                    parts = [None] * dp
                    dist.all_gather_object(parts, (ids, value), group=parallel_state.get_data_parallel_group())
                    out[name][(tp, alpha)] = torch.cat([p[1] for p in parts], 1)[
                        :, torch.cat([p[0] for p in parts]).argsort()
                    ]
        parallel_state.destroy_model_parallel()
    return out


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test; cells expected fewer than 5 times are pooled into one (the usual rule)."""
    expected = probs * counts.sum()
    small = expected < 5
    if small.any():
        counts = torch.cat([counts[~small], counts[small].sum()[None]])
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
    stat = ((counts - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc(torch.tensor((len(counts) - 1) / 2.0), stat / 2))


def _sequence_log_probs(hf: tf.PreTrainedModel, prompt: list[int], vocab: int, length: int) -> torch.Tensor:
    """log q(y_t | prompt, y_<t) [vocab ** length, length] for every continuation y (row-major order)."""
    ys = torch.cartesian_prod(*[torch.arange(vocab)] * length).reshape(-1, length)
    ids = torch.cat([torch.tensor(prompt).expand(len(ys), -1), ys], dim=1)
    with torch.no_grad():
        logits = hf(ids).logits[:, len(prompt) - 1 : -1].double()
    return logits.log_softmax(-1).gather(-1, ys[:, :, None])[..., 0]


def test_processors_match_transformers_and_mixture_frequencies_match_alpha_p_plus_1_minus_alpha_q():
    num_samples = 4000
    out = run_distributed(_processors_and_mixture, WORLD, num_samples)[0]

    # (a) top-k / top-p / temperature, vocab-parallel at TP 4, 2, 1 vs transformers on the full row.
    gen = torch.Generator().manual_seed(5)
    for (tp, c), got in out["processed"].items():
        assert torch.isneginf(got[:, 250:]).all(), "padded vocabulary must stay -inf"
        got = got[:, :250]
        ref = out["processed"][(1, c)][:, :250] if tp != 1 else None
        if ref is not None:
            assert torch.equal(torch.isneginf(got), torch.isneginf(ref)), f"kept set differs at TP{tp}, case {c}"
    logits = torch.randn(6, 256, generator=gen) * 3
    logits[0, 10] = logits[0, 77] = logits[0].max() + 1
    logits[1, :100] = float("-inf")
    logits[2] = logits[2] * 20
    from megatron_minillm.sampling import SamplingParams

    for c, kw in enumerate(
        [
            dict(temperature=0.7, top_k=5),
            dict(top_p=0.8),
            dict(top_k=50, top_p=0.5, temperature=1.3),
            dict(top_p=1e-6),
            dict(top_k=1),
        ]
    ):
        ref = _processors(SamplingParams(max_new_tokens=1, **kw), 0)(
            torch.zeros(6, 1, dtype=torch.long), logits[:, :250].clone()
        ).log_softmax(-1)
        got = out["processed"][(1, c)][:, :250]
        # Row 0 has two tied maxima: where top-p cuts between them, transformers keeps the one its
        # sort puts last and we keep both (the result must not depend on how the vocabulary is split).
        rows = slice(1, None) if c == 3 else slice(None)
        assert torch.equal(torch.isneginf(got[rows]), torch.isneginf(ref[rows])), f"kept set differs, case {c}"
        finite = torch.isfinite(ref[rows])
        torch.testing.assert_close(got[rows][finite], ref[rows][finite], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out["processed"][(1, 3)][0]).nonzero()[:, 0].tolist() == [10, 77]
    assert torch.isfinite(out["processed"][(1, 4)][0]).sum() == 2, "top-1 keeps both tied maxima, as transformers"

    # (b) frequencies of the first token against alpha * p + (1 - alpha) * q of the HF models.
    student_hf, teacher_hf = _tiny_vocab_pair(8)
    with torch.no_grad():
        q = student_hf(torch.tensor([[1, 2, 3]])).logits[0, -1].double().softmax(-1)
        p = teacher_hf(torch.tensor([[1, 2, 3]])).logits[0, -1].double().softmax(-1)
    assert (p - q).abs().sum() > 0.5, "the test needs clearly different teacher and student"
    for tp in (4, 1):
        torch.testing.assert_close(out["mixture"][(tp, 0.3)][0], out["mixture"][(1, 0.3)][0], atol=0, rtol=0)
    for alpha in (0.0, 0.3, 1.0):
        tokens, log_q, log_p, log_mix = out["mixture"][(4, alpha)]
        tokens = tokens.long()
        counts = torch.bincount(tokens, minlength=8).double()
        mixture = alpha * p + (1 - alpha) * q
        assert _chi_square_p_value(counts, mixture) > 1e-3, f"alpha={alpha}: {counts.tolist()} vs {mixture.tolist()}"
        for other in (p, q):  # the test has power: the wrong distribution is rejected
            if (other - mixture).abs().sum() > 0.1:
                assert _chi_square_p_value(counts, other) < 1e-6
        torch.testing.assert_close(log_q, q.log()[tokens], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(log_p, p.log()[tokens], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(log_mix, mixture.log()[tokens], atol=1e-5, rtol=1e-5)

    # (c) speculative sampling: 3-token continuations follow the exact sequence distribution of the
    # mixture (pure p and pure q rejected), at TP 4 as at TP 1, each token's log-probs those of a full forward.
    seq_q, seq_p = (_sequence_log_probs(m, [1, 2, 3], 8, SPEC_TOKENS) for m in (student_hf, teacher_hf))
    torch.testing.assert_close(out["speculative"][(4, 0.3)][:SPEC_TOKENS], out["speculative"][(1, 0.3)][:SPEC_TOKENS])
    weights = 8 ** torch.arange(SPEC_TOKENS - 1, -1, -1)
    for alpha in (0.0, 0.3, 1.0):
        tokens, log_q, log_p, log_mix = out["speculative"][(4, alpha)].reshape(4, SPEC_TOKENS, -1).transpose(1, 2)
        cells = (tokens.long() * weights).sum(-1)
        counts = torch.bincount(cells, minlength=8**SPEC_TOKENS).double()
        seq_mix = {0.0: seq_q, 1.0: seq_p}.get(alpha)
        if seq_mix is None:
            seq_mix = torch.logaddexp(seq_p + math.log(alpha), seq_q + math.log1p(-alpha))
        exact = seq_mix.sum(-1).exp()
        assert _chi_square_p_value(counts, exact) > 1e-3, f"speculative, alpha={alpha}"
        for other in (seq_p, seq_q):
            if (other.sum(-1).exp() - exact).abs().sum() > 0.1:
                assert _chi_square_p_value(counts, other.sum(-1).exp()) < 1e-6, f"alpha={alpha}: no power"
        for got, ref in ((log_q, seq_q), (log_p, seq_p), (log_mix, seq_mix)):
            torch.testing.assert_close(got, ref[cells], atol=1e-5, rtol=1e-5)


def test_sampling_params_reject_bad_values():
    from megatron_minillm.sampling import SamplingParams

    for kw, message in [
        (dict(mix_alpha=1.5), "mix_alpha must be in \\[0, 1\\]"),
        (dict(mix_alpha=-0.1), "mix_alpha"),
        (dict(top_p=0.0), "top_p must be in \\(0, 1\\]"),
        (dict(top_p=1.2), "top_p"),
        (dict(temperature=0.0), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(min_new_tokens=9), "min_new_tokens"),
    ]:
        with pytest.raises(ValueError, match=message):
            SamplingParams(max_new_tokens=8, **kw)


def _stop_inside_an_accepted_block() -> dict:
    """alpha = 0 with a teacher: every draft is accepted (p~ = q), so with k = 3 the tokens at
    positions 0-2 of a row are accepted drafts of its first round. A stop id placed at position 1
    must end the row there, mid-block."""
    from megatron_minillm.parallel import init_distributed
    from megatron_minillm.sampling import SamplingParams, generate, sample_seeds

    init_distributed(tp=1, pp=1)
    student, teacher = _megatron(_peaked("llama")), _megatron(_peaked("qwen2", seed=1))
    prompts, seeds = _prompts(), sample_seeds(7, torch.arange(len(PROMPT_LENGTHS)))
    plain = generate(student, prompts, SamplingParams(max_new_tokens=MAX_NEW, greedy=True), seeds, vocab_size=VOCAB)
    out = {}
    for i, tokens in enumerate(plain.responses()):
        if tokens[1] == tokens[0]:
            continue  # the stop id would end the row at position 0
        params = SamplingParams(max_new_tokens=MAX_NEW, greedy=True, stop_ids=(tokens[1],), speculative_k=3)
        r = generate(
            student, [prompts[i]], params, seeds[i : i + 1], vocab_size=VOCAB, teacher=teacher,
            teacher_logits_dtype=torch.float32,
        )  # fmt: skip
        # Every row stopped before max_new_tokens: the kept teacher outputs are as long as the responses.
        assert r.teacher_log_p.shape == r.teacher_logits.shape[:2] == r.tokens.shape, (
            r.teacher_log_p.shape,
            r.tokens.shape,
        )
        out[i] = (tokens, r.responses()[0], r.speculation.accepted, r.speculation.row_rounds)
    return out


def test_a_stop_id_inside_an_accepted_block_ends_the_row():
    out = run_distributed(_stop_inside_an_accepted_block, 1)[0]
    assert out, "no prompt whose first two greedy tokens differ"
    for plain, speculative, accepted, rounds in out.values():
        assert speculative == plain[:2], (plain, speculative)
        # One round; both kept tokens are accepted drafts (no correction or bonus): the third
        # accepted draft, after the stop, is dropped.
        assert (accepted, rounds) == (2, 1), (accepted, rounds)
