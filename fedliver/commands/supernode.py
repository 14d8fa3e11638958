"""`fedliver supernode --site A --role train --data-dir DIR --superlink HOST:PORT --ca CA --key KEY`.

Runs a hospital's `flower-supernode` over TLS (`--root-certificates CA`) with node
authentication (`--auth-supernode-private-key KEY`) and `--node-config` carrying site, role,
data-dir and cache-dir for the ClientApp; its own FLWR_HOME (<state>/flwr-home) and local port;
telemetry and runtime dependency installation off. Prints the exact command first.

Before connecting it checks --data-dir (deploy/site_check.py, seconds): it refuses to start, with
one line and exit status 1, when the folder holds no usable case for --role, or several
Vendor_<X> folders (point --data-dir at this site's own vendor folder).
"""

from __future__ import annotations

import argparse
import shlex
import stat
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "supernode",
        help="run a hospital's Flower SuperNode with TLS and node authentication",
        description=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--site", required=True, help="site id, e.g. A")
    parser.add_argument("--role", choices=("train", "eval"), default="train",
                        help="train: joins training; eval: held-out center, evaluation only")
    parser.add_argument("--data-dir", type=Path, required=True,
                        help="this site's data: its Vendor_<X> folder (LiQA) or nnU-Net raw dataset folder")
    parser.add_argument("--superlink", required=True, metavar="HOST:PORT",
                        help="the coordinator's SuperLink, e.g. coordinator.example.org:8000")
    parser.add_argument("--ca", type=Path, required=True, help="ca.crt from the coordinator")
    parser.add_argument("--key", type=Path, required=True, help="this site's <site>.key (secret)")
    parser.add_argument("--state", type=Path, default=None,
                        help="folder for FLWR_HOME and the default cache "
                             "(default ~/.fedliver/supernode-<site>)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="preprocessing cache (default <state>/cache)")
    parser.add_argument("--port", type=int, default=9094,
                        help="local Runtime API port; distinct per node on one host (default 9094)")
    parser.add_argument("--max-retries", type=int, default=None,
                        help="give up after this many reconnection attempts (default: never)")
    parser.add_argument("--extra", action="append", default=[], metavar="ARGS",
                        help="more flower-supernode arguments, quoted as one string")
    parser.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    parser.add_argument("--device", default="",
                        help="where this site trains: auto, cpu, cuda or cuda:N (default: the run config's "
                             "`device`, auto); checked before connecting")
    parser.add_argument("--no-data-check", action="store_true",
                        help="connect without checking --data-dir first")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from deploy.launch import (
        LaunchError, SuperNodeConfig, missing_files, run_foreground, supernode_command,
    )

    # Not the working folder by default: inside the app folder `flwr run` would bundle it.
    state = args.state if args.state is not None else Path.home() / ".fedliver" / f"supernode-{args.site}"
    try:
        config = SuperNodeConfig(
            site=args.site, role=args.role, data_dir=args.data_dir.expanduser().resolve(),
            superlink=args.superlink, ca_cert=args.ca.expanduser().resolve(),
            private_key=args.key.expanduser().resolve(), state_dir=state.expanduser().resolve(),
            port=args.port, max_retries=args.max_retries,
            cache_dir=args.cache_dir.expanduser().resolve() if args.cache_dir else None,
            extra_args=tuple(a for extra in args.extra for a in shlex.split(extra)), device=args.device)
        command = supernode_command(config)
    except LaunchError as err:
        print(err, file=sys.stderr)
        return 2
    if args.device:
        from common.device import resolve_device

        try:
            resolve_device(args.device)  # a site asking for a GPU it lacks learns it now, not at round 1
        except ValueError as err:
            print(f"--device: {err}", file=sys.stderr)
            return 2
    if args.dry_run:
        print(command.shell(), flush=True)
        return 0
    problems = missing_files(config.files)
    if not config.data_dir.is_dir():
        problems.append(f"{config.data_dir}: data folder not found")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    if not args.no_data_check:
        from deploy.site_check import check_site_data

        check = check_site_data(config.data_dir, config.role)
        if not check.ok:
            print(f"not starting: {check.message}", file=sys.stderr)
            return 1
        print(f"data: {check.message}", flush=True)
    print(command.shell(), flush=True)
    if config.private_key.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(f"warning: {config.private_key}: readable by other users; run chmod 600 on it",
              file=sys.stderr)
    return run_foreground(command)
