"""`fedliver register --certs DIR --superlink HOST:PORT --state DIR [--sites A,B1,...]`.

Registers the sites' public keys (`sites/<SITE>/<site>.pub` under the output folder of
`fedliver certs`) with a running SuperLink that has node authentication on. Writes the TLS
connection "fedliver" into <state>/cli-home/config.toml (the same folder `fedliver superlink
--state` uses), then runs `flwr supernode register` per site. A key registered before is
reported, not an error. Exit status 1 when any registration failed. The node id each site got
is recorded in <state>/sites.json, so that `fedliver status` names the sites that are online.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "register",
        help="register the sites' public keys with the SuperLink (node authentication)",
        description=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--certs", type=Path, required=True, help="output folder of `fedliver certs`")
    parser.add_argument("--superlink", default="127.0.0.1:8000", metavar="HOST:PORT",
                        help="the SuperLink's address as seen from here (default 127.0.0.1:8000)")
    parser.add_argument("--state", type=Path, required=True,
                        help="the SuperLink's state folder (its cli-home/ gets the connection)")
    parser.add_argument("--sites", default="", metavar="A,B1,...",
                        help="sites to register (default: every site under CERTS/sites)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, do not run them")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from deploy.certs import CertLayout, parse_list
    from deploy.launch import (
        connection_toml, register_command, register_sites, write_connection_config,
    )
    from deploy.status import record_registrations

    layout = CertLayout(args.certs.expanduser().resolve())
    ca = layout.ca_cert if layout.ca_cert.is_file() else layout.server_ca
    home = args.state.expanduser().resolve() / "cli-home"
    sites = list(parse_list(args.sites)) or layout.sites()
    if not sites:
        print(f"{layout.root / 'sites'}: no site public keys found", file=sys.stderr)
        return 1
    if args.dry_run:
        print(f"# {home / 'config.toml'}\n{connection_toml(args.superlink, ca)}")
        for site in sites:
            print(register_command(layout.site_pub(site), home, node_name=site).shell())
        return 0
    if not ca.is_file():
        print(f"{ca}: CA certificate not found", file=sys.stderr)
        return 1
    path = write_connection_config(home, args.superlink, ca)
    print(f"connection 'fedliver' -> {args.superlink} written to {path}")
    failed = 0
    results = register_sites(layout, sites, home)
    record_registrations(home.parent, results, {site: layout.site_pub(site) for site in sites})
    for result in results:
        if result.node_id is not None:
            print(f"{result.site}: registered, node id {result.node_id}")
        elif result.already:
            print(f"{result.site}: already registered")
        else:
            failed += 1
            print(f"{result.site}: {result.message}", file=sys.stderr)
    print(f"check with: fedliver status --state {home.parent}")
    return 1 if failed else 0
