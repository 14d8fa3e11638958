"""`fedliver phantoms OUT`: synthetic multi-center, multi-phase liver MRI in LiQA layout."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

_NAME = re.compile(r"^[A-Za-z0-9]+$")


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "phantoms",
        help="write synthetic multi-center, multi-phase liver MRI phantoms (LiQA layout)",
        description="Write OUT/Vendor_<X>/<NNNN>-<X>-S<stage>/<PHASE>.nii.gz for every center. "
                    "Training centers get mask_GED4.nii.gz for their first K cases; held-out centers "
                    "get mask_<PHASE>.nii.gz for every phase present. --test-cases and --validation-cases "
                    "add cases to each training center after its N training cases (test: a mask for every "
                    "phase; validation: mask_GED4), listed in Vendor_<X>/splits.json.",
    )
    p.add_argument("out", type=Path, help="output folder (created)")
    p.add_argument("--centers", default="A,B1,B2,C", help="comma-separated centers (default: A,B1,B2,C)")
    p.add_argument("--cases", type=int, default=12, help="cases per center (default: 12)")
    p.add_argument("--labeled", type=int, default=3, help="labeled cases per training center (default: 3)")
    p.add_argument("--test-cases", type=int, default=0, metavar="T",
                   help="extra test cases per training center, a mask for every phase (default: 0)")
    p.add_argument("--validation-cases", type=int, default=0, metavar="V",
                   help="extra labeled validation cases per training center, for model selection (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--profile", choices=("demo", "full"), default="demo",
                   help="demo: small CPU-sized grids; full: near LiQA geometry (default: demo)")
    p.add_argument("--heldout", default=None,
                   help="comma-separated held-out (evaluation) centers (default: C when among --centers; '' for none)")
    p.add_argument("--missing-rate", type=float, default=0.1, help="chance a phase is missing (default: 0.1)")
    p.add_argument("--preview", action="store_true", help="also write OUT/preview.png")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from simulations.phantoms import PhantomConfig, generate_liqa_tree

    centers = _names(args.centers)
    heldout = _names(args.heldout) if args.heldout is not None else [c for c in ("C",) if c in centers]
    bad = [c for c in centers + heldout if not _NAME.match(c)]
    if not centers or bad:
        print(f"--centers/--heldout: invalid center name(s) {bad or centers!r} (letters and digits only)", file=sys.stderr)
        return 2
    unknown = [c for c in heldout if c not in centers]
    if unknown:
        print(f"--heldout: {', '.join(unknown)} not among --centers {','.join(centers)}", file=sys.stderr)
        return 2
    if (args.cases < 1 or min(args.labeled, args.test_cases, args.validation_cases) < 0
            or not 0.0 <= args.missing_rate < 1.0):
        print("--cases must be >= 1, --labeled, --test-cases and --validation-cases >= 0, and --missing-rate "
              "in [0, 1)", file=sys.stderr)
        return 2
    config = PhantomConfig(centers=tuple(centers), cases=args.cases, labeled=args.labeled, seed=args.seed,
                           profile=args.profile, heldout=tuple(heldout), missing_rate=args.missing_rate,
                           preview=args.preview, test_cases=args.test_cases, validation_cases=args.validation_cases)
    summary = generate_liqa_tree(args.out, config)
    print(summary.format())
    return 0
