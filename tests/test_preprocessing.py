"""preprocess_image (nnunetv2 DefaultPreprocessor from in-memory plans) and the preprocessing cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from common.discovery import Case, Problem
from common.image_io import to_file_order
from common.planning import default_test_plans
from common.preprocessing import PreprocessingCache, preprocess_case_phases, preprocess_image

SPACING_XYZ = (1.5, 1.5, 5.0)


def _ball_volume(shape_zyx=(12, 40, 44), seed=0, scale=100.0):
    """Nonzero inside an ellipsoid (so nnU-Net's crop keeps some zero corners), liver label 1 and a
    'tumor' label 2 inside it."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_zyx], indexing="ij")
    body = (z**2 + y**2 + x**2) < 0.9
    image = np.where(body, rng.normal(scale, scale / 5, shape_zyx), 0).astype(np.float32)
    mask = np.zeros(shape_zyx, np.uint8)
    mask[((z - 0.1) ** 2 + (y + 0.1) ** 2 * 2 + x**2 * 2) < 0.25] = 1
    mask[((z - 0.1) ** 2 + (y + 0.1) ** 2 * 2 + x**2 * 2) < 0.02] = 2
    return image, mask


def _write(folder: Path, name: str, array: np.ndarray, spacing_xyz=SPACING_XYZ, origin=(10.0, -5.0, 2.0)) -> Path:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing_xyz)
    img.SetOrigin(origin)
    img.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
    path = folder / name
    sitk.WriteImage(img, str(path))
    return path


@pytest.fixture(scope="module")
def plans():
    return default_test_plans(patch_size=(16, 32, 32), spacing=(4.0, 3.0, 3.0))


@pytest.fixture()
def case(tmp_path) -> Case:
    image, mask = _ball_volume()
    folder = tmp_path / "data" / "0001-A-S1"
    folder.mkdir(parents=True)
    _write(folder, "GED4.nii.gz", image)
    _write(folder, "mask_GED4.nii.gz", mask)
    t1, _ = _ball_volume(seed=1, scale=3000.0)
    _write(folder, "T1.nii.gz", t1)
    return Case("0001-A-S1", "A", 1, {"GED4": folder / "GED4.nii.gz", "T1": folder / "T1.nii.gz"},
                {"GED4": folder / "mask_GED4.nii.gz"})


def test_preprocess_image_matches_nnunet_and_inverts_to_raw_grid(case, plans):
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from common.planning import DATASET_JSON

    data, seg, props = preprocess_image(case.images["GED4"], plans, case.masks["GED4"], foreground_labels=(1, 2))
    assert data.dtype == np.float32 and seg.dtype == np.int8
    assert data.shape == seg.shape and data.ndim == 4 and data.shape[0] == 1
    # resampled to the plans' spacing, from the nonzero crop
    expected = compute_new_shape(props["shape_after_cropping_and_before_resampling"], props["spacing"],
                                 plans["configurations"]["3d_fullres"]["spacing"])
    assert list(data.shape[1:]) == list(expected) == props["shape_after_resampling"]
    assert props["spacing"] == [SPACING_XYZ[2], SPACING_XYZ[1], SPACING_XYZ[0]]
    assert props["sitk_stuff"]["original_orientation"] == "LAS"  # the file's; the arrays are RAS
    # labels: 0/1 plus nnU-Net's -1 outside the nonzero region (the ellipsoid leaves zero corners)
    assert set(np.unique(seg).tolist()) == {-1, 0, 1}
    # per-image z-score over the cropped image
    assert abs(float(data.mean())) < 0.1 and 0.8 < float(data.std()) < 1.2
    json.dumps(props)  # JSON-safe

    # properties suffice to put a prediction back on the raw grid with nnU-Net's own export
    pm = PlansManager(plans)
    logits = np.stack([seg[0] != 1, seg[0] == 1]).astype(np.float32)
    back = to_file_order(convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, pm, pm.get_configuration("3d_fullres"), pm.get_label_manager(DATASET_JSON), props,
        num_threads_torch=1), props)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(case.masks["GED4"]))) > 0
    assert back.shape == truth.shape
    dice = 2 * np.logical_and(back > 0, truth).sum() / ((back > 0).sum() + truth.sum())
    assert dice > 0.85


def test_foreground_labels_select_liver(case, plans):
    _, seg_liver_only, _ = preprocess_image(case.images["GED4"], plans, case.masks["GED4"], foreground_labels=(1,))
    _, seg_both, _ = preprocess_image(case.images["GED4"], plans, case.masks["GED4"], foreground_labels=(1, 2))
    assert (seg_both == 1).sum() > (seg_liver_only == 1).sum() > 0


def test_mask_grid_mismatch_names_the_mask(tmp_path, plans):
    image, _ = _ball_volume()
    img = _write(tmp_path, "GED4.nii.gz", image)
    bad = _write(tmp_path, "mask_GED4.nii.gz", np.zeros((12, 40, 40), np.uint8))
    with pytest.raises(ValueError, match="mask_GED4.nii.gz"):
        preprocess_image(img, plans, bad)


def test_cache_reuses_and_recomputes_only_what_changed(case, plans, tmp_path):
    cache = PreprocessingCache(tmp_path / "cache", plans)
    vol = cache.get(case, "GED4", with_mask=True)
    t1 = cache.get(case, "T1", with_mask=False)
    assert cache.computed == 2
    assert vol.data_file.parent.parent.name == cache.plans_sha256[:16]
    assert t1.seg_file is None and vol.seg_file is not None and vol.seg_file.is_file()
    entry = json.loads(vol.properties_file.read_text())
    assert entry["plans_sha256"] == cache.plans_sha256 and len(entry["image_sha256"]) == 64
    assert entry["mask_sha256"] is not None

    data, seg, props = vol.load(mmap=True)
    assert isinstance(data, np.memmap) and not data.flags.writeable
    assert props["shape_after_resampling"] == list(data.shape[1:])
    assert seg is not None and seg.dtype == np.int8
    assert t1.load()[1] is None

    # unchanged: a fresh cache object on the same root reuses the files untouched
    mtimes = {p: p.stat().st_mtime_ns for p in vol.data_file.parent.iterdir()}
    again = PreprocessingCache(tmp_path / "cache", plans)
    assert again.get(case, "GED4", True) == vol and again.get(case, "T1", False) == t1
    assert again.computed == 0
    assert {p: p.stat().st_mtime_ns for p in vol.data_file.parent.iterdir()} == mtimes

    # a changed input file redoes only that volume
    image, _ = _ball_volume(seed=7)
    _write(case.images["T1"].parent, "T1.nii.gz", image)
    assert again.get(case, "GED4", True) == vol and again.computed == 0
    again.get(case, "T1", False)
    assert again.computed == 1
    assert vol.data_file.stat().st_mtime_ns == mtimes[vol.data_file]

    # changed plans: a separate folder, computed afresh
    other = PreprocessingCache(tmp_path / "cache", default_test_plans(spacing=(3.0, 3.0, 3.0)))
    moved = other.get(case, "GED4", True)
    assert other.computed == 1 and moved.data_file != vol.data_file
    assert moved.load()[0].shape != data.shape


def test_cache_never_trusts_a_half_written_entry(case, plans, tmp_path):
    cache = PreprocessingCache(tmp_path / "cache", plans)
    vol = cache.get(case, "GED4", with_mask=True)
    vol.properties_file.write_text(vol.properties_file.read_text()[:40])  # as if cut off mid-write
    cache.get(case, "GED4", with_mask=True)
    assert cache.computed == 2
    vol.seg_file.unlink()
    cache.get(case, "GED4", with_mask=True)
    assert cache.computed == 3 and vol.seg_file.is_file()
    assert not [p for p in vol.data_file.parent.iterdir() if p.name.endswith(".tmp")]


def test_preprocess_case_phases_turns_bad_files_into_problems(case, plans, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    bad = broken / "GED4.nii.gz"
    bad.write_bytes(b"not a nifti at all")
    bad_case = Case("0002-A-S1", "A", 1, {"GED4": bad}, {"GED4": case.masks["GED4"]})
    cache = PreprocessingCache(tmp_path / "cache", plans)
    volumes, problems = preprocess_case_phases(cache, [bad_case, case], ["GED4", "T1"], with_masks=True)
    assert [(v.case_id, v.phase) for v in volumes] == [("0001-A-S1", "GED4")]
    assert len(problems) == 1 and isinstance(problems[0], Problem)
    assert problems[0].path == bad and "\n" not in str(problems[0])
    volumes, problems = preprocess_case_phases(cache, [case], ["GED4", "T1"], with_masks=False)
    assert [v.phase for v in volumes] == ["GED4", "T1"] and not problems
    assert all(v.seg_file is None for v in volumes)


def test_cache_refuses_unsafe_case_ids(plans, tmp_path, case):
    evil = Case("../escape", "A", None, dict(case.images), {})
    with pytest.raises(ValueError):
        PreprocessingCache(tmp_path / "cache", plans).get(evil, "GED4", with_mask=False)
    assert not (tmp_path / "escape").exists()
