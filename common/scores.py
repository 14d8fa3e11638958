"""Per-phase score summaries: what a site sends after evaluating, and how the server pools them.

A site sends, per phase, the number of cases and the sum and sum of squares of each metric over
them (no case ids, no per-case values); from these the server gets the mean, the sample standard
deviation and n of any pooled group of sites exactly. MetricRecord keys (PREFIX is "" for the test
split, "val-" for the validation split):

    PREFIXdice-PHASE, PREFIXhd95-PHASE             means (for logs; not needed to pool)
    PREFIXdice-sum-PHASE, PREFIXdice-sumsq-PHASE   sum and sum of squares of the cases' Dice
    PREFIXhd95-sum-PHASE, PREFIXhd95-sumsq-PHASE   the same for HD95 (mm)
    PREFIXcases-PHASE                              number of cases

In report.json a summary is `{"dice", "dice_sd", "hd95", "hd95_sd", "cases"}` (means, sample sds,
null below two cases, and n).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from common.phases import PHASES

METRICS: tuple[str, ...] = ("dice", "hd95")
VALIDATION_PREFIX = "val-"

_KEY = re.compile(r"^(?P<metric>dice|hd95|cases)(?:-(?P<stat>sum|sumsq))?-(?P<phase>.+)$")


@dataclass(frozen=True)
class Moments:
    """Count, sum and sum of squares of one metric over some cases: enough to pool exactly."""

    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    @classmethod
    def of(cls, values: Iterable[float]) -> Moments:
        values = [float(v) for v in values]
        return cls(len(values), math.fsum(values), math.fsum(v * v for v in values))

    @classmethod
    def from_mean_sd(cls, mean: float, sd: float | None, n: int) -> Moments:
        """The inverse of (mean, sd, n): how a report's figures are pooled again."""
        spread = (n - 1) * sd * sd if sd is not None and n > 1 else 0.0
        return cls(n, mean * n, spread + n * mean * mean)

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.n + other.n, self.total + other.total, self.total_sq + other.total_sq)

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else math.nan

    @property
    def sd(self) -> float | None:
        """Sample standard deviation (n - 1); None below two cases."""
        if self.n < 2:
            return None
        return math.sqrt(max(0.0, (self.total_sq - self.total * self.total / self.n) / (self.n - 1)))


@dataclass(frozen=True)
class PhaseSummary:
    """Dice and HD95 (mm) of one phase over some cases (every case scores both)."""

    dice: Moments
    hd95: Moments

    @classmethod
    def of(cls, dice: Iterable[float], hd95: Iterable[float]) -> PhaseSummary:
        return cls(Moments.of(dice), Moments.of(hd95))

    @property
    def cases(self) -> int:
        return self.dice.n

    def __add__(self, other: PhaseSummary) -> PhaseSummary:
        return PhaseSummary(self.dice + other.dice, self.hd95 + other.hd95)

    def to_json(self) -> dict[str, float | int | None]:
        return {"dice": self.dice.mean, "dice_sd": self.dice.sd, "hd95": self.hd95.mean, "hd95_sd": self.hd95.sd,
                "cases": self.cases}

    @classmethod
    def from_json(cls, scores: Mapping[str, float | int | None]) -> PhaseSummary:
        n = int(scores["cases"])  # type: ignore[arg-type]
        return cls(*(Moments.from_mean_sd(float(scores[m]), scores.get(f"{m}_sd"), n) for m in METRICS))  # type: ignore[arg-type]


def to_metrics(per_phase: Mapping[str, PhaseSummary], prefix: str = "") -> dict[str, float]:
    """Flat MetricRecord entries of per-phase summaries (keys in the module docstring)."""
    out: dict[str, float] = {}
    for phase, summary in per_phase.items():
        for metric in METRICS:
            moments: Moments = getattr(summary, metric)
            out[f"{prefix}{metric}-{phase}"] = moments.mean
            out[f"{prefix}{metric}-sum-{phase}"] = moments.total
            out[f"{prefix}{metric}-sumsq-{phase}"] = moments.total_sq
        out[f"{prefix}cases-{phase}"] = float(summary.cases)
    return out


def from_metrics(metrics: Mapping[str, float], prefix: str = "") -> dict[str, PhaseSummary]:
    """Per-phase summaries from a site's MetricRecord entries with `prefix` (phases in report order)."""
    parts: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        match = _KEY.match(key[len(prefix):]) if key.startswith(prefix) else None
        if match and (match["stat"] or match["metric"] == "cases"):
            name = match["metric"] if match["metric"] == "cases" else f"{match['metric']}-{match['stat']}"
            parts.setdefault(match["phase"], {})[name] = float(value)
    summaries = {
        phase: PhaseSummary(*(Moments(int(p["cases"]), p[f"{m}-sum"], p[f"{m}-sumsq"]) for m in METRICS))
        for phase, p in parts.items()
        if {"cases", *(f"{m}-{s}" for m in METRICS for s in ("sum", "sumsq"))} <= set(p) and p["cases"] > 0
    }
    return in_phase_order(summaries)


def pool(groups: Iterable[Mapping[str, PhaseSummary]]) -> dict[str, PhaseSummary]:
    """Per phase, the summary of all cases of all groups together (mean weighted by cases)."""
    pooled: dict[str, PhaseSummary] = {}
    for group in groups:
        for phase, summary in group.items():
            pooled[phase] = pooled[phase] + summary if phase in pooled else summary
    return in_phase_order(pooled)


def in_phase_order(per_phase: Mapping[str, PhaseSummary]) -> dict[str, PhaseSummary]:
    order = {phase: i for i, phase in enumerate(PHASES)}
    return dict(sorted(per_phase.items(), key=lambda item: (order.get(item[0], len(order)), item[0])))


__all__ = ["METRICS", "VALIDATION_PREFIX", "Moments", "PhaseSummary", "to_metrics", "from_metrics", "pool",
           "in_phase_order"]
