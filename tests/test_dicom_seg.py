"""DICOM SEG out: a phantom case exported to DICOM (`simulations.phantoms.dicom_export`), predicted
with `fedliver predict -i DICOM_DIR --dicom-seg` and with `--dicom-source` on an import-dicom tree;
the SEG read back with highdicom equals the NIfTI prediction slice by slice, references every source
instance, carries the source's patient and study, and passes pydicom's file checks."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from test_inference import write_model_dir

from client.dicom_seg import LIVER_CODE
from fedliver.cli import main
from simulations.phantoms.dicom_export import export_liqa_as_dicom

REPO = Path(__file__).resolve().parents[1]
PHASES_JSON = REPO / "deploy" / "phases.json"


def _run(args: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(args)
    return rc, out.getvalue() + err.getvalue()


@pytest.fixture(scope="module")
def dicom_case(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("seg")
    rc, text = _run(["phantoms", str(root / "P"), "--centers", "C", "--cases", "1", "--labeled", "0",
                     "--missing-rate", "0", "--seed", "3"])
    assert rc == 0, text
    for extra in ("GED1", "GED2", "GED3", "T1", "DWI_800"):  # two series are enough here
        for f in (root / "P" / "Vendor_C").glob(f"*/{extra}.nii.gz"):
            f.unlink()
    export_liqa_as_dicom(root / "P" / "Vendor_C", root / "dicom", on_problem=pytest.fail)
    return {"root": root, "dicom": root / "dicom", "model": write_model_dir(root / "model")}


def _source_files(dicom: Path, series_uid: str) -> list[pydicom.Dataset]:
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in dicom.rglob("*.dcm")]
    return [d for d in datasets if d.SeriesInstanceUID == series_uid]


def test_predict_writes_a_dicom_seg_per_series(dicom_case):
    import highdicom as hd

    out = dicom_case["root"] / "out"
    rc, text = _run(["predict", "-i", str(dicom_case["dicom"]), "-o", str(out), "-m", str(dicom_case["model"]),
                     "--dicom-seg", "--phase-map", str(PHASES_JSON)])
    assert rc == 0, text
    segs = sorted(out.glob("*/*_seg.dcm"))
    assert [p.name for p in segs] == ["GED4_seg.dcm", "T2_seg.dcm"]
    for path in segs:
        ds = pydicom.dcmread(path)
        pydicom.dataset.validate_file_meta(ds.file_meta, enforce_standard=True)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and ds.Modality == "SEG"
        seg = hd.seg.segread(path)
        (segment,) = seg.SegmentSequence
        assert segment.SegmentLabel == "Liver" and segment.SegmentAlgorithmType == "AUTOMATIC"
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == LIVER_CODE[0]
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "fedliver"
        manifest_sha = __import__("json").loads((dicom_case["model"] / "manifest.json").read_text(encoding="utf-8"))["manifest_sha256"]
        assert manifest_sha in str(algorithm.AlgorithmParameters)

        # Every source instance referenced; patient and study are the source's.
        source_uid = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
        sources = _source_files(dicom_case["dicom"], source_uid)
        referenced = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
        assert referenced == {d.SOPInstanceUID for d in sources} and len(sources) > 3
        assert (seg.PatientID, seg.StudyInstanceUID) == (sources[0].PatientID, sources[0].StudyInstanceUID)

        # Frames = the NIfTI prediction at each source slice's position.
        nifti = sitk.ReadImage(str(path.with_name(path.name.replace("_seg.dcm", "_pred.nii.gz"))))
        truth = sitk.GetArrayFromImage(nifti)
        for source in sources:
            k = int(round(nifti.TransformPhysicalPointToContinuousIndex([float(v) for v in source.ImagePositionPatient])[2]))
            frame = seg.get_pixels_by_source_instance(source_sop_instance_uids=[source.SOPInstanceUID],
                                                      segment_numbers=[1], ignore_spatial_locations=True)
            assert np.array_equal(frame[0, :, :, 0] > 0, truth[k] > 0)
        assert truth.any()  # a random net marks something: the comparison above is not all zeros


def test_dicom_source_on_an_import_tree_and_a_series_that_cannot_be_written(dicom_case):
    root = dicom_case["root"]
    imported = root / "imported"
    rc, text = _run(["import-dicom", str(dicom_case["dicom"]), str(imported), "--site", "C",
                     "--phase-map", str(PHASES_JSON)])
    assert rc == 0, text
    # One series' files are gone since the import: that series gets one line and no SEG, the other its SEG.
    t2 = [p for p in dicom_case["dicom"].rglob("*.dcm")
          if "T2" in str(pydicom.dcmread(p, stop_before_pixels=True).SeriesDescription)]
    moved = root / "moved"
    moved.mkdir()
    for p in t2:
        p.rename(moved / p.name)
    try:
        out = root / "out2"
        rc, text = _run(["predict", "-i", str(imported), "-o", str(out), "-m", str(dicom_case["model"]),
                         "--dicom-source", str(dicom_case["dicom"])])
    finally:
        for p in moved.iterdir():
            p.rename(t2[0].parent / p.name)
    assert rc == 1
    lines = [line for line in text.splitlines() if "DICOM SEG not written" in line]
    assert len(lines) == 1 and "T2" in lines[0]
    assert [p.name for p in out.glob("*/*_seg.dcm")] == ["GED4_seg.dcm"]
    assert sorted(p.name for p in out.glob("*/*_pred.nii.gz")) == ["GED4_pred.nii.gz", "T2_pred.nii.gz"]

    rc, text = _run(["predict", "-i", str(root / "P"), "-o", str(root / "out3"), "-m", str(dicom_case["model"]),
                     "--dicom-source", str(dicom_case["dicom"])])
    assert rc == 1 and "import_dicom_mapping.json" in text  # not a tree import-dicom wrote: one line
