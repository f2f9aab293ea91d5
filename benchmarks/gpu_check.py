"""The one-GPU check: parity with transformers, MiniLLM iterations against the memory planner, decode
speed against HF ``generate``, and the vocab-parallel reverse KL against a memory pass and the naive loss.

    python benchmarks/gpu_check.py [--tiny] [--only NAME ...] [--workdir DIR]

One process (world size 1, TP = PP = 1) on ``platform.device()``. Each check prints one JSON line
``{"check": name, ...measurements..., "ok": bool}`` on stdout (everything else goes to stderr); a check
that raises prints ``{"check": name, "error": "...", "ok": false}`` and the others still run; the exit
status is 1 if any check failed. Checks (tolerances and meanings: docs/gpu.md):

- ``environment``: versions and the device; fails without a GPU unless --tiny;
- ``hf_parity``: LLaMA (GQA), OPT and GPT-2 random-init transformers models converted to ours: logits
  and gradients (through megatron DDP) equal transformers' in fp32 with TF32 off, and as close as
  transformers' own bf16 is to fp32 in bf16;
- ``minillm_iterations``: the real ``Trainer`` (teacher-mixed rollouts, PPO, single-step term, L_PT)
  in bf16 on a random-init ~0.85B LLaMA teacher and ~0.27B student saved as native checkpoints, with
  data written through ``data.preprocess``: seconds per iteration, rollout tokens/s, peak CUDA memory
  per phase against the memory planner's prediction for the same config;
- ``sampler_decode``: greedy decoding of ours vs HF ``generate`` (KV cache) on the student-shaped
  model: tokens/s in bf16, tokens equal in fp32;
- ``speculative_sampling``: teacher-mixed rollouts of the random teacher/student pair, speculative
  (k = 2, 4) vs token by token: bf16 time ratio and tokens per teacher forward; fp32 greedy tokens equal;
- ``reverse_kl_loss``: ``losses.reverse_kl`` forward + backward on [4, 1024, 128256] bf16 logits against
  a memory pass over the same bytes and the naive autograd loss: time, peak memory, agreement.

--tiny runs every check at toy sizes; it works on CPU (how this script is tested without a GPU).
"""

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig

from megatron_minillm.checkpoint.dist_checkpoint import CheckpointMetadata, save_checkpoint
from megatron_minillm.checkpoint.hf_mapping import (
    hf_to_mcore,
    load_full_tensors,
    local_full_names,
    shard_tensor,
    strict_getter,
)
from megatron_minillm.config import load_config
from megatron_minillm.data.micro_batch import MicroBatch
from megatron_minillm.data.preprocess import (
    InstructionConfig,
    PreprocessConfig,
    preprocess_instructions,
    preprocess_pretrain,
)
from megatron_minillm.losses import KernelOptions, masked_lm_loss, reverse_kl
from megatron_minillm.models import Architecture, architecture_from_dict, build_model, load_architecture
from megatron_minillm.parallel import init_distributed
from megatron_minillm.planning import PlanConfig, plan_memory
from megatron_minillm.platform import device, is_cuda
from megatron_minillm.sampling import SamplingParams, generate, sample_seeds
from megatron_minillm.training import forward_backward, setup_model_and_optimizer
from megatron_minillm.training.trainer import Timers, Trainer

FP32_TOL = 1e-4  # fp32, TF32 off: max |ours - HF| / max |HF|, logits and every gradient tensor
BF16_LOGITS_TOL = 2e-2  # bf16: max |ours - HF bf16| / max |HF fp32 logits|
BF16_GRAD_FACTOR = 2.0  # bf16 grads: ours' error to the fp32 grads <= this x HF bf16's own (+ BF16_GRAD_SLACK)
BF16_GRAD_SLACK = 1e-3
PLAN_TOL = 0.10  # predicted / measured peak memory within 10 %
GREEDY_SEQUENCES_MIN = 0.9  # fp32 greedy: fraction of sequences identical to HF generate's
LOSS_VALUE_TOL, LOSS_GRAD_TOL = 1e-3, 1e-2  # reverse KL vs naive: relative value; max |dg| / max |g| (bf16)
GiB = 2**30


@dataclass(frozen=True)
class Scale:
    """The sizes of every check: the real ones, or toy ones (--tiny) that run on CPU too."""

    parity_hidden: int
    parity_layers: int
    parity_vocab: int  # not a multiple of 128: the padded vocabulary is exercised
    parity_tokens: tuple[int, int]  # [b, s] of each of the two micro-batches
    teacher: dict  # HF config values
    student: dict
    max_prompt_length: int
    max_length: int
    train: tuple[str, ...]  # the other training config overrides
    iterations: int
    decode: tuple[int, int, int]  # batch, prompt tokens, new tokens
    repeats: int  # timed runs after a warm-up (the best counts)
    loss_shape: tuple[int, int, int]  # [b, s, V] logits
    # The planner's 10 % as a pass criterion: not at toy sizes, where fixed costs (cuBLAS workspaces,
    # loss chunk buffers) are most of the memory.
    judge_memory: bool


def _llama(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, vocab: int) -> dict:
    return dict(
        model_type="llama",
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


FULL = Scale(
    parity_hidden=256,
    parity_layers=4,
    parity_vocab=1000,
    parity_tokens=(2, 128),
    teacher=_llama(2048, 5632, 16, 16, 4, 32000),  # ~0.85B
    student=_llama(1024, 2816, 16, 8, 8, 32000),  # ~0.27B
    max_prompt_length=256,
    max_length=512,
    train=(
        "training.micro_batch_size=4",
        "training.global_batch_size=16",
        "rollout.batch_size=64",
        "rollout.micro_batch_size=32",
    ),
    iterations=3,
    decode=(16, 128, 128),
    repeats=3,
    loss_shape=(4, 1024, 128256),
    judge_memory=True,
)
TINY = Scale(
    parity_hidden=64,
    parity_layers=2,
    parity_vocab=250,
    parity_tokens=(2, 16),
    teacher=_llama(128, 352, 2, 4, 2, 1000),
    student=_llama(64, 176, 2, 4, 4, 1000),
    max_prompt_length=16,
    max_length=32,
    train=(
        "training.micro_batch_size=2",
        "training.global_batch_size=4",
        "rollout.batch_size=8",
        "rollout.micro_batch_size=4",
        "minillm.ppo_epochs=1",
    ),
    iterations=3,
    decode=(4, 8, 8),
    repeats=3,
    loss_shape=(2, 32, 1000),
    judge_memory=False,
)


# --------------------------------------------------------------------------------------------------
# helpers


def _sync() -> None:
    if is_cuda():
        torch.cuda.synchronize()


def _best(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` calls after a warm-up (which compiles, allocates, fills caches)."""
    fn()
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return min(times)


def _free() -> None:
    gc.collect()
    if is_cuda():
        torch.cuda.empty_cache()


def _round(x: float | None, digits: int = 4) -> float | None:
    """``digits`` significant digits (None and non-finite values as they are)."""
    if x is None or not math.isfinite(x) or x == 0:
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def _rel_max(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|."""
    got, ref = got.float(), ref.float()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _rel_norm(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| (Frobenius)."""
    got, ref = got.float(), ref.float()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _ensure_parallel() -> None:
    """megatron's TP/PP groups at TP = PP = 1 (a failed check may have left them torn down)."""
    if not parallel_state.model_parallel_is_initialized():
        init_distributed(tp=1, pp=1)


# --------------------------------------------------------------------------------------------------
# environment


def check_environment(tiny: bool) -> dict:
    """Versions and the device; without a GPU only --tiny can run."""
    import megatron.core

    try:
        import transformer_engine  # noqa: F401

        te = True
    except ImportError:
        te = False
    out = {
        "device": torch.cuda.get_device_name() if is_cuda() else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "megatron_core": megatron.core.__version__,
        "transformers": transformers.__version__,
        "transformer_engine": te,
        "tiny": tiny,
        "ok": is_cuda() or tiny,
    }
    if not out["ok"]:
        out["error"] = "no GPU (torch.cuda.is_available() is False); --tiny runs toy sizes on CPU"
    return out


# --------------------------------------------------------------------------------------------------
# (a) parity with transformers


def _parity_hf_config(family: str, s: Scale) -> transformers.PretrainedConfig:
    h, layers, vocab, ctx = s.parity_hidden, s.parity_layers, s.parity_vocab, 2 * s.parity_tokens[1]
    if family == "llama":  # GQA: 8 query heads, 2 KV heads
        return transformers.LlamaConfig(
            hidden_size=h,
            intermediate_size=3 * h // 2,
            num_hidden_layers=layers,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=vocab,
            max_position_embeddings=ctx,
            tie_word_embeddings=False,
            rms_norm_eps=1e-5,
        )
    if family == "opt":
        return transformers.OPTConfig(
            hidden_size=h,
            ffn_dim=4 * h,
            num_hidden_layers=layers,
            num_attention_heads=8,
            vocab_size=vocab,
            max_position_embeddings=ctx,
            word_embed_proj_dim=h,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
        )
    return transformers.GPT2Config(
        n_embd=h,
        n_layer=layers,
        n_head=8,
        vocab_size=vocab,
        n_positions=ctx,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )


def _parity_hf_model(family: str, s: Scale) -> transformers.PreTrainedModel:
    """Random init on the host, norms and biases randomised too (HF inits them to 1 and 0)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_parity_hf_config(family, s), attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.float().eval()


def _parity_batches(s: Scale) -> list[MicroBatch]:
    """Two LM micro-batches of random tokens; the first sequence's first 3 positions carry no loss."""
    batch, seq = s.parity_tokens
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2):
        tokens = torch.randint(0, s.parity_vocab, (batch, seq + 1), generator=gen)
        loss_mask = torch.ones(batch, seq)
        loss_mask[0, :3] = 0
        out.append(
            MicroBatch(
                tokens=tokens[:, :-1].to(device()),
                labels=tokens[:, 1:].to(device()),
                loss_mask=loss_mask.to(device()),
                position_ids=torch.arange(seq, device=device()).expand(batch, seq),
                kind="lm",
            )
        )
    return out


def _hf_logits_and_grads(hf: torch.nn.Module, batches: list[MicroBatch]) -> tuple[list[torch.Tensor], dict]:
    """HF logits (fp32 copies) and the gradients of the mean over micro-batches of the token-mean CE."""
    hf.zero_grad()
    logits, losses = [], []
    for b in batches:
        out = hf(b.tokens).logits
        logits.append(out.detach().float())
        ce = F.cross_entropy(out.float().transpose(1, 2), b.labels, reduction="none")
        losses.append((ce * b.loss_mask).sum() / b.loss_mask.sum())
    torch.stack(losses).mean().backward()
    return logits, {n: p.grad.float() for n, p in hf.named_parameters()}


def _ours_logits_and_grads(
    arch: Architecture, dtype: str, weights: dict, batches: list[MicroBatch]
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], torch.nn.Module]:
    """Our model's logits ([b, s, V], padding cut) and DDP main grads (fp32), by megatron parameter
    name, from one forward/backward of the training path (megatron's schedule + DDP); and the model."""
    model = build_model(arch, dtype=dtype, perform_initialization=False)
    load_full_tensors(model, hf_to_mcore(arch, strict_getter(weights, "HF model")))
    ddp, _, _ = setup_model_and_optimizer(model, OptimizerConfig(lr=1e-3, bf16=dtype == "bf16"))
    ddp.zero_grad_buffer()
    seen: list[torch.Tensor] = []

    def loss_func(batch: MicroBatch, logits: torch.Tensor):
        seen.append(logits.detach()[..., : arch.vocab_size].float())
        loss = masked_lm_loss(logits, batch.labels, batch.loss_mask, arch.vocab_size)
        return loss, {"lm loss": loss.detach().clone()}

    forward_backward(ddp, batches, loss_func)
    params = dict(model.named_parameters())
    return seen, {name: params[name].main_grad.float() for name in local_full_names(model)}, model


def _parity_family(family: str, s: Scale) -> dict:
    hf = _parity_hf_model(family, s)
    weights = {k: v.clone() for k, v in hf.state_dict().items()}
    arch = architecture_from_dict(hf.config.to_dict())
    batches = _parity_batches(s)
    hf = hf.to(device())
    ref_logits, ref_grads = _hf_logits_and_grads(hf, batches)
    hf_bf16_logits, hf_bf16_grads = _hf_logits_and_grads(copy.deepcopy(hf).to(torch.bfloat16), batches)
    del hf

    def expected(grads: dict, model: torch.nn.Module) -> dict:
        """HF gradients in megatron's layout, shaped as this model's parameters (vocab padding)."""
        full = hf_to_mcore(arch, strict_getter(grads, "HF grads"))
        params = dict(model.named_parameters())
        return {
            name: shard_tensor(full[full_name], params[name], full_name, model.config.gated_linear_unit)
            for name, full_name in local_full_names(model).items()
        }

    out: dict = {}
    logits, grads, model = _ours_logits_and_grads(arch, "fp32", weights, batches)
    ref = expected(ref_grads, model)
    out["fp32_logits"] = max(_rel_max(a, b) for a, b in zip(logits, ref_logits))
    worst = max(grads, key=lambda n: _rel_max(grads[n], ref[n]))
    out["fp32_grads"], out["fp32_grads_worst_tensor"] = _rel_max(grads[worst], ref[worst]), worst
    del model, logits, grads

    logits, grads, model = _ours_logits_and_grads(arch, "bf16", weights, batches)
    hf_bf16 = expected(hf_bf16_grads, model)
    scale = max(r.abs().max().item() for r in ref_logits)
    out["bf16_logits"] = max((a - b).abs().max().item() for a, b in zip(logits, hf_bf16_logits)) / scale
    out["bf16_logits_hf_vs_fp32"] = max((a - b).abs().max().item() for a, b in zip(hf_bf16_logits, ref_logits)) / scale
    out["bf16_grads"] = max(_rel_norm(grads[n], ref[n]) for n in grads)
    out["bf16_grads_hf"] = max(_rel_norm(hf_bf16[n], ref[n]) for n in grads)
    out["ok"] = (
        out["fp32_logits"] <= FP32_TOL
        and out["fp32_grads"] <= FP32_TOL
        and out["bf16_logits"] <= BF16_LOGITS_TOL
        and out["bf16_grads"] <= BF16_GRAD_FACTOR * out["bf16_grads_hf"] + BF16_GRAD_SLACK
    )
    return {k: _round(v) if isinstance(v, float) else v for k, v in out.items()}


def check_hf_parity(s: Scale) -> dict:
    """Logits and gradients of ours vs transformers on the same weights, fp32 (TF32 off) and bf16."""
    _ensure_parallel()
    families = {family: _parity_family(family, s) for family in ("llama", "opt", "gpt2")}
    return {
        "families": families,
        "tolerance": {
            "fp32": FP32_TOL,
            "bf16_logits": BF16_LOGITS_TOL,
            "bf16_grads": f"<= {BF16_GRAD_FACTOR} x HF bf16's + {BF16_GRAD_SLACK}",
        },
        "ok": all(f["ok"] for f in families.values()),
    }


# --------------------------------------------------------------------------------------------------
# (b) MiniLLM iterations vs the memory planner


def _word_tokenizer(vocab: int, out: Path) -> None:
    """A word-level tokenizer whose token i is the word ``w<i>`` (0: EOS, 1: pad, 2: unknown), so
    random token data written as text comes back as exactly those ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<|endoftext|>": 0, "<|pad|>": 1, "<unk>": 2} | {f"w{i}": i for i in range(3, vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>", unk_token="<unk>"
    ).save_pretrained(out)


def _hf_config(spec: dict) -> transformers.PretrainedConfig:
    """The HF config of ``spec`` with the special ids of :func:`_word_tokenizer`."""
    return transformers.AutoConfig.for_model(**spec, eos_token_id=0, pad_token_id=1, bos_token_id=None)


def _random_checkpoint(spec: dict, dtype: str, tokenizer_dir: Path, out: Path) -> None:
    """A native checkpoint of a random-init model (megatron's init) with ``spec``'s HF config.json."""
    hf_dir = out.with_name(out.name + "_hf")
    shutil.copytree(tokenizer_dir, hf_dir)
    _hf_config(spec).save_pretrained(hf_dir)
    arch = load_architecture(hf_dir)
    model = build_model(arch, dtype=dtype)
    meta = CheckpointMetadata.of(model, arch, dtype, source="random init (benchmarks/gpu_check.py)")
    save_checkpoint(model, out, meta, hf_dir)


def _random_data(s: Scale, vocab: int, tokenizer: Path, work: Path) -> tuple[Path, Path]:
    """Instruction prompts (half to all of max_prompt_length random words) and pretraining text,
    through ``data.preprocess``; returns the two dataset prefixes."""
    gen = torch.Generator().manual_seed(2)

    def words(n: int) -> str:
        return " ".join(f"w{i}" for i in torch.randint(3, vocab, (n,), generator=gen).tolist())

    rows = [
        {"prompt": words(int(n)), "completion": " " + words(16)}
        for n in torch.randint(s.max_prompt_length // 2, s.max_prompt_length + 1, (256,), generator=gen)
    ]
    (work / "inst.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "pt.jsonl").write_text("".join(json.dumps({"text": words(4 * s.max_length)}) + "\n" for _ in range(32)))
    preprocess_instructions(
        InstructionConfig(
            inputs=[str(work / "inst.jsonl")],
            output_prefix=str(work / "inst"),
            tokenizer=str(tokenizer),
            template="none",
            max_prompt_length=s.max_prompt_length,
            max_length=s.max_length,
        )
    )
    preprocess_pretrain(
        PreprocessConfig(inputs=[str(work / "pt.jsonl")], output_prefix=str(work / "pt"), tokenizer=str(tokenizer))
    )
    return work / "inst_train", work / "pt_train"


class _PhasePeaks:
    """Peak allocated CUDA memory per trainer phase (the high-water mark is reset as a phase starts)
    and over the whole run."""

    def __init__(self) -> None:
        self.phases: dict[str, int] = {}
        self.overall = 0

    def wrap(self, phase: str, fn: Callable) -> Callable:
        def run(*args, **kwargs):
            self.overall = max(self.overall, torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
            try:
                return fn(*args, **kwargs)
            finally:
                peak = torch.cuda.max_memory_allocated()
                self.phases[phase] = max(self.phases.get(phase, 0), peak)
                self.overall = max(self.overall, peak)

        return run


def check_minillm_iterations(s: Scale, work: Path) -> dict:
    """The real trainer's MiniLLM iterations in bf16: speed, and peak memory against the planner."""
    _ensure_parallel()
    _word_tokenizer(s.student["vocab_size"], work / "tokenizer")
    for name in ("teacher", "student"):
        _random_checkpoint(getattr(s, name), "bf16", work / "tokenizer", work / name)
    _free()
    data, pt_data = _random_data(s, s.student["vocab_size"], work / "student", work)
    cfg = load_config(
        None,
        [
            f"student={work / 'student'}",
            f"teacher={work / 'teacher'}",
            f"data={data}",
            f"pt_data={pt_data}",
            "algorithm=minillm",
            "training.dtype=bf16",
            f"training.train_iters={s.iterations}",
            f"training.max_prompt_length={s.max_prompt_length}",
            f"training.max_length={s.max_length}",
            "optimizer.lr=1e-5",
            "optimizer.lr_warmup_iters=0",
            *s.train,
        ],
    )
    parallel_state.destroy_model_parallel()  # the trainer initialises its own layout
    before = torch.cuda.memory_allocated() if is_cuda() else 0  # what earlier checks left allocated
    trainer = Trainer(cfg)
    peaks = _PhasePeaks()
    if is_cuda():
        torch.cuda.reset_peak_memory_stats()
        for phase, attr in (("rollout", "_rollouts"), ("score", "_score"), ("train", "_train_step")):
            setattr(trainer, attr, peaks.wrap(phase, getattr(trainer, attr)))
    seconds, tokens_per_s, metrics = [], [], {}
    for iteration in range(s.iterations):
        trainer.timers = Timers()
        _sync()
        start = time.perf_counter()
        metrics = trainer.iteration(iteration)
        _sync()
        seconds.append(time.perf_counter() - start)
        tokens = metrics["response length"] * cfg.rollout.batch_size
        tokens_per_s.append(tokens / trainer.timers.seconds["rollout"])
    out = {
        "config": {k: v for k, v in cfg.to_dict().items() if k in ("training", "rollout", "minillm")},
        "seconds_per_iteration": _round(sum(seconds[1:]) / max(len(seconds) - 1, 1)),
        "first_iteration_s": _round(seconds[0]),
        "rollout_tokens_per_s": _round(sum(tokens_per_s[1:]) / max(len(tokens_per_s) - 1, 1)),
        "last_metrics": {k: _round(v) for k, v in metrics.items()},
    }
    finite = all(math.isfinite(v) for v in metrics.values())

    plan = max(
        plan_memory(load_architecture(cfg.teacher), trainer.arch, PlanConfig.from_train(cfg)), key=lambda b: b.peak
    )
    predicted = {
        "rollout": plan.phases["rollout"],
        "score": max(plan.phases["score"], plan.phases["score (L_PT/KD, per step)"]),
        "train": max(plan.phases["train"], plan.phases["optimizer step"]),
    }
    out["predicted_peak_gib"] = _round(plan.peak / GiB)
    if not is_cuda():  # CPU (--tiny): no allocator statistics to compare with
        out.update(max_memory_allocated_gib=None, ok=finite)
        return out
    measured = max(peaks.overall, torch.cuda.max_memory_allocated()) - before
    ratio = plan.peak / measured
    out.update(
        allocated_before_gib=_round(before / GiB),
        max_memory_allocated_gib=_round(measured / GiB),
        peak_ratio_predicted_vs_measured=_round(ratio),
        phases={
            phase: {
                "predicted_gib": _round(predicted[phase] / GiB),
                "measured_gib": _round((peaks.phases[phase] - before) / GiB),
                "ratio": _round(predicted[phase] / (peaks.phases[phase] - before)),
            }
            for phase in predicted
        },
        tolerance=PLAN_TOL,
    )
    out["ok"] = finite and (not s.judge_memory or abs(ratio - 1) <= PLAN_TOL)
    return out


# --------------------------------------------------------------------------------------------------
# (c) sampler vs HF generate


def check_sampler_decode(s: Scale) -> dict:
    """Greedy decoding, KV cache on both sides, the same weights, prompts and number of new tokens
    (EOS banned until then): bf16 tokens/s of ours vs HF ``generate``; fp32 tokens compared."""
    _ensure_parallel()
    config = _hf_config(s.student)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # peaked next-token distributions, as a trained model's: fewer near-ties
        hf.lm_head.weight.mul_(4.0)
    arch = architecture_from_dict(config.to_dict())
    weights = hf_to_mcore(arch, strict_getter(hf.state_dict(), "HF model"))
    batch, prompt_length, new = s.decode
    prompts = torch.randint(3, arch.vocab_size, (batch, prompt_length), generator=torch.Generator().manual_seed(3))
    input_ids = prompts.to(device())
    params = SamplingParams(greedy=True, max_new_tokens=new, min_new_tokens=new, stop_ids=(config.eos_token_id,))
    seeds = sample_seeds(0, torch.arange(batch))
    out: dict = {"batch": batch, "prompt_tokens": prompt_length, "new_tokens": new}
    for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        hf = hf.to(device=device(), dtype=torch_dtype)
        model = build_model(arch, dtype=dtype, perform_initialization=False)
        load_full_tensors(model, weights)
        result: dict = {}

        def run_hf() -> None:
            with torch.no_grad():
                ids = hf.generate(
                    input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                    pad_token_id=1,
                )
            result["hf"] = ids[:, prompt_length:].cpu()

        def run_ours() -> None:
            result["ours"] = generate(model, prompts.tolist(), params, seeds, vocab_size=arch.vocab_size).tokens.cpu()

        if dtype == "bf16":
            t_hf, t_ours = _best(run_hf, s.repeats), _best(run_ours, s.repeats)
            out.update(
                bf16_hf_tokens_per_s=_round(batch * new / t_hf),
                bf16_ours_tokens_per_s=_round(batch * new / t_ours),
                bf16_tokens_per_s_vs_hf=_round(t_hf / t_ours),
            )
        else:
            run_hf()
            run_ours()
        equal = result["ours"] == result["hf"]
        out[f"{dtype}_tokens_equal"] = _round(equal.float().mean().item())
        out[f"{dtype}_sequences_equal"] = _round(equal.all(dim=1).float().mean().item())
    out["ok"] = out["fp32_sequences_equal"] >= GREEDY_SEQUENCES_MIN
    return out


def check_speculative_sampling(s: Scale) -> dict:
    """Teacher-mixed rollouts (alpha = 0.2, temperature 1) of the teacher- and student-shaped models:
    bf16 time of speculative sampling at k = 2 and 4 against token by token, with tokens kept per
    teacher forward; fp32 greedy speculative tokens against token by token (the same in exact math)."""
    _ensure_parallel()
    batch, prompt_length, new = s.decode
    prompts = torch.randint(
        3, s.student["vocab_size"], (batch, prompt_length), generator=torch.Generator().manual_seed(4)
    )
    seeds = sample_seeds(0, torch.arange(batch))
    out: dict = {"batch": batch, "prompt_tokens": prompt_length, "new_tokens": new, "mix_alpha": 0.2}
    for dtype in ("fp32", "bf16"):
        models = []
        for seed, spec in ((0, s.student), (1, s.teacher)):
            torch.manual_seed(seed)
            arch = architecture_from_dict(_hf_config(spec).to_dict())
            models.append(build_model(arch, dtype=dtype))
        student, teacher = models

        def run(k: int, greedy: bool = False):
            params = SamplingParams(max_new_tokens=new, mix_alpha=0.2, greedy=greedy, speculative_k=k)
            return generate(student, prompts.tolist(), params, seeds, vocab_size=arch.vocab_size, teacher=teacher)

        if dtype == "fp32":
            equal = run(2, greedy=True).tokens.cpu() == run(0, greedy=True).tokens.cpu()
            out["fp32_greedy_sequences_equal"] = _round(equal.all(dim=1).float().mean().item())
            continue
        token_by_token = _best(lambda: run(0), s.repeats)
        for k in (2, 4):
            seconds = _best(lambda: run(k), s.repeats)  # noqa: B023
            out[f"bf16_k{k}_vs_token_by_token"] = _round(seconds / token_by_token)
            out[f"bf16_k{k}_tokens_per_teacher_forward"] = _round(run(k).speculation.tokens_per_teacher_forward)
        out["bf16_token_by_token_s"] = _round(token_by_token)
    out["ok"] = out["fp32_greedy_sequences_equal"] >= GREEDY_SEQUENCES_MIN
    return out


# --------------------------------------------------------------------------------------------------
# (d) the reverse KL loss


def check_reverse_kl_loss(s: Scale) -> dict:
    """``losses.reverse_kl`` forward + backward on bf16 logits [b, s, V] (token mean): time and peak
    memory against a memory pass over the same bytes (read both logits, write one gradient) and the
    naive autograd loss; values and gradients against the naive loss."""
    _ensure_parallel()
    gen = torch.Generator(device=device()).manual_seed(0)
    student = (torch.randn(s.loss_shape, generator=gen, device=device()) * 2).to(torch.bfloat16)
    teacher = (torch.randn(s.loss_shape, generator=gen, device=device()) * 2).to(torch.bfloat16)

    def bandwidth() -> tuple[None, torch.Tensor]:
        out = torch.empty_like(student)
        return None, torch.add(student, teacher, out=out)

    def naive() -> tuple[torch.Tensor, torch.Tensor]:
        x = student.detach().requires_grad_()
        log_q, log_p = torch.log_softmax(x.float(), -1), torch.log_softmax(teacher.float(), -1)
        loss = (log_q.exp() * (log_q - log_p)).sum(-1).mean()
        loss.backward()
        return loss.detach(), x.grad

    def ours(options: KernelOptions) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        def run() -> tuple[torch.Tensor, torch.Tensor]:
            x = student.detach().requires_grad_()
            loss = reverse_kl(x, teacher, options=options)
            loss.backward()
            return loss.detach(), x.grad

        return run

    variants = {
        "naive": naive,  # first: the reference the others are compared with
        "bandwidth": bandwidth,
        "ours": ours(KernelOptions()),  # the defaults, what the trainer runs
        "ours_compiled": ours(KernelOptions(compiled=True)),
        "ours_chunk256": ours(KernelOptions(chunk_tokens=256)),  # fewer, larger chunks than the default
    }
    out: dict = {"shape": list(s.loss_shape), "dtype": "bf16"}
    reference = None
    for name, fn in variants.items():
        seconds = _best(fn, s.repeats)
        peak = None
        if is_cuda():
            _free()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        loss, grad = fn()
        if is_cuda():
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        row: dict = {"seconds": _round(seconds), "peak_mib": _round(peak)}
        if name == "bandwidth":
            row["gb_per_s"] = _round(3 * student.numel() * student.element_size() / seconds / 1e9)
        if name == "naive":
            reference = (loss, grad)
        elif loss is not None:
            row["value_rel_error"] = _round(abs(loss.item() - reference[0].item()) / abs(reference[0].item()))
            row["grad_rel_error"] = _round(_rel_max(grad, reference[1]))
            row["ok"] = row["value_rel_error"] <= LOSS_VALUE_TOL and row["grad_rel_error"] <= LOSS_GRAD_TOL
        out[name] = row
        del loss, grad
    for name in ("ours", "ours_compiled", "ours_chunk256"):
        out[f"{name}_time_vs_bandwidth"] = _round(out[name]["seconds"] / out["bandwidth"]["seconds"])
        out[f"{name}_time_vs_naive"] = _round(out[name]["seconds"] / out["naive"]["seconds"])
        if is_cuda():
            out[f"{name}_peak_vs_naive"] = _round(out[name]["peak_mib"] / out["naive"]["peak_mib"])
    out["tolerance"] = {"value": LOSS_VALUE_TOL, "grad": LOSS_GRAD_TOL}
    out["ok"] = all(out[name]["ok"] for name in ("ours", "ours_compiled", "ours_chunk256"))
    return out


# --------------------------------------------------------------------------------------------------
# the run


def _run_check(name: str, fn: Callable[[], dict]) -> bool:
    """Run one check, print its JSON line (library output goes to stderr meanwhile); True if ok."""
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            result = fn()
    except Exception as err:  # reported as the check's failure; the next check still runs
        traceback.print_exc()
        result = {"error": f"{type(err).__name__}: {err}"[:2000], "ok": False}
    finally:
        _free()
    ok = bool(result.pop("ok"))
    print(
        json.dumps({"check": name, **result, "seconds_total": _round(time.perf_counter() - start), "ok": ok}),
        flush=True,
    )
    return ok


def main() -> int:
    checks = ("hf_parity", "minillm_iterations", "sampler_decode", "speculative_sampling", "reverse_kl_loss")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="toy sizes; runs on CPU too")
    parser.add_argument("--only", action="append", choices=checks, help="run only this check (repeatable)")
    parser.add_argument(
        "--workdir",
        help="where minillm_iterations writes its checkpoints and data: a temporary directory inside it, "
        "removed at the end (default: the system's temporary directory)",
    )
    args = parser.parse_args()
    scale = TINY if args.tiny else FULL

    with socket.socket() as sock:  # one process: world size 1 on a free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_distributed(tp=1, pp=1)
    # fp32 means fp32: TF32 matmuls would put ~1e-3 errors into the fp32 parity and greedy decoding.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if not _run_check("environment", lambda: check_environment(args.tiny)):
        return 1

    work = Path(tempfile.mkdtemp(prefix="gpu_check-", dir=args.workdir))
    runs = {
        "hf_parity": lambda: check_hf_parity(scale),
        "minillm_iterations": lambda: check_minillm_iterations(scale, work),
        "sampler_decode": lambda: check_sampler_decode(scale),
        "speculative_sampling": lambda: check_speculative_sampling(scale),
        "reverse_kl_loss": lambda: check_reverse_kl_loss(scale),
    }
    try:
        results = [_run_check(name, runs[name]) for name in args.only or checks]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
