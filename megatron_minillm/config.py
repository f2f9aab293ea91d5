"""The training configuration: dataclass sections, a YAML file and ``section.key=value`` overrides.

Defaults reproduce the MiniLLM reference recipe (../shared/docs/MINILLM_DEFAULTS.md); baselines
(SFT, KD, SeqKD) take the same sections with their own learning rate etc. set in their YAML files.
Every field is declared once, with its one-line description, by :func:`knob`; ``--help`` of the
training entry point prints them by section (:func:`describe`).

    algorithm: minillm            # top-level keys: what to train, from what
    student: /ckpt/student
    optimizer:                    # a section: a mapping in YAML, optimizer.lr=1e-5 on the command line
      lr: 5.0e-6

The keys of the flat layout used before the sections (``lr``, ``rollout_batch_size``, ...) are
refused with the new key named (:data:`MOVED_KEYS`).
"""

import dataclasses
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_minillm.sampling.params import DEFAULT_SPECULATIVE_K, SamplingParams

# The objectives of megatron_minillm.algorithms, by config name (a test checks the two agree).
ALGORITHMS = {
    "minillm": "MiniLLM: on-policy reverse KL by policy gradient (+ single-step term, + L_PT)",
    "sft": "supervised fine-tuning on the dataset's responses",
    "kd": "word-level KD: (1 - kd_ratio) CE + kd_ratio forward KL to the teacher on the dataset",
    "seqkd": "sequence-level KD: SFT on the teacher's sampled responses",
    "rkl_offpolicy": "reverse KL to the teacher on the dataset's responses (off-policy)",
}
DTYPES = ("fp32", "bf16")  # training and teacher-cache dtypes (models.builder.DTYPES maps names to torch)


class ConfigError(ValueError):
    """A configuration that cannot run (unknown key, bad value, missing path)."""


def knob(default: Any, help: str) -> Any:
    """A config field with its one-line description (shown by ``--help``)."""
    return field(default=default, metadata={"help": help})


def _at_least_one(section: object, *names: str) -> None:
    for name in names:
        if getattr(section, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(section, name)}")


def _require(section: object, prefix: str, rule: str, ok: Callable[[float], bool], *names: str) -> None:
    """Each of ``names`` must satisfy ``ok`` (NaN satisfies no comparison, so it fails every rule)."""
    for name in names:
        value = getattr(section, name)
        if not ok(value):
            raise ConfigError(f"{prefix}.{name} must be {rule}, got {value!r}")


def _positive(v: float) -> bool:
    return math.isfinite(v) and v > 0


def _non_negative(v: float) -> bool:
    return math.isfinite(v) and v >= 0


@dataclass
class ParallelConfig:
    """Model parallelism of student and teacher (DP = world size / (TP x PP))."""

    tp: int = knob(1, "tensor-parallel size")
    pp: int = knob(1, "pipeline-parallel size")
    teacher_tp: int = knob(0, "the teacher's own tensor-parallel size on the same ranks; 0: the student's (tp)")
    teacher_pp: int = knob(0, "the teacher's own pipeline-parallel size on the same ranks; 0: the student's (pp)")
    sequence_parallel: bool = knob(
        False, "Megatron sequence parallelism in the student's training forward/backward (no effect at TP=1)"
    )

    def __post_init__(self) -> None:
        _at_least_one(self, "tp", "pp")
        _require(self, "parallel", "an integer >= 0 (0: the student's)", _non_negative, "teacher_tp", "teacher_pp")

    @property
    def teacher_layout(self) -> tuple[int, int]:
        """The teacher's (TP, PP): its own where given, else the student's."""
        return self.teacher_tp or self.tp, self.teacher_pp or self.pp


@dataclass
class TrainingConfig:
    """Iterations, batches, sequence lengths and precision."""

    train_iters: int = knob(
        313, "minillm: rollout iterations (313 x 256 x 4 / 64 = 5008 steps, LMOps: 5000); others: steps"
    )
    micro_batch_size: int = knob(4, "sequences per micro-batch and DP rank")
    global_batch_size: int = knob(16, "sequences per optimizer step over all DP ranks")
    max_prompt_length: int = knob(256, "prompts are cut to this many tokens")
    max_length: int = knob(512, "prompt + response: the training sequence length")
    dtype: str = knob("fp32", "fp32 | bf16 (bf16 on GPU)")
    teacher_cache_dtype: str = knob("bf16", "teacher logits kept for L_Single / L_PT / KD: fp32 | bf16")
    recompute: bool = knob(False, "full activation recomputation of every layer")

    def __post_init__(self) -> None:
        _at_least_one(self, "train_iters", "micro_batch_size", "global_batch_size")
        if not 0 < self.max_prompt_length < self.max_length:
            raise ConfigError(f"need 0 < max_prompt_length ({self.max_prompt_length}) < max_length ({self.max_length})")
        if self.dtype not in DTYPES or self.teacher_cache_dtype not in DTYPES:
            raise ConfigError(f"dtype and teacher_cache_dtype must be one of {', '.join(DTYPES)}")


@dataclass
class OptimizerConfig:
    """AdamW (megatron DDP + distributed optimizer) and its learning-rate schedule."""

    lr: float = knob(5e-6, "peak learning rate")
    min_lr: float = knob(0.0, "learning rate at the end of the decay")
    lr_warmup_iters: int = knob(100, "linear warmup, in optimizer steps")
    lr_decay_style: str = knob("constant", "constant | cosine | linear")
    weight_decay: float = knob(1e-6, "AdamW weight decay (not on biases and norms)")
    adam_beta1: float = knob(0.9, "AdamW beta1")
    adam_beta2: float = knob(0.95, "AdamW beta2")
    adam_eps: float = knob(1e-8, "AdamW epsilon")
    clip_grad: float = knob(1.0, "gradient-norm clipping")
    use_distributed_optimizer: bool = knob(True, "shard the optimizer state over DP ranks (ZeRO-1)")

    def __post_init__(self) -> None:
        _require(self, "optimizer", "a finite number > 0", _positive, "lr", "adam_eps")
        _require(self, "optimizer", "a finite number >= 0", _non_negative, "weight_decay", "clip_grad")
        _require(self, "optimizer", f"in [0, optimizer.lr={self.lr}]", lambda v: 0 <= v <= self.lr, "min_lr")
        _require(self, "optimizer", "in [0, 1)", lambda v: 0 <= v < 1, "adam_beta1", "adam_beta2")
        _require(self, "optimizer", ">= 0", lambda v: v >= 0, "lr_warmup_iters")
        if self.lr_decay_style not in ("constant", "cosine", "linear"):
            raise ConfigError(f"lr_decay_style {self.lr_decay_style!r} is not constant, cosine or linear")


@dataclass
class RolloutConfig:
    """On-policy sampling (minillm; seqkd samples the teacher with the same warpers)."""

    batch_size: int = knob(256, "rollouts per iteration over all DP ranks")
    micro_batch_size: int = knob(16, "prompts per sampler call")
    mix_alpha: float = knob(0.2, "teacher-mixed sampling p~ = alpha p + (1 - alpha) q; 0: the student alone")
    temperature: float = knob(1.0, "sampling temperature (also the temperature of MiniLLM's loss terms)")
    top_k: int = knob(0, "top-k warper; 0: off")
    top_p: float = knob(1.0, "top-p warper; 1: off")
    speculative_k: int = knob(
        DEFAULT_SPECULATIVE_K,
        "with mix_alpha > 0: tokens the student drafts per teacher forward (exact speculative sampling "
        "of the mixture, docs/sampling.md); 0: the teacher decodes token by token",
    )
    reuse_teacher_logits: bool = knob(
        True,
        "keep the logits the teacher computed while checking drafts (speculative_k > 0) instead of "
        "scoring the rollouts with another teacher forward; false: score them again",
    )

    def __post_init__(self) -> None:
        _at_least_one(self, "batch_size", "micro_batch_size")
        try:  # temperature, top-k, top-p and mix_alpha, with the sampler's own rules and messages
            self.sampling_params(1, ())
        except ValueError as err:
            raise ConfigError(f"rollout.{err}") from None

    def sampling_params(self, max_new_tokens: int, stop_ids: Sequence[int], mix: bool = True) -> SamplingParams:
        """The sampler's settings; ``mix=False`` samples without the teacher mixture (SeqKD's teacher)."""
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            mix_alpha=self.mix_alpha if mix else 0.0,
            stop_ids=tuple(stop_ids),
            speculative_k=self.speculative_k,
        )


@dataclass
class MiniLLMConfig:
    """MiniLLM's loss terms and policy gradient (Algorithm 1; defaults: LMOps)."""

    ppo_epochs: int = knob(4, "passes over each rollout batch")
    gamma: float = knob(0.95, "discount of the long-term return")
    clip_eps: float = knob(0.2, "PPO clipping of the importance-weighted ratio")
    reward_scaling: float = knob(0.5, "rewards log p/q are divided by this")
    reward_clip: float = knob(100.0, "rewards are clipped to [-reward_clip, reward_clip]")
    length_norm: bool = knob(True, "length-normalised returns (R_Norm)")
    whiten: bool = knob(True, "whiten the advantages over the optimizer step (all DP ranks)")
    policy_gradient: bool = knob(True, "the PPO-clipped long-term term; false: L_Single (+ L_PT) only")
    single_step: bool = knob(True, "the single-step reverse-KL term L_Single")
    lm_coef: float = knob(1.0, "weight of L_PT (needs pt_data)")

    def __post_init__(self) -> None:
        _at_least_one(self, "ppo_epochs")
        _require(self, "minillm", "in [0, 1]", lambda v: 0 <= v <= 1, "gamma")
        _require(self, "minillm", "a finite number > 0", _positive, "clip_eps", "reward_scaling", "reward_clip")
        _require(self, "minillm", "a finite number >= 0", _non_negative, "lm_coef")
        if not (self.policy_gradient or self.single_step):
            raise ConfigError(
                "minillm with minillm.policy_gradient=false and minillm.single_step=false has no rollout loss; keep at least one of them"
            )


@dataclass
class KDConfig:
    """Word-level KD, also the form of MiniLLM's L_PT."""

    kd_ratio: float = knob(0.5, "(1 - kd_ratio) CE + kd_ratio forward KL")

    def __post_init__(self) -> None:
        if not 0 <= self.kd_ratio <= 1:
            raise ConfigError(f"kd.kd_ratio ({self.kd_ratio}) must be in [0, 1]")


@dataclass
class GuardrailsConfig:
    """Collapse guardrails (docs/training.md): per check, the student's reverse KL on a fixed set of
    the teacher's samples, its response length against the teacher's and the repetition in its own
    samples; a warning (or a stop) when reverse-KL training drifts into a degenerate mode."""

    enabled: bool = knob(True, "the checks (runs that have a teacher); false: off")
    probe_samples: int = knob(8, "teacher samples of the first training prompts, drawn once, the student is scored on")
    interval: int = knob(
        0,
        "iterations between checks (each: one teacher and one student forward over the probe); 0: every "
        "iteration of on-policy objectives (a rollout batch each), every 20th of the others (one step each)",
    )
    distinct_n: int = knob(2, "n of distinct-n: the share of each response's n-grams that are unique")
    min_distinct: float = knob(0.5, "warn when the student's samples' mean distinct-n falls below this")
    rkl_tolerance: float = knob(
        0.05,
        "warn when the reverse KL on the student's own samples is this much (relative) below, and on the "
        "teacher's samples this much above, their values at the check with the lowest teacher-sample value",
    )
    patience: int = knob(2, "consecutive checks the reverse-KL divergence must last before a warning")
    stop: bool = knob(False, "stop the run (without saving) when a guardrail fires, instead of warning")

    def __post_init__(self) -> None:
        _at_least_one(self, "probe_samples", "distinct_n", "patience")
        _require(self, "guardrails", ">= 0", lambda v: v >= 0, "interval")
        _require(self, "guardrails", "in [0, 1]", lambda v: 0 <= v <= 1, "min_distinct")
        _require(self, "guardrails", "in [0, 1)", lambda v: 0 <= v < 1, "rkl_tolerance")


@dataclass
class CheckpointConfig:
    """Training checkpoints (iter_XXXXXXX/, latest), resumed from when present."""

    save: str | None = knob(None, "checkpoint directory; None: no checkpoints")
    save_interval: int = knob(0, "iterations between saves; 0: only at the end and on SIGTERM")
    checksums: bool = knob(
        True,
        "SHA-256 of every checkpoint file in a manifest at save, verified at load; false: sizes only, "
        "for users who accept the risk",
    )

    def __post_init__(self) -> None:
        _require(self, "checkpoint", ">= 0", lambda v: v >= 0, "save_interval")


@dataclass
class LoggingConfig:
    """The iteration log line and TensorBoard."""

    log_interval: int = knob(1, "iterations between log lines")
    tensorboard_dir: str | None = knob(None, "TensorBoard event directory; None: off")

    def __post_init__(self) -> None:
        _at_least_one(self, "log_interval")


@dataclass
class TrainConfig:
    """What to train from what (top-level keys), and how (sections)."""

    algorithm: str = knob("minillm", " | ".join(ALGORITHMS))
    student: str = knob("", "native checkpoint directory (tools/checkpoint/convert.py hf-to-mcore)")
    teacher: str | None = knob(None, "native checkpoint directory; every algorithm but sft needs one")
    data: str = knob("", "instruction dataset prefix (tools/preprocess_data.py instructions)")
    pt_data: str | None = knob(None, "pretraining dataset prefix for L_PT (minillm); None: no L_PT")
    seed: int = knob(1234, "seeds data order, sampling and initialisation")
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    minillm: MiniLLMConfig = field(default_factory=MiniLLMConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    guardrails: GuardrailsConfig = field(default_factory=GuardrailsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"algorithm {self.algorithm!r} is not one of {', '.join(ALGORITHMS)}")
        r = self.rollout
        if self.algorithm == "minillm" and r.mix_alpha > 0 and (r.top_k or r.top_p < 1):
            # A token drawn from the teacher's share of p~ can lie outside the student's top-k / top-p
            # set: its log q_old is -inf and its PPO ratio NaN (the losses score the full vocabulary).
            raise ConfigError(
                "minillm with rollout.mix_alpha > 0 needs rollout.top_k=0 and rollout.top_p=1 (the paper's "
                "setting): teacher-mixed samples outside the student's top-k / top-p set have no log q"
            )

        p = self.parallel
        if p.sequence_parallel and p.tp > 1 and self.training.max_length % p.tp:
            # Sequences of max_length tokens (L_PT chunks, PP > 1) are split over the TP ranks.
            raise ConfigError(
                f"parallel.sequence_parallel needs training.max_length ({self.training.max_length}) divisible "
                f"by parallel.tp ({p.tp})"
            )

    def check_paths(self) -> None:
        """The checkpoints and data a training run needs (the memory planner plans without them)."""
        if self.algorithm != "sft" and not self.teacher:
            raise ConfigError(f"algorithm {self.algorithm} needs a teacher checkpoint (teacher=...)")
        if not self.student:
            raise ConfigError("student: give the student checkpoint directory")
        if not self.data:
            raise ConfigError("data: give the instruction dataset prefix (tools/preprocess_data.py)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {
    f.name: f.default_factory for f in dataclasses.fields(TrainConfig) if dataclasses.is_dataclass(f.default_factory)
}
# Keys of the flat layout before the sections -> their section keys.
MOVED_KEYS = {
    f.name: f"{section}.{f.name}"
    for section, cls in SECTIONS.items()
    for f in dataclasses.fields(cls)
    if section != "rollout"
} | {
    "rollout_batch_size": "rollout.batch_size",
    "rollout_micro_batch_size": "rollout.micro_batch_size",
    **{name: f"rollout.{name}" for name in ("mix_alpha", "temperature", "top_k", "top_p")},
}


def load_config(path: str | None, overrides: Sequence[str] = (), require_paths: bool = True) -> TrainConfig:
    """A YAML file's values, then ``key=value`` / ``section.key=value`` overrides (values parsed as
    YAML: 1e-5, true, null); ``require_paths``: :meth:`TrainConfig.check_paths` too."""
    values: dict[str, Any] = {}
    if path:
        if not Path(path).is_file():
            raise ConfigError(f"no config file at {path}")
        values = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the config must be a mapping of keys to values")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value")
        section, dot, name = key.strip().partition(".")
        if dot:
            if not isinstance(values.setdefault(section, {}), dict):
                raise ConfigError(f"{section} is a section of keys, not a value")
            values[section][name] = yaml.safe_load(raw)
        else:
            values[section] = yaml.safe_load(raw)
    cfg = _build(TrainConfig, values, "")
    if require_paths:
        cfg.check_paths()
    return cfg


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """``cls`` from a mapping, sections recursively; unknown and moved keys are named."""
    types = typing.get_type_hints(cls)
    moved = sorted(f"{k} (now {MOVED_KEYS[k]})" for k in values if not prefix and k in MOVED_KEYS)
    if moved:
        raise ConfigError(f"config keys moved into sections: {', '.join(moved)}")
    unknown = sorted(set(values) - set(types))
    if unknown:
        known = ", ".join(prefix + k for k in types)
        raise ConfigError(f"unknown config keys {[prefix + k for k in unknown]}; known keys: {known}")
    kwargs = {}
    for name, value in values.items():
        if name in SECTIONS and not prefix:
            if not isinstance(value, dict):
                raise ConfigError(f"{name} is a section: give a mapping (or {name}.KEY=VALUE), got {value!r}")
            kwargs[name] = _build(SECTIONS[name], value, f"{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, value, types[name])
    return cls(**kwargs)


def _coerce(name: str, value: Any, kind: Any) -> Any:
    """YAML reads 1e-5 as a string and 5 as an int: convert to the field's type, or say what is wrong."""
    if value is None:
        return None
    target = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # X | None -> X
    if target is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    elif isinstance(value, target) and not (target is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{name}: expected {target.__name__}, got {value!r}")


def describe() -> str:
    """Every key with its default and description, by section (the training CLI's ``--help``)."""
    lines = ["algorithms:"] + [f"  {name:<15} {text}" for name, text in ALGORITHMS.items()]

    def rows(cls: type, prefix: str) -> list[str]:
        return [
            f"  {prefix + f.name:<34} {f.default!r:<12} {f.metadata['help']}"
            for f in dataclasses.fields(cls)
            if "help" in f.metadata
        ]

    lines += ["", "keys (default, description):"] + rows(TrainConfig, "")
    for section, cls in SECTIONS.items():
        lines += ["", f"{section}: {cls.__doc__.strip()}"] + rows(cls, f"{section}.")
    return "\n".join(lines)
