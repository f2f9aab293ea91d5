"""The memory planner: parameter terms against built models, known sizes, layout rules, the CLI.

How close its peak is to measured memory is benchmarks/bench_plan_memory.py's job (minutes, not a test).
"""

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
    stage_parameters,
    suggest_layouts,
)


def plan(*overrides: str, dp: int = 1, pt_data: bool = True) -> PlanConfig:
    """The plan of the training config's defaults with ``section.key=value`` overrides."""
    return PlanConfig(load_config(None, overrides, require_paths=False), dp=dp, pt_data=pt_data)


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
        "--json",
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["layout"]["dp"] == 2 and out["config"]["train"]["rollout"]["batch_size"] == 256  # from the YAML
    assert out["suggestions"] and all(s["peak_bytes"] <= 0.9 * 80 * 2**30 for s in out["suggestions"])
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
