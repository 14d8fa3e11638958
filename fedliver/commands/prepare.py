"""`fedliver prepare DATA [--cache DIR] [--plans plans.json]`: build or refresh a site's prepared dataset.

The prepared dataset is what the site's ClientApp reads instead of re-reading its raw files every
message: the validated case index (each file's findings, kept by path, size and modification time),
the site fingerprint (per volume) and, with --plans, every volume preprocessed for those plans
(training, validation and test cases, as the messages ask for them). Run it again after files were
added or changed: only those are read. It prints what it read and what it found unchanged, then
every problem as one line `path: message`; exits 1 when the site has no usable case, 2 for an
unknown phase in --labeled-phases.

--cache must be the folder the site's SuperNode uses (node config `cache-dir`; by default
`<DATA>/../fedliver-cache-<site>`, the SuperNode's own default).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from common.run_config import default

    parser = subparsers.add_parser("prepare", help="build or refresh a site's prepared dataset (index, "
                                                   "fingerprint, preprocessed volumes)",
                                   description=__doc__.split("\n\n", 1)[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, metavar="DATA",
                        help="the site's data: a Vendor_<X> folder, a LiQA root (with --centers) or an nnU-Net raw dataset")
    parser.add_argument("--cache", type=Path, default=None, metavar="DIR",
                        help="the site's cache folder (default: DATA/../fedliver-cache-<site>)")
    parser.add_argument("--plans", type=Path, default=None, metavar="plans.json",
                        help="also preprocess every volume for these plans (a run folder's plans.json)")
    parser.add_argument("--site", default=None, help="the site's name (default: X of Vendor_X, else DATA's name)")
    parser.add_argument("--role", choices=("train", "eval"), default="train",
                        help="train: splits.json decides each case's use; eval (held-out): every case is a test case")
    parser.add_argument("--centers", type=lambda s: tuple(c for c in s.split(",") if c) or None, default=None,
                        help="comma-separated LiQA centers of a multi-vendor root that are this site's")
    parser.add_argument("--propagate-labels", action=argparse.BooleanOptionalAction,
                        default=bool(default("propagate-labels")),
                        help="prepare the labeled cases' other phases under their propagated mask, "
                             "as training with run config propagate-labels does (default: %(default)s)")
    parser.add_argument("--labeled-phases", default=str(default("labeled-phases")), metavar="auto|T2,GED4,...",
                        help="the phases whose masks are labels, as run config labeled-phases says "
                             "(default: %(default)s, every phase with a mask)")
    parser.set_defaults(run=run)


def _site_name(data: Path) -> str:
    from common.discovery import VENDOR_PREFIX

    return data.name.removeprefix(VENDOR_PREFIX) if data.name.startswith(VENDOR_PREFIX) else data.name


def run(args: argparse.Namespace) -> int:
    from client.site import SiteData, SiteIdentity
    from common.phases import parse_labeled_phases
    from common.problems import ValidationError

    data = args.data.expanduser().resolve()
    site = args.site or _site_name(data)
    cache = (args.cache or data.parent / f"fedliver-cache-{site}").expanduser().resolve()
    plans = None
    if args.plans is not None:
        try:
            plans = json.loads(args.plans.read_text())
        except (OSError, ValueError) as error:
            print(f"{args.plans}: cannot read plans ({' '.join(str(error).split())})", file=sys.stderr)
            return 1
    try:
        labeled = parse_labeled_phases(args.labeled_phases, "--labeled-phases")
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    identity = SiteIdentity(site=site, role=args.role, data_dir=data, cache_dir=cache,
                            output_dir=cache / "outputs", centers=args.centers)
    print(f"site {site} ({args.role}): {data} -> cache {cache}")
    try:
        prepared = SiteData(identity, labeled_phases=labeled).prepare(plans, propagate_labels=args.propagate_labels)
    except ValidationError as error:  # DATA is no dataset
        print(error, file=sys.stderr)
        return 1
    lines = prepared.summary()
    problems = len(prepared.problems)
    print("\n".join(lines[: len(lines) - problems]))
    for problem in prepared.problems:
        print(problem, file=sys.stderr)
    if not prepared.index.cases:
        print(f"{data}: no usable case", file=sys.stderr)
        return 1
    return 0
