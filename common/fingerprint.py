"""Federated dataset fingerprint: per-site aggregates that merge exactly, in nnU-Net's terms.

A site computes, with nnU-Net's own crop (`crop_to_nonzero`, as in
`DatasetFingerprintExtractor.analyze_case`) and reader (`SimpleITKIO`):
  - foreground intensities (voxels with mask > 0, labeled images only): count, sum, M2 (sum of
    squared deviations from the site mean; merged with Chan's formula, which is exact like a sum of
    squares but without its cancellation), min, max and a fixed-edge histogram;
  - per axis (z, y, x), over every image: spacing, shape after crop and physical extent after crop
    (shape * spacing, mm): count, sum, M2, min, max and fixed-edge histograms;
  - the relative size after cropping (for nnU-Net's `median_relative_size_after_cropping`);
  - the number of images and of labeled images.
No case ids, file names, per-case records or voxels: only these aggregates leave a site. What they
still tell: per axis, the multiset of spacings / shapes / extents to within a bin (exactly where a
bin holds a single case), not linked to cases nor across axes; widen the bins in FingerprintConfig
to reveal less, at the cost of coarser medians.

Merging is exact for count, mean, std, min and max. Percentiles and medians come from the merged
histograms, which hold per bin the count and the sum of the values: an order statistic is estimated
by the mean of its bin, so it is exact when the bin holds one distinct value (spacings, shapes,
8-bit intensities) and within one bin width otherwise. Histogram edges are fixed by
`FingerprintConfig`, so all sites agree; the config travels inside the arrays and merging refuses
mismatched configs.

Intensity bins: vendors differ by orders of magnitude (0-255 pre-scaled vs raw scanner units), so
intensities are binned on a symmetric log scale, t = sign(x) * log1p(|x|), uniform in t over
|x| <= intensity_abs_max: one set of edges gives ~0.4% relative resolution at every magnitude
(about 1 unit at 255, 4 at 1000, 0.004 near 0). The intensity statistics are informational for this
project (STU-Net uses per-image z-score, which ignores them) but keep nnU-Net's meaning, so a CT-style
normalisation could use them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Sequence

import numpy as np

from common.image_io import DEFAULT_READER, image_reader
from common.problems import Problem, one_line

_FORMAT_VERSION = 1


@dataclass(frozen=True)
class FingerprintConfig:
    """Histogram edges every site must share (the coordinator sends one config to all)."""

    intensity_bins: int = 8192
    intensity_abs_max: float = 1e7           # |intensity| beyond goes to under/overflow bins
    spacing_bin_width: float = 0.01          # mm
    spacing_max: float = 20.0                # mm
    shape_bin_width: float = 4.0             # voxels (coarse on purpose: shapes are per-site detail)
    shape_max: float = 4096.0                # voxels
    extent_bin_width: float = 2.0            # mm
    extent_max: float = 2000.0               # mm
    relsize_bins: int = 1000                 # relative size after crop in [0, 1]

    def to_array(self) -> np.ndarray:
        return np.array([_FORMAT_VERSION] + [float(getattr(self, f.name)) for f in fields(self)], dtype=np.float64)

    @classmethod
    def from_array(cls, a: np.ndarray) -> "FingerprintConfig":
        a = np.asarray(a, dtype=np.float64)
        if int(a[0]) != _FORMAT_VERSION or len(a) != len(fields(cls)) + 1:
            raise ValueError(f"fingerprint format {int(a[0])} with {len(a)} config values is not understood")
        values = {}
        for f, v in zip(fields(cls), a[1:]):
            values[f.name] = int(v) if f.type in (int, "int") else float(v)
        return cls(**values)


# --------------------------------------------------------------------------------------------- histograms
class _Edges:
    """Fixed bin edges in a (possibly transformed) axis; bin 0 is underflow, bin n+1 overflow."""

    def __init__(self, lo: float, hi: float, n: int, symlog: bool = False):
        self.symlog = symlog
        self.t_edges = np.linspace(_fwd(lo) if symlog else lo, _fwd(hi) if symlog else hi, n + 1)
        self.edges = _inv(self.t_edges) if symlog else self.t_edges
        self.n = n

    def counts(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(count per bin, sum of the values per bin); bins 0 and n+1 are under/overflow."""
        v = np.asarray(values, dtype=np.float64).ravel()
        t = _fwd(v) if self.symlog else v
        idx = np.searchsorted(self.t_edges, t, side="right")  # 0: < first edge; n+1: >= last edge
        return (np.bincount(idx, minlength=self.n + 2).astype(np.int64),
                np.bincount(idx, weights=v, minlength=self.n + 2))

    def width_at(self, value: float) -> float:
        """Width of the bin holding `value` (the resolution of histogram percentiles there)."""
        i = int(np.clip(np.searchsorted(self.edges, value, side="right") - 1, 0, self.n - 1))
        return float(self.edges[i + 1] - self.edges[i])

    @staticmethod
    def order_statistics(hist: np.ndarray, binsum: np.ndarray, ranks: np.ndarray,
                         vmin: float, vmax: float) -> np.ndarray:
        """Estimate the values of 0-based `ranks`: the mean of the values in the rank's bin.

        Exact when a bin holds one distinct value (typical for spacings, shapes, 8-bit intensities);
        otherwise within that bin's width.
        """
        cum = np.cumsum(hist)
        b = np.searchsorted(cum, ranks, side="right")  # bin holding each rank
        v = binsum[b] / np.maximum(hist[b], 1)
        return np.clip(v, vmin, vmax)

    def percentile(self, hist: np.ndarray, binsum: np.ndarray, q: float, vmin: float, vmax: float) -> float:
        """numpy's default (linear) percentile, from a histogram: within one bin width of the truth."""
        n = int(hist.sum())
        if n == 0:
            return float("nan")
        pos = q / 100.0 * (n - 1)
        k = np.array([np.floor(pos), np.ceil(pos)])
        lo, hi = self.order_statistics(hist, binsum, k, vmin, vmax)
        return float(lo + (pos - k[0]) * (hi - lo))


def _fwd(x):
    x = np.asarray(x, dtype=np.float64)
    return np.sign(x) * np.log1p(np.abs(x))


def _inv(t):
    t = np.asarray(t, dtype=np.float64)
    return np.sign(t) * np.expm1(np.abs(t))


# --------------------------------------------------------------------------------------------- moments
@dataclass(eq=False)  # holds arrays: compare with to_arrays()
class Moments:
    """count, sum, M2, min, max per component (k components): mergeable without loss."""

    count: np.ndarray
    sum: np.ndarray
    m2: np.ndarray
    min: np.ndarray
    max: np.ndarray

    @classmethod
    def empty(cls, k: int) -> "Moments":
        return cls(np.zeros(k, np.int64), np.zeros(k), np.zeros(k), np.full(k, np.inf), np.full(k, -np.inf))

    @classmethod
    def of(cls, values: np.ndarray) -> "Moments":
        """values: (n, k) samples of k components."""
        v = np.asarray(values, dtype=np.float64)
        n = v.shape[0]
        if n == 0:
            return cls.empty(v.shape[1])
        mean = v.mean(axis=0)
        return cls(np.full(v.shape[1], n, np.int64), v.sum(axis=0), ((v - mean) ** 2).sum(axis=0),
                   v.min(axis=0), v.max(axis=0))

    def merged(self, other: "Moments") -> "Moments":
        na, nb = self.count.astype(np.float64), other.count.astype(np.float64)
        n = na + nb
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_a = np.where(na > 0, self.sum / np.maximum(na, 1), 0)
            delta = np.where(nb > 0, other.sum / np.maximum(nb, 1), 0) - mean_a
            m2 = self.m2 + other.m2 + np.where(n > 0, delta**2 * na * nb / np.maximum(n, 1), 0)
        return Moments(self.count + other.count, self.sum + other.sum, m2,
                       np.minimum(self.min, other.min), np.maximum(self.max, other.max))

    @property
    def mean(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.sum / self.count

    @property
    def std(self) -> np.ndarray:
        """Population std (numpy's default, as nnU-Net uses)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.sqrt(np.maximum(self.m2 / self.count, 0))

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}_{f}": np.asarray(getattr(self, f)) for f in ("count", "sum", "m2", "min", "max")}

    @classmethod
    def from_arrays(cls, arrays, prefix: str) -> "Moments":
        return cls(*(np.asarray(arrays[f"{prefix}_{f}"], dtype=np.int64 if f == "count" else np.float64)
                     for f in ("count", "sum", "m2", "min", "max")))


# --------------------------------------------------------------------------------------------- fingerprint
#: name -> number of components: intensity (1), spacing/shape/extent per axis (z, y, x), relsize (1).
STATS: dict[str, int] = {"intensity": 1, "spacing": 3, "shape": 3, "extent": 3, "relsize": 1}


@dataclass(eq=False)  # holds arrays: compare with to_arrays()
class Stat:
    """Moments plus a fixed-edge histogram (count and sum of values per bin) per component."""

    moments: Moments
    hist: np.ndarray     # (k, bins + 2) int64; bin 0 underflow, bin -1 overflow
    binsum: np.ndarray   # (k, bins + 2) float64

    @classmethod
    def empty(cls, k: int, n_bins: int) -> "Stat":
        return cls(Moments.empty(k), np.zeros((k, n_bins + 2), np.int64), np.zeros((k, n_bins + 2)))

    def add(self, values: np.ndarray, edges: _Edges) -> None:
        """values: (n, k)."""
        self.moments = self.moments.merged(Moments.of(values))
        for a in range(values.shape[1]):
            counts, sums = edges.counts(values[:, a])
            self.hist[a] += counts
            self.binsum[a] += sums

    def merged(self, other: "Stat") -> "Stat":
        return Stat(self.moments.merged(other.moments), self.hist + other.hist, self.binsum + other.binsum)


def _edges(c: FingerprintConfig) -> dict[str, _Edges]:
    return {
        "intensity": _Edges(-c.intensity_abs_max, c.intensity_abs_max, c.intensity_bins, symlog=True),
        "spacing": _Edges(0.0, c.spacing_max, int(round(c.spacing_max / c.spacing_bin_width))),
        "shape": _Edges(0.0, c.shape_max, int(round(c.shape_max / c.shape_bin_width))),
        "extent": _Edges(0.0, c.extent_max, int(round(c.extent_max / c.extent_bin_width))),
        "relsize": _Edges(0.0, 1.0 + 1e-9, c.relsize_bins),  # 1.0 (nothing cropped) in the last bin
    }


@dataclass(eq=False)  # holds arrays: compare with to_arrays()
class SiteFingerprint:
    """Aggregates of one site (or of several, merged). Axes are nnU-Net's (z, y, x).

    `stats[name]` for name in STATS: intensity (foreground voxels of labeled images), spacing,
    shape (after crop), extent (shape * spacing, mm), relsize (relative size after crop).
    """

    config: FingerprintConfig = field(default_factory=FingerprintConfig)
    num_images: int = 0
    num_labeled: int = 0
    stats: dict[str, Stat] = field(default_factory=dict)

    def __post_init__(self):
        self._edges = _edges(self.config)
        for name, k in STATS.items():
            self.stats.setdefault(name, Stat.empty(k, self._edges[name].n))

    # -- adding one image (site side) ------------------------------------------------------------
    def add_image(self, spacing_zyx, shape_after_crop_zyx, relative_size: float,
                  foreground: np.ndarray | None) -> None:
        sp = np.asarray(spacing_zyx, np.float64)[None]
        sh = np.asarray(shape_after_crop_zyx, np.float64)[None]
        self.num_images += 1
        for name, v in (("spacing", sp), ("shape", sh), ("extent", sp * sh),
                        ("relsize", np.array([[relative_size]], np.float64))):
            self.stats[name].add(v, self._edges[name])
        if foreground is not None:
            self.num_labeled += 1
            self.stats["intensity"].add(np.asarray(foreground, np.float64).reshape(-1, 1), self._edges["intensity"])

    # -- transport ---------------------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays (for a Flower ArrayRecord); aggregates only."""
        out = {"config": self.config.to_array(),
               "num_images": np.array([self.num_images], np.int64),
               "num_labeled": np.array([self.num_labeled], np.int64)}
        for name, stat in self.stats.items():
            out.update(stat.moments.to_arrays(name))
            out[f"{name}_hist"] = stat.hist.copy()
            out[f"{name}_binsum"] = stat.binsum.copy()
        return out

    @classmethod
    def from_arrays(cls, arrays) -> "SiteFingerprint":
        """Inverse of to_arrays; raises ValueError on missing or misshapen arrays (untrusted input)."""
        try:
            fp = cls(config=FingerprintConfig.from_array(arrays["config"]),
                     num_images=int(np.asarray(arrays["num_images"]).ravel()[0]),
                     num_labeled=int(np.asarray(arrays["num_labeled"]).ravel()[0]))
            for name, k in STATS.items():
                stat = Stat(Moments.from_arrays(arrays, name), np.array(arrays[f"{name}_hist"], np.int64),
                            np.array(arrays[f"{name}_binsum"], np.float64))
                expected = fp.stats[name].hist.shape
                if stat.hist.shape != expected or stat.binsum.shape != expected \
                        or any(getattr(stat.moments, f).shape != (k,) for f in ("count", "sum", "m2", "min", "max")):
                    raise ValueError(f"{name}: arrays of shape {stat.hist.shape}, expected {expected}")
                fp.stats[name] = stat
        except KeyError as e:
            raise ValueError(f"fingerprint arrays lack {e}") from None
        return fp

    # -- derived statistics --------------------------------------------------------------------------
    def percentile(self, name: str, q: float) -> np.ndarray:
        """Histogram percentile (numpy's linear definition) of `name`, per component."""
        s, edges = self.stats[name], self._edges[name]
        m = s.moments
        return np.array([edges.percentile(s.hist[a], s.binsum[a], q, m.min[a], m.max[a])
                         for a in range(s.hist.shape[0])])

    def bin_width(self, name: str, value: float) -> float:
        """Resolution of `percentile(name, ...)` near `value`."""
        return self._edges[name].width_at(value)

    def intensity_properties(self) -> dict:
        """nnU-Net's foreground_intensity_properties_per_channel["0"]."""
        m = self.stats["intensity"].moments
        if m.count[0] == 0:
            raise ValueError("no labeled foreground voxels: intensity statistics are empty")
        p005, p50, p995 = (float(self.percentile("intensity", q)[0]) for q in (0.5, 50.0, 99.5))
        return {"mean": float(m.mean[0]), "median": p50, "std": float(m.std[0]), "min": float(m.min[0]),
                "max": float(m.max[0]), "percentile_99_5": p995, "percentile_00_5": p005}

    def _synthetic_values(self, name: str) -> np.ndarray:
        """(num_images, k) values whose per-axis order statistics lie in the true ones' bins."""
        s = self.stats[name]
        ranks = np.arange(self.num_images)
        return np.stack([_Edges.order_statistics(s.hist[a], s.binsum[a], ranks, s.moments.min[a], s.moments.max[a])
                         for a in range(s.hist.shape[0])], axis=1)

    def to_nnunet_fingerprint(self) -> dict:
        """nnU-Net's dataset_fingerprint.json content, synthesised from the aggregates.

        Per-case spacings and shapes never leave a site, so the lists nnU-Net's planner expects are
        synthesised from the merged histograms: per axis, one value per image, the k-th value being
        the mean of the bin holding the true k-th smallest one (exact when that bin holds a single
        distinct value, as spacings usually do). Any percentile the planner takes (median target
        spacing, 10th percentile of the anisotropic axis, median shape) is therefore within one bin
        width of the pooled one.
        Spacings are paired with shapes in opposite order (finest spacing with the largest shape),
        which is right when fields of view are similar and irrelevant when either is uniform; the
        planner uses the pairing only for the median shape after resampling.
        """
        if self.num_images == 0:
            raise ValueError("empty fingerprint: no images")
        spacings = self._synthetic_values("spacing")
        shapes = self._synthetic_values("shape")[::-1]
        return {
            "spacings": [[float(v) for v in row] for row in spacings],
            "shapes_after_crop": [[float(v) for v in row] for row in shapes],
            "foreground_intensity_properties_per_channel": {"0": self.intensity_properties()},
            "median_relative_size_after_cropping": float(self.percentile("relsize", 50.0)[0]),
        }

    def summary(self) -> dict:
        """JSON-safe aggregates for plans and reports (no per-case values)."""
        def axes(name):
            m = self.stats[name].moments
            return {"mean": [round(float(v), 4) for v in m.mean], "std": [round(float(v), 4) for v in m.std],
                    "min": [float(v) for v in m.min], "max": [float(v) for v in m.max],
                    "median": [round(float(v), 4) for v in self.percentile(name, 50.0)]}

        out = {"num_images": self.num_images, "num_labeled": self.num_labeled}
        if self.num_images:
            out.update(spacing_zyx=axes("spacing"), shape_after_crop_zyx=axes("shape"),
                       extent_mm_zyx=axes("extent"))
        if self.stats["intensity"].moments.count[0]:
            out["foreground_intensity"] = {k: round(v, 6) for k, v in self.intensity_properties().items()}
            out["foreground_voxels"] = int(self.stats["intensity"].moments.count[0])
        return out


# --------------------------------------------------------------------------------------------- API
def merge_fingerprints(fps: Sequence[SiteFingerprint]) -> SiteFingerprint:
    """Exact merge (counts, sums, M2, min, max, histograms); all must share one FingerprintConfig."""
    if not fps:
        raise ValueError("no fingerprints to merge")
    config = fps[0].config
    out = SiteFingerprint(config=config)
    for fp in fps:
        if fp.config != config:
            raise ValueError(f"fingerprint configs differ: {fp.config} vs {config}")
        out.num_images += fp.num_images
        out.num_labeled += fp.num_labeled
        for name in STATS:
            out.stats[name] = out.stats[name].merged(fp.stats[name])
    return out


def analyze_image(image: Path, mask: Path | None) -> tuple[list[float], list[int], float, np.ndarray | None]:
    """nnU-Net's per-case analysis for one image: (spacing zyx, shape after crop zyx, relative size
    after crop, foreground intensities or None). Same reader and crop as
    `DatasetFingerprintExtractor.analyze_case`, but keeps every foreground voxel (for exact sums)
    and also takes unlabeled images (spacing and shape only)."""
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

    io = image_reader(DEFAULT_READER)  # the reader the plans will name: spacings and shapes in its axis order
    data, props = io.read_images([str(image)])
    if np.isnan(data).any():
        raise ValueError(f"{image}: image contains NaN values")
    if not np.any(data != 0):
        raise ValueError(f"{image}: image is all zero")
    seg = None
    if mask is not None:
        seg, _ = io.read_seg(str(mask))
        if seg.shape != data.shape:
            raise ValueError(f"{mask}: mask shape {tuple(seg.shape[1:])} (z, y, x) does not match image "
                             f"{Path(image).name} shape {tuple(data.shape[1:])}")
    cropped, seg_cropped, _ = crop_to_nonzero(data, seg)
    relative = float(np.prod(cropped.shape[1:]) / np.prod(data.shape[1:]))
    foreground = cropped[0][seg_cropped[0] > 0] if mask is not None else None
    if foreground is not None and foreground.size == 0:
        raise ValueError(f"{mask}: mask has no foreground inside the image's nonzero region")
    return [float(s) for s in props["spacing"]], [int(s) for s in cropped.shape[1:]], relative, foreground


def compute_site_fingerprint(pairs: Sequence[tuple[Path, Path | None]], config: FingerprintConfig | None = None,
                             problems: list[Problem] | None = None) -> SiteFingerprint:
    """Fingerprint of (image, mask or None) pairs: every image adds spacing/shape, labeled ones
    also foreground intensities. With a `problems` list, a bad file is recorded there
    (common.discovery.Problem) and skipped; without one, the first bad file raises."""
    fp = SiteFingerprint(config=config or FingerprintConfig())
    for image, mask in pairs:
        try:
            spacing, shape, relative, fg = analyze_image(Path(image), Path(mask) if mask is not None else None)
        except Exception as e:
            if problems is None:
                raise
            text = one_line(e, limit=10_000)
            for p in (str(image), str(mask)):  # drop the leading "path:" our own messages carry
                text = text.removeprefix(f"{p}: ")
            bad = mask if mask is not None and str(mask) in str(e) else image
            problems.append(Problem(Path(bad), f"fingerprint failed: {text}"))
            continue
        fp.add_image(spacing, shape, relative, fg)
    return fp


__all__ = ["FingerprintConfig", "Moments", "Stat", "STATS", "SiteFingerprint", "merge_fingerprints",
           "compute_site_fingerprint", "analyze_image"]
