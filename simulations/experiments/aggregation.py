"""What robust aggregation and central DP cost and buy, measured on the federated demo.

    python -m simulations.experiments robust-aggregation --out runs/robust
    python -m simulations.experiments dp-cost --out runs/dp

Every arm is `python -m simulations.demo` (a real Flower simulation: A, B1 and B2 train, C is held
out) on one shared phantom set, at one budget and one seed, differing only in its `--run-config`:

- robust-aggregation: one adversarial training site (`adversarial-sites`, each kind of
  client/adversarial.py) under each strategy, and every strategy without an adversary;
- dp-cost: Flower's server-side fixed clipping at each noise multiplier, with the epsilon Flower's
  RDP accountant gives (client-level, delta from `--delta`) for the whole run, and FedAvg without DP.

Per arm: held-out C and in-distribution test Dice per phase (mean, sd, n) from the demo's
report.json, after the last round. Writes OUT/<experiment>.csv and OUT/<experiment>.md; finished
arms are kept (OUT/arms/<name>/report.json), so a rerun only runs what is missing, and the two
experiments share their clean FedAvg arm when given the same --out. Each arm's log is its folder's
demo.log.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.aggregation_config import ADVERSARIAL_KINDS

REPO = Path(__file__).resolve().parents[2]
NON_CONTRAST = ("T1", "T2", "DWI_800")
PHASES = ("GED4",) + NON_CONTRAST
# FedTrimmedAvg last: with three training sites and beta >= 1/3 it keeps the middle value of each
# coordinate, which is FedMedian's result exactly (tests/test_strategy.py), so its arms add nothing
# but time; they run after the others. Flower's default beta 0.2 would cut nothing (int(0.2 x 3) = 0).
# Krum with one malicious node scores each update by its distance to its max(1, 3 - 1 - 2) = 1
# nearest neighbour: the two honest sites' updates are each other's nearest.
ROBUST_STRATEGIES = ("fedavg", "fedmedian", "krum", "fedtrimmedavg")
STRATEGY_KEYS: Mapping[str, Mapping[str, object]] = {"fedtrimmedavg": {"trimmed-beta": 0.34},
                                                     "krum": {"num-malicious-nodes": 1}}
ADVERSARY_SITE = "B2"
CLEAN_FEDAVG = "fedavg_none"
NODE_WAIT_S = 1800


@dataclass(frozen=True)
class Budget:
    """The demo's options every arm shares (the demo's own defaults where not set)."""

    rounds: int = 2
    local_iterations: int = 8
    seed: int = 0

    def demo_args(self) -> list[str]:
        return ["--rounds", str(self.rounds), "--local-iterations", str(self.local_iterations), "--seed", str(self.seed)]


@dataclass(frozen=True)
class Arm:
    name: str
    run_config: Mapping[str, object] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)  # the table's first columns

    def run_config_arg(self) -> str:
        return " ".join(f"{key}={_toml(value)}" for key, value in self.run_config.items())


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f"'{value}'" if isinstance(value, str) else repr(value)


def robust_arms(strategies: Sequence[str], kinds: Sequence[str], site: str = ADVERSARY_SITE) -> list[Arm]:
    arms = []
    for strategy in strategies:
        for kind in ("none", *kinds):
            config = {"strategy": strategy, **STRATEGY_KEYS.get(strategy, {})}
            if kind != "none":
                config["adversarial-sites"] = f"{site}:{kind}"
            arms.append(Arm(f"{strategy}_{kind}", config, {"strategy": strategy,
                                                           "adversary": "none" if kind == "none" else f"{site}:{kind}"}))
    return arms


def dp_arms(noise_multipliers: Sequence[float], clipping_norm: float, delta: float) -> list[Arm]:
    # Without DP: robust-aggregation's clean FedAvg arm (the same run when both share --out; every
    # demo site has the same labeled volumes, so weighting by them is the uniform weighting DP uses).
    arms = [Arm(CLEAN_FEDAVG, {"strategy": "fedavg"}, {"dp": "none", "noise multiplier": "-", "clipping norm": "-"})]
    for noise in noise_multipliers:
        # Flower's accountant assumes equal weights (noise calibrated to clipping-norm / sites).
        config = {"dp": "server-fixed", "dp-noise-multiplier": float(noise), "dp-clipping-norm": float(clipping_norm),
                  "dp-delta": float(delta), "weighted-by": "uniform"}
        arms.append(Arm(f"dp_noise{noise:g}", config, {"dp": "server-fixed", "noise multiplier": f"{noise:g}",
                                                      "clipping norm": f"{clipping_norm:g}"}))
    return arms


def run_arm(arm: Arm, out: Path, data: Path, budget: Budget) -> dict:
    """The arm's report.json, running the demo for it unless a finished one is there."""
    folder = out / "arms" / arm.name
    report_path, done = folder / "report.json", folder / "arm.json"
    if done.is_file() and report_path.is_file():
        return json.loads(report_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    # Neither changes what trains: only the reported phases are scored (evaluation never feeds back,
    # the CPS gate is off), and a loaded machine can take minutes to validate a site before it answers.
    command = [sys.executable, "-m", "simulations.demo", "--run-dir", str(folder), "--data", str(data),
               *budget.demo_args(), "--run-config",
               f"{arm.run_config_arg()} evaluate-phases='{','.join(PHASES)}' node-wait={NODE_WAIT_S}"]
    started = time.perf_counter()
    with (folder / "demo.log").open("w") as log:
        code = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - started
    if code != 0 or not report_path.is_file():
        raise RuntimeError(f"arm {arm.name} failed (exit {code}); see {folder / 'demo.log'}")
    done.write_text(json.dumps({"command": command, "seconds": round(seconds, 1)}, indent=1) + "\n")
    return json.loads(report_path.read_text())


def arm_seconds(out: Path, arm: Arm) -> float:
    return float(json.loads((out / "arms" / arm.name / "arm.json").read_text())["seconds"])


def non_contrast_mean(per_phase: Mapping[str, Mapping]) -> float | None:
    values = [per_phase[p]["dice"] for p in NON_CONTRAST if per_phase.get(p, {}).get("dice") is not None]
    return sum(values) / len(values) if len(values) == len(NON_CONTRAST) else None


def _cell(scores: Mapping | None) -> str:
    if not scores or scores.get("dice") is None:
        return "-"
    sd = scores.get("dice_sd")
    return f"{scores['dice']:.3f}" + (f" ± {sd:.3f}" if sd is not None else "") + f" ({scores.get('cases', '?')})"


def epsilon(report: Mapping) -> str:
    privacy = report.get("aggregation", {}).get("privacy") or {}
    if privacy.get("dp") in (None, "none"):
        return "-"
    if privacy.get("epsilon") is None:
        return "not accounted"
    return f"{privacy['epsilon']:.3g} (δ={privacy['delta']:g})"


def rows(arms: Sequence[Arm], reports: Mapping[str, dict], out: Path, heldout: str = "C") -> list[dict]:
    table = []
    for arm in arms:
        final = reports[arm.name]["final"]
        c, ind = final["centers"].get(heldout, {}), final.get("in_distribution", {})
        table.append({**arm.labels, "arm": arm.name, "epsilon": epsilon(reports[arm.name]),
                      **{f"C {p}": c.get(p) for p in PHASES}, "C non-contrast mean": non_contrast_mean(c),
                      **{f"in-dist {p}": ind.get(p) for p in PHASES}, "in-dist non-contrast mean": non_contrast_mean(ind),
                      "seconds": arm_seconds(out, arm)})
    return table


def write_outputs(table: list[dict], out: Path, name: str, command: str, budget: Budget,
                  label_columns: Sequence[str]) -> Path:
    """OUT/NAME.csv (one row per arm, group and phase) and OUT/NAME.md."""
    with (out / f"{name}.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*label_columns, "arm", "group", "phase", "dice", "dice_sd", "n", "seconds"])
        for row in table:
            for group in ("C", "in-dist"):
                for phase in PHASES:
                    s = row[f"{group} {phase}"] or {}
                    writer.writerow([*(row[c] for c in label_columns), row["arm"], group, phase, s.get("dice"),
                                     s.get("dice_sd"), s.get("cases"), row["seconds"]])
    header = [*label_columns, *(f"C {p}" for p in PHASES), "C T1/T2/DWI mean", "in-dist GED4",
              "in-dist T1/T2/DWI mean", "wall s"]
    lines = [f"`{command}`", "",
             f"Budget: {budget.rounds} rounds x {budget.local_iterations} local iterations, seed {budget.seed}, the "
             "demo's phantoms and defaults otherwise. Dice mean ± sd (n cases) after the last round; C is held "
             "out, in-dist is the training sites' test split.", "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in table:
        mean = row["C non-contrast mean"]
        ind_mean = row["in-dist non-contrast mean"]
        cells = [*(str(row[c]) for c in label_columns), *(_cell(row[f"C {p}"]) for p in PHASES),
                 "-" if mean is None else f"{mean:.3f}", _cell(row["in-dist GED4"]),
                 "-" if ind_mean is None else f"{ind_mean:.3f}", f"{row['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    path = out / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(arms: list[Arm], out: Path, budget: Budget, name: str, argv: Sequence[str], label_columns: Sequence[str]) -> int:
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"  # the demo's phantoms, generated by the first arm, shared by all
    reports: dict[str, dict] = {}
    for index, arm in enumerate(arms, 1):
        started = time.perf_counter()
        print(f"[{index}/{len(arms)}] {arm.name}: --run-config \"{arm.run_config_arg()}\"", flush=True)
        try:
            reports[arm.name] = run_arm(arm, out, data, budget)
        except RuntimeError as error:
            print(f"  {error}", file=sys.stderr, flush=True)
            continue
        c = reports[arm.name]["final"]["centers"].get("C", {})
        mean = non_contrast_mean(c)
        print(f"  C GED4 {_cell(c.get('GED4'))}, T1/T2/DWI mean {'-' if mean is None else f'{mean:.3f}'} "
              f"({time.perf_counter() - started:.0f}s)", flush=True)
    finished = [arm for arm in arms if arm.name in reports]
    command = " ".join(["python -m simulations.experiments", name, *argv])
    path = write_outputs(rows(finished, reports, out), out, name, command, budget, label_columns)
    print(path.read_text())
    return 0 if len(finished) == len(arms) else 1


def _budget_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=Budget.rounds)
    parser.add_argument("--local-iterations", type=int, default=Budget.local_iterations)
    parser.add_argument("--seed", type=int, default=Budget.seed)


def robust_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.experiments robust-aggregation",
                                     description=__doc__.splitlines()[0])
    _budget_arguments(parser)
    parser.add_argument("--strategies", default=",".join(ROBUST_STRATEGIES))
    parser.add_argument("--kinds", default=",".join(ADVERSARIAL_KINDS), help="adversary kinds (one run each)")
    parser.add_argument("--clean", default="fedavg",
                        help="strategies also run without an adversary ('all': every one; '' none)")
    args = parser.parse_args(argv)
    strategies = [s for s in args.strategies.split(",") if s]
    clean = strategies if args.clean == "all" else [s for s in args.clean.split(",") if s]
    kinds = [k for k in args.kinds.split(",") if k]
    arms = [a for a in robust_arms(strategies, kinds)
            if a.labels["adversary"] != "none" or a.labels["strategy"] in clean]
    budget = Budget(args.rounds, args.local_iterations, args.seed)
    return _run(arms, args.out, budget, "robust-aggregation", argv or [], ("strategy", "adversary"))


def dp_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.experiments dp-cost",
                                     description=__doc__.splitlines()[0])
    _budget_arguments(parser)
    parser.add_argument("--noise", default="0,0.1,0.3,1.0", help="noise multipliers (one run each)")
    parser.add_argument("--clipping-norm", type=float, default=1.0,
                        help="dp-clipping-norm (report.json's update_norms show what the sites send)")
    parser.add_argument("--delta", type=float, default=1e-5)
    args = parser.parse_args(argv)
    arms = dp_arms([float(n) for n in args.noise.split(",") if n], args.clipping_norm, args.delta)
    budget = Budget(args.rounds, args.local_iterations, args.seed)
    return _run(arms, args.out, budget, "dp-cost", argv or [], ("dp", "noise multiplier", "clipping norm", "epsilon"))
