"""Predictions back into the hospital's PACS: a DICOM Segmentation object per segmented series.

`fedliver predict --dicom-source DICOM_DIR` (IN made by `fedliver import-dicom` from DICOM_DIR), or
`fedliver predict -i DICOM_DIR --dicom-seg --phase-map phases.json` (imported on the fly into
OUT/dicom_import/), writes OUT/<case>/<PHASE>_seg.dcm beside each NIfTI prediction with highdicom:

- one binary segment "Liver" (SNOMED CT 10200004), algorithm type AUTOMATIC, identified as fedliver
  with its version and the MODEL_DIR's manifest SHA-256;
- one frame per source slice, in the source's own geometry: the slice of the prediction (which lies
  on the imported volume's grid, the series' own) at that slice's ImagePositionPatient;
- references to every source SOP instance, and the source study's patient and study attributes
  (highdicom copies them from the source images: the file stays inside the hospital, as they do).

The series' files are found again from the import's mapping (`import_dicom_mapping.json`: each
case's series UID and folder). A series that cannot be written (files gone, a slice off the
prediction's grid) is one line; its NIfTI prediction stands.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.dicom_import import MAPPING_FILE

LIVER_CODE = ("10200004", "SCT", "Liver")


class DicomSegError(ValueError):
    """A series whose segmentation cannot be written, with the reason."""


@dataclass(frozen=True)
class SegAlgorithm:
    """What the SEG says made it."""

    version: str
    model_sha256: str
    name: str = "fedliver"


def fedliver_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedliver")
    except PackageNotFoundError:
        return "unknown"


def find_mapping(root: Path) -> Path | None:
    """The import-dicom mapping file of a tree: in `root` or above it (a single Vendor_<X> folder)."""
    for folder in (root, root.parent):
        if (folder / MAPPING_FILE).is_file():
            return folder / MAPPING_FILE
    return None


@dataclass(frozen=True)
class SourceSeries:
    uid: str
    folder: Path    # where import-dicom found it
    files: int      # how many slices it imported


def source_series(mapping_file: Path, case_id: str, phase: str) -> SourceSeries:
    """The series `case_id`'s `phase` was imported from, as the mapping recorded it."""
    entry = json.loads(mapping_file.read_text(encoding="utf-8")).get("cases", {}).get(case_id)
    series = (entry or {}).get("series", {}).get(phase)
    if not series:
        raise DicomSegError(f"{mapping_file}: no source series recorded for {case_id} {phase}")
    return SourceSeries(series["series_instance_uid"], Path(series["folder"]), int(series.get("files", 0)))


def read_series(series: SourceSeries, dicom_dir: Path | None = None) -> list:
    """The pydicom datasets (pixel data included: highdicom reads them) of `series`: in its recorded
    folder, else anywhere under `dicom_dir` (the DICOM tree moved since the import)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = series.folder if series.folder.is_dir() else dicom_dir
    if folder is None or not folder.is_dir():
        raise DicomSegError(f"{series.folder}: source series folder is gone")
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError):
            continue
        if str(header.get("SeriesInstanceUID", "")) == series.uid:
            found.append(pydicom.dcmread(path))
    if len(found) < max(1, series.files):
        raise DicomSegError(f"{folder}: {len(found)} of the {series.files} files of series {series.uid}")
    return found


def frames_for(mask, datasets: Sequence) -> np.ndarray:
    """(len(datasets), rows, columns) uint8: the slice of `mask` (a SimpleITK image on the series'
    grid) at each dataset's ImagePositionPatient, in the datasets' order."""
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(mask)
    frames = []
    for ds in datasets:
        position = [float(v) for v in ds.ImagePositionPatient]
        index = mask.TransformPhysicalPointToContinuousIndex(position)  # (x, y, z)
        k = int(round(index[2]))
        if abs(index[0]) > 0.01 or abs(index[1]) > 0.01 or abs(index[2] - k) > 0.01 or not 0 <= k < array.shape[0]:
            raise DicomSegError(f"{ds.filename}: slice at {position} is not on the prediction's grid")
        if (int(ds.Rows), int(ds.Columns)) != array.shape[1:]:
            raise DicomSegError(f"{ds.filename}: {ds.Rows} x {ds.Columns} pixels, the prediction has "
                                f"{array.shape[1]} x {array.shape[2]}")
        frames.append(array[k] > 0)
    return np.stack(frames).astype(np.uint8)


def write_dicom_seg(mask, datasets: Sequence, out: Path, algorithm: SegAlgorithm) -> Path:
    """One DICOM SEG of `mask` over the source `datasets` at `out`; see the module docstring."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    from common.atomic_write import atomic_path

    frames = frames_for(mask, datasets)
    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm.name, family=codes.cid7162.ArtificialIntelligence, version=algorithm.version,
        parameters={"model_manifest_sha256": algorithm.model_sha256})
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Liver", segmented_property_category=codes.SCT.Organ,
        segmented_property_type=Code(*LIVER_CODE), algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=identification)
    seg = hd.seg.Segmentation(
        source_images=list(datasets), pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment], series_instance_uid=hd.UID(), series_number=9000 + int(datasets[0].get(
            "SeriesNumber", 0) or 0) % 1000, sop_instance_uid=hd.UID(), instance_number=1, manufacturer="fedliver",
        manufacturer_model_name="fedliver STU-Net CPS", software_versions=algorithm.version,
        device_serial_number=algorithm.model_sha256[:16], series_description="fedliver liver segmentation",
        omit_empty_frames=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, suffix=".dcm") as tmp:
        seg.save_as(tmp)
    return out


@dataclass(frozen=True)
class SegWriter:
    """Writes OUT/<case>/<PHASE>_seg.dcm for predictions of a tree imported from DICOM."""

    mapping: Path               # the import's import_dicom_mapping.json
    dicom_dir: Path | None      # where the DICOM tree is now (when its recorded folders moved)
    algorithm: SegAlgorithm

    @classmethod
    def for_tree(cls, root: Path, dicom_dir: Path | None, model_sha256: str) -> SegWriter:
        mapping = find_mapping(root)
        if mapping is None:
            raise DicomSegError(f"{root}: no {MAPPING_FILE} (a tree `fedliver import-dicom` wrote): cannot find the "
                                "source series for DICOM SEG")
        return cls(mapping, dicom_dir, SegAlgorithm(fedliver_version(), model_sha256))

    def write(self, case_id: str, phase: str, mask, out_dir: Path) -> Path:
        datasets = read_series(source_series(self.mapping, case_id, phase), self.dicom_dir)
        return write_dicom_seg(mask, datasets, out_dir / case_id / f"{phase}_seg.dcm", self.algorithm)
