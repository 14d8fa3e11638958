"""`fedliver status --state DIR [--runs N]`: the coordinator's view of the federation.

Which hospitals are online, by site name (from the node ids `fedliver register` recorded in
<state>/sites.json, joined with `flwr supernode list --format json`), then the current run and
the last N runs: Flower's full status (`finished:failed`, ...), rounds done (from the run folder
`fedliver submit` recorded in <state>/runs.json) and elapsed time, as a plain table that is never
cut to the terminal's width. Exit status 1 when the SuperLink cannot be asked.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status",
        help="sites online (by name), the current run, its round and status",
        description=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--state", type=Path, required=True,
                        help="the SuperLink's state folder (as for fedliver superlink/register/submit)")
    parser.add_argument("--runs", type=int, default=5, help="how many of the newest runs to list (default 5)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from deploy.launch import LaunchError
    from deploy.status import format_status, gather_status

    state = args.state.expanduser().resolve()
    if not (state / "cli-home" / "config.toml").is_file():
        print(f"{state / 'cli-home' / 'config.toml'}: no connection to the SuperLink; "
              "run `fedliver register` with this --state first", file=sys.stderr)
        return 1
    try:
        status = gather_status(state)
    except LaunchError as err:
        print(" ".join(str(err).split())[-400:], file=sys.stderr)
        return 1
    print(format_status(status, runs=args.runs))
    return 0
