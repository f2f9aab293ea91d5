"""The training config: sections in YAML and as section.key=value, errors that name the key, the
keys of the flat layout refused with their new names, --help listing every key and algorithm."""

import pytest
from harness import run_tool

from megatron_minillm.algorithms import OBJECTIVES
from megatron_minillm.config import ALGORITHMS, MOVED_KEYS, SECTIONS, ConfigError, load_config


def test_config_file_overrides_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algorithm: kd\nstudent: s\nteacher: t\ndata: d\noptimizer:\n  lr: 1e-5\n")
    cfg = load_config(str(path), ["parallel.tp=2", "optimizer.lr=2e-5", "minillm.length_norm=false", "pt_data=null"])
    assert (cfg.algorithm, cfg.parallel.tp, cfg.optimizer.lr, cfg.minillm.length_norm, cfg.pt_data) == (
        "kd",
        2,
        2e-5,
        False,
        None,
    )
    assert cfg.optimizer.weight_decay == 1e-6  # the rest of a section keeps its defaults
    with pytest.raises(ConfigError, match=r"unknown config keys \['learning_rate'\]"):
        load_config(str(path), ["learning_rate=1"])
    with pytest.raises(ConfigError, match=r"unknown config keys \['optimizer.learning_rate'\]"):
        load_config(str(path), ["optimizer.learning_rate=1"])
    with pytest.raises(ConfigError, match="tp: expected int, got 'two'"):
        load_config(str(path), ["parallel.tp=two"])
    with pytest.raises(ConfigError, match="algorithm kd needs a teacher"):
        load_config(str(path), ["teacher=null"])
    assert load_config(str(path), ["teacher=null"], require_paths=False).teacher is None  # the planner's way
    with pytest.raises(ConfigError, match="algorithm 'ppo' is not one of"):
        load_config(str(path), ["algorithm=ppo"])
    with pytest.raises(ConfigError, match="minillm.policy_gradient=false and minillm.single_step=false"):
        load_config(str(path), ["algorithm=minillm", "minillm.policy_gradient=false", "minillm.single_step=false"])
    with pytest.raises(ConfigError, match=r"optimizer is a section: give a mapping \(or optimizer.KEY=VALUE\)"):
        load_config(str(path), ["optimizer=1"])
    with pytest.raises(ConfigError, match="rollout.mix_alpha"):
        load_config(str(path), ["rollout.mix_alpha=2"])
    with pytest.raises(ConfigError, match="mix_alpha > 0 needs rollout.top_k=0 and rollout.top_p=1"):
        load_config(str(path), ["algorithm=minillm", "rollout.top_p=0.9"])
    assert (
        load_config(str(path), ["algorithm=minillm", "rollout.top_p=0.9", "rollout.mix_alpha=0"]).rollout.top_p == 0.9
    )


def test_flat_keys_are_refused_with_their_new_names(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("algorithm: sft\nstudent: s\ndata: d\nlr: 1e-5\nrollout_batch_size: 8\n")
    with pytest.raises(
        ConfigError,
        match=r"moved into sections: lr \(now optimizer.lr\), rollout_batch_size \(now rollout.batch_size\)",
    ):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"ppo_epochs \(now minillm.ppo_epochs\)"):
        load_config(None, ["student=s", "data=d", "teacher=t", "ppo_epochs=2"])
    # every section key has its flat name mapped, and each maps to a real key
    for old, new in MOVED_KEYS.items():
        section, key = new.split(".")
        assert key in SECTIONS[section].__dataclass_fields__, (old, new)


def test_algorithms_are_the_objectives_and_help_lists_every_key():
    assert list(OBJECTIVES) == list(ALGORITHMS)
    done = run_tool("-m", "megatron_minillm.train", "--help")
    assert done.returncode == 0, done.stderr
    for name in ALGORITHMS:
        assert f"\n  {name} " in done.stdout
    for section, cls in SECTIONS.items():
        assert f"\n{section}: " in done.stdout
        for key, field in cls.__dataclass_fields__.items():
            assert f"{section}.{key}" in done.stdout and field.metadata["help"] in done.stdout
    assert "examples/configs/minillm.yaml" in done.stdout


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lr=nan", "optimizer.lr must be a finite number > 0, got nan"),
        ("optimizer.lr=0", "optimizer.lr must be a finite number > 0, got 0.0"),
        ("optimizer.lr=.inf", "optimizer.lr must be a finite number > 0, got inf"),
        ("optimizer.min_lr=1", r"optimizer.min_lr must be in \[0, optimizer.lr=5e-06\], got 1.0"),
        ("optimizer.adam_beta2=1", r"optimizer.adam_beta2 must be in \[0, 1\), got 1.0"),
        ("optimizer.weight_decay=-1", "optimizer.weight_decay must be a finite number >= 0"),
        ("rollout.temperature=0", "rollout.temperature must be a finite number > 0, got 0.0"),
        ("rollout.top_p=0", r"rollout.top_p must be in \(0, 1\], got 0.0"),
        ("minillm.gamma=1.5", r"minillm.gamma must be in \[0, 1\], got 1.5"),
        ("minillm.reward_scaling=0", "minillm.reward_scaling must be a finite number > 0"),
        ("checkpoint.save_interval=-1", "checkpoint.save_interval must be >= 0, got -1"),
    ],
)
def test_values_that_cannot_train_are_refused(override, message):
    """Before any model loads (the trainer checks max_length against the models' context: test_bad_inputs)."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["student=s", "teacher=t", "data=d", override])
