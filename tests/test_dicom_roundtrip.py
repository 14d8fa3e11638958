"""DICOM round trip of the phantoms: `fedliver phantoms` -> `simulations.phantoms.dicom_export` ->
`fedliver import-dicom` -> `fedliver check` (0 problems), every phase back with the source's voxels
and geometry -> `fedliver predict` on the imported and on the original tree give the same masks.
Also the exporter's own contracts: every scanner style's SeriesDescriptions map back to their phase
through deploy/phases.json, float images within the rescale tolerance as classic MR files,
left-handed volumes, deterministic made-up identities, bad input reported by file."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from client.dicom_import import MAPPING_FILE, DicomImportConfig, import_dicom, read_phase_map
from common.phases import PHASES
from fedliver.cli import main
from simulations.phantoms.dicom_export import (
    MR_IMAGE_STORAGE,
    STYLES,
    DicomExportConfig,
    encode_pixels,
    export_liqa_as_dicom,
    main as export_main,
    patient_for_case,
)

REPO = Path(__file__).resolve().parents[1]
PHASES_JSON = REPO / "deploy" / "phases.json"
#: The four acquisitions with grids of their own (GED1-3 share GED4's): what predict compares.
PREDICTED = ("GED4", "T1", "T2", "DWI_800")


def _run(args: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(args)
    return rc, out.getvalue()


def _geometry(image: sitk.Image) -> np.ndarray:
    return np.concatenate([image.GetSpacing(), image.GetOrigin(), image.GetDirection()])


@pytest.fixture(scope="module")
def roundtrip(tmp_path_factory) -> dict:
    """Phantoms of centre C (2 cases, every phase), exported to DICOM and imported back."""
    root = tmp_path_factory.mktemp("roundtrip")
    phantoms, dicom, imported = root / "P", root / "dicom", root / "imported"
    rc, _ = _run(["phantoms", str(phantoms), "--centers", "C", "--cases", "2", "--labeled", "0",
                  "--missing-rate", "0", "--seed", "5"])
    assert rc == 0
    series = export_liqa_as_dicom(phantoms / "Vendor_C", dicom, on_problem=pytest.fail)
    rc, summary = _run(["import-dicom", str(dicom), str(imported), "--site", "C", "--phase-map", str(PHASES_JSON)])
    assert rc == 0, summary
    # Imported case id -> source case, through the made-up PatientID the mapping file keeps.
    by_patient = {patient_for_case("Vendor_C", c.name).patient_id: c.name
                  for c in (phantoms / "Vendor_C").iterdir() if c.is_dir()}
    cases = json.loads((imported / MAPPING_FILE).read_text())["cases"]
    source_of = {cid: by_patient[entry["patient_id"]] for cid, entry in cases.items()}
    return {"phantoms": phantoms / "Vendor_C", "dicom": dicom, "imported": imported / "Vendor_C",
            "series": series, "summary": summary, "source_of": source_of, "root": root}


def test_export_layout_and_import_summary(roundtrip):
    series, dicom = roundtrip["series"], roundtrip["dicom"]
    assert len(series) == 14  # 2 cases x 7 phases, one folder each: <patient>/<study>/<series>/
    assert all(s.parent.parent.parent == dicom and s.parent.parent.name.startswith("PAT-") for s in series)
    slices = sum(sitk.ReadImage(str(p)).GetDepth() for p in roundtrip["phantoms"].glob("*/[!m]*.nii.gz"))
    assert sum(len(list(s.glob("IM*.dcm"))) for s in series) == slices  # one file per slice
    first = roundtrip["summary"].splitlines()[0]
    assert "14 series found, 2 cases (2 new), 14 series imported (14 written, 0 already there), 0 skipped" in first
    assert "GED4 2, T1 2, T2 2, DWI_800 2, GED1 2, GED2 2, GED3 2" in roundtrip["summary"]


def test_check_finds_no_problem(roundtrip):
    rc, report = _run(["check", str(roundtrip["imported"])])
    assert rc == 0 and re.search(r"^0 problems$", report, re.M), report
    assert "2 cases" in report


def test_every_phase_back_with_voxels_and_geometry(roundtrip):
    src_root, imported = roundtrip["phantoms"], roundtrip["imported"]
    assert sorted(roundtrip["source_of"].values()) == sorted(c.name for c in src_root.iterdir() if c.is_dir())
    compared = 0
    for case_id, source in roundtrip["source_of"].items():
        source_phases = sorted(p for p in PHASES if (src_root / source / f"{p}.nii.gz").exists())
        assert sorted(p.name[:-len(".nii.gz")] for p in (imported / case_id).iterdir()) == source_phases
        for phase in source_phases:
            src = sitk.ReadImage(str(src_root / source / f"{phase}.nii.gz"))
            back = sitk.ReadImage(str(imported / case_id / f"{phase}.nii.gz"))
            # C stores int16 scanner units: exact, no rescale; its grids are right-handed (else the
            # slices would come back in the reverse order: test_float_left_handed_and_big_integers).
            assert encode_pixels(sitk.GetArrayViewFromImage(src)).tolerance == 0.0
            np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(src))
            np.testing.assert_allclose(_geometry(back), _geometry(src), atol=1e-4, rtol=0)
            compared += 1
    assert compared == 14


@pytest.fixture(scope="module")
def model_dir(roundtrip) -> Path:
    """A small real STU-Net MODEL_DIR (random weights, seeded): predict's whole path, in seconds."""
    import torch

    from common.model_dir import save_model_dir
    from common.planning import default_test_plans
    from common.stunet import build_stunet_from_plans

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plans = default_test_plans(patch_size=(32, 64, 64), spacing=(4.0, 3.0, 3.0), base_width=2)
        torch.manual_seed(7)
        branch = build_stunet_from_plans(plans, deep_supervision=True).state_dict()
        save_model_dir(roundtrip["root"] / "model", {"a": branch}, plans, {"round": 1})
    finally:
        torch.set_num_threads(before)
    return roundtrip["root"] / "model"


def test_predict_on_imported_equals_predict_on_original(roundtrip, model_dir):
    root = roundtrip["root"]
    for tree, out in ((roundtrip["imported"], root / "pred_imported"), (roundtrip["phantoms"], root / "pred_original")):
        rc, printed = _run(["predict", "-i", str(tree), "-o", str(out), "-m", str(model_dir),
                            "--phases", ",".join(PREDICTED), "--threads", "1"])
        assert rc == 0, printed
    flipped_agreement = []
    for case_id, source in roundtrip["source_of"].items():
        for phase in PREDICTED:
            a = sitk.ReadImage(str(root / "pred_imported" / case_id / f"{phase}_pred.nii.gz"))
            b = sitk.ReadImage(str(root / "pred_original" / source / f"{phase}_pred.nii.gz"))
            np.testing.assert_allclose(_geometry(a), _geometry(b), atol=1e-4, rtol=0)
            x, y = sitk.GetArrayFromImage(a).astype(bool), sitk.GetArrayFromImage(b).astype(bool)
            assert 0 < y.sum() < y.size, (source, phase)  # a mask with both labels: agreement means something
            agreement = float((x == y).mean())
            dice = 2 * float((x & y).sum()) / float(x.sum() + y.sum())
            assert agreement >= 0.999 and dice >= 0.99, (case_id, source, phase, agreement, dice)
            flipped_agreement.append(float((x[::-1] == y).mean()))
    # The check can fail: the same masks with their slices reversed (what a lost slice order would
    # give) disagree well beyond the 0.1 % allowed.
    assert min(flipped_agreement) < 0.999 and float(np.mean(flipped_agreement)) < 0.99


def test_every_style_maps_back_to_its_phase():
    phase_map = read_phase_map(PHASES_JSON)
    for style, descriptions in STYLES.items():
        assert set(descriptions) == set(PHASES), style
        for phase, description in descriptions.items():
            assert phase_map.phase_for(description) == phase, (style, description)


def _write(root: Path, case: str, phase: str, array: np.ndarray, direction) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.7, 1.9, 4.5))
    image.SetOrigin((-10.0, 20.5, 33.25))
    image.SetDirection(direction)
    path = root / case / f"{phase}.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return image


def test_float_left_handed_and_big_integers(tmp_path):
    """B1/B2-like float32 0-255 (rescaled int16, classic MR), a left-handed grid, uint16 beyond int16."""
    rng = np.random.default_rng(0)
    vendor = tmp_path / "Vendor_B1"
    left = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # x and y swapped: det -1
    sources = {
        "GED4": _write(vendor, "0001-B1-S2", "GED4", rng.uniform(0, 255, (6, 20, 18)).astype(np.float32),
                       (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)),
        "T2": _write(vendor, "0001-B1-S2", "T2", rng.uniform(0, 255, (5, 14, 12)).astype(np.float32), left),
        "T1": _write(vendor, "0001-B1-S2", "T1", rng.integers(0, 60000, (5, 16, 16)).astype(np.uint16),
                     (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)),
    }
    series = export_liqa_as_dicom(vendor, tmp_path / "dicom", DicomExportConfig(style="philips"))
    assert len(series) == 3
    for folder in series:  # classic single-frame MR, the rescale at the top level as Philips writes it
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(next(folder.glob("IM*.dcm"))))
        reader.Execute()  # ITK turns GDCM's global ForceRescaleInterceptSlope on: writes change, not ours
        assert reader.GetMetaData("0008|0016").strip("\0 ") == MR_IMAGE_STORAGE
        assert reader.HasMetaDataKey("0028|1053")
        assert reader.GetMetaData("0008|0070").strip() == "Philips Medical Systems"
    again = export_liqa_as_dicom(vendor, tmp_path / "again", DicomExportConfig(style="philips"))
    files = sorted(p.relative_to(tmp_path / "dicom") for p in (tmp_path / "dicom").rglob("*.dcm"))
    assert len(files) == 16 and [s.relative_to(tmp_path / "again") for s in again] == \
        [s.relative_to(tmp_path / "dicom") for s in series]
    assert all((tmp_path / "dicom" / f).read_bytes() == (tmp_path / "again" / f).read_bytes() for f in files)
    result = import_dicom(tmp_path / "dicom", tmp_path / "out",
                          DicomImportConfig(site="B1", phase_map=read_phase_map(PHASES_JSON)))
    assert not result.skipped and len(result.imported) == 3
    for phase, source in sources.items():
        back = sitk.ReadImage(str(tmp_path / "out" / "Vendor_B1" / "0001-B1" / f"{phase}.nii.gz"))
        encoding = encode_pixels(sitk.GetArrayViewFromImage(source))
        expected = source
        if np.linalg.det(np.reshape(source.GetDirection(), (3, 3))) < 0:  # same voxels, slices reversed
            expected = sitk.Flip(source, [False, False, True])
            assert phase == "T2"
        error = np.abs(sitk.GetArrayFromImage(back).astype(np.float64) - sitk.GetArrayFromImage(expected)).max()
        if phase == "T1":  # beyond int16: an integer intercept keeps it exact
            assert encoding.intercept == float(int(encoding.intercept)) and encoding.slope == 1.0 and error == 0
        else:  # 0-255 floats: within slope / 2, about 0.002
            assert encoding.rescaled and 0 < error <= encoding.tolerance < 0.0025, (phase, error, encoding.tolerance)
        np.testing.assert_allclose(_geometry(back), _geometry(expected), atol=1e-4, rtol=0)


def test_encode_pixels_limits():
    exact = encode_pixels(np.array([[-32768, 0, 32767]], dtype=np.int32))
    assert not exact.rescaled and exact.tolerance == 0 and exact.stored.dtype == np.int16
    whole = encode_pixels(np.array([0.0, 255.0, 17.0], dtype=np.float32))  # whole numbers stored as they are
    assert not whole.rescaled and whole.stored.tolist() == [0, 255, 17]
    wide = encode_pixels(np.array([-1e6, 0.5, 3e6]))
    assert wide.rescaled and np.abs(wide.real() - [-1e6, 0.5, 3e6]).max() <= wide.tolerance <= 4e6 / 65000 / 2 * 1.001
    with pytest.raises(ValueError, match="NaN"):
        encode_pixels(np.array([1.0, np.nan]))


def test_identities_are_deterministic_and_made_up():
    a, again, other = (patient_for_case("Vendor_C", "0001-C-S1"), patient_for_case("Vendor_C", "0001-C-S1"),
                       patient_for_case("Vendor_A", "0001-C-S1"))
    assert a == again and a.patient_id != other.patient_id and a.study_uid != other.study_uid
    assert re.fullmatch(r"PAT-[0-9A-F]{8}", a.patient_id) and re.fullmatch(r"[A-Z]+\^[A-Z]+", a.patient_name)
    assert re.fullmatch(r"2\.25\.[1-9][0-9]*", a.study_uid) and len(a.study_uid) <= 64
    assert re.fullmatch(r"\d{8}", a.study_date) and a.birth_date < a.study_date


def test_cli_reports_bad_files_and_goes_on(tmp_path, capsys):
    vendor = tmp_path / "Vendor_A"
    _write(vendor, "0001-A-S1", "GED4", np.arange(2 * 8 * 8, dtype=np.int16).reshape(2, 8, 8),
           (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    (vendor / "0002-A-S1").mkdir()
    (vendor / "0002-A-S1" / "T2.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    assert export_main([str(vendor), str(tmp_path / "dicom")]) == 1
    captured = capsys.readouterr()
    bad = [line for line in captured.err.splitlines() if line.strip()]
    assert len(bad) == 1 and bad[0].startswith(str(vendor / "0002-A-S1" / "T2.nii.gz")), captured.err
    assert "0001-A-S1 GED4 -> " in captured.out and "1 series, 2 files, style siemens, 1 problem(s)" in captured.out
    assert export_main([str(tmp_path / "nowhere"), str(tmp_path / "d2")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nowhere: no such folder" in err
