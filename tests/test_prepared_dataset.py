"""A site's prepared dataset (issue 10 §1): each file is read once per change; messages read the cache.

Counts, not timings: an unchanged site reads no voxel to be indexed, fingerprinted or preprocessed;
a changed or added file is read again, and only it. Evaluation from the cached volumes scores as
evaluation from the raw files does.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import common.validation as validation
from client.evaluation import evaluate_pairs
from client.site import SiteData, SiteIdentity
from common.fingerprint import compute_site_fingerprint
from common.planning import default_test_plans
from common.preprocessing import PreprocessingCache
from common.stunet import build_stunet_from_plans
from fedliver.cli import main
from simulations.phantoms import PhantomConfig, generate_liqa_tree

PLANS = default_test_plans(patch_size=(16, 32, 32), spacing=(8.0, 6.0, 6.0))


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepared_phantoms")
    generate_liqa_tree(root, PhantomConfig(centers=("A",), cases=3, labeled=2, seed=11, heldout=(),
                                           test_cases=1, validation_cases=1))
    return root


@pytest.fixture()
def site_root(phantoms, tmp_path) -> Path:
    """A private copy: tests change files in it."""
    return Path(shutil.copytree(phantoms / "Vendor_A", tmp_path / "data" / "Vendor_A", copy_function=shutil.copy2))


def _site(data: Path, cache: Path) -> SiteData:
    return SiteData(SiteIdentity(site="A", role="train", data_dir=data, cache_dir=cache, output_dir=cache / "out"))


@pytest.fixture()
def voxel_reads(monkeypatch) -> list[Path]:
    """Every file whose voxels validation streams (the real function, counted)."""
    reads: list[Path] = []
    real = validation.voxel_stats

    def counted(path, **kwargs):
        reads.append(Path(path))
        return real(path, **kwargs)

    monkeypatch.setattr(validation, "voxel_stats", counted)
    return reads


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.nii.gz"))


def _rewrite(path: Path, change) -> None:
    """Write `path` again with its voxels changed by `change` (same grid), and a later mtime."""
    image = sitk.ReadImage(str(path))
    array = change(sitk.GetArrayFromImage(image))
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    stat = path.stat()
    sitk.WriteImage(out, str(path), True)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def test_index_reads_each_file_once_per_change(site_root, tmp_path, voxel_reads):
    cache = tmp_path / "cache"
    first = _site(site_root, cache)
    cases = [c.case_id for c in first.cases]
    files = _files(site_root)
    assert first.index.problems == [] and len(cases) == 5
    assert first.file_checks.read == len(files) and sorted(set(voxel_reads)) == files

    voxel_reads.clear()
    again = _site(site_root, cache)  # a new message: a fresh process would build this anew
    assert [c.case_id for c in again.cases] == cases
    assert again.cases == first.cases
    assert (again.file_checks.read, again.file_checks.reused, voxel_reads) == (0, len(files), [])

    # One image changes (it gets a NaN): only it is read, and its finding is reported, then stored.
    phase, changed = next((p, f) for p, f in first.cases[0].images.items() if p != "GED4")
    _rewrite(changed, lambda a: np.where(np.arange(a.size).reshape(a.shape) == 0, np.nan, a).astype(np.float32))
    third = _site(site_root, cache)
    problems = third.index.problems
    assert third.file_checks.read == 1 and voxel_reads == [changed]
    assert [str(p) for p in problems] == [f"{changed}: contains 1 NaN/Inf voxels (phase {phase} skipped)"]
    assert phase not in third.cases[0].images
    voxel_reads.clear()
    fourth = _site(site_root, cache)
    assert fourth.index.cases == third.index.cases
    assert (fourth.file_checks.read, voxel_reads) == (0, [])
    assert [str(p) for p in fourth.index.problems] == [str(p) for p in third.index.problems]  # still reported

    # An added case: its files, and only those, are read.
    shutil.copytree(site_root / cases[1], site_root / "0099-A-S2", copy_function=shutil.copy2)
    added = _files(site_root / "0099-A-S2")
    fifth = _site(site_root, cache)
    assert "0099-A-S2" in [c.case_id for c in fifth.cases]
    assert fifth.file_checks.read == len(added) and sorted(voxel_reads) == added


def test_fingerprint_is_kept_per_volume_and_equals_a_fresh_one(site_root, tmp_path):
    cache = tmp_path / "cache"
    site = _site(site_root, cache)
    pairs = site.fingerprint_pairs()
    fresh = compute_site_fingerprint(pairs).to_arrays()
    first, stats = site.fingerprint()
    assert (stats.computed, stats.reused) == (len(pairs), 0)
    again, stats = _site(site_root, cache).fingerprint()
    assert (stats.computed, stats.reused) == (0, len(pairs))
    for fp in (first, again):
        arrays = fp.to_arrays()
        assert arrays.keys() == fresh.keys()
        for name in fresh:
            np.testing.assert_allclose(arrays[name], fresh[name], rtol=1e-12, err_msg=name)

    image, _ = pairs[0]
    _rewrite(image, lambda a: (a * 1.5).astype(a.dtype))
    changed, stats = _site(site_root, cache).fingerprint()
    assert (stats.computed, stats.reused) == (1, len(pairs) - 1)
    expected = compute_site_fingerprint(pairs).to_arrays()
    np.testing.assert_allclose(changed.to_arrays()["intensity_sum"], expected["intensity_sum"], rtol=1e-12)


def test_preprocessed_volumes_are_trusted_by_stamp_and_hashed_only_when_touched(site_root, tmp_path, monkeypatch):
    import common.preprocessing as preprocessing

    cache = tmp_path / "cache"
    volumes = _site(site_root, cache).training_volumes(PLANS)
    assert volumes.problems == [] and volumes.labeled and volumes.unlabeled
    assert all(v.foreground() is not None and len(v.foreground()) for v in volumes.labeled)
    assert all(v.foreground() is None for v in volumes.unlabeled)

    opened: list[str] = []  # every input file hashed or preprocessed (the real functions, counted)
    for name in ("sha256_file", "preprocess_image"):
        real = getattr(preprocessing, name)
        monkeypatch.setattr(preprocessing, name, lambda *a, _real=real, _name=name, **k: opened.append(_name) or _real(*a, **k))
    site = _site(site_root, cache)
    assert site.training_volumes(PLANS) == volumes
    assert opened == []  # a train message on an unchanged site: not one input file read

    case, phase = site.labeled_pairs()[0]
    image = case.images[phase]
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # touched, same bytes
    touched = PreprocessingCache(cache / "preprocessed", PLANS)
    touched.get(case, phase, with_mask=True)
    assert (touched.computed, touched.hashed) == (0, 2)
    untouched = PreprocessingCache(cache / "preprocessed", PLANS)
    untouched.get(case, phase, with_mask=True)
    assert (untouched.computed, untouched.hashed) == (0, 0)  # the new stamp was stored

    _rewrite(image, lambda a: (a * 2).astype(a.dtype))
    rewritten = PreprocessingCache(cache / "preprocessed", PLANS)
    data, _, _ = rewritten.get(case, phase, with_mask=True).load()
    assert rewritten.computed == 1 and np.isfinite(data).all()


def test_evaluation_from_the_cache_scores_as_from_the_raw_files(site_root, tmp_path, one_thread):
    site = _site(site_root, tmp_path / "cache")
    torch.manual_seed(3)
    nets = [build_stunet_from_plans(PLANS, deep_supervision=False).eval() for _ in range(2)]
    pairs = site.test_pairs() + site.validation_pairs()
    assert len(pairs) >= 3
    raw = evaluate_pairs(nets, PLANS, pairs, log=lambda line: None)
    cache = site.preprocessing_cache(PLANS)
    cached = evaluate_pairs(nets, PLANS, pairs, log=lambda line: None, cache=cache)
    assert cache.computed == len(pairs) and raw.problems == cached.problems == []
    assert raw.per_phase.keys() == cached.per_phase.keys()
    for phase, scores in raw.per_phase.items():
        assert cached.per_phase[phase].dice == pytest.approx(scores.dice, abs=1e-9)
        assert cached.per_phase[phase].hd95 == pytest.approx(scores.hd95, abs=1e-6)
    for phase, (image, prediction, truth) in raw.examples.items():
        np.testing.assert_array_equal(cached.examples[phase][1], prediction)
    # the second evaluation (another message: a new process) reads the cache only
    reused = _site(site_root, tmp_path / "cache").preprocessing_cache(PLANS)
    evaluate_pairs(nets, PLANS, pairs, log=lambda line: None, cache=reused)
    assert (reused.computed, reused.hashed) == (0, 0)


def test_fedliver_prepare_builds_then_only_refreshes(site_root, tmp_path, capsys):
    plans_file = tmp_path / "plans.json"
    plans_file.write_text(__import__("json").dumps(PLANS))
    cache = tmp_path / "site-cache"
    args = ["prepare", str(site_root), "--cache", str(cache), "--plans", str(plans_file)]
    assert main(args) == 0
    first = capsys.readouterr().out
    files = len(_files(site_root))
    assert f"{files} files read and checked, 0 unchanged" in first
    assert "preprocessed now" in first and " 0 preprocessed now" not in first

    assert main(args) == 0
    second = capsys.readouterr().out
    assert f"0 files read and checked, {files} unchanged" in second
    assert "fingerprint: 0 volumes read" in second
    assert " 0 preprocessed now, 0 files hashed" in second

    # The ClientApp's messages then find everything prepared.
    site = _site(site_root, cache)
    volumes = site.training_volumes(PLANS, propagate_labels=True)  # as prepared: run config propagate-labels
    assert site.file_checks.read == 0 and volumes.labeled
    assert site.preprocessing_cache(PLANS).computed == 0


def test_fedliver_prepare_names_a_missing_folder(tmp_path, capsys):
    assert main(["prepare", str(tmp_path / "nowhere"), "--cache", str(tmp_path / "c")]) == 1
    assert "nowhere: no such folder" in capsys.readouterr().err


def test_a_labeled_entry_serves_the_image_alone_without_a_second_entry(site_root, tmp_path):
    site = _site(site_root, tmp_path / "cache")
    case, phase = site.labeled_pairs()[0]
    cache = site.preprocessing_cache(PLANS)
    labeled = cache.get(case, phase, with_mask=True)
    image_only = cache.get(case, phase, with_mask=False)  # evaluation asks for the image only
    assert cache.computed == 1 and image_only.seg_file is None and image_only.foreground() is None
    np.testing.assert_array_equal(image_only.load()[0], labeled.load()[0])
    again = PreprocessingCache(tmp_path / "cache" / "preprocessed", PLANS)
    assert again.get(case, phase, with_mask=True).seg_file is not None  # the labeled entry is still whole
    assert (again.computed, again.hashed) == (0, 0)
