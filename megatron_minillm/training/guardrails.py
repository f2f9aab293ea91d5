"""Collapse guardrails: signs that reverse-KL training is drifting into a degenerate mode.

Reverse KL is mode-seeking: a student can lower KL(q || p) on its *own* samples by settling on
text the teacher rates likely but would rarely write itself, typically repetition (NeMo-RL #1527,
LMOps #318). The reverse KL the objective reports is measured on the samples the student chose, so
it keeps falling through such a collapse. Three numbers per check tell the two apart:

- ``rkl on teacher samples``: the student's reverse KL on a fixed set of the teacher's own samples
  (the same sequences every check, so it moves only with the weights);
- ``distinct-n``: the share of unique n-grams within each of the student's samples (mean over them);
- ``length / teacher``: the student's mean response length over the teacher's on the probe prompts.

:class:`Guardrails` turns their history into warnings: the own-sample reverse KL falling while the
teacher-sample one rises (for ``patience`` checks, against the check where the teacher-sample value
was lowest), or repetition past ``min_distinct``. The trainer logs the numbers and warns or stops.
"""

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from megatron_minillm.config import GuardrailsConfig

OWN_RKL = "rkl to teacher"  # the on-policy objectives' sample statistic: mean log q - log p of the samples
PROBE_RKL = "rkl on teacher samples"
LENGTH_RATIO = "length / teacher"


class CollapseError(RuntimeError):
    """A guardrail fired with ``guardrails.stop`` set: the run stops without saving."""


def distinct_n(responses: Sequence[Sequence[int]], n: int) -> tuple[float, int]:
    """(sum over responses of unique n-grams / n-grams, number of responses with an n-gram): one
    response repeating a token scores ~1 / length, varied text ~1. Summed so that DP ranks can
    all-reduce before dividing."""
    total, count = 0.0, 0
    for tokens in responses:
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        if grams:
            total, count = total + len(set(grams)) / len(grams), count + 1
    return total, count


@dataclass
class Check:
    """The numbers of one check (``own_rkl`` None: no own samples, e.g. SeqKD)."""

    iteration: int
    probe_rkl: float
    own_rkl: float | None = None
    distinct: float | None = None
    length_ratio: float | None = None


@dataclass
class Guardrails:
    """The checks' history and the rules (module doc). ``state_dict`` / ``load_state_dict`` carry
    it through checkpoints, so a resumed run warns as the straight run would."""

    cfg: GuardrailsConfig
    best: Check | None = None  # the check with the lowest teacher-sample reverse KL so far
    strikes: int = 0  # consecutive checks with the reverse-KL divergence

    def update(self, check: Check) -> list[str]:
        """Record ``check``; return the warnings it raises (empty: healthy)."""
        cfg, warnings = self.cfg, []
        best = self.best
        if best is not None and best.own_rkl is not None and check.own_rkl is not None:
            tol = cfg.rkl_tolerance
            diverging = check.own_rkl < best.own_rkl and check.probe_rkl > (1 + tol) * best.probe_rkl
            self.strikes = self.strikes + 1 if diverging else 0
            if self.strikes >= cfg.patience:
                warnings.append(
                    f"reverse KL on the student's own samples fell from {best.own_rkl:.4f} to {check.own_rkl:.4f} "
                    f"while on the teacher's samples it rose from {best.probe_rkl:.4f} to {check.probe_rkl:.4f} "
                    f"(iteration {best.iteration} -> {check.iteration}, {self.strikes} checks in a row): the "
                    "student is settling on text the teacher rates likely but does not write"
                )
        if best is None or check.probe_rkl < best.probe_rkl:
            self.best = check
        if check.distinct is not None and check.distinct < cfg.min_distinct:
            warnings.append(
                f"distinct-{cfg.distinct_n} of the student's samples is {check.distinct:.3f} < "
                f"guardrails.min_distinct={cfg.min_distinct}: its responses repeat themselves"
            )
        if warnings and check.length_ratio is not None:
            warnings[-1] += f" (response length {check.length_ratio:.2f}x the teacher's)"
        return warnings

    def state_dict(self) -> dict:
        return {"best": None if self.best is None else asdict(self.best), "strikes": self.strikes}

    def load_state_dict(self, state: dict) -> None:
        self.best = None if state["best"] is None else Check(**state["best"])
        self.strikes = state["strikes"]
