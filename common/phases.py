"""MRI phases of the LiQA protocol and the names used for them on disk."""

from __future__ import annotations

#: Every phase a LiQA case may hold, in the order reports list them.
PHASES: tuple[str, ...] = ("GED4", "T1", "T2", "DWI_800", "GED1", "GED2", "GED3")

#: The hepatobiliary phase LiQA sites label; first among a case's labeled phases, and what
#: reports name when no site said otherwise (run config `labeled-phases` picks a site's own).
LABELED_PHASE = "GED4"

#: Run config `labeled-phases` "auto": every phase that has a mask at the site.
AUTO_LABELED = "auto"

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


def ordered_phases(phases) -> tuple[str, ...]:
    """`phases` once each, in PHASES order (GED4 first): the order a case's labeled phases are tried in."""
    given = set(phases)
    return tuple(p for p in PHASES if p in given)


def parse_labeled_phases(text: str, key: str = "labeled-phases") -> tuple[str, ...] | None:
    """Run config `labeled-phases`: "auto" -> None (every phase with a mask at the site); `"T2"`,
    `"GED4,T2"` -> those phases in PHASES order. One-line ValueError naming a bad value and the valid phases."""
    if str(text).strip().lower() == AUTO_LABELED:
        return None
    names = [p.strip() for p in str(text).split(",")]
    unknown = [p for p in names if p not in PHASES]
    if unknown:
        bad = ", ".join(repr(p) for p in unknown)
        raise ValueError(f"{key} {text!r}: unknown phase {bad}; write {AUTO_LABELED} or a comma list of "
                         f"{', '.join(PHASES)}")
    return ordered_phases(names)


def labeled_phases_text(phases: tuple[str, ...] | None) -> str:
    """The run-config text of parsed `labeled-phases` (None: "auto")."""
    return AUTO_LABELED if phases is None else ",".join(phases)
