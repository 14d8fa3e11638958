"""Domain-randomised pretraining: label maps, each generator transform, the pipeline, extra real data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from client.data_loading import BatchBuilder, _seeded_global_rng, augmentation_params, build_training_transforms
from simulations.phantoms.contrast import Tissue
from simulations.synthesis.label_maps import LIVER_CYST, N_LABELS, LabelMapConfig, label_histogram, write_label_maps
from simulations.synthesis.pretraining import _liver_label, extra_volumes, pretraining_plans
from simulations.synthesis.transforms import (OUTSIDE, RandomFieldOfView, RandomGamma, RandomResolution,
                                              RandomTissueIntensities, RicianNoise, ZScoreInVolume,
                                              synthesis_transforms)


def _label_patch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A crop of tissue classes (image channel) with a liver block, every class present, padding -1."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, N_LABELS, (1, 16, 24, 24), generator=g).float()
    labels[0, 4:12, 6:18, 6:18] = float(Tissue.LIVER)
    seg = torch.zeros(1, 16, 24, 24, dtype=torch.int16)
    seg[0, 4:12, 6:18, 6:18] = 1
    seg[0, :, :, -2:] = OUTSIDE
    return labels, seg


def _run(transform, image, seg, seed=1):
    with _seeded_global_rng(seed):
        return transform(image=image.clone(), segmentation=seg.clone())


@pytest.fixture(scope="module")
def intensity_patch():
    labels, seg = _label_patch()
    return _run(RandomTissueIntensities(), labels, seg)["image"], seg


STEPS = [RandomResolution(), RicianNoise(sigma=(0.02, 0.06)), RandomGamma(), ZScoreInVolume()]


@pytest.mark.parametrize("transform", STEPS, ids=lambda t: type(t).__name__)
def test_generator_steps_keep_shape_dtype_and_labels_and_follow_the_seed(transform, intensity_patch):
    image, seg = intensity_patch
    a, b = _run(transform, image, seg, 3), _run(transform, image, seg, 3)
    assert a["image"].shape == image.shape and a["image"].dtype == torch.float32
    assert torch.isfinite(a["image"]).all()
    assert torch.equal(a["segmentation"], seg)  # the liver never moves
    assert torch.equal(a["image"], b["image"])
    assert not torch.allclose(a["image"], image)
    if not isinstance(transform, ZScoreInVolume):  # the z-score has no randomness
        assert not torch.equal(a["image"], _run(transform, image, seg, 4)["image"])


def test_tissue_intensities_are_random_per_tissue_and_reproducible():
    labels, seg = _label_patch()
    a, b, c = (_run(RandomTissueIntensities(spread=(0.0, 0.0)), labels, seg, s) for s in (5, 5, 6))
    assert a["image"].shape == labels.shape and a["image"].dtype == torch.float32
    assert torch.equal(a["segmentation"], seg) and torch.equal(a["image"], b["image"])
    # With no spread each class is one value: one per class, and a new seed gives other values.
    for out in (a, c):
        for k in range(N_LABELS):
            values = out["image"][labels == k]
            if values.numel():
                assert float(values.max() - values.min()) < 1e-5
    means = lambda out: torch.stack([out["image"][labels == k].mean() for k in range(N_LABELS)])  # noqa: E731
    assert not torch.allclose(means(a), means(c), atol=1e-3)
    # Over seeds, the liver is sometimes brighter and sometimes darker than the muscle: no fixed order.
    order = set()
    for s in range(20):
        out = _run(RandomTissueIntensities(), labels, seg, s)["image"]
        order.add(bool(out[labels == Tissue.LIVER].mean() > out[labels == Tissue.MUSCLE].mean()))
    assert order == {True, False}


def test_field_of_view_cut_removes_image_and_liver_together():
    labels, seg = _label_patch()
    for s in range(10):
        out = _run(RandomFieldOfView(), labels, seg, s)
        gone = out["segmentation"][0] == OUTSIDE
        cut = gone.flatten(1).all(1)  # whole slices beyond the cut
        assert cut.any() and not cut.all()
        assert (out["image"][0][cut] == 0).all()  # air beyond the cut, which the z-score makes padding
        kept = ~cut
        assert torch.equal(out["segmentation"][0][kept], seg[0][kept])  # the liver inside the FOV is unchanged
        assert int((out["segmentation"] == 1).sum()) <= int((seg == 1).sum())
        assert torch.equal(out["image"][0][kept], labels[0][kept])


def test_zscore_is_over_the_volume_and_zero_outside():
    image = torch.rand(1, 8, 8, 8) * 5 + 2
    seg = torch.zeros(1, 8, 8, 8, dtype=torch.int16)
    seg[0, :2] = OUTSIDE
    out = ZScoreInVolume()(image=image, segmentation=seg)["image"]
    inside = out[0][seg[0] >= 0]
    assert abs(float(inside.mean())) < 1e-5 and abs(float(inside.std()) - 1) < 1e-4
    assert (out[0][seg[0] == OUTSIDE] == 0).all()


def test_label_maps_hold_the_anatomy_and_the_liver_label(tmp_path):
    volumes = write_label_maps(tmp_path, 2, seed=0, config=LabelMapConfig(max_liver_cysts=4))
    assert len(volumes) == 2
    counts = label_histogram(volumes)
    for tissue in (Tissue.LIVER, Tissue.LUNG, Tissue.HEART, Tissue.KIDNEY_CORTEX, Tissue.KIDNEY_MEDULLA,
                   Tissue.GALLBLADDER, Tissue.STOMACH, Tissue.SPLEEN, Tissue.PORTAL_VEIN, Tissue.HEPATIC_VEIN):
        assert counts[tissue] > 0, tissue.name
    data, seg, _ = volumes[0].load()
    assert data.dtype == np.uint8 and seg.dtype == np.int8 and data.shape == seg.shape
    liver = seg[0] == 1
    assert set(np.unique(data[0][liver])) <= {int(Tissue.LIVER), int(Tissue.PORTAL_VEIN), int(Tissue.HEPATIC_VEIN),
                                             int(Tissue.TUMOR), LIVER_CYST}
    assert (data[0][data[0] == Tissue.LIVER] >= 0).all() and liver[data[0] == Tissue.LIVER].all()
    assert 8e5 < liver.sum() * np.prod(LabelMapConfig().spacing) < 3.5e6  # 0.8-3.5 L, in mm^3
    # The map reaches above the liver (lungs, heart) and far below it (a field of view to cut).
    z_liver = np.flatnonzero(liver.any(axis=(1, 2)))
    z_lung = np.flatnonzero((data[0] == Tissue.LUNG).any(axis=(1, 2)))
    assert z_lung.size and z_liver.size and z_liver.min() > 5 and (z_liver.max() < z_lung.max())
    # Kept: a second call reads the same files without rendering.
    mtime = volumes[0].data_file.stat().st_mtime_ns
    assert write_label_maps(tmp_path, 2, seed=0, config=LabelMapConfig(max_liver_cysts=4))[0].data_file.stat().st_mtime_ns == mtime


def test_batches_from_label_maps_are_images_with_the_liver(tmp_path):
    volumes = write_label_maps(tmp_path, 2, seed=1)
    params = augmentation_params((16, 32, 32), ())
    transforms = build_training_transforms(params, None, None, synthesis=synthesis_transforms())
    batches = [BatchBuilder(volumes, 3, params, transforms, labeled=True, seed=7, oversample_foreground=1.0).next_batch()
               for _ in range(2)]
    assert torch.equal(batches[0].data, batches[1].data)  # same seed, same images
    data = batches[0].data
    assert data.shape == (3, 1, 16, 32, 32) and torch.isfinite(data).all()
    assert len(torch.unique(data)) > 100  # an image, not class numbers
    assert int((batches[0].target[0] == 1).sum()) > 0  # centred on the liver


def test_extra_data_finds_the_liver_by_name(tmp_path):
    root = tmp_path / "Dataset777_Real"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    labels = np.zeros((12, 40, 40), np.uint8)
    labels[3:9, 5:20, 5:25] = 3                    # liver is label 3 here
    labels[3:9, 25:35, 25:35] = 1                  # spleen is 1
    image = np.random.default_rng(0).normal(100, 10, labels.shape).astype(np.float32) + 50 * (labels > 0)
    for case in ("r001", "r002"):
        for array, path in ((image, root / "imagesTr" / f"{case}_0000.nii.gz"), (labels, root / "labelsTr" / f"{case}.nii.gz")):
            img = sitk.GetImageFromArray(array)
            img.SetSpacing((3.6, 3.6, 6.0))
            sitk.WriteImage(img, str(path))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2"}, "file_ending": ".nii.gz",
                                                   "labels": {"background": 0, "spleen": 1, "Liver": 3},
                                                   "numTraining": 2}))
    assert _liver_label(json.loads((root / "dataset.json").read_text()), root) == 3
    volumes = extra_volumes([root], pretraining_plans(4), tmp_path / "work", exclude=("r002",), log=lambda _: None)
    assert [v.case_id for v in volumes] == ["Dataset777_Real/r001"]
    _, seg, _ = volumes[0].load()
    liver_voxels = int((seg == 1).sum())
    assert 0.8 * 6 * 15 * 20 < liver_voxels < 1.2 * 6 * 15 * 20  # the liver, not the spleen or both
    with pytest.raises(ValueError, match="no 'liver' label"):
        _liver_label({"labels": {"background": 0, "kidney": 1}}, root / "dataset.json")
