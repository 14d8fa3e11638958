"""Whole-trunk tissue label maps, the raw material of domain-randomised pretraining.

A label map is one phantom patient (`simulations.phantoms.anatomy`) sampled on the pretraining
grid, every voxel holding its tissue class, from the lung bases and heart down to the pelvis, so
that a random field of view along z can be cut from it. Real abdomens show what the site
phantoms lack; the maps add it (pretraining only: the sites' phantoms and their random draws are
untouched):

- liver cysts (bright on T2, dark on T1; part of the liver label, as radiologists draw it) and
  renal cysts;
- a left lobe that reaches the spleen in a share of patients (the two organs touch);
- livers of adult size: the site phantoms' livers are small (median 1.4 L, 14 cm craniocaudal);
  scaled up, mostly along z, they span the adult range (about 1.2-2.5 L, 13-20 cm craniocaudal);
- the air around the body: a real scan's field of view (here 32-42 x 28-36 cm) is not cropped to
  the body, and the z-score sees that air, so the maps keep it;
- gallbladder, intrahepatic portal and hepatic veins, fluid-filled stomach and bowel, kidney cortex
  and medulla, lungs and heart above the dome: the anatomy's own classes.

Each map is stored as a preprocessed entry (`common.preprocessing.PreprocessedVolume`): `data` holds
the tissue classes (uint8, (1, z, y, x), in the RAS array order every site's preprocessing reads
images in), `seg` the liver (int8), and the stored foreground locations, so the trainer's sampler
crops it like any site volume and `simulations.synthesis.transforms` turns each crop into an image.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from common.preprocessing import PreprocessedVolume, foreground_locations
from simulations.phantoms.acquisition import GridSpec, Motion
from simulations.phantoms.anatomy import Anatomy, sample_anatomy
from simulations.phantoms.contrast import N_TISSUES, Tissue
from simulations.phantoms.generator import case_rng
from simulations.phantoms.shapes import ellipsoid

#: Classes the maps add beyond `Tissue`.
LIVER_CYST = N_TISSUES          # inside the liver label
RENAL_CYST = N_TISSUES + 1
N_LABELS = N_TISSUES + 2
#: Classes that are liver in the ground truth (the anatomy's liver mask decides; this is for checks).
LIVER_CLASSES = (int(Tissue.LIVER), int(Tissue.PORTAL_VEIN), int(Tissue.HEPATIC_VEIN), int(Tissue.TUMOR), LIVER_CYST)


@dataclass(frozen=True)
class LabelMapConfig:
    """The pretraining grid and the trunk it covers (mm; spacing z, y, x as the plans give it)."""
    spacing: tuple[float, float, float] = (6.0, 3.6, 3.6)
    z_above_dome: float = 110.0     # the heart and lung bases above the right dome
    z_below_liver: float = 230.0    # kidneys, bowel and the upper pelvis below the liver's centre
    fov_lr: tuple[float, float] = (320.0, 420.0)   # in-plane field of view, drawn per map
    fov_ap: tuple[float, float] = (280.0, 360.0)
    liver_growth: tuple[float, float] = (1.0, 1.2)      # every axis
    liver_growth_z: tuple[float, float] = (1.0, 1.35)   # and craniocaudal on top
    p_spleen_contact: float = 0.4   # patients whose left lobe reaches the spleen
    max_liver_cysts: int = 4
    max_renal_cysts: int = 2


def _grid(anatomy: Anatomy, config: LabelMapConfig, rng: np.random.Generator) -> GridSpec:
    sz, sy, sx = config.spacing
    top = anatomy.dome_r + config.z_above_dome
    bottom = float(anatomy.liver_center[2]) - config.z_below_liver
    fov_lr, fov_ap = rng.uniform(*config.fov_lr), rng.uniform(*config.fov_ap)
    size = (int(fov_lr / sx), int(fov_ap / sy), int((top - bottom) / sz))
    origin = (-(size[0] - 1) * sx / 2.0, -(size[1] - 1) * sy / 2.0 + 10.0, bottom)
    return GridSpec(size, (sx, sy, sz), tuple(float(v) for v in np.eye(3).ravel()), origin)


def _reach_spleen(anatomy: Anatomy, rng: np.random.Generator) -> None:
    """Stretch the left lobe towards the spleen (a long lateral segment, common in women)."""
    center, radii, taper = anatomy.left_lobe
    radii = np.asarray(radii, float).copy()
    radii[0] *= rng.uniform(1.3, 1.7)
    anatomy.left_lobe = (np.asarray(center, float) + np.array([rng.uniform(15, 30), 10.0, 0.0]), radii, taper)


def _cysts(rng: np.random.Generator, points: tuple[np.ndarray, ...], inside: np.ndarray, count: int,
           radius: tuple[float, float]) -> np.ndarray:
    """Voxels of up to `count` round cysts centred on random voxels of `inside` (flat bool)."""
    hit = np.zeros(inside.shape, bool)
    candidates = np.flatnonzero(inside)
    if candidates.size == 0 or count == 0:
        return hit
    for idx in rng.choice(candidates, size=min(count, candidates.size), replace=False):
        c = np.array([points[a][idx] for a in range(3)], float)
        r = float(rng.uniform(*radius))
        box = np.flatnonzero((np.abs(points[0] - c[0]) < r) & (np.abs(points[1] - c[1]) < r)
                             & (np.abs(points[2] - c[2]) < r))
        sub = tuple(points[a][box] for a in range(3))
        hit[box[ellipsoid(sub, c, (r, r * rng.uniform(0.8, 1.0), r * rng.uniform(0.8, 1.1))) < 0]] = True
    return hit & inside


def render_label_map(seed: int, index: int, config: LabelMapConfig = LabelMapConfig()) -> tuple[sitk.Image, sitk.Image]:
    """(tissue classes uint8, liver uint8) of one patient on its own grid (LPS, identity direction)."""
    rng = case_rng(seed, "SYNTH", index, "anatomy")
    stage = int(rng.integers(1, 5))
    anatomy = sample_anatomy(rng, stage, n_tumors=int(rng.integers(0, 3)))
    extra = case_rng(seed, "SYNTH", index, "extras")
    if extra.random() < config.p_spleen_contact:
        _reach_spleen(anatomy, extra)
    growth = extra.uniform(*config.liver_growth) * np.array([1.0, 1.0, extra.uniform(*config.liver_growth_z)])
    anatomy.liver_scale = anatomy.liver_scale * growth
    grid = _grid(anatomy, config, extra)
    points = Motion.random(extra, anatomy.liver_center).apply(grid.points())
    sample = anatomy.evaluate(points, breathing=float(extra.uniform(-15, 15)), run=grid.size[0] * grid.size[1])
    labels, liver = sample.labels.astype(np.uint8), sample.liver.copy()
    parenchyma = liver & (labels == Tissue.LIVER)
    liver_cyst = _cysts(extra, points, parenchyma, int(extra.integers(0, config.max_liver_cysts + 1)), (4.0, 20.0))
    labels[liver_cyst] = LIVER_CYST
    kidney = labels == Tissue.KIDNEY_CORTEX
    labels[_cysts(extra, points, kidney, int(extra.integers(0, config.max_renal_cysts + 1)), (5.0, 16.0))] = RENAL_CYST
    images = []
    for array in (labels, liver.astype(np.uint8)):
        image = sitk.GetImageFromArray(array.reshape(grid.shape_zyx))
        image.SetSpacing(grid.spacing)
        image.SetOrigin(grid.origin)
        image.SetDirection(grid.direction)
        images.append(image)
    return images[0], images[1]


def _ras_array(image: sitk.Image) -> np.ndarray:
    """(z, y, x) voxels in the order nnU-Net's reorienting reader (`SimpleITKIOWithReorient`) gives."""
    return sitk.GetArrayFromImage(sitk.DICOMOrient(image, "RAS"))


def write_label_maps(out: Path, count: int, seed: int, config: LabelMapConfig = LabelMapConfig(),
                     log=print) -> list[PreprocessedVolume]:
    """Render `count` label maps under `out` (kept: a second call with the same arguments reads them)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    volumes = []
    for i in range(count):
        stem = out / f"synth{i:04d}"
        files = [Path(f"{stem}{s}") for s in (".npy", "_seg.npy", "_fg.npy", ".json")]
        key = {"seed": seed, "index": i, "config": json.loads(json.dumps(asdict(config)))}
        done = files[3].is_file() and json.loads(files[3].read_text(encoding="utf-8")).get("key") == key
        if not done:
            labels_img, liver_img = render_label_map(seed, i, config)
            labels, liver = _ras_array(labels_img)[None], _ras_array(liver_img)[None].astype(np.int8)
            np.save(files[0], np.ascontiguousarray(labels, np.uint8))
            np.save(files[1], np.ascontiguousarray(liver))
            np.save(files[2], foreground_locations(liver))
            files[3].write_text(json.dumps({"key": key, "properties": {"shape": list(labels.shape[1:]),
                                                                       "spacing": list(config.spacing)}}))
            log(f"label map {i + 1}/{count}: {labels.shape[1:]} voxels, liver {int(liver.sum())}")
        volumes.append(PreprocessedVolume(stem.name, "synthetic", files[0], files[1], files[3], files[2]))
    return volumes


def label_histogram(volumes: Sequence[PreprocessedVolume]) -> np.ndarray:
    """Voxels per class over `volumes` (a check that every class the generator randomises is present)."""
    counts = np.zeros(N_LABELS, np.int64)
    for v in volumes:
        counts += np.bincount(np.load(v.data_file).ravel(), minlength=N_LABELS)[:N_LABELS]
    return counts
