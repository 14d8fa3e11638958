"""One case of a site: its phase images and masks, as discovery found and validation kept them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from common.phases import PHASES
from common.splits import SPLITS, TRAIN


@dataclass(frozen=True)
class Case:
    case_id: str  # "0001-A-S2", "0001-A", "im3"
    center: str  # "A", "B1", ... ("" when the layout has none)
    stage: int | None  # fibrosis stage when the name carries it
    images: Mapping[str, Path]  # phase -> image file (valid files only), in PHASES order
    masks: Mapping[str, Path]  # phase -> mask file (valid files only)
    foreground_labels: tuple[int, ...] = (1,)  # label values that mean liver (ATLAS: (1, 2))
    split: str = TRAIN  # "train" | "validation" | "test", from the folder's splits.json

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"case {self.case_id}: split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        # Own plain dicts (picklable, detached from the caller's), phases in report order.
        order = {p: i for i, p in enumerate(PHASES)}
        for name in ("images", "masks"):
            items = sorted(getattr(self, name).items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))
            object.__setattr__(self, name, {k: Path(v) for k, v in items})
        object.__setattr__(self, "foreground_labels", tuple(int(v) for v in self.foreground_labels))

    def __hash__(self) -> int:
        return hash((self.case_id, self.center, self.stage, tuple(self.images.items()),
                     tuple(self.masks.items()), self.foreground_labels, self.split))

    @property
    def labeled(self) -> bool:
        return bool(self.masks)


__all__ = ["Case"]
