"""Sliding-window inference, predict_image on real NIfTI files, and the predict/evaluate commands."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from common.inference import predict_image, sliding_window_predict
from common.planning import default_test_plans
from common.stunet import build_stunet, build_stunet_from_plans


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class ThresholdNet(nn.Module):
    """Deterministic stand-in: liver where the (z-scored) intensity is above 0. Pointwise, so tiling,
    Gaussian weighting and mirroring cannot change its answer."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(20.0))

    def forward(self, x):
        return torch.cat([-self.scale * x, self.scale * x], dim=1)


def _tiny_net(seed=0, deep_supervision=False):
    torch.manual_seed(seed)
    return build_stunet("T", base_width=2, strides=[[1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
                        deep_supervision=deep_supervision)


PATCH = (16, 32, 32)


@pytest.mark.parametrize("shape", [(20, 40, 36), (10, 20, 50)])  # tiled on every axis / padded
def test_sliding_window_probabilities(shape):
    net = _tiny_net()
    data = torch.randn(1, *shape)
    probs = sliding_window_predict([net], data, PATCH, step=0.5)
    assert probs.shape == (2, *shape)
    assert probs.dtype == torch.float32
    assert torch.allclose(probs.sum(0), torch.ones(shape), atol=1e-5)
    assert probs.min() >= 0 and probs.max() <= 1
    assert probs[1].std() > 0  # a real, input-dependent answer


def test_sliding_window_mirroring_single_tile_matches_manual_flips():
    net = _tiny_net(1)
    data = torch.randn(1, *PATCH)
    got = sliding_window_predict([net], data, PATCH, mirror=True)
    assert got.shape == (2, *PATCH)
    net.eval()
    with torch.no_grad():
        flips = [()] + [c for i in range(1, 4) for c in itertools.combinations((2, 3, 4), i)]
        expected = sum(torch.flip(torch.softmax(net(torch.flip(data[None], a)), 1), a) for a in flips)[0] / 8
    assert torch.allclose(got, expected, atol=1e-5)
    plain = sliding_window_predict([net], data, PATCH, mirror=False)
    assert not torch.allclose(got, plain, atol=1e-4)


def test_sliding_window_mean_of_nets_batches_and_modes():
    a, b = _tiny_net(2), _tiny_net(3)
    a.train()
    b.eval()
    data = torch.randn(1, 24, 40, 40)
    pa = sliding_window_predict([a], data, PATCH)
    pb = sliding_window_predict(b, data, PATCH)
    both = sliding_window_predict([a, b], data, PATCH)
    assert torch.allclose(both, (pa + pb) / 2, atol=1e-5)
    # batched tiles: same answer up to float noise (batched convolutions sum in another order)
    batched = sliding_window_predict([a, b], data, PATCH, batch_size=3)
    assert torch.allclose(batched, both, atol=2e-3)
    assert a.training and all(m.training for m in a.modules())  # modes restored after the call
    assert not b.training and not any(m.training for m in b.modules())


def test_sliding_window_deep_supervision_output_uses_full_resolution():
    ds = _tiny_net(4, deep_supervision=True)
    plain = _tiny_net(4, deep_supervision=False)
    plain.load_state_dict(ds.state_dict())
    data = torch.randn(1, 16, 40, 32)
    assert torch.allclose(sliding_window_predict([ds], data, PATCH), sliding_window_predict([plain], data, PATCH))


def test_sliding_window_pointwise_net_is_exact():
    data = torch.randn(1, 21, 45, 37)
    probs = sliding_window_predict([ThresholdNet()], data, PATCH, step=0.5, mirror=True, batch_size=2)
    assert torch.equal(probs.argmax(0), (data[0] > 0).long())


# --------------------------------------------------------------------------------------------- predict_image
def _oblique_direction(deg=30.0):
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, -1.0)  # rotated in-plane and z flipped: det = -1


def _phantom(shape_zyx=(9, 21, 23), seed=0):
    """Zero border (cropped away), inside two intensities constant along z; liver = 100."""
    rng = np.random.default_rng(seed)
    z, y, x = shape_zyx
    img = np.zeros(shape_zyx, dtype=np.float32)
    inside = (slice(1, z), slice(0, y - 2), slice(3, x))
    plane = np.where(rng.random((y - 2, x - 3)) > 0.6, 100.0, 10.0).astype(np.float32)
    plane[2:9, 4:12] = 100.0
    img[inside] = plane[None]
    return img


def _write(array, path, spacing_xyz=(1.0, 1.0, 2.0), origin=(-12.5, 30.0, 7.25), direction=None):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing_xyz)
    image.SetOrigin(origin)
    image.SetDirection(direction or _oblique_direction())
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def test_predict_image_exact_on_raw_grid(tmp_path):
    # plans at 1 mm isotropic: the 2 mm slices are resampled to twice as many and back
    plans = default_test_plans(patch_size=(16, 16, 16), spacing=(1.0, 1.0, 1.0))
    raw = _phantom()
    path = _write(raw, tmp_path / "GED4.nii.gz")
    out = predict_image([ThresholdNet(), ThresholdNet()], path, plans, mirror=True)
    ref = sitk.ReadImage(str(path))
    assert out.GetSize() == ref.GetSize() == (23, 21, 9)
    assert out.GetSpacing() == ref.GetSpacing()
    assert out.GetOrigin() == ref.GetOrigin()
    assert out.GetDirection() == ref.GetDirection()
    assert out.GetPixelID() == sitk.sitkUInt8
    seg = sitk.GetArrayFromImage(out)
    np.testing.assert_array_equal(seg, (raw == 100).astype(np.uint8))


def test_predict_image_with_stunet_and_resampling(tmp_path):
    plans = default_test_plans(patch_size=(16, 32, 32), spacing=(3.0, 1.7, 1.7))
    torch.manual_seed(0)
    net = build_stunet_from_plans(plans, deep_supervision=True)
    path = _write(_phantom((7, 30, 27)), tmp_path / "T1.nii.gz", spacing_xyz=(0.9, 1.1, 2.5))
    out = predict_image([net], path, plans)
    assert out.GetSize() == (27, 30, 7)
    seg = sitk.GetArrayFromImage(out)
    assert set(np.unique(seg)) <= {0, 1}
    assert net.training  # untouched mode


def test_predict_image_unreadable_file(tmp_path):
    from common.nifti import ImageReadError

    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(ImageReadError, match="broken.nii.gz"):
        predict_image([ThresholdNet()], bad, default_test_plans())
