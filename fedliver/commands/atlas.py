"""`fedliver atlas OUT`: an ATLAS-like public pretraining set (nnU-Net raw layout), optionally
multi-sequence (`--sequences T1CE,T1,T2,DWI`, as CHAOS / AMOS-MRI gather)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "atlas",
        help="write an ATLAS-like pretraining set (contrast-enhanced T1 with tumours, nnU-Net raw layout)",
        description="Write OUT/imagesTr/im<N>.nii.gz, OUT/labelsTr/lb<N>.nii.gz (0 background, 1 liver, "
                    "2 tumor) and OUT/dataset.json.",
    )
    p.add_argument("out", type=Path, help="output folder (created)")
    p.add_argument("--cases", type=int, default=8, help="number of cases (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--profile", choices=("demo", "full"), default="demo", help="grid size (default: demo)")
    p.add_argument("--sequences", default="T1CE",
                   help="comma-separated sequences per subject, of T1CE, T1, T2, DWI (default: T1CE, the "
                        "ATLAS-like set); more than T1CE writes ms<NNN><seq>_<CCCC>.nii.gz, one case per "
                        "subject and sequence")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from simulations.phantoms import generate_atlas_tree

    if args.cases < 1:
        print("--cases must be >= 1", file=sys.stderr)
        return 2
    sequences = [q.strip() for q in args.sequences.split(",") if q.strip()]
    try:
        out = generate_atlas_tree(args.out, args.cases, args.seed, args.profile, sequences)
    except ValueError as e:
        print(f"--sequences: {e}", file=sys.stderr)
        return 2
    print(f"public set: {args.cases} subjects x {', '.join(sequences)} in {out} (imagesTr/, labelsTr/, "
          f"dataset.json; labels 0 background, 1 liver, 2 tumor)")
    return 0
