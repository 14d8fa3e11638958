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

from common.inference import _eval_mode, predict_image, sliding_window_predict
from common.postprocessing import Postprocessing
from common.planning import default_test_plans
from common.stunet import build_stunet, build_stunet_from_plans


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(1234)
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
    data[data.abs() < 1e-3] = 0.5  # no near-ties at 0.5/0.5
    probs = sliding_window_predict([ThresholdNet()], data, PATCH, step=0.5, mirror=True, batch_size=2)
    assert torch.equal(probs.argmax(0), (data[0] > 0).long())


# --------------------------------------------------------------------------------------------- optimised vs reference
def _reference_sliding_window(nets, data, patch, step=0.5, mirror=False):
    """The path before issue 15, kept as the reference: every net through its own forward, one tile
    at a time, softmax over both classes, both accumulated in fp32."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

    padded, revert = pad_nd_image(torch.as_tensor(data, dtype=torch.float32), patch, "constant", {"value": 0}, True, None)
    shape = padded.shape[1:]
    gaussian = compute_gaussian(tuple(patch), sigma_scale=1.0 / 8, value_scaling_factor=10, dtype=torch.float32,
                                device=torch.device("cpu"))
    flips = [()] + ([c for i in range(1, 4) for c in itertools.combinations((2, 3, 4), i)] if mirror else [])
    probs, weights = torch.zeros((2, *shape)), torch.zeros(shape)
    with torch.no_grad(), _eval_mode(nets):
        for start in itertools.product(*compute_steps_for_sliding_window(shape, patch, step)):
            tile = tuple(slice(s, s + p) for s, p in zip(start, patch))
            x = padded[(slice(None), *tile)][None]
            out = 0
            for net in nets:
                for axes in flips:
                    logits = net(torch.flip(x, axes) if axes else x)
                    logits = logits[0] if isinstance(logits, (list, tuple)) else logits
                    p = torch.softmax(logits, 1)
                    out = out + (torch.flip(p, axes) if axes else p)
            probs[(slice(None), *tile)] += out[0] / (len(nets) * len(flips)) * gaussian
            weights[tile] += gaussian
    return (probs / weights)[(slice(None), *revert[1:])]


def _agreement(got, ref):
    """Fraction of voxels with the same label; the largest probability difference."""
    return (got.argmax(0) == ref.argmax(0)).float().mean().item(), (got - ref).abs().max().item()


SMALL_PATCH = (8, 16, 16)


def _soft_net(seed, deep_supervision=False, width=2, strides=None):
    """A tiny STU-Net (for SMALL_PATCH) whose head is scaled down: probabilities spread around 0.5,
    so labels are sensitive to small numeric differences (a strict test of agreement)."""
    torch.manual_seed(seed)
    net = build_stunet("T", base_width=width, deep_supervision=deep_supervision,
                       strides=strides or [[1, 2, 2], [2, 2, 2], [1, 2, 2], [1, 1, 1], [1, 1, 1]])
    with torch.no_grad():
        for head in net.seg_outputs:
            head.weight.mul_(0.2)
    return net


def _balance(net, data):
    """Shift the full-resolution head so that about half of `data`'s (c, z, y, x) voxels are
    foreground: both labels present, many near-ties."""
    pad = [(-n) % d for n, d in zip(data.shape[1:], net.divisor)]
    x = torch.nn.functional.pad(data[None], [0, pad[2], 0, pad[1], 0, pad[0]])
    with torch.no_grad(), _eval_mode([net]):
        out = net(x)
        out = out[0] if isinstance(out, (list, tuple)) else out
        net.seg_outputs[-1].bias[1] -= (out[:, 1] - out[:, 0]).median()
    return net


@pytest.mark.parametrize("deep_supervision", [False, True])
def test_fast_stunet_forward_matches_module(deep_supervision):
    from common.inference import _fast_stunet, _stunet_forward_cpu

    net = _soft_net(5, deep_supervision, width=4, strides=[[1, 2, 2], [2, 2, 2], [2, 1, 2], [1, 2, 2], [1, 1, 1]]).eval()
    assert _fast_stunet(net)
    x = torch.randn(2, 1, 16, 32, 32)
    with torch.no_grad():
        expected = net(x)
        expected = expected[0] if deep_supervision else expected
        got = _stunet_forward_cpu(net, x)
    assert got.shape == expected.shape == (2, 2, 16, 32, 32)
    assert torch.allclose(got, expected, atol=2e-4, rtol=1e-4), (got - expected).abs().max()
    assert expected.std() > 0.05  # not a trivially constant answer


def test_fast_path_only_for_plain_stunets():
    from common.inference import _fast_stunet

    class Sub(type(_tiny_net())):
        pass

    assert not _fast_stunet(ThresholdNet())
    assert not _fast_stunet(Sub(1, 2, [2, 4, 8, 16, 32, 32], 1, [[1, 2, 2]] * 5))
    tracked = _tiny_net()
    tracked.conv_blocks_context[0][0].norm1.track_running_stats = True
    assert not _fast_stunet(tracked)
    assert not _fast_stunet(_tiny_net().double())
    with pytest.raises(ValueError, match="not divisible"):  # STUNet's own message on the fast path too
        sliding_window_predict(_tiny_net(), torch.randn(1, 20, 40, 40), (15, 32, 32))


@pytest.mark.parametrize("shape,mirror,batch_size,threads", [
    ((13, 27, 22), False, 2, 2),   # tiled on every axis, one tile per worker thread
    ((13, 27, 22), False, 2, 1),   # the same inline
    ((9, 18, 16), True, 3, 2),     # all 8 flips
    ((5, 12, 14), False, 1, 1),    # smaller than the patch: padded
    ((5, 12, 14), True, 2, 2),
])
def test_optimised_path_matches_reference(shape, mirror, batch_size, threads):
    torch.manual_seed(8)
    data = torch.randn(1, *shape)
    # the CPS pair, as the ensemble runs it; one branch with deep supervision
    nets = [_balance(_soft_net(6, deep_supervision=True), data), _balance(_soft_net(7), data)]
    torch.set_num_threads(threads)
    ref = _reference_sliding_window(nets, data, SMALL_PATCH, mirror=mirror)
    got = sliding_window_predict(nets, data, SMALL_PATCH, mirror=mirror, batch_size=batch_size)
    assert torch.get_num_threads() == threads  # the workers' settings stay theirs
    assert got.shape == ref.shape == (2, *shape)
    same, diff = _agreement(got, ref)
    assert same >= 0.999 and diff < 1e-4, (same, diff)
    assert 0.01 < ref.argmax(0).float().mean() < 0.99  # both labels, near-ties: agreement means something
    assert all(net.training for net in nets)  # modes restored


def test_optimised_path_is_deterministic_across_threads():
    net = _soft_net(9)
    data = torch.randn(1, 14, 30, 28)
    torch.set_num_threads(2)
    first = sliding_window_predict(net, data, SMALL_PATCH)
    assert torch.equal(first, sliding_window_predict(net, data, SMALL_PATCH))  # tiles summed in one order
    torch.set_num_threads(1)
    assert torch.allclose(first, sliding_window_predict(net, data, SMALL_PATCH), atol=1e-6)


def test_multiclass_net_keeps_every_channel():
    torch.manual_seed(10)
    net = build_stunet("T", base_width=2, num_classes=3, strides=[[1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]])
    data = torch.randn(1, 16, 40, 30)
    got = sliding_window_predict([net], data, PATCH)
    ref = _reference_sliding_window_multiclass(net, data)
    assert got.shape == (3, 16, 40, 30)
    assert torch.allclose(got, ref, atol=1e-4)


def _reference_sliding_window_multiclass(net, data):
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

    padded, revert = pad_nd_image(data, PATCH, "constant", {"value": 0}, True, None)
    shape = padded.shape[1:]
    gaussian = compute_gaussian(PATCH, sigma_scale=1.0 / 8, value_scaling_factor=10, dtype=torch.float32,
                                device=torch.device("cpu"))
    probs, weights = torch.zeros((3, *shape)), torch.zeros(shape)
    net.eval()
    with torch.no_grad():
        for start in itertools.product(*compute_steps_for_sliding_window(shape, PATCH, 0.5)):
            tile = tuple(slice(s, s + p) for s, p in zip(start, PATCH))
            logits = net(padded[(slice(None), *tile)][None])[0]
            probs[(slice(None), *tile)] += torch.softmax(logits[0], 0) * gaussian
            weights[tile] += gaussian
    return (probs / weights)[(slice(None), *revert[1:])]


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


@pytest.mark.parametrize("spacing_xyz", [(0.9, 1.1, 2.5), (1.7, 1.7, 3.0)])  # resampled / not
def test_predict_image_matches_reference_path(tmp_path, spacing_xyz):
    """The whole path against the reference: sliding window of both classes, then nnunetv2's own
    conversion (resample both probabilities, argmax, uncrop)."""
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from common.image_io import to_file_order
    from common.planning import CONFIGURATION, DATASET_JSON
    from common.preprocessing import preprocess_image

    plans = default_test_plans(patch_size=(16, 32, 32), spacing=(3.0, 1.7, 1.7))
    rng = np.random.default_rng(3)
    raw = _phantom((12, 40, 36))
    raw += rng.normal(0, 30, raw.shape).astype(np.float32) * (raw > 0)
    path = _write(raw, tmp_path / "GED4.nii.gz", spacing_xyz=spacing_xyz)
    manager = PlansManager(plans)
    conf = manager.get_configuration(CONFIGURATION)
    data, _, props = preprocess_image(path, plans)
    nets = []
    for seed, deep_supervision in ((13, True), (14, False)):  # the CPS pair, built from the plans
        torch.manual_seed(seed)
        nets.append(build_stunet_from_plans(plans, deep_supervision=deep_supervision))
        with torch.no_grad():
            nets[-1].seg_outputs[-1].weight.mul_(0.2)
        _balance(nets[-1], torch.from_numpy(data))
    torch.set_num_threads(2)
    got = sitk.GetArrayFromImage(predict_image(nets, path, plans))

    probs = _reference_sliding_window(nets, torch.from_numpy(data), tuple(conf.patch_size))
    ref = to_file_order(np.asarray(convert_predicted_logits_to_segmentation_with_correct_shape(
        probs, manager, conf, manager.get_label_manager(dict(DATASET_JSON)), props, num_threads_torch=1)), props)
    assert got.shape == ref.shape == raw.shape
    assert 0.1 < ref[raw > 0].mean() < 0.9
    assert (got == ref).mean() >= 0.999, (got != ref).sum()


def test_predict_image_unreadable_file(tmp_path):
    from common.nifti import ImageReadError

    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(ImageReadError, match="broken.nii.gz"):
        predict_image([ThresholdNet()], bad, default_test_plans())


# --------------------------------------------------------------------------------------------- CLI
def write_model_dir(folder: Path, **plans_options) -> Path:
    """A MODEL_DIR of two tiny random STU-Nets (seeds 0 and 1) on `default_test_plans`."""
    from common.model_dir import save_model_dir

    plans = default_test_plans(patch_size=(16, 32, 32), spacing=(4.0, 3.0, 3.0), **plans_options)
    branches = {}
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        branches[name] = build_stunet_from_plans(plans, deep_supervision=True).state_dict()
    save_model_dir(folder, branches, plans, {"round": 1})
    return folder


@pytest.fixture
def model_dir(tmp_path):
    return write_model_dir(tmp_path / "model")


def _liqa_tree(root: Path) -> Path:
    """Two labeled cases; case 2's T2 is corrupt; case 1 has an unlabeled T1."""
    for n, case in enumerate(("0001-A-S1", "0002-A-S2")):
        folder = root / "Vendor_A" / case
        img = _phantom((9, 40, 36), seed=n)
        _write(img, folder / "GED4.nii.gz", spacing_xyz=(1.5, 1.5, 3.0))
        _write((img == 100).astype(np.uint8), folder / "mask_GED4.nii.gz", spacing_xyz=(1.5, 1.5, 3.0))
    _write(_phantom((7, 33, 30), seed=5), root / "Vendor_A" / "0001-A-S1" / "T1.nii.gz",
           spacing_xyz=(1.2, 1.2, 6.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    (root / "Vendor_A" / "0002-A-S2" / "T2.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    return root


def test_predict_and_evaluate_cli(tmp_path, model_dir, capsys):
    from common.metrics import evaluate_pair
    from fedliver.cli import main

    data = _liqa_tree(tmp_path / "data")
    out = tmp_path / "pred"
    rc = main(["predict", "-i", str(data), "-o", str(out), "-m", str(model_dir), "--branch", "both"])
    captured = capsys.readouterr()
    assert rc == 1  # the corrupt T2 failed ...
    bad = [line for line in captured.err.splitlines() if "T2.nii.gz" in line]
    assert len(bad) == 1 and "0002-A-S2" in bad[0]
    produced = sorted(str(p.relative_to(out)) for p in out.rglob("*.nii.gz"))
    assert produced == ["0001-A-S1/GED4_pred.nii.gz", "0001-A-S1/T1_pred.nii.gz", "0002-A-S2/GED4_pred.nii.gz"]
    assert sum(" s -> " in line for line in captured.out.splitlines()) == 3  # one progress line per volume
    for rel in produced:  # ... and the rest sits on its input's raw grid
        case, name = rel.split("/")
        src = sitk.ReadImage(str(data / "Vendor_A" / case / name.replace("_pred", "")))
        pred = sitk.ReadImage(str(out / rel))
        assert pred.GetPixelID() == sitk.sitkUInt8
        assert (pred.GetSize(), pred.GetSpacing(), pred.GetOrigin(), pred.GetDirection()) == \
               (src.GetSize(), src.GetSpacing(), src.GetOrigin(), src.GetDirection())
        assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1}

    # A reference identical to the prediction must score Dice 1 / HD95 0.
    (data / "Vendor_A" / "0002-A-S2" / "mask_GED4.nii.gz").write_bytes((out / "0002-A-S2" / "GED4_pred.nii.gz").read_bytes())
    rc = main(["evaluate", "--pred", str(out), "--truth", str(data)])
    printed = capsys.readouterr().out
    assert rc == 0
    report = json.loads((out / "evaluation.json").read_text())
    assert set(report["cases"]) == {"0001-A-S1", "0002-A-S2"}
    assert report["cases"]["0002-A-S2"]["GED4"] == {"dice": 1.0, "hd95": 0.0}
    expected = evaluate_pair(out / "0001-A-S1" / "GED4_pred.nii.gz", data / "Vendor_A" / "0001-A-S1" / "mask_GED4.nii.gz")
    assert report["cases"]["0001-A-S1"]["GED4"] == pytest.approx(expected)
    assert report["summary"]["GED4"]["dice"]["n"] == 2
    assert report["summary"]["GED4"]["dice"]["mean"] == pytest.approx((1.0 + expected["dice"]) / 2)
    assert report["summary_by_center"]["A"]["GED4"]["hd95"]["n"] == 2
    assert report["missing_truth"] == [str(out / "0001-A-S1" / "T1_pred.nii.gz")]
    assert "GED4" in printed and "no reference" in printed

    # A prediction on another grid than its reference: one line, listed, exit 1, file still written.
    (out / "0001-A-S1" / "GED4_pred.nii.gz").write_bytes((out / "0001-A-S1" / "T1_pred.nii.gz").read_bytes())
    rc = main(["evaluate", "--pred", str(out), "--truth", str(data), "--json", str(tmp_path / "e.json")])
    err = capsys.readouterr().err
    assert rc == 1 and "0001-A-S1/GED4_pred.nii.gz" in err and "size" in err
    report = json.loads((tmp_path / "e.json").read_text())
    assert list(report["cases"]) == ["0002-A-S2"] and len(report["errors"]) == 1


def test_predict_plain_folder(tmp_path, model_dir, capsys):
    from fedliver.cli import main
    from client.prediction import plain_jobs

    names = ["T1.nii.gz", "0007-C_T2.nii.gz", "0008-C_DWI_800.nii.gz", "case9_0000.nii.gz", "scan.nii",
             "mask_GED4.nii.gz", "notes.txt"]
    jobs, notes = plain_jobs([tmp_path / n for n in names], "0005-B1")
    assert [(j.case_id, j.phase) for j in jobs] == [
        ("0005-B1", "T1"), ("0007-C", "T2"), ("0008-C", "DWI_800"), ("case9", "GED4"), ("scan", "GED4")]
    assert notes == []

    folder = tmp_path / "plain"
    _write(_phantom((6, 30, 30)), folder / "liver7.nii.gz", spacing_xyz=(1.5, 1.5, 4.0))
    _write(_phantom((6, 30, 30), seed=2), folder / "liver8_T1.nii.gz", spacing_xyz=(1.5, 1.5, 4.0))
    out = tmp_path / "out"
    rc = main(["predict", "-i", str(folder), "-o", str(out), "-m", str(model_dir), "--branch", "a",
               "--phases", "T1"])
    assert rc == 0, capsys.readouterr().err
    assert [str(p.relative_to(out)) for p in out.rglob("*.nii.gz")] == ["liver8/T1_pred.nii.gz"]


def test_predict_refuses_tampered_model(tmp_path, model_dir, capsys):
    from fedliver.cli import main

    info = model_dir / "info.json"
    info.write_text(info.read_text().replace("1", "2"))
    rc = main(["predict", "-i", str(tmp_path), "-o", str(tmp_path / "o"), "-m", str(model_dir)])
    assert rc == 1 and "info.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_predict_uses_the_models_postprocessing(tmp_path, model_dir, capsys):
    from common.model_dir import load_model_dir, save_model_dir
    from fedliver.cli import main

    bundle = load_model_dir(model_dir)
    with_pp = tmp_path / "model_pp"
    save_model_dir(with_pp, bundle.branches, bundle.plans,
                   {"postprocessing": Postprocessing("largest-component", ("GED4",)).to_info()})
    image = _write(_phantom((9, 40, 36)), tmp_path / "in" / "0001-A_GED4.nii.gz", spacing_xyz=(1.5, 1.5, 3.0))
    for model, extra, expected in ((model_dir, [], "none"), (with_pp, [], "largest-component (GED4)"),
                                   (with_pp, ["--postprocessing", "none"], "none"),
                                   (model_dir, ["--postprocessing", "largest-component"], "largest-component (every phase)")):
        rc = main(["predict", "-i", str(image), "-o", str(tmp_path / "out"), "-m", str(model), *extra])
        assert rc == 0 and f"postprocessing {expected}," in capsys.readouterr().out


def test_postprocessing_choice_per_phase():
    chosen = Postprocessing.from_info(Postprocessing("largest-component", ("GED4", "GED3")).to_info())
    assert [chosen.for_phase(p) for p in ("GED4", "GED3", "T2")] == ["largest-component", "largest-component", "none"]
    assert Postprocessing.from_info("largest-component").for_phase("DWI_800") == "largest-component"
    assert Postprocessing.from_info(None).for_phase("GED4") == "none"
    with pytest.raises(ValueError, match="postprocessing"):
        Postprocessing("erode")
