"""The run's report: report.json (the contract), metrics.csv, a terminal table, and PNG plots.

report.json:
    {"rounds": [{"round": r, "centers": {C: {PHASE: {"dice", "hd95", "cases"}}, ...},
                 "train": {SITE: {metric: value}}, "rejected": [...], "seconds": s}],
     "final": {"round": N, "centers": {...}}, "best": {"round": k, "score": x},
     "final_model": "<MODEL_DIR>", "best_model": "<MODEL_DIR>", "heldout_centers": [...], "config": {...}}
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from common.phases import PHASES


def center_scores(metrics: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """`{"dice-GED4": .., "hd95-GED4": .., "cases-GED4": ..}` -> `{"GED4": {"dice", "hd95", "cases"}}`."""
    per_phase: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        kind, _, phase = key.partition("-")
        if kind in ("dice", "hd95", "cases") and phase:
            per_phase.setdefault(phase, {})[kind] = float(value)
    order = {phase: i for i, phase in enumerate(PHASES)}
    return dict(sorted(per_phase.items(), key=lambda item: order.get(item[0], len(order))))


def heldout_score(entry: Mapping, heldout: Sequence[str], phase: str = "GED4") -> float | None:
    """Mean Dice of `phase` over held-out centres in one round entry (None if not evaluated)."""
    values = [entry["centers"][c][phase]["dice"] for c in heldout if phase in entry.get("centers", {}).get(c, {})]
    return sum(values) / len(values) if values else None


def build_report(
    history: Sequence[Mapping], *, heldout: Sequence[str], final_model: Path, best_model: Path | None,
    best_round: int, best_score: float, config: Mapping,
) -> dict:
    evaluated = [entry for entry in history if entry.get("centers")]
    final = evaluated[-1] if evaluated else {"round": 0, "centers": {}}
    return {
        "rounds": list(history),
        "final": {"round": final["round"], "centers": final["centers"]},
        "best": {"round": best_round, "score": best_score, "metric": "held-out GED4 Dice"},
        "heldout_centers": list(heldout),
        "final_model": str(final_model),
        "best_model": str(best_model) if best_model else None,
        "config": dict(config),
    }


def write_report(run_dir: Path, report: Mapping) -> Path:
    path = Path(run_dir) / "report.json"
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(report, indent=1))
    os.replace(temporary, path)
    write_csv(Path(run_dir) / "metrics.csv", report["rounds"])
    return path


def write_csv(path: Path, history: Sequence[Mapping]) -> None:
    """One row per (round, site, metric): held-out scores and training metrics alike."""
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["round", "site", "kind", "phase", "metric", "value"])
        for entry in history:
            for site, phases in entry.get("centers", {}).items():
                for phase, scores in phases.items():
                    for metric, value in scores.items():
                        writer.writerow([entry["round"], site, "evaluation", phase, metric, value])
            for site, metrics in entry.get("train", {}).items():
                for metric, value in metrics.items():
                    writer.writerow([entry["round"], site, "training", "", metric, value])


def format_table(centers: Mapping[str, Mapping[str, Mapping[str, float]]], heldout: Sequence[str]) -> str:
    """Per-centre, per-phase Dice and HD95 as an aligned text table."""
    phases = [p for p in PHASES if any(p in scores for scores in centers.values())]
    header = f"{'center':<10}" + "".join(f"{p:>18}" for p in phases)
    lines = [header, f"{'':<10}" + "".join(f"{'Dice / HD95 mm':>18}" for _ in phases), "-" * len(header)]
    for center, scores in centers.items():
        label = f"{center}{' *' if center in heldout else ''}"
        cells = [
            f"{scores[p]['dice']:>8.3f} / {scores[p]['hd95']:>6.1f}" if p in scores else f"{'-':>18}" for p in phases
        ]
        lines.append(f"{label:<10}" + "".join(f"{c:>18}" for c in cells))
    lines.append("* held-out centre (never trains)")
    return "\n".join(lines)
