"""`fedliver import-dicom`: DICOM series written slice by slice with SimpleITK (GDCM), imported into
the LiQA layout; round-trip geometry and voxels, phase mapping, every skipped series reported,
de-identified names, a 0600 mapping file, idempotent re-runs, bad phase maps, then `fedliver check`."""

from __future__ import annotations

import gzip
import json
import math
import shutil
import stat
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from client.dicom_import import (
    MAPPING_FILE,
    DicomImportConfig,
    PhaseMapError,
    import_dicom,
    parse_phase_map,
    read_phase_map,
)
from fedliver.cli import main
from simulations.phantoms.dicom_export import DicomPatient, write_series

REPO = Path(__file__).resolve().parents[1]
PHASE_MAP = read_phase_map(REPO / "deploy" / "phases.json")
# Identifiers of the two synthetic patients: none may reach an output path or image.
PATIENTS = {
    "p1": {"name": "DOE^JOHN", "id": "PID4711", "accession": "ACC90210", "study": "1.2.826.0.1.3680043.9.7001.1"},
    "p2": {"name": "ROE^JANE", "id": "PID0815", "accession": "ACC31337", "study": "1.2.826.0.1.3680043.9.7001.2"},
}
WHO = {k: DicomPatient(v["id"], v["name"], v["study"], accession=v["accession"]) for k, v in PATIENTS.items()}


def _direction(a: float, b: float) -> tuple[float, ...]:
    """An oblique, right-handed direction (rotations about z then x), like a tilted acquisition."""
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return tuple((rz @ rx).flatten())


def _volume(seed: int, size=(24, 32, 14), spacing=(1.4, 1.2, 3.0), origin=(-40.0, 25.5, 60.0),
            direction=_direction(0.3, 0.2)) -> sitk.Image:
    rng = np.random.default_rng(seed)
    array = rng.integers(-200, 2500, size=size[::-1]).astype(np.int16)  # signed: checks the sign survives
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def _multi_frame(folder: Path, patient: str, description: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    image = _volume(9, size=(16, 16, 5))
    for tag, value in {"0008|0060": "MR", "0008|103e": description, "0010|0020": PATIENTS[patient]["id"],
                       "0020|000d": PATIENTS[patient]["study"], "0020|000e": "1.2.826.0.1.3680043.9.7001.2.99"}.items():
        image.SetMetaData(tag, value)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(folder / "enhanced.dcm"))
    writer.Execute(image)


# GED4 oblique; T2 in the phantoms' "swap_xy_flip_z" orientation (simulations/phantoms/acquisition.py);
# GED3 left-handed (z flipped): DICOM has no slice order of its own, so it comes back right-handed.
SOURCES = {"GED4": _volume(1),
           "T2": _volume(2, size=(20, 26, 10), spacing=(1.5, 1.5, 5.0), origin=(10.0, -30.0, 5.0),
                         direction=(0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)),
           "GED3": _volume(12, size=(16, 18, 6), direction=tuple((np.reshape(_direction(0.1, 0.4), (3, 3))
                                                                  @ np.diag([1.0, 1.0, -1.0])).flatten())),
           "DWI_800": _volume(14, size=(16, 12, 7), spacing=(2.5, 2.5, 6.0))}


@pytest.fixture(scope="module")
def dicom_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dicom")
    s1, s2 = PATIENTS["p1"]["study"], PATIENTS["p2"]["study"]
    # Patient 1 (folders named after the patient, as PACS exports do): HBP and T2 import; the
    # localizer matches no phase; the DWI misses a slice; one file is no DICOM.
    write_series(root / "DOE_JOHN" / "hbp", SOURCES["GED4"], "T1 vibe fs HBP 20 min", WHO["p1"], f"{s1}.1", 5)
    write_series(root / "DOE_JOHN" / "t2", SOURCES["T2"], "t2_haste_tra", WHO["p1"], f"{s1}.2", 2)
    write_series(root / "DOE_JOHN" / "scout", _volume(3, size=(16, 16, 3)), "localizer", WHO["p1"], f"{s1}.3", 1)
    write_series(root / "DOE_JOHN" / "dwi", _volume(4, size=(16, 20, 8)), "ep2d_diff b800", WHO["p1"], f"{s1}.4", 6,
                 skip=(4,))
    (root / "DOE_JOHN" / "notes.txt").write_text("not an image")
    # Patient 2: arterial imports; two "pre" series both match T1; the portal phase has uneven
    # spacing; the T2 is one multi-frame (enhanced) file.
    write_series(root / "ROE_JANE" / "art", _volume(5, size=(16, 16, 6)), "T1 vibe arterial", WHO["p2"], f"{s2}.1", 7)
    write_series(root / "ROE_JANE" / "pre_a", _volume(6, size=(16, 16, 6)), "T1_vibe_fs_pre", WHO["p2"], f"{s2}.2", 3)
    write_series(root / "ROE_JANE" / "pre_b", _volume(7, size=(16, 16, 6)), "T1 vibe pre", WHO["p2"], f"{s2}.3", 4)
    write_series(root / "ROE_JANE" / "pv", _volume(8, size=(16, 16, 8)), "portal venous", WHO["p2"], f"{s2}.4", 8,
                 shift_from=5)
    _multi_frame(root / "ROE_JANE" / "mf", "p2", "T2 SSFSE")
    write_series(root / "ROE_JANE" / "tp", SOURCES["GED3"], "transitional 3 min", WHO["p2"], f"{s2}.5", 9)
    # One series exported into two folders, slices interleaved: joined by its SeriesInstanceUID.
    for folder, skip in (("dwi_a", (1, 3, 5)), ("dwi_b", (0, 2, 4, 6))):
        write_series(root / "ROE_JANE" / folder, SOURCES["DWI_800"], "DWI b800", WHO["p2"], f"{s2}.6", 10, skip=skip)
    return root


@pytest.fixture(scope="module")
def imported(dicom_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("liqa")
    return out, import_dicom(dicom_tree, out, DicomImportConfig(site="A", phase_map=PHASE_MAP))


def _case_of(result, phase: str) -> str:
    return next(s.case_id for s in result.imported if s.phase == phase)


def test_round_trip_voxels_and_geometry(imported):
    out, result = imported
    for phase, source in SOURCES.items():
        path = out / "Vendor_A" / _case_of(result, phase) / f"{phase}.nii.gz"
        image = sitk.ReadImage(str(path))
        assert image.GetSize() == source.GetSize() and image.GetPixelID() == sitk.sitkInt16
        expected = sitk.GetArrayFromImage(source)
        direction, origin = np.reshape(source.GetDirection(), (3, 3)), source.GetOrigin()
        if np.linalg.det(direction) < 0:  # the same voxels in space, slices in the normal's order
            expected, direction = expected[::-1], direction @ np.diag([1.0, 1.0, -1.0])
            origin = source.TransformIndexToPhysicalPoint((0, 0, source.GetDepth() - 1))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), expected)
        np.testing.assert_allclose(image.GetSpacing(), source.GetSpacing(), atol=1e-4)
        np.testing.assert_allclose(image.GetOrigin(), origin, atol=1e-4)
        np.testing.assert_allclose(image.GetDirection(), direction.flatten(), atol=1e-5)


def test_cases_and_phases(imported):
    out, result = imported
    # One case per study, numbered in folder order; the DWI's incompleteness does not stop its study.
    assert {(s.case_id, s.phase) for s in result.imported} == {("0001-A", "GED4"), ("0001-A", "T2"),
                                                               ("0002-A", "GED1"), ("0002-A", "GED3"),
                                                               ("0002-A", "DWI_800")}
    assert sorted(p.name for p in (out / "Vendor_A").iterdir()) == ["0001-A", "0002-A"]
    assert sorted(p.name for p in (out / "Vendor_A" / "0001-A").iterdir()) == ["GED4.nii.gz", "T2.nii.gz"]
    assert result.new_cases == ["0001-A", "0002-A"]


def test_every_series_not_imported_is_reported(imported):
    _, result = imported
    lines = [str(s) for s in result.skipped]
    text = "\n".join(lines)

    def one(where: str, *words: str) -> str:
        found = [ln for ln in lines if ln.startswith(where) and all(w in ln for w in words)]
        assert len(found) == 1, (words, text)
        return found[0]

    assert "matches no phase" in one("DOE_JOHN/scout", "'localizer'")
    assert "about 1 slice(s) missing" in one("DOE_JOHN/dwi", "DWI_800", "incomplete")
    assert "inconsistent slice spacing" in one("ROE_JANE/pv", "GED2", "incomplete")
    assert "multi-frame" in one("ROE_JANE/mf", "T2")
    assert "notes.txt" in one("DOE_JOHN:", "not readable as DICOM")
    for folder in ("pre_a", "pre_b"):
        assert "none imported" in one(f"ROE_JANE/{folder} series", "2 series of one study match T1")
    assert len(lines) == 7
    summary = result.format()
    assert "5 series imported" in summary and "7 skipped" in summary and "GED4 1, T1 0, T2 1" in summary


def test_no_identifier_in_outputs_and_private_mapping(imported, dicom_tree):
    out, result = imported
    secrets = [v for who in PATIENTS.values() for v in who.values()] + ["DOE", "JOHN", "ROE", "JANE"]
    mapping_file = out / MAPPING_FILE
    for path in out.rglob("*"):
        rel = str(path.relative_to(out))
        assert not any(s in rel for s in secrets), rel
        if path.name.endswith(".nii.gz"):
            raw = gzip.decompress(path.read_bytes())
            assert not any(s.encode() in raw for s in secrets), path
    assert stat.S_IMODE(mapping_file.stat().st_mode) == 0o600
    cases = json.loads(mapping_file.read_text())["cases"]
    assert cases["0001-A"]["patient_id"] == "PID4711" and cases["0001-A"]["patient_name"] == "DOE^JOHN"
    assert cases["0001-A"]["accession_number"] == "ACC90210"
    assert cases["0001-A"]["series"]["GED4"]["series_instance_uid"] == PATIENTS["p1"]["study"] + ".1"
    assert Path(cases["0001-A"]["series"]["T2"]["folder"]) == (dicom_tree / "DOE_JOHN" / "t2").resolve()
    assert cases["0002-A"]["study_instance_uid"] == PATIENTS["p2"]["study"]


def test_rerun_keeps_ids_and_writes_nothing_twice(dicom_tree, tmp_path):
    out = tmp_path / "out"
    config = DicomImportConfig(site="A", phase_map=PHASE_MAP)
    first = import_dicom(dicom_tree, out, config)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}
    again = import_dicom(dicom_tree, out, config)
    assert again.new_cases == [] and not any(s.written for s in again.imported)
    assert {(s.case_id, s.phase) for s in again.imported} == {(s.case_id, s.phase) for s in first.imported}
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")} == stamps
    assert sorted(json.loads((out / MAPPING_FILE).read_text())["cases"]) == ["0001-A", "0002-A"]
    # A new study later gets the next id; a known study found in another folder keeps its id; another
    # series for a phase a case already has is reported, not swapped in.
    later = tmp_path / "later"
    shutil.copytree(dicom_tree / "ROE_JANE" / "art", later / "copy_of_art")
    write_series(later / "new_study", _volume(10, size=(16, 16, 4)), "HBP",  # another study of patient 1
                 replace(WHO["p1"], study_uid="1.2.826.0.1.3680043.9.8"), "1.2.826.0.1.3680043.9.8.1", 1)
    write_series(later / "hbp_again", _volume(13, size=(16, 16, 4)), "HBP", WHO["p1"],
                 PATIENTS["p1"]["study"] + ".9", 9)
    third = import_dicom(later, out, config)
    assert third.new_cases == ["0003-A"]
    assert {(s.case_id, s.phase, s.written) for s in third.imported} == {("0002-A", "GED1", False),
                                                                         ("0003-A", "GED4", True)}
    assert [str(s) for s in third.skipped] == [
        "hbp_again series 9 'HBP': GED4: case 0001-A already has GED4 from series 5 'T1 vibe fs HBP 20 min': "
        "not replaced (remove the file and its mapping entry to replace it)"]
    hbp = out / "Vendor_A" / "0001-A" / "GED4.nii.gz"
    assert hbp.stat().st_mtime_ns == stamps[hbp]


def test_phase_map_first_match_in_file_order(tmp_path):
    t2_first = parse_phase_map({"T2": ["(?i)t2"], "GED4": ["(?i)hbp"]})
    hbp_first = parse_phase_map({"GED4": ["(?i)hbp"], "T2": ["(?i)t2"]})
    assert t2_first.phase_for("T2 HBP") == "T2" and hbp_first.phase_for("T2 HBP") == "GED4"
    assert hbp_first.phase_for("localizer") is None
    path = tmp_path / "order.json"
    path.write_text('{"T1": ["(?i)vibe"], "GED1": ["(?i)arterial"]}')  # JSON text order is kept
    assert read_phase_map(path).phase_for("vibe arterial") == "T1"


@pytest.mark.parametrize("description, phase", [
    ("HBP", "GED4"), ("LAVA 20min", "GED4"), ("hepatobiliary", "GED4"), ("T1 vibe fs 20 min", "GED4"),
    ("T2 HASTE", "T2"), ("T2 SSFSE", "T2"), ("T2W_TSE", "T2"), ("DWI b800", "DWI_800"),
    ("ep2d_diff b800", "DWI_800"), ("ep2d_diff_b50_800_ADC", None), ("T1 in/opp", "T1"), ("LAVA pre", "T1"),
    ("Arterial", "GED1"), ("portal venous", "GED2"), ("transitional 3 min", "GED3"), ("localizer", None),
])
def test_shipped_phase_map(description, phase):
    assert PHASE_MAP.phase_for(description) == phase


@pytest.mark.parametrize("text, message", [
    ('{"GED4": ["hbp"', "not valid JSON"),
    ('{"HBP": ["hbp"]}', "unknown phase 'HBP'"),
    ('{"GED4": ["(?i)hbp("]}', "GED4: invalid regex"),
    ('{"GED4": "hbp", "GED4": ["x"]}', "GED4 given more than once"),
    ('{"GED4": [3]}', "expected a non-empty list of regex strings"),
    ('["GED4"]', "expected a JSON object"),
])
def test_bad_phase_map_is_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "phases.json"
    path.write_text(text)
    with pytest.raises(PhaseMapError):
        read_phase_map(path)
    assert main(["import-dicom", str(tmp_path), str(tmp_path / "out"), "--site", "A", "--phase-map", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"{path}:") and message in err, err
    assert not (tmp_path / "out").exists()


def test_cli_then_check_finds_no_problem(dicom_tree, tmp_path, capsys):
    out = tmp_path / "liqa"
    args = ["import-dicom", str(dicom_tree), str(out), "--site", "B1",
            "--phase-map", str(REPO / "deploy" / "phases.json")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "2 cases (2 new), 5 series imported" in printed and "multi-frame" in printed
    assert sorted(p.name for p in (out / "Vendor_B1").iterdir()) == ["0001-B1", "0002-B1"]
    assert main(["check", str(out)]) == 0
    report = capsys.readouterr().out
    assert "2 cases" in report and "0 problems" in report, report
    assert main(["import-dicom", str(dicom_tree), str(out), "--site", "B-1", "--phase-map",
                 str(REPO / "deploy" / "phases.json")]) == 2
    assert "letters and digits" in capsys.readouterr().err


def test_nothing_importable_and_bad_mapping_file(dicom_tree, tmp_path, capsys):
    only_scout = tmp_path / "scout"
    shutil.copytree(dicom_tree / "DOE_JOHN" / "scout", only_scout / "s")
    phases = str(REPO / "deploy" / "phases.json")
    assert main(["import-dicom", str(only_scout), str(tmp_path / "out"), "--site", "A", "--phase-map", phases]) == 1
    assert "'localizer' matches no phase" in capsys.readouterr().out
    assert not (tmp_path / "out" / MAPPING_FILE).exists()
    (tmp_path / "out").mkdir(exist_ok=True)
    (tmp_path / "out" / MAPPING_FILE).write_text("{broken")
    assert main(["import-dicom", str(dicom_tree), str(tmp_path / "out"), "--site", "A", "--phase-map", phases]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(str(tmp_path / "out" / MAPPING_FILE)), err
    assert not (tmp_path / "out" / "Vendor_A").exists()
