"""Validation of site files before anything uses them: one clear line per problem.

Rules (header read with SimpleITK; voxels streamed once, by `common.nifti.voxel_stats`, only when
the header is sound):
- image: readable NIfTI, 3D, one value per voxel, finite values, not all zero.
- mask: the same (all-zero is allowed: a phase may show no liver), its values a subset of the
  declared labels (LiQA: {0, 1}; nnU-Net raw: every label in dataset.json), and the geometry of
  its image (size exact; spacing, origin, direction within `ValidationConfig` tolerances).

Consequences (`validate_case`): a bad image skips its phase and that phase's mask; a bad mask
skips only the mask and the image stays usable as unlabeled; a case without a valid image is
dropped. Every problem line says which of these happened.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Protocol

from common.cases import Case
from common.nifti import (
    Geometry,
    ImageReadError,
    VoxelStats,
    geometry_differences,
    read_info,
    voxel_stats,
)
from common.problems import Problem, ValidationError


@dataclass(frozen=True)
class ValidationConfig:
    spacing_rtol: float = 1e-3  # relative, per axis
    origin_atol_mm: float = 1e-2  # millimetres, per axis
    direction_atol: float = 1e-3  # per direction cosine
    max_listed_values: int = 8  # how many distinct values a "not binary" line lists


@dataclass(frozen=True)
class FileCheck:
    """What one read of a file found; `geometry` is None when the file could not be read."""

    path: Path
    geometry: Geometry | None
    problems: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.problems


def _format_values(values: tuple[float, ...], limit: int) -> str:
    shown = [str(int(v)) if float(v).is_integer() else f"{float(v):g}" for v in values[:limit]]
    more = f", ... ({len(values)} values)" if len(values) > limit else ""
    return "{" + ", ".join(shown) + more + "}"


def _read(path: Path, max_values: int) -> tuple[FileCheck | None, Geometry | None, VoxelStats | None]:
    """Header, then one streaming pass over the voxels if the header describes a 3D scalar image.

    On a refused file, return its FileCheck; else its geometry and voxel statistics.
    """
    try:
        info = read_info(path)
        g = info.geometry
        if g.dimension != 3:
            return FileCheck(path, g, (f"expected a 3D image, got {g.dimension}D (shape {g.size})",)), None, None
        if info.components != 1:
            return FileCheck(path, g, (f"expected one value per voxel, got {info.components}",)), None, None
        return None, g, voxel_stats(path, max_values=max_values)
    except ImageReadError as e:
        return FileCheck(path, None, (f"cannot read: {e.reason}",)), None, None


def inspect_image(path: Path | str, config: ValidationConfig = ValidationConfig()) -> FileCheck:
    """Check an image file: readable, 3D scalar, finite, not all zero."""
    path = Path(path)
    refused, geometry, stats = _read(path, max_values=0)
    if refused is not None:
        return refused
    if stats.non_finite:
        return FileCheck(path, geometry, (f"contains {stats.non_finite} NaN/Inf voxels",))
    if not stats.nonzero:
        return FileCheck(path, geometry, ("image is empty (all voxels are 0)",))
    return FileCheck(path, geometry)


def inspect_mask(
    path: Path | str,
    allowed_labels: Iterable[int] = (0, 1),
    config: ValidationConfig = ValidationConfig(),
) -> FileCheck:
    """Check a mask file on its own: readable, 3D scalar, finite, values within `allowed_labels`."""
    path = Path(path)
    allowed = {0, *(int(v) for v in allowed_labels)}
    # Collecting a few more distinct values than allowed is enough to name what is wrong.
    cap = len(allowed) + config.max_listed_values
    refused, geometry, stats = _read(path, max_values=cap)
    if refused is not None:
        return refused
    if stats.non_finite:
        return FileCheck(path, geometry, (f"contains {stats.non_finite} NaN/Inf voxels",))
    values = stats.values
    if values is None or any(v not in allowed for v in values):
        if values is None:
            shown = f"{{more than {cap} distinct}}"
        else:
            shown = _format_values(values, config.max_listed_values)
        if allowed == {0, 1}:
            msg = f"mask is not binary: values {shown}"
        else:
            msg = f"mask has values outside the declared labels {sorted(allowed)}: values {shown}"
        return FileCheck(path, geometry, (msg,))
    return FileCheck(path, geometry, ())


def mask_geometry_problems(
    mask: Geometry, image: Geometry, image_name: str, config: ValidationConfig = ValidationConfig()
) -> list[str]:
    """`["mask geometry differs from GED4.nii.gz: size (mask) vs (image); ..."]`, or []."""
    diffs = geometry_differences(
        mask,
        image,
        spacing_rtol=config.spacing_rtol,
        origin_atol_mm=config.origin_atol_mm,
        direction_atol=config.direction_atol,
    )
    return [f"mask geometry differs from {image_name}: " + "; ".join(diffs)] if diffs else []


def check_image(path: Path | str, config: ValidationConfig = ValidationConfig()) -> list[Problem]:
    check = inspect_image(path, config)
    return [Problem(check.path, m) for m in check.problems]


def check_mask(
    path: Path | str,
    image: Path | Geometry,
    *,
    allowed_labels: Iterable[int] = (0, 1),
    config: ValidationConfig = ValidationConfig(),
) -> list[Problem]:
    """Problems of a mask, including its geometry against `image` (a file, read header-only)."""
    check = inspect_mask(path, allowed_labels, config)
    problems = [Problem(check.path, m) for m in check.problems]
    if problems or check.geometry is None:
        return problems
    if isinstance(image, Geometry):
        image_geometry, image_name = image, "its image"
    else:
        try:
            image_geometry, image_name = read_info(image).geometry, Path(image).name
        except ImageReadError as e:
            return [Problem(e.path, f"cannot read: {e.reason}")]
    msgs = mask_geometry_problems(check.geometry, image_geometry, image_name, config)
    return [Problem(check.path, m) for m in msgs]


def validate_image(path: Path | str, config: ValidationConfig = ValidationConfig()) -> Geometry:
    """The image's geometry, or `ValidationError` naming its first problem."""
    check = inspect_image(path, config)
    if not check.ok:
        raise ValidationError(check.path, check.problems[0])
    assert check.geometry is not None
    return check.geometry


def validate_mask(
    path: Path | str,
    image: Path | Geometry,
    *,
    allowed_labels: Iterable[int] = (0, 1),
    config: ValidationConfig = ValidationConfig(),
) -> None:
    """Return quietly if the mask is usable with `image`, else raise `ValidationError`."""
    problems = check_mask(path, image, allowed_labels=allowed_labels, config=config)
    if problems:
        raise ValidationError(problems[0].path, problems[0].message)


class FileInspector(Protocol):
    """Where `validate_case` gets each file's check: read now (`READ_EVERY_FILE`) or, at a site
    with a prepared dataset, from the findings stored for an unchanged file (common/file_checks.py)."""

    def image(self, path: Path, config: ValidationConfig) -> FileCheck: ...

    def mask(self, path: Path, allowed_labels: Iterable[int], config: ValidationConfig) -> FileCheck: ...


class ReadEveryFile:
    """Reads and checks every file each time it is asked."""

    def image(self, path: Path, config: ValidationConfig) -> FileCheck:
        return inspect_image(path, config)

    def mask(self, path: Path, allowed_labels: Iterable[int], config: ValidationConfig) -> FileCheck:
        return inspect_mask(path, allowed_labels, config)


READ_EVERY_FILE = ReadEveryFile()


def _case_path(case: Case) -> Path:
    """The case folder in the LiQA layout; the first file otherwise (nnU-Net has no folder)."""
    files = [*case.images.values(), *case.masks.values()]
    if not files:
        return Path(case.case_id)
    first = Path(files[0])
    return first.parent if first.parent.name == case.case_id else first


def validate_case(
    case: Case,
    config: ValidationConfig = ValidationConfig(),
    *,
    allowed_labels: Iterable[int] | None = None,
    inspector: FileInspector = READ_EVERY_FILE,
) -> tuple[Case | None, list[Problem]]:
    """Check every file of `case`; return the case with only its valid files (None if none is).

    `allowed_labels` are the mask values that may occur (default `{0} | case.foreground_labels`);
    `inspector` checks each file (every file read, unless it serves stored findings).
    """
    allowed = {0, *case.foreground_labels, *(allowed_labels or ())}
    images: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    problems: list[Problem] = []
    mask_checks: dict[Path, FileCheck] = {}  # an nnU-Net label file serves every channel
    for phase, image_path in case.images.items():
        image = inspector.image(Path(image_path), config)
        mask_path = case.masks.get(phase)
        if not image.ok:
            what = f"phase {phase} skipped" + (", with its mask" if mask_path else "")
            problems += [Problem(image.path, f"{m} ({what})") for m in image.problems]
            continue
        images[phase] = image_path
        if mask_path is None:
            continue
        if mask_path not in mask_checks:
            mask_checks[mask_path] = inspector.mask(Path(mask_path), sorted(allowed), config)
        mask = mask_checks[mask_path]
        messages = list(mask.problems)
        if not messages and mask.geometry is not None and image.geometry is not None:
            messages = mask_geometry_problems(mask.geometry, image.geometry, Path(image_path).name, config)
        if messages:
            problems += [Problem(mask.path, f"{m} (mask ignored; {phase} used unlabeled)") for m in messages]
        else:
            masks[phase] = mask_path
    # Masks whose image is missing were reported by discovery; they are not kept.
    if not images:
        problems.append(Problem(_case_path(case), f"case {case.case_id} dropped: no valid image"))
        return None, problems
    return dataclasses.replace(case, images=images, masks=masks), problems
