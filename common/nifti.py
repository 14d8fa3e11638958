"""SimpleITK IO helpers: reading with one-line errors, the geometry record, geometry comparison.

Everything here keeps SimpleITK's own axis order `(x, y, z)`: sizes, spacings, origins and the
row-major direction matrix are exactly what `sitk.Image.GetSize()` and friends return.

SimpleITK reads a truncated `.nii.gz` without complaint (the missing voxels come back as zeros), so
`read_image`/`read_info` compare the data size the NIfTI header promises with the gzip trailer (or
the file size for `.nii`) before handing the file to SimpleITK: an O(1) check that catches
interrupted copies. Corruption inside the gzip stream makes SimpleITK fail, which we report.
SimpleITK (nifti_clib) also silently turns NaN and Inf voxels into 0, so `voxel_stats` reads the
NIfTI data itself, in chunks (bounded memory, full gzip CRC check) to count them.

Hostile headers are refused from the header's first bytes, before SimpleITK or numpy sees them:
sizes beyond `MAX_VOXELS_PER_AXIS` / `MAX_VOXELS` (a header may claim 100000 voxels per axis over a
few bytes of data), and a zero, negative or non-finite voxel spacing (which SimpleITK would quietly
turn into 1 mm, or keep negative, with a multi-line warning on stderr).
"""

from __future__ import annotations

import gzip
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np
import SimpleITK as sitk

_GZIP_MAGIC = b"\x1f\x8b"

#: Larger images are refused from their header: far beyond any MRI or CT volume (512 x 512 x 1000
#: is 2.6e8 voxels), and a float32 copy of 2**30 voxels already takes 4 GiB.
MAX_VOXELS_PER_AXIS = 8192
MAX_VOXELS = 2**30


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


# NIfTI datatype code -> numpy type; other codes (complex, RGB) are not images we segment.
_NIFTI_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4",
                 1024: "i8", 1280: "u8"}


@dataclass(frozen=True)
class NiftiHeader:
    """The fields of a NIfTI-1/2 header needed to read the voxel data ourselves."""

    dims: tuple[int, ...]  # dim[1..dim[0]], x fastest
    datatype: int
    bitpix: int
    vox_offset: int
    scl_slope: float
    scl_inter: float
    byte_order: str  # "<" or ">"
    pixdim: tuple[float, ...] = ()  # pixdim[1..dim[0]]: voxel spacing (mm), then time step etc.

    @property
    def data_end(self) -> int:
        """Bytes from the file start to the end of the voxel data."""
        count = 1
        for d in self.dims:
            count *= d
        return self.vox_offset + count * self.bitpix // 8

    @property
    def scaled(self) -> bool:
        # NIfTI: slope 0 means "no scaling"; readers (ITK included) apply value * slope + inter.
        if self.scl_slope == 0.0 or not np.isfinite(self.scl_slope):
            return False
        return self.scl_slope != 1.0 or self.scl_inter != 0.0


def _parse_nifti_header(raw: bytes) -> NiftiHeader | None:
    """Parse NIfTI-1 (348 bytes) or NIfTI-2 (540 bytes); None when `raw` is neither."""
    for order in "<>":
        if len(raw) >= 348 and struct.unpack(order + "i", raw[:4])[0] == 348:
            ndim = struct.unpack(order + "h", raw[40:42])[0]
            dims = struct.unpack(order + "7h", raw[42:56])
            datatype, bitpix = struct.unpack(order + "2h", raw[70:74])
            pixdim = struct.unpack(order + "7f", raw[80:108])
            vox_offset, slope, inter = struct.unpack(order + "3f", raw[108:120])
        elif len(raw) >= 540 and struct.unpack(order + "i", raw[:4])[0] == 540:
            datatype, bitpix = struct.unpack(order + "2h", raw[12:16])
            ndim = struct.unpack(order + "q", raw[16:24])[0]
            dims = struct.unpack(order + "7q", raw[24:80])
            pixdim = struct.unpack(order + "7d", raw[112:168])
            vox_offset = struct.unpack(order + "q", raw[168:176])[0]
            slope, inter = struct.unpack(order + "2d", raw[176:192])
        else:
            continue
        if not 1 <= ndim <= 7 or any(d < 1 for d in dims[:ndim]):
            return None
        return NiftiHeader(tuple(int(d) for d in dims[:ndim]), int(datatype), int(bitpix), int(vox_offset),
                           float(slope), float(inter), order, tuple(float(v) for v in pixdim[:ndim]))
    return None


def _open_stream(path: Path) -> BinaryIO:
    """The decompressed byte stream of a gzipped file (by content, not name), else the file."""
    with path.open("rb") as f:
        gzipped = f.read(2) == _GZIP_MAGIC
    return gzip.open(path, "rb") if gzipped else path.open("rb")


def _head(path: Path, n: int = 540) -> bytes:
    """Up to the first `n` (decompressed) bytes, even from a truncated or damaged gzip file."""
    with path.open("rb") as f:
        if f.read(2) != _GZIP_MAGIC:
            f.seek(0)
            return f.read(n)
        f.seek(0)
        inflate, out = zlib.decompressobj(16 + zlib.MAX_WBITS), b""
        try:
            while len(out) < n and (piece := f.read(1 << 16)):
                out += inflate.decompress(piece, n - len(out))
        except zlib.error:
            pass
        return out[:n]


def read_nifti_header(path: Path | str) -> NiftiHeader | None:
    """The NIfTI header of `path`, None when it is not NIfTI (or too damaged to tell)."""
    try:
        return _parse_nifti_header(_head(Path(path)))
    except OSError:
        return None


def _header_problem(size: Sequence[int], spacing: Sequence[float]) -> str | None:
    """Why a header's size (x, y, z, ...) or spatial spacing is refused, or None."""
    total = 1
    for n in size:
        total *= n
    if any(n > MAX_VOXELS_PER_AXIS for n in size) or total > MAX_VOXELS:
        return (f"header claims {' x '.join(str(n) for n in size)} voxels "
                f"(limit {MAX_VOXELS_PER_AXIS} per axis, 2^{MAX_VOXELS.bit_length() - 1} in all)")
    spatial = tuple(spacing[:3])
    if not all(np.isfinite(v) and v > 0 for v in spatial):
        return f"voxel spacing {_fmt(spatial)} in the header: not positive"
    return None


def _check_length(path: Path, header: NiftiHeader | None) -> None:
    """Raise if the file holds fewer data bytes than its NIfTI header (None: not NIfTI) promises."""
    if header is None:
        return
    expected = header.data_end
    size = path.stat().st_size
    with path.open("rb") as f:
        gzipped = f.read(2) == _GZIP_MAGIC
        if gzipped:
            # The gzip trailer's last 4 bytes are the uncompressed length mod 2**32 (RFC 1952);
            # in a truncated file they are compressed data and almost never match.
            f.seek(max(size - 4, 0))
            isize = int.from_bytes(f.read(4), "little")
    if gzipped and isize != expected % 2**32:
        raise ImageReadError(path, f"truncated or corrupt gzip file (expected {expected} bytes uncompressed)")
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
    header = read_nifti_header(path)  # our own parse first: SimpleITK never sees a hostile header
    if header is not None and (reason := _header_problem(header.dims, header.pixdim)):
        raise ImageReadError(path, reason)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        # An uncompressed NIfTI named .gz reads fine; only name the gzip problem when ITK fails.
        not_gzip = path.name.endswith(".gz") and head != _GZIP_MAGIC
        raise ImageReadError(path, "not a gzip file" if not_gzip else _itk_reason(e, path)) from None
    # Other formats (and what ITK derived from a NIfTI's sform) pass the same limits.
    if reason := _header_problem(reader.GetSize(), reader.GetSpacing()):
        raise ImageReadError(path, reason)
    _check_length(path, header)
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


@dataclass(frozen=True)
class VoxelStats:
    """Counts over every voxel of a file, as stored (after NIfTI scaling, before any NaN fix-up)."""

    count: int
    non_finite: int  # NaN or +-Inf
    nonzero: int  # finite, non-zero voxels
    values: tuple[float, ...] | None  # sorted distinct finite values; None if more than max_values


def voxel_stats(path: Path | str, *, max_values: int = 0, chunk_bytes: int = 1 << 22) -> VoxelStats:
    """Count NaN/Inf and non-zero voxels, and collect up to `max_values` distinct values.

    Streams the NIfTI data in `chunk_bytes` pieces (memory stays bounded by a few times the chunk,
    not the volume) and, for .nii.gz, lets gzip verify its CRC. Non-NIfTI files are read with SimpleITK.
    Raises `ImageReadError` for unreadable, truncated or corrupt files.
    """
    path = Path(path)
    header = read_nifti_header(path)
    if header is None:
        image = read_image(path)  # not NIfTI: SimpleITK keeps its values as they are
        chunks = iter([sitk.GetArrayViewFromImage(image).ravel()])
        count = image.GetNumberOfPixels() * image.GetNumberOfComponentsPerPixel()
        return _accumulate(chunks, count, max_values)
    if header.datatype not in _NIFTI_DTYPES:
        raise ImageReadError(path, f"unsupported NIfTI data type {header.datatype}")
    dtype = np.dtype(_NIFTI_DTYPES[header.datatype]).newbyteorder(header.byte_order)
    total = (header.data_end - header.vox_offset) // dtype.itemsize
    step = max(chunk_bytes // dtype.itemsize, 1) * dtype.itemsize

    def chunks():
        with _open_stream(path) as stream:
            stream.seek(header.vox_offset)  # gzip streams seek forward by decompressing
            left = total * dtype.itemsize
            while left > 0:
                raw = stream.read(min(step, left))
                if len(raw) < min(step, left):
                    raise EOFError("data ends early")
                left -= len(raw)
                values = np.frombuffer(raw, dtype=dtype)
                yield values * header.scl_slope + header.scl_inter if header.scaled else values
            while stream.read(step):  # to the end, so gzip checks its CRC and length
                pass

    try:
        return _accumulate(chunks(), total, max_values)
    except (OSError, EOFError, zlib.error) as e:
        reason = "truncated data" if isinstance(e, EOFError) else f"corrupt data ({e})"
        raise ImageReadError(path, reason) from None


def _accumulate(chunks, count: int, max_values: int) -> VoxelStats:
    non_finite = nonzero = 0
    values: set[float] | None = set() if max_values > 0 else None
    for chunk in chunks:
        if chunk.dtype.kind == "f":
            finite = np.isfinite(chunk)
            bad = chunk.size - int(np.count_nonzero(finite))
            if bad:
                non_finite += bad
                chunk = chunk[finite]
        nonzero += int(np.count_nonzero(chunk))
        if values is not None and chunk.size:
            values.update(_distinct(chunk))
            if len(values) > max_values:
                values = None
    return VoxelStats(count, non_finite, nonzero, tuple(sorted(values)) if values is not None else None)


def _distinct(chunk: np.ndarray) -> list[float]:
    """Distinct values; for integer labels with a small range, a few comparisons beat a sort."""
    if chunk.dtype.kind in "iu":
        lo, hi = int(chunk.min()), int(chunk.max())
        if hi - lo < 16:
            return [float(v) for v in range(lo, hi + 1) if v in (lo, hi) or np.any(chunk == v)]
    return [float(v) for v in np.unique(chunk).tolist()]


def write_image(image: sitk.Image, path: Path | str) -> None:
    """Write with compression (for `.nii.gz`), creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
