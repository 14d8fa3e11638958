"""Label-transfer transforms: shape, dtype, determinism under a seed, what they change and what not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.data_loading import augmentation_params, build_training_transforms, _seeded_global_rng
from client.label_transfer import (LocationScaleIntensity, RandomBiasField, RandomConvolutionMix, RandomInPlaneTranspose,
                                   SimulatedNonContrast, apply_curve, insert_after_spatial, label_transfer_transforms,
                                   random_intensity_curve)
from common.label_transfer_config import LabelTransferConfig


def _sample(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A z-scored patch with a bright 'liver' block (label 1), background 0 and padding -1."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 16, 32, 32, generator=g)
    seg = torch.zeros(1, 16, 32, 32, dtype=torch.int16)
    seg[0, 4:12, 8:24, 6:20] = 1
    seg[0, :, :, -2:] = -1
    image[seg == 1] += 3.0
    image = (image - image.mean()) / image.std()
    return image, seg


def _run(transform, image, seg, seed=1):
    with _seeded_global_rng(seed):
        return transform(image=image.clone(), segmentation=seg.clone())


INTENSITY = [LocationScaleIntensity(), SimulatedNonContrast(), RandomConvolutionMix(), RandomBiasField()]


@pytest.mark.parametrize("transform", INTENSITY, ids=lambda t: type(t).__name__)
def test_intensity_transforms_keep_shape_dtype_scale_and_segmentation(transform):
    image, seg = _sample()
    out = _run(transform, image, seg)
    assert out["image"].shape == image.shape and out["image"].dtype == torch.float32
    assert torch.isfinite(out["image"]).all()
    assert torch.equal(out["segmentation"], seg)  # labels never move
    assert not torch.allclose(out["image"], image)
    # The net's input scale stays: z-scored in, z-scored out.
    assert abs(float(out["image"].mean()) - float(image.mean())) < 1e-3
    assert abs(float(out["image"].std()) - float(image.std())) < 1e-3


@pytest.mark.parametrize("transform", INTENSITY + [RandomInPlaneTranspose()], ids=lambda t: type(t).__name__)
def test_transforms_are_deterministic_under_a_seed(transform):
    image, seg = _sample()
    a, b, c = _run(transform, image, seg, 5), _run(transform, image, seg, 5), _run(transform, image, seg, 6)
    assert torch.equal(a["image"], b["image"])
    if not isinstance(transform, RandomInPlaneTranspose):  # the transpose itself has no randomness
        assert not torch.equal(a["image"], c["image"])


def test_location_scale_can_make_the_liver_darker_than_the_rest():
    """The shortcut breaks: over seeds the liver is sometimes darker than the rest, never only brighter."""
    image, seg = _sample()
    liver, rest = seg[0] == 1, seg[0] == 0
    darker = sum(float(out["image"][0][liver].mean()) < float(out["image"][0][rest].mean())
                 for out in (_run(LocationScaleIntensity(), image, seg, s) for s in range(20)))
    assert float(image[0][liver].mean()) > float(image[0][rest].mean())
    assert 2 <= darker <= 18


def test_location_scale_maps_each_class_by_one_curve():
    """Within a class the mapping is a function of intensity: equal inputs give equal outputs."""
    image, seg = _sample()
    image[0, 5, 10, 10] = image[0, 6, 12, 12] = 2.5     # two liver voxels with one intensity
    seg[0, 5, 10, 10] = seg[0, 6, 12, 12] = 1
    out = _run(LocationScaleIntensity(), image, seg)["image"]
    assert float(out[0, 5, 10, 10]) == pytest.approx(float(out[0, 6, 12, 12]), abs=1e-5)


def test_non_contrast_darkens_only_the_liver():
    image, seg = _sample()
    out = _run(SimulatedNonContrast(), image, seg, seed=3)["image"]
    liver = seg[0] == 1
    unit = lambda x: (x - x.mean()) / x.std()
    # Relative to the rest (which keeps its ordering), the liver lost brightness.
    gap_before = float(image[0][liver].mean() - image[0][~liver].mean())
    gap_after = float(out[0][liver].mean() - out[0][~liver].mean())
    assert gap_after < gap_before
    # Outside the liver the image is an affine map of the input (restandardisation only).
    a, b = unit(image[0][~liver]), unit(out[0][~liver])
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.999


def test_non_contrast_leaves_samples_without_liver_alone():
    image, seg = _sample()
    seg[seg == 1] = 0
    assert torch.equal(_run(SimulatedNonContrast(), image, seg)["image"], image)


def test_in_plane_transpose_swaps_y_and_x_of_image_and_labels():
    image, seg = _sample()
    out = _run(RandomInPlaneTranspose(), image, seg)
    assert torch.equal(out["image"], image.transpose(-1, -2))
    assert torch.equal(out["segmentation"], seg.transpose(-1, -2))
    flat = torch.zeros(1, 4, 8, 6)  # y != x: the patch shape must stay, so nothing happens
    assert torch.equal(RandomInPlaneTranspose()(image=flat)["image"], flat)


def test_random_curves_monotone_inverted_or_shuffled():
    torch.manual_seed(0)
    x, y = random_intensity_curve("monotone")
    assert (torch.diff(x) >= 0).all() and float(x[0]) == 0 and float(x[-1]) == pytest.approx(1)
    assert (torch.diff(y) >= -1e-6).all() and float(y[0]) == pytest.approx(0, abs=1e-6)
    x, y = random_intensity_curve("inverted")
    assert (torch.diff(y) <= 1e-6).all() and float(y[0]) == pytest.approx(1, abs=1e-6)
    shuffled = [random_intensity_curve("random", n_control=6)[1] for _ in range(20)]
    assert all(float(y.min()) >= 0 and float(y.max()) <= 1 for y in shuffled)
    assert any(bool((torch.diff(y) > 1e-4).any() and (torch.diff(y) < -1e-4).any()) for y in shuffled)
    with pytest.raises(ValueError):
        random_intensity_curve("wavy")
    values = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(apply_curve(values, torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])), 1 - values)


def test_bias_field_is_smooth_positive_and_shades_across_the_patch():
    """A cubic field: positive, bounded, nearly constant between neighbours, but far from constant over
    the patch; the image's intensity order within a small neighbourhood is kept."""
    transform = RandomBiasField(strength=0.2, order=3)
    with _seeded_global_rng(3):
        field = transform.field((16, 32, 32))
    terms = 19  # monomials of degree 1..3 in three variables
    assert field.shape == (16, 32, 32) and bool((field > 0).all())
    assert float(field.max()) <= np.exp(0.2 * terms) and float(field.min()) >= np.exp(-0.2 * terms)
    neighbour_step = (field[:, :, 1:] / field[:, :, :-1]).log().abs().max()
    assert float(neighbour_step) < 0.1 < float(field.max() / field.min()) - 1
    flat = torch.ones(1, 16, 32, 32)
    flat[0, :, :, ::2] = 2.0  # a stripe pattern; the field shades it but keeps bright stripes bright
    with _seeded_global_rng(3):
        out = transform(image=flat.clone())["image"]
    assert bool((out[0, :, :, ::2] > out[0, :, :, 1::2]).all())


def test_config_selects_and_places_the_transforms():
    config = LabelTransferConfig(location_scale=0.5, non_contrast=0.25, random_conv=0.0, transpose=0.5)
    labeled = [type(t.transform).__name__ for t in label_transfer_transforms(config, labeled=True)]
    assert labeled == ["RandomInPlaneTranspose", "SimulatedNonContrast", "LocationScaleIntensity"]
    assert [type(t.transform).__name__ for t in label_transfer_transforms(config, labeled=False)] == \
        ["RandomInPlaneTranspose"]
    params = augmentation_params((16, 32, 32))
    plain = build_training_transforms(params, None)
    compose = build_training_transforms(params, None, config, labeled=True)
    names = [type(getattr(t, "transform", t)).__name__ for t in compose.transforms]
    assert len(compose.transforms) == len(plain.transforms) + 3
    assert names[0] == "SpatialTransform" and names[1:4] == labeled  # before every intensity transform
    shaded = LabelTransferConfig(transpose=0.5, bias_field=0.5)
    assert [type(t.transform).__name__ for t in label_transfer_transforms(shaded, labeled=False)] == \
        ["RandomInPlaneTranspose", "RandomBiasField"]  # an acquisition's shading: unlabeled samples too
    with pytest.raises(ValueError, match="random_conv"):
        LabelTransferConfig(random_conv=1.5)
    assert not LabelTransferConfig().enabled and config.enabled
    with pytest.raises(ValueError, match="SpatialTransform"):
        insert_after_spatial(type(plain)([]), label_transfer_transforms(config, labeled=True))


def test_pipeline_with_label_transfer_gives_valid_batches():
    """The whole nnU-Net pipeline with every transform on: shapes, finite values, binary targets."""
    params = augmentation_params((16, 32, 32))
    config = LabelTransferConfig(location_scale=1.0, non_contrast=1.0, random_conv=1.0, transpose=1.0, bias_field=1.0)
    compose = build_training_transforms(params, [[1, 1, 1], [0.5, 0.5, 0.5]], config, labeled=True)
    image, seg = _sample()
    big = torch.nn.functional.pad(image, (4, 4, 4, 4, 2, 2))
    big_seg = torch.nn.functional.pad(seg, (4, 4, 4, 4, 2, 2))
    with _seeded_global_rng(0):
        out = compose(image=big, segmentation=big_seg)
    assert out["image"].shape == (1, 16, 32, 32) and torch.isfinite(out["image"]).all()
    assert [tuple(t.shape) for t in out["segmentation"]] == [(1, 16, 32, 32), (1, 8, 16, 16)]
    assert set(np.unique(out["segmentation"][0].numpy())) <= {0, 1}
