"""Interleaved measurement: the one way this repository's benchmarks compare methods.

On a shared machine the speed of *everything* drifts by tens of percent within minutes (other
jobs, frequency scaling, cache pressure).  Timing method A for a minute and then method B puts
all of that drift into the A/B ratio.  So every benchmark here runs its methods **round-robin**:
round r times each method once (in an order rotated every round, so no method always runs first
or last), and a ratio is computed *per round* from measurements taken seconds apart.  The
reported ratio is the median of the per-round ratios, with their min..max spread, and a target
counts as met only when the whole spread clears it - one lucky round cannot meet a target and
one unlucky round is visible in the spread instead of silently in the number.

Only the standard library: every bench script imports it.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

K = TypeVar("K", bound=Hashable)
MIN_ROUNDS = 5


def run_rounds(measures: dict[K, Callable[[], float]], rounds: int, on_round: Callable[[int], None] | None = None) -> dict[K, list[float]]:
    """Call every measure once per round, round-robin, rotating the start each round.

    ``measures[k]()`` returns one number (a rate, a latency, ...) for method ``k``; the result
    holds, per method, one number per round in round order, so ``out[a][r] / out[b][r]`` are
    the same-round ratios."""
    if rounds < 1:
        raise ValueError("at least one round")
    keys = list(measures)
    out: dict[K, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        shift = r % len(keys) if keys else 0
        for k in keys[shift:] + keys[:shift]:
            out[k].append(float(measures[k]()))
        if on_round is not None:
            on_round(r)
    return out


def run_alternating(steps: dict[K, Sequence[Callable[[], int]]], rounds: int, clock: Callable[[], float]) -> dict[K, list[float]]:
    """Rates per round from methods alternated step by step: the finest interleaving, for a ratio
    of two (or a few) methods that must hold in every round.

    ``steps[k]`` is method ``k``'s pass cut into steps (one batch each, say); each step does its
    work and returns how many items it did.  Round r runs step j of every method back to back
    (the order rotated with j and r, so no method always goes first), timing each step by
    ``clock``; a method's rate for the round is its items over its summed seconds.  Why: on a
    shared machine the speed of everything drifts by tens of percent over seconds, and
    ``run_rounds`` times a whole pass of each method in turn, so a round's ratio still spans that
    drift (``bench/lookup.py`` saw keyed/dense 0.74..1.26 over 7 rounds of 64-batch passes);
    here both sides of a ratio are timed within milliseconds of each other, step after step.
    Every method must have the same number of steps."""
    if rounds < 1:
        raise ValueError("at least one round")
    keys = list(steps)
    counts = {len(steps[k]) for k in keys}
    if len(counts) > 1:
        raise ValueError("every method needs the same number of steps")
    count = counts.pop() if counts else 0
    out: dict[K, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        items = dict.fromkeys(keys, 0)
        seconds = dict.fromkeys(keys, 0.0)
        for j in range(count):
            shift = (r + j) % len(keys)
            for k in keys[shift:] + keys[:shift]:
                started = clock()
                items[k] += steps[k][j]()
                seconds[k] += clock() - started
        for k in keys:
            out[k].append(items[k] / max(seconds[k], 1e-9))
    return out


@dataclass(frozen=True)
class Spread:
    """The median of per-round values and their range."""

    median: float
    lo: float
    hi: float
    rounds: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        if not values:
            raise ValueError("no rounds")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def fmt(self, digits: int = 2, unit: str = "x") -> str:
        return f"{self.median:.{digits}f}{unit} ({self.lo:.{digits}f}..{self.hi:.{digits}f})"

    def verdict(self, target: float, at_least: bool = True) -> str:
        """``met`` only when every round clears the target, ``missed`` when none does, else
        ``not shown`` (the rounds disagree: the spread straddles the target)."""
        if at_least:
            if self.lo >= target:
                return "met"
            if self.hi < target:
                return "missed"
        else:
            if self.hi <= target:
                return "met"
            if self.lo > target:
                return "missed"
        return "not shown (spread straddles the target)"


def ratio(numerator: Sequence[float], denominator: Sequence[float]) -> Spread:
    """Per-round ``numerator[r] / denominator[r]``, summarized."""
    if len(numerator) != len(denominator):
        raise ValueError("ratios need the same rounds on both sides")
    return Spread.of([a / b for a, b in zip(numerator, denominator, strict=True) if b])


def target_line(label: str, spread: Spread, target: float, at_least: bool = True, digits: int = 2, unit: str = "x") -> str:
    """A markdown bullet: what was asked, the median with its spread, and the verdict."""
    sign = ">=" if at_least else "<="
    return f"- {label} {sign} {target:g}{unit}: **{spread.fmt(digits, unit)}** - {spread.verdict(target, at_least)}"


NOISE_NOTE = (
    "The machine is shared (2 cores, other agents' jobs running): absolute numbers move between runs and even "
    "between rounds. Methods are run round-robin, so every ratio is a median of same-round ratios with its "
    "min..max spread, and a target is `met` only when every round clears it."
)
