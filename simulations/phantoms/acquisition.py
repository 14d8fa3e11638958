"""Turning an anatomy into one phase image: grid, patient motion, EPI distortion, signal,
point spread, bias field, Rician noise and the center's intensity scaling.

The ground-truth mask is the liver label sampled at exactly the (moved, distorted) points the
image was sampled at, so every phase's mask is aligned with that phase's image.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from simulations.phantoms.anatomy import Anatomy
from simulations.phantoms.centers import CenterProfile, PhaseGeometry
from simulations.phantoms.contrast import Tissue, signal_table, texture_weights
from simulations.phantoms.shapes import Points, SmoothField, rotation_matrix

#: Columns: physical direction of index axes i, j, k (ITK convention; LPS physical frame).
ORIENTATIONS: dict[str, np.ndarray] = {
    "identity": np.eye(3),
    "flip_xy": np.diag([-1.0, -1.0, 1.0]),
    "swap_xy_flip_z": np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]]),
}


@dataclass(frozen=True)
class GridSpec:
    """An image grid in SimpleITK order: size, spacing (x, y, z index axes), direction, origin."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]   # row-major 3x3, columns = index axes
    origin: tuple[float, float, float]

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return self.size[2], self.size[1], self.size[0]

    def points(self) -> Points:
        """Physical coordinates (mm) of every voxel, flattened in array (z, y, x) order."""
        d = np.asarray(self.direction).reshape(3, 3)
        o = np.asarray(self.origin)
        i = np.arange(self.size[0], dtype=np.float32) * self.spacing[0]
        j = np.arange(self.size[1], dtype=np.float32) * self.spacing[1]
        k = np.arange(self.size[2], dtype=np.float32) * self.spacing[2]
        out = []
        for a in range(3):
            v = (np.float32(o[a]) + (np.float32(d[a, 2]) * k)[:, None, None]
                 + (np.float32(d[a, 1]) * j)[None, :, None] + (np.float32(d[a, 0]) * i)[None, None, :])
            out.append(np.ascontiguousarray(v, np.float32).ravel())
        return tuple(out)  # type: ignore[return-value]


def make_grid(geom: PhaseGeometry, orientation: str, center_mm) -> GridSpec:
    """A grid of `geom` centred on `center_mm`, its arrays stored as `orientation` says."""
    d = ORIENTATIONS[orientation]
    per_axis = {0: (geom.matrix_lr, geom.spacing_lr), 1: (geom.matrix_ap, geom.spacing_ap), 2: (geom.slices, geom.thickness)}
    size, spacing = [], []
    for a in range(3):
        phys = int(np.flatnonzero(d[:, a])[0])
        n, s = per_axis[phys]
        size.append(n)
        spacing.append(s)
    half = d @ (np.array(spacing) * (np.array(size) - 1) / 2.0)
    origin = np.asarray(center_mm, float) - half
    return GridSpec(tuple(size), tuple(float(s) for s in spacing), tuple(float(v) for v in d.ravel()),
                    tuple(float(round(v, 3)) for v in origin))


@dataclass(frozen=True)
class Motion:
    """Rigid patient motion between phases plus a breathing shift of the organs along z."""

    rotation: np.ndarray
    translation: np.ndarray
    pivot: np.ndarray
    breathing: float

    @classmethod
    def random(cls, rng: np.random.Generator, pivot, max_deg: float = 3.0, max_mm: float = 4.0,
               max_breath: float = 10.0) -> Motion:
        angles = np.clip(rng.normal(0, max_deg / 2, 3), -max_deg, max_deg)
        return cls(rotation_matrix(*angles), rng.uniform(-max_mm, max_mm, 3), np.asarray(pivot, float),
                   float(rng.uniform(-max_breath, max_breath)))

    def apply(self, p: Points) -> Points:
        r = self.rotation.astype(np.float32)
        x, y, z = (p[a] - np.float32(self.pivot[a]) for a in range(3))
        return tuple(r[a, 0] * x + r[a, 1] * y + r[a, 2] * z + np.float32(self.pivot[a] + self.translation[a])
                     for a in range(3))  # type: ignore[return-value]


@dataclass(frozen=True)
class EPIDistortion:
    """Smooth displacement along the phase-encode axis (AP): the geometric distortion of DWI."""

    field: SmoothField
    stretch: float

    @classmethod
    def random(cls, rng: np.random.Generator) -> EPIDistortion:
        return cls(SmoothField.random(rng, 4, (150.0, 300.0), float(rng.uniform(3.0, 6.0))),
                   float(rng.uniform(-0.05, 0.05)))

    def apply(self, p: Points) -> Points:
        return p[0], p[1] + self.field(p) + np.float32(self.stretch) * p[1], p[2]


def bias_field(p: Points, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Smooth multiplicative field: a random low-order polynomial plus brighter near the coils."""
    x, y, z = p[0] / 200.0, p[1] / 150.0, p[2] / 150.0
    c = (rng.normal(0, 1, 6) * strength * 0.5).astype(np.float32)
    log = c[0] * x + c[1] * y + c[2] * z + c[3] * x * x + c[4] * x * y + c[5] * z * z
    log = log + np.float32(strength * 0.6) * (y * y)  # surface coils front and back
    return np.exp(log).astype(np.float32)


@dataclass
class PhaseImage:
    image: sitk.Image
    mask: sitk.Image
    tissue: np.ndarray   # (z, y, x) `Tissue` labels behind the image, for checks and debugging


def render_phase(anatomy: Anatomy, grid: GridSpec, phase: str, center: CenterProfile, motion: Motion,
                 rng: np.random.Generator, *, distortion: EPIDistortion | None = None,
                 jitter: np.ndarray | None = None, gain: float = 1.0, tumor_value: int | None = None) -> PhaseImage:
    """Image and liver mask (uint8 0/1) of one phase on `grid`.

    With `tumor_value`, tumour voxels of the mask carry that value instead of 1 (ATLAS labels).
    """
    p = grid.points()
    q = motion.apply(p)
    if distortion is not None:
        q = distortion.apply(q)
    s = anatomy.evaluate(q, breathing=motion.breathing, run=grid.size[0] * grid.size[1])

    table = signal_table(phase, fat_suppression=center.fat_suppression, stage=anatomy.stage, jitter=jitter)
    img = table[s.labels]
    h, sep = texture_weights(phase, anatomy.stage)
    liver = s.labels == Tissue.LIVER
    img[liver] *= 1.0 + h * s.hetero[liver] + sep * s.septa[liver]
    if s.tumor.any():
        img[s.tumor] *= 1.0 + 0.12 * s.hetero[s.tumor]
    img *= 1.0 + np.float32(0.05) * s.mottle

    shape = grid.shape_zyx
    img = img.reshape(shape)
    img = ndimage.gaussian_filter(img, sigma=(0.35, center.blur, center.blur), mode="nearest")
    img *= bias_field(p, rng, center.bias).reshape(shape)
    if center.gamma != 1.0:
        img = np.power(np.maximum(img, 0), center.gamma)
    sigma = (center.dwi_noise if phase == "DWI_800" else center.noise)
    n1 = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma)
    n2 = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma)
    img = np.sqrt((img + n1) ** 2 + n2 ** 2)  # magnitude of complex data: Rician

    img = _scale(img, center, phase, gain)
    mask = s.liver.astype(np.uint8)
    if tumor_value is not None:
        mask[s.tumor] = tumor_value
    mask = mask.reshape(shape)
    return PhaseImage(_to_sitk(img, grid), _to_sitk(mask, grid), s.labels.reshape(shape))


_RAW_PHASE_SCALE = {"T1": 0.8, "T2": 0.65, "DWI_800": 0.2, "GED1": 1.0, "GED2": 1.0, "GED3": 1.0, "GED4": 1.0}


def _scale(img: np.ndarray, center: CenterProfile, phase: str, gain: float) -> np.ndarray:
    if center.intensity == "scaled255":
        hi = float(np.percentile(img, 99.8)) or 1.0
        # integer-valued, as 8-bit exports converted to float are (and it compresses like them)
        return np.rint(np.clip(img * np.float32(255.0 / hi), 0, 255)).astype(np.float32)
    raw = img * (center.raw_scale * _RAW_PHASE_SCALE.get(phase, 1.0) * gain)
    if center.dtype == "int16":
        return np.clip(np.rint(raw), 0, 32767).astype(np.int16)
    return raw.astype(np.float32)


def write_nifti_gz(image: sitk.Image, path: Path) -> None:
    """SimpleITK writes the NIfTI; gzip level 1 with a zero timestamp compresses it: several times
    faster than SimpleITK's own compression for noisy float data, and byte-reproducible."""
    path = Path(path)
    raw = path.with_name(f".{path.name}.{os.getpid()}.nii")
    try:
        sitk.WriteImage(image, str(raw), False)
        data = raw.read_bytes()
    finally:
        raw.unlink(missing_ok=True)
    path.write_bytes(gzip.compress(data, compresslevel=1, mtime=0))


def _to_sitk(arr: np.ndarray, grid: GridSpec) -> sitk.Image:
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(grid.spacing)
    im.SetOrigin(grid.origin)
    im.SetDirection(grid.direction)
    return im
