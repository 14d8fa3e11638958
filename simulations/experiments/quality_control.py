"""How well `fedliver predict`'s quality control finds failed segmentations, on development data.

    python -m simulations.experiments quality-control \
        --runs demo-C=runs/demo/pred-C:runs/demo/data/Vendor_C,demo-chaos=OUT2:../shared/data/chaos_t2spir \
        --out docs/results/quality_control

Each run is NAME=PRED:TRUTH: a `fedliver predict` output folder (with its predictions.csv) and the
reference it is scored on (`fedliver evaluate` is run when PRED has no evaluation.json). Writes
OUT/volumes.csv (every volume's terms beside its Dice), OUT/table.md (per run and pooled: failures
flagged, good volumes flagged, AUROC; per rule: the failures it catches and the good volumes it
flags, and each term's median among failures and good volumes: the numbers the thresholds were
chosen on) and OUT/qc_vs_dice.png. Thresholds are `client.quality_control.QCRules`; `--rules
KEY=VALUE,...` scores other ones (re-judged from the stored terms, nothing predicted again).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from dataclasses import fields, replace
from pathlib import Path

from client.prediction_evaluation import EvaluateConfig, evaluate_predictions
from client.qc_evaluation import FAILURE, GOOD, format_summary, plot_qc, qc_summary
from client.quality_control import QCReport, QCRules, VolumeQC

TERMS = ("volume_ml", "largest_share", "agreement", "entropy", "centroid_left", "phase_volume_deviation")


def load_run(name: str, pred: Path, truth: Path) -> list[tuple[VolumeQC, float]]:
    """(the volume's QC terms, its Dice) for every scored volume of one run."""
    scores = pred / "evaluation.json"
    if not scores.is_file() and evaluate_predictions(EvaluateConfig(pred=pred, truth=truth)) != 0:
        raise RuntimeError(f"{name}: fedliver evaluate failed on {pred}")
    cases = json.loads(scores.read_text(encoding="utf-8"))["cases"]
    out = []
    with (pred / "predictions.csv").open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            dice = cases.get(row["case"], {}).get(row["phase"], {}).get("dice")
            if dice is None:
                continue
            out.append((VolumeQC.from_row(row), dice))
    return out


def judged(volumes: list[tuple[VolumeQC, float]], rules: QCRules) -> list[dict]:
    """Rows {run, case, phase, dice, terms..., qc_score, qc, qc_reasons} under `rules`."""
    rows = []
    for v, dice in volumes:
        v = rules.verdict(replace(v))
        rows.append({"dice": dice, **{k: getattr(v, k) for k in ("case", "phase", *TERMS, "qc_score", "qc",
                                                                   "qc_reasons")}})
    return rows


def rule_table(rows: list[dict], rules: QCRules) -> list[str]:
    """Per rule: failures it catches, good volumes it flags (a rule fires when its score < 0.5)."""
    failures = [r for r in rows if r["dice"] < FAILURE]
    good = [r for r in rows if r["dice"] >= GOOD]
    words = {"volume": "volume", "fragmented": "fragmented", "branches disagree": "branches disagree",
             "uncertain": "uncertain", "left": "centroid on the left", "other phases": "cross-phase volume",
             "no liver": "no liver found"}
    lines = [f"| rule | failures caught (of {len(failures)}) | good volumes flagged (of {len(good)}) |",
             "| --- | --- | --- |"]
    for key, label in words.items():
        caught = sum(key in r["qc_reasons"] for r in failures)
        flagged = sum(key in r["qc_reasons"] for r in good)
        lines.append(f"| {label} | {caught} | {flagged} |")
    lines += ["", f"| term | median, failures (Dice < {FAILURE}) | median, others | median, good (Dice >= {GOOD}) |",
              "| --- | --- | --- | --- |"]
    for term in TERMS:
        def median(group):
            values = [r[term] for r in group if r[term] == r[term]]
            return f"{statistics.median(values):.3f} (n={len(values)})" if values else "n/a"
        lines.append(f"| {term} | {median(failures)} | {median([r for r in rows if r['dice'] >= FAILURE])} | "
                     f"{median(good)} |")
    return lines


def parse_runs(text: str) -> dict[str, tuple[Path, Path]]:
    runs = {}
    for item in (t for t in text.split(",") if t.strip()):
        name, _, paths = item.partition("=")
        pred, _, truth = paths.partition(":")
        if not (name and pred and truth):
            raise ValueError(f"--runs: {item!r} is not NAME=PRED:TRUTH")
        runs[name.strip()] = (Path(pred), Path(truth))
    return runs


def parse_rules(text: str) -> QCRules:
    known = {f.name for f in fields(QCRules)}
    values = {}
    for item in (t for t in text.split(",") if t.strip()):
        key, _, value = item.partition("=")
        if key not in known:
            raise ValueError(f"--rules: unknown {key!r} (one of {', '.join(sorted(known))})")
        values[key] = float(value)
    return QCRules(**values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.experiments quality-control",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", required=True, help="NAME=PRED:TRUTH,... (fedliver predict outputs and references)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rules", default="", help="KEY=VALUE,... over QCRules' defaults")
    args = parser.parse_args(argv)
    try:
        runs, rules = parse_runs(args.runs), parse_rules(args.rules)
        loaded = {name: load_run(name, pred, truth) for name, (pred, truth) in runs.items()}
    except (ValueError, RuntimeError, OSError) as e:
        print(" ".join(str(e).split()), file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    per_run = {name: [{"run": name, **r} for r in judged(volumes, rules)] for name, volumes in loaded.items()}
    every = [r for rows in per_run.values() for r in rows]
    with (args.out / "volumes.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["run", "case", "phase", "dice", *TERMS, "qc_score", "qc", "qc_reasons"])
        writer.writeheader()
        writer.writerows({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()} for r in every)
    lines = ["Quality control on development data: does `review` find the failed segmentations?", "",
             f"Rules: {', '.join(f'{f.name} {getattr(rules, f.name)}' for f in fields(QCRules))}.", "",
             "| run | n | failures flagged | good flagged | AUROC (Dice < 0.7) |", "| --- | --- | --- | --- | --- |"]
    for name, rows in [*per_run.items(), ("all", every)]:
        s = qc_summary(rows)
        auroc = "n/a" if s["auroc"] is None else f"{s['auroc']:.2f}"
        lines.append(f"| {name} | {s['n']} | {s['failures_flagged']}/{s['failures']} | {s['good_flagged']}/{s['good']} | "
                     f"{auroc} |")
    lines += ["", "Pooled over the runs:", "", *rule_table(every, rules), ""]
    (args.out / "table.md").write_text("\n".join(lines), encoding="utf-8")
    plot_qc(every, args.out / "qc_vs_dice.png")
    print("\n".join(lines))
    print(format_summary(qc_summary(every)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
