"""Dice and HD95 of prediction files against reference masks, as a function: `fedliver evaluate`.

    evaluate_predictions(EvaluateConfig(pred=OUT, truth=IN)) -> exit status

Reads every OUT/<case>/<PHASE>_pred.nii.gz (what `client.prediction.predict` writes), finds its
reference in IN (`fedliver evaluate --help`: fedliver/commands/evaluate.py), writes the per case,
per phase scores and per-phase summaries to OUT/evaluation.json (or `json`) and prints a table.
When OUT has `fedliver predict`'s predictions.csv, its quality control is joined to the scores
(`client.qc_evaluation`: recall of failures, false flags, AUROC, and a plot beside the JSON).
Beside `client.prediction` (the hospital scoring its own predictions); not `client.evaluation`,
which scores the federation's model on a site's cached volumes inside a Flower message. The exit
status is the command's: 1 when a folder is missing, a pair failed, or nothing was evaluated.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from client.qc_evaluation import format_summary, plot_qc, qc_rows, qc_summary
from client.quality_control import read_predictions

_SUFFIX = "_pred.nii.gz"


@dataclass(frozen=True)
class EvaluateConfig:
    """`fedliver evaluate`'s options."""

    pred: Path                                   # predictions: OUT/<case>/<PHASE>_pred.nii.gz
    truth: Path                                  # a LiQA tree, an nnU-Net raw dataset or a folder of case folders
    json: Path | None = None                     # where the results go (None: <pred>/evaluation.json)

    def __post_init__(self) -> None:  # a script may give paths as text
        for name in ("pred", "truth", "json"):
            if (value := getattr(self, name)) is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))

    @property
    def out(self) -> Path:
        return self.json or self.pred / "evaluation.json"


def find_predictions(pred_root: Path) -> list[tuple[str, str, Path]]:
    """(case, phase, file) for every OUT/<case>/<PHASE>_pred.nii.gz, sorted."""
    from common.phases import PHASES

    found = []
    for case_dir in sorted(p for p in pred_root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(case_dir.iterdir()):
            phase = f.name[: -len(_SUFFIX)] if f.name.endswith(_SUFFIX) else None
            if phase in PHASES and f.is_file():
                found.append((case_dir.name, phase, f))
    return found


class TruthLookup:
    """Reference mask (and the label values meaning liver) for a (case, phase)."""

    def __init__(self, root: Path):
        from common.discovery import index_dataset
        from common.validation import ValidationError

        self.root = root
        self.cases = {}
        try:
            self.cases = {c.case_id: c for c in index_dataset(root, validate=False).cases}
        except ValidationError:
            pass  # a plain folder of case folders

    def find(self, case_id: str, phase: str) -> tuple[Path | None, tuple[int, ...] | None]:
        case = self.cases.get(case_id)
        if case is not None:
            mask = case.masks.get(phase)
            return (Path(mask), tuple(case.foreground_labels)) if mask is not None else (None, None)
        for candidate in (self.root / case_id / f"mask_{phase}.nii.gz", self.root / case_id / f"mask_{phase}.nii"):
            if candidate.is_file():
                return candidate, None
        if phase == "GED4" and (self.root / f"{case_id}.nii.gz").is_file():
            return self.root / f"{case_id}.nii.gz", None
        return None, None

    def center(self, case_id: str) -> str:
        case = self.cases.get(case_id)
        return case.center if case is not None else ""


def _stats(values: list[float]) -> dict:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0  # sample sd, as the federation's reports
    return {"mean": statistics.fmean(values), "sd": sd, "median": statistics.median(values), "n": len(values)}


def summarise(results: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """Per phase {"dice": {mean, sd, median, n}, "hd95": {...}} over cases."""
    by_phase: dict[str, dict[str, list[float]]] = {}
    for phases in results.values():
        for phase, m in phases.items():
            slot = by_phase.setdefault(phase, {"dice": [], "hd95": []})
            slot["dice"].append(m["dice"])
            slot["hd95"].append(m["hd95"])
    from common.phases import PHASES

    order = sorted(by_phase, key=lambda p: PHASES.index(p) if p in PHASES else len(PHASES))
    return {p: {k: _stats(v) for k, v in by_phase[p].items()} for p in order}


def format_table(summary: dict[str, dict]) -> str:
    lines = [f"{'phase':<8} {'n':>4} {'Dice mean':>10} {'sd':>7} {'Dice med':>9} {'HD95 mean':>10} {'HD95 med':>9}"]
    for phase, s in summary.items():
        lines.append(f"{phase:<8} {s['dice']['n']:>4} {s['dice']['mean']:>10.4f} {s['dice']['sd']:>7.4f} "
                     f"{s['dice']['median']:>9.4f} {s['hd95']['mean']:>10.2f} {s['hd95']['median']:>9.2f}")
    return "\n".join(lines)


def evaluate_predictions(config: EvaluateConfig) -> int:
    """Evaluate as `fedliver evaluate` does and write `config.out`; the exit status (0 or 1)."""
    from common.atomic_write import atomic_write_json
    from common.metrics import evaluate_pair

    if not config.pred.is_dir():
        print(f"{config.pred}: no such folder", file=sys.stderr)
        return 1
    if not config.truth.exists():
        print(f"{config.truth}: no such file or folder", file=sys.stderr)
        return 1
    truth = TruthLookup(config.truth)
    results: dict[str, dict[str, dict]] = {}
    by_center: dict[str, dict[str, dict]] = {}
    missing, errors = [], []
    for case_id, phase, pred in find_predictions(config.pred):
        mask, labels = truth.find(case_id, phase)
        if mask is None:
            missing.append(str(pred))
            continue
        try:
            metrics = evaluate_pair(pred, mask, foreground_labels=labels)
        except Exception as e:  # unreadable file, other grid: report and go on
            line = " ".join(str(e).split()) or type(e).__name__
            errors.append(line if str(pred) in line or str(mask) in line else f"{pred}: {line}")
            print(errors[-1], file=sys.stderr, flush=True)
            continue
        results.setdefault(case_id, {})[phase] = metrics
        if center := truth.center(case_id):
            by_center.setdefault(center, {}).setdefault(case_id, {})[phase] = metrics

    report = {
        "pred": str(config.pred),
        "truth": str(config.truth),
        "metrics": {"dice": "2|P&T|/(|P|+|T|); 1 when both empty",
                    "hd95": "mm; max of the two directed 95th percentiles of surface distances; "
                            "0 when both empty, the volume's diagonal when one is empty"},
        "cases": results,
        "summary": summarise(results),
        "summary_by_center": {c: summarise(r) for c, r in sorted(by_center.items())},
        "missing_truth": missing,
        "errors": errors,
    }
    qc = qc_rows(results, read_predictions(config.pred))  # predict's quality control, when it is there
    if qc:
        report["quality_control"] = {"summary": qc_summary(qc), "volumes": qc}
    out = config.out
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, report, indent=2, allow_nan=False)  # tools read it: never half a file

    n = sum(len(p) for p in results.values())
    print(format_table(report["summary"]) if n else "nothing evaluated")
    print(f"{n} volume(s) evaluated, {len(missing)} without reference, {len(errors)} error(s) -> {out}")
    for line in missing:
        print(f"no reference: {line}")
    if qc:
        plot = plot_qc(qc, out.with_name(out.stem + "_qc.png"))
        print(f"{format_summary(report['quality_control']['summary'])}; plot {plot}")
    return 1 if errors or n == 0 else 0
