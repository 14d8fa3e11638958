"""Public pretraining sets, in nnU-Net raw layout.

- ATLAS-like (the default): contrast-enhanced (portal-venous) T1 liver MRI with tumours,
  `imagesTr/im<N>.nii.gz`, `labelsTr/lb<N>.nii.gz`, `dataset.json`.
- Multi-sequence (`sequences` beyond T1CE): the same subjects also scanned with the non-contrast
  sequences that public abdominal MRI collections label (CHAOS: T1 in/opposed phase and T2-SPIR;
  AMOS-MRI, TotalSegmentator-MRI: many sequences), one case per subject and sequence,
  `imagesTr/ms<NNN><seq>_<CCCC>.nii.gz` with its own `labelsTr/ms<NNN><seq>.nii.gz` (each
  sequence has its own breathing position). No hepatobiliary (GED4) images: those only the sites have.

Labels: 0 background, 1 liver, 2 tumour (the whole liver is 1 or 2). Its scanner and geometry
are its own, unlike any LiQA center, as a public set gathered elsewhere would be; its per-case
tissue signals vary more than a single hospital's (`SEQUENCE_JITTER`), as pooled protocols do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from simulations.phantoms.acquisition import Motion, make_grid, render_phase, write_nifti_gz
from simulations.phantoms.anatomy import sample_anatomy
from simulations.phantoms.centers import ATLAS_GEOMETRY, CenterProfile, PhaseGeometry
from simulations.phantoms.contrast import N_TISSUES
from simulations.phantoms.generator import case_rng

ATLAS_SCANNER = CenterProfile("ATLAS", vendor="public", orientation="flip_xy", intensity="raw", dtype="float32",
                              raw_scale=1400.0, noise=0.03, bias=0.2, fat_suppression=0.9, blur=0.6)
LABELS = {"background": 0, "liver": 1, "tumor": 2}
#: Public sequence name -> the phase it is rendered as (its channel name reads as that phase).
SEQUENCES = {"T1CE": "GED2", "T1": "T1", "T2": "T2", "DWI": "DWI_800"}
#: Per-tissue signal spread of the extra sequences (ATLAS's own T1CE keeps +-12%).
SEQUENCE_JITTER = 0.2


def _geometry(profile: str, rng: np.random.Generator) -> PhaseGeometry:
    if profile not in ATLAS_GEOMETRY:
        raise ValueError(f"unknown profile {profile!r} (choose from {', '.join(ATLAS_GEOMETRY)})")
    g = ATLAS_GEOMETRY[profile]
    f = float(rng.uniform(0.9, 1.15))  # public sets mix protocols: vary the grid per case
    s = round(g.inplane * f, 3)
    return PhaseGeometry(s, s, round(g.thickness * float(rng.uniform(0.85, 1.2)), 3),
                         int(round(g.inplane * g.matrix[0] / s)), int(round(g.inplane * g.matrix[1] / s)), g.slices)


def _case_scan(seed: int, i: int, key: str, profile: str, anatomy) -> tuple[np.random.Generator, object]:
    pr = case_rng(seed, "ATLAS", i, key)
    grid = make_grid(_geometry(profile, pr), ATLAS_SCANNER.orientation,
                     (pr.uniform(-10, 10), pr.uniform(-12, 6), anatomy.liver_center[2] - 8.0 + pr.uniform(-10, 10)))
    return pr, grid


def generate_atlas_tree(out: Path, cases: int, seed: int, profile: str = "demo",
                        sequences: Sequence[str] = ("T1CE",)) -> Path:
    """Write `cases` subjects under `out` (nnU-Net raw layout), each scanned with `sequences`
    (names of `SEQUENCES`); returns `out`. Only T1CE: the ATLAS-like set."""
    unknown = [q for q in sequences if q not in SEQUENCES]
    if unknown or not sequences:
        raise ValueError(f"unknown sequence(s) {', '.join(unknown) or '(none)'} (choose from {', '.join(SEQUENCES)})")
    out = Path(out)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    multi = tuple(sequences) != ("T1CE",)
    for i in range(cases):
        r = case_rng(seed, "ATLAS", i, "anatomy")
        stage = int(r.integers(1, 5))
        anatomy = sample_anatomy(r, stage, n_tumors=int(r.integers(1, 4)))
        for channel, sequence in enumerate(sequences):
            # T1CE keeps ATLAS's own draws (the ATLAS-only set is unchanged); others draw their own.
            pr, grid = _case_scan(seed, i, "scan" if sequence == "T1CE" else f"scan-{sequence}", profile, anatomy)
            spread = 0.12 if sequence == "T1CE" else SEQUENCE_JITTER
            jitter = 1.0 + np.clip(pr.normal(0, spread / 2.4, N_TISSUES), -spread, spread)
            img = render_phase(anatomy, grid, SEQUENCES[sequence], ATLAS_SCANNER,
                               Motion.random(pr, anatomy.liver_center), pr,
                               jitter=jitter, gain=float(pr.uniform(0.7, 1.4)), tumor_value=LABELS["tumor"])
            case_id = f"ms{i:03d}{sequence.lower()}" if multi else None
            image_name = f"{case_id}_{channel:04d}.nii.gz" if multi else f"im{i}.nii.gz"
            write_nifti_gz(img.image, out / "imagesTr" / image_name)
            write_nifti_gz(img.mask, out / "labelsTr" / (f"{case_id}.nii.gz" if multi else f"lb{i}.nii.gz"))
    dataset = {
        "name": "Multi-sequence abdominal MRI phantoms" if multi else "ATLAS-like phantoms",
        "description": ("Synthetic liver MRI with tumours, sequences " + ", ".join(sequences) if multi
                        else "Synthetic contrast-enhanced T1 liver MRI with tumours") + " (fedliver phantoms)",
        "channel_names": {str(c): q for c, q in enumerate(sequences)},
        "labels": LABELS,
        "numTraining": cases * len(sequences),
        "file_ending": ".nii.gz",
    }
    (out / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
    return out
