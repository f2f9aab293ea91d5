"""The teacher on its own TP x PP layout beside the student (issue 18), against the shared layout.

On 4 ranks the student runs TP=2 x DP=2 throughout; the teacher runs at the student's layout (the
reference), at TP=4 (DP=1; here the student also runs with sequence parallelism), at TP=1 x DP=4 and
at TP=2 x PP=2 (DP=1). Its logits reach the student
re-split V/TP_t -> V/TP_s, and each teacher DP group serves rows of several student DP groups (or a
part of one). Every run must draw the same rollouts (seeded) and log the same terms, within the
tolerance of the student's own layout tests: the speculative sampler with the teacher's logits kept
from the rollouts (the default), the token-by-token sampler with a scoring forward (L_Single, the
rewards' log p), L_PT's teacher logits on pretraining text, and word-level KD.
"""

from pathlib import Path

import pytest
from harness import run_distributed, run_tool_in_workers
from hf_zoo import llama_with_tokenizer
from test_trainer import MINILLM_TERMS, _train_args
from tokenizer_zoo import hf_tokenizer_dir

# The teacher's layout (and, in one run, the student with sequence parallelism: the same terms again).
TEACHER_LAYOUTS = {
    "shared": [],
    "tp4_sp": ["parallel.teacher_tp=4", "parallel.sequence_parallel=true"],
    "tp1": ["parallel.teacher_tp=1"],
    "tp2pp2": ["parallel.teacher_pp=2"],
}
# (algorithm, overrides, iterations, teacher layouts)
RUNS = [
    ("minillm", ["minillm.ppo_epochs=2"], 3, ["shared", "tp4_sp", "tp1", "tp2pp2"]),
    ("minillm", ["rollout.speculative_k=0", "rollout.reuse_teacher_logits=false"], 2, ["shared", "tp2pp2"]),
    ("kd", [], 2, ["shared", "tp1"]),
    ("seqkd", [], 2, ["shared", "tp1"]),  # own layout: the teacher's samples through its decoder at alpha = 1
]
TERMS = {
    "minillm": (*MINILLM_TERMS, "response length"),
    "kd": ("kd loss", "lm loss"),
    "seqkd": ("lm loss", "response length"),
}


@pytest.fixture(scope="module")
def teacher_kv4(tiny_pair, tmp_path_factory) -> Path:
    """A teacher with 4 key/value heads (TP=4 must divide them), converted as the tiny pair's are."""
    root = tmp_path_factory.mktemp("teacher_kv4")
    hf_dir = llama_with_tokenizer(root / "hf", 1, hf_tokenizer_dir(), layers=4, context=128, sharpen=4.0, kv_heads=4)
    args = ("hf-to-mcore", "--hf", str(hf_dir), "--out", str(root / "mcore"), "--tp", "2")
    done = run_tool_in_workers("tools/checkpoint/convert.py", *args, nproc=2)
    assert done.returncode == 0, done.stderr[-2000:]
    return root / "mcore"


def _runs(tiny_pair: dict[str, Path], teacher: Path) -> dict:
    """Every run's logged metrics (meaningful on the last rank) and this rank's rollouts."""
    from megatron.core import parallel_state

    from megatron_minillm.config import load_config
    from megatron_minillm.training.trainer import Trainer

    out = {}
    for algorithm, overrides, iterations, layouts in RUNS:
        for name in layouts:
            args = _train_args(
                tiny_pair,
                f"teacher={teacher}",
                f"algorithm={algorithm}",
                "parallel.tp=2",
                *TEACHER_LAYOUTS[name],
                *overrides,
            )
            trainer = Trainer(load_config(None, [a for a in args if "=" in a]))
            assert trainer.teacher.own_layout == (name != "shared")
            rollouts = []
            sample = trainer._rollouts

            def recording(iteration: int, sample=sample, rollouts=rollouts):
                prompts, batch = sample(iteration)
                rollouts.append([r.responses() for r in batch])
                return prompts, batch

            trainer._rollouts = recording
            metrics = [trainer.iteration(i) for i in range(iterations)]
            out[(algorithm, tuple(overrides), name)] = (metrics, rollouts)
            parallel_state.destroy_model_parallel()
    return out


def test_teacher_on_its_own_layout_equals_the_shared_layout(tiny_pair, teacher_kv4):
    results = run_distributed(_runs, 4, tiny_pair, teacher_kv4)
    for algorithm, overrides, _, layouts in RUNS:
        runs = [results[-1][(algorithm, tuple(overrides), name)][0] for name in layouts]
        for name, metrics in zip(layouts[1:], runs[1:]):
            for a, b in zip(metrics, runs[0], strict=True):
                for key in TERMS[algorithm]:
                    assert a[key] == pytest.approx(b[key], abs=2e-3), (algorithm, overrides, name, key, a, b)
        if algorithm == "minillm":
            for rank, per_rank in enumerate(results):  # each rank's student DP group draws the same tokens
                reference = per_rank[(algorithm, tuple(overrides), "shared")][1]
                assert reference and all(reference)
                for name in layouts[1:]:
                    assert per_rank[(algorithm, tuple(overrides), name)][1] == reference, (rank, name)


@pytest.mark.parametrize(
    ("overrides", "world_size", "message"),
    [
        (
            ["parallel.teacher_tp=4"],
            4,
            r"the teacher \(.*\) at TP=4 x PP=1: TP=4 does not divide the 2 key/value heads",
        ),
        (["parallel.teacher_pp=3"], 3, r"the teacher \(.*\) at TP=1 x PP=3: PP=3 does not divide the 4 layers"),
        (
            ["parallel.tp=2", "parallel.teacher_tp=1"],
            3,
            r"the student \(.*\) at TP=2 x PP=1: world size 3 is not divisible",
        ),
    ],
)
def test_each_model_layout_is_checked_before_loading(tiny_pair, monkeypatch, overrides, world_size, message):
    from megatron_minillm.config import load_config
    from megatron_minillm.parallel import LayoutError
    from megatron_minillm.training.trainer import check_inputs

    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    cfg = load_config(None, [a for a in _train_args(tiny_pair, *overrides) if "=" in a])
    with pytest.raises(LayoutError, match=message):
        check_inputs(cfg)


def test_a_padded_vocabulary_both_tps_cannot_split_is_refused():
    from megatron_minillm.parallel import LayoutError, ParallelLayout
    from megatron_minillm.parallel.exchange import LayoutExchange

    student, teacher = ParallelLayout(tp=2, world_size=4), ParallelLayout(tp=4, world_size=4)
    with pytest.raises(LayoutError, match=r"padded vocabulary \(258\) is not divisible by the teacher's TP=4"):
        LayoutExchange(student, teacher, padded_vocab=258)
