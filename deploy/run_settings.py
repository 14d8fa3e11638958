"""The coordinator's run settings: one TOML file (`deploy/run.toml` is the example), checked
before `flwr run` gets it.

The file is Flower's own `--run-config FILE.toml` format (flat `key = value`, the keys of
`[tool.flwr.app.config]` in the app's pyproject.toml), so `flwr run . fedliver --run-config FILE`
reads it unchanged; `fedliver submit` checks it first and refuses, one line per problem:

- an unknown key, naming the nearest valid one (`num-rounds` -> `num-server-rounds`);
- a value of the wrong type (pyproject's default gives the type; an int is a valid float);
- `sites` that are not `SITE:ROLE` pairs with role train or eval, repeat a site, have no training
  site, or fewer training sites than `min-train-nodes`;
- a missing `sites`, `run-dir` or `init-weights` (pyproject's defaults are the simulation's);
- a relative or empty `run-dir` (the ServerApp runs in the SuperLink's state folder);
- an `init-weights` file that does not exist on this host, or `auto` when the shipped
  pretraining is not installed here;
- anything the ServerApp itself would refuse (`weighted-by`, `mode`, `patch-size`, ...).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from common.federation_config import ROLES, FederationConfig, resolve_init_weights
from common.run_config import nearest_key

Value = str | int | float | bool


# Keys a settings file must set: pyproject's defaults are the simulation's (four demo sites,
# random initial weights, a relative run folder), not a deployment's.
REQUIRED = {
    "sites": 'list the hospitals of this run as SITE:ROLE, e.g. "A:train,B1:train,C:eval"',
    "run-dir": "give an absolute folder on the SuperLink host for the run's outputs",
    "init-weights": 'write "auto" (the shipped pretraining), a checkpoint path, or "none" (random)',
}


class RunSettingsError(ValueError):
    """The settings file cannot be read at all; one line naming the file."""


@dataclass(frozen=True)
class RunSettings:
    """A checked settings file: its values, pyproject's defaults under them, and the problems."""

    path: Path
    values: Mapping[str, Value]
    defaults: Mapping[str, Value]
    problems: tuple[str, ...] = ()
    init_note: str = ""
    sites: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def merged(self) -> dict[str, Value]:
        return {**self.defaults, **self.values}

    def summary(self) -> str:
        """What the run will do, in a few lines for the coordinator."""
        m = self.merged
        sites = ", ".join(f"{s} ({r})" for s, r in self.sites) or "(none)"
        return "\n".join([
            f"sites: {sites}",
            f"rounds: {m.get('num-server-rounds')} x {m.get('local-iterations')} local iterations, "
            f"mode {m.get('mode')}, STU-Net {m.get('net-size')} width {m.get('net-width')}",
            f"aggregation: {m.get('strategy', 'fedavg')} weighted by {m.get('weighted-by')}, FedProx mu {m.get('proximal-mu')}, "
            f"server momentum {m.get('server-momentum')}, local norms {m.get('local-norm')}",
            f"initial weights: {self.init_note}",
            f"float16 transport: {m.get('fp16-transport')}; run folder: {m.get('run-dir')}",
            f"waits up to {m.get('node-wait')} s for the sites, {m.get('round-timeout')} s per round",
        ])


def app_run_config(app_dir: Path) -> dict[str, Value]:
    """`[tool.flwr.app.config]` of the app's pyproject.toml: every valid key and its default."""
    path = Path(app_dir) / "pyproject.toml"
    try:
        data = tomllib.loads(path.read_text())
        return dict(data["tool"]["flwr"]["app"]["config"])
    except (OSError, tomllib.TOMLDecodeError, KeyError) as err:
        raise RunSettingsError(f"{path}: no [tool.flwr.app.config] ({err})") from err


def _type_problem(key: str, value: object, default: Value) -> str | None:
    def name(v: object) -> str:
        return {bool: "true/false", int: "an integer", float: "a number", str: "a quoted string"}.get(type(v), type(v).__name__)

    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
    else:
        ok = type(value) is type(default)
    return None if ok else f"{key} = {value!r}: expected {name(default)} (as the default {default!r})"


def _site_problems(text: str, min_train: int) -> tuple[list[str], list[tuple[str, str]]]:
    problems, sites = [], []
    for item in filter(None, (p.strip() for p in str(text).split(","))):
        site, sep, role = (s.strip() for s in item.partition(":"))
        if not sep or role not in ROLES:
            problems.append(f"sites: {item!r}: write SITE:ROLE with ROLE one of {', '.join(ROLES)} (e.g. \"A:train\")")
        elif site in dict(sites):
            problems.append(f"sites: site {site} is listed twice")
        else:
            sites.append((site, role))
    training = sum(role == "train" for _, role in sites)
    if sites and not training:
        problems.append("sites: no site has role train (held-out sites only evaluate)")
    elif not sites and not problems:
        problems.append("sites: empty; list every hospital as SITE:ROLE, e.g. \"A:train,B1:train,C:eval\"")
    if training and training < min_train:
        problems.append(f"sites: {training} training sites, but min-train-nodes = {min_train}")
    return problems, sites


def key_problems(values: Mapping[str, object], defaults: Mapping[str, Value]) -> list[str]:
    """One line per run-config key that the app does not know (naming the nearest valid one) or
    whose value has the wrong type (the default's); tables are not run settings."""
    valid, problems = sorted(defaults), []
    for key, value in values.items():
        if isinstance(value, dict):
            problems.append(f"[{key}]: tables are not run settings; write flat `key = value` lines")
        elif key not in defaults:
            near = nearest_key(key, valid)
            problems.append(f"unknown key {key!r}" + (f" (did you mean {near!r}?)" if near else ""))
        elif (problem := _type_problem(key, value, defaults[key])) is not None:
            problems.append(problem)
    return problems


def check_run_settings(path: Path, app_dir: Path) -> RunSettings:
    """Read and check `path` against the app's run-config keys; see the module docstring."""
    path = Path(path).expanduser()
    try:
        values = tomllib.loads(path.read_text())
    except OSError as err:
        raise RunSettingsError(f"{path}: cannot read ({err.strerror or err})") from err
    except tomllib.TOMLDecodeError as err:
        raise RunSettingsError(f"{path}: not valid TOML ({err})") from err
    defaults = app_run_config(app_dir)
    problems = [f"{path}: {p}" for p in key_problems(values, defaults)]
    for key, why in REQUIRED.items():
        if key not in values:
            problems.append(f"{path}: {key} not set: {why}")
    flat = {k: v for k, v in values.items() if not isinstance(v, dict)}
    merged = {**defaults, **{k: v for k, v in flat.items() if k in defaults}}
    site_problems, sites = _site_problems(str(merged.get("sites", "")), int(merged.get("min-train-nodes", 1) or 1))
    problems += [f"{path}: {p}" for p in site_problems]
    run_dir = str(merged.get("run-dir", ""))
    if not run_dir or not Path(run_dir).expanduser().is_absolute():
        problems.append(f"{path}: run-dir {run_dir!r}: give an absolute folder (the ServerApp runs in the "
                        "SuperLink's state folder, not here)")
    init_note = ""
    if not problems:
        try:
            config = FederationConfig.from_run_config(merged)
            _, init_note = resolve_init_weights(config.init_weights, config.net_size, config.base_width)
        except (ValueError, TypeError) as err:
            problems.append(f"{path}: {err}")
    return RunSettings(path, flat, defaults, tuple(problems), init_note, tuple(sites))
