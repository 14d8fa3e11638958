"""`python -m simulations.experiments <experiment> [options]`; `--help` after a name lists its options."""

from __future__ import annotations

import sys

from simulations.experiments import aggregation, cross_phase, quality_control, real_federation, real_mri

EXPERIMENTS = {"cross-phase": cross_phase.main, "robust-aggregation": aggregation.robust_main,
               "dp-cost": aggregation.dp_main, "real-mri": real_mri.main,
               "real-federation": real_federation.main,
               "quality-control": quality_control.main}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in EXPERIMENTS:
        print(f"usage: python -m simulations.experiments {{{','.join(EXPERIMENTS)}}} [options]", file=sys.stderr)
        return 2
    return EXPERIMENTS[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
