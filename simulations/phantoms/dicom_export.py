"""A LiQA vendor folder as the DICOM MR series a site's PACS would export, for `fedliver import-dicom`.

    python -m simulations.phantoms.dicom_export data/Vendor_C /tmp/dicom_C [--style ge]

- Every `<case>/<PHASE>.nii.gz` of the vendor folder becomes one classic MR series, one file per
  slice, written by SimpleITK (GDCM): OUT/<PatientID>/<study>/<NN>_<description>/IM0001.dcm ...
  Masks are not exported (DICOM has no plain label series; the LiQA masks stay the reference).
- Each case is one study of one made-up patient. PatientID ("PAT-<hash>"), PatientName, birth date,
  AccessionNumber, StudyDate and every UID (2.25.<128-bit>) derive deterministically from the
  vendor folder's name and the case id, so a re-export writes the same identifiers.
  `patient_for_case` gives them, to link an import's mapping file back to the source case.
- SeriesDescription is scanner-typical (Siemens, GE or Philips names, `STYLES`), each mapped back to
  its phase by deploy/phases.json (tests/test_dicom_roundtrip.py checks every one).
- Geometry: ImagePositionPatient per slice (index (0, 0, k) in scanner coordinates), one
  ImageOrientationPatient (the first two direction columns), PixelSpacing, SliceThickness and
  SpacingBetweenSlices (the third spacing), one FrameOfReferenceUID per study (all phases share the
  scanner's coordinates, as label propagation assumes). DICOM has no slice order of its own: a
  left-handed volume (third axis against row x column) comes back right-handed from an import,
  the same voxels at the same places, its slices in the reverse order.
- Pixels are int16. Integer images within int16 are stored as they are (exact); other integer
  images within a 65536-value range get an integer RescaleIntercept (exact); float images
  (B1/B2 store float32 0-255) get RescaleSlope = range / 65000 and the mid-range as intercept, so
  every value comes back within slope / 2 (about range * 7.7e-6: 0.002 for 0-255; `encode_pixels`).
  The rescale goes into the classic MR files as Philips writes it (`_set_rescale`: GDCM alone would
  make an Enhanced MR multi-frame object of them, which import-dicom refuses). The files are the
  same bytes for the same input, whatever GDCM's global state.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import struct
import sys
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from common.nifti import ImageReadError, read_image
from common.phases import PHASES, image_filename

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
_INT16 = (-32768, 32767)
#: Stored values used by a float image's rescale (a margin below 65535 for the slope's rounding).
_FLOAT_LEVELS = 65000

#: Scanner-typical SeriesDescriptions and series numbers (protocol order: the HBP comes last).
STYLES: dict[str, dict[str, str]] = {
    "siemens": {"GED4": "t1_vibe_fs_tra HBP 20 min", "T1": "t1_vibe_dixon_tra in/opp",
                "T2": "t2_haste_fs_tra", "DWI_800": "ep2d_diff_tra b800", "GED1": "t1_vibe_fs_tra arterial",
                "GED2": "t1_vibe_fs_tra portal venous", "GED3": "t1_vibe_fs_tra transitional 3 min"},
    "ge": {"GED4": "Ax LAVA HBP 20min", "T1": "Ax LAVA-Flex in/opp", "T2": "Ax T2 SSFSE FS",
           "DWI_800": "Ax DWI b800", "GED1": "Ax LAVA arterial", "GED2": "Ax LAVA portal venous",
           "GED3": "Ax LAVA transitional 3 min"},
    "philips": {"GED4": "THRIVE HBP 20 min", "T1": "T1 mDIXON in/opp", "T2": "T2W_SPAIR",
                "DWI_800": "DWI_SENSE b800", "GED1": "THRIVE arterial", "GED2": "THRIVE portal venous",
                "GED3": "THRIVE transitional 3 min"},
}
MANUFACTURERS = {"siemens": "SIEMENS", "ge": "GE MEDICAL SYSTEMS", "philips": "Philips Medical Systems"}
SERIES_NUMBERS = {"T1": 3, "T2": 4, "DWI_800": 6, "GED1": 8, "GED2": 9, "GED3": 10, "GED4": 14}
#: The phantoms' vendors (simulations/phantoms/centers.py) -> a scanner style.
VENDOR_STYLES = {"vendor-1": "siemens", "vendor-2": "philips", "vendor-3": "ge"}

_SURNAMES = ("MUELLER", "GARCIA", "ROSSI", "DUBOIS", "NOVAK", "JANSEN", "SILVA", "KOWALSKI", "NIELSEN",
             "OBRIEN", "PETROV", "LINDQVIST", "MORENO", "HOFFMANN", "BERNARD", "COSTA")
_GIVEN = ("ANNA", "JONAS", "MARIA", "LUCA", "ELENA", "PAUL", "SOFIA", "DAVID", "CLARA", "MIGUEL",
          "IDA", "TOMAS", "NORA", "KARL", "EVA", "LEON")


class DicomExportError(ValueError):
    """The export cannot start (no vendor folder, unknown style); `str()` is one line."""


# ----------------------------------------------------------------------------- identities

def _digest(*parts: str) -> bytes:
    return hashlib.sha256("\x1f".join(parts).encode()).digest()


def make_uid(*parts: str) -> str:
    """A deterministic UID under the UUID-derived root 2.25 (a 128-bit integer, at most 44 chars)."""
    return "2.25." + str(int.from_bytes(_digest(*parts)[:16], "big"))


@dataclass(frozen=True)
class DicomPatient:
    """Who and which study every slice of a series belongs to (made up, never a real person)."""

    patient_id: str
    patient_name: str
    study_uid: str
    accession: str = ""
    study_date: str = "20240102"
    study_time: str = "101500"
    study_id: str = "1"
    study_description: str = "MR ABDOMEN LIVER W/WO CONTRAST"
    birth_date: str = ""
    sex: str = ""
    frame_of_reference_uid: str = ""  # "" -> derived from the study UID


def patient_for_case(vendor: str, case_id: str) -> DicomPatient:
    """The made-up patient and study of `case_id` in vendor folder `vendor` (e.g. "Vendor_C")."""
    d = _digest("fedliver-phantom-patient", vendor, case_id)
    study_day = date(2023, 1, 2) + timedelta(days=int.from_bytes(d[8:10], "big") % 700)
    birth = study_day - timedelta(days=365 * (35 + d[10] % 45) + d[11])
    return DicomPatient(
        patient_id=f"PAT-{d[:4].hex().upper()}",
        patient_name=f"{_SURNAMES[d[4] % len(_SURNAMES)]}^{_GIVEN[d[5] % len(_GIVEN)]}",
        study_uid=make_uid("study", vendor, case_id),
        accession=f"ACC{int.from_bytes(d[12:16], 'big') % 10**8:08d}",
        study_date=study_day.strftime("%Y%m%d"),
        study_time=f"{8 + d[16] % 10:02d}{d[17] % 60:02d}00",
        study_id=str(1000 + int.from_bytes(d[18:20], "big") % 9000),
        birth_date=birth.strftime("%Y%m%d"),
        sex="FM"[d[6] % 2],
    )


# ----------------------------------------------------------------------------- pixels

def _ds_text(value: float) -> str:
    """`value` as a DICOM decimal string (16 characters at most)."""
    return f"{value:.9g}"


def _ds(value: float) -> float:
    """`value` as its decimal string holds it: what a reader gets back."""
    return float(_ds_text(value))


@dataclass(frozen=True)
class PixelEncoding:
    """A volume's int16 stored values and the rescale that gives its values back."""

    stored: np.ndarray  # int16, (z, y, x)
    slope: float = 1.0
    intercept: float = 0.0
    max_error: float = 0.0  # the largest |value - (stored * slope + intercept)| of this volume

    @property
    def rescaled(self) -> bool:
        return self.slope != 1.0 or self.intercept != 0.0

    @property
    def tolerance(self) -> float:
        """What a reader may be off by: 0 for exact encodings, else slope / 2 (plus float rounding)."""
        return 0.0 if self.max_error == 0.0 else 0.5 * self.slope * (1 + 1e-6)

    def real(self, k: int | slice = slice(None)) -> np.ndarray:
        """Values as a reader computes them (float64), of slice(s) `k`."""
        return self.stored[k].astype(np.float64) * self.slope + self.intercept


def encode_pixels(array: np.ndarray) -> PixelEncoding:
    """int16 stored values (+ slope/intercept) for `array`; raises ValueError on NaN or infinity."""
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.int16)
    if a.size == 0:
        return PixelEncoding(a.astype(np.int16))
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError("NaN or infinite voxels: no DICOM value for them")
        if np.array_equal(a, np.round(a)) and abs(float(a.min())) < 2**53 and abs(float(a.max())) < 2**53:
            a = a.astype(np.int64)  # whole numbers in a float file: as exact as integers
    lo, hi = a.min().item(), a.max().item()
    if np.issubdtype(a.dtype, np.integer):
        if _INT16[0] <= lo and hi <= _INT16[1]:
            return PixelEncoding(a.astype(np.int16))
        if hi - lo <= _INT16[1] - _INT16[0]:  # an integer shift keeps it exact
            intercept = lo - _INT16[0]
            return PixelEncoding((a.astype(np.int64) - intercept).astype(np.int16), 1.0, float(intercept))
    lo, hi = float(lo), float(hi)
    slope = _ds((hi - lo) / _FLOAT_LEVELS) or 1.0
    intercept = _ds((hi + lo) / 2)
    stored = np.clip(np.rint((a.astype(np.float64) - intercept) / slope), *_INT16).astype(np.int16)
    error = float(np.abs(stored.astype(np.float64) * slope + intercept - a).max())
    return PixelEncoding(stored, slope, intercept, error)


_LITTLE_ENDIAN = {"1.2.840.10008.1.2": False, "1.2.840.10008.1.2.1": True}  # transfer syntax -> explicit VR
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"}


def _element_at(data: bytes, pos: int, explicit: bool) -> tuple[tuple[int, int], int, int]:
    """(tag, header length, value length) of the data element at `pos`."""
    tag = struct.unpack_from("<HH", data, pos)
    if not explicit:
        return tag, 8, struct.unpack_from("<I", data, pos + 4)[0]
    if data[pos + 4:pos + 6] in _LONG_VRS:
        return tag, 12, struct.unpack_from("<I", data, pos + 8)[0]
    return tag, 8, struct.unpack_from("<H", data, pos + 6)[0]


def _set_rescale(path: Path, intercept: float, slope: float) -> None:
    """Write RescaleIntercept, RescaleSlope and RescaleType into a classic MR file GDCM wrote.

    GDCM writes them on MR Image Storage only while its global ForceRescaleInterceptSlope is on
    (ITK turns it on when it first reads a DICOM file); otherwise, given a rescale, it writes
    Enhanced MR, a multi-frame object, instead. Philips scanners write them on classic MR images,
    and GDCM applies them when reading. So the int16 slices are written without a rescale and the
    three elements put in here (replacing GDCM's identity ones if it wrote them), at the top level
    in tag order; GDCM writes no sequences before them."""
    data = path.read_bytes()
    if data[128:132] != b"DICM":
        raise ValueError(f"{path}: no DICOM preamble")
    pos, syntax = 132, ""
    while pos < len(data) and struct.unpack_from("<H", data, pos)[0] == 0x0002:  # file meta: explicit VR
        tag, head, length = _element_at(data, pos, True)
        if tag == (0x0002, 0x0010):
            syntax = data[pos + head:pos + head + length].rstrip(b"\0 ").decode("ascii")
        pos += head + length
    if syntax not in _LITTLE_ENDIAN:
        raise ValueError(f"{path}: transfer syntax {syntax!r}: cannot add the rescale")
    explicit = _LITTLE_ENDIAN[syntax]
    first = None  # where the rescale elements go: before the first element from (0028,1052) on ...
    while pos < len(data):
        tag, head, length = _element_at(data, pos, explicit)
        if first is None and tag >= (0x0028, 0x1052):
            first = pos
        if tag > (0x0028, 0x1054):
            break  # ... replacing those up to (0028,1054)
        if length == 0xFFFFFFFF or tag == (0x0028, 0x0000):
            raise ValueError(f"{path}: undefined length or group length before the rescale: cannot add it")
        pos += head + length
    first = pos if first is None else first

    def element(element_number: int, vr: bytes, text: str) -> bytes:
        value = text.encode("ascii")
        value += b" " * (len(value) % 2)
        if explicit:
            return struct.pack("<HH", 0x0028, element_number) + vr + struct.pack("<H", len(value)) + value
        return struct.pack("<HHI", 0x0028, element_number, len(value)) + value

    rescale = (element(0x1052, b"DS", _ds_text(intercept)) + element(0x1053, b"DS", _ds_text(slope))
               + element(0x1054, b"LO", "US"))
    path.write_bytes(data[:first] + rescale + data[pos:])


# ----------------------------------------------------------------------------- one series

def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "series"


def write_series(folder: Path, image: sitk.Image, description: str, patient: DicomPatient, series_uid: str,
                 number: int, skip: Sequence[int] = (), shift_from: int | None = None,
                 manufacturer: str = "") -> PixelEncoding:
    """`image` as one classic MR DICOM file per slice, IM0001.dcm ... (SimpleITK's DicomSeriesFromArray
    recipe); returns the pixel encoding used (its `tolerance` is what a reader's values may be off by).

    `skip`: slice indices not written (a missing slice); `shift_from`: slices from there on moved
    0.4 slice spacings along the slice axis (uneven spacing): faults for the importer's tests."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"expected a 3D scalar image, got {image.GetDimension()}D with "
                         f"{image.GetNumberOfComponentsPerPixel()} component(s)")
    encoding = encode_pixels(sitk.GetArrayViewFromImage(image))
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("IM*.dcm"):  # a re-export must not leave slices of an older one
        old.unlink()
    d = image.GetDirection()
    sx, sy, sz = image.GetSpacing()
    k_axis = np.array(d[2::3])
    normal = np.cross(d[0::3], d[1::3])  # what a reader sorts slices along
    series_tags = {
        "0008|0008": "ORIGINAL\\PRIMARY\\M\\ND", "0008|0016": MR_IMAGE_STORAGE, "0008|0020": patient.study_date,
        "0008|0021": patient.study_date, "0008|0030": patient.study_time, "0008|0050": patient.accession,
        "0008|0060": "MR", "0008|0070": manufacturer, "0008|1030": patient.study_description,
        "0008|103e": description, "0010|0010": patient.patient_name, "0010|0020": patient.patient_id,
        "0010|0030": patient.birth_date, "0010|0040": patient.sex, "0018|0050": f"{sz:.6g}",
        "0018|0088": f"{sz:.6g}", "0020|000d": patient.study_uid, "0020|000e": series_uid,
        "0020|0010": patient.study_id, "0020|0011": str(number),
        "0020|0037": "\\".join(f"{v:.8f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
        "0020|0052": patient.frame_of_reference_uid or make_uid("frame of reference", patient.study_uid),
    }  # GDCM writes PixelSpacing and SpacingBetweenSlices from the slice image's spacing
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        if k in skip:
            continue
        position = np.array(image.TransformIndexToPhysicalPoint((0, 0, k)))
        if shift_from is not None and k >= shift_from:
            position = position + 0.4 * sz * k_axis
        piece = sitk.GetImageFromArray(encoding.stored[k:k + 1])  # one slice, 3D: its spacing keeps the z step
        piece.SetSpacing((sx, sy, sz))
        piece.SetOrigin(tuple(position))
        piece.SetDirection(d)
        for tag, value in series_tags.items():
            if value:  # no empty elements for what the patient record leaves out
                piece.SetMetaData(tag, value)
        for tag, value in {"0008|0018": f"{series_uid}.{k + 1}", "0020|0013": str(k + 1),
                           "0020|0032": "\\".join(f"{v:.6f}" for v in position),
                           "0020|1041": f"{float(position @ normal):.6f}"}.items():
            piece.SetMetaData(tag, value)
        path = folder / f"IM{k + 1:04d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(piece)
        if encoding.rescaled:
            _set_rescale(path, encoding.intercept, encoding.slope)
    return encoding


# ----------------------------------------------------------------------------- a vendor folder

@dataclass(frozen=True)
class DicomExportConfig:
    style: str | None = None  # "siemens" | "ge" | "philips"; None: the phantom vendor's (else siemens)
    phases: tuple[str, ...] = PHASES
    descriptions: Mapping[str, str] | None = None  # phase -> SeriesDescription, over the style's

    def description(self, style: str, phase: str) -> str:
        return (self.descriptions or {}).get(phase) or STYLES[style][phase]


def style_for(vendor_dir: Path, config: DicomExportConfig) -> str:
    if config.style is not None:
        if config.style not in STYLES:
            raise DicomExportError(f"style {config.style!r}: expected one of {', '.join(STYLES)}")
        return config.style
    from simulations.phantoms.centers import center_profile

    center = vendor_dir.name.removeprefix("Vendor_")
    return VENDOR_STYLES.get(center_profile(center).vendor, "siemens") if center else "siemens"


def export_liqa_as_dicom(vendor_dir: Path | str, out: Path | str, config: DicomExportConfig = DicomExportConfig(),
                         on_problem: Callable[[str], None] | None = None,
                         on_series: Callable[[str], None] | None = None) -> list[Path]:
    """Write every `<case>/<PHASE>.nii.gz` under `vendor_dir` as a DICOM MR series under `out`.

    Returns the series folders written. A file that cannot be read or encoded is one line
    `path: problem` to `on_problem` (default: stderr) and the rest goes on; `on_series` gets one
    line per series written."""
    vendor_dir, out = Path(vendor_dir), Path(out)
    if not vendor_dir.is_dir():
        raise DicomExportError(f"{vendor_dir}: {'not a folder' if vendor_dir.exists() else 'no such folder'}")
    unknown = sorted(set(config.phases) - set(PHASES))
    if unknown:
        raise DicomExportError(f"unknown phase(s) {', '.join(unknown)}: expected some of {', '.join(PHASES)}")
    style = style_for(vendor_dir, config)
    problem = on_problem or (lambda line: print(line, file=sys.stderr))
    cases = sorted(p for p in vendor_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not cases:
        raise DicomExportError(f"{vendor_dir}: no case folders (expected a Vendor_<X> folder of <case>/<PHASE>.nii.gz)")
    written: list[Path] = []
    for case in cases:
        patient = patient_for_case(vendor_dir.name, case.name)
        study_dir = out / patient.patient_id / f"{patient.study_date}_{patient.accession}"
        for phase in config.phases:
            path = case / image_filename(phase)
            if not path.exists():
                continue
            description = config.description(style, phase)
            number = SERIES_NUMBERS[phase]
            folder = study_dir / f"{number:02d}_{_safe(description)}"
            try:
                image = read_image(path)
                encoding = write_series(folder, image, description, patient,
                                        make_uid("series", vendor_dir.name, case.name, phase), number,
                                        manufacturer=MANUFACTURERS[style])
            except ImageReadError as e:
                problem(str(e))
                continue
            except (ValueError, RuntimeError) as e:
                problem(f"{path}: cannot export: {str(e).strip().splitlines()[-1][:200]}")
                continue
            written.append(folder)
            if on_series:
                scale = (f", rescale slope {encoding.slope:g} intercept {encoding.intercept:g} "
                         f"(max error {encoding.max_error:.2g})" if encoding.rescaled else "")
                on_series(f"{case.name} {phase} -> {folder} ({image.GetDepth()} slices, {description!r}{scale})")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.phantoms.dicom_export",
        description="Export a LiQA vendor folder (Vendor_<X>/<case>/<PHASE>.nii.gz) as DICOM MR series, "
                    "one made-up patient and study per case, for `fedliver import-dicom`.")
    parser.add_argument("vendor_dir", type=Path, metavar="VENDOR_DIR", help="a Vendor_<X> folder")
    parser.add_argument("out", type=Path, metavar="OUT", help="DICOM folder written (OUT/<patient>/<study>/<series>/)")
    parser.add_argument("--style", choices=sorted(STYLES),
                        help="scanner naming of SeriesDescription (default: the phantom vendor's; siemens otherwise)")
    parser.add_argument("--phases", default=",".join(PHASES), help="phases exported (default: all)")
    args = parser.parse_args(argv)
    config = DicomExportConfig(style=args.style, phases=tuple(p.strip() for p in args.phases.split(",") if p.strip()))
    problems: list[str] = []

    def on_problem(line: str) -> None:
        problems.append(line)
        print(line, file=sys.stderr)

    try:
        written = export_liqa_as_dicom(args.vendor_dir, args.out, config, on_problem=on_problem, on_series=print)
    except DicomExportError as e:
        print(e, file=sys.stderr)
        return 2
    files = sum(len(list(f.glob("IM*.dcm"))) for f in written)
    print(f"dicom-export {args.vendor_dir} -> {args.out}: {len(written)} series, {files} files, "
          f"style {style_for(args.vendor_dir, config)}, {len(problems)} problem(s)")
    return 0 if written and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
