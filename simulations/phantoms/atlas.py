"""An ATLAS-like public pretraining set: contrast-enhanced (portal-venous) T1 liver MRI with
tumours, in nnU-Net raw layout (`imagesTr/im<N>.nii.gz`, `labelsTr/lb<N>.nii.gz`, `dataset.json`).

Labels: 0 background, 1 liver, 2 tumour (the whole liver is 1 or 2). Its scanner and geometry
are its own, unlike any LiQA center, as a public set gathered elsewhere would be.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from simulations.phantoms.acquisition import Motion, make_grid, render_phase, write_nifti_gz
from simulations.phantoms.anatomy import sample_anatomy
from simulations.phantoms.centers import ATLAS_GEOMETRY, CenterProfile, PhaseGeometry
from simulations.phantoms.contrast import N_TISSUES
from simulations.phantoms.generator import case_rng

ATLAS_SCANNER = CenterProfile("ATLAS", vendor="public", orientation="flip_xy", intensity="raw", dtype="float32",
                              raw_scale=1400.0, noise=0.03, bias=0.2, fat_suppression=0.9, blur=0.6)
LABELS = {"background": 0, "liver": 1, "tumor": 2}


def _geometry(profile: str, rng: np.random.Generator) -> PhaseGeometry:
    if profile not in ATLAS_GEOMETRY:
        raise ValueError(f"unknown profile {profile!r} (choose from {', '.join(ATLAS_GEOMETRY)})")
    g = ATLAS_GEOMETRY[profile]
    f = float(rng.uniform(0.9, 1.15))  # public sets mix protocols: vary the grid per case
    s = round(g.inplane * f, 3)
    return PhaseGeometry(s, s, round(g.thickness * float(rng.uniform(0.85, 1.2)), 3),
                         int(round(g.inplane * g.matrix[0] / s)), int(round(g.inplane * g.matrix[1] / s)), g.slices)


def generate_atlas_tree(out: Path, cases: int, seed: int, profile: str = "demo") -> Path:
    """Write `cases` ATLAS-like cases under `out` (nnU-Net raw layout); returns `out`."""
    out = Path(out)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    for i in range(cases):
        r = case_rng(seed, "ATLAS", i, "anatomy")
        stage = int(r.integers(1, 5))
        anatomy = sample_anatomy(r, stage, n_tumors=int(r.integers(1, 4)))
        pr = case_rng(seed, "ATLAS", i, "scan")
        grid = make_grid(_geometry(profile, pr), ATLAS_SCANNER.orientation,
                         (pr.uniform(-10, 10), pr.uniform(-12, 6), anatomy.liver_center[2] - 8.0 + pr.uniform(-10, 10)))
        jitter = 1.0 + np.clip(pr.normal(0, 0.05, N_TISSUES), -0.12, 0.12)
        img = render_phase(anatomy, grid, "GED2", ATLAS_SCANNER, Motion.random(pr, anatomy.liver_center), pr,
                           jitter=jitter, gain=float(pr.uniform(0.7, 1.4)), tumor_value=LABELS["tumor"])
        write_nifti_gz(img.image, out / "imagesTr" / f"im{i}.nii.gz")
        write_nifti_gz(img.mask, out / "labelsTr" / f"lb{i}.nii.gz")
    dataset = {
        "name": "ATLAS-like phantoms",
        "description": "Synthetic contrast-enhanced T1 liver MRI with tumours (fedliver phantoms)",
        "channel_names": {"0": "T1CE"},
        "labels": LABELS,
        "numTraining": cases,
        "file_ending": ".nii.gz",
    }
    (out / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
    return out
