"""The run's report: report.json (the contract), metrics.csv, a terminal table, and PNG plots.

Evaluation protocol: every figure is on cases no site trained on. "centers" holds each centre's
test scores (a training site's test split, a held-out centre's every case); "in_distribution"
pools the training sites' test splits; "validation" (training sites' validation cases, on each
site's labeled phases: GED4 at a LiQA site, T2 at one whose masks are on T2) is what
`checkpoints/best` is selected on, pooled over those phases, and nothing else is. Scores per phase are
`{"dice", "dice_sd", "hd95", "hd95_sd", "cases"}`: means, sample sds (null below two cases), n.

report.json:
    {"rounds": [{"round": r, "centers": {C: {PHASE: scores}}, "in_distribution": {PHASE: scores},
                 "validation": {SITE: {PHASE: scores}}, "train": {SITE: {metric: value}},
                 "rejected": [...], "seconds": s, "bytes": {"to-each-node": b, "from-node": {SITE: b}},
                 "server": {"seconds": s, "cpu-seconds": s, "site-wait-seconds": s, "wait-cpu-seconds": s,
                            "peak-rss-mib": m, "rss-mib": m}}],
     "final": {"round": N, "centers": {...}, "in_distribution": {...}, "validation": {...}},
     "best": {"round": k, "selected_on": "validation GED4 Dice, training sites, n=3", "score": x},
     "final_model": "<MODEL_DIR>", "best_model": "<MODEL_DIR>" | null,
     "training_centers": [...], "heldout_centers": [...], "labeled_phases": {SITE: [PHASE, ...]},
     "config": {...}}

"selected_on" names the phases pooled ("validation T2 Dice, ..." at T2-labeled sites, "GED4+T2"
for both); "labeled_phases" is what each training site said it labels (its identify reply).

A round's "server" is the coordinator's own cost (`server.round_cost`): its seconds outside waiting on
the sites (decode, screen, aggregate, checkpoint), wall and its thread's CPU, those waits, and its
process's peak and current RSS.
"""

from __future__ import annotations

import csv
import functools
import operator
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from common.atomic_write import atomic_open, atomic_write_json
from common.phases import LABELED_PHASE, PHASES
from common.scores import VALIDATION_PREFIX, PhaseSummary, from_metrics, pool



def validation_name(phases: Sequence[str] = ()) -> str:
    """"validation T2 Dice" ("GED4+T2" pooled over both); no phase known (no site said): GED4, as LiQA sites label it."""
    return f"validation {'+'.join(phases) or LABELED_PHASE} Dice"


def selection_rule(phases: Sequence[str] = ()) -> str:
    """What `checkpoints/best` is chosen on: "validation T2 Dice, training sites"."""
    return f"{validation_name(phases)}, training sites"


SELECTION_RULE = selection_rule()  # at GED4-labeled sites
NO_VALIDATION = "no training site has validation cases: no best model promoted (use final_model)"
POOLED = "pooled"  # the site column of pooled rows in metrics.csv

Scores = Mapping[str, Mapping[str, float | int | None]]  # phase -> {"dice", "dice_sd", "hd95", "hd95_sd", "cases"}


def _to_json(per_phase: Mapping[str, PhaseSummary]) -> dict[str, dict]:
    return {phase: summary.to_json() for phase, summary in per_phase.items()}


def _from_json(scores: Scores) -> dict[str, PhaseSummary]:
    return {phase: PhaseSummary.from_json(s) for phase, s in scores.items()}


def evaluation_entry(metrics: Mapping[str, Mapping[str, float]], training: Collection[str]) -> dict:
    """The evaluation part of a round entry from each site's evaluate metrics (`site -> metrics`).

    Validation scores count only from training sites: a held-out centre never selects a model.
    """
    test = {site: from_metrics(m) for site, m in sorted(metrics.items())}
    validation = {site: from_metrics(m, VALIDATION_PREFIX) for site, m in sorted(metrics.items()) if site in training}
    return {
        "centers": {site: _to_json(scores) for site, scores in test.items() if scores},
        "in_distribution": _to_json(pool(scores for site, scores in test.items() if site in training)),
        "validation": {site: _to_json(scores) for site, scores in validation.items() if scores},
    }


def pooled_validation(entry: Mapping) -> dict[str, dict]:
    """Per phase, the training sites' validation cases of one round entry pooled together."""
    return _to_json(pool(_from_json(scores) for scores in entry.get("validation", {}).values()))


def selection_phases(entry: Mapping, phases: Collection[str] = ()) -> list[str]:
    """The validation phases of one round entry that selection pools: those of `phases` (the
    training sites' labeled phases), or every phase the sites validated on when none are given."""
    pooled = pool(_from_json(scores) for scores in entry.get("validation", {}).values())
    return [phase for phase in pooled if not phases or phase in phases]


def selection_score(entry: Mapping, phases: Collection[str] = ()) -> PhaseSummary | None:
    """The validation scores of one round entry pooled over the sites and `selection_phases`: its
    mean Dice is what selects the best model (a mean over validation volumes, so weighted by each
    site's number of them). One phase (GED4 at LiQA sites): that phase's pooled scores.
    None when no training site reported validation cases."""
    pooled = pool(_from_json(scores) for scores in entry.get("validation", {}).values())
    chosen = [pooled[phase] for phase in selection_phases(entry, phases)]
    return functools.reduce(operator.add, chosen) if chosen else None


def best_section(history: Sequence[Mapping], best_round: int, phases: Sequence[str] = ()) -> dict:
    """report.json's "best": the round `checkpoints/best` holds, the rule, and its score;
    `phases`: the training sites' labeled phases (none given: those they validated on)."""
    entry = next((e for e in history if e["round"] == best_round), None) if best_round else None
    selected = selection_score(entry, phases) if entry else None
    if selected is None:
        return {"round": None, "selected_on": selection_rule(phases), "score": None, "note": NO_VALIDATION}
    rule = selection_rule(selection_phases(entry, phases))
    return {"round": best_round, "selected_on": f"{rule}, n={selected.cases}", "score": selected.dice.mean}


def training_labeled_phases(labeled: Mapping[str, Sequence[str]]) -> list[str]:
    """Every phase some training site labels, in report order: what validation selects on."""
    return [phase for phase in PHASES if any(phase in phases for phases in labeled.values())]


def build_report(
    history: Sequence[Mapping], *, heldout: Sequence[str], training: Sequence[str], final_model: Path,
    best_model: Path | None, best_round: int, config: Mapping, labeled_phases: Mapping[str, Sequence[str]] | None = None,
) -> dict:
    """`labeled_phases`: {training site: the phases its masks label}, as the sites said."""
    labeled = {site: list(phases) for site, phases in (labeled_phases or {}).items()}
    evaluated = [entry for entry in history if "centers" in entry]
    final = evaluated[-1] if evaluated else {"round": 0}
    return {
        "rounds": list(history),
        "final": {"round": final["round"], **{key: final.get(key, {}) for key in ("centers", "in_distribution", "validation")}},
        "best": best_section(history, best_round, training_labeled_phases(labeled)),
        "training_centers": list(training),
        "heldout_centers": list(heldout),
        "labeled_phases": labeled,
        "final_model": str(final_model),
        "best_model": str(best_model) if best_model else None,
        "config": dict(config),
    }


def write_report(run_dir: Path, report: Mapping) -> Path:
    path = Path(run_dir) / "report.json"
    atomic_write_json(path, report, indent=1)
    write_csv(Path(run_dir) / "metrics.csv", report["rounds"])
    return path


def write_csv(path: Path, history: Sequence[Mapping]) -> None:
    """One row per (round, site, kind, phase, metric). Kinds: "test" (each centre, and the training
    sites' test splits pooled as site "pooled"), "validation" (each training site, and pooled),
    "training" (the sites' training metrics). Metrics of scores: dice, dice_sd, hd95, hd95_sd, cases."""
    with atomic_open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["round", "site", "kind", "phase", "metric", "value"])

        def scores(entry: Mapping, site: str, kind: str, per_phase: Scores) -> None:
            for phase, values in per_phase.items():
                for metric, value in values.items():
                    writer.writerow([entry["round"], site, kind, phase, metric, "" if value is None else value])

        for entry in history:
            for site, per_phase in entry.get("centers", {}).items():
                scores(entry, site, "test", per_phase)
            scores(entry, POOLED, "test", entry.get("in_distribution", {}))
            for site, per_phase in entry.get("validation", {}).items():
                scores(entry, site, "validation", per_phase)
            scores(entry, POOLED, "validation", pooled_validation(entry))
            for site, metrics in entry.get("train", {}).items():
                for metric, value in metrics.items():
                    writer.writerow([entry["round"], site, "training", "", metric, value])


def format_table(
    centers: Mapping[str, Scores], heldout: Sequence[str], *, in_distribution: Scores | None = None,
    labeled: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """Per phase mean±sd (n cases) of Dice and of HD95 (mm): the training sites' test splits pooled
    ("in-distribution"), each centre's test scores, held-out centres marked; with `labeled`
    ({training site: phases}), a last line naming each site's labeled phases."""
    rows: list[tuple[str, Scores]] = [("in-distribution", in_distribution)] if in_distribution else []
    rows += [(f"  {c}", scores) for c, scores in centers.items() if c not in heldout]
    rows += [(f"{c} *", centers[c]) for c in heldout if c in centers]
    phases = [p for p in PHASES if any(p in scores for _, scores in rows)]
    blocks = []
    for metric, title, digits in (("dice", "Dice", 3), ("hd95", "HD95 (mm)", 1)):
        header = f"{title + ', mean±sd (n)':<22}" + "".join(f"{p:>17}" for p in phases)
        lines = [header, "-" * len(header)]
        for label, scores in rows:
            cells = [_cell(scores[p], metric, digits) if p in scores else "-" for p in phases]
            lines.append(f"{label:<22}" + "".join(f"{c:>17}" for c in cells))
        blocks.append("\n".join(lines))
    footer = ["in-distribution: the training sites' test splits pooled (indented rows: each site's)",
              "* held-out centre (never trains; every case is a test case)"]
    footer = footer if in_distribution else footer[1:]
    if labeled and any(labeled.values()):
        footer.append("labeled phases (train, validate, select): "
                      + "; ".join(f"{site} {'+'.join(phases) or '-'}" for site, phases in labeled.items()))
    return "\n\n".join(blocks) + "\n" + "\n".join(footer)


def _cell(scores: Mapping[str, float | int | None], metric: str, digits: int) -> str:
    mean, sd, n = scores[metric], scores.get(f"{metric}_sd"), scores.get("cases")
    text = f"{mean:.{digits}f}" + (f"±{sd:.{digits}f}" if sd is not None else "")
    return text + (f" ({int(n)})" if n is not None else "")

