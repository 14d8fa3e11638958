"""One orientation for every site: nnU-Net's reorienting reader, named by the plans, and the way back.

Centre C stores its slices transposed and flipped (PLI); the others store RAS or LPS. The same
anatomy stored any of these ways must give the net the same arrays, and predictions must land back
on each file's own grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from common.image_io import DEFAULT_READER, image_reader, reader_name, to_file_order
from common.inference import predict_image
from common.planning import default_test_plans
from common.preprocessing import preprocess_image
from common.stunet import build_stunet_from_plans

STORAGE = ("RAS", "LPS", "PLI", "AIR")  # B1/B2 and ATLAS, A, C, and one more permutation


def _anatomy() -> sitk.Image:
    """An asymmetric body (no flip or transpose maps it onto itself) with a liver, stored RAS."""
    z, y, x = np.meshgrid(np.linspace(-1, 1, 10), np.linspace(-1, 1, 28), np.linspace(-1, 1, 34), indexing="ij")
    body = (x / 0.95) ** 2 + (y / 0.8) ** 2 < 1
    liver = ((x + 0.35) / 0.45) ** 2 + ((y - 0.1) / 0.3) ** 2 + (z / 0.8) ** 2 < 1
    array = np.where(body, 100.0 + 40 * x + 20 * y, 0) + 200.0 * liver
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing((1.4, 1.2, 4.0))
    image.SetOrigin((-20.0, 15.0, 3.0))
    image.SetDirection(np.diag([-1.0, -1.0, 1.0]).ravel().tolist())  # RAS in ITK's convention
    return image


def _stored(tmp_path: Path, orientation: str) -> Path:
    path = tmp_path / f"GED4_{orientation}.nii.gz"
    sitk.WriteImage(sitk.DICOMOrient(_anatomy(), orientation), str(path))
    return path


def _in_ras(path_or_image) -> np.ndarray:
    image = sitk.ReadImage(str(path_or_image)) if isinstance(path_or_image, Path) else path_or_image
    return sitk.GetArrayFromImage(sitk.DICOMOrient(image, "RAS"))


@pytest.fixture(scope="module")
def plans() -> dict:
    return default_test_plans(patch_size=(8, 16, 16), spacing=(4.0, 1.5, 1.5))


def test_plans_name_the_reorienting_reader(plans):
    assert plans["image_reader_writer"] == DEFAULT_READER == "SimpleITKIOWithReorient"
    assert reader_name({}) == "SimpleITKIO"  # plans that say nothing keep nnU-Net's default
    with pytest.raises(ValueError, match="image_reader_writer 'NibabelIO' is not supported"):
        reader_name({"image_reader_writer": "NibabelIO"})


def test_every_storage_order_gives_the_net_the_same_arrays(tmp_path, plans):
    stored = {o: _stored(tmp_path, o) for o in STORAGE}
    files = {o: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for o, p in stored.items()}
    assert files["PLI"].shape != files["RAS"].shape  # C's files really are transposed
    reference, _, _ = preprocess_image(stored["RAS"], plans)
    for orientation, path in stored.items():
        data, _, props = preprocess_image(path, plans)
        assert props["sitk_stuff"]["original_orientation"] == orientation
        np.testing.assert_array_equal(data, reference, err_msg=orientation)
    # nnU-Net's plain reader keeps the stored order: the difference this module exists for
    plain = dict(plans, image_reader_writer="SimpleITKIO")
    assert preprocess_image(stored["PLI"], plain)[0].shape != reference.shape


def test_to_file_order_inverts_the_reader(tmp_path):
    for orientation in STORAGE:
        path = _stored(tmp_path, orientation)
        data, props = image_reader().read_images([str(path)])
        back = to_file_order(data[0], props)
        np.testing.assert_array_equal(back, sitk.GetArrayFromImage(sitk.ReadImage(str(path))))
    data, props = image_reader("SimpleITKIO").read_images([str(path)])
    stored_order = data[0]
    assert to_file_order(stored_order, props) is stored_order  # nothing to undo


def test_predictions_land_on_each_files_own_grid(tmp_path, plans):
    torch.manual_seed(0)
    net = build_stunet_from_plans(plans, deep_supervision=False).eval()
    predictions = {}
    for orientation in STORAGE:
        path = _stored(tmp_path, orientation)
        out = predict_image([net], path, plans)
        ref = sitk.ReadImage(str(path))
        assert (out.GetSize(), out.GetDirection(), out.GetOrigin()) == (ref.GetSize(), ref.GetDirection(), ref.GetOrigin())
        predictions[orientation] = _in_ras(out)
    assert 0 < predictions["RAS"].mean() < 1  # a random net: some voxels of each class
    for orientation, prediction in predictions.items():  # the same voxels, however the file is stored
        np.testing.assert_array_equal(prediction, predictions["RAS"], err_msg=orientation)
