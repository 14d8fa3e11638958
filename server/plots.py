"""PNG plots of a run: test Dice per phase against round (mean ± sd, n), training losses, branch agreement."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from common.phases import LABELED_PHASE, PHASES  # noqa: E402
from server.report import selection_phases, selection_score  # noqa: E402


def plot_run(history: Sequence[Mapping], out_dir: Path, heldout: Sequence[str] = (),
             labeled_phases: Sequence[str] = ()) -> list[Path]:
    """`labeled_phases`: the training sites' labeled phases, whose pooled validation Dice selects the best model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [
        _plot_dice(history, heldout, out_dir / "dice_per_round.png", labeled_phases),
        _plot_train_metric(history, "loss-", "training loss", out_dir / "training_losses.png"),
        _plot_train_metric(history, "agreement-", "Dice between branches (unlabeled)", out_dir / "branch_agreement.png"),
    ]
    return [path for path in written if path is not None]


def _plot_dice(history: Sequence[Mapping], heldout: Sequence[str], path: Path,
               labeled_phases: Sequence[str] = ()) -> Path | None:
    """One panel per group of test cases: the training sites' test splits pooled (with the pooled
    validation Dice on the labeled phases that selects the best model, dashed), each training
    site, each held-out centre."""
    centers = sorted({c for entry in history for c in entry.get("centers", {})},
                     key=lambda c: (c in heldout, c))
    validation = [(e["round"], s.to_json()) for e in history if (s := selection_score(e, labeled_phases)) is not None]
    chosen = next((selection_phases(e, labeled_phases) for e in reversed(history)
                   if selection_score(e, labeled_phases) is not None), [LABELED_PHASE])
    panels: list[tuple[str, list[tuple[int, Mapping]], list[tuple[int, Mapping]]]] = []
    pooled = [(e["round"], e["in_distribution"]) for e in history if e.get("in_distribution")]
    if pooled or validation:
        panels.append(("in-distribution test (pooled)", pooled, validation))
    for center in centers:
        title = f"centre {center} ({'held out' if center in heldout else 'test split'})"
        panels.append((title, [(e["round"], e["centers"][center]) for e in history if center in e.get("centers", {})], []))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False, sharey=True)
    for ax, (title, points, selection) in zip(axes[0], panels):
        for phase in PHASES:
            _errorbar(ax, [(r, scores[phase]) for r, scores in points if phase in scores], phase)
        _errorbar(ax, selection, f"validation {'+'.join(chosen)}", linestyle="--", color="black")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("Dice (mean ± sd over cases)")
    return _save(fig, path)


def _errorbar(ax: plt.Axes, points: Sequence[tuple[int, Mapping]], label: str, **style) -> None:
    """Mean Dice per round with ± sd bars; the legend names the number of cases (last round's)."""
    if not points:
        return
    rounds = [r for r, _ in points]
    means = [s["dice"] for _, s in points]
    sds = [s.get("dice_sd") or 0.0 for _, s in points]
    label = f"{label} (n={points[-1][1]['cases']})"
    ax.errorbar(rounds, means, yerr=sds, marker="o", markersize=4, capsize=2, label=label, **style)


def _plot_train_metric(history: Sequence[Mapping], prefix: str, title: str, path: Path) -> Path | None:
    series: dict[str, list[tuple[int, float]]] = {}
    for entry in history:
        for site, metrics in entry.get("train", {}).items():
            for key, value in metrics.items():
                if key.startswith(prefix):
                    series.setdefault(f"{site} {key[len(prefix):]}", []).append((entry["round"], value))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, points in sorted(series.items()):
        rounds, values = zip(*points)
        ax.plot(rounds, values, marker=".", label=label)
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
