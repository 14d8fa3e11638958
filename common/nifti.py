"""SimpleITK IO helpers: reading with one-line errors, the geometry record, geometry comparison.

Everything here keeps SimpleITK's own axis order `(x, y, z)`: sizes, spacings, origins and the
row-major direction matrix are exactly what `sitk.Image.GetSize()` and friends return.

SimpleITK reads a truncated `.nii.gz` without complaint (the missing voxels come back as zeros), so
`read_image`/`read_info` compare the data size the NIfTI header promises with the gzip trailer (or
the file size for `.nii`) before handing the file to SimpleITK: an O(1) check that catches
interrupted copies. Corruption inside the gzip stream makes SimpleITK fail, which we report.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import SimpleITK as sitk

_GZIP_MAGIC = b"\x1f\x8b"


class ImageReadError(ValueError):
    """A file that is not a readable image; `str()` is the one line `path: cannot read: reason`."""

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: cannot read: {reason}")


@dataclass(frozen=True)
class Geometry:
    """Where an image's voxels lie in space, in SimpleITK order `(x, y, z)`."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]  # row-major, dimension x dimension

    @property
    def dimension(self) -> int:
        return len(self.size)

    @classmethod
    def of(cls, source: sitk.Image | sitk.ImageFileReader) -> Geometry:
        """The geometry of an image, or of a reader after `ReadImageInformation()`."""
        return cls(
            size=tuple(int(v) for v in source.GetSize()),
            spacing=tuple(float(v) for v in source.GetSpacing()),
            origin=tuple(float(v) for v in source.GetOrigin()),
            direction=tuple(float(v) for v in source.GetDirection()),
        )

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Set spacing, origin and direction on `image` (whose size must match); returns it."""
        if tuple(image.GetSize()) != self.size:
            raise ValueError(f"size {tuple(image.GetSize())} does not match geometry {self.size}")
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def to_dict(self) -> dict[str, list]:
        return {k: list(getattr(self, k)) for k in ("size", "spacing", "origin", "direction")}

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(
            size=tuple(int(v) for v in d["size"]),
            spacing=tuple(float(v) for v in d["spacing"]),
            origin=tuple(float(v) for v in d["origin"]),
            direction=tuple(float(v) for v in d["direction"]),
        )


@dataclass(frozen=True)
class ImageInfo:
    """What the header says, without reading voxels."""

    geometry: Geometry
    components: int  # values per voxel; 1 for scalar images
    pixel_type: str  # SimpleITK's name, e.g. "32-bit float"


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def geometry_differences(
    a: Geometry,
    b: Geometry,
    *,
    spacing_rtol: float = 1e-3,
    origin_atol_mm: float = 1e-2,
    direction_atol: float = 1e-3,
) -> list[str]:
    """What differs between `a` and `b`, e.g. `["size (32, 32, 8) vs (32, 32, 16)"]`; empty if equal.

    Sizes must match exactly; spacing within `spacing_rtol` relative, origin within
    `origin_atol_mm` millimetres per axis, direction cosines within `direction_atol`.
    """
    if a.size != b.size:
        # Other fields are not comparable across dimensions, and the size says enough.
        return [f"size {a.size} vs {b.size}"]
    diffs = []
    if any(abs(x - y) > spacing_rtol * max(abs(x), abs(y)) for x, y in zip(a.spacing, b.spacing)):
        diffs.append(f"spacing {_fmt(a.spacing)} vs {_fmt(b.spacing)}")
    if any(abs(x - y) > origin_atol_mm for x, y in zip(a.origin, b.origin)):
        diffs.append(f"origin {_fmt(a.origin)} vs {_fmt(b.origin)}")
    if any(abs(x - y) > direction_atol for x, y in zip(a.direction, b.direction)):
        diffs.append(f"direction {_fmt(a.direction)} vs {_fmt(b.direction)}")
    return diffs


def _itk_reason(error: RuntimeError, path: Path) -> str:
    """The useful part of a SimpleITK exception, on one line and without the file name."""
    text = str(error)
    text = text.split("sitk::ERROR:", 1)[-1]
    if "Description:" in text:  # ITK exceptions carry the message after "Description:"
        text = text.rsplit("Description:", 1)[-1]
    if "Unable to determine ImageIO reader" in text:
        return "not a NIfTI image or corrupt data"
    text = text.replace(f'"{path}"', "").replace(str(path), "")
    return re.sub(r"\s+", " ", text).strip() or "unknown SimpleITK error"


def _expected_data_bytes(reader: sitk.ImageFileReader) -> int | None:
    """Bytes from the file start to the end of the voxel data per the NIfTI header, if NIfTI."""
    keys = set(reader.GetMetaDataKeys())
    if not {"vox_offset", "bitpix", "dim[0]"} <= keys:
        return None
    try:
        ndim = int(reader.GetMetaData("dim[0]"))
        dims = [int(reader.GetMetaData(f"dim[{i}]")) for i in range(1, ndim + 1)]
        bitpix = int(reader.GetMetaData("bitpix"))
        offset = int(float(reader.GetMetaData("vox_offset")))
    except (ValueError, RuntimeError):
        return None
    return offset + math.prod(dims) * bitpix // 8


def _check_length(path: Path, expected: int | None) -> None:
    """Raise if the file holds fewer data bytes than the header promises."""
    if expected is None:
        return
    size = path.stat().st_size
    with path.open("rb") as f:
        gzipped = f.read(2) == _GZIP_MAGIC
        if gzipped:
            # The gzip trailer's last 4 bytes are the uncompressed length mod 2**32 (RFC 1952);
            # in a truncated file they are compressed data and almost never match.
            f.seek(max(size - 4, 0))
            isize = int.from_bytes(f.read(4), "little")
    if gzipped and isize != expected % 2**32:
        raise ImageReadError(path, f"truncated or corrupt gzip data (header needs {expected} bytes)")
    if not gzipped and size < expected:
        raise ImageReadError(path, f"truncated file ({size} of {expected} bytes)")


def _open(path: Path | str) -> tuple[Path, sitk.ImageFileReader]:
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "no such file" if not path.exists() else "not a regular file")
    with path.open("rb") as f:
        head = f.read(2)
    if not head:
        raise ImageReadError(path, "empty file")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        # An uncompressed NIfTI named .gz reads fine; only name the gzip problem when ITK fails.
        not_gzip = path.name.endswith(".gz") and head != _GZIP_MAGIC
        raise ImageReadError(path, "not a gzip file" if not_gzip else _itk_reason(e, path)) from None
    _check_length(path, _expected_data_bytes(reader))
    return path, reader


def _info(reader: sitk.ImageFileReader) -> ImageInfo:
    return ImageInfo(
        Geometry.of(reader),
        int(reader.GetNumberOfComponents()),
        sitk.GetPixelIDValueAsString(reader.GetPixelID()),
    )


def read_info(path: Path | str) -> ImageInfo:
    """Header only (geometry, components, pixel type); raises `ImageReadError` with one line."""
    return _info(_open(path)[1])


def read_image(path: Path | str) -> sitk.Image:
    """Read an image with SimpleITK; raises `ImageReadError` (`path: cannot read: reason`)."""
    path, reader = _open(path)
    try:
        return reader.Execute()
    except RuntimeError as e:
        raise ImageReadError(path, _itk_reason(e, path)) from None


def read_image_checked(path: Path | str, *, dimension: int = 3) -> tuple[ImageInfo, sitk.Image | None]:
    """Header, then voxels only if the header has `dimension` axes and one component per voxel.

    Lets validators refuse a 4D or vector file without decompressing it. Returns the image as
    None when the header is refused; raises `ImageReadError` when the file cannot be read.
    """
    path, reader = _open(path)
    info = _info(reader)
    if info.geometry.dimension != dimension or info.components != 1:
        return info, None
    try:
        return info, reader.Execute()
    except RuntimeError as e:
        raise ImageReadError(path, _itk_reason(e, path)) from None


def write_image(image: sitk.Image, path: Path | str) -> None:
    """Write with compression (for `.nii.gz`), creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
