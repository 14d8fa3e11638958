"""PNG plots of a run: held-out Dice per phase against round, training losses, branch agreement."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from common.phases import PHASES  # noqa: E402


def plot_run(history: Sequence[Mapping], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [
        _plot_dice(history, out_dir / "dice_per_round.png"),
        _plot_train_metric(history, "loss-", "training loss", out_dir / "training_losses.png"),
        _plot_train_metric(history, "agreement-", "Dice between branches (unlabeled)", out_dir / "branch_agreement.png"),
    ]
    return [path for path in written if path is not None]


def _plot_dice(history: Sequence[Mapping], path: Path) -> Path | None:
    centers = sorted({c for entry in history for c in entry.get("centers", {})})
    if not centers:
        return None
    fig, axes = plt.subplots(1, len(centers), figsize=(4.2 * len(centers), 3.6), squeeze=False, sharey=True)
    for ax, center in zip(axes[0], centers):
        for phase in PHASES:
            points = [
                (entry["round"], entry["centers"][center][phase]["dice"])
                for entry in history
                if phase in entry.get("centers", {}).get(center, {})
            ]
            if points:
                rounds, values = zip(*points)
                ax.plot(rounds, values, marker="o", label=phase)
        ax.set_title(f"centre {center}")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Dice")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    return _save(fig, path)


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
