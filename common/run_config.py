"""Every run-config key of the app, declared once: name, type, default, meaning.

pyproject's `[tool.flwr.app.config]` repeats these keys and defaults for Flower (tests/test_run_config.py
holds the two equal); the ServerApp, the ClientApp, `fedliver train` and the demo take their defaults
from here. `validate` refuses an unknown key (naming the nearest valid one) or a value of the wrong
type in one line, before a run does anything.

Flower hands run-config values over as bool, int, float or str (TOML); an int is a valid float.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass

Value = bool | int | float | str


@dataclass(frozen=True)
class Key:
    name: str
    type: type
    default: Value
    help: str


KEYS: tuple[Key, ...] = (
    # Data and outputs
    Key("data-root", str, "", "simulation: the folder holding every site's Vendor_<X> tree (absolute; the demo sets it)"),
    Key("run-dir", str, "", "the run's output folder, absolute (empty: runs/federation)"),
    Key("sites", str, "A:train,B1:train,B2:train,C:eval",
        "SITE:ROLE list: partition id -> site in simulation; the expected sites in deployment"),
    # Schedule and evaluation
    Key("num-server-rounds", int, 5, "federated rounds"),
    Key("local-iterations", int, 30, "training iterations at each site per round"),
    Key("evaluate-every", int, 1, "test evaluation every N rounds and after the last (validation: every round)"),
    Key("evaluate-train-sites", bool, True, "training sites also score their splits.json test split"),
    Key("evaluate-phases", str, "*", 'phases whose test cases are scored ("*": every phase with a mask)'),
    Key("evaluate-step", float, 0.5, "sliding-window step of evaluation, as a fraction of the patch"),
    # Network and device
    Key("net-size", str, "T", "STU-Net size: T (CPU width) or the published S/B/L/H"),
    Key("net-width", int, 4, "first-stage width of the STU-Net (0: the size's own)"),
    Key("device", str, "auto", 'sites\' torch device: "auto" (a CUDA GPU if any), "cpu", "cuda", "cuda:N"'),
    Key("patch-size", str, "32,64,64", "training patch z,y,x"),
    Key("target-spacing", str, "",
        'spacing z,y,x in mm the volumes are resampled to (3d_lowres-like); "": the planner\'s median spacing'),
    Key("batch-size", int, 2, "labeled samples per iteration"),
    Key("unlabeled-batch-size", int, 2, "unlabeled samples per CPS iteration"),
    Key("learning-rate", float, 0.01, "initial learning rate of the poly schedule"),
    Key("init-weights", str, "", 'initial weights of both branches: MODEL_DIR or checkpoint file, "auto"; "": random'),
    # CPS
    Key("mode", str, "cps", '"cps" or the supervised-only ablation "supervised"'),
    Key("cps-lambda-max", float, 1.0, "CPS weight after the ramp-up"),
    Key("cps-rampup-rounds", int, 2, "rounds over which the CPS weight ramps up"),
    Key("cps-confidence", float, 0.0, "pseudo-labels only where the teacher's softmax exceeds this (0: every voxel)"),
    Key("cps-strong-view", bool, False,
        "students see unlabeled samples through a label-free intensity view (bias field, GIN, random curve)"),
    Key("cps-gate", float, 0.0,
        "cross term waits until the last round's validation Dice (labeled phases) reaches this (0: from the start)"),
    Key("balance-phases", bool, True, "batches draw a phase uniformly, then one of its volumes"),
    Key("propagate-labels", bool, True,
        "labeled cases' other phases train under their labeled phase's mask (scanner coordinates)"),
    Key("labeled-phases", str, "auto",
        'phases whose masks label, validate, gate and propagate: "auto" (every masked phase at a site) or e.g. "T2,GED4"'),
    Key("mirror-axes", str, "",
        'axes (z,y,x of the patch) nnU-Net\'s augmentation mirrors; "": none (arrays are RAS: x is left-right)'),
    Key("agreement-volumes", int, 1, "unlabeled volumes per phase for the branch-agreement signal (0: skip)"),
    # Label transfer: probability per labeled sample
    Key("location-scale", float, 0.0, "per-class random intensity curves (SLAug)"),
    Key("non-contrast", float, 0.0, "simulated non-contrast: liver darkened inside its mask"),
    Key("random-conv", float, 0.0, "random shallow convolutions mixed with the image (GIN)"),
    Key("transpose", float, 0.0, "in-plane axis swap (also on unlabeled samples)"),
    Key("bias-field", float, 0.0, "smooth random multiplicative bias field (also on unlabeled samples)"),
    # Aggregation
    Key("weighted-by", str, "labeled", 'FedAvg weights: "labeled", "samples" or "uniform"'),
    Key("proximal-mu", float, 0.0, "FedProx mu (strategy fedprox)"),
    Key("server-momentum", float, 0.0, "FedAvgM momentum (strategy fedavgm)"),
    Key("local-norm", bool, False, "FedBN-style: sites keep their own norm layers"),
    Key("local-momentum", bool, False, "sites keep their SGD momentum between rounds"),
    Key("fp16-transport", bool, False, "the model and updates travel as float16"),
    Key("strategy", str, "fedavg",
        "Flower strategy: fedavg, fedavgm, fedprox, fedadam, fedyogi, fedmedian, fedtrimmedavg, krum, multikrum"),
    Key("server-learning-rate", float, 1.0, "FedAvgM server learning rate"),
    Key("fedopt-eta", float, 0.01, "FedAdam/FedYogi server step (per coordinate)"),
    Key("fedopt-beta-1", float, 0.9, "FedAdam/FedYogi first-moment decay"),
    Key("fedopt-beta-2", float, 0.99, "FedAdam/FedYogi second-moment decay"),
    Key("fedopt-tau", float, 0.001, "FedAdam/FedYogi adaptivity"),
    Key("trimmed-beta", float, 0.2, "FedTrimmedAvg: int(beta x sites) updates cut at each end"),
    Key("num-malicious-nodes", int, 1, "Krum/MultiKrum: hostile sites tolerated"),
    Key("num-nodes-to-select", int, 2, "MultiKrum: updates averaged"),
    # Central differential privacy
    Key("dp", str, "none", '"none", "server-fixed" or "client-fixed" clipping, with Gaussian noise'),
    Key("dp-noise-multiplier", float, 1.0, "noise std = multiplier x clipping norm / sites"),
    Key("dp-clipping-norm", float, 1.0, "L2 norm each update is clipped to"),
    Key("dp-delta", float, 1e-5, "delta at which report.json gives epsilon"),
    Key("int8-updates", bool, False, "sites send int8 deltas against the model they received"),
    Key("adversarial-sites", str, "", 'simulation only: "SITE:KIND,..." sites that corrupt their update'),
    # Postprocessing
    Key("postprocessing", str, "largest-component", 'on predictions: "largest-component" or "none"'),
    Key("postprocessing-phases", str, "*", 'phases it applies to ("*": all)'),
    # Robustness
    Key("min-train-nodes", int, 1, "fewest training sites to go on with"),
    Key("round-timeout", float, 3600.0, "seconds to wait for a round's replies"),
    Key("node-wait", float, 300.0, "seconds to wait for the sites to connect"),
    Key("seed", int, 0, "seed of the run (initial nets, sites' sampling)"),
)

BY_NAME: dict[str, Key] = {key.name: key for key in KEYS}


def defaults() -> dict[str, Value]:
    """{key: default} for every key, in declaration order."""
    return {key.name: key.default for key in KEYS}


def default(name: str) -> Value:
    return BY_NAME[name].default


def _type_name(value: object) -> str:
    return type(value).__name__


def _check(key: Key, value: object) -> tuple[Value, str | None]:
    """(the value as the key's type, or a problem)."""
    if key.type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value), None
    if type(value) is key.type:  # bool is no int here, nor an int a bool
        return value, None  # type: ignore[return-value]
    return value, f"run-config {key.name!r}: expected {key.type.__name__}, got {_type_name(value)} {value!r}"  # type: ignore[return-value]


# Words a coordinator may try for a setting whose key says it differently.
_ALIASES = {"rounds": "num-server-rounds", "lr": "learning-rate", "iterations": "local-iterations",
            "aggregation": "strategy", "weighting": "weighted-by", "init": "init-weights",
            "pretrained": "init-weights", "roles": "sites"}


def nearest_key(key: str, valid: list[str] | None = None) -> str | None:
    """The valid key (of `valid`, else of the schema) the user most likely meant."""
    valid = list(BY_NAME) if valid is None else valid
    key = key.lower().replace("_", "-")
    for word, target in _ALIASES.items():
        if target in valid and (key == word or key.endswith("-" + word)) and key not in valid:
            return target
    # `rounds` -> `num-server-rounds`: a valid key containing the whole word comes first
    containing = [v for v in valid if len(key) >= 4 and key in v]
    if containing:
        return min(containing, key=len)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return close[0] if close else None


def parse_mirror_axes(text: str) -> tuple[int, ...]:
    """`mirror-axes` ("0,1,2", "0,1", ""): the patch axes nnU-Net's augmentation may mirror."""
    try:
        axes = tuple(int(a) for a in str(text).replace(" ", "").split(",") if a != "")
    except ValueError:
        axes = (-1,)
    if any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
        raise ValueError(f"mirror-axes {text!r}: expected distinct axes among 0, 1, 2 (z, y, x), e.g. \"0,1\" or \"\"")
    return axes


def problems(run_config: Mapping[str, object]) -> list[str]:
    """One line per unknown key (with the nearest valid one) or value of the wrong type."""
    found = []
    for name, value in run_config.items():
        if name not in BY_NAME:
            near = nearest_key(name)
            found.append(f"unknown run-config key {name!r}" + (f" (did you mean {near!r}?)" if near else ""))
        elif (problem := _check(BY_NAME[name], value)[1]) is not None:
            found.append(problem)
    return found


def validate(run_config: Mapping[str, object]) -> dict[str, Value]:
    """Every key: the given value (an int given for a float as float), else the default.
    ValueError, one line, naming each unknown key or wrongly typed value."""
    found = problems(run_config)
    if found:
        raise ValueError("; ".join(found))
    return {**defaults(), **{name: _check(BY_NAME[name], value)[0] for name, value in run_config.items()}}


__all__ = ["BY_NAME", "KEYS", "Key", "Value", "default", "defaults", "nearest_key", "parse_mirror_axes", "problems",
           "validate"]
