"""Hostile input next to good cases (issue 12, section 4), through every entry point a site's data takes.

One small good site (three phantom cases, shrunk so that a prediction takes a fraction of a second)
gets one hostile item added per test id, and goes through:
- `fedliver check` (in-process `main`, file descriptors captured so SimpleITK's C++ warnings count):
  the exit status, and exactly the expected problem lines, each naming its file;
- the ClientApp: `query.identify` and `query.fingerprint` through the real `ClientApp` object
  (tests/inprocess_grid.py), then the training data the `train` handler builds
  (`SiteData.training_volumes`): every good case still used, the hostile item only where usable;
- `fedliver predict` with a tiny model: every good volume predicted, a bad one named in one line.
The hostile item alone (no good case beside it) must leave `check` and `predict` exiting non-zero
wherever nothing usable is left. The module prints the tally with `pytest -s`:
cases tried / clean errors / accepted / crashes / good cases lost.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

GOOD_CENTER = "A"
PLANS_SPACING = (12.0, 10.0, 10.0)  # coarse (z, y, x): small preprocessed volumes, one or two patches


# ------------------------------------------------------------------------------------------ outcomes
OUTCOMES: dict[str, dict[str, dict]] = {}  # case name -> path ("check", "clientapp", ...) -> outcome
ALLOWED: set[str] = set()  # hostile-looking inputs that are valid data (nothing to report)


@contextmanager
def outcome(case: str, path: str) -> Iterator[dict]:
    """Record how `path` handled `case`: "ok" unless an assertion ("unclear") or anything else ("crash") fails."""
    entry = {"status": "crash", "lost": set()}
    OUTCOMES.setdefault(case, {})[path] = entry
    try:
        yield entry
    except AssertionError:
        entry["status"] = "crash" if entry.get("traceback") else "unclear"
        raise
    except BaseException:
        entry["status"] = "crash"
        raise
    entry["status"] = "ok"


def tally() -> dict[str, int]:
    tried = len(OUTCOMES)
    crashes = sum(any(p["status"] == "crash" for p in paths.values()) for paths in OUTCOMES.values())
    unclear = sum(any(p["status"] == "unclear" for p in paths.values()) and
                  not any(p["status"] == "crash" for p in paths.values()) for paths in OUTCOMES.values())
    accepted = sum(name in ALLOWED and all(p["status"] == "ok" for p in paths.values())
                   for name, paths in OUTCOMES.items())
    clean = sum(name not in ALLOWED and all(p["status"] == "ok" for p in paths.values())
                for name, paths in OUTCOMES.items())
    lost = sum(len(set().union(*(p["lost"] for p in paths.values()))) for paths in OUTCOMES.values())
    return {"tried": tried, "clean errors": clean, "accepted": accepted, "unclear": unclear,
            "crashes": crashes, "good cases lost": lost}


@pytest.fixture(scope="module", autouse=True)
def _print_tally() -> Iterator[None]:
    yield
    if OUTCOMES:
        counts = tally()
        print("\nhostile inputs: " + " / ".join(f"{v} {k}" for k, v in counts.items()))
        for name, paths in OUTCOMES.items():
            print(f"  {name:<26} " + ", ".join(f"{p} {o['status']}" + (f" (lost {sorted(o['lost'])})" if o["lost"] else "")
                                              for p, o in paths.items()))
            for line in paths.get("check", {}).get("lines", []):
                print(f"      check: {line}")


# ------------------------------------------------------------------------------------------ good site
@dataclass(frozen=True)
class Good:
    """The good site: LiQA `liqa/Vendor_A` and the same GED4 cases as an nnU-Net raw dataset."""

    liqa: Path
    nnunet: Path
    labeled: frozenset[str]  # case ids with a labeled GED4
    unlabeled: frozenset[tuple[str, str]]  # (case, phase) trained on without labels (LiQA)
    predicted: frozenset[tuple[str, str]]  # (case, phase) predict must write (LiQA)
    ged4: Path  # a good labeled case's files, to build hostile cases from
    mask: Path
    t1: Path  # on its own grid, unlike GED4's
    model: Path
    cache: Path  # one preprocessing cache for every test: good volumes are preprocessed once

    @property
    def cases(self) -> frozenset[str]:
        return frozenset(c for c, _ in self.predicted)


def _shrink(image: sitk.Image) -> sitk.Image:
    return sitk.BinShrink(image, [3, 3, 1])  # 96 x 80 x 30 -> 32 x 26 x 30: a fraction of a second to predict


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Good:
    import torch

    from common.model_dir import save_model_dir
    from common.planning import default_test_plans
    from common.stunet import build_stunet_from_plans
    from simulations.phantoms.centers import PROFILES
    from simulations.phantoms.generator import render_case

    base = tmp_path_factory.mktemp("hostile")
    liqa = base / "good" / f"Vendor_{GOOD_CENTER}"
    keep: dict[str, tuple[str, ...]] = {}
    for number, phases in enumerate((("GED4", "T1"), ("GED4",), ("GED4",))):  # the generator's cases 1-3
        case = render_case(GOOD_CENTER, number, 3, PROFILES["demo"], phases)
        keep[case.case_id] = phases
        for phase in phases:
            image = _write(_shrink(case.phases[phase].image), liqa / case.case_id / f"{phase}.nii.gz")
            if number < 2 and phase == "GED4":  # labeled: the first two cases' GED4, as the generator does
                mask = sitk.Resample(case.phases[phase].mask, sitk.ReadImage(str(image)), sitk.Transform(),
                                     sitk.sitkNearestNeighbor)
                _write(mask, liqa / case.case_id / f"mask_{phase}.nii.gz")
    first, second, third = keep

    nnunet = base / "good" / "Dataset900_Hostile"
    for case in keep:
        shutil.copy(liqa / case / "GED4.nii.gz", _mkparent(nnunet / "imagesTr" / f"{case}_0000.nii.gz"))
        if (liqa / case / "mask_GED4.nii.gz").is_file():
            shutil.copy(liqa / case / "mask_GED4.nii.gz", _mkparent(nnunet / "labelsTr" / f"{case}.nii.gz"))
    (nnunet / "dataset.json").write_text(json.dumps(NNUNET_DATASET_JSON))

    plans = default_test_plans(patch_size=(16, 32, 32), spacing=PLANS_SPACING, base_width=2)
    torch.manual_seed(0)
    save_model_dir(base / "model", {"a": build_stunet_from_plans(plans).state_dict()}, plans, {"round": 1})
    return Good(liqa=liqa, nnunet=nnunet, labeled=frozenset({first, second}),
                unlabeled=frozenset({(first, "T1"), (third, "GED4")}),
                predicted=frozenset((c, p) for c, phases in keep.items() for p in phases),
                ged4=liqa / first / "GED4.nii.gz", mask=liqa / first / "mask_GED4.nii.gz", t1=liqa / first / "T1.nii.gz",
                model=base / "model", cache=base / "cache")


NNUNET_DATASET_JSON = {"channel_names": {"0": "GED4"}, "labels": {"background": 0, "liver": 1}, "numTraining": 3,
                       "file_ending": ".nii.gz"}


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(_mkparent(path)), useCompression=True)
    return path


# ------------------------------------------------------------------------------------------ hostile items
def _copy(src: Path, dst: Path) -> None:
    shutil.copy(src, _mkparent(dst))


def _labeled_case(folder: Path, g: Good, *, t1: bool = True) -> None:
    _copy(g.ged4, folder / "GED4.nii.gz")
    _copy(g.mask, folder / "mask_GED4.nii.gz")
    if t1:
        _copy(g.t1, folder / "T1.nii.gz")


def _patched(src: Path, dst: Path, edit: Callable[[bytearray], None], *, compress: bool = True) -> None:
    """`src` (a .nii.gz) with its decompressed NIfTI bytes edited, written to `dst`."""
    raw = bytearray(gzip.decompress(src.read_bytes()))
    edit(raw)
    _mkparent(dst).write_bytes(gzip.compress(bytes(raw)) if compress else bytes(raw))


def _pixdim(values: tuple[float, float, float]) -> Callable[[bytearray], None]:
    return lambda raw: struct.pack_into("<3f", raw, 80, *values)  # NIfTI-1 pixdim[1..3]


def build_grids_differ(root: Path, g: Good) -> None:
    """T1 on a grid of its own (spacing, origin, direction): allowed, phases are never registered."""
    folder = root / "0101-A-S2"
    _labeled_case(folder, g, t1=False)
    t1 = sitk.ReadImage(str(g.t1))
    t1.SetSpacing((9.0, 8.0, 5.0))
    t1.SetOrigin((40.0, -25.0, 120.0))
    t1.SetDirection((0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))  # 90 degrees about z
    _write(t1, folder / "T1.nii.gz")


def build_mask_off_grid(root: Path, g: Good) -> None:
    folder = root / "0102-A-S1"
    _copy(g.ged4, folder / "GED4.nii.gz")
    t1 = sitk.ReadImage(str(g.t1))
    mask = sitk.Resample(sitk.ReadImage(str(g.mask)), t1, sitk.Transform(), sitk.sitkNearestNeighbor)
    _write(mask, folder / "mask_GED4.nii.gz")  # the mask on T1's grid


def build_no_ged4(root: Path, g: Good) -> None:
    _copy(g.t1, root / "0103-A-S3" / "T1.nii.gz")
    _copy(g.t1, root / "0103-A-S3" / "T2.nii.gz")


def build_empty_case(root: Path, g: Good) -> None:
    (root / "0104-A-S1").mkdir(parents=True)


def build_not_nifti(root: Path, g: Good) -> None:
    folder = root / "0105-A-S2"
    _copy(g.t1, folder / "T1.nii.gz")
    _mkparent(folder / "GED4.nii.gz").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 8)  # a JPEG
    _copy(g.mask, folder / "mask_GED4.nii.gz")
    (folder / "T2.nii").write_text("scanner protocol notes, saved under an image name\n" * 40)
    (folder / "DWI_800.nii.gz").write_bytes(gzip.compress(b"%PDF-1.4 not an image\n" * 100))
    (folder / "scan.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)


def build_stray_files(root: Path, g: Good) -> None:
    (root / "notes.txt").write_text("site notes")
    _copy(g.ged4, root / "GED4.nii.gz")  # an image beside the case folders
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden: skipped silently
    case = root / sorted(g.labeled)[0]
    case.mkdir(parents=True, exist_ok=True)
    (case / "report.pdf").write_bytes(b"%PDF-1.4")
    (case / "GED4.nii.gz.bak").write_bytes(b"old")
    _copy(g.t1, case / "old" / "T1.nii.gz")  # a sub-folder inside a case


def _huge_nifti2(dims: tuple[int, ...]) -> bytes:
    """A NIfTI-2 header claiming `dims` float32 voxels, followed by 64 voxels."""
    import nibabel as nib

    raw = bytearray(nib.Nifti2Image(np.ones((4, 4, 4), np.float32), np.diag([1.5, 1.5, 3.0, 1.0])).to_bytes())
    struct.pack_into("<4q", raw, 16, len(dims), *dims)
    return bytes(raw)


def build_huge_header(root: Path, g: Good) -> None:
    folder = root / "0107-A-S1"
    _labeled_case(folder, g)
    (folder / "GED4.nii.gz").write_bytes(gzip.compress(_huge_nifti2((100000, 100000, 100000))))
    # NIfTI-1 (int16 sizes) cannot say 100000: the largest it can, uncompressed.
    _patched(g.t1, folder / "T2.nii", lambda raw: struct.pack_into("<4h", raw, 40, 3, 32767, 32767, 32767),
             compress=False)


def build_zero_spacing(root: Path, g: Good) -> None:
    folder = root / "0108-A-S2"
    _labeled_case(folder, g, t1=False)
    _patched(g.t1, folder / "T1.nii.gz", _pixdim((7.5, 0.0, 6.0)))


def build_negative_spacing(root: Path, g: Good) -> None:
    folder = root / "0109-A-S3"
    _labeled_case(folder, g, t1=False)
    _patched(g.t1, folder / "T1.nii.gz", _pixdim((7.5, -7.5, 6.0)))


def build_image_4d(root: Path, g: Good) -> None:
    folder = root / "0110-A-S4"
    _labeled_case(folder, g)
    ged4 = sitk.ReadImage(str(g.ged4))
    _write(sitk.JoinSeries([ged4, ged4]), folder / "GED4.nii.gz")


def build_symlink_loop(root: Path, g: Good) -> None:
    folder = root / "0111-A-S1"
    _labeled_case(folder, g, t1=False)
    os.symlink("T2.nii.gz", folder / "T2.nii.gz")  # points at itself
    os.symlink("T1b.nii.gz", folder / "T1.nii.gz")  # a two-link cycle
    os.symlink("T1.nii.gz", folder / "T1b.nii.gz")
    os.symlink("../../moved/DWI_800.nii.gz", folder / "DWI_800.nii.gz")  # dangling


def build_symlink_cycle(root: Path, g: Good) -> None:
    root.mkdir(parents=True, exist_ok=True)
    os.symlink(".", root / "0112-A-S1")  # a "case folder" that is the vendor folder itself
    os.symlink("../..", root / "0113-A-S2")  # one that is its grandparent


def build_splits_not_json(root: Path, g: Good) -> None:
    _mkparent(root / "splits.json").write_text('{"validation": ["0002-A')


def build_splits_unknown_cases(root: Path, g: Good) -> None:
    _mkparent(root / "splits.json").write_text(json.dumps({"validation": ["0999-A-S1"], "test": ["0998-A-S2"]}))


def build_dataset_json_not_json(root: Path, g: Good) -> None:
    (root / "dataset.json").write_text("{'channel_names': {'0': 'GED4'}, 'labels': {'background': 0, 'liver': 1}}")


def build_dataset_json_unknown_cases(root: Path, g: Good) -> None:
    meta = dict(NNUNET_DATASET_JSON, numTraining=5,
                training=[{"image": "./imagesTr/ghost.nii.gz", "label": "./labelsTr/ghost.nii.gz"}])
    (root / "dataset.json").write_text(json.dumps(meta))


def build_unicode_spaces(root: Path, g: Good) -> None:
    _labeled_case(root / "0117-A-S2 kopie é 数据", g)


@dataclass(frozen=True)
class Hostile:
    name: str
    build: Callable[[Path, Good], None]
    problems: tuple[tuple[str, str], ...] = ()  # (path under the site root, message regex): `check`'s lines
    labeled: tuple[str, ...] = ()  # hostile case ids still trained on labeled
    unlabeled: tuple[tuple[str, str], ...] = ()  # hostile (case, phase) still trained on unlabeled
    predicted: tuple[tuple[str, str], ...] = ()  # hostile (case, phase) predict still writes
    predict_failures: tuple[str, ...] = ()  # files predict must name as failed
    layout: str = "liqa"
    folder: str = "site"  # the copy's folder name (its path is part of what is tested)
    allowed: bool = False  # valid data that only looks hostile: nothing to report
    alone_usable: bool = False  # the item alone leaves something to train on or predict
    note: str = field(default="", compare=False)


CASES = [
    Hostile("phases_on_different_grids", build_grids_differ, labeled=("0101-A-S2",),
            unlabeled=(("0101-A-S2", "T1"),), predicted=(("0101-A-S2", "GED4"), ("0101-A-S2", "T1")),
            allowed=True, alone_usable=True),
    Hostile("mask_on_other_grid", build_mask_off_grid,
            problems=(("0102-A-S1/mask_GED4.nii.gz", r"mask geometry differs from GED4\.nii\.gz: size \(.*\) vs \(.*\) "
                                                     r"\(mask ignored; GED4 used unlabeled\)"),),
            unlabeled=(("0102-A-S1", "GED4"),), predicted=(("0102-A-S1", "GED4"),), alone_usable=True),
    Hostile("case_without_ged4", build_no_ged4, unlabeled=(("0103-A-S3", "T1"), ("0103-A-S3", "T2")),
            predicted=(("0103-A-S3", "T1"), ("0103-A-S3", "T2")), allowed=True, alone_usable=True),
    Hostile("empty_case_folder", build_empty_case,
            problems=(("0104-A-S1", r"case 0104-A-S1 dropped: no phase image"),)),
    Hostile("not_nifti", build_not_nifti,
            problems=(("0105-A-S2/GED4.nii.gz", r"cannot read: not a gzip file \(phase GED4 skipped, with its mask\)"),
                      ("0105-A-S2/DWI_800.nii.gz", r"cannot read: not a NIfTI image .*\(phase DWI_800 skipped\)"),
                      ("0105-A-S2/T2.nii", r"cannot read: not a NIfTI image .*\(phase T2 skipped\)"),
                      ("0105-A-S2/scan.dcm", r"unexpected file \(ignored\)")),
            unlabeled=(("0105-A-S2", "T1"),), predicted=(("0105-A-S2", "T1"),),
            predict_failures=("0105-A-S2/GED4.nii.gz", "0105-A-S2/DWI_800.nii.gz", "0105-A-S2/T2.nii"),
            alone_usable=True),
    Hostile("stray_files", build_stray_files,
            problems=(("notes.txt", r"unexpected file \(cases are folders\)"),
                      ("GED4.nii.gz", r"unexpected file \(cases are folders\)"),
                      ("{first}/GED4.nii.gz.bak", r"unexpected file \(ignored\)"),
                      ("{first}/old", r"unexpected folder \(ignored\)"),
                      ("{first}/report.pdf", r"unexpected file \(ignored\)"))),
    Hostile("header_claims_100000_voxels", build_huge_header,
            problems=(("0107-A-S1/GED4.nii.gz", r"cannot read: header claims 100000 x 100000 x 100000 voxels "
                                                r"\(limit 8192 per axis, 2\^30 in all\) \(phase GED4 skipped, with its mask\)"),
                      ("0107-A-S1/T2.nii", r"cannot read: header claims 32767 x 32767 x 32767 voxels "
                                           r"\(limit 8192 per axis, 2\^30 in all\) \(phase T2 skipped\)")),
            unlabeled=(("0107-A-S1", "T1"),), predicted=(("0107-A-S1", "T1"),),
            predict_failures=("0107-A-S1/GED4.nii.gz", "0107-A-S1/T2.nii"), alone_usable=True),
    Hostile("zero_spacing", build_zero_spacing,
            problems=(("0108-A-S2/T1.nii.gz", r"cannot read: voxel spacing \(7\.5, 0, 6\) in the header: not positive "
                                              r"\(phase T1 skipped\)"),),
            labeled=("0108-A-S2",), predicted=(("0108-A-S2", "GED4"),), predict_failures=("0108-A-S2/T1.nii.gz",),
            alone_usable=True),
    Hostile("negative_spacing", build_negative_spacing,
            problems=(("0109-A-S3/T1.nii.gz", r"cannot read: voxel spacing \(7\.5, -7\.5, 6\) in the header: not "
                                              r"positive \(phase T1 skipped\)"),),
            labeled=("0109-A-S3",), predicted=(("0109-A-S3", "GED4"),), predict_failures=("0109-A-S3/T1.nii.gz",),
            alone_usable=True),
    Hostile("image_4d", build_image_4d,
            problems=(("0110-A-S4/GED4.nii.gz", r"expected a 3D image, got 4D \(shape \(.*, 2\)\) "
                                                r"\(phase GED4 skipped, with its mask\)"),),
            unlabeled=(("0110-A-S4", "T1"),), predicted=(("0110-A-S4", "T1"),),
            predict_failures=("0110-A-S4/GED4.nii.gz",), alone_usable=True),
    Hostile("symlink_loop", build_symlink_loop,
            problems=(("0111-A-S1/DWI_800.nii.gz", r"broken symbolic link to \.\./\.\./moved/DWI_800\.nii\.gz \(ignored\)"),
                      ("0111-A-S1/T1.nii.gz", r"symbolic link loop \(ignored\)"),
                      ("0111-A-S1/T1b.nii.gz", r"symbolic link loop \(ignored\)"),
                      ("0111-A-S1/T2.nii.gz", r"symbolic link loop \(ignored\)")),
            labeled=("0111-A-S1",), predicted=(("0111-A-S1", "GED4"),), alone_usable=True),
    Hostile("symlink_cycle_folders", build_symlink_cycle,
            problems=(("0112-A-S1", r"symbolic link to .*, a folder that holds it \(ignored\)"),
                      ("0113-A-S2", r"symbolic link to .*, a folder that holds it \(ignored\)"))),
    Hostile("splits_json_not_json", build_splits_not_json,
            problems=(("splits.json", r"not valid JSON \(.*\); ignored: every case trains"),)),
    Hostile("splits_json_unknown_cases", build_splits_unknown_cases,
            problems=(("splits.json", r"unknown case id under 'validation': 0999-A-S1 \(ignored\)"),
                      ("splits.json", r"unknown case id under 'test': 0998-A-S2 \(ignored\)"))),
    Hostile("dataset_json_not_json", build_dataset_json_not_json, layout="nnunet",
            problems=(("dataset.json", r"not valid JSON \(Expecting property name enclosed in double quotes: line 1 column 2 \(char 1\)\); "
                                     r"ignored: using the defaults \(one GED4 channel, label 1 is liver, \.nii\.gz files\)"),)),
    Hostile("dataset_json_unknown_cases", build_dataset_json_unknown_cases, layout="nnunet",
            problems=(("dataset.json", r"numTraining is 5 but imagesTr holds 3 cases"),
                      ("dataset.json", r"training lists ghost, which imagesTr does not hold \(ignored\)"))),
    Hostile("unicode_and_spaces", build_unicode_spaces, folder="Klinik Ä ü/数据 mit Leerzeichen",
            labeled=("0117-A-S2 kopie é 数据",), unlabeled=(("0117-A-S2 kopie é 数据", "T1"),),
            predicted=(("0117-A-S2 kopie é 数据", "GED4"), ("0117-A-S2 kopie é 数据", "T1")),
            allowed=True, alone_usable=True),
]


def _ids(case: Hostile) -> str:
    return case.name


@dataclass(frozen=True)
class Site:
    root: Path  # what a site operator passes: the Vendor_A folder, or the nnU-Net raw dataset folder
    hostile: Hostile
    good: Good

    def expected_lines(self) -> list[tuple[str, str]]:
        first = sorted(self.good.labeled)[0]
        return [(str(self.root / rel.format(first=first)), message) for rel, message in self.hostile.problems]


def make_site(tmp_path: Path, good: Good, hostile: Hostile, *, alone: bool = False) -> Site:
    source = good.nnunet if hostile.layout == "nnunet" else good.liqa
    root = tmp_path / hostile.folder / source.name
    if alone:
        root.mkdir(parents=True)
        if hostile.layout == "nnunet":
            (root / "imagesTr").mkdir()
            (root / "dataset.json").write_text(json.dumps(NNUNET_DATASET_JSON))
    else:
        shutil.copytree(source, root)
    hostile.build(root, good)
    if hostile.allowed:
        ALLOWED.add(hostile.name)
    return Site(root, hostile, good)


@pytest.fixture(params=CASES, ids=_ids)
def site(request, tmp_path: Path, good: Good) -> Site:
    return make_site(tmp_path, good, request.param)


def _problem_lines(out: str) -> list[str]:
    """The lines after the summary's "N problems" line."""
    lines = out.splitlines()
    counts = [i for i, line in enumerate(lines) if re.fullmatch(r"\d+ problems?", line)]
    assert len(counts) == 1, out
    return lines[counts[0] + 1:]


def _match_lines(lines: list[str], expected: list[tuple[str, str]]) -> None:
    """Each line is one expected (path, message regex), one to one, in any order."""
    left = list(lines)
    for path, message in expected:
        hit = next((line for line in left if re.fullmatch(re.escape(path) + ": " + message, line)), None)
        assert hit is not None, (path, message, left)
        left.remove(hit)
    assert not left, left


# ------------------------------------------------------------------------------------------ the tests
def test_check(site: Site, capfd) -> None:
    from fedliver.cli import main

    with outcome(site.hostile.name, "check") as record:
        rc = main(["check", str(site.root)])
        captured = capfd.readouterr()
        record["traceback"] = "Traceback" in captured.out + captured.err
        assert not record["traceback"] and captured.err == "", captured.err  # no C++ or Python warning either
        lines = _problem_lines(captured.out)
        record["lines"] = [line.replace(f"{site.root}/", "") for line in lines]
        expected = site.expected_lines()
        _match_lines(lines, expected)
        assert rc == (1 if expected else 0)
        # Every good case is in the summary's count.
        total = len(site.good.cases) + len({c for c, _ in site.hostile.predicted})
        head = captured.out.splitlines()[0]
        record["lost"] = set() if f" {total} case" in head else {head}
        assert f" {total} case" in head, head


def _client_view(root: Path, cache: Path, *, fingerprint: bool = True) -> tuple[dict, dict, dict]:
    """`query.identify` (and `query.fingerprint`) through the real ClientApp, as a deployed node (site A):
    (identity, counts, {"num_images": fingerprinted images, "node": node_config})."""
    from flwr.app import Array, ArrayRecord, RecordDict

    from client.client_app import app as client_app
    from common.fingerprint import FingerprintConfig
    from tests.inprocess_grid import InProcessGrid

    node = {"site": GOOD_CENTER, "role": "train", "data-dir": str(root), "cache-dir": str(cache)}
    grid = InProcessGrid(client_app, [node], {})
    (node_id,) = grid.get_node_ids()
    identify = grid.create_message(RecordDict(), "query.identify", node_id, "0")
    request = RecordDict({"fingerprint-config": ArrayRecord({"config": Array(FingerprintConfig().to_array())})})
    messages = [identify]
    if fingerprint:
        messages.append(grid.create_message(request, "query.fingerprint", node_id, "0"))
    replies = list(grid.send_and_receive(messages))
    for reply in replies:
        if reply.has_error():  # the handler raised: what a SuperNode reports as a failed task
            raise RuntimeError(f"ClientApp handler failed: {reply.error.reason}")
    identity, counts = replies[0].content["identity"], replies[0].content["counts"]
    more = {"node": node}
    if fingerprint:
        more["num_images"] = int(replies[1].content["fingerprint"]["num_images"].numpy()[0])
    return dict(identity), dict(counts), more


def test_clientapp(site: Site) -> None:
    from client.site import SiteData, resolve_identity
    from common.model_dir import load_model_dir

    good, hostile = site.good, site.hostile
    with outcome(hostile.name, "clientapp") as record:
        identity, counts, more = _client_view(site.root, good.cache)
        assert "error" not in identity, identity["error"]
        data = SiteData(resolve_identity(more["node"], {}))  # what the train handler builds
        volumes = data.training_volumes(load_model_dir(good.model).plans, include_unlabeled=True)
        labeled = {v.case_id for v in volumes.labeled}
        unlabeled = {(v.case_id, v.phase) for v in volumes.unlabeled}
        if site.hostile.layout == "nnunet":  # the nnU-Net copy holds the GED4 of every case
            want_labeled, want_unlabeled = set(good.labeled), {(c, "GED4") for c in good.cases - good.labeled}
        else:
            want_labeled, want_unlabeled = set(good.labeled), set(good.unlabeled)
        record["lost"] = (want_labeled - labeled) | {c for c, _ in want_unlabeled - unlabeled}
        assert not record["lost"]
        assert labeled == want_labeled | set(hostile.labeled)
        assert unlabeled == want_unlabeled | set(hostile.unlabeled)
        assert [str(p) for p in volumes.problems] == []  # validation kept every bad file out
        assert counts["problems"] == len(hostile.problems)
        assert counts["labeled-volumes"] == len(labeled) and counts["unlabeled-volumes"] == len(unlabeled)
        assert more["num_images"] == len(labeled) + len(unlabeled)


def _predict(root: Path, model: Path, out: Path, capfd) -> tuple[int, list[str], list[str]]:
    from fedliver.cli import main

    rc = main(["predict", "-i", str(root), "-o", str(out), "-m", str(model), "--step", "1", "--threads", "1"])
    captured = capfd.readouterr()
    if "Traceback" in captured.out + captured.err:
        raise RuntimeError(f"predict printed a traceback:\n{captured.err}")
    err = captured.err.splitlines()
    return rc, [line for line in err if not line.startswith("note: ")], [line[6:] for line in err if line.startswith("note: ")]


def test_predict(site: Site, tmp_path: Path, capfd) -> None:
    good, hostile = site.good, site.hostile
    with outcome(hostile.name, "predict") as record:
        out = tmp_path / "predictions"
        rc, failures, notes = _predict(site.root, good.model, out, capfd)
        written = {(p.parent.name, p.name.removesuffix("_pred.nii.gz")) for p in out.rglob("*_pred.nii.gz")}
        want = {(c, "GED4") for c in good.cases} if hostile.layout == "nnunet" else set(good.predicted)
        record["lost"] = {c for c, _ in want - written}
        assert not record["lost"]
        assert written == want | set(hostile.predicted)
        # Each bad volume: one line that names its file; the rest are the index's problems, as notes.
        named = sorted(str(site.root / rel) for rel in hostile.predict_failures)
        assert sorted(line.partition(": ")[0] for line in failures) == named, failures
        assert rc == (1 if named else 0)
        assert all(line.startswith(str(site.root)) for line in notes), notes


@pytest.mark.parametrize("hostile", CASES, ids=_ids)
def test_alone(hostile: Hostile, tmp_path: Path, good: Good, capfd) -> None:
    """The hostile item with no good case beside it: non-zero exit where nothing usable is left."""
    from fedliver.cli import main

    site = make_site(tmp_path, good, hostile, alone=True)
    with outcome(hostile.name, "alone") as record:
        rc = main(["check", str(site.root)])
        captured = capfd.readouterr()
        record["traceback"] = "Traceback" in captured.out + captured.err
        assert not record["traceback"] and captured.err == "", captured.err
        assert rc == (1 if hostile.problems else 0)
        rc, failures, notes = _predict(site.root, good.model, tmp_path / "predictions", capfd)
        assert rc == (1 if hostile.predict_failures or not hostile.alone_usable else 0), failures
        if not hostile.alone_usable:
            assert failures[-1] == f"{site.root}: nothing to predict", failures
        assert all(line.startswith(str(site.root)) for line in failures[:-1] + notes), failures + notes
        identity, counts, _ = _client_view(site.root, good.cache, fingerprint=False)
        usable = len({c for c, _ in hostile.predicted})
        if usable:
            assert "error" not in identity and counts["cases"] == usable, counts
        else:  # nothing usable: the site says why at identify, in one line under its folder, and sits out
            assert identity["error"].startswith(str(site.root)) and "\n" not in identity["error"], identity
            assert counts["cases"] == 0, counts


@pytest.mark.parametrize("path", ["check", "predict", "clientapp"])
def test_root_is_a_symlink_loop(path: str, tmp_path: Path, good: Good, capfd) -> None:
    """The site folder itself a symlink loop: one line from check, predict and the ClientApp, no hang."""
    from fedliver.cli import main

    root = tmp_path / "Vendor_A"
    os.symlink("Vendor_A", root)
    with outcome("root_symlink_loop", path) as record:
        if path == "check":
            rc = main(["check", str(root)])
            captured = capfd.readouterr()
            record["traceback"] = "Traceback" in captured.err
            assert rc == 1 and captured.out == ""
            assert captured.err.splitlines() == [f"{root}: symbolic link loop"]
        elif path == "predict":
            rc, failures, notes = _predict(root, good.model, tmp_path / "out", capfd)
            assert rc == 1 and failures == [f"{root}: symbolic link loop", f"{root}: nothing to predict"], failures
        else:
            identity, counts, _ = _client_view(root, good.cache, fingerprint=False)
            assert identity["error"] == f"{root}: symbolic link loop" and counts["cases"] == 0  # named under its site


def test_everything_at_once_in_a_real_process(tmp_path: Path, good: Good) -> None:
    """Every LiQA hostile item in one tree, `fedliver check` as a real process: one line each, exit 1."""
    import subprocess
    import sys

    root = tmp_path / "all" / good.liqa.name
    shutil.copytree(good.liqa, root)
    expected = []
    for hostile in CASES:
        if hostile.layout == "liqa" and hostile.folder == "site" and not hostile.name.startswith("splits_json"):
            hostile.build(root, good)
            expected += Site(root, hostile, good).expected_lines()
    done = subprocess.run([sys.executable, "-m", "fedliver", "check", str(root)], capture_output=True,
                          encoding="utf-8", timeout=120, check=False)
    assert done.returncode == 1 and done.stderr == "", done.stderr
    _match_lines(_problem_lines(done.stdout), expected)
