"""Postprocessing of a binary liver prediction, the way nnU-Net's `determine_postprocessing` applies it.

The liver is one connected organ, so "largest-component" (nnunetv2's
`remove_all_but_largest_component_from_segmentation` on the liver label) removes the false
positives away from it, other bright organs above all, which dominate HD95. nnU-Net applies it only
where validation showed it helps. Early models (before label propagation; pooled CPS on held-out
centre C): GED4 Dice 0.891 -> 0.920, HD95 37 -> 11 mm; but DWI_800 0.23 -> 0.17 (median 0.21 ->
0.00): its low-resolution predictions came in pieces, and the largest one was often not liver, so it
was kept to GED4. With today's models (one orientation, no
mirroring, label propagation) it helps or ties on every phase of the development phantom set (seed 1,
`python -m simulations.experiments cross-phase`: held-out C T2 0.631 -> 0.644, 0.577 -> 0.632 at 66
iterations), so the run config applies it to every phase by default (`postprocessing-phases = "*"`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

METHODS = ("none", "largest-component")
LIVER_LABEL = 1


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"postprocessing must be one of {METHODS}, got {method!r}")
    return method


def postprocess_mask(mask: np.ndarray, method: str) -> np.ndarray:
    """`mask` (any integer or bool array, liver = nonzero) after `method`, as uint8 0/1."""
    from nnunetv2.postprocessing.remove_connected_components import remove_all_but_largest_component_from_segmentation

    binary = (np.asarray(mask) > 0).astype(np.uint8)
    if check_method(method) == "none" or not binary.any():
        return binary
    return remove_all_but_largest_component_from_segmentation(binary, [LIVER_LABEL])


@dataclass(frozen=True)
class Postprocessing:
    """`method` for the predictions of `phases` (None: every phase), "none" for the others."""
    method: str = "largest-component"
    phases: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        check_method(self.method)

    def for_phase(self, phase: str) -> str:
        return self.method if self.phases is None or phase in self.phases else "none"

    def to_info(self) -> dict:
        """For a MODEL_DIR's info.json (and a Flower ConfigRecord: strings only)."""
        return {"method": self.method, "phases": ",".join(self.phases) if self.phases is not None else "*"}

    @classmethod
    def parse(cls, method: str, phases: str = "*") -> Postprocessing:
        """From the strings of run configs and command lines: phases comma-separated, "*" for all."""
        return cls(method, None if phases == "*" else tuple(p for p in phases.split(",") if p))

    @classmethod
    def from_info(cls, info: Mapping | str | None) -> Postprocessing:
        """What `to_info` wrote; a bare method name means every phase; nothing means no postprocessing."""
        if info is None:
            return NO_POSTPROCESSING
        if isinstance(info, str):
            return cls(info, None)
        return cls.parse(str(info.get("method", "none")), str(info.get("phases", "*")))

    def __str__(self) -> str:
        if self.method == "none":
            return "none"
        return f"{self.method} ({'every phase' if self.phases is None else ', '.join(self.phases)})"


NO_POSTPROCESSING = Postprocessing("none", None)

__all__ = ["METHODS", "NO_POSTPROCESSING", "Postprocessing", "check_method", "postprocess_mask"]
