"""Segmentation metrics on binary masks: Dice and the 95th-percentile Hausdorff distance in mm.

Conventions (fixed here so that every report agrees):
- Arrays are in (z, y, x) order, as SimpleITK's `GetArrayFromImage` returns them; spacings handed
  in are (z, y, x) in millimetres. Any nonzero voxel counts as foreground.
- `dice`: both masks empty -> 1.0 (nothing to find, nothing found); exactly one empty -> 0.0.
- `hd95`: MONAI's definition (`compute_hausdorff_distance(percentile=95, directed=False)`): surface
  voxels are the mask minus its erosion (6-connectivity, the image edge counts as outside), each
  direction's surface-to-surface distances come from a Euclidean distance transform with physical
  sampling, and the result is the larger of the two directed 95th percentiles.
  Both empty -> 0.0. Exactly one empty -> the diagonal of the volume's physical extent
  (`sqrt(sum((shape * spacing)^2))`): the largest distance the grid can hold, finite and JSON-safe
  (MONAI returns nan/inf there, which breaks averages and JSON).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap of two masks of the same shape (nonzero = foreground)."""
    p, t = _as_bool(pred, truth)
    total = int(p.sum()) + int(t.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, t).sum()) / total


def empty_hd95(shape: Sequence[int], spacing_zyx: Sequence[float]) -> float:
    """The value `hd95` gives when exactly one mask is empty: the grid's physical diagonal in mm."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing_zyx))))


def hd95(pred: np.ndarray, truth: np.ndarray, spacing_zyx: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm between two masks (see module docstring)."""
    p, t = _as_bool(pred, truth)
    spacing = tuple(float(s) for s in spacing_zyx)
    if len(spacing) != p.ndim:
        raise ValueError(f"spacing has {len(spacing)} entries for a {p.ndim}-D mask")
    p_any, t_any = bool(p.any()), bool(t.any())
    if not p_any and not t_any:
        return 0.0
    if not p_any or not t_any:
        return empty_hd95(p.shape, spacing)
    # Distances between surface voxels only depend on voxels inside the union's bounding box; a
    # one-voxel margin keeps erosion at the crop edge identical to erosion in the full volume.
    box = _bounding_box(p | t, margin=1)
    p, t = p[box], t[box]
    p_surface, t_surface = _surface(p), _surface(t)
    d_pt = ndimage.distance_transform_edt(~t_surface, sampling=spacing)[p_surface]
    d_tp = ndimage.distance_transform_edt(~p_surface, sampling=spacing)[t_surface]
    return float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))


def _as_bool(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, t = np.asarray(pred) != 0, np.asarray(truth) != 0
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} differs from reference shape {t.shape}")
    return p, t


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


# --------------------------------------------------------------------------------------------- files
def evaluate_pair(pred_path: Path, truth_path: Path, foreground_labels: Sequence[int] | None = None) -> dict:
    """Dice and HD95 (mm) of a predicted mask file against a reference mask file (NIfTI).

    `foreground_labels`: reference label values that count as foreground (None: any nonzero value;
    ATLAS-like references with liver 1 and tumour 2 both count then). The prediction's foreground
    is any nonzero value. Raises ValueError naming the prediction when the two files' grids (size,
    spacing, origin, direction; tolerances of `common.nifti.geometry_differences`) differ: metrics
    across different grids would be meaningless. Unreadable files raise `common.nifti.ImageReadError`.
    """
    import SimpleITK as sitk

    from common.nifti import read_image

    pred_img = read_image(pred_path)
    truth_img = read_image(truth_path)
    check_same_geometry(pred_img, truth_img, Path(pred_path), Path(truth_path))
    pred = sitk.GetArrayViewFromImage(pred_img)
    truth = sitk.GetArrayViewFromImage(truth_img)
    if foreground_labels is not None:
        truth = np.isin(truth, np.asarray(list(foreground_labels)))
    spacing_zyx = tuple(reversed(truth_img.GetSpacing()))
    return {"dice": dice(pred, truth), "hd95": hd95(pred, truth, spacing_zyx)}


def check_same_geometry(pred_img, truth_img, pred_path: Path, truth_path: Path) -> None:
    """Raise ValueError (naming `pred_path`) unless both SimpleITK images share one grid."""
    from common.nifti import Geometry, geometry_differences

    diffs = geometry_differences(Geometry.of(pred_img), Geometry.of(truth_img))
    if diffs:
        raise ValueError(f"{pred_path}: grid differs from {Path(truth_path).name} (x, y, z): {'; '.join(diffs)}")


__all__ = ["dice", "hd95", "empty_hd95", "evaluate_pair", "check_same_geometry"]
