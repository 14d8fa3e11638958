"""The method on real scans: a federation of real volumes with a few labels per site.

    python -m simulations.experiments real-federation --data ../shared/data/chaos_t2spir \
        --sites 3 --labeled-per-site 1 --test-per-site 1 --seed 0 --out runs/real-federation [--holdout DIR2]

DIR is any dataset `fedliver check` reads (its cases' masks name the liver by dataset.json's label
names). Its cases are dealt into sites, a LiQA tree `OUT/data/Vendor_S1..`: per site
`--test-per-site` test cases and `--labeled-per-site` labeled training cases, then one labeled
validation case when at least one case is left for the unlabeled pool, and the rest unlabeled:
their masks are neither written nor read (`OUT/data-full` keeps them, for `pooled-full` only).
Every arm trains at one budget in site-iterations and one seed, from the shipped start:

- `local-cps`: each site alone (site-iterations / sites each); scores are each case's mean over the sites' models;
- `federated-cps`, `federated-supervised`: FedAvg through the real Flower simulation;
- `pooled-cps`, `pooled-supervised`: `fedliver train` on every site's cases;
- `pooled-full`: every training case labeled, supervised: the upper bound.

Each arm's final model is scored per case on the sites' test cases (group `in-distribution`), on
every case of `--holdout` (group `holdout`) and on the validation cases (group `validation`, the
only one that may choose anything: `--spacings` picks the target spacing on it). Writes
OUT/results.csv (arm, group, phase, seed, n, dice_mean, dice_sd, hd95_mean), OUT/table.md and
OUT/real_federation.png. Finished arms are kept (OUT/arms/<arm>_s<seed>/scores.json).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from client.local_training import LocalTrainingConfig, train_locally
from common.federation_config import parse_spacing
from simulations.experiments.cross_phase import in_fresh_process
from simulations.experiments.real_mri import score_model

ARMS = ("local-cps", "federated-cps", "federated-supervised", "pooled-cps", "pooled-supervised", "pooled-full")
GROUPS = ("holdout", "in-distribution", "validation")
#: The experiment's target spacing (z, y, x mm), chosen with `--spacings` on the validation cases
#: (docs/results/real_federation.md): CHAOS's own slice spacing, 2.5 mm in-plane, so that the CPU patch
#: (32 x 64 x 64) covers 16 cm of the abdomen.
DEFAULT_SPACING = "7.7,2.5,2.5"
ROLES = ("test", "labeled", "validation", "unlabeled")


# --------------------------------------------------------------------------------------------- split
def plan_split(case_ids: Sequence[str], sites: int, labeled_per_site: int, test_per_site: int,
               seed: int) -> dict[str, dict[str, list[str]]]:
    """{site: {role: [case ids]}}: the cases shuffled by `seed` and dealt to S1..Sn in turn; per site
    the first go to test, the next are labeled, then one validation case if one is left after it
    for the unlabeled pool, the rest unlabeled. ValueError when a site gets too few cases."""
    if sites < 1 or labeled_per_site < 1 or test_per_site < 0:
        raise ValueError("--sites and --labeled-per-site must be >= 1, --test-per-site >= 0")
    ids = sorted(case_ids)
    random.Random(seed).shuffle(ids)
    plan = {}
    for k in range(sites):
        mine = ids[k::sites]
        if len(mine) < test_per_site + labeled_per_site:
            raise ValueError(f"{len(ids)} labeled cases make {len(mine)} for site S{k + 1}: fewer than "
                             f"--test-per-site {test_per_site} + --labeled-per-site {labeled_per_site}")
        test, labeled, rest = mine[:test_per_site], mine[test_per_site:test_per_site + labeled_per_site], \
            mine[test_per_site + labeled_per_site:]
        validation, unlabeled = (rest[:1], rest[1:]) if len(rest) >= 2 else ([], rest)
        plan[f"S{k + 1}"] = {"test": test, "labeled": labeled, "validation": validation, "unlabeled": unlabeled}
    return plan


def _write_mask(label_file: Path, liver: tuple[int, ...], target: Path) -> None:
    """The case's liver (any of `liver`'s values) as a binary uint8 mask on the label file's grid."""
    import numpy as np
    import SimpleITK as sitk

    labels = sitk.ReadImage(str(label_file))
    mask = sitk.GetImageFromArray(np.isin(sitk.GetArrayFromImage(labels), liver).astype(np.uint8))
    mask.CopyInformation(labels)
    sitk.WriteImage(mask, str(target), useCompression=True)


def write_site_tree(source: Path, plan: dict[str, dict[str, list[str]]], out: Path, *, keep_all_masks: bool = False) -> Path:
    """The LiQA tree of `plan` under `out`: image links to `source`'s files, binary liver masks for
    test, labeled and validation cases (and unlabeled ones only with `keep_all_masks`), a splits.json
    per site, and `out/split.json` (the plan). A tree already written for the same plan is kept."""
    from common.discovery import index_dataset
    from common.splits import write_splits

    record = json.dumps({"source": str(source.resolve()), "plan": plan, "keep_all_masks": keep_all_masks},
                        indent=1, sort_keys=True) + "\n"
    marker = out / "split.json"
    if marker.is_file() and marker.read_text(encoding="utf-8") == record:
        return out
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    cases = {c.case_id: c for c in index_dataset(source, validate=False).cases}
    masked_roles = ROLES if keep_all_masks else ("test", "labeled", "validation")
    for site, roles in plan.items():
        vendor = out / f"Vendor_{site}"
        for role, ids in roles.items():
            for case_id in ids:
                case, folder = cases[case_id], vendor / case_id
                folder.mkdir(parents=True)
                for phase, image in case.images.items():
                    (folder / f"{phase}.nii.gz").symlink_to(Path(image).resolve())
                if role in masked_roles:
                    for phase, label in case.masks.items():
                        _write_mask(Path(label), case.foreground_labels, folder / f"mask_{phase}.nii.gz")
        write_splits(vendor, validation=roles["validation"], test=roles["test"])
    marker.write_text(record, encoding="utf-8")
    return out


def linked_set(data: Path, plan: dict[str, dict[str, list[str]]], role: str, folder: Path) -> Path:
    """A LiQA tree of links to the sites' `role` cases (what predict and evaluate read)."""
    for site, roles in plan.items():
        for case_id in roles[role]:
            link = folder / f"Vendor_{site}" / case_id
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to((data / f"Vendor_{site}" / case_id).resolve(), target_is_directory=True)
    return folder


# --------------------------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class Budget:
    site_iterations: int = 300   # training iterations summed over the sites (pooled: all of them)
    rounds: int = 4              # federated rounds
    threads: int = 2
    spacing: str = DEFAULT_SPACING
    federated_overrides: tuple[tuple[str, object], ...] = ()  # run-config keys over the federated arms' own

    def per_site(self, sites: int) -> int:
        return max(1, self.site_iterations // sites)

    def local_iterations(self, sites: int) -> int:
        return max(1, self.site_iterations // (sites * self.rounds))


@dataclass(frozen=True)
class Arm:
    kind: str   # one of ARMS
    seed: int

    @property
    def name(self) -> str:
        return f"{self.kind}_s{self.seed}"

    @property
    def mode(self) -> str:
        return "cps" if self.kind.endswith("-cps") else "supervised"


def _training_config(data: Path, out: Path, centers: tuple[str, ...], iterations: int, mode: str, seed: int,
                     budget: Budget, cache: Path) -> LocalTrainingConfig:
    # The CPS weight ramps up over the first half of training, as the federation's 2 of 4 rounds.
    return LocalTrainingConfig(data=data, out=out, centers=centers, iterations=iterations, mode=mode, seed=seed,
                               spacing=parse_spacing(budget.spacing), unlabeled_batch=1, rampup=iterations // 2,
                               threads=budget.threads, agreement_volumes=0, log_every=50, cache=cache)


def _cache(folder: Path, data: Path, budget: Budget) -> Path:
    """One preprocessing cache per tree and spacing, shared by every arm of the experiment."""
    return folder.parents[1] / f"cache-{Path(data).name}-{budget.spacing}"


def train_pooled(arm: Arm, data: Path, sites: Sequence[str], folder: Path, budget: Budget) -> list[Path]:
    cache = _cache(folder, data, budget)
    config = _training_config(data, folder / "model", tuple(sites), budget.site_iterations, arm.mode, arm.seed,
                              budget, cache)
    in_fresh_process("train", train_locally, config, folder / "log.txt")
    return [folder / "model"]


def train_local(arm: Arm, data: Path, sites: Sequence[str], folder: Path, budget: Budget) -> list[Path]:
    cache = _cache(folder, data, budget)
    models = []
    for site in sites:
        config = _training_config(data, folder / f"model-{site}", (site,), budget.per_site(len(sites)), arm.mode,
                                  arm.seed, budget, cache)
        in_fresh_process("train", train_locally, config, folder / "log.txt")
        models.append(folder / f"model-{site}")
    return models


def train_federated(arm: Arm, data: Path, sites: Sequence[str], folder: Path, budget: Budget) -> list[Path]:
    from simulations.runner import SimulationSpec, run_simulation

    run_dir = folder / "federation"
    config = {
        "data-root": str(data.resolve()), "run-dir": str(run_dir.resolve()),
        "sites": ",".join(f"{s}:train" for s in sites), "num-server-rounds": budget.rounds,
        "local-iterations": budget.local_iterations(len(sites)), "evaluate-every": budget.rounds,
        "evaluate-train-sites": False, "net-width": 4, "unlabeled-batch-size": 1, "mode": arm.mode,
        "cps-rampup-rounds": max(1, budget.rounds // 2), "init-weights": "auto", "seed": arm.seed,
        "target-spacing": budget.spacing, "agreement-volumes": 0, **dict(budget.federated_overrides),
    }
    log = folder / "log.txt"
    with log.open("a", encoding="utf-8") as f:
        stdout, sys.stdout = sys.stdout, f
        try:
            run_simulation(SimulationSpec(run_dir=run_dir, run_config=config, num_supernodes=len(sites)))
        finally:
            sys.stdout = stdout
    return [Path(json.loads((run_dir / "report.json").read_text(encoding="utf-8"))["final_model"])]


TRAINERS = {"local": train_local, "federated": train_federated, "pooled": train_pooled}


def score_models(models: list[Path], sets: dict[str, Path], folder: Path, threads: int) -> dict[str, list[dict]]:
    """{group: [{case, phase, dice, hd95}]}; several models (local-cps): each case's mean over them."""
    scores: dict[str, list[dict]] = {}
    for group, data in sets.items():
        per_model = [score_model(f"{group}-{m.name}", m, data, folder, threads) for m in models]
        scores[group] = [{"case": rows[0]["case"], "phase": rows[0]["phase"],
                          "dice": statistics.fmean(r["dice"] for r in rows),
                          "hd95": statistics.fmean(r["hd95"] for r in rows)} for rows in zip(*per_model)]
    return scores


def run_arm(arm: Arm, data: dict[str, Path], sites: Sequence[str], sets: dict[str, Path], out: Path,
            budget: Budget) -> dict:
    rounds = f"_r{budget.rounds}" if arm.kind.startswith("federated") else ""
    if arm.kind.startswith("federated") and budget.federated_overrides:
        rounds += "_" + "_".join(f"{k}-{v}" for k, v in budget.federated_overrides)
    folder = out / "arms" / f"{arm.name}_{budget.spacing.replace(',', 'x')}_{budget.site_iterations}{rounds}"
    result_file = folder / "scores.json"
    if result_file.is_file():
        return json.loads(result_file.read_text(encoding="utf-8"))
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tree = data["full"] if arm.kind == "pooled-full" else data["sites"]
    models = TRAINERS[arm.kind.split("-")[0]](arm, tree, sites, folder, budget)
    seconds = time.perf_counter() - started
    result = {"arm": arm.kind, "seed": arm.seed, "spacing": budget.spacing, "site_iterations": budget.site_iterations,
              "train_seconds": round(seconds, 1), "models": [str(m) for m in models],
              "scores": score_models(models, sets, folder, budget.threads)}
    result_file.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


# --------------------------------------------------------------------------------------------- tables
def summarise(rows: list[dict]) -> tuple[float, float, int, float]:
    """(Dice mean, Dice sd, n, HD95 mean) over rows."""
    dice = [r["dice"] for r in rows]
    n = len(dice)
    if not n:
        return float("nan"), float("nan"), 0, float("nan")
    return (statistics.fmean(dice), statistics.stdev(dice) if n > 1 else 0.0, n,
            statistics.fmean(r["hd95"] for r in rows))


def result_rows(results: list[dict]) -> list[dict]:
    """One row per arm, group, phase and seed, and one per arm, group and phase over every seed ("all")."""
    rows: list[dict] = []
    arms = [a for a in ARMS if any(r["arm"] == a for r in results)]
    for arm in arms:
        mine = [r for r in results if r["arm"] == arm]
        for group in GROUPS:
            phases = dict.fromkeys(s["phase"] for r in mine for s in r["scores"].get(group, []))
            for phase in phases:
                for seed in [*(r["seed"] for r in mine), "all"]:
                    cases = [s for r in mine if seed in ("all", r["seed"]) for s in r["scores"].get(group, [])
                             if s["phase"] == phase]
                    mean, sd, n, hd95 = summarise(cases)
                    rows.append({"arm": arm, "group": group, "phase": phase, "seed": seed, "n": n,
                                 "dice_mean": mean, "dice_sd": sd, "hd95_mean": hd95})
    return rows


def write_results(results: list[dict], out: Path, heading: str) -> list[dict]:
    rows = result_rows(results)
    with (out / "results.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["arm", "group", "phase", "seed", "n", "dice_mean", "dice_sd", "hd95_mean"])
        writer.writeheader()
        writer.writerows({**r, "dice_mean": f"{r['dice_mean']:.4f}", "dice_sd": f"{r['dice_sd']:.4f}",
                          "hd95_mean": f"{r['hd95_mean']:.2f}"} for r in rows)
    seeds = sorted({r["seed"] for r in results})
    lines = [heading, "", "Dice of the liver per case, mean ± sd (n = cases × seeds); per seed: the mean.", "",
             "| arm | group | phase | Dice (all seeds) | HD95 mm | " + " | ".join(f"seed {s}" for s in seeds) + " | train s |",
             "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in seeds) + " | --- |"]
    for r in (r for r in rows if r["seed"] == "all" and r["n"]):
        per_seed = {x["seed"]: x for x in rows if (x["arm"], x["group"], x["phase"]) == (r["arm"], r["group"], r["phase"])}
        seconds = statistics.fmean(x["train_seconds"] for x in results if x["arm"] == r["arm"])
        lines.append(f"| {r['arm']} | {r['group']} | {r['phase']} | {r['dice_mean']:.3f} ± {r['dice_sd']:.3f} "
                     f"(n={r['n']}) | {r['hd95_mean']:.1f} | "
                     + " | ".join(f"{per_seed[s]['dice_mean']:.3f}" if s in per_seed else "" for s in seeds)
                     + f" | {seconds:.0f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return rows


def plot(rows: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    kept = [r for r in rows if r["seed"] == "all" and r["n"]]
    arms = list(dict.fromkeys(r["arm"] for r in kept))
    groups = [g for g in GROUPS if any(r["group"] == g for r in kept)]
    fig, ax = plt.subplots(figsize=(8.5, 0.45 * len(arms) * max(1, len(groups)) + 1.5))
    y = np.arange(len(arms))
    height = 0.8 / max(1, len(groups))
    for k, group in enumerate(groups):
        stats = [next((r for r in kept if r["arm"] == a and r["group"] == group), None) for a in arms]
        ax.barh(y + (k - (len(groups) - 1) / 2) * height, [s["dice_mean"] if s else 0 for s in stats], height=height,
                xerr=[s["dice_sd"] if s else 0 for s in stats], label=group, error_kw={"linewidth": 0.6})
    ax.set_yticks(y, arms)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("liver Dice (mean ± sd over cases and seeds)")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path = out / "real_federation.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------- main
def select_spacing(candidates: list[str], data: dict[str, Path], sites: Sequence[str], sets: dict[str, Path],
                   out: Path, budget: Budget, seed: int) -> str:
    """The candidate whose `pooled-cps` model scores best on the validation cases (OUT/spacing.md)."""
    lines = ["| target spacing (z,y,x mm) | validation Dice | n | train s |", "| --- | --- | --- | --- |"]
    best, best_dice = candidates[0], -1.0
    for spacing in candidates:
        # Scored on every set (the arm is reused if its spacing wins); only validation chooses.
        result = run_arm(Arm("pooled-cps", seed), data, sites, sets, out, replace(budget, spacing=spacing))
        mean, sd, n, _ = summarise(result["scores"]["validation"])
        lines.append(f"| {spacing or 'planner'} | {mean:.3f} ± {sd:.3f} | {n} | {result['train_seconds']:.0f} |")
        print(f"spacing {spacing or 'planner'}: validation Dice {mean:.3f} (n={n})", flush=True)
        if mean > best_dice:
            best, best_dice = spacing, mean
    (out / "spacing.md").write_text("\n".join(lines) + f"\n\nchosen: {best or 'planner'}\n", encoding="utf-8")
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.experiments real-federation",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a dataset fedliver check reads, with liver masks")
    parser.add_argument("--holdout", type=Path, default=None, help="a real held-out centre: every case is scored")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--labeled-per-site", type=int, default=1)
    parser.add_argument("--test-per-site", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="split and training seed")
    parser.add_argument("--seeds", type=int, default=1, help="training seeds from --seed on (same split)")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--site-iterations", type=int, default=Budget.site_iterations,
                        help="iterations summed over the sites, per arm (pooled: all of them)")
    parser.add_argument("--rounds", type=int, default=Budget.rounds)
    parser.add_argument("--threads", type=int, default=Budget.threads)
    parser.add_argument("--target-spacing", default=DEFAULT_SPACING, help='z,y,x mm; "": the planner\'s')
    parser.add_argument("--federated-run-config", default="", metavar="'KEY=VALUE ...'",
                        help="run-config keys in Flower's syntax for the federated arms, e.g. \"strategy='fedprox' "
                             "proximal-mu=0.1\" (kept in the arm's folder name)")
    parser.add_argument("--spacings", default=None, metavar="Z,Y,X;Z,Y,X",
                        help="candidates: pooled-cps at each, the best on the validation cases is used")
    args = parser.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    try:
        if unknown := [a for a in arms if a not in ARMS]:
            raise ValueError(f"--arms: unknown {', '.join(unknown)} (choose from {', '.join(ARMS)})")
        candidates = [s.strip() for s in args.spacings.split(";")] if args.spacings is not None else [args.target_spacing]
        for spacing in candidates:
            parse_spacing(spacing)
        from common.discovery import index_dataset

        from simulations.demo import parse_run_config

        overrides = tuple(sorted(parse_run_config(args.federated_run_config).items()))
        labeled = [c.case_id for c in index_dataset(args.data, validate=False).cases if c.labeled]
        plan = plan_split(labeled, args.sites, args.labeled_per_site, args.test_per_site, args.seed)
    except ValueError as e:
        print(" ".join(str(e).split()), file=sys.stderr)
        return 2
    out = args.out.resolve()
    sites = list(plan)
    data = {"sites": write_site_tree(args.data, plan, out / "data"),
            "full": write_site_tree(args.data, plan, out / "data-full", keep_all_masks=True)}
    sets = {"in-distribution": linked_set(data["sites"], plan, "test", out / "in-distribution-test")}
    if any(roles["validation"] for roles in plan.values()):
        sets["validation"] = linked_set(data["sites"], plan, "validation", out / "validation-set")
    if args.holdout is not None:
        sets["holdout"] = args.holdout.resolve()
    print("split: " + "; ".join(f"{s}: " + ", ".join(f"{len(v)} {k}" for k, v in r.items()) for s, r in plan.items()),
          flush=True)
    budget = Budget(site_iterations=args.site_iterations, rounds=args.rounds, threads=args.threads,
                    spacing=args.target_spacing, federated_overrides=overrides)
    if len(candidates) > 1:
        if "validation" not in sets:
            print("--spacings needs validation cases (more cases per site)", file=sys.stderr)
            return 2
        budget = replace(budget, spacing=select_spacing(candidates, data, sites, sets, out, budget, args.seed))
    todo = [Arm(kind, seed) for seed in range(args.seed, args.seed + args.seeds) for kind in arms]
    results = []
    for k, arm in enumerate(todo, 1):
        started = time.perf_counter()
        result = run_arm(arm, data, sites, sets, out, budget)
        results.append(result)
        shown = "holdout" if "holdout" in result["scores"] else "in-distribution"
        mean, _, n, _ = summarise(result["scores"][shown])
        print(f"[{k}/{len(todo)}] {arm.name}: {shown} Dice {mean:.3f} (n={n}, {time.perf_counter() - started:.0f} s)",
              flush=True)
        write_results(results, out, _heading(args, budget))
    rows = write_results(results, out, _heading(args, budget))
    plot(rows, out)
    print((out / "table.md").read_text(encoding="utf-8"))
    print(f"wrote {out / 'table.md'}, {out / 'results.csv'}, {out / 'real_federation.png'}")
    return 0


def _heading(args: argparse.Namespace, budget: Budget) -> str:
    return (f"Real-data federation on `{args.data}` ({args.sites} sites, {args.labeled_per_site} labeled and "
            f"{args.test_per_site} test per site, split seed {args.seed}); {budget.site_iterations} site-iterations "
            f"per arm ({budget.rounds} rounds when federated), target spacing {budget.spacing or 'planner'} mm, "
            f"holdout `{args.holdout}`.")
