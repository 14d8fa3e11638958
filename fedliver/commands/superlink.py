"""`fedliver superlink --certs DIR --state DIR [--host 127.0.0.1] [--port 8000] [--dry-run]`.

Runs `flower-superlink` with TLS (the certificates from `fedliver certs`), SuperNode
authentication, a persisted state database (<state>/state.db), its own FLWR_HOME
(<state>/superlink-home), telemetry and runtime dependency installation off. The ServerApp runs
inside the SuperLink process tree, in the state folder. With state.db it starts Flower's
SuperLink through `python -m deploy.superlink_main`, which waits up to 60 s for the database's
write lock instead of 5 s (docs/deploy.md, The state database). Prints the exact command first.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "superlink",
        help="run the coordinator's Flower SuperLink with TLS and node authentication",
        description=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--certs", type=Path, required=True,
                        help="output folder of `fedliver certs` (or its superlink/ folder)")
    parser.add_argument("--state", type=Path, required=True,
                        help="folder for the state database, FLWR_HOME and the CLI connection")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0: all interfaces; default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000,
                        help="Fleet + Control + Runtime API port (default 8000)")
    parser.add_argument("--extra", action="append", default=[], metavar="ARGS",
                        help="more flower-superlink arguments, e.g. --extra '--log-file x.log'")
    parser.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from deploy.launch import (
        LaunchError, SuperLinkConfig, missing_files, run_foreground, superlink_launch_command,
        write_connection_config,
    )

    try:
        config = SuperLinkConfig.from_certs(
            args.certs, args.state, host=args.host, port=args.port,
            extra_args=tuple(a for extra in args.extra for a in shlex.split(extra)))
        command = superlink_launch_command(config)
    except LaunchError as err:
        print(err, file=sys.stderr)
        return 2
    print(command.shell(), flush=True)
    if args.dry_run:
        return 0
    if problems := missing_files(config.files):
        print("\n".join(problems), file=sys.stderr)
        return 1
    # The operator's `flwr` CLI on this host reaches the SuperLink over TLS through this file.
    local = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    path = write_connection_config(config.cli_home, f"{local}:{config.port}", config.ca_cert)
    print(f"flwr CLI connection 'fedliver' written to {path} (use FLWR_HOME={config.cli_home})",
          flush=True)
    return run_foreground(command)
