"""How well quality control finds the failures: `fedliver evaluate` joins predictions.csv to Dice.

Per volume, Dice beside `qc_score` and `qc`; over them, the recall of failures (Dice < FAILURE: the
share flagged `review`), the false-flag rate among good volumes (Dice >= GOOD) and the AUROC of the
continuous score for telling failures apart (1 - qc_score ranks them; ties count half).
"""

from __future__ import annotations

from pathlib import Path

FAILURE = 0.7  # a volume below this Dice needs a reader's correction
GOOD = 0.85    # a volume at or above it should pass unflagged


def auroc(scores_of_positives: list[float], scores_of_negatives: list[float]) -> float | None:
    """P(a positive scores above a negative), ties half (Mann-Whitney U / n+ n-); None without both."""
    if not scores_of_positives or not scores_of_negatives:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in scores_of_positives for n in scores_of_negatives)
    return wins / (len(scores_of_positives) * len(scores_of_negatives))


def qc_rows(results: dict[str, dict[str, dict]], predictions: dict[tuple[str, str], dict]) -> list[dict]:
    """{case, phase, dice, qc_score, qc, qc_reasons} of every evaluated volume that has a QC row."""
    rows = []
    for case, phases in sorted(results.items()):
        for phase, metrics in sorted(phases.items()):
            if (qc := predictions.get((case, phase))) and qc.get("qc_score", "") != "":
                rows.append({"case": case, "phase": phase, "dice": metrics["dice"],
                             "qc_score": float(qc["qc_score"]), "qc": qc["qc"], "qc_reasons": qc["qc_reasons"]})
    return rows


def qc_summary(rows: list[dict]) -> dict:
    failures = [r for r in rows if r["dice"] < FAILURE]
    good = [r for r in rows if r["dice"] >= GOOD]
    flagged = lambda group: sum(r["qc"] == "review" for r in group)
    return {
        "n": len(rows), "flagged": flagged(rows),
        "failures": len(failures), "failures_flagged": flagged(failures),
        "recall_of_failures": flagged(failures) / len(failures) if failures else None,
        "good": len(good), "good_flagged": flagged(good),
        "false_flag_rate": flagged(good) / len(good) if good else None,
        "auroc": auroc([1 - r["qc_score"] for r in failures], [1 - r["qc_score"] for r in rows if r["dice"] >= FAILURE]),
        "thresholds": {"failure_dice_below": FAILURE, "good_dice_from": GOOD},
    }


def format_summary(summary: dict) -> str:
    show = lambda v: "n/a" if v is None else f"{v:.2f}"
    return (f"quality control: {summary['flagged']} of {summary['n']} volume(s) flagged; failures (Dice < {FAILURE}) "
            f"flagged {summary['failures_flagged']}/{summary['failures']} (recall {show(summary['recall_of_failures'])}); "
            f"good (Dice >= {GOOD}) flagged {summary['good_flagged']}/{summary['good']} "
            f"(false-flag rate {show(summary['false_flag_rate'])}); AUROC {show(summary['auroc'])}")


def plot_qc(rows: list[dict], path: Path) -> Path:
    """QC score against Dice, one point per volume, `review` in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    for verdict, colour in (("ok", "tab:green"), ("review", "tab:red")):
        mine = [r for r in rows if r["qc"] == verdict]
        ax.scatter([r["dice"] for r in mine], [r["qc_score"] for r in mine], s=18, c=colour, label=verdict)
    ax.axvline(FAILURE, color="grey", linestyle=":", linewidth=0.8)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("Dice against the reference")
    ax.set_ylabel("qc_score")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
