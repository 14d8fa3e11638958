"""Batches for CPS training: nnU-Net cropping/augmentation on real preprocessed volumes, prefetching."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from client.data_loading import (BatchBuilder, PatchSampler, Prefetcher, augmentation_params,
                                 build_training_transforms, deep_supervision_scales, foreground_locations)
from common.discovery import Case
from common.planning import default_test_plans
from common.preprocessing import PreprocessingCache
from common.stunet import build_stunet_from_plans

PATCH = (16, 32, 32)


def _write(array: np.ndarray, path: Path, spacing=(3.0, 3.0, 4.0)) -> Path:
    image = sitk.GetImageFromArray(array)  # array (z, y, x); spacing (x, y, z)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def _liver_case(folder: Path, name: str, shape=(24, 48, 48), radius=(6, 10, 9), seed: int = 0) -> Case:
    """An ellipsoid 'liver' brighter than its surroundings in GED4, darker in T2."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:shape[0], :shape[1], :shape[2]]
    c = [s // 2 for s in shape]
    mask = (((z - c[0]) / radius[0]) ** 2 + ((y - c[1]) / radius[1]) ** 2 + ((x - c[2]) / radius[2]) ** 2 < 1)
    mask = mask.astype(np.uint8)
    folder = folder / name
    folder.mkdir(parents=True, exist_ok=True)
    ged4 = _write((60 + 100 * mask + rng.normal(0, 8, shape)).astype(np.float32), folder / "GED4.nii.gz")
    t2 = _write((200 - 90 * mask + rng.normal(0, 8, shape)).astype(np.float32), folder / "T2.nii.gz")
    seg = _write(mask, folder / "mask_GED4.nii.gz")
    return Case(name, "A", None, {"GED4": ged4, "T2": t2}, {"GED4": seg})


def small_liver_cases(root: Path, count: int) -> list[Case]:
    """`count` small ellipsoid-liver cases (20x40x40) under root/raw: what trainer tests learn on."""
    return [_liver_case(root / "raw", f"000{i}-A", shape=(20, 40, 40), radius=(4, 8, 8), seed=i) for i in range(count)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("loading")
    plans = default_test_plans(PATCH)
    cache = PreprocessingCache(root / "cache", plans)
    case = _liver_case(root / "raw", "0001-A", shape=(20, 40, 40), radius=(3, 4, 4))
    labeled = cache.get(case, "GED4", with_mask=True)
    unlabeled = cache.get(case, "T2", with_mask=False)
    net = build_stunet_from_plans(plans, deep_supervision=True)
    strides = [[1, 1, 1]] + [list(s) for s in net.strides]
    params = augmentation_params(PATCH)
    scales = deep_supervision_scales(strides)
    return {"plans": plans, "labeled": labeled, "unlabeled": unlabeled, "net": net, "params": params,
            "scales": scales, "transforms": build_training_transforms(params, scales),
            "transforms_nods": build_training_transforms(params, None)}


def test_augmentation_params_follow_nnunet():
    iso = augmentation_params((32, 64, 64))
    assert not iso.dummy_2d
    assert np.isclose(iso.rotation[1], np.pi / 6)
    assert all(i > p for i, p in zip(iso.initial_patch_size, iso.patch_size))
    flat = augmentation_params((8, 64, 64))  # 64 / 8 > nnU-Net's anisotropy threshold 3
    assert flat.dummy_2d and flat.initial_patch_size[0] == 8 and flat.initial_patch_size[1] > 64


def test_labeled_batches_match_network_outputs(setup):
    builder = BatchBuilder([setup["labeled"]], 2, setup["params"], setup["transforms"], labeled=True, seed=0)
    batch = builder.next_batch()
    assert batch.data.shape == (2, 1, *PATCH) and batch.data.dtype == torch.float32
    assert batch.keys == ["0001-A/GED4", "0001-A/GED4"]
    with torch.no_grad():
        outputs = setup["net"](batch.data)
    assert len(batch.target) == len(outputs) == 5
    for target, out in zip(batch.target, outputs):  # one target per deep-supervision head, same grid
        assert target.shape == (2, 1, *out.shape[2:])
        assert set(torch.unique(target).tolist()) <= {0, 1}  # nnU-Net's -1 padding is removed


def test_unlabeled_batches_have_no_target(setup):
    builder = BatchBuilder([setup["unlabeled"]], 3, setup["params"], setup["transforms_nods"],
                           labeled=False, seed=0)
    batch = builder.next_batch()
    assert batch.target is None
    assert batch.data.shape == (3, 1, *PATCH)
    assert torch.isfinite(batch.data).all() and batch.data.std() > 0


def test_foreground_oversampling(setup):
    """All samples forced onto liver: every (unaugmented) patch holds liver; a small liver is rare otherwise."""
    params = setup["params"]
    forced = BatchBuilder([setup["labeled"]], 4, params, None, labeled=True, seed=1,
                          oversample_foreground=1.0, augment=False)
    for _ in range(3):
        batch = forced.next_batch()
        assert all(int(t.sum()) > 0 for t in batch.target[0])
    # nnU-Net's rule: with 0.33 and batch 2 only the last sample is forced.
    default = BatchBuilder([setup["labeled"]], 2, params, None, labeled=True, seed=1, augment=False)
    assert [default._force_foreground(j) for j in range(2)] == [False, True]


def test_same_seed_same_batches(setup):
    def batches(seed):
        b = BatchBuilder([setup["labeled"]], 2, setup["params"], setup["transforms"], labeled=True, seed=seed)
        return [b.next_batch() for _ in range(2)]

    first, again, other = batches(5), batches(5), batches(6)
    for x, y in zip(first, again):
        assert torch.equal(x.data, y.data)
        assert all(torch.equal(s, t) for s, t in zip(x.target, y.target))
    assert not all(torch.equal(x.data, y.data) for x, y in zip(first, other))


def test_patch_sampler_pads_small_volumes():
    sampler = PatchSampler((12, 20, 20), (8, 16, 16))
    data = np.ones((1, 4, 10, 10), np.float32)
    seg = np.ones((1, 4, 10, 10), np.int8)
    image, target = sampler.crop(data, seg, np.random.default_rng(0), foreground_locations(seg))
    assert image.shape == (1, 12, 20, 20) and target.shape == (1, 12, 20, 20)
    assert target.dtype == torch.int16 and int((target == -1).sum()) > 0  # outside: nnU-Net's -1
    assert float(image.sum()) == float((target == 1).sum())  # the whole volume is inside the crop
    _, none_seg = sampler.crop(data, None, np.random.default_rng(0))
    assert int(none_seg.abs().sum()) == 0


def test_foreground_locations_subsample():
    seg = np.zeros((1, 10, 10, 10), np.int8)
    seg[0, 2:8, 2:8, 2:8] = 1
    coords = foreground_locations(seg, max_samples=50)
    assert coords.shape == (50, 3)
    assert (seg[0][tuple(coords.T)] == 1).all()


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("test-prefetch")]


def test_prefetcher_order_limit_and_clean_shutdown():
    counter = iter(range(1000))
    with Prefetcher(lambda: next(counter), depth=2, name="test-prefetch-a", limit=5) as pf:
        assert [pf.get(timeout=10) for _ in range(5)] == [0, 1, 2, 3, 4]
        with pytest.raises(RuntimeError):
            pf.get(timeout=10)
    assert next(counter) == 5  # exactly `limit` items were produced
    assert not _prefetch_threads()


def test_prefetcher_stops_while_queue_full():
    def slow():
        time.sleep(0.01)
        return np.zeros(10)

    pf = Prefetcher(slow, depth=1, name="test-prefetch-b")
    pf.get(timeout=10)
    time.sleep(0.05)  # producer now blocks on the full queue
    assert pf.alive
    pf.close()
    pf.close()  # idempotent
    assert not pf.alive and not _prefetch_threads()
    with pytest.raises(RuntimeError):
        pf.get()


def test_prefetcher_reraises_producer_errors():
    def broken():
        raise OSError("disk gone")

    with Prefetcher(broken, depth=2, name="test-prefetch-c") as pf:
        with pytest.raises(OSError, match="disk gone"):
            pf.get(timeout=10)
    assert not _prefetch_threads()


def test_inline_prefetcher_calls_producer():
    calls = []
    pf = Prefetcher(lambda: calls.append(1) or len(calls), depth=0, limit=2)
    assert pf.get() == 1 and pf.get() == 2 and not pf.alive
    with pytest.raises(RuntimeError):
        pf.get()


def test_mirror_axes_reach_nnunets_mirror_transform():
    """`mirror-axes`: the axes nnU-Net's MirrorTransform may flip; "" leaves no mirroring at all."""
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform

    def mirror_axes(compose):
        found = [t for t in compose.transforms if isinstance(t, MirrorTransform)]
        return found[0].allowed_axes if found else ()

    assert tuple(mirror_axes(build_training_transforms(augmentation_params(PATCH), None))) == (0, 1, 2)
    assert tuple(mirror_axes(build_training_transforms(augmentation_params(PATCH, (0, 1)), None))) == (0, 1)
    assert tuple(mirror_axes(build_training_transforms(augmentation_params(PATCH, ()), None))) == ()
    # what the transforms do: with x left out, a sample's left-right order survives every draw
    image = torch.zeros((1, *PATCH)); image[0, :, :, : PATCH[2] // 2] = 1.0  # bright on one side of x
    seg = torch.zeros((1, *PATCH), dtype=torch.int16)
    transforms = build_training_transforms(augmentation_params(PATCH, (0, 1)), None)
    for seed in range(8):
        torch.manual_seed(seed); np.random.seed(seed)
        out = transforms(image=image.clone(), segmentation=seg.clone())["image"][0]
        left, right = out[..., : PATCH[2] // 4].mean(), out[..., -PATCH[2] // 4:].mean()
        assert left > right, seed
