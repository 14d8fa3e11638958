"""MRI phases of the LiQA protocol and the names used for them on disk."""

from __future__ import annotations

#: Every phase a LiQA case may hold, in the order reports list them.
PHASES: tuple[str, ...] = ("GED4", "T1", "T2", "DWI_800", "GED1", "GED2", "GED3")

#: The hepatobiliary phase: the only one sites label.
LABELED_PHASE = "GED4"

#: Non-contrast phases the method generalises to without labels or registration.
NON_CONTRAST_PHASES: tuple[str, ...] = ("T1", "T2", "DWI_800")

#: Dynamic contrast phases (arterial, portal, transitional); unlabeled, opt-in for training.
DYNAMIC_PHASES: tuple[str, ...] = ("GED1", "GED2", "GED3")


def image_filename(phase: str) -> str:
    return f"{phase}.nii.gz"


def mask_filename(phase: str) -> str:
    return f"mask_{phase}.nii.gz"
