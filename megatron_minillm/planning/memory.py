"""Per-GPU memory of a teacher/student run, and the layouts that fit.

Pure arithmetic on :class:`~megatron_minillm.models.Architecture` (no model is built). Each term
follows what this repository's code keeps alive, not a generic transformer; docs/memory.md gives the
formulas and `benchmarks/bench_plan_memory.py` compares the prediction with measured peak memory.

The student runs TP_s x PP_s x DP_s; the teacher either shares that layout or runs its own
TP_t x PP_t x DP_t on the same ranks (``parallel.teacher_tp`` / ``teacher_pp``, ``training/teacher.py``).
What the trainer keeps (``training/trainer.py``), per rank:

* persistent: the student's weights (``dtype``) of its pipeline stage's TP shard, the teacher's of
  its own stage and shard; the student's megatron-DDP gradient buffer (fp32: ``grad_reduce_in_fp32``);
  AdamW moments (2 x fp32) and, for bf16, fp32 main parameters, divided by DP_s with the distributed
  optimizer. The teacher is frozen: no gradients, no optimizer state.
* per MiniLLM iteration (phases, not alive at the same time):
  rollouts (student + teacher KV caches, each model at its layout: a teacher DP group decodes its
  share of all student DP groups' rows), scoring (teacher forwards over the rollouts, logits kept in
  ``teacher_cache_dtype`` in the student's vocabulary split on the student's last stage), training
  (activations of the micro-batches in flight, smaller under sequence parallelism; logits and the loss
  gradients, the cache and one step's L_PT teacher logits), the optimizer step.

The peak is the largest phase on the worst rank: megatron orders ranks TP fastest, then DP, then PP,
so each rank is in one stage of each model; the first student stage holds PP_s micro-batches in
flight under 1F1B and the embedding, the last the output layer, logits and the cache.
"""

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from megatron_minillm.algorithms import OBJECTIVES, BatchKind, Objective
from megatron_minillm.config import ConfigError, ParallelConfig, TrainConfig, TrainingConfig
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
    padded_vocab: int | None = None,
) -> int:
    """Elements of megatron DDP's gradient buffer (``param_and_grad_buffer``, one bucket: no overlapped
    reduce): parameters in reverse order; with the distributed optimizer each starts at a multiple of
    64 elements, each bucket ends at a multiple of lcm(DP, 128), and a tied embedding shared across
    pipeline stages gets a bucket of its own."""
    tensors = stage_tensors(arch, tp, pp, stage, make_vocab_size_divisible_by, padded_vocab)
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
    """A training config (algorithm, batches, lengths, dtypes, loss terms: ``train``) at the layout of
    ``train.parallel`` (the student's TP x PP, the teacher's, sequence parallelism) with ``dp``
    data-parallel ranks of the student; the world is TP_s x PP_s x DP_s ranks, the teacher's DP the rest.

    ``padded_vocab``: a converted checkpoint's padded vocabulary (both models: the trainer requires
    one); None pads each model's vocabulary to a multiple of ``make_vocab_size_divisible_by`` x
    lcm(TP_s, TP_t), what a conversion at that TP gives and what both TPs divide."""

    train: TrainConfig
    dp: int = 1
    pt_data: bool = True  # L_PT planned for MiniLLM (planning needs no dataset, only whether there is one)
    make_vocab_size_divisible_by: int = 128
    padded_vocab: int | None = None

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
    def teacher_tp(self) -> int:
        return self.train.parallel.teacher_layout[0]

    @property
    def teacher_pp(self) -> int:
        return self.train.parallel.teacher_layout[1]

    @property
    def teacher_dp(self) -> int:
        """The teacher's DP on the same ranks (0 when its TP x PP does not divide the world)."""
        tp, pp = self.train.parallel.teacher_layout
        return self.world_size // (tp * pp) if self.world_size % (tp * pp) == 0 else 0

    @property
    def own_teacher_layout(self) -> bool:
        """Whether the teacher runs its own TP x PP (``training/teacher.py``: ``Teacher.own_layout``)."""
        return self.train.parallel.teacher_layout != (self.tp, self.pp)

    @property
    def sequence_parallel(self) -> bool:
        """Sequence parallelism in the student's training passes (nothing to split at TP = 1)."""
        return self.train.parallel.sequence_parallel and self.tp > 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def at_layout(
        self,
        tp: int,
        pp: int,
        dp: int,
        teacher_tp: int = 0,
        teacher_pp: int = 0,
        sequence_parallel: bool | None = None,
    ) -> "PlanConfig":
        """This config at the student's TP x PP x DP, the teacher's TP x PP (0: the student's) and
        sequence parallelism (None: as configured)."""
        sp = self.train.parallel.sequence_parallel if sequence_parallel is None else sequence_parallel
        parallel = ParallelConfig(tp=tp, pp=pp, teacher_tp=teacher_tp, teacher_pp=teacher_pp, sequence_parallel=sp)
        return replace(self, train=replace(self.train, parallel=parallel), dp=dp)

    def padded_vocab_of(self, arch: Architecture, with_teacher: bool) -> int:
        """``arch``'s padded vocabulary: the given one, else padded for TP_s (and TP_t ``with_teacher``)."""
        if self.padded_vocab:
            return self.padded_vocab
        tp = math.lcm(self.tp, self.teacher_tp) if with_teacher else self.tp
        return padded_vocab_size(arch.vocab_size, tp, self.make_vocab_size_divisible_by)

    @property
    def objective(self) -> Objective:
        """The algorithm's declarations (batch kinds, teacher outputs, loss terms) that size memory."""
        return OBJECTIVES[self.train.algorithm](self.train, vocab_size=0, pt_data=self.pt_data)


@dataclass
class MemoryBreakdown:
    """Bytes per rank of one pipeline stage of the student (``stage``) beside one of the teacher
    (``teacher_stage``; None without a teacher): ``terms`` (what is allocated) and ``phases`` (what is
    alive together at each phase's peak); ``peak`` is the largest phase."""

    stage: int
    terms: dict[str, float]
    phases: dict[str, float]
    notes: list[str] = field(default_factory=list)
    teacher_stage: int | None = None

    @property
    def peak(self) -> float:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    def to_dict(self) -> dict:
        return {"stage": self.stage, "peak_bytes": self.peak, "peak_phase": self.peak_phase, **asdict(self)}


def _layer_saved_bytes(
    arch: Architecture, tokens: int, seq: int, tp: int, nbytes: int, sequence_parallel: bool = False
) -> float:
    """Bytes one transformer layer of megatron's local spec (SDPA core attention, dropout 0) saves for
    backward, per TP rank, for ``tokens`` = b x s tokens.

    Counted from the autograd graph (what ``saved_tensors_hooks`` sees, unique storages):
    each norm keeps its input (LayerNorm: input + fp32 mean/rstd; RMSNorm: torch's composite
    ``rms_norm`` keeps the fp32 input and the fp32 normalized tensor, 8 B/element whatever the
    dtype); QKV keeps its input (h) and its output (q/k/v are views of it; RoPE adds new q and k);
    SDPA keeps q, k, v, its output (the projection's input) and an fp32 log-sum-exp per head; the MLP
    keeps fc1's input (h), and for SwiGLU fc1's output (2f), silu's output (f), the linear half
    (f, megatron adds ``glu_linear_offset``) and the product (fc2's input, f); ReLU: one f
    (relu saves its result, which is fc2's input); GELU: two (its input and fc2's input).

    The norms' saves and the QKV / fc1 inputs are [s, b, h] on every TP rank; the rest is split by TP
    already. Sequence parallelism (Korthikanti et al. 2022) runs the norms on [s/TP, b, h] and the
    column-parallel linears save their input before the all-gather (megatron's
    ``LinearWithGradAccumulationAndAsyncCommunication`` gathers it again in backward): every
    per-token term is then divided by TP, the paper's 34 sbh/t + 5 as^2 b/t against
    sbh (10 + 24/t) + 5 as^2 b/t (our SDPA keeps no s^2 scores, dropout 0 no masks).
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
    replicated = (2 * norm + 2 * nbytes * h) / (tp if sequence_parallel else 1)
    qkv = nbytes * (a + 2 * g) * d / tp + (nbytes * (a + g) * d / tp if rope else 0)
    mlp_units = {"swiglu": 5, "relu": 1}.get(arch.activation, 2)
    per_token = replicated + qkv + nbytes * a * d / tp + 4 * a / tp + nbytes * mlp_units * f / tp
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


def _teacher_rows(rows: int, dp: int, teacher_dp: int) -> int:
    """Rows of the largest teacher DP group's share when each of the DP student DP groups holds
    ``rows``: the DP x rows global rows split over the teacher's DP (``parallel.exchange``:
    ``torch.tensor_split``, the first groups take one more)."""
    return -(-rows * dp // teacher_dp)


def _stage_breakdown(
    teacher: Architecture | None, student: Architecture, cfg: PlanConfig, stage: int, teacher_stage: int
) -> MemoryBreakdown:
    t, tp, pp, dp = cfg.train.training, cfg.tp, cfg.pp, cfg.dp
    ttp, tpp, tdp = cfg.teacher_tp, cfg.teacher_pp, cfg.teacher_dp
    own = teacher is not None and cfg.own_teacher_layout  # the teacher on its own TP x PP x DP
    B, cache_B = DTYPES[t.dtype].itemsize, DTYPES[t.teacher_cache_dtype].itemsize
    last, teacher_last = stage == pp - 1, teacher_stage == tpp - 1
    objective = cfg.objective
    main, pt = objective.main_kind, objective.pretraining_kind
    train_kinds = [main] + ([pt] if pt else [])  # the kinds of one optimizer step's micro-batches
    on_policy = objective.samples == "student"
    sp = cfg.sequence_parallel
    split = tp if sp else 1  # the student's [s, b, h] training tensors are [s/TP, b, h] per rank under SP
    notes: list[str] = []

    padded_s = cfg.padded_vocab_of(student, teacher is not None)
    s_params = stage_parameters(student, tp, pp, stage, cfg.make_vocab_size_divisible_by, padded_s)
    n_student = sum(s_params.values())
    padded_t = cfg.padded_vocab_of(teacher, True) if teacher else 0
    n_teacher = (
        sum(stage_parameters(teacher, ttp, tpp, teacher_stage, padded_vocab=padded_t).values()) if teacher else 0
    )
    layers_s = student.num_layers // pp
    distributed_optimizer = cfg.train.optimizer.use_distributed_optimizer
    n_buffer = grad_buffer_numel(
        student, tp, pp, stage, dp, distributed_optimizer, cfg.make_vocab_size_divisible_by, padded_s
    )
    opt_shard = n_buffer / dp if distributed_optimizer else n_buffer
    optimizer_bytes_per = 8 + (4 if B < 4 else 0)  # Adam moments (+ fp32 main params for bf16)

    vocab_s = padded_s // tp  # the student's split: the cache and the loss
    vocab_t = padded_t // ttp  # the teacher's split: its own logits
    mbs, seq = t.micro_batch_size, t.max_length
    tokens = mbs * seq
    local_batch = t.global_batch_size // dp
    local_rollouts = -(-cfg.train.rollout.batch_size // dp)
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

    # ---- teacher logits kept on the student's last stage, in the student's vocabulary split
    rollout_cache = 0.0
    if on_policy and main.teacher_logits and teacher:  # scored once per rollout batch
        rollout_cache = local_rollouts * positions[main.name] * vocab_s * cache_B
    step_cache = 0.0
    step_kind = pt if on_policy else main  # scored once per optimizer step (L_PT, KD)
    if teacher and step_kind and step_kind.teacher_logits:
        step_cache = local_batch * positions[step_kind.name] * vocab_s * cache_B
    if not last:
        rollout_cache = step_cache = 0.0
    terms["teacher logits cache (rollouts)"] = rollout_cache
    terms["teacher logits cache (L_PT/KD step)"] = step_cache
    # Speculative rollouts keep the teacher's logits of every position they sample, [rollouts,
    # max_new, V/TP_s] in the cache dtype (rollout.reuse_teacher_logits), until the trainer copies
    # them into the micro-batches in place of a scoring forward.
    r = cfg.train.rollout
    reuse = bool(on_policy and teacher and main.needs_teacher and r.mix_alpha and r.speculative_k)
    reuse = reuse and r.reuse_teacher_logits
    kept = local_rollouts * (t.max_length - t.max_prompt_length) * vocab_s * cache_B if reuse and last else 0.0
    terms["teacher logits kept by the rollouts"] = kept

    # ---- training activations: 1F1B keeps min(PP - stage, micro-batches) in flight on this stage
    micro_per_step = local_batch // mbs * len(train_kinds)
    in_flight = min(pp - stage, micro_per_step)
    layer_saved = _layer_saved_bytes(student, tokens, seq, tp, B, sp)
    if t.recompute:  # full, uniform, 1 layer per checkpoint: each layer's input, plus one layer re-run
        per_micro = layers_s * B * tokens * student.hidden_size / split
        recompute_layer = layer_saved
    else:
        per_micro = layers_s * layer_saved
        recompute_layer = 0.0
    if not last:  # the stage output stays referenced by the schedule until its backward
        per_micro += B * tokens * student.hidden_size / split
    final_norm = (
        (B * student.hidden_size + 8) if student.normalization == "LayerNorm" else (8 * student.hidden_size + 4)
    )
    if last:  # final norm (on the sequence shard under SP) + output layer input (the full sequence)
        per_micro += tokens * (final_norm / split + B * student.hidden_size)
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

    # ---- rollouts: the KV caches of one sampler call, each model at its layout. The student decodes
    # up to rollout.micro_batch_size of its DP group's rollouts per call; a teacher on its own layout
    # decodes its DP group's share of all student DP groups' rows (sampling/cross_layout.py). Teacher
    # samples (SeqKD) are drawn in one call over the step's prompts; on its own layout the student
    # draws them with the teacher mixed in at alpha = 1, so both decode.
    decoders: list[tuple[Architecture, int, int, int]] = []  # (model, TP, PP, rows on this rank)
    if on_policy:
        rows = min(cfg.train.rollout.micro_batch_size, local_rollouts)
        decoders.append((student, tp, pp, rows))
        if teacher and cfg.train.rollout.mix_alpha:
            decoders.append((teacher, ttp, tpp, _teacher_rows(rows, dp, tdp) if own else rows))
    elif objective.samples == "teacher" and teacher:
        if own:
            decoders += [(student, tp, pp, local_batch), (teacher, ttp, tpp, _teacher_rows(local_batch, dp, tdp))]
        else:
            decoders.append((teacher, tp, pp, local_batch))
    kv = sum(
        2 * (m.num_layers // p) * rows * seq * m.num_query_groups // x * m.kv_channels * B for m, x, p, rows in decoders
    )
    terms["KV caches (rollouts)"] = kv
    prefill = 0.0
    if kv:
        prefill = max(_forward_only_layer_bytes(m, rows * t.max_prompt_length, x, B) for m, x, _, rows in decoders)
    # ---- scoring: teacher forwards in micro-batches of mbs sequences, logits copied into the cache
    # (last stage). The rollouts are scored in one pass before training; the L_PT (or KD)
    # micro-batches of a step are scored before its forward/backward, on top of the full rollout cache.
    score = score_pt = 0.0
    if teacher and any(k.needs_teacher for k in train_kinds):
        layer = _forward_only_layer_bytes(teacher, tokens, ttp, B)

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

        def scoring_own(kind: BatchKind, rows: int) -> float:
            """Peak while a teacher on its own layout scores ``rows`` sequences of every student DP group
            (``training/teacher.py``): its DP group's share, forward in micro-batches of mbs, each
            micro-batch's logits kept in the cache dtype on its last stage (``share``) and
            concatenated, then sent (``parallel.exchange``): the concatenated rows and the messages
            (two ``share``), the rows received in the student's split (``mine``, the cache) and
            their receive buffers (a second ``mine``)."""
            n = mbs * positions[kind.name]
            share = _teacher_rows(rows, dp, tdp) * positions[kind.name] * vocab_t * cache_B if teacher_last else 0.0
            mine = rows * positions[kind.name] * vocab_s * cache_B if last else 0.0
            forward = layer
            if teacher_last:
                L_t, copy = n * vocab_t * B, transpose_copy.get(kind.name, 0)
                fp32_copy = n * vocab_t * 4 if kind.teacher_log_p and B < 4 else 0.0
                forward = max(layer, share + L_t * (1 + copy) + fp32_copy)
            return max(forward, 2 * share + 2 * mine)

        if reuse:  # the rollouts' logits and their copy in the cache, no scoring forward
            score = kept + rollout_cache
            if step_cache:
                score_pt = rollout_cache + (
                    scoring_own(step_kind, local_batch) if own else scoring(step_kind, step_cache)
                )
        elif own:
            if on_policy:
                score = scoring_own(main, local_rollouts)
                if step_cache:
                    score_pt = rollout_cache + scoring_own(step_kind, local_batch)
            else:
                score_pt = scoring_own(main, local_batch)
        elif on_policy:
            score = scoring(main, rollout_cache)
            if step_cache:
                score_pt = rollout_cache + scoring(step_kind, step_cache)
        else:
            score_pt = scoring(main, step_cache)

    phases = {
        "rollout": persistent + kept + (kv + prefill if kv else 0.0),
        "score": persistent + score,
        "score (L_PT/KD, per step)": persistent + score_pt,
        "train": persistent + rollout_cache + step_cache + activations + logits_peak,
        "optimizer step": persistent + rollout_cache + step_cache,  # fused Adam: no temporaries
    }
    if pp > 1:
        notes.append(f"stage {stage}: {in_flight} micro-batch(es) in flight under 1F1B")
    return MemoryBreakdown(
        stage=stage, terms=terms, phases=phases, notes=notes, teacher_stage=teacher_stage if teacher else None
    )


def _stage_pairs(world: int, pp: int, teacher_pp: int) -> list[tuple[int, int]]:
    """(student stage, teacher stage) pairs of the ranks worth planning, of ``world`` ranks.

    Megatron orders ranks TP fastest, then DP, then PP (``ParallelLayout.rank_of``, for the teacher's
    groups too), so rank r is in the student's stage r PP_s // N and the teacher's r PP_t // N. A
    pair is left out when another pair holds at least as much in every phase: a first stage holds
    at least what a middle one of the same model does (the embeddings; for the student the most
    micro-batches in flight), the teacher's last stage at least what a middle one does (the output
    layer, the logits), the same KV caches everywhere. So a middle teacher stage counts only beside
    a student stage with no first or last teacher stage beside it (one of them: they are alike), a
    middle student stage only beside a teacher stage without the student's first stage (the lowest:
    it holds the most in flight), and two middle stages never (the pair (0, 0) exists).
    """
    pairs = sorted({(r * pp // world, r * teacher_pp // world) for r in range(world)})

    def middle(stage: int, stages: int) -> bool:
        return 0 < stage < stages - 1

    kept: list[tuple[int, int]] = []
    for s, t in pairs:
        if middle(s, pp) and middle(t, teacher_pp):
            continue
        if middle(t, teacher_pp):
            if any(k == s and (not middle(j, teacher_pp) or j < t) for k, j in pairs if (k, j) != (s, t)):
                continue
        elif middle(s, pp):
            if any(j == t and (k == 0 or (middle(k, pp) and k < s)) for k, j in pairs):
                continue
        kept.append((s, t))
    return kept


def plan_memory(teacher: Architecture | None, student: Architecture, cfg: PlanConfig) -> list[MemoryBreakdown]:
    """Breakdowns of the ranks worth planning, worst first: the first and the last pipeline stage
    (one if PP = 1), or with a teacher on its own layout the (student stage, teacher stage) pairs of
    :func:`_stage_pairs`.

    Raises :class:`~megatron_minillm.parallel.LayoutError` when a model's TP / PP does not divide it
    (heads, KV heads, FFN, layers), the teacher's TP x PP does not divide the world, or a TP does not
    divide the padded vocabulary the two models share.
    """
    world = cfg.world_size
    layouts = {"student": (student, cfg.tp, cfg.pp), "teacher": (teacher, cfg.teacher_tp, cfg.teacher_pp)}
    for name, (arch, tp, pp) in layouts.items():
        if arch is None:
            continue
        try:
            check_layout(arch, tp, pp)
            if world % (tp * pp):
                raise LayoutError(f"TP x PP = {tp} x {pp} does not divide the {world} ranks")
            padded = cfg.padded_vocab_of(arch, teacher is not None)
            for split in {cfg.tp, cfg.teacher_tp} if teacher else {cfg.tp}:
                if padded % split or padded < arch.vocab_size:
                    raise LayoutError(
                        f"TP={split} does not divide the padded vocabulary {padded} (vocabulary {arch.vocab_size})"
                    )
        except LayoutError as err:
            raise LayoutError(f"{name}: {err}") from None
    t = cfg.train.training
    if t.global_batch_size % (t.micro_batch_size * cfg.dp):
        raise PlanError(
            f"global_batch_size {t.global_batch_size} must be a multiple of micro_batch_size x DP = "
            f"{t.micro_batch_size} x {cfg.dp}"
        )
    if teacher is not None and cfg.own_teacher_layout:
        pairs = _stage_pairs(world, cfg.pp, cfg.teacher_pp)
    else:
        pairs = [(s, s) for s in sorted({0, cfg.pp - 1})]
    out = [_stage_breakdown(teacher, student, cfg, s, t) for s, t in pairs]
    return sorted(out, key=lambda b: -b.peak)


# --------------------------------------------------------------------------------------------------
# layouts


@dataclass(frozen=True)
class Layout:
    """A layout and its planned peak: the student's TP x PP x DP and, with a teacher, the teacher's
    (``teacher_*``: 0 without one), sequence parallelism, the micro-batch it was planned with."""

    tp: int
    pp: int
    dp: int
    peak_bytes: float
    peak_phase: str
    fits: bool
    teacher_tp: int = 0
    teacher_pp: int = 0
    teacher_dp: int = 0
    sequence_parallel: bool = False
    micro_batch_size: int = 0

    def overrides(self) -> list[str]:
        """The training config keys (``section.key=value``) that run this layout."""
        keys = [f"parallel.tp={self.tp}", f"parallel.pp={self.pp}"]
        if self.teacher_tp:
            keys += [f"parallel.teacher_tp={self.teacher_tp}", f"parallel.teacher_pp={self.teacher_pp}"]
        keys.append(f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}")
        if self.micro_batch_size:
            keys.append(f"training.micro_batch_size={self.micro_batch_size}")
        return keys


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
    """Layouts TP x PP x DP shared by teacher and student on ``nodes`` x ``gpus_per_node`` GPUs whose
    peak fits in ``headroom`` x the GPU memory, best first: smallest TP x PP (most data
    parallelism), then fewer pipeline stages (TP stays within a node: TP divides ``gpus_per_node``),
    then lower peak. Sequence parallelism as ``cfg`` has it; :func:`search_layouts` searches
    separate teacher layouts and SP too.

    A layout is skipped when TP or PP does not divide a model (heads, KV heads, FFN, layers) or the
    batch sizes do not split over DP (``global_batch_size`` by micro-batch x DP).
    """
    world = nodes * gpus_per_node
    found = []
    for tp in _divisors(gpus_per_node):
        for pp in _divisors(world // tp):
            dp = world // (tp * pp)
            try:
                trial = cfg.at_layout(tp, pp, dp)
                peak = plan_memory(teacher, student, trial)[0]
            except (ConfigError, LayoutError, PlanError):
                continue
            fits = peak.peak <= headroom * gpu_memory_bytes
            if fits or include_unfit:
                shared = (tp, pp, dp) if teacher else (0, 0, 0)
                found.append(Layout(tp, pp, dp, peak.peak, peak.peak_phase, fits, *shared, trial.sequence_parallel))
    return sorted(found, key=lambda x: (not x.fits, x.tp * x.pp, x.pp, x.peak_bytes))


def _micro_batch(global_batch: int, dp: int, configured: int) -> int:
    """The configured micro-batch if it divides each DP rank's share of a step, else the largest one
    below it that does (0: the step does not split over DP)."""
    if global_batch % dp:
        return 0
    local = global_batch // dp
    return max(m for m in _divisors(local) if m <= configured)


def search_layouts(
    teacher: Architecture | None,
    student: Architecture,
    cfg: PlanConfig,
    *,
    nodes: int,
    gpus_per_node: int,
    gpu_memory_bytes: float,
    headroom: float = 0.9,
    max_tp: int = 8,
    include_unfit: bool = False,
) -> list[Layout]:
    """(student layout, teacher layout, sequence parallelism) on ``nodes`` x ``gpus_per_node`` GPUs,
    the ones whose peak fits in ``headroom`` x the GPU memory, best first.

    Enumerated: TP_s and TP_t among the divisors of ``gpus_per_node`` up to ``max_tp`` (TP stays
    within a node, on NVLink), PP_s and PP_t dividing the GPUs left, each model's DP the rest; SP on
    and off where TP_s > 1. Skipped: what :func:`plan_memory` refuses (a TP or PP that does not
    divide a model's heads, KV heads, FFN or layers, a TP that does not divide the shared padded
    vocabulary), what the training config refuses (SP with a ``max_length`` TP_s does not divide)
    and a step of ``global_batch_size`` that does not split over DP_s. The micro-batch
    is the configured one, or the largest that divides global_batch_size / DP_s when that is
    smaller (recorded in ``Layout.micro_batch_size``; it only lowers memory).

    Rank: fits first; then the fewest model-parallel ranks of the student (TP_s x PP_s: the most
    data parallelism, the most samplers, the least communication in the student's steps); then
    fewer student stages, then fewer teacher stages (decoding through a pipeline idles its stages
    token by token); then the lowest peak. Among teacher layouts that means the largest TP_t: a
    decoding step is bound by reading the weights, so a teacher DP group of TP_t GPUs reads 1/TP_t
    of them each for all its rows, and the fewer teacher replicas the fewer bytes the world reads per
    step; the memory left is room for larger rollout micro-batches. Equal peaks keep SP off.
    """
    world = nodes * gpus_per_node
    t = cfg.train.training
    tps = [x for x in _divisors(gpus_per_node) if x <= max_tp]
    teacher_layouts = [(x, p) for x in tps for p in _divisors(world // x)] if teacher else [(0, 0)]
    found = []
    for tp in tps:
        for pp in _divisors(world // tp):
            dp = world // (tp * pp)
            mbs = _micro_batch(t.global_batch_size, dp, t.micro_batch_size)
            if not mbs:
                continue
            try:
                check_layout(student, tp, pp)
            except LayoutError:
                continue
            base = replace(cfg, train=replace(cfg.train, training=replace(t, micro_batch_size=mbs)))
            for ttp, tpp in teacher_layouts:
                for sp in (False, True) if tp > 1 else (False,):
                    try:
                        trial = base.at_layout(tp, pp, dp, ttp, tpp, sp)
                        peak = plan_memory(teacher, student, trial)[0]
                    except (ConfigError, LayoutError, PlanError):
                        continue
                    fits = peak.peak <= headroom * gpu_memory_bytes
                    if fits or include_unfit:
                        teacher_dp = world // (ttp * tpp) if teacher else 0
                        found.append(
                            Layout(tp, pp, dp, peak.peak, peak.peak_phase, fits, ttp, tpp, teacher_dp, sp, mbs)
                        )
    return sorted(found, key=lambda x: (not x.fits, x.tp * x.pp, x.pp, x.teacher_pp, x.peak_bytes))


def format_breakdown(breakdowns: Sequence[MemoryBreakdown], gpu_memory_bytes: float | None = None) -> str:
    """A table of every term and phase (GiB) per reported stage ("stage s/t": the student's stage s
    beside the teacher's stage t, when the teacher has its own layout)."""
    names = list(breakdowns[0].terms)
    # "stage s/t": the student's pipeline stage s beside the teacher's t (the teacher on its own layout)
    own = any(b.teacher_stage not in (None, b.stage) for b in breakdowns)
    labels = [f"stage {b.stage}" + (f"/{b.teacher_stage}" if own else "") for b in breakdowns]
    header = f"{'GiB per GPU':38s}" + "".join(f"{label:>12s}" for label in labels)
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
    "search_layouts",
    "stage_parameters",
    "stage_tensors",
    "grad_buffer_numel",
    "suggest_layouts",
    "UnsupportedModelError",
]
