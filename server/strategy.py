"""Aggregation of the CPS pair: FedAvg per branch, with FedAvgM server momentum as an option.

Keys are `"a.<param>"` and `"b.<param>"`, so averaging key by key averages branch A with the As
and B with the Bs. FedProx lives in the client's loss (proximal term); FedBN lives in the client
too (it keeps its own norm scale/shift), while the global model carries the average of the
sites' norms, which is what held-out centres, never seen in training, fall back to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from common.weights import update_problems
from server.messaging import Failure

WEIGHT_KEYS = {"labeled": "num-labeled", "samples": "num-samples"}


@dataclass(frozen=True)
class NodeUpdate:
    node_id: int
    site: str
    arrays: dict[str, np.ndarray]
    metrics: dict[str, float]


@dataclass
class PairAggregator:
    """FedAvg (weighted by labeled volumes, all samples, or uniform), optionally with momentum."""

    weighted_by: str = "labeled"
    server_momentum: float = 0.0
    velocity: dict[str, np.ndarray] = field(default_factory=dict)

    def weight(self, update: NodeUpdate) -> float:
        if self.weighted_by == "uniform":
            return 1.0
        return float(update.metrics.get(WEIGHT_KEYS[self.weighted_by], 0.0))

    def screen(
        self, updates: Sequence[NodeUpdate], reference: Mapping[str, np.ndarray]
    ) -> tuple[list[NodeUpdate], list[Failure]]:
        """Split updates into usable ones and rejections (NaN/Inf, missing keys, wrong shapes, no weight)."""
        accepted, rejected = [], []
        for update in updates:
            problems = update_problems(update.arrays, reference)
            if not problems and self.weight(update) <= 0:
                problems = [f"aggregation weight {self.weighted_by!r} is {self.weight(update)}"]
            if problems:
                rejected.append(Failure(update.node_id, update.site, "update rejected: " + "; ".join(problems[:3])))
            else:
                accepted.append(update)
        return accepted, rejected

    def aggregate(self, current: Mapping[str, np.ndarray], updates: Sequence[NodeUpdate]) -> dict[str, np.ndarray]:
        """The next global model from screened updates (the current one if there are none)."""
        if not updates:
            return dict(current)
        weights = np.array([self.weight(u) for u in updates], dtype=np.float64)
        weights /= weights.sum()
        average = {
            key: sum(w * u.arrays[key].astype(np.float64) for w, u in zip(weights, updates)).astype(np.float32)
            for key in current
        }
        if self.server_momentum <= 0:
            return average
        # FedAvgM (Hsu et al. 2019): the pseudo-gradient current - average drives a momentum buffer.
        new = {}
        for key, value in current.items():
            delta = value - average[key]
            velocity = self.server_momentum * self.velocity.get(key, np.zeros_like(delta)) + delta
            self.velocity[key] = velocity
            new[key] = (value - velocity).astype(np.float32)
        return new
