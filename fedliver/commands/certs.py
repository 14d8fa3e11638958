"""`fedliver certs OUT --san NAME_OR_IP ... --sites A,B1,B2,C [--days N] [--force]`.

Writes the federation's CA, the SuperLink's TLS certificate (SANs: the given names and IPs plus
localhost and 127.0.0.1) and one node-authentication key pair per site, with OUT/README.txt
saying which file goes where and which must stay secret. Refuses to overwrite without --force.
With --add-sites, only writes key pairs for new --sites into an existing OUT (same CA).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "certs",
        help="create the CA, the SuperLink TLS certificate and the sites' node keys",
        description=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("out", type=Path, metavar="OUT", help="output folder")
    parser.add_argument("--san", action="append", default=[], metavar="NAME_OR_IP",
                        help="a host name or IP address the sites dial to reach the SuperLink "
                             "(repeat, or comma-separate); localhost and 127.0.0.1 are always added")
    parser.add_argument("--sites", default="", metavar="A,B1,...",
                        help="comma-separated site ids; one key pair each")
    parser.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    parser.add_argument("--add-sites", action="store_true",
                        help="add key pairs for --sites to an existing OUT, keeping its CA and "
                             "SuperLink certificate")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from deploy.certs import (
        CertConfig, CertError, add_sites, enclosing_flower_app, generate_federation_certs,
        parse_list,
    )

    config = CertConfig(sans=parse_list(args.san), sites=parse_list(args.sites),
                        days=args.days, force=args.force)
    try:
        if args.add_sites:
            layout = add_sites(args.out, config.sites, force=args.force)
            print(f"added key pairs for {', '.join(config.sites)} under {layout.root / 'sites'}; "
                  "register them with `fedliver register --sites ...`")
            return 0
        layout = generate_federation_certs(args.out, config)
    except (CertError, FileExistsError) as err:
        print(err, file=sys.stderr)
        return 1
    if (app := enclosing_flower_app(layout.root)) is not None:
        print(f"warning: {layout.root}: inside the Flower app folder {app}; `flwr run` bundles "
              "that folder for every site: move the keys out, or make sure it is git-ignored",
              file=sys.stderr)
    if not config.sites:
        print("note: no --sites given, so no node keys were written", file=sys.stderr)
    print(f"wrote {layout.root} (CA, SuperLink certificate, {len(config.sites)} site key pairs); "
          f"read {layout.readme} for who gets which file")
    return 0
