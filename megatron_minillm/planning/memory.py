"""Per-GPU memory of a teacher/student run at TP x PP x DP, and the layouts that fit.

Pure arithmetic on :class:`~megatron_minillm.models.Architecture` (no model is built). Each term
follows what this repository's code keeps alive, not a generic transformer; docs/memory.md gives the
formulas and `benchmarks/bench_plan_memory.py` compares the prediction with measured peak memory.

What the trainer keeps (``training/trainer.py``), per rank of a TP x PP x DP layout:

* persistent: student and teacher weights (``dtype``) of this pipeline stage's TP shard; the
  student's megatron-DDP gradient buffer (fp32: ``grad_reduce_in_fp32``); AdamW moments (2 x fp32)
  and, for bf16, fp32 main parameters, divided by DP with the distributed optimizer. The teacher is
  frozen: no gradients, no optimizer state.
* per MiniLLM iteration (phases, not alive at the same time):
  rollouts (student + teacher KV caches), scoring (one teacher forward over the rank's rollouts,
  logits kept in ``teacher_cache_dtype`` on the last stage), training (activations of the
  micro-batches in flight, logits and the loss gradients, the cache and one step's L_PT teacher
  logits), the optimizer step.

The peak is the largest phase on the worst pipeline stage (the first stage holds PP micro-batches
in flight under 1F1B and the embedding, the last the output layer, logits and the cache).
"""

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from megatron_minillm.algorithms import OBJECTIVES, BatchKind, Objective
from megatron_minillm.config import ParallelConfig, TrainConfig, TrainingConfig
from megatron_minillm.models import Architecture, architecture_from_dict, check_layout, load_architecture
from megatron_minillm.models.builder import DTYPES
from megatron_minillm.models.hf_config import UnsupportedModelError
from megatron_minillm.parallel import LayoutError
from megatron_minillm.parallel.vocab import padded_vocab_size

GiB = 2**30
# The eager chunked loss kernels (every case but fp32 at TP=1, which has a hand-written kernel with
# no temporaries) keep fp32 chunk temporaries of CHUNK_ELEMENTS (2^19) elements alive together
# (losses/vocab_parallel.py); up to 8 were seen at once in the reverse-KL backward chunk of a bf16
# run (benchmarks/bench_plan_memory.py). Not counted op by op: 8 chunks, 16 MiB.
LOSS_CHUNK_WORKSPACE = 8 * 4 * 2**19

# Public Hugging Face config.json values (only the fields the architecture reader uses).
KNOWN_MODELS: dict[str, dict] = {
    "gpt2": dict(
        model_type="gpt2",
        n_embd=768,
        n_layer=12,
        n_head=12,
        vocab_size=50257,
        n_positions=1024,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
    ),
    "gpt2-medium": dict(
        model_type="gpt2",
        n_embd=1024,
        n_layer=24,
        n_head=16,
        vocab_size=50257,
        n_positions=1024,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
    ),
    "gpt2-large": dict(
        model_type="gpt2",
        n_embd=1280,
        n_layer=36,
        n_head=20,
        vocab_size=50257,
        n_positions=1024,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
    ),
    "gpt2-xl": dict(
        model_type="gpt2",
        n_embd=1600,
        n_layer=48,
        n_head=25,
        vocab_size=50257,
        n_positions=1024,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
    ),
    "opt-1.3b": dict(
        model_type="opt",
        hidden_size=2048,
        ffn_dim=8192,
        num_hidden_layers=24,
        num_attention_heads=32,
        vocab_size=50272,
        max_position_embeddings=2048,
        word_embed_proj_dim=2048,
        do_layer_norm_before=True,
        activation_function="relu",
        tie_word_embeddings=True,
    ),
    "opt-13b": dict(
        model_type="opt",
        hidden_size=5120,
        ffn_dim=20480,
        num_hidden_layers=40,
        num_attention_heads=40,
        vocab_size=50272,
        max_position_embeddings=2048,
        word_embed_proj_dim=5120,
        do_layer_norm_before=True,
        activation_function="relu",
        tie_word_embeddings=True,
    ),
    # LLaMA-2 (meta-llama/Llama-2-*-hf)
    "llama-7b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    "llama-13b": dict(
        model_type="llama",
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    "llama-70b": dict(
        model_type="llama",
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    "smollm2-135m": dict(
        model_type="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
}


class PlanError(ValueError):
    """A model or layout the planner cannot plan (unknown name, sizes that do not divide)."""


def resolve_model(spec: str) -> Architecture:
    """A known name (``KNOWN_MODELS``), an HF directory or a config.json path."""
    key = spec.lower()
    if key in KNOWN_MODELS:
        return architecture_from_dict(KNOWN_MODELS[key])
    path = Path(spec)
    if path.is_dir() or path.is_file():
        return load_architecture(path)
    raise PlanError(
        f"{spec!r} is neither a known model name nor an HF model directory/config.json; "
        f"known names: {', '.join(KNOWN_MODELS)}"
    )


# --------------------------------------------------------------------------------------------------
# parameters


def stage_tensors(
    arch: Architecture,
    tp: int,
    pp: int,
    stage: int,
    make_vocab_size_divisible_by: int = 128,
    padded_vocab: int | None = None,
) -> list[tuple[str, int]]:
    """(name, numel) of every parameter one TP rank of pipeline ``stage`` holds, in the order of
    ``model.parameters()`` of megatron's GPTModel with the local layer spec."""
    h, a, g, d, f = (
        arch.hidden_size,
        arch.num_attention_heads,
        arch.num_query_groups,
        arch.kv_channels,
        arch.ffn_hidden_size,
    )
    vocab = padded_vocab or padded_vocab_size(arch.vocab_size, tp, make_vocab_size_divisible_by)
    layer_norm = arch.normalization == "LayerNorm"
    bias = arch.add_bias_linear
    fc1 = (2 if arch.activation == "swiglu" else 1) * f // tp
    qkv = (a + 2 * g) * d // tp
    out: list[tuple[str, int]] = []
    first, last = stage == 0, stage == pp - 1
    if first:
        out.append(("word_embeddings", vocab // tp * h))
        if arch.position_embedding_type == "learned_absolute":
            out.append(("position_embeddings", (arch.max_position_embeddings + arch.position_offset) * h))
    for _ in range(arch.num_layers // pp):
        out += [("layers.norms", h)] + ([("layers.norms", h)] if layer_norm else [])
        out += [("layers.linear_proj", h * (a * d // tp))] + ([("layers.linear_proj", h)] if bias else [])
        out += [("layers.linear_qkv", qkv * h)] + ([("layers.linear_qkv", qkv)] if bias or arch.add_qkv_bias else [])
        out += [("layers.norms", h)] + ([("layers.norms", h)] if layer_norm else [])
        out += [("layers.linear_fc1", fc1 * h)] + ([("layers.linear_fc1", fc1)] if bias else [])
        out += [("layers.linear_fc2", h * (f // tp))] + ([("layers.linear_fc2", h)] if bias else [])
    if last:
        out += [("final_layernorm", h)] + ([("final_layernorm", h)] if layer_norm else [])
        # Tied embeddings: the first stage's table is the output layer; with PP > 1 the last stage
        # holds its own copy (megatron keeps the two in sync through the embedding group).
        if not arch.tie_word_embeddings or not first:
            out.append(("output_layer", vocab // tp * h))
    return out


def stage_parameters(
    arch: Architecture,
    tp: int,
    pp: int,
    stage: int,
    make_vocab_size_divisible_by: int = 128,
    padded_vocab: int | None = None,
) -> dict[str, int]:
    """Element counts of the parameters one TP rank of pipeline ``stage`` holds, summed by kind
    (``layers.*`` over this stage's layers)."""
    out: dict[str, int] = {}
    for name, numel in stage_tensors(arch, tp, pp, stage, make_vocab_size_divisible_by, padded_vocab):
        out[name] = out.get(name, 0) + numel
    return out


def grad_buffer_numel(
    arch: Architecture,
    tp: int,
    pp: int,
    stage: int,
    dp: int,
    distributed_optimizer: bool,
    make_vocab_size_divisible_by: int = 128,
) -> int:
    """Elements of megatron DDP's gradient buffer (``param_and_grad_buffer``, one bucket: no overlapped
    reduce): parameters in reverse order; with the distributed optimizer each starts at a multiple of
    64 elements, each bucket ends at a multiple of lcm(DP, 128), and a tied embedding shared across
    pipeline stages gets a bucket of its own."""
    tensors = stage_tensors(arch, tp, pp, stage, make_vocab_size_divisible_by)
    if not distributed_optimizer:
        return sum(n for _, n in tensors)
    divisor = math.lcm(dp, 128)
    shared = {"word_embeddings", "output_layer"} if arch.tie_word_embeddings and pp > 1 else set()
    start = bucket_open = 0
    end = 0
    for name, numel in reversed(tensors):
        start = _ceil(start, 64)
        if name in shared and bucket_open:
            start = _ceil(start, divisor)
        end = start + numel
        bucket_open += 1
        if name in shared:
            start, bucket_open = _ceil(end, divisor), 0
            end = start
        else:
            start = end
    return _ceil(end, divisor) if bucket_open else end


def _ceil(x: int, m: int) -> int:
    return -(-x // m) * m


# --------------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class PlanConfig:
    """A training config (algorithm, batches, lengths, dtypes, loss terms: ``train``) at a layout
    of ``train.parallel`` TP x PP and ``dp`` data-parallel ranks."""

    train: TrainConfig
    dp: int = 1
    pt_data: bool = True  # L_PT planned for MiniLLM (planning needs no dataset, only whether there is one)
    make_vocab_size_divisible_by: int = 128

    def __post_init__(self) -> None:
        if self.dp < 1:
            raise PlanError(f"dp must be >= 1, got {self.dp}")

    @classmethod
    def from_train(cls, cfg: TrainConfig, dp: int = 1, **kwargs) -> "PlanConfig":
        """The plan of a training config as it would run: L_PT when it names pretraining data."""
        return cls(cfg, dp, **{"pt_data": bool(cfg.pt_data), **kwargs})

    @property
    def tp(self) -> int:
        return self.train.parallel.tp

    @property
    def pp(self) -> int:
        return self.train.parallel.pp

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def at_layout(self, tp: int, pp: int, dp: int) -> "PlanConfig":
        return replace(self, train=replace(self.train, parallel=ParallelConfig(tp=tp, pp=pp)), dp=dp)

    @property
    def objective(self) -> Objective:
        """The algorithm's declarations (batch kinds, teacher outputs, loss terms) that size memory."""
        return OBJECTIVES[self.train.algorithm](self.train, vocab_size=0, pt_data=self.pt_data)


@dataclass
class MemoryBreakdown:
    """Bytes per rank of one pipeline stage: ``terms`` (what is allocated) and ``phases`` (what is
    alive together at each phase's peak); ``peak`` is the largest phase."""

    stage: int
    terms: dict[str, float]
    phases: dict[str, float]
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    def to_dict(self) -> dict:
        return {"stage": self.stage, "peak_bytes": self.peak, "peak_phase": self.peak_phase, **asdict(self)}


def _layer_saved_bytes(arch: Architecture, tokens: int, seq: int, tp: int, nbytes: int) -> float:
    """Bytes one transformer layer of megatron's local spec (SDPA core attention, no sequence
    parallelism, dropout 0) saves for backward, per TP rank, for ``tokens`` = b x s tokens.

    Counted from the autograd graph (what ``saved_tensors_hooks`` sees, unique storages):
    each norm keeps its input (LayerNorm: input + fp32 mean/rstd; RMSNorm: torch's composite
    ``rms_norm`` keeps the fp32 input and the fp32 normalized tensor, 8 B/element whatever the
    dtype); QKV keeps its input (h) and its output (q/k/v are views of it; RoPE adds new q and k);
    SDPA keeps q, k, v, its output (the projection's input) and an fp32 log-sum-exp per head; the MLP
    keeps fc1's input (h), and for SwiGLU fc1's output (2f), silu's output (f), the linear half
    (f, megatron adds ``glu_linear_offset``) and the product (fc2's input, f); ReLU: one f
    (relu saves its result, which is fc2's input); GELU: two (its input and fc2's input).
    """
    h, a, g, d, f = (
        arch.hidden_size,
        arch.num_attention_heads,
        arch.num_query_groups,
        arch.kv_channels,
        arch.ffn_hidden_size,
    )
    rope = arch.position_embedding_type == "rope"
    if arch.normalization == "LayerNorm":
        norm = nbytes * h + 8
    else:
        norm = 8 * h + 4
    qkv = nbytes * (a + 2 * g) * d / tp + (nbytes * (a + g) * d / tp if rope else 0)
    mlp_units = {"swiglu": 5, "relu": 1}.get(arch.activation, 2)
    per_token = 2 * norm + 2 * nbytes * h + qkv + nbytes * a * d / tp + 4 * a / tp + nbytes * mlp_units * f / tp
    rope_tables = 4 * seq * d * nbytes if rope else 0  # cos/sin of q and k, [s, 1, 1, d] each
    return tokens * per_token + rope_tables


def _forward_only_layer_bytes(arch: Architecture, tokens: int, tp: int, nbytes: int) -> float:
    """Largest set of one layer's temporaries alive at once without autograd (the MLP: the layer's
    input and residual, fc1's output, and for SwiGLU silu's output, the linear half and the product)."""
    f, h = arch.ffn_hidden_size, arch.hidden_size
    mlp_units = 5 if arch.activation == "swiglu" else 2
    return tokens * nbytes * (2 * h + mlp_units * f / tp)


def _logit_positions(t: TrainingConfig, kind: BatchKind) -> int:
    """Positions per sample whose logits a micro-batch of ``kind`` computes (the trainer computes the
    output layer at the loss positions only): sampled responses have at most max_length -
    max_prompt_length tokens, a dataset's response fills at most the whole sequence (a 1-token
    prompt: the worst case), pretraining text uses every position."""
    if kind.responses == "sampled":
        return t.max_length - t.max_prompt_length
    return t.max_length


def _stage_breakdown(
    teacher: Architecture | None, student: Architecture, cfg: PlanConfig, stage: int
) -> MemoryBreakdown:
    t, tp, pp, dp = cfg.train.training, cfg.tp, cfg.pp, cfg.dp
    B, cache_B = DTYPES[t.dtype].itemsize, DTYPES[t.teacher_cache_dtype].itemsize
    last = stage == pp - 1
    objective = cfg.objective
    main, pt = objective.main_kind, objective.pretraining_kind
    train_kinds = [main] + ([pt] if pt else [])  # the kinds of one optimizer step's micro-batches
    on_policy = objective.samples == "student"
    notes: list[str] = []

    s_params = stage_parameters(student, tp, pp, stage, cfg.make_vocab_size_divisible_by)
    n_student = sum(s_params.values())
    n_teacher = (
        sum(stage_parameters(teacher, tp, pp, stage, cfg.make_vocab_size_divisible_by).values()) if teacher else 0
    )
    layers_s = student.num_layers // pp
    distributed_optimizer = cfg.train.optimizer.use_distributed_optimizer
    n_buffer = grad_buffer_numel(student, tp, pp, stage, dp, distributed_optimizer, cfg.make_vocab_size_divisible_by)
    opt_shard = n_buffer / dp if distributed_optimizer else n_buffer
    optimizer_bytes_per = 8 + (4 if B < 4 else 0)  # Adam moments (+ fp32 main params for bf16)

    vocab_s = padded_vocab_size(student.vocab_size, tp, cfg.make_vocab_size_divisible_by) // tp
    mbs, seq = t.micro_batch_size, t.max_length
    tokens = mbs * seq
    local_batch = t.global_batch_size // dp
    positions = {kind.name: _logit_positions(t, kind) for kind in train_kinds}
    # Logits at all positions (pretraining text): GPTModel returns logits.transpose(0, 1).contiguous(),
    # a copy; at the loss positions the logits are [1, n, V/TP] already.
    transpose_copy = {k.name: 1 if mbs > 1 else 0 for k in train_kinds if k.responses == "pretraining"}

    terms: dict[str, float] = {
        "student weights": B * n_student,
        "teacher weights": B * n_teacher,
        "student grads (fp32 DDP buffer)": 4 * n_buffer,
        "optimizer state": optimizer_bytes_per * opt_shard,
    }
    persistent = sum(terms.values())

    # ---- teacher logits kept on the last stage
    rollout_cache = 0.0
    if on_policy and main.teacher_logits and teacher:  # scored once per rollout batch
        rollout_cache = cfg.train.rollout.batch_size / dp * positions[main.name] * vocab_s * cache_B
    step_cache = 0.0
    step_kind = pt if on_policy else main  # scored once per optimizer step (L_PT, KD)
    if teacher and step_kind and step_kind.teacher_logits:
        step_cache = local_batch * positions[step_kind.name] * vocab_s * cache_B
    if not last:
        rollout_cache = step_cache = 0.0
    terms["teacher logits cache (rollouts)"] = rollout_cache
    terms["teacher logits cache (L_PT/KD step)"] = step_cache

    # ---- training activations: 1F1B keeps min(PP - stage, micro-batches) in flight on this stage
    micro_per_step = local_batch // mbs * len(train_kinds)
    in_flight = min(pp - stage, micro_per_step)
    layer_saved = _layer_saved_bytes(student, tokens, seq, tp, B)
    if t.recompute:  # full, uniform, 1 layer per checkpoint: each layer's input, plus one layer re-run
        per_micro = layers_s * B * tokens * student.hidden_size
        recompute_layer = layer_saved
    else:
        per_micro = layers_s * layer_saved
        recompute_layer = 0.0
    if not last:  # the stage output stays referenced by the schedule until its backward
        per_micro += B * tokens * student.hidden_size
    final_norm = (
        (B * student.hidden_size + 8) if student.normalization == "LayerNorm" else (8 * student.hidden_size + 4)
    )
    if last:  # final norm + output layer input
        per_micro += tokens * (final_norm + B * student.hidden_size)
    activations = in_flight * per_micro + recompute_layer
    terms["activations (train, in flight)"] = activations

    # ---- logits and loss gradients (last stage): the largest set alive at once. Each loss function
    # computes its gradient [tokens, V/TP] in its forward and keeps it until the backward
    # (losses/vocab_parallel.py), so after the loss forward: logits, the teacher logits converted to
    # the student's dtype (when the cache dtype differs), and one gradient per loss term.
    logits_peak = 0.0
    if last:
        candidates = []
        for kind in train_kinds:
            n = mbs * positions[kind.name]
            L, copy = n * vocab_s * B, transpose_copy.get(kind.name, 0)
            candidates.append(L * (1 + copy))  # forward: the logits (and their [b, s, V/TP] copy)
            up = L if teacher and kind.teacher_logits and cache_B != B else 0.0
            candidates.append(L + up + kind.logit_losses * L + LOSS_CHUNK_WORKSPACE)
            # output layer backward: the gradient (and its contiguous copy), grad weight and grad input
            candidates.append(L * (1 + copy) + B * (vocab_s + n) * student.hidden_size)
        logits_peak = max(candidates)
    terms["logits + loss gradients"] = logits_peak

    # ---- rollouts: student + teacher KV caches for one rollout micro-batch
    rmb = cfg.train.rollout.micro_batch_size
    samplers = {  # the models that decode: the student (teacher-mixed: with the teacher), or the teacher
        "student": [student] + ([teacher] if teacher and cfg.train.rollout.mix_alpha else []),
        "teacher": [teacher],
        "dataset": [],
    }[objective.samples]
    kv = sum(2 * (m.num_layers // pp) * rmb * seq * m.num_query_groups // tp * m.kv_channels * B for m in samplers)
    terms["KV caches (rollouts)"] = kv
    prefill = 0.0
    if kv:
        prompt_tokens = rmb * t.max_prompt_length
        prefill = max(_forward_only_layer_bytes(m, prompt_tokens, tp, B) for m in samplers)
    # ---- scoring: teacher forwards, logits copied into the cache (last stage). The rollouts are scored
    # in one pass before training; the L_PT (or KD) micro-batches of a step are scored before its
    # forward/backward, on top of the full rollout cache.
    score = score_pt = 0.0
    if teacher and any(k.needs_teacher for k in train_kinds):
        layer = _forward_only_layer_bytes(teacher, tokens, tp, B)

        def scoring(kind: BatchKind, cached: float) -> float:
            """Peak while scoring the last micro-batch of ``kind`` with ``cached`` bytes of earlier
            micro-batches in the cache: its logits (and their transposed copy), then the cache copy
            (+ an fp32 copy for log p)."""
            if not last:
                return layer
            n = mbs * positions[kind.name]
            L_t, entry = n * vocab_s * B, n * vocab_s * cache_B
            fp32_copy = n * vocab_s * 4 if kind.teacher_log_p and B < 4 else 0.0
            cached = max(cached - entry, 0.0)
            copy = transpose_copy.get(kind.name, 0)
            return max(layer, cached + L_t * (1 + copy), cached + entry + L_t + fp32_copy)

        if on_policy:
            score = scoring(main, rollout_cache)
            if step_cache:
                score_pt = rollout_cache + scoring(step_kind, step_cache)
        else:
            score_pt = scoring(main, step_cache)

    phases = {
        "rollout": persistent + kv + prefill if kv else persistent,
        "score": persistent + score,
        "score (L_PT/KD, per step)": persistent + score_pt,
        "train": persistent + rollout_cache + step_cache + activations + logits_peak,
        "optimizer step": persistent + rollout_cache + step_cache,  # fused Adam: no temporaries
    }
    if pp > 1:
        notes.append(f"stage {stage}: {in_flight} micro-batch(es) in flight under 1F1B")
    return MemoryBreakdown(stage=stage, terms=terms, phases=phases, notes=notes)


def plan_memory(teacher: Architecture | None, student: Architecture, cfg: PlanConfig) -> list[MemoryBreakdown]:
    """Breakdowns of the first and the last pipeline stage (one if PP = 1), worst first.

    Raises :class:`~megatron_minillm.parallel.LayoutError` when TP/PP do not divide a model.
    """
    for name, arch in (("student", student), ("teacher", teacher)):
        if arch is None:
            continue
        try:
            check_layout(arch, cfg.tp, cfg.pp)
        except LayoutError as err:
            raise LayoutError(f"{name}: {err}") from None
    t = cfg.train.training
    if t.global_batch_size % (t.micro_batch_size * cfg.dp):
        raise PlanError(
            f"global_batch_size {t.global_batch_size} must be a multiple of micro_batch_size x DP = "
            f"{t.micro_batch_size} x {cfg.dp}"
        )
    stages = sorted({0, cfg.pp - 1})
    out = [_stage_breakdown(teacher, student, cfg, s) for s in stages]
    return sorted(out, key=lambda b: -b.peak)


# --------------------------------------------------------------------------------------------------
# layouts


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    peak_bytes: float
    peak_phase: str
    fits: bool


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def suggest_layouts(
    teacher: Architecture | None,
    student: Architecture,
    cfg: PlanConfig,
    *,
    nodes: int,
    gpus_per_node: int,
    gpu_memory_bytes: float,
    headroom: float = 0.9,
    include_unfit: bool = False,
) -> list[Layout]:
    """Layouts TP x PP x DP of ``nodes`` x ``gpus_per_node`` GPUs whose peak fits in ``headroom`` x
    the GPU memory, best first: smallest TP x PP (most data parallelism), then fewer pipeline stages
    (TP stays within a node: TP divides ``gpus_per_node``), then lower peak.

    A layout is skipped when TP or PP does not divide a model (heads, KV heads, FFN, layers) or the
    batch sizes do not split over DP (``global_batch_size`` by micro-batch x DP).
    """
    world = nodes * gpus_per_node
    found = []
    for tp in _divisors(gpus_per_node):
        for pp in _divisors(world // tp):
            if world % (tp * pp):
                continue
            dp = world // (tp * pp)
            try:
                trial = cfg.at_layout(tp, pp, dp)
                peak = plan_memory(teacher, student, trial)[0]
            except (LayoutError, PlanError):
                continue
            fits = peak.peak <= headroom * gpu_memory_bytes
            if fits or include_unfit:
                found.append(Layout(tp, pp, dp, peak.peak, peak.peak_phase, fits))
    return sorted(found, key=lambda x: (not x.fits, x.tp * x.pp, x.pp, x.peak_bytes))


def format_breakdown(breakdowns: Sequence[MemoryBreakdown], gpu_memory_bytes: float | None = None) -> str:
    """A table of every term and phase (GiB) per reported stage."""
    names = list(breakdowns[0].terms)
    header = f"{'GiB per GPU':38s}" + "".join(f"{'stage ' + str(b.stage):>12s}" for b in breakdowns)
    lines = [header, "-" * len(header)]
    for name in names:
        lines.append(f"{name:38s}" + "".join(f"{b.terms[name] / GiB:12.3f}" for b in breakdowns))
    lines.append("phases (what is alive together):")
    for phase in breakdowns[0].phases:
        lines.append(f"  {phase:36s}" + "".join(f"{b.phases[phase] / GiB:12.3f}" for b in breakdowns))
    lines.append(f"{'peak':38s}" + "".join(f"{b.peak / GiB:12.3f}" for b in breakdowns))
    if gpu_memory_bytes:
        lines.append(
            f"{'of GPU memory':38s}" + "".join(f"{100 * b.peak / gpu_memory_bytes:11.0f}%" for b in breakdowns)
        )
    for b in breakdowns:
        lines += b.notes
    return "\n".join(lines)


__all__ = [
    "KNOWN_MODELS",
    "Layout",
    "MemoryBreakdown",
    "PlanConfig",
    "PlanError",
    "format_breakdown",
    "plan_memory",
    "resolve_model",
    "stage_parameters",
    "stage_tensors",
    "grad_buffer_numel",
    "suggest_layouts",
    "UnsupportedModelError",
]
