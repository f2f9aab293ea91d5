"""The trainer's configuration: one dataclass, a YAML file and ``key=value`` command-line overrides.

Defaults reproduce the MiniLLM reference recipe (../shared/docs/MINILLM_DEFAULTS.md); baselines
(SFT, KD, SeqKD) take the same fields with their own learning rate etc. set in their YAML files.
"""

import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ALGORITHMS = ("minillm", "sft", "kd", "seqkd", "rkl_offpolicy")


class ConfigError(ValueError):
    """A configuration that cannot run (unknown key, bad value, missing path)."""


@dataclass
class TrainConfig:
    algorithm: str = "minillm"  # minillm | sft | kd | seqkd | rkl_offpolicy
    student: str = ""  # native checkpoint directory (tools/checkpoint/convert.py hf-to-mcore)
    teacher: str | None = None  # needed by every algorithm but sft
    data: str = ""  # instruction dataset prefix (tools/preprocess_data.py instructions), e.g. out/dolly_train
    pt_data: str | None = None  # pretraining dataset prefix for L_PT (minillm); None: no L_PT
    save: str | None = None  # training checkpoints (iter_XXXXXXX/, latest); resumed from if present
    tensorboard_dir: str | None = None

    # layout and batches
    tp: int = 1
    pp: int = 1
    seed: int = 1234
    train_iters: int = 313  # minillm: rollout iterations (313 x 256 x 4 / 64 = 5008 steps, LMOps: 5000); others: steps
    micro_batch_size: int = 4
    global_batch_size: int = 16  # samples per optimizer step over all DP ranks
    max_prompt_length: int = 256
    max_length: int = 512  # prompt + response: the training sequence length

    # optimisation (megatron DDP + distributed optimizer, AdamW)
    lr: float = 5e-6
    min_lr: float = 0.0
    lr_warmup_iters: int = 100  # in optimizer steps
    lr_decay_style: str = "constant"  # constant | cosine | linear
    weight_decay: float = 1e-6
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True
    recompute: bool = False  # full activation recomputation of every layer
    dtype: str = "fp32"  # fp32 | bf16 (bf16 on GPU)

    # MiniLLM (Algorithm 1)
    rollout_batch_size: int = 256  # rollouts per iteration over all DP ranks
    rollout_micro_batch_size: int = 16  # prompts per sampler call
    mix_alpha: float = 0.2  # teacher-mixed sampling p~ = alpha p + (1 - alpha) q; 0 = no mixing
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    ppo_epochs: int = 4
    gamma: float = 0.95
    clip_eps: float = 0.2
    reward_scaling: float = 0.5
    reward_clip: float = 100.0
    length_norm: bool = True
    whiten: bool = True
    policy_gradient: bool = True  # the PPO-clipped policy-gradient term; false: single-step (+ L_PT) only
    single_step: bool = True  # the single-step reverse-KL term L_Single
    lm_coef: float = 1.0  # weight of L_PT (needs pt_data)
    kd_ratio: float = 0.5  # L_PT and the KD baseline: (1 - kd_ratio) CE + kd_ratio forward KL
    teacher_cache_dtype: str = "bf16"  # teacher logits kept per rollout batch for L_Single / L_PT

    # logging and checkpoints
    log_interval: int = 1
    save_interval: int = 0  # 0: only at the end and on SIGTERM

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"algorithm {self.algorithm!r} is not one of {', '.join(ALGORITHMS)}")
        if not self.student:
            raise ConfigError("student: give the student checkpoint directory")
        if not self.data:
            raise ConfigError("data: give the instruction dataset prefix (tools/preprocess_data.py)")
        if self.algorithm != "sft" and not self.teacher:
            raise ConfigError(f"algorithm {self.algorithm} needs a teacher checkpoint (teacher=...)")
        for name in (
            "tp",
            "pp",
            "train_iters",
            "micro_batch_size",
            "global_batch_size",
            "ppo_epochs",
            "rollout_batch_size",
            "rollout_micro_batch_size",
            "log_interval",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.max_prompt_length < self.max_length:
            raise ConfigError(f"need 0 < max_prompt_length ({self.max_prompt_length}) < max_length ({self.max_length})")
        if not 0 <= self.mix_alpha <= 1 or not 0 <= self.kd_ratio <= 1:
            raise ConfigError(f"mix_alpha ({self.mix_alpha}) and kd_ratio ({self.kd_ratio}) must be in [0, 1]")
        if self.lr_decay_style not in ("constant", "cosine", "linear"):
            raise ConfigError(f"lr_decay_style {self.lr_decay_style!r} is not constant, cosine or linear")
        if self.algorithm == "minillm" and not (self.policy_gradient or self.single_step):
            raise ConfigError(
                "minillm with policy_gradient=false and single_step=false has no rollout loss; "
                "keep at least one of them"
            )
        if self.dtype not in ("fp32", "bf16") or self.teacher_cache_dtype not in ("fp32", "bf16"):
            raise ConfigError("dtype and teacher_cache_dtype must be fp32 or bf16")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """A YAML file's values, then ``key=value`` overrides (values parsed as YAML: 1e-5, true, null)."""
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
        values[key.strip()] = yaml.safe_load(raw)
    types = typing.get_type_hints(TrainConfig)
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; known keys: {', '.join(sorted(types))}")
    return TrainConfig(**{k: _coerce(k, v, types[k]) for k, v in values.items()})


def _coerce(name: str, value: Any, kind: Any) -> Any:
    """YAML reads 1e-5 as a string and 5 as an int: convert to the field's type, or say what is wrong."""
    if value is None:
        return None
    target = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # Optional[X] -> X
    if target is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    elif isinstance(value, target) and not (target is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{name}: expected {target.__name__}, got {value!r}")
