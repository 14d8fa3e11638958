"""A site's DICOM MR series into the LiQA layout: `fedliver import-dicom DICOM_DIR OUT`.

- Series are found folder by folder under DICOM_DIR with GDCM (SimpleITK's
  `ImageSeriesReader.GetGDCMSeriesIDs` / `GetGDCMSeriesFileNames`); a series whose files lie in
  several folders is joined by its SeriesInstanceUID. Files GDCM cannot read are listed per folder.
- A phase map (`phases.json`: phase -> regexes, `read_phase_map`) names each series' LiQA phase
  from its SeriesDescription (0008|103e): phases are tried in the file's order, the first whose
  regex matches (`re.search`) wins.
- Every slice header is read before any voxel: a series is imported only when it is a plain stack
  of single-frame slices (one orientation, size and pixel spacing; positions along the slice
  normal, evenly spaced, none missing or repeated). The volume is then read by GDCM in position
  order (origin, spacing and direction as SimpleITK reads them; the third axis along the normal
  of ImageOrientationPatient, right-handed) and written without any DICOM metadata.
- Series are grouped into cases by StudyInstanceUID (else PatientID + StudyDate). Case ids are
  `<NNNN>-<site>`, numbered per site; the mapping file OUT/import_dicom_mapping.json (mode 0600)
  keeps case id -> patient/study identifiers and the series used, so a re-run gives every study
  its old id and writes nothing twice. No identifier reaches a path or an image header.
- Nothing is dropped silently: every series not imported is one `Skipped` line (no phase matched,
  incomplete, multi-frame, two series for one phase in a study, unreadable).
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from common.atomic_write import atomic_path, atomic_write_json
from common.phases import PHASES, image_filename

MAPPING_FILE = "import_dicom_mapping.json"
MAPPING_FORMAT = "fedliver-import-dicom/1"
VENDOR_PREFIX = "Vendor_"
_SITE = re.compile(r"^[A-Za-z0-9]+$")
#: SOP classes whose one file holds a whole volume (enhanced and legacy-converted MR).
_MULTI_FRAME_SOP = {"1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.3", "1.2.840.10008.5.1.4.1.1.4.4"}
_TAGS = {  # name -> DICOM tag as GDCM's metadata keys spell it
    "sop_class": "0008|0016", "study_date": "0008|0020", "accession_number": "0008|0050",
    "study_description": "0008|1030", "series_description": "0008|103e", "patient_name": "0010|0010",
    "patient_id": "0010|0020", "study_instance_uid": "0020|000d", "series_instance_uid": "0020|000e",
    "study_id": "0020|0010", "series_number": "0020|0011", "position": "0020|0032", "orientation": "0020|0037",
    "frames": "0028|0008", "pixel_spacing": "0028|0030", "intercept": "0028|1052", "slope": "0028|1053",
}
_STUDY_FIELDS = ("patient_id", "patient_name", "study_instance_uid", "study_date", "accession_number",
                 "study_id", "study_description")


class PhaseMapError(ValueError):
    """A phases.json that cannot be used; `str()` is one line naming the file."""


class DicomImportError(ValueError):
    """The import cannot start (OUT's mapping file unreadable, bad site name); one line."""


# ----------------------------------------------------------------------------- phase map

@dataclass(frozen=True)
class PhaseMap:
    """Phase -> regexes on SeriesDescription, in the file's order (the first match wins)."""

    rules: tuple[tuple[str, tuple[re.Pattern, ...]], ...]
    source: str = "phase map"

    def phase_for(self, description: str) -> str | None:
        for phase, patterns in self.rules:
            if any(p.search(description) for p in patterns):
                return phase
        return None


def parse_phase_map(data: object, source: str = "phase map") -> PhaseMap:
    """A `PhaseMap` from decoded JSON; keys starting with "_" are comments. Raises `PhaseMapError`."""
    if not isinstance(data, dict) or not data:
        raise PhaseMapError(f"{source}: expected a JSON object of phase -> list of regexes")
    rules = []
    for phase, patterns in data.items():
        if phase.startswith("_"):
            continue
        if phase not in PHASES:
            raise PhaseMapError(f"{source}: unknown phase {phase!r} (phases: {', '.join(PHASES)})")
        if isinstance(patterns, str):
            patterns = [patterns]
        if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) for p in patterns):
            raise PhaseMapError(f"{source}: {phase}: expected a non-empty list of regex strings")
        compiled = []
        for text in patterns:
            try:
                compiled.append(re.compile(text))
            except re.error as e:
                raise PhaseMapError(f"{source}: {phase}: invalid regex {text!r}: {e}") from None
        rules.append((phase, tuple(compiled)))
    if not rules:
        raise PhaseMapError(f"{source}: no phase given")
    return PhaseMap(tuple(rules), source)


def read_phase_map(path: Path | str) -> PhaseMap:
    """Read and check phases.json; every problem raises `PhaseMapError` naming the file."""
    path = Path(path)

    def no_repeats(pairs: list[tuple[str, object]]) -> dict:
        keys = [k for k, _ in pairs]
        if repeated := sorted({k for k in keys if keys.count(k) > 1}):
            raise PhaseMapError(f"{path}: {', '.join(repeated)} given more than once")
        return dict(pairs)

    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=no_repeats)
    except OSError as e:
        raise PhaseMapError(f"{path}: cannot read: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PhaseMapError(f"{path}: not valid JSON: {e}") from None
    return parse_phase_map(data, str(path))


# ----------------------------------------------------------------------------- results

@dataclass(frozen=True)
class DicomImportConfig:
    site: str
    phase_map: PhaseMap
    spacing_rtol: float = 0.01  # slice steps may differ by this fraction of the median step ...
    spacing_atol_mm: float = 0.01  # ... or by this many mm (positions are rounded in headers)
    gap_factor: float = 1.5  # a step this many times the median is missing slices
    in_plane_atol_mm: float = 0.1  # slice origins off the normal through the first (gantry tilt)
    orientation_atol: float = 1e-3  # per direction cosine, between slices

    def __post_init__(self) -> None:
        if not _SITE.match(self.site):
            raise DicomImportError(f"site {self.site!r}: letters and digits only (it names Vendor_<site>)")


@dataclass(frozen=True)
class SeriesRef:
    """One DICOM series as found: where, which, and what it says it is."""

    folder: str  # relative to DICOM_DIR ("." for its root)
    uid: str
    number: str
    description: str
    files: tuple[Path, ...]

    @property
    def label(self) -> str:
        return f"{self.folder} series {self.number or '?'} {self.description!r}"


@dataclass(frozen=True)
class Skipped:
    """A series (or a folder's unreadable files) not imported, and why."""

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass(frozen=True)
class ImportedSeries:
    case_id: str
    phase: str
    path: Path
    series: SeriesRef
    written: bool  # False: the same series was already there from an earlier run


@dataclass
class ImportResult:
    dicom_dir: Path
    out: Path
    site: str
    mapping_file: Path | None
    imported: list[ImportedSeries] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    new_cases: list[str] = field(default_factory=list)
    series_found: int = 0

    @property
    def cases(self) -> list[str]:
        return sorted({s.case_id for s in self.imported})

    def format(self) -> str:
        written = sum(s.written for s in self.imported)
        lines = [f"import-dicom {self.dicom_dir} -> {self.out / (VENDOR_PREFIX + self.site)}: "
                 f"{self.series_found} series found, {len(self.cases)} cases ({len(self.new_cases)} new), "
                 f"{len(self.imported)} series imported ({written} written, "
                 f"{len(self.imported) - written} already there), {len(self.skipped)} skipped"]
        per_phase = {p: sum(s.phase == p for s in self.imported) for p in PHASES}
        lines.append("  imported per phase: " + ", ".join(f"{p} {n}" for p, n in per_phase.items()))
        if self.skipped:
            lines.append(f"skipped ({len(self.skipped)}):")
            lines += [f"  {s}" for s in self.skipped]
        if self.mapping_file:
            lines.append(f"mapping (case id -> patient/study identifiers; keep private): {self.mapping_file}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- reading headers

@contextmanager
def _quiet_itk() -> Iterator[None]:
    """ITK's own warnings (no series, non-uniform sampling) would duplicate our one-line reasons."""
    before = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(before)


@dataclass(frozen=True)
class _Header:
    path: Path
    tags: Mapping[str, str]
    size: tuple[int, ...]

    def floats(self, name: str) -> tuple[float, ...] | None:
        try:
            values = tuple(float(v) for v in self.tags.get(name, "").split("\\"))
        except ValueError:
            return None
        return values if all(np.isfinite(values)) else None

    @property
    def frames(self) -> int:
        try:
            frames = int(float(self.tags.get("frames") or 1))
        except ValueError:
            frames = 1
        return max(frames, self.size[2] if len(self.size) > 2 else 1)


def _read_header(path: Path) -> _Header:
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    tags = {}
    for name, key in _TAGS.items():
        if reader.HasMetaDataKey(key):
            try:
                tags[name] = reader.GetMetaData(key).strip()
            except UnicodeDecodeError:  # a name in an unusual character set: keep going without it
                tags[name] = ""
    return _Header(path, tags, tuple(reader.GetSize()))


def find_series(dicom_dir: Path, exclude: Sequence[Path] = ()) -> tuple[list[SeriesRef], list[Skipped]]:
    """Every DICOM series under `dicom_dir` (sorted folder walk), and one line per folder of unreadable files.

    Hidden files and folders, DICOMDIR index files and the folders in `exclude` are not looked at.
    """
    dicom_dir = Path(dicom_dir)
    excluded = {Path(p).resolve() for p in exclude}
    files_of: dict[str, list[Path]] = {}
    folders_of: dict[str, list[str]] = defaultdict(list)
    skipped = []
    with _quiet_itk():
        for folder, dirs, names in os.walk(dicom_dir):
            here = Path(folder)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (here / d).resolve() not in excluded)
            files = sorted(here / n for n in names if not n.startswith(".") and n.upper() != "DICOMDIR"
                           and (here / n).is_file())
            if not files:
                continue
            seen: set[str] = set()  # names: GDCM may spell the folder differently
            for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(here)):
                series_files = [here / Path(f).name
                                for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(here), uid)]
                seen.update(f.name for f in series_files)
                files_of.setdefault(uid, []).extend(series_files)
                folders_of[uid].append(str(here.relative_to(dicom_dir)))
            unreadable = [f.name for f in files if f.name not in seen]
            if unreadable:
                shown = ", ".join(unreadable[:5]) + (f", ... ({len(unreadable)} files)" if len(unreadable) > 5 else "")
                skipped.append(Skipped(str(here.relative_to(dicom_dir)),
                                       f"{len(unreadable)} file(s) not readable as DICOM images (ignored): {shown}"))
    series = []
    for uid, files in files_of.items():
        try:
            header = _read_header(files[0])
        except RuntimeError as e:
            skipped.append(Skipped(f"{' + '.join(folders_of[uid])} series {uid}", f"cannot read: {_first_line(e)}"))
            continue
        series.append(SeriesRef(folder=" + ".join(folders_of[uid]), uid=uid,
                                number=header.tags.get("series_number", ""),
                                description=header.tags.get("series_description", ""), files=tuple(files)))
    return series, skipped


def _slice_order(series: SeriesRef, config: DicomImportConfig) -> tuple[list[_Header], str | None]:
    """The series' slice headers in position order along the slice normal, or the reason it is no plain volume."""
    try:
        headers = [_read_header(f) for f in series.files]
    except RuntimeError as e:
        return [], f"cannot read a slice header: {_first_line(e)}"
    if multi := [h for h in headers if h.frames > 1 or h.tags.get("sop_class") in _MULTI_FRAME_SOP]:
        return [], (f"multi-frame (enhanced) DICOM ({multi[0].frames} frames in {multi[0].path.name}): "
                    "not supported; export the series as classic single-frame images")
    if len(headers) < 2:
        return [], "a single slice, not a volume"
    positions = [h.floats("position") for h in headers]
    orientations = [h.floats("orientation") for h in headers]
    if any(p is None or len(p) != 3 for p in positions) or any(o is None or len(o) != 6 for o in orientations):
        return [], "a slice without a valid ImagePositionPatient / ImageOrientationPatient: no geometry"
    if len({h.size[:2] for h in headers}) > 1:
        return [], "slices differ in size (rows x columns)"
    pixel_spacings = [h.floats("pixel_spacing") for h in headers]
    if any(p is None or len(p) != 2 for p in pixel_spacings):
        return [], "a slice without a valid PixelSpacing (0028|0030): in-plane spacing unknown"
    if not np.allclose(pixel_spacings, pixel_spacings[0], rtol=1e-4, atol=0):
        return [], "slices differ in PixelSpacing"
    orient = np.asarray(orientations)
    if np.abs(orient - orient[0]).max() > config.orientation_atol:
        return [], "slices differ in ImageOrientationPatient"
    normal = np.cross(orient[0, :3], orient[0, 3:])
    normal /= np.linalg.norm(normal) or 1.0  # cosines are rounded in headers
    pos = np.asarray(positions)
    depth = pos @ normal
    order = np.argsort(depth, kind="stable")
    headers, pos, depth = [headers[i] for i in order], pos[order], depth[order]
    off_axis = np.linalg.norm((pos - pos[0]) - np.outer(depth - depth[0], normal), axis=1).max()
    steps = np.diff(depth)
    step = float(np.median(steps))
    tolerance = max(config.spacing_atol_mm, config.spacing_rtol * step)
    if (steps < tolerance).any():
        n = int((steps < tolerance).sum())
        return [], (f"{n} slice(s) repeat a position (several volumes in one series, e.g. b-values, echoes "
                    "or time points): not supported")
    if off_axis > config.in_plane_atol_mm:
        return [], f"slices are not stacked along their normal ({off_axis:.2f} mm off: gantry tilt or shifted slices)"
    if (gaps := np.flatnonzero(steps > config.gap_factor * step)).size:
        missing = int(sum(round(steps[i] / step) - 1 for i in gaps))
        i = int(gaps[0])
        return [], (f"incomplete: about {missing} slice(s) missing (gap of {steps[i]:.2f} mm after "
                    f"{headers[i].path.name}, slice spacing {step:.2f} mm)")
    if np.abs(steps - step).max() > tolerance:
        return [], f"incomplete: inconsistent slice spacing ({steps.min():.3f} to {steps.max():.3f} mm)"
    return headers, None


def _first_line(error: Exception) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "ERROR" in ln or "rror" in ln] or lines or [type(error).__name__]
    return useful[-1][:200]


def read_volume(headers: Sequence[_Header]) -> sitk.Image:
    """The volume of slices already in position order, with no metadata left on it."""
    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileNames([str(h.path) for h in headers])
    # GDCM takes the output type from the first slice: rescale values that vary per slice need floats.
    if len({(h.tags.get("slope", ""), h.tags.get("intercept", "")) for h in headers}) > 1:
        reader.SetOutputPixelType(sitk.sitkFloat32)
    with _quiet_itk():
        image = reader.Execute()
    for key in image.GetMetaDataKeys():
        image.EraseMetaData(key)
    return image


# ----------------------------------------------------------------------------- the mapping file

def _load_mapping(path: Path) -> dict[str, dict]:
    """Case id -> entry of an earlier run; {} without a file. Raises `DicomImportError` when unusable."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DicomImportError(f"{path}: cannot read: {e} (fix it or move it away: it keeps case ids stable)") from None
    cases = data.get("cases") if isinstance(data, dict) else None
    if not isinstance(cases, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("site"), str) and isinstance(v.get("study_key"), str)
        and isinstance(v.get("series", {}), dict) for v in cases.values()
    ):
        raise DicomImportError(f"{path}: not an import-dicom mapping (expected \"cases\": case id -> "
                               "{site, study_key, series}); fix it or move it away")
    return cases


def _write_private_json(path: Path, data: dict) -> None:
    """Write atomically with mode 0600 from the first byte (it holds patient identifiers)."""
    atomic_write_json(path, data, permissions=0o600, indent=2, ensure_ascii=False)


def _study_key(header: _Header) -> str | None:
    if uid := header.tags.get("study_instance_uid"):
        return uid
    if header.tags.get("patient_id") and header.tags.get("study_date"):
        return f"{header.tags['patient_id']}|{header.tags['study_date']}"
    return None


def _write_image(image: sitk.Image, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest, suffix=".nii.gz") as tmp:  # keeps the ending ITK reads the format from
        sitk.WriteImage(image, str(tmp), useCompression=True)


# ----------------------------------------------------------------------------- the import

def import_dicom(dicom_dir: Path | str, out: Path | str, config: DicomImportConfig) -> ImportResult:
    """Import every usable series under `dicom_dir` into `out/Vendor_<site>/`; see the module docstring."""
    dicom_dir, out = Path(dicom_dir), Path(out)
    if not dicom_dir.is_dir():
        raise DicomImportError(f"{dicom_dir}: {'not a folder' if dicom_dir.exists() else 'no such folder'}")
    mapping_path = out / MAPPING_FILE
    mapping = _load_mapping(mapping_path)
    vendor = out / f"{VENDOR_PREFIX}{config.site}"
    result = ImportResult(dicom_dir, out, config.site, None)
    series, result.skipped = find_series(dicom_dir, exclude=[out])
    result.series_found = len(series)

    # Phase, then a plain volume: what each study offers per phase.
    candidates: dict[str, dict[str, list[tuple[SeriesRef, list[_Header]]]]] = {}
    study_headers: dict[str, _Header] = {}
    for ref in series:
        phase = config.phase_map.phase_for(ref.description)
        if phase is None:
            reason = (f"SeriesDescription {ref.description!r} matches no phase of {config.phase_map.source}"
                      if ref.description else "no SeriesDescription (0008|103e): no phase")
            result.skipped.append(Skipped(ref.label, reason))
            continue
        headers, problem = _slice_order(ref, config)
        if problem:
            result.skipped.append(Skipped(ref.label, f"{phase}: {problem}"))
            continue
        key = _study_key(headers[0])
        if key is None:
            result.skipped.append(Skipped(ref.label, f"{phase}: no StudyInstanceUID nor PatientID + StudyDate: "
                                                     "cannot tell its study"))
            continue
        study_headers.setdefault(key, headers[0])
        candidates.setdefault(key, {}).setdefault(phase, []).append((ref, headers))

    # Case ids: an earlier run's for a known study, else the next free number of this site.
    case_of = {v["study_key"]: cid for cid, v in mapping.items() if v["site"] == config.site}
    taken = {cid for cid, v in mapping.items() if v["site"] == config.site}
    if vendor.is_dir():
        taken |= {d.name for d in vendor.iterdir()}
    numbers = [int(m.group(1)) for c in taken if (m := re.match(rf"^(\d+)-{re.escape(config.site)}\b", c))]
    next_number = max(numbers, default=0) + 1

    for key, phases in candidates.items():
        for phase, found in phases.items():
            if len(found) > 1:
                for ref, _ in found:
                    others = "; ".join(other.label for other, _ in found if other is not ref)
                    result.skipped.append(Skipped(ref.label, f"{phase}: {len(found)} series of one study match "
                                                             f"{phase} (also {others}): none imported; make the "
                                                             "phase map more specific"))
        usable = {p: f[0] for p, f in phases.items() if len(f) == 1}
        if not usable:
            continue
        case_id = case_of.get(key)
        if case_id is None:
            case_id = f"{next_number:04d}-{config.site}"
            next_number += 1
            head = study_headers[key]
            mapping[case_id] = {"site": config.site, "study_key": key,
                                **{f: head.tags.get(f, "") for f in _STUDY_FIELDS}, "series": {}}
            result.new_cases.append(case_id)
        entry = mapping[case_id]
        for phase in PHASES:
            if phase not in usable:
                continue
            ref, headers = usable[phase]
            dest = vendor / case_id / image_filename(phase)
            before = entry["series"].get(phase)
            if before and before.get("series_instance_uid") != ref.uid and dest.exists():
                result.skipped.append(Skipped(ref.label, f"{phase}: case {case_id} already has {phase} from series "
                                                         f"{before.get('series_number', '?')} "
                                                         f"{before.get('series_description', '')!r}: not replaced "
                                                         "(remove the file and its mapping entry to replace it)"))
                continue
            written = not (before and dest.exists())
            if written:
                try:
                    image = read_volume(headers)
                except RuntimeError as e:
                    result.skipped.append(Skipped(ref.label, f"{phase}: cannot read: {_first_line(e)}"))
                    continue
                _write_image(image, dest)
            entry["series"][phase] = {"series_instance_uid": ref.uid, "series_number": ref.number,
                                      "series_description": ref.description,
                                      "folder": str((dicom_dir / ref.folder.split(' + ')[0]).resolve()),
                                      "files": len(headers)}
            result.imported.append(ImportedSeries(case_id, phase, dest, ref, written))

    for case_id in [c for c in result.new_cases if not mapping[c]["series"]]:  # nothing of it could be read
        del mapping[case_id]
        result.new_cases.remove(case_id)
    if mapping:
        out.mkdir(parents=True, exist_ok=True)
        _write_private_json(mapping_path, {
            "format": MAPPING_FORMAT,
            "note": "case id -> original patient/study identifiers and the DICOM series imported; "
                    "holds patient identifiers: keep private (mode 0600), never share with the federation",
            "cases": dict(sorted(mapping.items())),
        })
        result.mapping_file = mapping_path
    return result
