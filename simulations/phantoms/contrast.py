"""Tissue classes and their relative signal in every phase.

Signals are on a common 0-1 scale (before a center's own intensity scaling). The table encodes the
textbook look of each weighting: T2 (liver dark, spleen and fluid bright), DWI b=800 (spleen and
kidney bright, fluid and fat dark), fat-suppressed dynamic T1 (arterial: aorta and renal cortex very
bright, liver mild; portal: portal and hepatic veins bright; transitional: everything converging)
and the hepatobiliary phase (GED4: liver bright, vessels dark).
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Tissue(IntEnum):
    AIR = 0
    SUBQ_FAT = 1
    MUSCLE = 2
    VISCERAL_FAT = 3
    LIVER = 4
    SPLEEN = 5
    KIDNEY_CORTEX = 6
    KIDNEY_MEDULLA = 7
    BONE = 8
    CSF = 9
    AORTA = 10
    IVC = 11
    PORTAL_VEIN = 12
    HEPATIC_VEIN = 13
    STOMACH = 14
    GAS = 15
    BOWEL = 16
    GALLBLADDER = 17
    LUNG = 18
    HEART = 19
    PANCREAS = 20
    DISC = 21
    TUMOR = 22


N_TISSUES = len(Tissue)
_FAT = (Tissue.SUBQ_FAT, Tissue.VISCERAL_FAT)

# Relative signal per phase. Unlisted tissues default to 0 (air-like).
_BASE: dict[str, dict[Tissue, float]] = {
    "T1": {  # pre-contrast T1 (opposed/in-phase style, no fat suppression: fat bright)
        Tissue.SUBQ_FAT: 0.80, Tissue.VISCERAL_FAT: 0.74, Tissue.MUSCLE: 0.30, Tissue.LIVER: 0.52,
        Tissue.SPLEEN: 0.38, Tissue.KIDNEY_CORTEX: 0.36, Tissue.KIDNEY_MEDULLA: 0.26, Tissue.BONE: 0.55,
        Tissue.CSF: 0.08, Tissue.AORTA: 0.12, Tissue.IVC: 0.14, Tissue.PORTAL_VEIN: 0.16,
        Tissue.HEPATIC_VEIN: 0.15, Tissue.STOMACH: 0.20, Tissue.BOWEL: 0.32, Tissue.GALLBLADDER: 0.10,
        Tissue.LUNG: 0.02, Tissue.HEART: 0.22, Tissue.PANCREAS: 0.55, Tissue.DISC: 0.30, Tissue.TUMOR: 0.35,
    },
    "T2": {  # fat-saturated T2: fluid brightest, spleen > liver, muscle darkest
        Tissue.SUBQ_FAT: 0.20, Tissue.VISCERAL_FAT: 0.17, Tissue.MUSCLE: 0.10, Tissue.LIVER: 0.18,
        Tissue.SPLEEN: 0.50, Tissue.KIDNEY_CORTEX: 0.45, Tissue.KIDNEY_MEDULLA: 0.55, Tissue.BONE: 0.22,
        Tissue.CSF: 1.00, Tissue.AORTA: 0.04, Tissue.IVC: 0.06, Tissue.PORTAL_VEIN: 0.08,
        Tissue.HEPATIC_VEIN: 0.06, Tissue.STOMACH: 0.85, Tissue.BOWEL: 0.55, Tissue.GALLBLADDER: 0.98,
        Tissue.LUNG: 0.02, Tissue.HEART: 0.08, Tissue.PANCREAS: 0.28, Tissue.DISC: 0.55, Tissue.TUMOR: 0.45,
    },
    "DWI_800": {  # high b-value: restricted diffusion bright, free water and fat dark
        Tissue.SUBQ_FAT: 0.08, Tissue.VISCERAL_FAT: 0.07, Tissue.MUSCLE: 0.10, Tissue.LIVER: 0.28,
        Tissue.SPLEEN: 0.75, Tissue.KIDNEY_CORTEX: 0.50, Tissue.KIDNEY_MEDULLA: 0.45, Tissue.BONE: 0.12,
        Tissue.CSF: 0.06, Tissue.AORTA: 0.02, Tissue.IVC: 0.02, Tissue.PORTAL_VEIN: 0.03,
        Tissue.HEPATIC_VEIN: 0.03, Tissue.STOMACH: 0.12, Tissue.BOWEL: 0.35, Tissue.GALLBLADDER: 0.06,
        Tissue.LUNG: 0.01, Tissue.HEART: 0.03, Tissue.PANCREAS: 0.40, Tissue.DISC: 0.10, Tissue.TUMOR: 0.70,
    },
    "GED1": {  # arterial: aorta and renal cortex very bright, portal vein starting, liver mild
        Tissue.SUBQ_FAT: 0.12, Tissue.VISCERAL_FAT: 0.10, Tissue.MUSCLE: 0.22, Tissue.LIVER: 0.36,
        Tissue.SPLEEN: 0.68, Tissue.KIDNEY_CORTEX: 0.90, Tissue.KIDNEY_MEDULLA: 0.32, Tissue.BONE: 0.32,
        Tissue.CSF: 0.05, Tissue.AORTA: 1.00, Tissue.IVC: 0.20, Tissue.PORTAL_VEIN: 0.45,
        Tissue.HEPATIC_VEIN: 0.14, Tissue.STOMACH: 0.12, Tissue.BOWEL: 0.40, Tissue.GALLBLADDER: 0.05,
        Tissue.LUNG: 0.02, Tissue.HEART: 0.92, Tissue.PANCREAS: 0.70, Tissue.DISC: 0.15, Tissue.TUMOR: 0.75,
    },
    "GED2": {  # portal venous: portal and hepatic veins, IVC bright; liver enhanced
        Tissue.SUBQ_FAT: 0.12, Tissue.VISCERAL_FAT: 0.10, Tissue.MUSCLE: 0.30, Tissue.LIVER: 0.58,
        Tissue.SPLEEN: 0.64, Tissue.KIDNEY_CORTEX: 0.76, Tissue.KIDNEY_MEDULLA: 0.70, Tissue.BONE: 0.38,
        Tissue.CSF: 0.05, Tissue.AORTA: 0.82, Tissue.IVC: 0.78, Tissue.PORTAL_VEIN: 0.92,
        Tissue.HEPATIC_VEIN: 0.80, Tissue.STOMACH: 0.14, Tissue.BOWEL: 0.45, Tissue.GALLBLADDER: 0.05,
        Tissue.LUNG: 0.02, Tissue.HEART: 0.80, Tissue.PANCREAS: 0.55, Tissue.DISC: 0.18, Tissue.TUMOR: 0.30,
    },
    "GED3": {  # transitional: vessels fading towards the parenchyma
        Tissue.SUBQ_FAT: 0.12, Tissue.VISCERAL_FAT: 0.10, Tissue.MUSCLE: 0.32, Tissue.LIVER: 0.62,
        Tissue.SPLEEN: 0.55, Tissue.KIDNEY_CORTEX: 0.66, Tissue.KIDNEY_MEDULLA: 0.66, Tissue.BONE: 0.38,
        Tissue.CSF: 0.05, Tissue.AORTA: 0.64, Tissue.IVC: 0.62, Tissue.PORTAL_VEIN: 0.66,
        Tissue.HEPATIC_VEIN: 0.62, Tissue.STOMACH: 0.14, Tissue.BOWEL: 0.42, Tissue.GALLBLADDER: 0.06,
        Tissue.LUNG: 0.02, Tissue.HEART: 0.62, Tissue.PANCREAS: 0.48, Tissue.DISC: 0.20, Tissue.TUMOR: 0.34,
    },
    "GED4": {  # hepatobiliary (gadoxetate, ~20 min): liver bright, vessels dark, bile starts to light up
        Tissue.SUBQ_FAT: 0.12, Tissue.VISCERAL_FAT: 0.10, Tissue.MUSCLE: 0.24, Tissue.LIVER: 0.86,
        Tissue.SPLEEN: 0.36, Tissue.KIDNEY_CORTEX: 0.58, Tissue.KIDNEY_MEDULLA: 0.52, Tissue.BONE: 0.34,
        Tissue.CSF: 0.05, Tissue.AORTA: 0.30, Tissue.IVC: 0.28, Tissue.PORTAL_VEIN: 0.26,
        Tissue.HEPATIC_VEIN: 0.24, Tissue.STOMACH: 0.14, Tissue.BOWEL: 0.55, Tissue.GALLBLADDER: 0.12,
        Tissue.LUNG: 0.02, Tissue.HEART: 0.30, Tissue.PANCREAS: 0.40, Tissue.DISC: 0.18, Tissue.TUMOR: 0.22,
    },
}

#: How fibrotic texture shows per phase: (sign of coarse heterogeneity, septa contrast).
#: Septa (fibrous bands) are dark on hepatobiliary/T1, bright on T2 and slightly on delayed phases.
_TEXTURE = {
    "T1": (1.0, -0.10), "T2": (1.0, 0.35), "DWI_800": (1.0, 0.20), "GED1": (1.0, -0.04),
    "GED2": (1.0, 0.04), "GED3": (1.0, 0.10), "GED4": (1.0, -0.22),
}


def signal_table(phase: str, *, fat_suppression: float = 1.0, stage: int = 1,
                 jitter: np.ndarray | None = None) -> np.ndarray:
    """Relative signal per `Tissue` for `phase`.

    `fat_suppression` < 1 lets fat signal leak into fat-saturated phases (a scanner's look).
    `stage` lowers hepatobiliary uptake of fibrotic livers. `jitter` (per tissue, ~1) models
    case-to-case physiology (cardiac output, bolus timing).
    """
    table = np.zeros(N_TISSUES, np.float32)
    for tissue, value in _BASE[phase].items():
        table[tissue] = value
    if phase not in ("T1",):
        for t in _FAT:
            table[t] = table[t] + (1.0 - fat_suppression) * (0.75 - table[t])
    if phase == "GED4":
        table[Tissue.LIVER] *= 1.0 - 0.07 * (stage - 1)
    if jitter is not None:
        table *= jitter.astype(np.float32)
    table[Tissue.AIR] = 0.0
    table[Tissue.LUNG] = min(table[Tissue.LUNG], 0.03)
    return table


def texture_weights(phase: str, stage: int) -> tuple[float, float]:
    """(coarse heterogeneity rms, septa contrast) of the liver for a fibrosis stage."""
    sign, septa = _TEXTURE[phase]
    hetero = 0.025 + 0.02 * (stage - 1)
    return sign * hetero, septa * (0.15 + 0.3 * (stage - 1))
