"""Cross-phase label propagation: the GED4 mask on another phase's grid, through scanner coordinates."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from client.label_propagation import propagate_mask
from client.site import SiteData, SiteIdentity
from common.metrics import dice
from common.planning import default_test_plans


def _sphere_image(size_xyz, spacing, origin, direction, center_mm, radius_mm, value=1) -> sitk.Image:
    image = sitk.Image([int(s) for s in size_xyz], sitk.sitkUInt8)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in size_xyz], indexing="ij"), -1).reshape(-1, 3).astype(float)
    d = np.asarray(direction).reshape(3, 3)
    world = np.asarray(origin) + (idx * np.asarray(spacing)) @ d.T
    inside = (np.linalg.norm(world - np.asarray(center_mm), axis=1) < radius_mm).reshape(size_xyz)
    array = sitk.GetArrayFromImage(image)
    array[...] = np.transpose(inside, (2, 1, 0)) * value  # (x, y, z) -> SimpleITK's (z, y, x)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


def test_mask_lands_where_it_is_in_the_scanner(tmp_path):
    """A sphere mask on one grid, an image on another (other spacing, origin, axes swapped and
    flipped): the propagated mask is the same sphere on the image's grid."""
    center, radius = (10.0, -5.0, 20.0), 25.0
    mask = _sphere_image((48, 40, 20), (2.0, 2.0, 5.0), (-40.0, -45.0, -20.0), (1, 0, 0, 0, 1, 0, 0, 0, 1),
                         center, radius, value=2)  # liver coded 2 (as ATLAS' tumour): foreground_labels say so
    swapped = (0, -1, 0, 1, 0, 0, 0, 0, 1)  # columns: index axes' directions
    target = _sphere_image((36, 44, 30), (2.5, 2.2, 3.0), (45.0, -50.0, -25.0), swapped, center, radius)
    sitk.WriteImage(mask, str(tmp_path / "mask_GED4.nii.gz"))
    sitk.WriteImage(sitk.Cast(target, sitk.sitkFloat32) * 100.0, str(tmp_path / "T1.nii.gz"))

    out = propagate_mask(tmp_path / "mask_GED4.nii.gz", tmp_path / "T1.nii.gz", tmp_path / "out" / "mask_T1.nii.gz",
                         foreground_labels=(2,))
    result = sitk.ReadImage(str(out))
    assert result.GetSize() == target.GetSize() and result.GetSpacing() == pytest.approx(target.GetSpacing())
    assert result.GetDirection() == pytest.approx(target.GetDirection())
    assert result.GetOrigin() == pytest.approx(target.GetOrigin())
    got, want = sitk.GetArrayFromImage(result), sitk.GetArrayFromImage(target)
    assert set(np.unique(got)) == {0, 1}
    assert dice(got > 0, want > 0) > 0.9

    # Kept while newer than its inputs; remade when the mask changes.
    before = out.stat().st_mtime_ns
    assert propagate_mask(tmp_path / "mask_GED4.nii.gz", tmp_path / "T1.nii.gz", out, (2,)).stat().st_mtime_ns == before
    future = out.stat().st_mtime + 10
    os.utime(tmp_path / "mask_GED4.nii.gz", (future, future))
    assert propagate_mask(tmp_path / "mask_GED4.nii.gz", tmp_path / "T1.nii.gz", out, (2,)).stat().st_mtime_ns != before


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from simulations.phantoms import PhantomConfig, generate_liqa_tree

    root = tmp_path_factory.mktemp("propagation")
    generate_liqa_tree(root / "data", PhantomConfig(centers=("A",), heldout=(), cases=2, labeled=1, seed=3,
                                                    test_cases=1, validation_cases=1, missing_rate=0.0))
    identity = SiteIdentity("A", "train", root / "data", root / "cache", root / "out", centers=("A",))
    return SiteData(identity, unlabeled_phases=("T1", "T2"))


def test_site_trains_on_propagated_phases_of_training_cases_only(site):
    plans = default_test_plans((16, 32, 32))
    plain = site.training_volumes(plans)
    volumes = site.training_volumes(plans, propagate_labels=True)
    train_ids = {c.case_id for c in site.cases_in("train")}
    labeled_case = next(c.case_id for c in site.cases_in("train") if c.masks)

    assert sorted((v.case_id, v.phase) for v in plain.labeled) == [(labeled_case, "GED4")]
    assert sorted((v.case_id, v.phase) for v in volumes.labeled) == \
        [(labeled_case, "GED4"), (labeled_case, "T1"), (labeled_case, "T2")]
    assert all(v.seg_file is not None for v in volumes.labeled)
    # The propagated phases are labeled now, not also unlabeled (one cache entry each).
    assert {(v.case_id, v.phase) for v in volumes.unlabeled} == \
        {(v.case_id, v.phase) for v in plain.unlabeled} - {(labeled_case, "T1"), (labeled_case, "T2")}
    # Validation and test cases never train, propagated or not.
    assert {v.case_id for v in volumes.labeled + volumes.unlabeled} <= train_ids
    # The propagated label covers the liver on T1's own grid: foreground present, on T1's shape.
    t1 = next(v for v in volumes.labeled if v.phase == "T1")
    data, seg, _ = t1.load()
    assert seg.shape == data.shape and (seg == 1).sum() > 100
    assert not volumes.problems
