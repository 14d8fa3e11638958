"""Largest-component postprocessing: the mask helper, and predict_image applying it on real NIfTI files."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from common.inference import predict_image
from common.planning import default_test_plans
from common.postprocessing import postprocess_mask
from test_inference import ThresholdNet, _phantom, _write  # pytest puts tests/ on sys.path


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Independent reference: scipy's labelling with full (26-) connectivity."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if count == 0:
        return np.zeros_like(mask, dtype=np.uint8)
    sizes = np.bincount(labels.ravel())[1:]
    return (labels == 1 + int(np.argmax(sizes))).astype(np.uint8)


def test_largest_component_keeps_only_the_biggest_blob():
    mask = np.zeros((12, 20, 20), dtype=np.uint8)
    mask[2:8, 2:10, 2:10] = 1      # liver: 384 voxels
    mask[3:5, 14:17, 14:17] = 1    # spleen-like false positive: 18 voxels
    mask[10, 18, 18] = 2           # any nonzero value counts as liver
    out = postprocess_mask(mask, "largest-component")
    assert out.dtype == np.uint8 and int(out.sum()) == 384 and out[2:8, 2:10, 2:10].all()
    np.testing.assert_array_equal(postprocess_mask(mask, "none"), (mask > 0).astype(np.uint8))
    assert not postprocess_mask(np.zeros((4, 4, 4)), "largest-component").any()
    with pytest.raises(ValueError, match="postprocessing"):
        postprocess_mask(mask, "fill-holes")


def test_predict_image_applies_postprocessing_on_raw_grid(tmp_path):
    plans = default_test_plans(patch_size=(16, 16, 16), spacing=(1.0, 1.0, 1.0))
    raw = _phantom()  # a liver block plus scattered bright voxels
    path = _write(raw, tmp_path / "GED4.nii.gz")
    raw_seg = (raw == 100).astype(np.uint8)
    assert ndimage.label(raw_seg, structure=np.ones((3, 3, 3)))[1] > 1  # several components to remove

    kept = sitk.GetArrayFromImage(predict_image([ThresholdNet()], path, plans, postprocessing="largest-component"))
    np.testing.assert_array_equal(kept, _largest_component(raw_seg))
    plain = sitk.GetArrayFromImage(predict_image([ThresholdNet()], path, plans))
    np.testing.assert_array_equal(plain, raw_seg)
    with pytest.raises(ValueError, match="postprocessing"):
        predict_image([ThresholdNet()], path, plans, postprocessing="largest")
