"""Dice and HD95 on shapes with known answers, empty cases, files, and nnunetv2's own Dice."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.distance import cdist

from common.metrics import dice, empty_hd95, evaluate_pair, hd95


def _cube(shape, lo, hi):
    m = np.zeros(shape, dtype=np.uint8)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = 1
    return m


def _write(array: np.ndarray, path: Path, spacing_xyz=(0.8, 0.9, 2.5), origin=(10.0, -5.0, 3.0),
           direction=(0, 1, 0, -1, 0, 0, 0, 0, 1)) -> Path:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing_xyz)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    sitk.WriteImage(img, str(path))
    return path


def _brute_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """Reference: MONAI's definition written out with all pairwise surface distances."""
    from scipy import ndimage

    def surface(m):
        m = m.astype(bool)
        return m & ~ndimage.binary_erosion(m, ndimage.generate_binary_structure(3, 1), border_value=0)

    pa = np.argwhere(surface(a)) * np.asarray(spacing)
    pb = np.argwhere(surface(b)) * np.asarray(spacing)
    d = cdist(pa, pb)
    return max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))


def test_dice_known_values():
    a = _cube((10, 10, 10), (0, 0, 0), (4, 4, 4))    # 64 voxels
    b = _cube((10, 10, 10), (2, 0, 0), (6, 4, 4))    # 64 voxels, 32 shared
    assert dice(a, a) == 1.0
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, np.zeros_like(a)) == 0.0
    assert dice(np.zeros_like(a), a) == 0.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0


def test_dice_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)))


@pytest.mark.parametrize("axis,k", [(0, 1), (0, 3), (1, 2), (2, 4)])
def test_hd95_offset_cubes_anisotropic(axis, k):
    spacing = (2.5, 0.8, 1.2)  # (z, y, x) mm
    shape = (24, 30, 30)
    lo = [4, 6, 6]
    hi = [14, 20, 20]
    a = _cube(shape, lo, hi)
    lo_b, hi_b = list(lo), list(hi)
    lo_b[axis] += k
    hi_b[axis] += k
    b = _cube(shape, lo_b, hi_b)
    assert hd95(a, b, spacing) == pytest.approx(k * spacing[axis], rel=1e-6)
    assert hd95(b, a, spacing) == pytest.approx(k * spacing[axis], rel=1e-6)
    assert hd95(a, a, spacing) == 0.0


def test_hd95_matches_brute_force_on_irregular_shapes():
    rng = np.random.default_rng(0)
    spacing = (3.0, 1.0, 0.7)
    z, y, x = np.mgrid[:12, :20, :22]
    a = ((z - 5) ** 2 / 16 + (y - 9) ** 2 / 36 + (x - 10) ** 2 / 49) < 1
    b = ((z - 6) ** 2 / 20 + (y - 11) ** 2 / 25 + (x - 12) ** 2 / 64) < 1
    b |= rng.random(b.shape) > 0.995  # a few stray voxels far away
    a[0, 0, 0] = True                 # a voxel on the image edge: edge counts as outside
    assert hd95(a, b, spacing) == pytest.approx(_brute_hd95(a, b, spacing), rel=1e-9)


def test_hd95_empty_cases():
    spacing = (2.0, 1.0, 0.5)
    shape = (8, 10, 12)
    full = _cube(shape, (2, 2, 2), (5, 5, 5))
    empty = np.zeros(shape, dtype=np.uint8)
    assert hd95(empty, empty, spacing) == 0.0
    diagonal = math.sqrt(16**2 + 10**2 + 6**2)
    assert empty_hd95(shape, spacing) == pytest.approx(diagonal)
    assert hd95(full, empty, spacing) == pytest.approx(diagonal)
    assert hd95(empty, full, spacing) == pytest.approx(diagonal)


def test_evaluate_pair_files_and_nnunet_dice(tmp_path):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    shape = (9, 21, 17)  # (z, y, x), odd sizes
    truth = _cube(shape, (2, 3, 4), (7, 15, 12))
    pred = _cube(shape, (3, 3, 4), (8, 13, 12))
    pred[0, 0, :3] = 1
    t = _write(truth, tmp_path / "truth.nii.gz")
    p = _write(pred, tmp_path / "pred.nii.gz")
    result = evaluate_pair(p, t)
    ref = compute_metrics(str(t), str(p), image_reader_writer=SimpleITKIO(), labels_or_regions=[1],
                          ignore_label=None)
    assert result["dice"] == pytest.approx(float(ref["metrics"][1]["Dice"]), rel=1e-12)
    assert result["dice"] == pytest.approx(dice(pred, truth))
    # the files' spacing is (x, y, z) = (0.8, 0.9, 2.5): hd95 must use it in (z, y, x) order
    assert result["hd95"] == pytest.approx(hd95(pred, truth, (2.5, 0.9, 0.8)))
    assert result["hd95"] != pytest.approx(hd95(pred, truth, (0.8, 0.9, 2.5)))


def test_evaluate_pair_foreground_labels(tmp_path):
    shape = (6, 8, 8)
    truth = _cube(shape, (1, 1, 1), (5, 7, 7)).astype(np.uint8)
    truth[2:4, 2:4, 2:4] = 2  # "tumour" inside the liver
    pred = (truth > 0).astype(np.uint8)
    t = _write(truth, tmp_path / "t.nii.gz")
    p = _write(pred, tmp_path / "p.nii.gz")
    assert evaluate_pair(p, t)["dice"] == 1.0
    assert evaluate_pair(p, t, foreground_labels=[1])["dice"] < 1.0


@pytest.mark.parametrize("change,word", [
    (dict(spacing_xyz=(0.8, 0.9, 3.0)), "spacing"),
    (dict(origin=(10.0, -5.0, 4.0)), "origin"),
    (dict(direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)), "direction"),
])
def test_evaluate_pair_refuses_other_geometry(tmp_path, change, word):
    m = _cube((5, 6, 7), (1, 1, 1), (4, 4, 4))
    t = _write(m, tmp_path / "t.nii.gz")
    p = _write(m, tmp_path / "p.nii.gz", **change)
    with pytest.raises(ValueError, match=word) as err:
        evaluate_pair(p, t)
    assert "p.nii.gz" in str(err.value)


def test_evaluate_pair_refuses_other_size(tmp_path):
    t = _write(np.zeros((5, 6, 7), np.uint8), tmp_path / "t.nii.gz")
    p = _write(np.zeros((5, 6, 8), np.uint8), tmp_path / "p.nii.gz")
    with pytest.raises(ValueError, match="size"):
        evaluate_pair(p, t)
