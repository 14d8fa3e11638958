"""How the server aggregates, what protects the updates, and how they travel: the run-config keys
behind `server/strategy.py` (Flower's strategies and DP wrappers), `common/quantization.py` (int8
updates) and `client/adversarial.py` (hostile sites, simulation only).

Torch-free and Flower-free, so the command line, the run settings check and both apps read it cheaply.
FedAvg weighting (`weighted-by`), FedProx's `proximal-mu` and FedAvgM's `server-momentum` stay in
`FederationConfig`, where they were before the strategies came from Flower.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum", "multikrum")
DP_MODES = ("none", "server-fixed", "client-fixed")
ADVERSARIAL_KINDS = ("sign-flip", "scale-100", "gaussian-noise", "stale")
DEFAULT_NOISE_STD = 1.0  # gaussian-noise without "=STD": noise as large as typical weights (garbage)


@dataclass(frozen=True)
class Adversary:
    """A simulated hostile or broken site: what it does to the update it sends."""

    site: str
    kind: str
    noise_std: float = DEFAULT_NOISE_STD  # gaussian-noise only


def parse_adversarial_sites(text: str) -> dict[str, Adversary]:
    """`"B2:sign-flip,A:gaussian-noise=0.1"` -> {site: Adversary}; ValueError naming the bad item."""
    adversaries: dict[str, Adversary] = {}
    for item in filter(None, (part.strip() for part in str(text).split(","))):
        site, _, spec = item.partition(":")
        kind, _, value = spec.strip().partition("=")
        if not site.strip() or kind not in ADVERSARIAL_KINDS:
            raise ValueError(f"adversarial-sites item {item!r}: write SITE:KIND, KIND one of {', '.join(ADVERSARIAL_KINDS)}")
        if value and kind != "gaussian-noise":
            raise ValueError(f"adversarial-sites item {item!r}: only gaussian-noise takes a value (=STD)")
        std = float(value) if value else DEFAULT_NOISE_STD
        if std < 0:
            raise ValueError(f"adversarial-sites item {item!r}: the noise std must be >= 0")
        adversaries[site.strip()] = Adversary(site.strip(), kind, std)
    return adversaries


@dataclass(frozen=True)
class AggregationConfig:
    strategy: str = "fedavg"
    server_learning_rate: float = 1.0  # FedAvgM
    fedopt_eta: float = 0.01  # FedAdam / FedYogi server step (per coordinate, Adam-like)
    fedopt_beta_1: float = 0.9
    fedopt_beta_2: float = 0.99
    fedopt_tau: float = 1e-3
    trimmed_beta: float = 0.2  # FedTrimmedAvg: fraction cut at each end (int(beta * sites) updates)
    num_malicious_nodes: int = 1  # Krum / MultiKrum
    num_nodes_to_select: int = 2  # MultiKrum
    dp: str = "none"
    dp_noise_multiplier: float = 1.0
    dp_clipping_norm: float = 1.0
    dp_delta: float = 1e-5
    int8_updates: bool = False  # sites send their update as int8 deltas (common/quantization.py)
    adversarial: dict[str, Adversary] = field(default_factory=dict)  # simulation only

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.dp not in DP_MODES:
            raise ValueError(f"dp must be one of {', '.join(DP_MODES)}, got {self.dp!r}")
        if self.dp != "none" and (self.dp_clipping_norm <= 0 or self.dp_noise_multiplier < 0):
            raise ValueError(f"dp {self.dp}: dp-clipping-norm must be > 0 and dp-noise-multiplier >= 0, "
                             f"got {self.dp_clipping_norm} and {self.dp_noise_multiplier}")
        if not 0 < self.dp_delta < 1:
            raise ValueError(f"dp-delta must be in (0, 1), got {self.dp_delta}")
        if not 0 <= self.trimmed_beta < 0.5:
            raise ValueError(f"trimmed-beta must be in [0, 0.5), got {self.trimmed_beta}")
        if self.num_malicious_nodes < 0 or self.num_nodes_to_select < 1:
            raise ValueError("num-malicious-nodes must be >= 0 and num-nodes-to-select >= 1")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object]) -> AggregationConfig:
        def get(key: str, default: object) -> object:
            return run_config.get(key, default)

        config = cls(
            strategy=str(get("strategy", "fedavg")).strip().lower(),
            server_learning_rate=float(get("server-learning-rate", 1.0)),  # type: ignore[arg-type]
            fedopt_eta=float(get("fedopt-eta", 0.01)),  # type: ignore[arg-type]
            fedopt_beta_1=float(get("fedopt-beta-1", 0.9)),  # type: ignore[arg-type]
            fedopt_beta_2=float(get("fedopt-beta-2", 0.99)),  # type: ignore[arg-type]
            fedopt_tau=float(get("fedopt-tau", 1e-3)),  # type: ignore[arg-type]
            trimmed_beta=float(get("trimmed-beta", 0.2)),  # type: ignore[arg-type]
            num_malicious_nodes=int(get("num-malicious-nodes", 1)),  # type: ignore[arg-type]
            num_nodes_to_select=int(get("num-nodes-to-select", 2)),  # type: ignore[arg-type]
            dp=str(get("dp", "none")).strip().lower(),
            dp_noise_multiplier=float(get("dp-noise-multiplier", 1.0)),  # type: ignore[arg-type]
            dp_clipping_norm=float(get("dp-clipping-norm", 1.0)),  # type: ignore[arg-type]
            dp_delta=float(get("dp-delta", 1e-5)),  # type: ignore[arg-type]
            int8_updates=bool(get("int8-updates", False)),
            adversarial=parse_adversarial_sites(str(get("adversarial-sites", ""))),
        )
        # Keys that meant a strategy before the strategies came from Flower: say what to write now.
        momentum, mu = float(get("server-momentum", 0.0)), float(get("proximal-mu", 0.0))  # type: ignore[arg-type]
        if momentum > 0 and config.strategy != "fedavgm":
            raise ValueError(f'server-momentum {momentum} needs strategy = "fedavgm" (strategy is "{config.strategy}")')
        if config.strategy == "fedprox" and mu <= 0:
            raise ValueError("strategy fedprox needs proximal-mu > 0 (with 0 it is FedAvg)")
        sites = {item.split(":")[0].strip() for item in str(get("sites", "")).split(",") if item.strip()}
        unknown = sorted(set(config.adversarial) - sites) if sites else []
        if unknown:
            raise ValueError(f"adversarial-sites names {', '.join(unknown)}, not among the run's sites ({', '.join(sorted(sites))})")
        return config


__all__ = ["ADVERSARIAL_KINDS", "DP_MODES", "STRATEGIES", "Adversary", "AggregationConfig", "parse_adversarial_sites"]
