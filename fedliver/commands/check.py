"""`fedliver check DATA_DIR [--centers A,B1]`: index a site's data, validate every file, report.

Prints the case index summary (per center: cases, stages, images and masks per phase, and the
train / validation / test split sizes its splits.json gives) and every problem as one line
`path: message`; exits 1 when there was any problem (or DATA_DIR is no dataset), 0 when every file
is usable.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check",
        help="index a site's data (LiQA or nnU-Net raw layout) and validate every file",
        description=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("data_dir", type=Path, metavar="DATA_DIR",
                        help="a LiQA root, a Vendor_<X> folder, or an nnU-Net raw dataset folder")
    parser.add_argument("--centers", type=lambda s: [c for c in s.split(",") if c], default=None,
                        help="comma-separated centers to check, e.g. A,B1 (LiQA layout)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from common.discovery import index_dataset
    from common.validation import ValidationError

    try:
        index = index_dataset(args.data_dir, centers=args.centers, validate=True)
    except ValidationError as e:
        print(e, file=sys.stderr)
        return 1
    print(index.summary())
    return 1 if index.problems else 0
