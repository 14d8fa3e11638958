"""Per-center scanner profiles (appearance) and geometry profiles (demo / full grids).

Centers A, B1, B2 and C mirror LiQA: B1 and B2 share a vendor (same orientation, intensity
pre-scaling and look) but run different protocols; C is a different scanner altogether (permuted
and reversed axes, raw intensities on another scale, 3T-like shading, weaker fat suppression).
Unknown center names get a profile derived deterministically from their name.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace

import numpy as np



@dataclass(frozen=True)
class CenterProfile:
    """How a center's scanner makes images look (independent of grid size)."""

    name: str
    vendor: str
    orientation: str          # "identity" | "flip_xy" | "swap_xy_flip_z" (how arrays are stored)
    intensity: str            # "raw" (scanner units) | "scaled255" (pre-scaled to 0-255)
    dtype: str                # on-disk pixel type: "int16" | "float32"
    raw_scale: float = 1000.0  # signal 1.0 in scanner units, for "raw"
    noise: float = 0.03       # Rician noise sigma relative to signal 1.0
    dwi_noise: float = 0.06
    bias: float = 0.15        # strength of the smooth multiplicative bias field
    fat_suppression: float = 0.95
    gamma: float = 1.0        # contrast curve of the reconstruction
    blur: float = 0.6         # point-spread (voxels, in-plane)


CENTERS: dict[str, CenterProfile] = {
    "A": CenterProfile("A", vendor="vendor-1", orientation="identity", intensity="raw", dtype="int16",
                       raw_scale=1100.0, noise=0.025, dwi_noise=0.035, bias=0.15, fat_suppression=0.95),
    "B1": CenterProfile("B1", vendor="vendor-2", orientation="flip_xy", intensity="scaled255", dtype="float32",
                        noise=0.03, dwi_noise=0.04, bias=0.2, fat_suppression=0.9, blur=0.7),
    "B2": CenterProfile("B2", vendor="vendor-2", orientation="flip_xy", intensity="scaled255", dtype="float32",
                        noise=0.045, dwi_noise=0.055, bias=0.25, fat_suppression=0.85, blur=0.8),
    "C": CenterProfile("C", vendor="vendor-3", orientation="swap_xy_flip_z", intensity="raw", dtype="int16",
                       raw_scale=2600.0, noise=0.028, dwi_noise=0.035, bias=0.4, fat_suppression=0.7,
                       gamma=0.8, blur=0.55),
}


@dataclass(frozen=True)
class PhaseGeometry:
    """Physical grid of one phase before orientation: in-plane spacing (LR, AP), matrix, slices (mm)."""

    spacing_lr: float
    spacing_ap: float
    thickness: float
    matrix_lr: int
    matrix_ap: int
    slices: int


@dataclass(frozen=True)
class CenterGeometry:
    """A center's dynamic-phase (GED) protocol; other phases derive from it via the profile."""

    inplane: float
    matrix: tuple[int, int]   # (LR, AP)
    thickness: float
    slices: int
    aspect: float = 1.0       # AP / LR pixel size ratio


@dataclass(frozen=True)
class GeometryProfile:
    name: str
    centers: dict[str, CenterGeometry]
    #: phase -> (in-plane spacing factor, slice thickness factor) relative to the GED protocol
    phase_factors: dict[str, tuple[float, float]] = field(default_factory=dict)

    def center(self, name: str) -> CenterGeometry:
        if name in self.centers:
            return self.centers[name]
        base = self.centers["A"]
        r = np.random.default_rng(zlib.crc32(name.encode()))
        return replace(base, inplane=base.inplane * r.uniform(0.9, 1.1),
                       thickness=base.thickness * r.uniform(0.85, 1.2))

    def phase(self, center: str, phase: str) -> PhaseGeometry:
        g = self.center(center)
        fi, ft = self.phase_factors.get(phase, (1.0, 1.0))
        fov_lr, fov_ap = g.inplane * g.matrix[0], g.inplane * g.aspect * g.matrix[1]
        coverage = g.thickness * g.slices
        s_lr, s_ap, th = g.inplane * fi, g.inplane * g.aspect * fi, g.thickness * ft
        return PhaseGeometry(round(s_lr, 4), round(s_ap, 4), round(th, 4),
                             int(round(fov_lr / s_lr)), int(round(fov_ap / s_ap)),
                             int(round(coverage * (1.05 if ft > 1 else 1.0) / th)))


DEMO = GeometryProfile(
    "demo",
    centers={
        "A": CenterGeometry(3.8, (96, 80), 6.0, 30),
        "B1": CenterGeometry(3.6, (100, 84), 5.0, 36),
        "B2": CenterGeometry(4.0, (88, 72), 7.0, 26),
        "C": CenterGeometry(3.4, (100, 90), 5.5, 34, aspect=1.05),
    },
    phase_factors={"T1": (1.0, 1.15), "T2": (0.95, 1.2), "DWI_800": (1.6, 1.3)},
)

FULL = GeometryProfile(
    "full",
    centers={
        "A": CenterGeometry(1.0, (384, 320), 2.5, 72),
        "B1": CenterGeometry(0.94, (400, 336), 2.2, 80),
        "B2": CenterGeometry(1.1, (352, 288), 3.0, 60),
        "C": CenterGeometry(1.05, (368, 308), 2.6, 68, aspect=1.05),
    },
    phase_factors={"T1": (1.0, 1.6), "T2": (1.2, 2.6), "DWI_800": (2.3, 2.8)},
)

#: The ATLAS-like pretraining set has its own (single) geometry.
ATLAS_GEOMETRY = {
    "demo": CenterGeometry(3.5, (96, 80), 6.0, 30),
    "full": CenterGeometry(1.4, (272, 224), 3.0, 64),
}

PROFILES: dict[str, GeometryProfile] = {"demo": DEMO, "full": FULL}


def center_profile(name: str) -> CenterProfile:
    """The scanner profile of `name`; unknown names get a variation of A's, seeded by the name."""
    if name in CENTERS:
        return CENTERS[name]
    r = np.random.default_rng(zlib.crc32(name.encode()))
    base = CENTERS["A"]
    return replace(base, name=name, vendor=f"vendor-{name}", raw_scale=float(r.uniform(500, 3000)),
                   noise=float(r.uniform(0.02, 0.045)), bias=float(r.uniform(0.1, 0.35)),
                   fat_suppression=float(r.uniform(0.75, 0.95)))


#: LiQA's training centres: the first names `training_center_names` gives.
LIQA_TRAINING_CENTERS: tuple[str, ...] = ("A", "B1", "B2")


def training_center_names(n: int) -> tuple[str, ...]:
    """`n` distinct training-centre names for federations larger than LiQA's: A, B1, B2, then H04,
    H05, ... (letters and digits, as a site name must be). A new name gets its scanner profile and
    grid from `center_profile` and `GeometryProfile.center`, seeded by the name, so the existing
    centres generate exactly what they did and a new centre the same whatever `n` is."""
    if n < 1:
        raise ValueError(f"training centres: need at least 1, got {n}")
    extra = tuple(f"H{i:02d}" for i in range(len(LIQA_TRAINING_CENTERS) + 1, n + 1))
    return (LIQA_TRAINING_CENTERS + extra)[:n]
