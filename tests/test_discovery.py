"""Case discovery on LiQA and nnU-Net raw layouts, and `fedliver check`, on real NIfTI trees."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from common.discovery import Case, Problem, detect_layout, index_dataset, liver_labels, phase_for_channel
from common.validation import ValidationError
from fedliver.cli import main

SHAPE_ZYX = (16, 32, 32)


def blob(value: int = 1) -> np.ndarray:
    z, y, x = np.ogrid[: SHAPE_ZYX[0], : SHAPE_ZYX[1], : SHAPE_ZYX[2]]
    inside = ((z - 8) / 5) ** 2 + ((y - 16) / 10) ** 2 + ((x - 16) / 10) ** 2 <= 1
    return (inside * value).astype(np.uint8)


def write(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 2.5)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def image(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(40, 8, SHAPE_ZYX) + 80 * blob()).astype(np.float32)


def make_case(folder: Path, phases=("GED4", "T1"), masks=("GED4",)) -> Path:
    for i, phase in enumerate(phases):
        write(folder / f"{phase}.nii.gz", image(i))
    for phase in masks:
        write(folder / f"mask_{phase}.nii.gz", blob())
    return folder


@pytest.fixture()
def liqa(tmp_path: Path) -> Path:
    root = tmp_path / "LiQA"
    make_case(root / "Vendor_A" / "0001-A-S2", ("GED4", "T1", "T2"), ("GED4",))
    make_case(root / "Vendor_A" / "0002-A-S4", ("GED4", "DWI_800"), ())
    make_case(root / "Vendor_B1" / "0001-B1", ("GED4", "T2"), ("GED4", "T2"))  # validation style
    return root


def test_liqa_root(liqa):
    index = index_dataset(liqa)
    assert index.layout == "liqa" and index.problems == []
    assert index.centers == ["A", "B1"]
    cases = {c.case_id: c for c in index.cases}
    assert set(cases) == {"0001-A-S2", "0002-A-S4", "0001-B1"}
    a1, a2, b1 = cases["0001-A-S2"], cases["0002-A-S4"], cases["0001-B1"]
    assert (a1.center, a1.stage, a2.stage, b1.center, b1.stage) == ("A", 2, 4, "B1", None)
    assert list(a1.images) == ["GED4", "T1", "T2"]  # PHASES order
    assert a1.images["T1"] == liqa / "Vendor_A" / "0001-A-S2" / "T1.nii.gz"
    assert dict(a1.masks) == {"GED4": liqa / "Vendor_A" / "0001-A-S2" / "mask_GED4.nii.gz"}
    assert a2.masks == {} and not a2.labeled
    assert set(b1.masks) == {"GED4", "T2"} and b1.foreground_labels == (1,)
    # Without validation: the same cases from a folder walk alone.
    assert index_dataset(liqa, validate=False).cases == index.cases
    assert pickle.loads(pickle.dumps(index.cases)) == index.cases


def test_centers_filter_and_single_vendor_folder(liqa):
    only_b1 = index_dataset(liqa, centers=["B1"])
    assert [c.case_id for c in only_b1.cases] == ["0001-B1"] and only_b1.problems == []
    missing = index_dataset(liqa, centers=["A", "C"])
    assert {c.center for c in missing.cases} == {"A"}
    assert [str(p) for p in missing.problems] == [f"{liqa}: no Vendor_C folder"]
    vendor = index_dataset(liqa / "Vendor_A")
    assert vendor.layout == "liqa" and [c.case_id for c in vendor.cases] == ["0001-A-S2", "0002-A-S4"]
    assert {c.center for c in vendor.cases} == {"A"}


def test_unexpected_files_and_orphan_masks_are_problems_not_fatal(liqa):
    case = liqa / "Vendor_A" / "0001-A-S2"
    (case / "notes.txt").write_text("scanner log")
    (case / ".DS_Store").write_bytes(b"\0")  # hidden files are OS noise, skipped
    write(case / "mask_T1c.nii.gz", blob())
    write(case / "mask_DWI_800.nii.gz", blob())
    (liqa / "Vendor_A" / "stray.nii.gz").write_bytes(b"")
    index = index_dataset(liqa, validate=False)
    assert len(index.cases) == 3
    lines = {p.path.name: p.message for p in index.problems}
    assert lines == {
        "notes.txt": "unexpected file (ignored)",
        "mask_T1c.nii.gz": "unexpected file (ignored)",
        "mask_DWI_800.nii.gz": "mask without its image DWI_800.nii.gz (ignored)",
        "stray.nii.gz": "unexpected file (cases are folders)",
    }
    assert "DWI_800" not in next(c for c in index.cases if c.case_id == "0001-A-S2").masks


def test_summary(liqa):
    bad = liqa / "Vendor_A" / "0002-A-S4" / "DWI_800.nii.gz"
    bad.write_bytes(bad.read_bytes()[:300])
    text = index_dataset(liqa).summary()
    lines = text.splitlines()
    assert lines[0] == f"LiQA layout at {liqa}: 2 centers, 3 cases (2 labeled)"
    a = lines.index("center A: 2 cases, 1 labeled")
    assert lines[a + 1] == "  stages: S2 1, S4 1"
    table = {line.split()[0]: line.split()[1:] for line in lines[a + 3 : a + 6]}
    assert table == {"GED4": ["2", "1"], "T1": ["1", "0"], "T2": ["1", "0"]}  # DWI_800 was skipped
    assert "center B1: 1 case, 1 labeled" in lines and "  stages: unknown 1" in lines
    assert lines[-2] == "1 problem"
    assert lines[-1].startswith(f"{bad}: cannot read: ") and lines[-1].endswith("(phase DWI_800 skipped)")


def test_nnunet_raw_layout(tmp_path):
    root = tmp_path / "Dataset101_Liver"
    for i in range(3):
        write(root / "imagesTr" / f"liver_{i:03d}_0000.nii.gz", image(i))
    for i in range(2):
        write(root / "labelsTr" / f"liver_{i:03d}.nii.gz", blob())
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T2WI"}, "labels": {"background": 0, "liver": 1},
        "numTraining": 3, "file_ending": ".nii.gz"}))
    index = index_dataset(root)
    assert index.layout == "nnunet" and index.problems == []
    assert [c.case_id for c in index.cases] == ["liver_000", "liver_001", "liver_002"]
    first = index.cases[0]
    assert (first.center, first.stage, first.foreground_labels) == ("", None, (1,))
    assert first.images == {"T2": root / "imagesTr" / "liver_000_0000.nii.gz"}
    assert first.masks == {"T2": root / "labelsTr" / "liver_000.nii.gz"}
    assert index.cases[2].masks == {}
    assert "center (none): 3 cases, 2 labeled" in index.summary()


def test_atlas_naming_label_2_is_liver(tmp_path):
    root = tmp_path / "ATLAS"
    tumor = blob()
    tumor[8, 14:18, 14:18] = 2
    for n in (0, 1):
        write(root / "imagesTr" / f"im{n}.nii.gz", image(n))
        write(root / "labelsTr" / f"lb{n}.nii.gz", tumor)
    write(root / "labelsTr" / "lb7.nii.gz", blob())  # no im7
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "liver": 1, "tumor": 2}, "file_ending": ".nii.gz"}))
    index = index_dataset(root)
    assert [c.case_id for c in index.cases] == ["im0", "im1"]
    case = index.cases[0]
    assert case.foreground_labels == (1, 2)
    assert case.images == {"GED4": root / "imagesTr" / "im0.nii.gz"}  # "MRI" is no LiQA phase
    assert case.masks == {"GED4": root / "labelsTr" / "lb0.nii.gz"}  # value 2 is declared, so valid
    assert [str(p) for p in index.problems] == [f"{root / 'labelsTr' / 'lb7.nii.gz'}: mask without its image (ignored)"]
    # Without dataset.json, ATLAS naming alone implies liver 1 and tumor 2.
    (root / "dataset.json").unlink()
    assert index_dataset(root, validate=False).cases[0].foreground_labels == (1, 2)


def test_declared_non_liver_labels(tmp_path):
    root = tmp_path / "Dataset102"
    kidney = blob()
    kidney[0, 0, 0] = 3
    write(root / "imagesTr" / "a_0000.nii.gz", image())
    write(root / "labelsTr" / "a.nii.gz", kidney)
    write(root / "imagesTr" / "b_0000.nii.gz", image(1))
    write(root / "labelsTr" / "b.nii.gz", blob(5))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "GED4"}, "labels": {"background": 0, "Liver": 1, "kidney": 3},
        "file_ending": ".nii.gz"}))
    index = index_dataset(root, centers=["A"])
    assert [(c.case_id, list(c.masks)) for c in index.cases] == [("a", ["GED4"]), ("b", [])]
    assert index.cases[0].foreground_labels == (1,)
    assert [p.message for p in index.problems] == [
        "nnU-Net raw layout has no centers (filter A ignored)",
        "mask has values outside the declared labels [0, 1, 3]: values {0, 5} (mask ignored; GED4 used unlabeled)",
    ]


def test_label_rule_and_channel_names():
    assert liver_labels({"background": 0, "liver": 1, "tumor": 2}) == ((1, 2), (0, 1, 2))
    assert liver_labels({"background": 0, "Liver": 1, "spleen": 2, "hepatic lesion": 4}) == ((1, 4), (0, 1, 2, 4))
    assert liver_labels({"background": 0, "liver": [1, 2], "tumour": 2}) == ((1, 2), (0, 1, 2))  # region-based
    assert liver_labels({"background": 0, "kidney": 1}) == ((), (0, 1))
    names = ("t1", "T2WI", "DWI", "GED2", "MRI")
    assert [phase_for_channel(n) for n in names] == ["T1", "T2", "DWI_800", "GED2", "GED4"]


def test_not_a_dataset(tmp_path):
    with pytest.raises(ValidationError, match="not a dataset"):
        detect_layout(tmp_path)
    with pytest.raises(ValidationError, match="no such folder"):
        index_dataset(tmp_path / "nowhere")


def test_problem_is_one_line():
    assert str(Problem(Path("/d/GED4.nii.gz"), "image is empty")) == "/d/GED4.nii.gz: image is empty"
    case = Case("im3", "", None, images={"GED4": "/d/im3.nii.gz"}, masks={})
    assert case.images["GED4"] == Path("/d/im3.nii.gz")
    assert hash(case) == hash(Case("im3", "", None, {"GED4": Path("/d/im3.nii.gz")}, {}))


def test_check_command_reports_bad_files(liqa, capsys):
    a1 = liqa / "Vendor_A" / "0001-A-S2"
    truncated = a1 / "T1.nii.gz"
    truncated.write_bytes(truncated.read_bytes()[:400])
    garbage = a1 / "T2.nii.gz"
    garbage.write_bytes(b"not an image at all")
    two = blob()
    two[8, 16, 16] = 2
    nonbinary = write(liqa / "Vendor_B1" / "0001-B1" / "mask_GED4.nii.gz", two)
    flat = write(liqa / "Vendor_A" / "0002-A-S4" / "GED4.nii.gz", image()[0])  # 2D
    (a1 / "readme.md").write_text("hi")
    assert main(["check", str(liqa)]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert f"{truncated}: cannot read: " in out
    assert f"{garbage}: cannot read: not a gzip file (phase T2 skipped)" in lines
    assert f"{nonbinary}: mask is not binary: values {{0, 1, 2}} (mask ignored; GED4 used unlabeled)" in lines
    assert f"{flat}: expected a 3D image, got 2D (shape (32, 32)) (phase GED4 skipped)" in lines
    assert f"{a1 / 'readme.md'}: unexpected file (ignored)" in lines
    assert "5 problems" in lines
    # The good parts are still indexed: 3 cases; 0001-B1 keeps its T2 mask, 0002-A-S4 its DWI_800.
    assert lines[0].endswith("2 centers, 3 cases (2 labeled)")
    assert "center B1: 1 case, 1 labeled" in lines
    b1 = lines.index("center B1: 1 case, 1 labeled")
    assert lines[b1 + 3 : b1 + 5] == ["  GED4          1      0", "  T2            1      1"]


def test_check_command_clean_tree_and_centers(liqa, capsys):
    assert main(["check", str(liqa), "--centers", "A"]) == 0
    out = capsys.readouterr().out
    assert "center A: 2 cases, 1 labeled" in out and "center B1" not in out and "0 problems" in out
    assert main(["check", str(liqa / "missing")]) == 1
    assert capsys.readouterr().err.strip() == f"{liqa / 'missing'}: no such folder"


def test_nnunet_multi_channel_shares_one_label(tmp_path):
    root = tmp_path / "Dataset103"
    write(root / "imagesTr" / "c1_0000.nii.gz", image(0))
    write(root / "imagesTr" / "c1_0001.nii.gz", image(1))
    write(root / "imagesTr" / "c1_0002.nii.gz", image(2))
    write(root / "labelsTr" / "c1.nii.gz", blob())
    (root / "labelsTr" / "notes.txt").write_text("x")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T2"},
                                                   "labels": {"background": 0, "liver": 1}}))
    index = index_dataset(root)
    [case] = index.cases
    assert list(case.images) == ["T1", "T2"]
    assert case.masks == {"T1": root / "labelsTr" / "c1.nii.gz", "T2": root / "labelsTr" / "c1.nii.gz"}
    assert sorted(p.message for p in index.problems) == [
        "channel 0002 is not in dataset.json channel_names (ignored)", "unexpected file (ignored)"]
