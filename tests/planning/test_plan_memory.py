"""The memory planner: parameter terms against built models, known sizes, layout rules, the CLI.

How close its peak is to measured memory is benchmarks/bench_plan_memory.py's job (minutes, not a test).
"""

import dataclasses
import json

import pytest
from harness import run_distributed, run_tool, run_tool_in_workers

from megatron_minillm.config import load_config
from megatron_minillm.models import architecture_from_dict
from megatron_minillm.parallel import LayoutError
from megatron_minillm.planning import (
    KNOWN_MODELS,
    PlanConfig,
    PlanError,
    plan_memory,
    resolve_model,
    search_layouts,
    stage_parameters,
    suggest_layouts,
)


def plan(*overrides: str, dp: int = 1, pt_data: bool = True, **kwargs) -> PlanConfig:
    """The plan of the training config's defaults with ``section.key=value`` overrides."""
    return PlanConfig(load_config(None, overrides, require_paths=False), dp=dp, pt_data=pt_data, **kwargs)


LLAMA = dict(
    model_type="llama",
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=250,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
GPT2 = dict(model_type="gpt2", n_embd=64, n_layer=4, n_head=4, vocab_size=250, n_positions=64)
OPT = dict(
    model_type="opt",
    hidden_size=64,
    ffn_dim=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    vocab_size=250,
    max_position_embeddings=64,
    word_embed_proj_dim=64,
)


def _built_counts(configs: dict, tp: int, pp: int) -> dict:
    """numel of this rank's parameters for each config, built with our builder, and of the DDP buffer."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig

    from megatron_minillm.models import build_model
    from megatron_minillm.parallel import init_distributed
    from megatron_minillm.training.optimizer import setup_model_and_optimizer

    init_distributed(tp=tp, pp=pp)
    out = {"stage": parallel_state.get_pipeline_model_parallel_rank()}
    for name, cfg in configs.items():
        model = build_model(architecture_from_dict(cfg))
        out[name] = sum(p.numel() for p in model.parameters())
    ddp, optimizer, _ = setup_model_and_optimizer(
        build_model(architecture_from_dict(configs["llama"])), OptimizerConfig(lr=1e-3, use_distributed_optimizer=True)
    )
    out["buffer"] = sum(b.grad_data.numel() for b in ddp.buffers)
    out["grad_dtype"] = str(ddp.buffers[0].grad_data.dtype)
    del torch
    return out


def test_parameter_and_buffer_counts_equal_built_models():
    configs = {"llama": LLAMA, "gpt2": GPT2, "opt": OPT, "llama_tied": dict(LLAMA, tie_word_embeddings=True)}
    # 4 ranks: TP=2 x PP=2 (first and last stages, each a TP shard; tied embeddings on both stages)
    results = run_distributed(_built_counts, 4, configs, 2, 2)
    for r in results:
        for name, cfg in configs.items():
            expected = sum(stage_parameters(architecture_from_dict(cfg), 2, 2, r["stage"]).values())
            assert r[name] == expected, (name, r["stage"], r[name], expected)
        sft = plan(
            "algorithm=sft",
            "parallel.tp=2",
            "parallel.pp=2",
            "training.micro_batch_size=1",
            "training.global_batch_size=1",
            "training.max_prompt_length=8",
            "training.max_length=16",
            "rollout.batch_size=1",
            "rollout.micro_batch_size=1",
            "training.dtype=fp32",
        )
        stage = next(b for b in plan_memory(None, architecture_from_dict(LLAMA), sft) if b.stage == r["stage"])
        assert r["grad_dtype"] == "torch.float32"
        assert stage.terms["student grads (fp32 DDP buffer)"] == 4 * r["buffer"]


def test_known_model_sizes():
    counts = {name: sum(stage_parameters(resolve_model(name), 1, 1, 0).values()) for name in KNOWN_MODELS}
    assert counts["llama-7b"] == 6_738_415_616  # LLaMA-2-7B
    assert counts["llama-13b"] == 13_015_864_320
    assert abs(counts["llama-70b"] - 68.98e9) < 0.01e9  # GQA: 8 KV heads
    assert abs(counts["gpt2"] - 124.44e6) < 0.05e6  # + 47 padded vocabulary rows of 768
    assert abs(counts["gpt2-xl"] - 1.558e9) < 0.001e9
    assert abs(counts["opt-13b"] - 12.85e9) < 0.01e9
    assert abs(counts["smollm2-135m"] - 134.5e6) < 0.1e6
    # TP shards sum to the whole (up to the per-rank replicated norms/row-parallel biases/positions)
    arch = resolve_model("llama-70b")
    shards = sum(stage_parameters(arch, 8, 1, 0, padded_vocab=32000).values()) * 8
    norms = (2 * arch.num_layers + 1) * arch.hidden_size
    assert shards - 7 * norms == counts["llama-70b"]


def test_terms_scale_as_documented():
    teacher, student = resolve_model("llama-13b"), resolve_model("llama-7b")
    layout = ("parallel.tp=4", "training.dtype=bf16")
    (b,) = plan_memory(teacher, student, plan(*layout, dp=2))
    n = sum(stage_parameters(student, 4, 1, 0).values())
    assert b.terms["student weights"] == 2 * n
    # bf16: fp32 main params + 2 fp32 moments = 12 B/param over DP=2 (the padded buffer)
    assert b.terms["optimizer state"] == pytest.approx(12 * n / 2, rel=1e-4)
    (no_dist,) = plan_memory(teacher, student, plan(*layout, "optimizer.use_distributed_optimizer=false", dp=2))
    assert no_dist.terms["optimizer state"] == pytest.approx(2 * b.terms["optimizer state"], rel=1e-4)
    # the rollout cache: rollout_batch / DP x response positions (max_length - max_prompt_length) x V/TP x 2
    # bytes (V padded to a multiple of 128 x TP); the L_PT step cache: every position of global_batch / DP
    assert b.terms["teacher logits cache (rollouts)"] == 256 / 2 * (512 - 256) * 32256 / 4 * 2
    assert b.terms["teacher logits cache (L_PT/KD step)"] == 16 / 2 * 512 * 32256 / 4 * 2
    # KV caches: student + teacher, 2 x layers x rollout micro-batch x max_length x KV heads/TP x head dim x 2 B
    kv = sum(2 * m.num_layers * 16 * 512 * m.num_query_groups // 4 * m.kv_channels * 2 for m in (teacher, student))
    assert b.terms["KV caches (rollouts)"] == kv
    # policy_gradient=false drops the PPO term's gradient, one [response tokens, V/TP] bf16 tensor (a
    # micro-batch of 4 responses of max_length - max_prompt_length = 256 positions). SmolLM2 (wide
    # vocabulary, narrow hidden), no L_PT, an fp32 cache (its bf16 copy counts too): the MiniLLM
    # micro-batch's loss sets the logits peak either way.
    smol = resolve_model("smollm2-135m")
    pg = ("training.dtype=bf16", "training.teacher_cache_dtype=fp32")
    on, off = (
        plan_memory(smol, smol, plan(*pg, f"minillm.policy_gradient={flag}", dp=2, pt_data=False))[0]
        for flag in (True, False)
    )
    assert on.terms["logits + loss gradients"] - off.terms["logits + loss gradients"] == 4 * 256 * 49152 * 2
    (rc,) = plan_memory(teacher, student, plan(*layout, "training.recompute=true", dp=2))
    assert rc.terms["activations (train, in flight)"] < b.terms["activations (train, in flight)"] / 5
    # PP=2: the first stage holds 2 micro-batches in flight (1F1B), the last stage the logits and cache
    stages = {x.stage: x for x in plan_memory(teacher, student, plan(*layout, "parallel.pp=2"))}
    assert stages[1].terms["teacher logits cache (rollouts)"] > 0 == stages[0].terms["teacher logits cache (rollouts)"]
    assert stages[0].terms["logits + loss gradients"] == 0 < stages[1].terms["logits + loss gradients"]
    assert (
        stages[0].terms["activations (train, in flight)"]
        > 1.9 * stages[1].terms["activations (train, in flight)"] / 1.2
    )


def test_layout_suggestions_respect_divisibility_and_memory():
    teacher, student = (
        resolve_model("smollm2-135m"),
        architecture_from_dict(
            dict(LLAMA, num_attention_heads=9, num_key_value_heads=3, hidden_size=72, num_hidden_layers=6)
        ),
    )
    cfg = plan(
        "training.global_batch_size=96",
        "training.micro_batch_size=1",
        "rollout.batch_size=96",
        "training.max_length=256",
        "training.max_prompt_length=128",
    )
    layouts = suggest_layouts(teacher, student, cfg, nodes=2, gpus_per_node=6, gpu_memory_bytes=80 * 2**30)
    assert layouts and {x.tp for x in layouts} <= {1, 3}  # 9 heads, 3 KV heads; TP within a node of 6
    for x in layouts:
        assert x.tp * x.pp * x.dp == 12 and 30 % x.pp == 0 and 6 % x.pp == 0 and 96 % x.dp == 0
    assert layouts[0].tp * layouts[0].pp == 1  # the smallest model-parallel group first
    keys = [(x.tp * x.pp, x.pp) for x in layouts]
    assert keys == sorted(keys)
    tight = suggest_layouts(teacher, student, cfg, nodes=2, gpus_per_node=6, gpu_memory_bytes=layouts[0].peak_bytes)
    assert all(x.peak_bytes <= 0.9 * layouts[0].peak_bytes for x in tight) and layouts[0] not in tight
    with pytest.raises(LayoutError, match="TP=2 does not divide the 9 attention heads"):
        plan_memory(teacher, student, cfg.at_layout(2, 1, 1))
    with pytest.raises(PlanError, match="known names: gpt2"):
        resolve_model("llama-8b")


def _llama_rank_params(hf: dict, tp: int, layers: int, vocab: int, first: bool, last: bool) -> int:
    """Parameters one TP rank of a LLaMA pipeline stage holds, from the HF config values (untied
    embeddings, no biases): written out here, not taken from ``stage_tensors``."""
    h, f, a = hf["hidden_size"], hf["intermediate_size"], hf["num_attention_heads"]
    g, d = hf["num_key_value_heads"], hf["hidden_size"] // hf["num_attention_heads"]
    layer = 2 * h + h * a * d // tp + (a + 2 * g) * d * h // tp + 2 * f * h // tp + f * h // tp
    return layers * layer + (vocab // tp * h if first else 0) + ((h + vocab // tp * h) if last else 0)


def test_teacher_on_its_own_layout():
    """LLaMA-2-70B at TP_t=8 beside LLaMA-2-7B at TP=1 on 32 ranks: the teacher's share at its layout,
    the student's and the cache at the student's, the exchange's buffers while scoring."""
    teacher, student = resolve_model("llama-70b"), resolve_model("llama-7b")
    t_hf, s_hf = KNOWN_MODELS["llama-70b"], KNOWN_MODELS["llama-7b"]
    keys = (
        "training.dtype=bf16",
        "training.micro_batch_size=2",
        "training.global_batch_size=64",
        "rollout.batch_size=256",
        "rollout.micro_batch_size=32",
    )
    own = plan(*keys, "parallel.teacher_tp=8", dp=32)
    assert (own.teacher_tp, own.teacher_pp, own.teacher_dp, own.own_teacher_layout) == (8, 1, 4, True)
    (b,) = plan_memory(teacher, student, own)
    V = 32768  # 32000 padded to a multiple of 128 x lcm(1, 8)
    assert b.terms["teacher weights"] == 2 * _llama_rank_params(t_hf, 8, 80, V, True, True)
    assert b.terms["student weights"] == 2 * _llama_rank_params(s_hf, 1, 32, V, True, True)
    # the student's terms are those of the shared layout at the same padded vocabulary
    (shared,) = plan_memory(teacher, student, dataclasses.replace(plan(*keys, dp=32), padded_vocab=V))
    for name in ("student weights", "student grads (fp32 DDP buffer)", "optimizer state"):
        assert b.terms[name] == shared.terms[name]
    assert shared.terms["teacher weights"] == 2 * _llama_rank_params(t_hf, 1, 80, V, True, True)
    # each student DP group decodes min(32, 256 / 32) = 8 rows; a teacher DP group all 32 x 8 / 4 of them
    kv_student = 2 * 32 * 8 * 512 * 32 * 128 * 2
    kv_teacher = 2 * 80 * 64 * 512 * (8 // 8) * 128 * 2
    assert b.terms["KV caches (rollouts)"] == kv_student + kv_teacher
    # the cache in the student's split: its 8 rollouts x 256 response positions x V/TP_s
    rollout_cache = 8 * 256 * V * 2
    assert b.terms["teacher logits cache (rollouts)"] == rollout_cache
    # scoring: the teacher DP group's 64 rollouts' logits [., V/TP_t] concatenated and in messages, the
    # student's 8 received and their receive buffers
    persistent = sum(b.terms[k] for k in ("student weights", "teacher weights", "student grads (fp32 DDP buffer)"))
    persistent += b.terms["optimizer state"]
    share, mine = 64 * 256 * V // 8 * 2, rollout_cache
    (scored,) = plan_memory(teacher, student, plan(*keys, "parallel.teacher_tp=8", "rollout.speculative_k=0", dp=32))
    assert scored.phases["score"] == pytest.approx(persistent + 2 * share + 2 * mine, rel=1e-12)
    # speculative rollouts (the default) keep the teacher's logits of their 8 x 256 positions instead,
    # [8, 256, V/TP_s] until copied into the cache: no scoring forward
    kept = 8 * 256 * V * 2
    assert b.terms["teacher logits kept by the rollouts"] == kept
    assert b.phases["score"] == pytest.approx(persistent + kept + rollout_cache, rel=1e-12)
    assert b.phases["rollout"] - scored.phases["rollout"] == pytest.approx(kept, rel=1e-12)
    assert scored.terms["teacher logits kept by the rollouts"] == 0
    # weights per rank scale with 1 / (TP_t x PP_t) (up to replicated norms and the embeddings' stages)
    (tp4,) = plan_memory(teacher, student, plan(*keys, "parallel.teacher_tp=4", dp=32, padded_vocab=V))
    assert tp4.terms["teacher weights"] / b.terms["teacher weights"] == pytest.approx(2, rel=2e-3)

    # PP_s = 2 and PP_t = 4 on 16 ranks: rank r is in the student's stage r // 8 and the teacher's r // 4;
    # the planned pairs are (0, 0) and (1, 3) (the middle teacher stages hold less than its first and last)
    pipelined = plan(*keys, "parallel.tp=2", "parallel.pp=2", "parallel.teacher_tp=4", "parallel.teacher_pp=4", dp=4)
    stages = {(x.stage, x.teacher_stage): x for x in plan_memory(resolve_model("llama-13b"), student, pipelined)}
    assert set(stages) == {(0, 0), (1, 3)}
    t13 = KNOWN_MODELS["llama-13b"]
    V4 = 32256  # a multiple of 128 x 4
    assert stages[0, 0].terms["teacher weights"] == 2 * _llama_rank_params(t13, 4, 10, V4, True, False)
    assert stages[1, 3].terms["teacher weights"] == 2 * _llama_rank_params(t13, 4, 10, V4, False, True)
    assert stages[1, 3].terms["student weights"] == 2 * _llama_rank_params(s_hf, 2, 16, V4, False, True)

    with pytest.raises(LayoutError, match="teacher: TP x PP = 8 x 1 does not divide the 12 ranks"):
        plan_memory(teacher, student, plan(*keys, "parallel.teacher_tp=8", dp=12))
    with pytest.raises(LayoutError, match="TP=8 does not divide the padded vocabulary 32004"):
        plan_memory(teacher, student, plan(*keys, "parallel.teacher_tp=8", dp=32, padded_vocab=32004))


def test_sequence_parallel_saves_the_replicated_activations():
    """SP divides the norms' saves and the QKV / fc1 inputs ([s, b, h] on every TP rank) by TP, and
    the final norm's input; nothing else changes."""
    teacher, student = resolve_model("llama-13b"), resolve_model("llama-7b")
    h, layers, tokens = 4096, 32, 4 * 512  # micro-batch 4 x max_length 512
    keys = ("parallel.tp=4", "training.dtype=bf16")
    for recompute in (False, True):
        off, on = (
            plan_memory(
                teacher,
                student,
                plan(*keys, f"training.recompute={recompute}", f"parallel.sequence_parallel={sp}", dp=2),
            )[0]
            for sp in (False, True)
        )
        rms = 8 * h + 4  # torch's composite RMSNorm: the fp32 input and normalized tensor, fp32 rstd
        replicated = layers * (2 * rms + 2 * 2 * h) + rms  # per token: each layer's, and the final norm's
        if recompute:  # the checkpointed layer inputs [s, b, h], plus one layer's saves re-run
            replicated = layers * 2 * h + (2 * rms + 2 * 2 * h) + rms
        saved = tokens * replicated * (1 - 1 / 4)
        assert off.terms["activations (train, in flight)"] - on.terms["activations (train, in flight)"] == (
            pytest.approx(saved, rel=1e-12)
        )
        assert {k: v for k, v in off.terms.items() if not k.startswith("activations")} == {
            k: v for k, v in on.terms.items() if not k.startswith("activations")
        }
    # at TP = 1 there is nothing to split
    one = [plan_memory(teacher, student, plan(f"parallel.sequence_parallel={sp}", dp=2))[0] for sp in (False, True)]
    assert one[0].terms == one[1].terms


def test_search_finds_fitting_dividing_layout_pairs():
    # the student: 9 heads / 3 KV heads, 6 layers (TP in {1, 3}); the teacher: 8 heads / 2 KV heads,
    # 4 layers (TP in {1, 2}); 2 nodes of 6 GPUs (TP in {1, 2, 3, 6} within a node)
    student = architecture_from_dict(
        dict(LLAMA, num_attention_heads=9, num_key_value_heads=3, hidden_size=72, num_hidden_layers=6)
    )
    teacher_hf = dict(LLAMA, num_attention_heads=8, num_key_value_heads=2, hidden_size=256, intermediate_size=768)
    teacher = architecture_from_dict(teacher_hf)
    keys = (
        "training.global_batch_size=96",
        "rollout.batch_size=96",
        "training.max_length=66",  # SP at TP=3 needs a multiple of 3
        "training.max_prompt_length=32",
        "training.dtype=bf16",
    )
    cfg = plan(*keys, "training.micro_batch_size=16")
    hardware = dict(nodes=2, gpus_per_node=6)
    every = search_layouts(teacher, student, cfg, gpu_memory_bytes=2**40, include_unfit=True, **hardware)
    assert every and all(x.fits for x in every)
    for x in every:
        assert x.tp * x.pp * x.dp == 12 == x.teacher_tp * x.teacher_pp * x.teacher_dp
        assert x.tp in (1, 3) and 9 % x.tp == 3 % x.tp == 6 % x.pp == 0  # the student divides
        assert x.teacher_tp in (1, 2) and 8 % x.teacher_tp == 2 % x.teacher_tp == 4 % x.teacher_pp == 0
        # the micro-batch: the configured 16 where it divides 96 / DP, else the largest divisor below it
        assert 96 // x.dp % x.micro_batch_size == 0 and x.micro_batch_size == max(
            m for m in range(1, 17) if 96 // x.dp % m == 0
        )
        assert x.sequence_parallel <= (x.tp > 1)
    assert {(x.tp, x.sequence_parallel) for x in every} == {(1, False), (3, False), (3, True)}
    # the trainer refuses SP when TP does not divide max_length: the search leaves it out
    uneven = plan(*keys, "training.micro_batch_size=16", "training.max_length=64")
    assert not any(
        x.sequence_parallel for x in search_layouts(teacher, student, uneven, gpu_memory_bytes=2**40, **hardware)
    )
    # SP never raises the peak of the same layouts
    peaks = {(x.tp, x.pp, x.teacher_tp, x.teacher_pp, x.sequence_parallel): x.peak_bytes for x in every}
    assert all(peaks[k[:4] + (True,)] <= v for k, v in peaks.items() if k[0] > 1)

    # Memory for exactly the student on 1 x 1 x 12 beside the teacher on 2 x 1 x 6: the shared 1 x 1
    # (the whole teacher on every GPU) no longer fits, and that pair is the best of those that do.
    at_dp12 = plan(*keys, "training.micro_batch_size=8")  # 96 / 12 = 8 per DP rank: 16 does not divide it
    peak = plan_memory(teacher, student, at_dp12.at_layout(1, 1, 12, 2, 1))[0].peak
    assert peak < plan_memory(teacher, student, at_dp12.at_layout(1, 1, 12))[0].peak
    found = search_layouts(teacher, student, cfg, gpu_memory_bytes=peak, headroom=1.0, **hardware)
    best = found[0]
    assert (best.tp, best.pp, best.dp, best.teacher_tp, best.teacher_pp, best.teacher_dp) == (1, 1, 12, 2, 1, 6)
    assert best.peak_bytes == peak and best.overrides() == [
        "parallel.tp=1",
        "parallel.pp=1",
        "parallel.teacher_tp=2",
        "parallel.teacher_pp=1",
        "parallel.sequence_parallel=false",
        "training.micro_batch_size=8",
    ]
    assert all(x.peak_bytes <= peak for x in found)
    assert [x for x in every if x.peak_bytes <= peak] == [x for x in found]  # the rest is left out
    ranks = [(x.tp * x.pp, x.pp, x.teacher_pp, x.peak_bytes) for x in found]
    assert ranks == sorted(ranks)
    # a padded vocabulary that TP_t = 2 does not divide leaves the teacher only TP = 1
    odd = search_layouts(
        teacher, student, dataclasses.replace(cfg, padded_vocab=251), gpu_memory_bytes=2**40, **hardware
    )
    assert odd and {x.teacher_tp for x in odd} == {1} and {x.tp for x in odd} == {1}


def test_cli(tmp_path):
    done = run_tool(
        "tools/plan_memory.py",
        "--teacher",
        "llama-13b",
        "--student",
        "llama-7b",
        "--gpus-per-node",
        "8",
        "--gpu-memory-gb",
        "80",
        "--config",
        "examples/configs/minillm.yaml",
        "--tp",
        "4",
        "--teacher-tp",
        "8",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["layout"]["dp"] == 2 and out["config"]["train"]["rollout"]["batch_size"] == 256  # from the YAML
    assert out["suggestions"] and all(s["peak_bytes"] <= 0.9 * 80 * 2**30 for s in out["suggestions"])
    # the teacher on its own TP=8 x DP=1 beside the student's TP=4 x DP=2
    assert (out["layout"]["teacher_tp"], out["layout"]["teacher_dp"]) == (8, 1)
    assert {(b["stage"], b["teacher_stage"]) for b in out["layout"]["breakdown"]} == {(0, 0)}
    best = out["recommendation"]
    assert best == out["search"][0] | {"overrides": best["overrides"]} and best["fits"]
    assert best["tp"] * best["pp"] * best["dp"] == 8 == best["teacher_tp"] * best["teacher_pp"] * best["teacher_dp"]
    assert f"parallel.teacher_tp={best['teacher_tp']}" in best["overrides"]
    (tmp_path / "config.json").write_text(json.dumps(GPT2))
    done = run_tool_in_workers(
        "tools/plan_memory.py",
        "--student",
        str(tmp_path),
        "--teacher",
        "gpt2",
        "--tp",
        "3",
        "--max-length",
        "64",
        "--max-prompt-length",
        "32",
    )
    assert done.returncode == 2 and "TP=3 does not divide the 4 attention heads" in done.stderr
    done = run_tool_in_workers(
        "tools/plan_memory.py",
        "--student",
        str(tmp_path),
        "--teacher",
        "gpt2",
        "--max-length",
        "64",
        "--max-prompt-length",
        "32",
        "--rollout-micro-batch-size",
        "4",
        "--gpus-per-node",
        "2",
    )
    assert done.returncode == 0 and "TP=1  PP=1  DP=2" in done.stdout and "GiB" in done.stdout
    assert "recommended (" in done.stdout and "parallel.teacher_tp=" in done.stdout.splitlines()[-1]
