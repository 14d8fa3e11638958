"""Planning from a merged fingerprint with nnU-Net's ExperimentPlanner, adapted to STU-Net."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from common.fingerprint import compute_site_fingerprint, merge_fingerprints
from common.planning import (
    PlanningConfig,
    default_test_plans,
    plan_from_fingerprint,
    plans_hash,
    read_plans,
    write_plans,
)

# (shape zyx, spacing xyz): thick slices, so nnU-Net's anisotropy rule (10th percentile on z) applies.
VOLUMES = [((10, 48, 48), (0.8, 0.8, 4.0)), ((12, 52, 44), (0.9, 0.9, 5.0)), ((9, 44, 52), (0.75, 0.75, 6.0)),
           ((14, 48, 40), (1.0, 1.0, 3.0)), ((11, 40, 48), (0.9, 0.9, 4.5)), ((10, 50, 46), (0.85, 0.85, 5.5))]


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plan")
    pairs, spacings, shapes = [], [], []
    for i, (shape, spacing) in enumerate(VOLUMES):
        rng = np.random.default_rng(i)
        image = rng.uniform(10, 200, shape).astype(np.float32)
        mask = np.zeros(shape, np.uint8)
        mask[2:-2, 10:-10, 10:-10] = 1
        img = sitk.GetImageFromArray(image)
        img.SetSpacing(spacing)
        sitk.WriteImage(img, str(folder / f"im{i}.nii.gz"))
        m = sitk.GetImageFromArray(mask)
        m.CopyInformation(img)
        sitk.WriteImage(m, str(folder / f"lb{i}.nii.gz"))
        pairs.append((folder / f"im{i}.nii.gz", folder / f"lb{i}.nii.gz" if i % 2 == 0 else None))
        spacings.append(list(sitk.ReadImage(str(folder / f"im{i}.nii.gz")).GetSpacing())[::-1])
        shapes.append(list(shape))
    fp = merge_fingerprints([compute_site_fingerprint(pairs[k:k + 3]) for k in (0, 3)])
    return fp, spacings, shapes


def _nnunet_target_spacing(spacings, shapes):
    """nnU-Net's own rule (ExperimentPlanner.determine_fullres_target_spacing) on the true per-case lists."""
    from nnunetv2.configuration import ANISO_THRESHOLD
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    planner = ExperimentPlanner.__new__(ExperimentPlanner)  # only the pure method is used
    planner.dataset_fingerprint = {"spacings": spacings, "shapes_after_crop": shapes}
    planner.anisotropy_threshold = ANISO_THRESHOLD
    planner.overwrite_target_spacing = None
    return planner.determine_fullres_target_spacing()


def test_plan_from_merged_fingerprint(merged, monkeypatch):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    fp, spacings, shapes = merged
    monkeypatch.setenv("nnUNet_raw", "/sentinel/raw")
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    timings = {}
    plans = plan_from_fingerprint(fp, PlanningConfig(size="T"), timings=timings)
    assert timings["planner_seconds"] > 0
    assert plans_hash(plan_from_fingerprint(fp, PlanningConfig(size="T"))) == plans_hash(plans)  # deterministic
    assert os.environ["nnUNet_raw"] == "/sentinel/raw" and "nnUNet_preprocessed" not in os.environ

    assert list(plans["configurations"]) == ["3d_fullres"]
    conf = plans["configurations"]["3d_fullres"]
    target = _nnunet_target_spacing(spacings, shapes)
    assert target[0] < np.median(np.array(spacings)[:, 0])  # the anisotropic rule did apply
    assert np.allclose(conf["spacing"], target, atol=fp.config.spacing_bin_width)
    arch = conf["architecture"]
    assert arch["network_class_name"] == "common.stunet.STUNet"
    strides = arch["arch_kwargs"]["strides"]
    assert len(strides) == 6 and strides[0] == [1, 1, 1] and all(len(s) == 3 for s in strides)
    assert arch["arch_kwargs"]["kernel_sizes"] == [[3, 3, 3]] * 6
    assert conf["normalization_schemes"] == ["ZScoreNormalization"] and conf["use_mask_for_norm"] == [False]
    divisor = np.prod(np.array(strides), axis=0)
    assert np.all(np.array(conf["patch_size"]) % divisor == 0)
    assert plans["fedliver"]["fingerprint"]["num_images"] == 6
    json.dumps(plans, allow_nan=False)
    PlansManager(plans).get_configuration("3d_fullres")  # nnU-Net accepts it


def test_patch_override_is_rounded_and_builds_a_net(merged):
    import torch

    from common.stunet import build_stunet_from_plans

    fp, _, _ = merged
    plans = plan_from_fingerprint(fp, PlanningConfig(size="T", base_width=4, patch_size=(18, 50, 45), batch_size=3))
    conf = plans["configurations"]["3d_fullres"]
    strides = np.array(conf["architecture"]["arch_kwargs"]["strides"])
    divisor = np.prod(strides, axis=0)
    assert np.all(np.array(conf["patch_size"]) % divisor == 0)
    assert np.all(np.abs(np.array(conf["patch_size"]) - (18, 50, 45)) <= divisor / 2)
    assert conf["batch_size"] == 3 and conf["architecture"]["arch_kwargs"]["features_per_stage"][0] == 4
    torch.set_num_threads(1)
    net = build_stunet_from_plans(plans, deep_supervision=False)
    with torch.no_grad():
        out = net(torch.zeros(1, 1, *conf["patch_size"]))
    assert tuple(out.shape) == (1, 2, *conf["patch_size"])

    capped = plan_from_fingerprint(fp, PlanningConfig(size="T", max_patch_size=(8, 30, 1000)))
    conf = capped["configurations"]["3d_fullres"]
    divisor = np.prod(np.array(conf["architecture"]["arch_kwargs"]["strides"]), axis=0)
    assert conf["patch_size"][0] <= 8 and conf["patch_size"][1] <= 30
    assert conf["patch_size"][2] == capped["fedliver"]["planner_patch_size"][2]  # not capped on x
    assert np.all(np.array(conf["patch_size"]) % divisor == 0)


def test_target_spacing_resamples_the_plan(merged):
    """A coarser target spacing (3d_lowres-like): the plans' spacing is it, the median image shrinks by
    the ratio, the strides follow nnU-Net's rule for the new spacing and the patch stays divisible."""
    fp, _, _ = merged
    full = plan_from_fingerprint(fp, PlanningConfig(size="T", patch_size=(8, 32, 32)))["configurations"]["3d_fullres"]
    coarse = (full["spacing"][0], 2.0, 2.0)
    low = plan_from_fingerprint(fp, PlanningConfig(size="T", patch_size=(8, 32, 32), spacing=coarse))
    conf = low["configurations"]["3d_fullres"]
    assert conf["spacing"] == list(coarse)
    for axis in (1, 2):
        expected = full["median_image_size_in_voxels"][axis] * full["spacing"][axis] / 2.0
        assert abs(conf["median_image_size_in_voxels"][axis] - expected) <= 1
    strides = conf["architecture"]["arch_kwargs"]["strides"]
    assert np.all(np.array(conf["patch_size"]) % np.prod(np.array(strides), axis=0) == 0)
    # At 2 mm in-plane the z axis (4-6 mm) is no longer 4x coarser: it is pooled sooner than at ~0.85 mm.
    assert strides != full["architecture"]["arch_kwargs"]["strides"]
    assert plans_hash(low) != plans_hash(plan_from_fingerprint(fp, PlanningConfig(size="T", patch_size=(8, 32, 32))))
    with pytest.raises(ValueError, match="spacing"):
        plan_from_fingerprint(fp, PlanningConfig(size="T", spacing=(1.0, 0.0, 1.0)))


def test_plans_hash_and_files(tmp_path):
    plans = default_test_plans()
    shuffled = json.loads(json.dumps(plans, sort_keys=True))
    shuffled = dict(reversed(list(shuffled.items())))
    assert plans_hash(plans) == plans_hash(shuffled)
    changed = json.loads(json.dumps(plans))
    changed["configurations"]["3d_fullres"]["patch_size"][0] += 16
    assert plans_hash(changed) != plans_hash(plans)

    digest = write_plans(plans, tmp_path / "model")
    assert (tmp_path / "model" / "plans.sha256").read_text().strip() == digest == plans_hash(plans)
    assert read_plans(tmp_path / "model") == json.loads(json.dumps(plans))
    (tmp_path / "model" / "plans.json").write_text(json.dumps(changed))
    with pytest.raises(ValueError, match="does not match"):
        read_plans(tmp_path / "model")


def test_default_test_plans_are_valid_nnunet_plans():
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = default_test_plans(patch_size=(16, 32, 32), spacing=(4.0, 3.0, 3.0), size="T")
    conf = PlansManager(plans).get_configuration("3d_fullres")
    assert list(conf.patch_size) == [16, 32, 32] and list(conf.spacing) == [4.0, 3.0, 3.0]
    strides = conf.network_arch_init_kwargs["strides"]
    assert len(strides) == 6 and strides[0] == [1, 1, 1]
    assert np.all(np.array(conf.patch_size) % np.prod(np.array(strides), axis=0) == 0)
