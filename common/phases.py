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


def parse_phase_list(text: str, key: str = "phases") -> tuple[str, ...] | None:
    """`"GED4,T1"` -> ("GED4", "T1"); `"*"` or "" -> None (every phase). ValueError naming an unknown phase."""
    names = tuple(p.strip() for p in str(text).split(",") if p.strip())
    if not names or names == ("*",):
        return None
    unknown = [p for p in names if p not in PHASES]
    if unknown:
        raise ValueError(f"{key}: unknown phase(s) {', '.join(unknown)}; phases are {', '.join(PHASES)} or *")
    return names
