"""Federated fingerprint: merging per-site aggregates equals fingerprinting the pooled data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from common.fingerprint import (
    FingerprintConfig,
    SiteFingerprint,
    compute_site_fingerprint,
    merge_fingerprints,
)

# (shape zyx, spacing xyz, intensity scale, labeled): two vendors, 0-255-like and raw 0-4000-like.
VOLUMES = [
    ((10, 40, 44), (0.80, 0.80, 4.0), 100.0, True),
    ((12, 44, 40), (0.90, 0.90, 5.0), 120.0, False),
    ((9, 48, 48), (0.75, 0.75, 6.0), 2000.0, True),
    ((14, 40, 40), (1.00, 1.00, 3.0), 1800.0, True),
    ((11, 36, 44), (0.90, 0.90, 4.5), 90.0, False),
    ((10, 42, 46), (0.85, 0.85, 5.5), 150.0, True),
]
MARGIN = 2  # zero border around the nonzero box: the crop removes it


def _make(folder: Path, i: int) -> tuple[Path, Path | None, dict]:
    """One volume with a known nonzero box; returns the truth computed here, independently of the code."""
    shape, spacing, scale, labeled = VOLUMES[i]
    rng = np.random.default_rng(i)
    image = np.zeros(shape, np.float32)
    box = tuple(slice(MARGIN, n - MARGIN) for n in shape)
    image[box] = rng.gamma(9.0, scale / 9.0, [n - 2 * MARGIN for n in shape]) + 1.0
    mask = np.zeros(shape, np.uint8)
    mask[3:-3, 8:-10, 6:-12] = 1
    img = sitk.GetImageFromArray(image)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(folder / f"im{i}.nii.gz"))
    mask_path = None
    if labeled:
        m = sitk.GetImageFromArray(mask)
        m.CopyInformation(img)
        mask_path = folder / f"lb{i}.nii.gz"
        sitk.WriteImage(m, str(mask_path))
    reread = sitk.ReadImage(str(folder / f"im{i}.nii.gz"))  # NIfTI stores float32 spacings
    truth = {"spacing": list(reread.GetSpacing())[::-1], "shape": [n - 2 * MARGIN for n in shape],
             "fg": image[mask > 0].astype(np.float64) if labeled else None}
    return folder / f"im{i}.nii.gz", mask_path, truth


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp")
    made = [_make(folder, i) for i in range(len(VOLUMES))]
    pairs = [(img, mask) for img, mask, _ in made]
    truths = [t for _, _, t in made]
    sites = [compute_site_fingerprint(pairs[k:k + 2]) for k in (0, 2, 4)]
    merged = merge_fingerprints([SiteFingerprint.from_arrays(s.to_arrays()) for s in sites])
    pooled = compute_site_fingerprint(pairs)
    return pairs, truths, merged, pooled


def test_merge_is_exact_for_moments(dataset):
    _, truths, merged, pooled = dataset
    fg = np.concatenate([t["fg"] for t in truths if t["fg"] is not None])
    assert merged.num_images == pooled.num_images == 6
    assert merged.num_labeled == pooled.num_labeled == 4
    m = merged.stats["intensity"].moments
    assert int(m.count[0]) == fg.size
    assert np.isclose(m.mean[0], fg.mean(), rtol=1e-12)
    assert np.isclose(m.std[0], fg.std(), rtol=1e-10)
    assert m.min[0] == fg.min() and m.max[0] == fg.max()
    spacings = np.array([t["spacing"] for t in truths])
    shapes = np.array([t["shape"] for t in truths], float)
    for name, values in (("spacing", spacings), ("shape", shapes), ("extent", spacings * shapes)):
        mm = merged.stats[name].moments
        assert np.allclose(mm.mean, values.mean(0), rtol=1e-12)
        assert np.allclose(mm.std, values.std(0), rtol=1e-9, atol=1e-12)
        assert np.array_equal(mm.min, values.min(0)) and np.array_equal(mm.max, values.max(0))
    # merged and pooled histograms are identical
    a, b = merged.to_arrays(), pooled.to_arrays()
    assert a.keys() == b.keys()
    for k in a:
        assert np.allclose(a[k], b[k], rtol=1e-12), k


def test_percentiles_within_one_bin(dataset):
    _, truths, merged, _ = dataset
    fg = np.concatenate([t["fg"] for t in truths if t["fg"] is not None])
    for q in (0.5, 50.0, 99.5):
        true = np.percentile(fg, q)
        est = merged.percentile("intensity", q)[0]
        assert abs(est - true) <= merged.bin_width("intensity", true), q
    props = merged.intensity_properties()
    assert props["percentile_00_5"] < props["median"] < props["percentile_99_5"]
    spacings = np.array([t["spacing"] for t in truths])
    shapes = np.array([t["shape"] for t in truths], float)
    cfg = merged.config
    assert np.all(np.abs(merged.percentile("spacing", 50) - np.median(spacings, 0)) <= cfg.spacing_bin_width)
    assert np.all(np.abs(merged.percentile("shape", 50) - np.median(shapes, 0)) <= cfg.shape_bin_width)


def test_nnunet_fingerprint_reproduces_planner_percentiles(dataset):
    _, truths, merged, _ = dataset
    nn = merged.to_nnunet_fingerprint()
    spacings = np.array([t["spacing"] for t in truths])
    synth = np.array(nn["spacings"])
    assert synth.shape == spacings.shape and len(nn["shapes_after_crop"]) == 6
    for q in (10, 50):  # what nnU-Net's planner takes: median, and 10th percentile of an anisotropic axis
        assert np.all(np.abs(np.percentile(synth, q, 0) - np.percentile(spacings, q, 0))
                      <= merged.config.spacing_bin_width)
    props = nn["foreground_intensity_properties_per_channel"]["0"]
    assert set(props) == {"mean", "median", "std", "min", "max", "percentile_00_5", "percentile_99_5"}
    assert 0 < nn["median_relative_size_after_cropping"] < 1


def test_arrays_carry_only_numeric_aggregates(dataset):
    pairs, _, merged, _ = dataset
    arrays = merged.to_arrays()
    assert all(isinstance(v, np.ndarray) and v.dtype.kind in "if" for v in arrays.values())
    # nothing scales with the number of voxels or cases: fixed sizes from the config alone
    empty = SiteFingerprint(config=merged.config).to_arrays()
    assert {k: v.shape for k, v in arrays.items()} == {k: v.shape for k, v in empty.items()}
    with pytest.raises(ValueError, match="lack"):
        SiteFingerprint.from_arrays({k: v for k, v in arrays.items() if k != "spacing_hist"})
    broken = dict(arrays, shape_hist=arrays["shape_hist"][:, :5])
    with pytest.raises(ValueError):
        SiteFingerprint.from_arrays(broken)


def test_merge_refuses_different_edges(dataset):
    pairs, _, merged, _ = dataset
    other = compute_site_fingerprint(pairs[:1], FingerprintConfig(spacing_bin_width=0.05))
    with pytest.raises(ValueError, match="configs differ"):
        merge_fingerprints([merged, other])


def test_bad_files_become_problems(dataset, tmp_path):
    pairs, _, _, _ = dataset
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"garbage")
    wrong = tmp_path / "wrong_mask.nii.gz"
    sitk.WriteImage(sitk.Image([5, 5, 5], sitk.sitkUInt8), str(wrong))
    problems = []
    fp = compute_site_fingerprint([(junk, None), pairs[0], (pairs[2][0], wrong)], problems=problems)
    assert fp.num_images == 1 and fp.num_labeled == 1
    assert [p.path for p in problems] == [junk, wrong]
    assert "does not match" in problems[1].message and "\n" not in str(problems[0])
    with pytest.raises(Exception):
        compute_site_fingerprint([(junk, None)])
