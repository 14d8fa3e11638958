"""The README's main job: synthetic multi-vendor phantoms, a federated simulation, a cross-centre report.

    python -m simulations.demo --run-dir runs/demo

Centres A, B1 and B2 train (a few labeled GED4 volumes each, more unlabeled cases and phases) and
hold out a few test cases (scored per phase) and a validation case (selects checkpoints/best);
centre C never trains and is evaluated per phase every round. Writes RUN_DIR/report.json,
RUN_DIR/metrics.csv, RUN_DIR/plots/*.png and a qualitative PNG per site under RUN_DIR/sites/.

    python -m simulations.demo --data-root DIR --sites "S1:train,S2:train,S3:eval" --run-dir runs/mine

runs the same federation on a LiQA tree you already have (no phantoms); without --sites every
Vendor_<X> folder trains.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from common.run_config import default
from server.report import format_table
from simulations.pretrain import DEFAULT_OUT as PRETRAINED_WEIGHTS
from simulations.runner import SimulationSpec, run_simulation


@dataclass(frozen=True)
class DemoConfig:
    run_dir: Path
    centers: tuple[str, ...] = ("A", "B1", "B2", "C")
    heldout: tuple[str, ...] = ("C",)
    cases: int = 8
    labeled: int = 3
    seed: int = default("seed")
    heldout_cases: int = 8
    test_cases: int = 2  # per training centre, held out by splits.json: in-distribution test
    validation_cases: int = 1  # per training centre, held out by splits.json: model selection
    # The demo's budget (about 10 minutes on 2 cores), on purpose below pyproject's defaults (5 rounds
    # of 30 iterations, 2 unlabeled samples, test evaluation every round); DEMO_DEPARTURES names them.
    rounds: int = 3
    local_iterations: int = 22
    unlabeled_batch_size: int = 1
    evaluate_every: int = 3  # test cases after the last round; validation (selection) every round
    # The rest is the run config's own default (common/run_config.py).
    net_size: str = default("net-size")
    net_width: int = default("net-width")
    patch_size: str = default("patch-size")
    mode: str = default("mode")
    init_weights: Path | None = PRETRAINED_WEIGHTS  # the shipped pretraining, not pyproject's random start
    resume: bool = False
    gpus_per_node: float | None = None  # Ray GPUs per site actor (None: shared evenly when CUDA is there, else 0)
    data: Path | None = None  # the phantoms' folder (default RUN_DIR/data); runs of one experiment share it
    data_root: Path | None = None  # a LiQA tree the user has (no phantoms): its sites federate instead
    site_roles: str | None = None  # "SITE:ROLE,..." (None: the phantom centres, or every Vendor_ of data_root training)
    run_config_overrides: Mapping[str, object] = field(default_factory=dict)  # `--run-config`, over all of the above

    @property
    def data_dir(self) -> Path:
        if self.data_root is not None:
            return self.data_root
        return self.data if self.data is not None else self.run_dir / "data"

    @property
    def sites(self) -> str:
        if self.site_roles:
            return self.site_roles
        if self.data_root is not None:
            vendors = sorted(d.name.removeprefix("Vendor_") for d in self.data_root.glob("Vendor_*") if d.is_dir())
            return ",".join(f"{v}:train" for v in vendors)
        return ",".join(f"{c}:{'eval' if c in self.heldout else 'train'}" for c in self.centers)

    def run_config(self) -> dict[str, object]:
        return {
            "data-root": str(self.data_dir.resolve()),
            "run-dir": str(self.run_dir.resolve()),
            "sites": self.sites,
            "num-server-rounds": self.rounds,
            "local-iterations": self.local_iterations,
            "unlabeled-batch-size": self.unlabeled_batch_size,
            "evaluate-every": self.evaluate_every,
            "net-size": self.net_size,
            "net-width": self.net_width,
            "patch-size": self.patch_size,
            "mode": self.mode,
            "init-weights": str(self.init_weights.resolve()) if self.init_weights else "",
            "seed": self.seed,
            **self.run_config_overrides,
        }


def make_phantoms(config: DemoConfig) -> None:
    from simulations.phantoms import PhantomConfig, generate_liqa_tree

    # The marker names what was generated: other settings (e.g. a tree without splits) regenerate.
    settings = {key: str(getattr(config, key)) for key in (
        "centers", "heldout", "cases", "heldout_cases", "labeled", "test_cases", "validation_cases", "seed")}
    marker, expected = config.data_dir / ".complete", json.dumps(settings, sort_keys=True) + "\n"
    if marker.is_file() and marker.read_text() == expected:
        print(f"phantoms: reusing {config.data_dir}")
        return
    shutil.rmtree(config.data_dir, ignore_errors=True)
    started = time.perf_counter()
    training = tuple(c for c in config.centers if c not in config.heldout)
    # Held-out centres get their own number of cases: every phase of each is evaluated every round.
    for centers, cases in ((training, config.cases), (config.heldout, config.heldout_cases)):
        summary = generate_liqa_tree(
            config.data_dir,
            PhantomConfig(
                centers=centers, cases=cases, labeled=config.labeled, seed=config.seed, profile="demo",
                heldout=config.heldout, test_cases=config.test_cases, validation_cases=config.validation_cases,
            ),
        )
        print(summary)
    print(f"phantoms: {config.data_dir} in {time.perf_counter() - started:.1f}s")
    marker.write_text(expected)


def run_demo(config: DemoConfig) -> dict:
    if not config.resume:
        for stale in ("checkpoints", "server_state.json", "plans.json", "plans.sha256", "report.json", "momentum.safetensors",
                      "strategy_state.safetensors"):
            path = config.run_dir / stale
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    if config.data_root is None:
        make_phantoms(config)
    started = time.perf_counter()
    run_simulation(
        SimulationSpec(run_dir=config.run_dir, run_config=config.run_config(), num_supernodes=len(config.sites.split(",")),
                       gpus_per_node=config.gpus_per_node)
    )
    report = json.loads((config.run_dir / "report.json").read_text())
    final = report["final"]
    print(f"\nevaluation on test cases after round {final['round']}:")
    print(format_table(final["centers"], report["heldout_centers"], in_distribution=final.get("in_distribution")))
    print(f"\nfederation finished in {time.perf_counter() - started:.0f}s")
    print(f"report {config.run_dir / 'report.json'}; plots {config.run_dir / 'plots'}; model {report['final_model']}")
    return report


#: Run-config keys the demo derives from its own options: its phantoms, folder and site list.
DEMO_OWNED = {"data-root": "--data or --data-root", "run-dir": "--run-dir", "sites": "--sites"}
#: Run-config keys whose demo value departs from the run config's default, on purpose (see DemoConfig).
DEMO_DEPARTURES = ("num-server-rounds", "local-iterations", "unlabeled-batch-size", "evaluate-every", "init-weights")


def parse_run_config(text: str) -> dict[str, object]:
    """`--run-config` in Flower's syntax (`flwr run --run-config`) -> {key: value}, checked against
    the app's run-config keys and types; ValueError with one line per problem."""
    if not text.strip():
        return {}
    from flwr.common.config import parse_config_args

    from deploy.run_settings import app_run_config, key_problems
    from simulations.runner import REPO_ROOT

    try:
        values = dict(parse_config_args([text]))
    except Exception as error:  # Flower raises ValueError or tomli's error on a malformed pair
        raise ValueError(f"--run-config {text!r}: not Flower's KEY=VALUE syntax ({error})") from None
    problems = key_problems(values, app_run_config(REPO_ROOT))
    problems += [f"{key} is the demo's: set it with {flag}" for key, flag in DEMO_OWNED.items() if key in values]
    if problems:
        raise ValueError("--run-config: " + "; ".join(problems))
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--cases", type=int, default=DemoConfig.cases, help="cases per training centre")
    parser.add_argument("--heldout-cases", type=int, default=DemoConfig.heldout_cases, help="cases per held-out centre")
    parser.add_argument("--labeled", type=int, default=DemoConfig.labeled, help="labeled cases per training centre")
    parser.add_argument("--test-cases", type=int, default=DemoConfig.test_cases,
                        help="test cases per training centre (in-distribution test)")
    parser.add_argument("--validation-cases", type=int, default=DemoConfig.validation_cases,
                        help="validation cases per training centre (select checkpoints/best)")
    parser.add_argument("--rounds", type=int, default=DemoConfig.rounds)
    parser.add_argument("--local-iterations", type=int, default=DemoConfig.local_iterations)
    parser.add_argument("--mode", choices=("cps", "supervised"), default=DemoConfig.mode)
    parser.add_argument("--seed", type=int, default=DemoConfig.seed)
    parser.add_argument("--init", type=Path, default=PRETRAINED_WEIGHTS,
                        help="initial weights (default: the shipped pretraining, simulations/pretrained/stunet_T4_synth.safetensors; 'none' for random)")
    parser.add_argument("--resume", action="store_true", help="continue the run folder after its last complete round")
    parser.add_argument("--gpus-per-node", type=float, default=None, metavar="G",
                        help="GPUs Ray gives each site (default: 0 without CUDA, else 1 / sites per GPU)")
    parser.add_argument("--run-config", default="", metavar="'KEY=VALUE ...'",
                        help="run-config keys in Flower's syntax, over the demo's (e.g. \"strategy='krum' "
                             "adversarial-sites='B2:scale-100'\"); the keys of pyproject's [tool.flwr.app.config]")
    parser.add_argument("--data", type=Path, default=None,
                        help="the phantoms' folder (default RUN_DIR/data; generated there unless it holds these phantoms)")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="a LiQA tree you have (Vendor_<X>/<case>/...): it federates instead of the phantoms")
    parser.add_argument("--sites", default=None, metavar="SITE:ROLE,...",
                        help='with --data-root: e.g. "S1:train,S2:train,S3:eval" (default: every Vendor_<X> trains)')
    args = parser.parse_args(argv)
    if args.sites is not None and args.data_root is None:
        parser.error("--sites needs --data-root (the phantom centres are the demo's own)")
    if args.data_root is not None and not any(args.data_root.glob("Vendor_*")):
        parser.error(f"--data-root {args.data_root}: no Vendor_<X> folder (a LiQA tree)")
    try:
        overrides = parse_run_config(args.run_config)
    except ValueError as error:
        parser.error(str(error))
    config = DemoConfig(
        run_dir=args.run_dir.resolve(), cases=args.cases, heldout_cases=args.heldout_cases, labeled=args.labeled,
        test_cases=args.test_cases, validation_cases=args.validation_cases,
        rounds=args.rounds, local_iterations=args.local_iterations, mode=args.mode, seed=args.seed,
        init_weights=None if str(args.init) == "none" else args.init, resume=args.resume,
        gpus_per_node=args.gpus_per_node, data=args.data.resolve() if args.data else None,
        data_root=args.data_root.resolve() if args.data_root else None, site_roles=args.sites,
        run_config_overrides=overrides,
    )
    signal.signal(signal.SIGTERM, _interrupt)  # so that `finally` stops the SuperLink on `kill` too
    try:
        run_demo(config)
    except (RuntimeError, TimeoutError, FileNotFoundError) as error:
        print(f"demo failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo interrupted; the SuperLink and its processes were stopped", file=sys.stderr)
        return 130
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    raise SystemExit(main())
