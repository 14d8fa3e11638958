"""Quality control of each predicted liver: which results a radiologist should look at.

`fedliver predict` measures every volume it segments (`measure`), then, once every phase of a case
is done, compares the phases' volumes (one examination has one liver) and gives each volume a
verdict (`QCRules.verdict`). The terms:

- the mask on the raw grid: liver volume (mL), voxels, and its centroid relative to the body's
  bounding box in patient coordinates (LPS: 0 = the body's right / anterior / inferior edge);
- the branches on the network grid (before postprocessing): Dice between branch a's and branch b's
  masks (the CPS pair's disagreement), the mean binary entropy of their mean inside the liver, and
  how fragmented the mask is (connected components, the largest one's share);
- across the case's phases: each phase's volume relative to the case's median.

Each rule maps its term to a score in [0, 1] that is 0.5 at its threshold (linear over a width on
either side); `qc_score` is the lowest of them, and a volume is `review` when any rule falls below
its threshold. The thresholds and how they were chosen: docs/results/quality_control.md.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from common.atomic_write import atomic_path

OK, REVIEW = "ok", "review"


@dataclass
class VolumeQC:
    """One predicted volume's measurements and, once `QCRules.verdict` ran, its verdict."""

    case: str
    phase: str
    file: str                       # the segmented image
    prediction: str                 # the written mask
    volume_ml: float
    voxels: int
    components: int                 # of the network-grid mask, before postprocessing
    largest_share: float            # the largest component's share of it
    agreement: float                # Dice(branch a, branch b); nan with one branch
    entropy: float                  # mean binary entropy (bits) of the mean probability inside the liver
    centroid_left: float            # 0 = the body's right edge, 1 = its left (the liver lies right: < 0.5)
    centroid_posterior: float       # 0 = anterior, 1 = posterior
    centroid_superior: float        # 0 = inferior, 1 = superior (of the scanned body)
    phase_volume_deviation: float = float("nan")  # volume / the case's median over phases - 1
    qc_score: float = float("nan")
    qc: str = ""
    qc_reasons: str = ""

    def row(self) -> dict[str, object]:
        """The CSV row: floats to 4 decimals, nan as an empty cell."""
        return {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else ("" if isinstance(v, float) else v))
                for k, v in asdict(self).items()}

    @classmethod
    def from_row(cls, row: dict[str, str]) -> VolumeQC:
        """A `row()` read back from predictions.csv (an empty cell is nan)."""
        parse = {"str": str, "int": int, "float": lambda t: float(t) if t != "" else float("nan")}
        return cls(**{f.name: parse[f.type](row[f.name]) for f in fields(cls)})


#: The columns of OUT/predictions.csv, in order (VolumeQC's fields); other tools rely on the last three.
COLUMNS = tuple(f.name for f in fields(VolumeQC))


def _ramp(margin: float, width: float) -> float:
    """0.5 at the threshold (margin 0), 1 at `width` beyond it on the good side, 0 on the bad."""
    return min(1.0, max(0.0, 0.5 + margin / (2.0 * width)))


@dataclass(frozen=True)
class QCRules:
    """Thresholds of the verdict (chosen on development data: docs/results/quality_control.md)."""

    # Each above (or below) the 99th (1st) percentile of the development volumes with Dice >= 0.7:
    # agreement 1st 0.65, entropy 99th 0.51, volume 99th 2.4 L, centroid 99th 0.38, share 1st 0.95.
    min_agreement: float = 0.7
    max_entropy: float = 0.5           # bits
    min_volume_ml: float = 600.0
    max_volume_ml: float = 3000.0
    max_centroid_left: float = 0.42
    min_largest_share: float = 0.9
    max_phase_deviation: float = 0.35

    def scores(self, v: VolumeQC) -> list[tuple[float, str]]:
        """(score, reason) of every rule that applies to `v`."""
        if v.voxels == 0:
            return [(0.0, "no liver found")]
        out = [(_ramp(math.log(v.volume_ml / self.min_volume_ml), math.log(1.5)),
                f"volume {v.volume_ml:.0f} mL below {self.min_volume_ml:.0f} mL"),
               (_ramp(math.log(self.max_volume_ml / v.volume_ml), math.log(1.5)),
                f"volume {v.volume_ml:.0f} mL above {self.max_volume_ml:.0f} mL")]
        if math.isfinite(v.largest_share):
            out.append((_ramp(v.largest_share - self.min_largest_share, 0.1),
                        f"fragmented (largest component {100 * v.largest_share:.0f}%)"))
        if math.isfinite(v.agreement):
            out.append((_ramp(v.agreement - self.min_agreement, 0.2), f"branches disagree ({v.agreement:.2f})"))
        if math.isfinite(v.entropy):
            out.append((_ramp(self.max_entropy - v.entropy, 0.1), f"uncertain (entropy {v.entropy:.2f})"))
        if math.isfinite(v.centroid_left):
            out.append((_ramp(self.max_centroid_left - v.centroid_left, 0.15),
                        f"liver centroid on the patient's left ({v.centroid_left:.2f})"))
        if math.isfinite(v.phase_volume_deviation):
            out.append((_ramp(self.max_phase_deviation - abs(v.phase_volume_deviation), 0.25),
                        f"volume {100 * v.phase_volume_deviation:+.0f}% against the case's other phases"))
        return out

    def verdict(self, v: VolumeQC) -> VolumeQC:
        scores = self.scores(v)
        v.qc_score = min(s for s, _ in scores)
        failing = [reason for s, reason in sorted(scores) if s < 0.5]
        v.qc, v.qc_reasons = (REVIEW if failing else OK), "; ".join(failing)
        return v


# --------------------------------------------------------------------------------------------- terms
def body_box(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) voxel indices (z, y, x) of the body: voxels above 15% of the 99th intensity
    percentile, their 1st and 99th percentile per axis (stray background voxels do not widen it)."""
    finite = np.nan_to_num(image.astype(np.float32), nan=0.0)
    body = finite > 0.15 * np.percentile(finite, 99)
    if not body.any():
        return np.zeros(3), np.array(image.shape, float) - 1
    coords = np.argwhere(body[::2, ::2, ::2]) * 2  # every 8th voxel: plenty for percentiles
    return np.percentile(coords, 1, axis=0), np.percentile(coords, 99, axis=0)


def _physical(image, index_zyx: np.ndarray) -> np.ndarray:
    """Patient (LPS) coordinates in mm of a continuous (z, y, x) index of `image` (a SimpleITK.Image)."""
    return np.array(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in index_zyx[::-1]]))


def relative_centroid(mask: np.ndarray, image_array: np.ndarray, image) -> tuple[float, float, float]:
    """The mask's centroid relative to the body's box, per patient axis (left, posterior, superior)."""
    if not mask.any():
        return float("nan"), float("nan"), float("nan")
    low, high = body_box(image_array)
    corners = np.array([_physical(image, np.array([z, y, x])) for z in (low[0], high[0])
                        for y in (low[1], high[1]) for x in (low[2], high[2])])
    centroid = _physical(image, np.argwhere(mask).mean(axis=0))
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    rel = (centroid - lo) / np.maximum(hi - lo, 1e-6)
    return tuple(float(v) for v in rel)  # type: ignore[return-value]


def branch_terms(mean: np.ndarray, first: np.ndarray | None) -> dict[str, float | int]:
    """Agreement, entropy and fragmentation from the network-grid probabilities."""
    from scipy import ndimage

    liver = mean > 0.5
    labels, count = ndimage.label(liver)
    largest = float(np.bincount(labels.ravel())[1:].max() / liver.sum()) if count else 0.0
    p = np.clip(mean[liver].astype(np.float64), 1e-6, 1 - 1e-6)
    entropy = float(np.mean(-(p * np.log2(p) + (1 - p) * np.log2(1 - p)))) if p.size else float("nan")
    agreement = float("nan")
    if first is not None:
        a, b = first > 0.5, (2.0 * mean - first) > 0.5
        total = int(a.sum() + b.sum())
        agreement = 2.0 * float(np.logical_and(a, b).sum()) / total if total else 1.0
    return {"components": int(count), "largest_share": largest, "entropy": entropy, "agreement": agreement}


def measure(case: str, phase: str, image_path: Path, prediction_path: Path, mask_image, probabilities) -> VolumeQC:
    """The per-volume terms of one prediction: `mask_image` the written mask (SimpleITK), and the
    `common.inference.BranchProbabilities` behind it (None: only the mask's terms)."""
    import SimpleITK as sitk

    mask = sitk.GetArrayFromImage(mask_image) > 0
    image = sitk.ReadImage(str(image_path))
    voxel_ml = float(np.prod(mask_image.GetSpacing())) / 1000.0
    left, posterior, superior = relative_centroid(mask, sitk.GetArrayFromImage(image), image)
    terms = branch_terms(probabilities.mean, probabilities.first) if probabilities is not None else {
        "components": 0, "largest_share": float("nan"), "entropy": float("nan"), "agreement": float("nan")}
    return VolumeQC(case=case, phase=phase, file=str(image_path), prediction=str(prediction_path),
                    volume_ml=float(mask.sum()) * voxel_ml, voxels=int(mask.sum()), centroid_left=left,
                    centroid_posterior=posterior, centroid_superior=superior, **terms)


def with_phase_deviations(volumes: Sequence[VolumeQC]) -> list[VolumeQC]:
    """Each volume's deviation from its case's median volume over phases (cases with one phase: nan)."""
    by_case: dict[str, list[VolumeQC]] = {}
    for v in volumes:
        by_case.setdefault(v.case, []).append(v)
    for members in by_case.values():
        median = statistics.median(m.volume_ml for m in members)
        for m in members:
            m.phase_volume_deviation = (m.volume_ml / median - 1.0) if len(members) > 1 and median > 0 else float("nan")
    return list(volumes)


@dataclass
class QCReport:
    volumes: list[VolumeQC]
    rules: QCRules = field(default_factory=QCRules)

    @classmethod
    def judge(cls, volumes: Iterable[VolumeQC], rules: QCRules | None = None) -> QCReport:
        rules = rules or QCRules()
        return cls([rules.verdict(v) for v in with_phase_deviations(list(volumes))], rules)

    @property
    def review(self) -> list[VolumeQC]:
        return [v for v in self.volumes if v.qc == REVIEW]

    def write(self, folder: Path) -> tuple[Path, Path]:
        """OUT/predictions.csv and OUT/predictions.json (the rules with the rows)."""
        rows = [v.row() for v in self.volumes]
        csv_path, json_path = folder / "predictions.csv", folder / "predictions.json"
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(csv_path, suffix=".csv") as tmp, Path(tmp).open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
            writer.writeheader()
            writer.writerows(rows)
        with atomic_path(json_path, suffix=".json") as tmp:
            Path(tmp).write_text(json.dumps({"rules": asdict(self.rules), "volumes": rows}, indent=1) + "\n",
                                 encoding="utf-8")
        return csv_path, json_path


def read_predictions(folder: Path) -> dict[tuple[str, str], dict[str, str]]:
    """{(case, phase): row} of `folder`/predictions.csv ({} when there is none)."""
    path = Path(folder) / "predictions.csv"
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8") as f:
        return {(r["case"], r["phase"]): r for r in csv.DictReader(f)}
