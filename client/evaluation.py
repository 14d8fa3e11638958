"""Evaluation of a model at the site, per phase, on the raw grid of each volume.

Only aggregate numbers leave the site (per phase: cases, sums and sums of squares of Dice and
HD95, see `common.scores`); the qualitative figure is written to the site's own output folder and
never crosses the network.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from common.discovery import Case, Problem
from common.inference import predict_image, predict_preprocessed
from common.metrics import dice, hd95
from common.postprocessing import NO_POSTPROCESSING, Postprocessing
from common.preprocessing import PreprocessingCache
from common.scores import PhaseSummary, to_metrics

QUALITATIVE_PHASES = ("GED4", "T1", "T2", "DWI_800")


@dataclass
class PhaseScores:
    dice: list[float] = field(default_factory=list)
    hd95: list[float] = field(default_factory=list)


@dataclass
class SiteEvaluation:
    per_phase: dict[str, PhaseScores]
    problems: list[Problem]
    examples: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # phase -> (image, pred, truth) mid slices

    def summaries(self) -> dict[str, PhaseSummary]:
        return {phase: PhaseSummary.of(scores.dice, scores.hd95) for phase, scores in self.per_phase.items()}

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat numeric metrics for a Flower MetricRecord: per phase means, sums, sums of squares and
        case counts of Dice and HD95, keys starting with `prefix` (`common.scores`)."""
        return to_metrics(self.summaries(), prefix)


def evaluate_pairs(
    nets: Sequence[torch.nn.Module],
    plans: dict,
    pairs: Sequence[tuple[Case, str]],
    *,
    step: float = 0.5,
    postprocessing: Postprocessing = NO_POSTPROCESSING,
    log: Callable[[str], None] = print,
    device: torch.device | str | None = None,
    cache: PreprocessingCache | None = None,
) -> SiteEvaluation:
    """Predict every (case, phase) with a mask (then `postprocessing` for that phase) and score it against that mask.

    device: where the nets run (moved there first; None: where they are). The sliding window runs
    on the nets' device and brings the probabilities back to the CPU for resampling and scoring.
    cache: the site's preprocessed volumes (made with `plans`): each volume is predicted from its
    entry (preprocessed once, the first time) instead of from the raw file; scores are on the raw
    grid either way.
    """
    if device is not None:
        nets = [net.to(device) for net in nets]
    per_phase: dict[str, PhaseScores] = defaultdict(PhaseScores)
    problems: list[Problem] = []
    examples: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for case, phase in pairs:
        image_path, mask_path = case.images[phase], case.masks[phase]
        try:
            method = postprocessing.for_phase(phase)
            if cache is None:
                prediction = sitk.GetArrayFromImage(predict_image(nets, image_path, plans, step=step,
                                                                  postprocessing=method)) > 0
            else:
                data, _, properties = cache.get(case, phase, with_mask=False).load(mmap=False)
                prediction = predict_preprocessed(nets, data, properties, plans, step=step, postprocessing=method) > 0
            mask_image = sitk.ReadImage(str(mask_path))
            truth = np.isin(sitk.GetArrayFromImage(mask_image), case.foreground_labels)
        except Exception as error:  # one bad volume must not stop the evaluation
            problems.append(Problem(Path(image_path), f"evaluation failed: {' '.join(str(error).split())}"))
            log(str(problems[-1]))
            continue
        if prediction.shape != truth.shape:
            problems.append(Problem(Path(mask_path), f"mask shape {truth.shape} differs from prediction {prediction.shape}"))
            continue
        spacing_zyx = tuple(reversed(mask_image.GetSpacing()))
        per_phase[phase].dice.append(dice(prediction, truth))
        per_phase[phase].hd95.append(hd95(prediction, truth, spacing_zyx))
        if phase in QUALITATIVE_PHASES and phase not in examples:
            examples[phase] = _mid_slice(image_path, prediction, truth)
    return SiteEvaluation(dict(per_phase), problems, examples)


def _mid_slice(image_path: Path, prediction: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(image_path)))
    z = int(np.argmax(truth.sum(axis=(1, 2)))) if truth.any() else truth.shape[0] // 2
    return image[z], prediction[z], truth[z]


def write_qualitative_png(evaluation: SiteEvaluation, path: Path, title: str) -> Path | None:
    """Mid slices of GED4, T1, T2, DWI_800 with prediction (red) and truth (green) contours."""
    phases = [p for p in QUALITATIVE_PHASES if p in evaluation.examples]
    if not phases:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(phases), figsize=(3.2 * len(phases), 3.4), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        image, prediction, truth = evaluation.examples[phase]
        ax.imshow(image, cmap="gray")
        if truth.any():
            ax.contour(truth.astype(float), levels=[0.5], colors="lime", linewidths=1.0)
        if prediction.any():
            ax.contour(prediction.astype(float), levels=[0.5], colors="red", linewidths=1.0)
        scores = evaluation.per_phase[phase]
        ax.set_title(f"{phase}  Dice {np.mean(scores.dice):.3f}", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{title} (green: truth, red: prediction)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
