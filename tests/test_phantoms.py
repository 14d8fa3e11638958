"""The synthetic LiQA-like and ATLAS-like phantoms: layout and mask contract, determinism,
per-center geometry, mask/image alignment, contrast, missing phases, CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from common.phases import LABELED_PHASE, PHASES
from simulations.phantoms import PhantomConfig, generate_atlas_tree, generate_liqa_tree, render_case, write_preview
from simulations.phantoms.centers import PROFILES
from simulations.phantoms.contrast import Tissue
from simulations.phantoms.generator import present_phases

CENTERS = ("A", "B1", "B2", "C")
CONFIG = PhantomConfig(centers=CENTERS, cases=2, labeled=1, seed=7, heldout=("C",))


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("liqa")
    generate_liqa_tree(root, CONFIG)
    return root


def _read(path: Path) -> tuple[np.ndarray, sitk.Image]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image


def _geometry(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def _cases(root: Path, center: str) -> list[Path]:
    return sorted(p for p in (root / f"Vendor_{center}").iterdir() if p.is_dir())


def test_layout_and_mask_contract(tree: Path):
    assert sorted(p.name for p in tree.iterdir()) == [f"Vendor_{c}" for c in sorted(CENTERS)]
    for center in CENTERS:
        cases = _cases(tree, center)
        assert len(cases) == CONFIG.cases
        for number, case in enumerate(cases, start=1):
            assert re.fullmatch(rf"{number:04d}-{center}-S[1-4]", case.name), case.name
            files = {p.name for p in case.iterdir()}
            images = {f.removesuffix(".nii.gz") for f in files if not f.startswith("mask_")}
            masks = {f.removeprefix("mask_").removesuffix(".nii.gz") for f in files if f.startswith("mask_")}
            labeled = number <= CONFIG.labeled
            assert images <= set(PHASES) and images, case
            assert images == set(present_phases(CONFIG.seed, center, number - 1, labeled or center == "C",
                                                 CONFIG.missing_rate))
            if center == "C":            # held-out: a mask for every phase present, none for missing ones
                assert masks == images
            elif labeled:                # training, labeled: the hepatobiliary phase only
                assert masks == {LABELED_PHASE} and LABELED_PHASE in images
            else:
                assert masks == set()


def test_tree_passes_project_validation(tree: Path):
    from common.discovery import index_dataset

    index = index_dataset(tree)
    assert index.layout == "liqa"
    assert not index.problems, [str(p) for p in index.problems]
    assert len(index.cases) == len(CENTERS) * CONFIG.cases
    assert {c.center for c in index.cases} == set(CENTERS)


def test_same_seed_is_identical_and_other_centers_do_not_matter(tree: Path, tmp_path: Path):
    # only center A this time: its cases must not depend on which other centers were generated
    generate_liqa_tree(tmp_path, PhantomConfig(centers=("A",), cases=2, labeled=1, seed=CONFIG.seed, heldout=()))
    for case in _cases(tree, "A"):
        for f in sorted(case.iterdir()):
            other = tmp_path / "Vendor_A" / case.name / f.name
            a, ia = _read(f)
            b, ib = _read(other)
            assert a.dtype == b.dtype and np.array_equal(a, b), f
            assert _geometry(ia) == _geometry(ib), f
            assert f.read_bytes() == other.read_bytes(), f  # headers and compression too


def test_different_seed_differs(tree: Path):
    other = render_case("A", 0, CONFIG.seed + 1, PROFILES["demo"], [LABELED_PHASE]).phases[LABELED_PHASE]
    a, _ = _read(next(_cases(tree, "A")[0].glob(f"{LABELED_PHASE}.nii.gz")))
    b = sitk.GetArrayFromImage(other.image)
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_center_geometry_profiles(tree: Path):
    geoms = {}
    for center in CENTERS:
        case = _cases(tree, center)[0]
        _, ged4 = _read(case / "GED4.nii.gz")
        geoms[center] = _geometry(ged4)[:2] + (ged4.GetDirection(),)
        size, spacing = np.array(ged4.GetSize()), np.array(ged4.GetSpacing())
        # demo profile: small grids, a few mm in-plane, thick slices
        assert 3.0 <= spacing[:2].min() and spacing[:2].max() <= 4.2 and 5.0 <= spacing[2] <= 8.0
        assert 64 <= size[:2].min() and size[:2].max() <= 100 and 24 <= size[2] <= 36
        dwi = PROFILES["demo"].phase(center, "DWI_800")
        g = PROFILES["demo"].phase(center, "GED4")
        assert dwi.spacing_lr > g.spacing_lr and dwi.spacing_ap > g.spacing_ap and dwi.thickness > g.thickness
    assert len(set(geoms.values())) == len(CENTERS)            # every center distinct
    assert geoms["B1"][:2] != geoms["B2"][:2]                   # same vendor, other protocol
    assert geoms["B1"][2] == geoms["B2"][2]                     # ... same storage orientation
    assert geoms["C"][2] not in (geoms["A"][2], geoms["B1"][2])  # C stores its axes differently
    full = PROFILES["full"].phase("A", "GED4")
    assert (full.matrix_lr, full.matrix_ap) == (384, 320) and full.spacing_lr == 1.0 and full.thickness == 2.5


def test_masks_binary_aligned_and_bright_in_ged4(tree: Path):
    ring_structure = ndimage.generate_binary_structure(3, 1)
    ring_structure[0] = ring_structure[2] = False  # in-plane ring: slices are thick
    checked = 0
    for mask_file in sorted(tree.glob("Vendor_*/*/mask_*.nii.gz")):
        phase = mask_file.name.removeprefix("mask_").removesuffix(".nii.gz")
        m, mi = _read(mask_file)
        a, ai = _read(mask_file.with_name(f"{phase}.nii.gz"))
        assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 1}, mask_file
        assert _geometry(mi) == _geometry(ai), mask_file
        if phase == LABELED_PHASE:
            liver = m.astype(bool)
            ring = ndimage.binary_dilation(liver, ring_structure, iterations=2) & ~liver
            assert a[liver].mean() > 1.2 * a[ring].mean(), mask_file
            checked += 1
    assert checked >= 3


def test_phases_are_not_coregistered(tree: Path):
    """Each held-out mask follows its own phase: liver centroids differ by a few mm, not more."""
    case = _cases(tree, "C")[0]
    centroids = {}
    for mask_file in case.glob("mask_*.nii.gz"):
        m, mi = _read(mask_file)
        zyx = np.argwhere(m).mean(axis=0)
        centroids[mask_file.name] = np.array(mi.TransformContinuousIndexToPhysicalPoint(zyx[::-1].tolist()))
    points = np.array(list(centroids.values()))
    spread = np.linalg.norm(points - points.mean(axis=0), axis=1)
    assert len(points) >= 2 and spread.max() > 0.5 and spread.max() < 40.0


def test_phase_contrast_per_tissue():
    case = render_case("B1", 1, 3, PROFILES["demo"], ["T2", "GED1", "GED4"])
    means = {}
    for phase, img in case.phases.items():
        a = sitk.GetArrayFromImage(img.image).astype(float)
        means[phase] = {t: a[img.tissue == t].mean() for t in (Tissue.LIVER, Tissue.SPLEEN, Tissue.AORTA)
                        if (img.tissue == t).sum() > 5}
        mask = sitk.GetArrayFromImage(img.mask) > 0   # the mask is the liver of this very grid
        assert mask[img.tissue == Tissue.LIVER].all()
        assert np.isin(img.tissue[mask], [Tissue.LIVER, Tissue.PORTAL_VEIN, Tissue.HEPATIC_VEIN]).all()
    assert means["T2"][Tissue.LIVER] < means["T2"][Tissue.SPLEEN]         # T2: liver dark, spleen bright
    assert means["GED4"][Tissue.LIVER] > means["GED4"][Tissue.SPLEEN]     # hepatobiliary: liver bright
    assert means["GED1"][Tissue.AORTA] > means["GED1"][Tissue.LIVER]      # arterial: aorta bright


def test_missing_phases_sometimes_never_labeled_ged4():
    labeled = [present_phases(0, "A", case, True, 0.1) for case in range(200)]
    unlabeled = [present_phases(0, "A", case, False, 0.1) for case in range(200)]
    assert all(LABELED_PHASE in p for p in labeled)
    assert sum(len(p) < len(PHASES) for p in labeled + unlabeled) > 40
    assert any(LABELED_PHASE not in p for p in unlabeled)
    for phase in PHASES:  # every phase goes missing now and then, none too often
        gone = sum(phase not in p for p in unlabeled)
        assert 0 < gone < 60, (phase, gone)
    assert all(len(p) == len(PHASES) for p in (present_phases(0, "A", c, False, 0.0) for c in range(20)))


def test_atlas_tree(tmp_path: Path):
    root = generate_atlas_tree(tmp_path / "atlas", cases=2, seed=1)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T1CE"}
    assert meta["labels"] == {"background": 0, "liver": 1, "tumor": 2}
    assert meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz"
    assert sorted(p.name for p in (root / "imagesTr").iterdir()) == ["im0.nii.gz", "im1.nii.gz"]
    assert sorted(p.name for p in (root / "labelsTr").iterdir()) == ["lb0.nii.gz", "lb1.nii.gz"]
    values = set()
    for n in range(2):
        lb, li = _read(root / "labelsTr" / f"lb{n}.nii.gz")
        im, ii = _read(root / "imagesTr" / f"im{n}.nii.gz")
        assert _geometry(li) == _geometry(ii)
        assert set(np.unique(lb)) <= {0, 1, 2} and (lb == 1).sum() > 1000
        values |= set(np.unique(lb).tolist())
        assert im[lb == 2].mean() < im[lb == 1].mean()  # portal-venous: lesions hypo-enhancing
    assert values == {0, 1, 2}
    from common.discovery import index_dataset

    index = index_dataset(root)  # the project reads it as an nnU-Net raw set, liver = 1 or 2
    assert index.layout == "nnunet" and not index.problems and len(index.cases) == 2
    assert index.cases[0].foreground_labels == (1, 2)



def test_multi_sequence_public_set(tmp_path: Path):
    """Extra sequences: one case per subject and sequence, each read as its phase, T1CE unchanged."""
    from common.discovery import index_dataset

    plain = generate_atlas_tree(tmp_path / "atlas", cases=2, seed=1)
    root = generate_atlas_tree(tmp_path / "ms", cases=2, seed=1, sequences=("T1CE", "T1", "T2", "DWI"))
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T1CE", "1": "T1", "2": "T2", "3": "DWI"} and meta["numTraining"] == 8
    index = index_dataset(root)
    assert not index.problems and len(index.cases) == 8
    phases = sorted(phase for case in index.cases for phase in case.masks)
    assert phases == sorted(["GED4", "T1", "T2", "DWI_800"] * 2)  # T1CE is the labeled-phase channel
    # T1CE is the ATLAS case, voxel for voxel; the other sequences look different.
    t1ce, _ = _read(root / "imagesTr" / "ms001t1ce_0000.nii.gz")
    atlas, _ = _read(plain / "imagesTr" / "im1.nii.gz")
    assert np.array_equal(t1ce, atlas)
    t2, _ = _read(root / "imagesTr" / "ms001t2_0002.nii.gz")
    t2_mask, _ = _read(root / "labelsTr" / "ms001t2.nii.gz")
    assert t2[t2_mask > 0].mean() < np.percentile(t2[t2 > 0], 90)  # T2: the liver is not the bright organ
    with pytest.raises(ValueError, match="FLAIR"):
        generate_atlas_tree(tmp_path / "bad", cases=1, seed=1, sequences=("T1CE", "FLAIR"))

def test_cli_and_preview(tree: Path, tmp_path: Path, capsys):
    from fedliver.cli import main

    assert main(["phantoms", str(tmp_path / "p"), "--centers", "A,X9", "--cases", "1", "--labeled", "1",
                 "--seed", "2", "--heldout", "X9"]) == 0
    out = capsys.readouterr().out
    assert "Vendor_A [train]" in out and "Vendor_X9 [heldout]" in out and "GED4" in out
    assert (tmp_path / "p" / "Vendor_A").is_dir() and list((tmp_path / "p" / "Vendor_X9").glob("*/mask_GED4.nii.gz"))
    assert main(["phantoms", str(tmp_path / "q"), "--centers", "A/../x"]) == 2
    assert main(["phantoms", str(tmp_path / "q"), "--centers", "A", "--heldout", "C"]) == 2
    assert "not among" in capsys.readouterr().err
    png = write_preview(tree, tmp_path / "preview.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_test_and_validation_cases_after_the_training_cases(tree: Path, tmp_path: Path, capsys):
    from fedliver.cli import main

    out = tmp_path / "split"
    assert main(["phantoms", str(out), "--centers", "A,C", "--cases", str(CONFIG.cases), "--labeled",
                 str(CONFIG.labeled), "--seed", str(CONFIG.seed), "--test-cases", "2", "--validation-cases", "1"]) == 0
    assert "Vendor_A [train]: 2 cases, 1 labeled + 2 test, 1 validation (splits.json)" in capsys.readouterr().out
    cases = _cases(out, "A")
    assert len(cases) == CONFIG.cases + 3
    # the training cases are those of the same --cases without the new flags, byte for byte
    for case in cases[: CONFIG.cases]:
        old = tree / "Vendor_A" / case.name
        assert sorted(p.name for p in case.iterdir()) == sorted(p.name for p in old.iterdir())
        assert all(f.read_bytes() == (old / f.name).read_bytes() for f in case.iterdir()), case
    test, validation = cases[CONFIG.cases : CONFIG.cases + 2], cases[CONFIG.cases + 2 :]
    splits = json.loads((out / "Vendor_A" / "splits.json").read_text())
    assert splits == {"validation": [c.name for c in validation], "test": [c.name for c in test]}
    for number, case in enumerate(cases[CONFIG.cases :], start=CONFIG.cases + 1):
        assert case.name.startswith(f"{number:04d}-A-S")
        files = {p.name.removesuffix(".nii.gz") for p in case.iterdir()}
        images = {f for f in files if not f.startswith("mask_")}
        masks = {f.removeprefix("mask_") for f in files if f.startswith("mask_")}
        assert images == set(present_phases(CONFIG.seed, "A", number - 1, True, CONFIG.missing_rate))
        assert LABELED_PHASE in images
        assert masks == (images if case in test else {LABELED_PHASE}), case  # test: every phase present
    # a held-out centre gets no extra cases and no splits.json: every one of its cases is a test case
    assert [c.name for c in _cases(out, "C")] == [c.name for c in _cases(tree, "C")]
    assert not (out / "Vendor_C" / "splits.json").exists()

    from common.discovery import index_dataset

    index = index_dataset(out)
    assert not index.problems, [str(p) for p in index.problems]
    assert [c.split for c in index.cases if c.center == "A"] == ["train"] * CONFIG.cases + ["test"] * 2 + ["validation"]
    assert main(["phantoms", str(tmp_path / "bad"), "--test-cases", "-1"]) == 2
