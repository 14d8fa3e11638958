"""Implicit shape primitives evaluated at arbitrary points in millimetres.

Every primitive returns an approximate signed distance (mm; negative inside) so shapes can be
combined (union, intersection, smooth union) and perturbed (nodularity) in physical units,
independently of any voxel grid. Points are passed as three flat float32 arrays (x, y, z) in the
anatomy frame (LPS: +x patient left, +y posterior, +z superior).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

Points = tuple[np.ndarray, np.ndarray, np.ndarray]


def rotation_matrix(rx_deg: float, ry_deg: float, rz_deg: float) -> np.ndarray:
    """Rotation about x, then y, then z (degrees), as a 3x3 matrix acting on column vectors."""
    ax, ay, az = np.deg2rad([rx_deg, ry_deg, rz_deg])
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def local(p: Points, center, rot: np.ndarray | None = None) -> Points:
    """Coordinates of `p` relative to `center`, expressed in the rotated frame `rot` (columns = axes)."""
    x, y, z = p[0] - center[0], p[1] - center[1], p[2] - center[2]
    if rot is None:
        return x, y, z
    r = rot.astype(np.float32)
    return (r[0, 0] * x + r[1, 0] * y + r[2, 0] * z,
            r[0, 1] * x + r[1, 1] * y + r[2, 1] * z,
            r[0, 2] * x + r[1, 2] * y + r[2, 2] * z)


def ellipsoid(p: Points, center, radii, rot: np.ndarray | None = None) -> np.ndarray:
    u, v, w = local(p, center, rot)
    k = np.sqrt((u / radii[0]) ** 2 + (v / radii[1]) ** 2 + (w / radii[2]) ** 2)
    return (k - 1.0) * float(min(radii))


def tapered_ellipsoid(p: Points, center, radii, taper: float, rot: np.ndarray | None = None) -> np.ndarray:
    """Ellipsoid whose y/z radii shrink linearly towards +x (a wedge, like the left liver lobe)."""
    u, v, w = local(p, center, rot)
    t = np.clip(u / radii[0], 0.0, 1.0)
    scale = 1.0 - taper * t
    k = np.sqrt((u / radii[0]) ** 2 + (v / (radii[1] * scale)) ** 2 + (w / (radii[2] * scale)) ** 2)
    return (k - 1.0) * float(min(radii))


def superellipse_prism(p: Points, center, half_x: float, ant: float, post: float, power: float = 2.4) -> np.ndarray:
    """Axial cross-section of the trunk: a superellipse, deeper anteriorly than posteriorly."""
    u = np.abs(p[0] - center[0]) / half_x
    dy = p[1] - center[1]
    v = np.abs(dy) / np.where(dy < 0, ant, post)
    k = (u ** power + v ** power) ** (1.0 / power)
    return (k - 1.0) * float(min(half_x, ant, post))


def capsule(p: Points, a, b, r0: float, r1: float | None = None) -> np.ndarray:
    """Tapered capsule between points a and b (radius r0 at a, r1 at b): vessels, gut, pancreas."""
    r1 = r0 if r1 is None else r1
    a = np.asarray(a, np.float32)
    ab = np.asarray(b, np.float32) - a
    denom = float(ab @ ab) or 1.0
    px, py, pz = p[0] - a[0], p[1] - a[1], p[2] - a[2]
    t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / denom, 0.0, 1.0)
    dx, dy, dz = px - t * ab[0], py - t * ab[1], pz - t * ab[2]
    return np.sqrt(dx * dx + dy * dy + dz * dz) - (r0 + t * (r1 - r0))


def cylinder_z(p: Points, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """Infinite elliptic cylinder along z (aorta, IVC, spinal canal)."""
    k = np.sqrt(((p[0] - cx) / rx) ** 2 + ((p[1] - cy) / ry) ** 2)
    return (k - 1.0) * float(min(rx, ry))


def smooth_union(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b * (1.0 - h) + a * h - k * h * (1.0 - h)


def intersect(*sdfs: np.ndarray) -> np.ndarray:
    out = sdfs[0]
    for s in sdfs[1:]:
        out = np.maximum(out, s)
    return out


def subtract(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum(a, -b)


@dataclass(frozen=True)
class SmoothField:
    """Zero-mean random field, a sum of plane waves with random directions and wavelengths.

    Cheap to evaluate at scattered points and defined everywhere in space, so the same field is
    seen identically by every phase grid (what makes textures and deformations consistent).
    """

    k: np.ndarray       # (n, 3) wave vectors, rad/mm
    phase: np.ndarray   # (n,)
    amp: np.ndarray     # (n,)

    @classmethod
    def random(cls, rng: np.random.Generator, n: int, wavelength: tuple[float, float], rms: float) -> SmoothField:
        d = rng.normal(size=(n, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        lam = rng.uniform(*wavelength, size=n)
        k = d * (2 * np.pi / lam)[:, None]
        amp = np.full(n, rms * np.sqrt(2.0 / n))
        return cls(k.astype(np.float32), rng.uniform(0, 2 * np.pi, n).astype(np.float32), amp.astype(np.float32))

    def __call__(self, p: Points) -> np.ndarray:
        out = np.zeros(p[0].shape, np.float32)
        for (kx, ky, kz), ph, a in zip(self.k, self.phase, self.amp):
            out += a * np.sin(kx * p[0] + ky * p[1] + kz * p[2] + ph)
        return out


@dataclass(frozen=True)
class Deformation:
    """Smooth random displacement (mm) applied to points before evaluating a shape."""

    fields: tuple[SmoothField, SmoothField, SmoothField]

    @classmethod
    def random(cls, rng: np.random.Generator, amplitude: float, wavelength=(120.0, 260.0), n: int = 4) -> Deformation:
        return cls(tuple(SmoothField.random(rng, n, wavelength, amplitude) for _ in range(3)))  # type: ignore[arg-type]

    def __call__(self, p: Points) -> Points:
        return (p[0] + self.fields[0](p), p[1] + self.fields[1](p), p[2] + self.fields[2](p))


@dataclass(frozen=True)
class Box:
    """Axis-aligned bounds (mm) used to evaluate a structure only where it can be."""

    lo: tuple[float, float, float]
    hi: tuple[float, float, float]

    def select(self, p: Points) -> np.ndarray:
        m = (p[0] >= self.lo[0]) & (p[0] <= self.hi[0])
        m &= (p[1] >= self.lo[1]) & (p[1] <= self.hi[1])
        m &= (p[2] >= self.lo[2]) & (p[2] <= self.hi[2])
        return np.flatnonzero(m)


def box_around(center, radius, margin: float = 5.0) -> Box:
    r = np.broadcast_to(np.asarray(radius, float), (3,)) + margin
    c = np.asarray(center, float)
    return Box(tuple(c - r), tuple(c + r))


def take(p: Points, idx: np.ndarray) -> Points:
    return p[0][idx], p[1][idx], p[2][idx]


@dataclass
class Segments:
    """A set of tapered capsules (a vessel tree), evaluated as their union."""

    starts: list[tuple[float, float, float]] = field(default_factory=list)
    ends: list[tuple[float, float, float]] = field(default_factory=list)
    r0: list[float] = field(default_factory=list)
    r1: list[float] = field(default_factory=list)

    def add(self, a, b, r0: float, r1: float | None = None) -> None:
        self.starts.append(tuple(map(float, a)))
        self.ends.append(tuple(map(float, b)))
        self.r0.append(float(r0))
        self.r1.append(float(r0 if r1 is None else r1))

    def box(self) -> Box:
        pts = np.array(self.starts + self.ends)
        r = max(self.r0 + self.r1) + 2.0
        return Box(tuple(pts.min(0) - r), tuple(pts.max(0) + r))

    def inside(self, p: Points) -> np.ndarray:
        """Boolean mask of points inside any capsule (each capsule checked only inside its own box)."""
        out = np.zeros(p[0].shape, bool)
        for a, b, r0, r1 in zip(self.starts, self.ends, self.r0, self.r1):
            lo = np.minimum(a, b) - max(r0, r1)
            hi = np.maximum(a, b) + max(r0, r1)
            idx = Box(tuple(lo), tuple(hi)).select(p)
            if idx.size:
                out[idx[capsule(take(p, idx), a, b, r0, r1) < 0]] = True
        return out
