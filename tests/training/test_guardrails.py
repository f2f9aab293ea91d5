"""Collapse guardrails (training/guardrails.py): the rules on synthetic check histories, distinct-n,
and the trainer on a planted collapse (a reward that favours one token: the student learns to repeat
it) against the same run without the plant, which must not fire."""

import contextlib
import io
import logging
from pathlib import Path

import pytest
import torch
from harness import run_distributed
from test_trainer import _iterations, _train_args

from megatron_minillm.algorithms.minillm import MiniLLM
from megatron_minillm.config import GuardrailsConfig
from megatron_minillm.training.guardrails import Check, Guardrails, distinct_n


def test_distinct_n_counts_unique_ngrams_per_response():
    assert distinct_n([[1, 2, 3, 4]], 2) == (1.0, 1)
    assert distinct_n([[5, 5, 5, 5, 5]], 2) == (0.25, 1)  # 4 bigrams, 1 unique
    assert distinct_n([[7], [1, 2, 1, 2]], 2) == (2 / 3, 1)  # [7] has no bigram; (1,2),(2,1),(1,2)
    assert distinct_n([[1, 2, 1, 2, 1]], 3) == (2 / 3, 1)


def _checks(pairs: list[tuple[float, float]], **extra) -> list[Check]:
    """Checks from (own-sample RKL, teacher-sample RKL) pairs."""
    return [Check(i + 1, probe_rkl=probe, own_rkl=own, **extra) for i, (own, probe) in enumerate(pairs)]


def test_divergence_fires_after_patience_checks_and_not_on_a_healthy_history():
    cfg = GuardrailsConfig(patience=2, rkl_tolerance=0.05)
    healthy = Guardrails(cfg)
    # both falling, with noise in the own-sample value and a small teacher-sample bump within tolerance
    for check in _checks([(1.0, 5.0), (0.8, 4.8), (0.9, 4.9), (0.6, 4.6), (0.5, 4.7), (0.4, 4.5)]):
        assert healthy.update(check) == []
    collapsing, fired = Guardrails(cfg), []
    for check in _checks([(1.0, 5.0), (0.9, 4.9), (0.7, 5.3), (0.5, 5.6), (0.9, 4.8), (0.6, 5.2), (0.3, 5.9)]):
        fired.append(bool(collapsing.update(check)))
    # 3 and 4 diverge from the best (check 2): fires at 4; 5 is the new best; 6 and 7 diverge from it
    assert fired == [False, False, False, True, False, False, True]
    message = Guardrails(cfg)
    warnings = [message.update(c) for c in _checks([(1.0, 5.0), (0.7, 5.5), (0.5, 6.0)])][-1]
    assert (
        len(warnings) == 1
        and "fell from 1.0000 to 0.5000" in warnings[0]
        and "rose from 5.0000 to 6.0000" in warnings[0]
    )


def test_repetition_fires_below_min_distinct_and_state_carries_over():
    cfg = GuardrailsConfig(min_distinct=0.5, patience=2)
    guard = Guardrails(cfg)
    assert guard.update(Check(1, probe_rkl=5.0, own_rkl=1.0, distinct=0.9, length_ratio=1.0)) == []
    [warning] = guard.update(Check(2, probe_rkl=4.0, own_rkl=0.9, distinct=0.3, length_ratio=2.5))
    assert "distinct-2" in warning and "0.300" in warning and "2.50x the teacher's" in warning
    # a resumed run (state from a checkpoint) decides as the straight run does
    straight, resumed = Guardrails(cfg), Guardrails(cfg)
    history = _checks([(1.0, 5.0), (0.7, 5.5), (0.5, 6.0), (0.4, 6.5)])
    for check in history[:2]:
        straight.update(check)
    resumed.load_state_dict(straight.state_dict())
    assert [straight.update(c) for c in history[2:]] == [resumed.update(c) for c in history[2:]]


class PlantedCollapse(MiniLLM):
    """MiniLLM whose reward rates every repeated token certain: log p = 0 where a response token
    already occurred earlier in the response (a teacher that rates repetition likely, the trap reverse
    KL is known to fall into). The student learns to repeat itself."""

    def prepare_samples(self, batches) -> None:
        for b in batches:
            repeated = torch.zeros_like(b.loss_mask, dtype=torch.bool)
            for row, mask in enumerate(b.loss_mask.bool()):
                labels = b.labels[row][mask]
                earlier = (labels[:, None] == labels[None, :]).tril(-1).any(1)  # [n]: seen before
                repeated[row, mask.nonzero().squeeze(1)] = earlier
            b.teacher_log_p = b.teacher_log_p + 10.0 * repeated
        super().prepare_samples(batches)


def _guarded_runs(tiny_pair: dict[str, Path], save: Path) -> dict:
    """A healthy MiniLLM run, and a planted collapse warned about and stopped (one process): each
    run's log lines, guardrail warnings and stop."""
    from megatron.core import parallel_state

    from megatron_minillm.config import load_config
    from megatron_minillm.training import trainer as trainer_module

    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    handler.setLevel(logging.WARNING)
    logging.getLogger("megatron_minillm.train").addHandler(handler)
    out = {}
    aggressive = ["optimizer.lr=1e-2", "minillm.clip_eps=10", "minillm.single_step=false", "pt_data=null"]
    runs = {  # the paper's recipe at a moderate learning rate; a repetition reward and aggressive updates
        "healthy": ["training.train_iters=8", "guardrails.stop=true"],
        "planted": ["training.train_iters=12", *aggressive],
        "planted, stop": ["training.train_iters=12", *aggressive, "guardrails.stop=true", f"checkpoint.save={save}"],
    }
    for name, extra in runs.items():
        overrides = ["rollout.batch_size=8", "training.global_batch_size=8", "minillm.ppo_epochs=2", *extra]
        cfg = load_config(None, [a for a in _train_args(tiny_pair, *overrides) if "=" in a])
        objectives = dict(trainer_module.OBJECTIVES)
        if name.startswith("planted"):
            trainer_module.OBJECTIVES["minillm"] = PlantedCollapse
        stdout, error = io.StringIO(), None
        try:
            with contextlib.redirect_stdout(stdout):
                trainer_module.Trainer(cfg).run()
        except trainer_module.CollapseError as err:
            error = str(err)
        finally:
            trainer_module.OBJECTIVES.update(objectives)
            parallel_state.destroy_model_parallel()
        out[name] = {"rows": _iterations(stdout.getvalue()), "warnings": list(warnings), "error": error}
        warnings.clear()
    return out


@pytest.fixture(scope="module")
def guarded_runs(tiny_pair, tmp_path_factory) -> dict:
    save = tmp_path_factory.mktemp("guardrails") / "stopped"
    return run_distributed(_guarded_runs, 1, tiny_pair, save)[0] | {"save": save}


def test_a_healthy_run_trains_to_the_end_without_a_warning(guarded_runs):
    run = guarded_runs["healthy"]
    assert run["error"] is None and run["warnings"] == [] and len(run["rows"]) == 8, run
    first, last = run["rows"][0], run["rows"][-1]
    assert {"rkl on teacher samples", "distinct-2", "length / teacher"} <= first.keys()
    assert last["rkl on teacher samples"] < first["rkl on teacher samples"]
    assert min(r["distinct-2"] for r in run["rows"]) > 0.9


def test_a_planted_collapse_is_warned_about_with_its_numbers(guarded_runs):
    run = guarded_runs["planted"]
    assert run["error"] is None and len(run["rows"]) == 12, run
    rows = run["rows"]
    assert rows[-1]["rkl on teacher samples"] > 5 * rows[0]["rkl on teacher samples"]
    assert rows[-1]["distinct-2"] < 0.5 < rows[0]["distinct-2"]
    assert rows[-1]["rkl to teacher"] < rows[0]["rkl to teacher"]  # by its own samples, it is improving
    divergence = [w for w in run["warnings"] if "on the teacher's samples it rose" in w]
    repetition = [w for w in run["warnings"] if "repeat themselves" in w]
    assert divergence and repetition, run["warnings"]
    # the first warning comes before the repetition is visible, the repetition warning when it is
    first = int(divergence[0].split()[2].rstrip(":"))
    assert rows[first - 1]["distinct-2"] > 0.5
    for warning in repetition:
        iteration = int(warning.split()[2].rstrip(":"))
        assert f"is {rows[iteration - 1]['distinct-2']:.3f} < guardrails.min_distinct=0.5" in warning


def test_guardrails_stop_ends_the_run_at_the_first_warning_without_saving(guarded_runs):
    warned, stopped = guarded_runs["planted"], guarded_runs["planted, stop"]
    first = int(warned["warnings"][0].split()[2].rstrip(":"))
    assert stopped["error"] is not None and "Stopped without saving" in stopped["error"]
    assert stopped["warnings"] == [w for w in warned["warnings"] if w.startswith(f"guardrails, iteration {first}:")]
    assert stopped["error"].startswith(f"iteration {first}: ") and len(stopped["rows"]) == first - 1
    assert not (guarded_runs["save"] / "latest").exists()
