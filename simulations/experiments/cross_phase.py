"""The cross-phase ablation: which label-transfer technique makes GED4 labels segment every phase.

    python -m simulations.experiments cross-phase --out runs/cross-phase

One phantom set (training centres with a test and a validation split, held-out centre C), one
budget and one seed per comparison. Every arm is a pooled `fedliver train` run on A, B1 and B2
(`train_locally`, each in a fresh process with its own log), then `fedliver predict` + `fedliver
evaluate` (`predict`, `evaluate_predictions`: fresh processes too) on held-out C (every case) and on
the training centres' test split (in-distribution): per phase Dice mean, sd and n. Arms: technique
(none = nnU-Net's augmentation only, each technique alone, the combination) x mode (supervised-only,
CPS) x initial weights (the plain ATLAS-like pretraining, the label-transfer one, the multi-sequence
public one: `simulations/pretrain.py`); then one arm declared in advance (--followup) again with a
second seed, and federated (FedAvg, the same site-iterations).
Writes OUT/results.csv (one row per arm, group and phase), OUT/table.md and OUT/cross_phase.png.
Finished arms are kept (OUT/arms/<name>/scores.json), so a rerun only runs what is missing.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from client.local_training import LocalTrainingConfig, train_locally
from client.prediction import PredictConfig, predict
from client.prediction_evaluation import EvaluateConfig, evaluate_predictions
from common.label_transfer_config import LabelTransferConfig
from common.run_config import parse_mirror_axes

REPO = Path(__file__).resolve().parents[2]
PRETRAINED = REPO / "simulations" / "pretrained"
INITS = {"plain": PRETRAINED / "stunet_T4_atlas.safetensors",
         "label-transfer": PRETRAINED / "stunet_T4_atlas_lt.safetensors",
         "multi-sequence": PRETRAINED / "stunet_T4_multiseq.safetensors",
         # The same set and budget, pretrained without mirroring (as the sites train: RAS, no flips).
         "multi-sequence-no-mirror": PRETRAINED / "stunet_T4_multiseq_nomirror.safetensors",
         # Images drawn from label maps at every sample (domain randomisation): the default start.
         "domain-randomised": PRETRAINED / "stunet_T4_synth.safetensors"}
COMBINATION = LabelTransferConfig(location_scale=0.5, non_contrast=0.25, random_conv=0.25, transpose=0.5)


@dataclass(frozen=True)
class Technique:
    label_transfer: LabelTransferConfig = LabelTransferConfig()
    propagate_labels: bool = False
    mirror_axes: str = "0,1,2"  # nnU-Net's mirroring; "0,1": the left-right order (RAS arrays) is kept

    def training_options(self) -> dict[str, object]:
        """The technique as `LocalTrainingConfig` fields."""
        return {"label_transfer": self.label_transfer, "propagate_labels": self.propagate_labels,
                "mirror_axes": parse_mirror_axes(self.mirror_axes)}

    def run_config(self) -> dict[str, object]:
        return {**self.label_transfer.to_dict_hyphenated(), "propagate-labels": self.propagate_labels,
                "mirror-axes": self.mirror_axes}


TECHNIQUES: dict[str, Technique] = {
    "none": Technique(),
    "location-scale": Technique(LabelTransferConfig(location_scale=0.5)),
    "non-contrast": Technique(LabelTransferConfig(non_contrast=0.5)),
    "random-conv": Technique(LabelTransferConfig(random_conv=0.5)),
    "transpose": Technique(LabelTransferConfig(transpose=0.5)),
    "combination": Technique(COMBINATION),
    "propagation": Technique(propagate_labels=True),
    "combination+propagation": Technique(COMBINATION, propagate_labels=True),
    # Anatomy's own orientation as a cue: no left-right mirroring, or no mirroring at all.
    "propagation+lr-kept": Technique(propagate_labels=True, mirror_axes="0,1"),
    "propagation+no-mirror": Technique(propagate_labels=True, mirror_axes=""),
    # C's coils shade its images more than the training sites' do.
    "propagation+no-mirror+bias-field": Technique(LabelTransferConfig(bias_field=0.5), True, ""),
}
#: CPS variants: (cross-term confidence threshold); "cps-strong": students learn from a strong view
MODES = {"supervised": 0.0, "cps": 0.0, "cps-confident": 0.9, "cps-strong": 0.0}
STRONG_VIEW_MODES = ("cps-strong",)
NON_CONTRAST = ("T1", "T2", "DWI_800")
REPORTED = ("GED4",) + NON_CONTRAST  # the phases scored: the labeled one and the targets
GROUPS = ("C", "in-distribution")
#: The same predictions with nnU-Net's keep-the-largest-component on every phase (the models keep it
#: on GED4 only): what choosing `postprocessing-phases = "*"` would give, scored without predicting again.
LARGEST_COMPONENT = "+largest-component"


@dataclass(frozen=True)
class Arm:
    technique: str
    mode: str
    init: str
    seed: int = 0
    federated: bool = False

    @property
    def name(self) -> str:
        kind = "fed" if self.federated else "pooled"
        return f"{kind}_{self.technique}_{self.mode}_{self.init}_s{self.seed}"


@dataclass(frozen=True)
class Budget:
    iterations: int = 300           # pooled iterations (labeled batch 2, unlabeled batch 1)
    rounds: int = 4                 # federated: rounds x local iterations x 3 sites = iterations
    threads: int = 2

    @property
    def local_iterations(self) -> int:
        return max(1, self.iterations // (3 * self.rounds))


# --------------------------------------------------------------------------------------------- data
def make_phantoms(out: Path, cases: int, labeled: int, test_cases: int, validation_cases: int, seed: int) -> Path:
    data = out / "data"
    marker = data / ".complete"
    settings = json.dumps([cases, labeled, test_cases, validation_cases, seed])
    if marker.is_file() and marker.read_text() == settings:
        return data
    from simulations.phantoms import PhantomConfig, generate_liqa_tree

    summary = generate_liqa_tree(data, PhantomConfig(centers=("A", "B1", "B2", "C"), heldout=("C",), cases=cases,
                                                     labeled=labeled, test_cases=test_cases,
                                                     validation_cases=validation_cases, seed=seed))
    (out / "phantoms.log").write_text(summary.format() + "\n")
    marker.write_text(settings)
    return data


def in_distribution_test_set(data: Path, out: Path) -> Path:
    """A LiQA tree of links to the training centres' test cases (what predict and evaluate read)."""
    from common.discovery import index_dataset

    folder = out / "in-distribution-test"
    for case in index_dataset(data, centers=["A", "B1", "B2"], validate=False).cases:
        case_dir = next(iter(case.images.values())).parent.resolve()
        link = folder / case_dir.parent.name / case_dir.name
        if case.split == "test" and not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(case_dir, target_is_directory=True)
    return folder


# --------------------------------------------------------------------------------------------- runs
def train_pooled(arm: Arm, data: Path, model: Path, budget: Budget, log: Path) -> None:
    mode = "supervised" if arm.mode == "supervised" else "cps"
    technique = TECHNIQUES[arm.technique]
    # Propagated phases are labeled cache entries, otherwise unlabeled ones: one cache for each.
    cache = model.parents[2] / ("cache-propagated" if technique.propagate_labels else "cache")
    config = LocalTrainingConfig(
        data=data, out=model, centers=("A", "B1", "B2"), iterations=budget.iterations, mode=mode,
        cps_confidence=MODES[arm.mode], cps_strong_view=arm.mode in STRONG_VIEW_MODES, init=INITS[arm.init],
        base_width=4, unlabeled_batch=1, seed=arm.seed,
        threads=budget.threads, agreement_volumes=0, log_every=50, cache=cache, **technique.training_options(),
    )
    in_fresh_process("train", train_locally, config, log)


def in_fresh_process(command: str, function: Callable[[Any], int], config: object, log: Path) -> None:
    """`function(config)` (a `fedliver <command>` as a function) in a spawned process, its output in `log`:
    its torch threads, memory and output (C libraries' too) are its own, as when each step was a command."""
    log.parent.mkdir(parents=True, exist_ok=True)
    process = multiprocessing.get_context("spawn").Process(target=_logged, args=(function, config, log))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"fedliver {command} failed (exit {process.exitcode}); see {log}")


def _logged(function: Callable[[Any], int], config: object, log: Path) -> None:
    """In the spawned process: stdout and stderr into the log, then the function; its status is the exit code."""
    with log.open("a") as f:
        os.dup2(f.fileno(), sys.stdout.fileno())
        os.dup2(f.fileno(), sys.stderr.fileno())
    raise SystemExit(function(config))


def train_federated(arm: Arm, data: Path, run_dir: Path, budget: Budget, log: Path) -> Path:
    from simulations.runner import SimulationSpec, run_simulation

    config = {
        "data-root": str(data.resolve()), "run-dir": str(run_dir.resolve()), "sites": "A:train,B1:train,B2:train,C:eval",
        "num-server-rounds": budget.rounds, "local-iterations": budget.local_iterations, "evaluate-every": budget.rounds,
        "net-width": 4, "unlabeled-batch-size": 1, "mode": "supervised" if arm.mode == "supervised" else "cps",
        "cps-confidence": MODES[arm.mode], "cps-strong-view": arm.mode in STRONG_VIEW_MODES,
        "init-weights": str(INITS[arm.init]), "seed": arm.seed,
        **TECHNIQUES[arm.technique].run_config(),
    }
    with log.open("a") as f:
        stdout = sys.stdout
        sys.stdout = f
        try:
            run_simulation(SimulationSpec(run_dir=run_dir, run_config=config, num_supernodes=4))
        finally:
            sys.stdout = stdout
    return Path(json.loads((run_dir / "report.json").read_text())["final_model"])


def score(model: Path, sets: dict[str, Path], work: Path, log: Path, threads: int) -> dict[str, dict[str, list[float]]]:
    """{group: {phase: [Dice per case]}} of `model` on each test set."""
    out: dict[str, dict[str, list[float]]] = {}
    for group, folder in sets.items():
        pred = work / f"pred-{group}"
        in_fresh_process("predict", predict, PredictConfig(input=folder, output=pred, model=model, phases=REPORTED,
                                                           threads=threads), log)
        evaluation = EvaluateConfig(pred=pred, truth=folder)
        in_fresh_process("evaluate", evaluate_predictions, evaluation, log)
        cases = json.loads(evaluation.out.read_text())["cases"]
        out[group] = {phase: [cases[c][phase]["dice"] for c in sorted(cases) if phase in cases[c]]
                      for phase in REPORTED if any(phase in cases[c] for c in cases)}
    return out


def largest_component_scores(pred: Path, truth: Path) -> dict[str, list[float]]:
    """{phase: [Dice per case]} of the predictions under `pred` after keeping their largest component."""
    import numpy as np
    import SimpleITK as sitk

    from client.prediction_evaluation import TruthLookup, find_predictions
    from common.metrics import dice
    from common.postprocessing import postprocess_mask

    lookup, out = TruthLookup(truth), {}
    for case_id, phase, file in find_predictions(pred):
        mask, labels = lookup.find(case_id, phase)
        if mask is None or phase not in REPORTED:
            continue
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(mask)))
        reference = np.isin(reference, labels) if labels else reference > 0
        kept = postprocess_mask(sitk.GetArrayFromImage(sitk.ReadImage(str(file))), "largest-component")
        out.setdefault(phase, []).append(dice(kept, reference))
    return out


def with_largest_component(result: dict, folder: Path, sets: dict[str, Path]) -> dict:
    """`result` with the LARGEST_COMPONENT groups added (from the arm's kept predictions)."""
    for group, truth in sets.items():
        if group + LARGEST_COMPONENT not in result["scores"] and (folder / f"pred-{group}").is_dir():
            result["scores"][group + LARGEST_COMPONENT] = largest_component_scores(folder / f"pred-{group}", truth)
    return result


def run_arm(arm: Arm, data: Path, sets: dict[str, Path], out: Path, budget: Budget) -> dict:
    folder = out / "arms" / arm.name
    result_file = folder / "scores.json"
    if result_file.is_file():
        result = json.loads(result_file.read_text())
        scored = set(result["scores"])
        if set(with_largest_component(result, folder, sets)["scores"]) != scored:  # an arm from before it
            result_file.write_text(json.dumps(result, indent=1) + "\n")
        return result
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "log.txt"
    started = time.perf_counter()
    if arm.federated:
        model = train_federated(arm, data, folder / "federation", budget, log)
    else:
        model = folder / "model"
        train_pooled(arm, data, model, budget, log)
    seconds = time.perf_counter() - started
    result = {"arm": arm.__dict__, "name": arm.name, "train_seconds": round(seconds, 1),
              "scores": score(model, sets, folder, log, budget.threads)}
    result = with_largest_component(result, folder, sets)
    result_file.write_text(json.dumps(result, indent=1) + "\n")
    return result


# --------------------------------------------------------------------------------------------- tables
def collected(out: Path) -> list[dict]:
    """Every finished arm under OUT/arms (earlier invocations' too: the table grows run by run),
    in a stable order: pooled before federated, then init, mode, technique, seed."""
    results = [json.loads(f.read_text()) for f in (out / "arms").glob("*/scores.json")]
    order = {name: i for i, name in enumerate([*INITS, *MODES, *TECHNIQUES])}
    return sorted(results, key=lambda r: (r["arm"]["federated"], order[r["arm"]["init"]], order[r["arm"]["mode"]],
                                          order[r["arm"]["technique"]], r["arm"]["seed"]))


def summarise(values: list[float]) -> tuple[float, float, int]:
    n = len(values)
    return (statistics.fmean(values) if n else float("nan"), statistics.stdev(values) if n > 1 else 0.0, n)


def non_contrast_mean(scores: dict[str, list[float]]) -> float:
    means = [summarise(scores[p])[0] for p in NON_CONTRAST if scores.get(p)]
    return statistics.fmean(means) if means else float("nan")


def write_results(results: list[dict], out: Path) -> None:
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["arm", "kind", "technique", "mode", "init", "seed", "group", "phase", "dice_mean", "dice_sd", "n",
                         "train_seconds"])
        for r in results:
            a = r["arm"]
            for group, phases in r["scores"].items():
                for phase, values in phases.items():
                    mean, sd, n = summarise(values)
                    writer.writerow([r["name"], "federated" if a["federated"] else "pooled", a["technique"], a["mode"],
                                     a["init"], a["seed"], group, phase, f"{mean:.4f}", f"{sd:.4f}", n, r["train_seconds"]])
    phases = REPORTED
    lines = []
    titles = {"C": "held-out centre C", "in-distribution": "in-distribution test (A, B1, B2)"}
    for group in [*GROUPS, *(g + LARGEST_COMPONENT for g in GROUPS)]:
        if not any(group in r["scores"] for r in results):
            continue
        title = titles[group.removesuffix(LARGEST_COMPONENT)]
        if group.endswith(LARGEST_COMPONENT):
            title += ", the largest component kept on every phase"
        lines += [f"### {title}", "",
                  "| arm | " + " | ".join(phases) + " | mean T1/T2/DWI | train s |",
                  "| --- | " + " | ".join("---" for _ in phases) + " | --- | --- |"]
        for r in results:
            s = r["scores"].get(group, {})
            cells = []
            for p in phases:
                mean, sd, n = summarise(s.get(p, []))
                cells.append(f"{mean:.3f} ± {sd:.3f} (n={n})" if n else "")
            lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {non_contrast_mean(s):.3f} | {r['train_seconds']:.0f} |")
        lines.append("")
    (out / "table.md").write_text("\n".join(lines))


def plot(results: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    phases = REPORTED
    fig, axes = plt.subplots(1, len(GROUPS), figsize=(8.5 * len(GROUPS), 0.32 * len(results) + 2.0), squeeze=False)
    for ax, group in zip(axes[0], GROUPS):
        y = np.arange(len(results))
        for k, phase in enumerate(phases):
            stats = [summarise(r["scores"].get(group, {}).get(phase, [])) for r in results]
            ax.barh(y + (k - 1.5) * 0.2, [m for m, _, _ in stats], height=0.2, xerr=[s for _, s, _ in stats],
                    label=phase, error_kw={"linewidth": 0.6})
        ax.set_yticks(y, [r["name"] for r in results], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("Dice (mean ± sd over cases)")
        ax.set_title("held-out C" if group == "C" else "in-distribution test")
    axes[0][0].legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    path = out / "cross_phase.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------- main
def ablation_arms(techniques: list[str], modes: list[str], inits: list[str]) -> list[Arm]:
    return [Arm(t, m, i) for i in inits for m in modes for t in techniques]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.experiments cross-phase",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--iterations", type=int, default=Budget.iterations, help="pooled iterations per arm")
    parser.add_argument("--rounds", type=int, default=Budget.rounds, help="federated rounds (same site-iterations)")
    parser.add_argument("--threads", type=int, default=Budget.threads,
                        help="torch threads per pooled run (1: run two invocations side by side on 2 cores)")
    parser.add_argument("--techniques", default=",".join(TECHNIQUES))
    parser.add_argument("--modes", default="supervised,cps")
    parser.add_argument("--inits", default="plain,multi-sequence")
    parser.add_argument("--cases", type=int, default=12, help="cases per centre (held-out C: all test cases)")
    parser.add_argument("--labeled", type=int, default=4)
    parser.add_argument("--test-cases", type=int, default=3)
    parser.add_argument("--validation-cases", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="phantom and training seed")
    parser.add_argument("--followup", default="propagation+no-mirror,cps,multi-sequence-no-mirror",
                        metavar="TECHNIQUE,MODE,INIT",
                        help="the arm run again with a second seed and federated (default: the method's own)")
    parser.add_argument("--no-followups", action="store_true", help="skip the second seed and the federated run")
    args = parser.parse_args(argv)
    budget = Budget(iterations=args.iterations, rounds=args.rounds, threads=args.threads)
    names = lambda text, known: [v for v in text.split(",") if v] if all(v in known for v in text.split(",") if v) \
        else parser.error(f"unknown value in {text!r} (choose from {', '.join(known)})")
    arms = ablation_arms(names(args.techniques, TECHNIQUES), names(args.modes, MODES), names(args.inits, INITS))
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = make_phantoms(out, args.cases, args.labeled, args.test_cases, args.validation_cases, args.seed)
    sets = {"C": data / "Vendor_C", "in-distribution": in_distribution_test_set(data, out)}

    todo = [replace(arm, seed=args.seed) for arm in arms]
    if not args.no_followups:
        # Declared in advance, not picked from the test scores: test data selects nothing.
        technique, mode, init = args.followup.split(",")
        todo += [Arm(technique, mode, init, seed=args.seed, federated=True), Arm(technique, mode, init, seed=args.seed + 1)]
    for k, arm in enumerate(todo, 1):
        started = time.perf_counter()
        result = run_arm(arm, data, sets, out, budget)
        c = result["scores"].get("C", {})
        print(f"[{k}/{len(todo)}] {arm.name}: C GED4 {summarise(c.get('GED4', []))[0]:.3f}, "
              f"T1/T2/DWI mean {non_contrast_mean(c):.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
        write_results(collected(out), out)
    results = collected(out)

    write_results(results, out)
    plot(results, out)
    print(f"wrote {out / 'table.md'}, {out / 'results.csv'}, {out / 'cross_phase.png'}")
    return 0
