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
    f = np.float32
    x, y, z = p[0] - f(center[0]), p[1] - f(center[1]), p[2] - f(center[2])
    if rot is None:
        return x, y, z
    r = rot.astype(np.float32)
    return (r[0, 0] * x + r[1, 0] * y + r[2, 0] * z,
            r[0, 1] * x + r[1, 1] * y + r[2, 1] * z,
            r[0, 2] * x + r[1, 2] * y + r[2, 2] * z)


def ellipsoid(p: Points, center, radii, rot: np.ndarray | None = None) -> np.ndarray:
    u, v, w = local(p, center, rot)
    a, b, c = (np.float32(1.0 / r) for r in radii)
    u, v, w = u * a, v * b, w * c
    k = np.sqrt(u * u + v * v + w * w)
    return (k - np.float32(1.0)) * np.float32(min(radii))


def tapered_ellipsoid(p: Points, center, radii, taper: float, rot: np.ndarray | None = None) -> np.ndarray:
    """Ellipsoid whose y/z radii shrink linearly towards +x (a wedge, like the left liver lobe)."""
    u, v, w = local(p, center, rot)
    f = np.float32
    u = u * f(1.0 / radii[0])
    scale = f(1.0) - f(taper) * np.clip(u, f(0.0), f(1.0))
    v = v / (f(radii[1]) * scale)
    w = w / (f(radii[2]) * scale)
    k = np.sqrt(u * u + v * v + w * w)
    return (k - f(1.0)) * f(min(radii))


def trunk_section(p: Points, center, half_x: float, ant: float, post: float, box: float = 0.3) -> np.ndarray:
    """Axial cross-section of the trunk: a squarish ellipse (`box` > 0 squares the corners),
    deeper anteriorly than posteriorly. Cheap: no powers, it runs on every voxel."""
    u = (p[0] - np.float32(center[0])) * np.float32(1.0 / half_x)
    dy = p[1] - np.float32(center[1])
    v = dy * np.where(dy < 0, np.float32(1.0 / ant), np.float32(1.0 / post))
    u2, v2 = u * u, v * v
    k = np.sqrt(u2 + v2 - np.float32(box) * u2 * v2)
    return (k - 1.0) * np.float32(min(half_x, ant, post))


def capsule(p: Points, a, b, r0: float, r1: float | None = None) -> np.ndarray:
    """Tapered capsule between points a and b (radius r0 at a, r1 at b): vessels, gut, pancreas."""
    r1 = r0 if r1 is None else r1
    a = np.asarray(a, np.float32)
    ab = np.asarray(b, np.float32) - a
    denom = float(ab @ ab) or 1.0
    px, py, pz = p[0] - a[0], p[1] - a[1], p[2] - a[2]
    t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) * np.float32(1.0 / denom), np.float32(0), np.float32(1))
    dx, dy, dz = px - t * ab[0], py - t * ab[1], pz - t * ab[2]
    return np.sqrt(dx * dx + dy * dy + dz * dz) - (np.float32(r0) + t * np.float32(r1 - r0))


def cylinder_z(p: Points, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """Infinite elliptic cylinder along z (aorta, IVC, spinal canal)."""
    u = (p[0] - np.float32(cx)) * np.float32(1.0 / rx)
    v = (p[1] - np.float32(cy)) * np.float32(1.0 / ry)
    return (np.sqrt(u * u + v * v) - np.float32(1.0)) * np.float32(min(rx, ry))


def smooth_union(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    f = np.float32
    h = np.clip(f(0.5) + (b - a) * f(0.5 / k), f(0.0), f(1.0))
    return b * (f(1.0) - h) + a * h - f(k) * h * (f(1.0) - h)


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


class Slabs:
    """Points stored slice by slice (runs of `run` points) and the z range of each run.

    Grid points come in slices that are nearly axial, so a structure bounded in z only needs the
    runs its z range reaches: the box test then scans a contiguous part of the arrays.
    """

    def __init__(self, z: np.ndarray, run: int) -> None:
        zz = z.reshape(-1, run)
        self.zmin, self.zmax, self.run = zz.min(axis=1), zz.max(axis=1), run

    def span(self, zlo: float, zhi: float) -> slice:
        hit = np.flatnonzero((self.zmax >= zlo) & (self.zmin <= zhi))
        if not hit.size:
            return slice(0, 0)
        return slice(int(hit[0]) * self.run, (int(hit[-1]) + 1) * self.run)


@dataclass(frozen=True)
class Box:
    """Axis-aligned bounds (mm) used to evaluate a structure only where it can be."""

    lo: tuple[float, float, float]
    hi: tuple[float, float, float]

    def select(self, p: Points, slabs: Slabs | None = None) -> np.ndarray:
        sl = slabs.span(self.lo[2], self.hi[2]) if slabs is not None else slice(None)
        x, y, z = p[0][sl], p[1][sl], p[2][sl]
        m = (x >= self.lo[0]) & (x <= self.hi[0])
        m &= (y >= self.lo[1]) & (y <= self.hi[1])
        m &= (z >= self.lo[2]) & (z <= self.hi[2])
        idx = np.flatnonzero(m)
        return idx + sl.start if slabs is not None and sl.start else idx


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

    def inside(self, p: Points, slabs: Slabs | None = None) -> np.ndarray:
        """Boolean mask of points inside any capsule. With `slabs`, each capsule scans only the
        slices it reaches; without, the tree's box is selected first, then each capsule's."""
        out = np.zeros(p[0].shape, bool)
        if not self.starts:
            return out
        if slabs is None:
            outer = self.box().select(p)
            sub = take(p, outer)
        else:
            outer, sub = None, p
        for a, b, r0, r1 in zip(self.starts, self.ends, self.r0, self.r1):
            lo = np.minimum(a, b) - max(r0, r1)
            hi = np.maximum(a, b) + max(r0, r1)
            idx = Box(tuple(lo), tuple(hi)).select(sub, slabs)
            if idx.size:
                hit = idx[capsule(take(sub, idx), a, b, r0, r1) < 0]
                out[hit if outer is None else outer[hit]] = True
        return out

