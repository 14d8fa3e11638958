"""Which label-transfer augmentations a site trains with (the transforms: `client/label_transfer.py`).

Torch-free, so the command line, the run config and the server can read and check it cheaply.
Probabilities are per labeled sample; the transpose and the bias field also apply to unlabeled samples.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class LabelTransferConfig:
    location_scale: float = 0.0   # per-class random intensity curves (SLAug)
    non_contrast: float = 0.0     # liver darkened inside its mask (simulated non-contrast, MA2)
    random_conv: float = 0.0      # random shallow convolutions mixed with the image (GIN)
    transpose: float = 0.0        # in-plane axes swapped (labeled and unlabeled samples)
    bias_field: float = 0.0       # smooth random multiplicative field (labeled and unlabeled samples)

    def __post_init__(self) -> None:
        for f in fields(self):
            p = getattr(self, f.name)
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"label transfer '{f.name}' probability must be in [0, 1], got {p}")

    @property
    def enabled(self) -> bool:
        return any(float(p) > 0 for p in asdict(self).values())

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    def to_dict_hyphenated(self) -> dict[str, float]:
        """{run-config key: probability}."""
        return {k.replace("_", "-"): v for k, v in self.to_dict().items()}

    @classmethod
    def from_hyphenated(cls, config: Mapping[str, object], default: "LabelTransferConfig | None" = None
                        ) -> "LabelTransferConfig":
        """From run-config style keys (`location-scale`, ...); missing keys keep `default`'s values."""
        default = default or cls()
        return cls(**{f.name: float(config.get(f.name.replace("_", "-"), getattr(default, f.name)))  # type: ignore[arg-type]
                      for f in fields(cls)})


#: Off: none of the augmentations improved the mean over GED4/T1/T2/DWI in the ablation (README).
DEFAULT_LABEL_TRANSFER = LabelTransferConfig()

__all__ = ["LabelTransferConfig", "DEFAULT_LABEL_TRANSFER"]
