"""Plateau length from a logged accuracy curve — our definition, since the paper gives none.

Fu et al. show plateaus as flat stretches of the loss/accuracy curve and report their length
in epochs, without a formula. We define it on the held-out ICL accuracy of the *late*
positions (the second half of the pairs, where the context holds enough pairs to answer):

    final     = mean of the last ``tail`` logged values
    threshold = chance + frac · (final − chance)            (frac = 0.5 by default)
    length    = the first logged step whose accuracy reaches ``threshold``

i.e. the steps until the model has made half of its eventual gain over chance. A run whose
final gain is below ``min_gain · (1 − chance)`` never left the plateau within its budget:
its length is *censored* (``None``; at least the number of steps run), and summaries count
such runs separately instead of inventing a number.

Warm-up steps on the easy task count: the length is measured in optimizer steps from the
first one, so a strategy cannot shorten its plateau by not counting the steps it spent.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["PlateauLength", "late_accuracy", "plateau_length", "summarize_lengths"]


@dataclass
class PlateauLength:
    """A curve's plateau length (``None`` when censored) and the numbers behind it."""

    length: int | None
    threshold: float
    final: float
    chance: float
    escaped: bool
    total_steps: int

    def to_json(self) -> dict:
        return dict(self.__dict__)


def late_accuracy(per_position: Sequence[float], start: float = 0.5) -> float:
    """Mean accuracy over the pairs from ``start`` (a fraction of ``N``) to the end."""
    k = min(len(per_position) - 1, int(len(per_position) * start))
    return statistics.fmean(per_position[k:])


def plateau_length(
    steps: Sequence[int],
    accuracy: Sequence[float],
    chance: float,
    *,
    frac: float = 0.5,
    tail: int = 3,
    min_gain: float = 0.1,
) -> PlateauLength:
    """Steps until ``accuracy`` first reaches ``chance + frac · (final − chance)``.

    ``steps`` and ``accuracy`` are the logged curve (increasing steps). See the module
    docstring for the definition and censoring.
    """
    if len(steps) != len(accuracy) or not steps:
        raise ValueError(
            f"plateau_length needs one accuracy per logged step, got {len(steps)} steps and "
            f"{len(accuracy)} accuracies."
        )
    if not 0 < frac < 1:
        raise ValueError(f"frac is a fraction of the final gain, in (0, 1); got {frac}")
    final = statistics.fmean(accuracy[-tail:])
    threshold = chance + frac * (final - chance)
    escaped = final - chance >= min_gain * (1 - chance)
    length = None
    if escaped:
        length = next(s for s, a in zip(steps, accuracy, strict=True) if a >= threshold)
    return PlateauLength(length, threshold, final, chance, escaped, int(steps[-1]))


def summarize_lengths(lengths: Sequence[PlateauLength]) -> dict:
    """Mean ± sd of the plateau lengths of several seeds; censored runs counted apart.

    ``mean``/``sd`` are over the runs that escaped (``None`` when fewer than one / two did);
    ``lower_bound_mean`` counts a censored run at its total steps (a lower bound on the true
    mean when any run is censored).
    """
    done = [p.length for p in lengths if p.length is not None]
    bound = [p.length if p.length is not None else p.total_steps for p in lengths]
    return {
        "n_runs": len(lengths),
        "n_escaped": len(done),
        "mean": statistics.fmean(done) if done else None,
        "sd": statistics.stdev(done) if len(done) > 1 else None,
        "lower_bound_mean": statistics.fmean(bound) if bound else None,
        "lengths": [p.length for p in lengths],
    }
