"""Load probe for the SuperLink's state database: real processes, TLS, node authentication.

A SuperLink (state.db, or Flower's in-memory state), N registered SuperNodes and a tiny Flower app
whose ServerApp sends every node a message of as many arrays as the STU-Net pair has (each array
is one object: one HTTPS request and one state.db write), round after round, and polls for the
replies (every 0.2 s; `Grid.send_and_receive` polls every 3 s); the ClientApp sends each message
straight back. Busy processes stand in for sites that train on the same cores. It counts what
was lost: replies that never came, error replies, `database is locked` lines in the SuperLink's
log, SuperNodes that quit, and whether the run finished at all (the SuperExec dies when the
SuperLink answers it with HTTP 500).

    python -m deploy.state_probe [--flower-defaults] [--repeat 3] [--nodes 3 --rounds 2 --busy 4]
        [--database memory]

`--flower-defaults` starts `flower-superlink` exactly as Flower ships it (busy_timeout 5 s);
without it the SuperLink runs as `fedliver superlink` runs it (deploy/superlink_main.py).
The app itself is the module below (`serverapp`, `clientapp`), bundled from a generated folder.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

LOCKED = "database is locked"

# ----------------------------------------------------------------------------- the app
serverapp = ServerApp()
clientapp = ClientApp()


@clientapp.query()
def echo(msg: Message, context: Context) -> Message:
    return Message(msg.content, reply_to=msg)


@serverapp.main()
def probe_main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    nodes, rounds = int(cfg["probe-nodes"]), int(cfg["probe-rounds"])
    arrays, floats = int(cfg["probe-arrays"]), int(cfg["probe-floats"])
    timeout, out = float(cfg["probe-timeout"]), Path(str(cfg["probe-out"]))
    deadline = time.monotonic() + 120
    while len(node_ids := sorted(grid.get_node_ids())) < nodes and time.monotonic() < deadline:
        time.sleep(0.5)
    summary: dict = {"nodes": len(node_ids), "rounds": [], "errors": []}
    for r in range(rounds):
        started = time.monotonic()
        content = RecordDict({"x": ArrayRecord({f"a{i}": Array(np.full(floats, r * arrays + i, np.float32))
                                                for i in range(arrays)})})
        messages = [Message(content, node, "query", group_id=str(r)) for node in node_ids]
        pending = set(grid.push_messages(messages))
        ok = errors = 0
        until = time.monotonic() + timeout
        while pending and time.monotonic() < until:
            for reply in grid.pull_messages(pending):
                pending.discard(reply.metadata.reply_to_message_id)
                if reply.has_error():
                    errors += 1
                    summary["errors"].append(str(reply.error.reason)[-200:])
                else:
                    ok += 1
            time.sleep(0.2)  # the ServerApp polling (Flower's send_and_receive: every 3 s)
        summary["rounds"].append({"ok": ok, "error": errors, "missing": len(pending),
                                  "seconds": round(time.monotonic() - started, 1)})
        out.write_text(json.dumps(summary))


def app_folder(root: Path) -> Path:
    """A Flower app folder whose components are this module's `serverapp` and `clientapp`."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n\n'
        '[project]\nname = "stateprobe"\nversion = "0.1.0"\n\n'
        '[tool.flwr.app]\npublisher = "fedliver"\n\n'
        '[tool.flwr.app.components]\nserverapp = "deploy.state_probe:serverapp"\n'
        'clientapp = "deploy.state_probe:clientapp"\n\n'
        '[tool.flwr.app.config]\nprobe-nodes = 1\nprobe-rounds = 1\nprobe-arrays = 1\n'
        'probe-floats = 1\nprobe-timeout = 60.0\nprobe-out = ""\n')
    (root / "stateprobe.py").write_text('"""The components live in deploy/state_probe.py."""\n')
    return root


# ----------------------------------------------------------------------------- the driver
@dataclass(frozen=True)
class ProbeConfig:
    nodes: int = 3
    rounds: int = 2
    arrays: int = 262            # objects per message: the STU-Net pair's arrays
    floats: int = 1000           # 4 KB per array: the object count, not the bytes, loads the SuperLink
    busy: int = 4                # spinning processes standing in for training sites
    database: str = "file"       # "file" (state.db) or "memory" (Flower's in-memory state)
    flower_defaults: bool = False  # flower-superlink as shipped, without fedliver's settings
    round_timeout: float = 300.0
    run_timeout: float = 1200.0


@dataclass
class ProbeResult:
    status: str                  # the run's final status, or why it has none
    replies: int                 # echo replies received
    expected: int                # nodes x rounds
    error_replies: int
    missing: int                 # replies that never came within round_timeout
    locked_lines: int            # "database is locked" lines in the SuperLink's log
    nodes_exited: list[int]      # exit statuses of SuperNodes that quit (one HTTP 500 on a pull does it)
    superexec_died: bool         # the SuperLink's SuperExec raised (no ServerApp would start again)
    seconds: float

    @property
    def clean(self) -> bool:
        return (self.status == "finished:completed" and self.replies == self.expected
                and not self.locked_lines and not self.nodes_exited and not self.superexec_died)


@contextmanager
def _busy(count: int) -> Iterator[None]:
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def run_probe(root: Path, config: ProbeConfig) -> ProbeResult:
    """One probe run under `root` (certificates, state, logs); every process is stopped after."""
    from deploy.certs import CertConfig, generate_federation_certs
    from deploy.launch import ProcessGroup, SuperLinkConfig, SuperNodeConfig, run_command, wait_for_run
    from deploy.launch import flwr_run_command, parse_run_id
    from deploy.process import free_port

    started = time.monotonic()
    sites = tuple(f"P{i}" for i in range(config.nodes))
    certs = generate_federation_certs(root / "certs", CertConfig(sites=sites))
    link = SuperLinkConfig.from_certs(certs.root, root / "link", port=free_port(),
                                      persist_state=config.database == "file",
                                      flower_lock_wait=config.flower_defaults)
    out = root / "probe.json"
    run_config = {"probe-nodes": config.nodes, "probe-rounds": config.rounds,
                  "probe-arrays": config.arrays, "probe-floats": config.floats,
                  "probe-timeout": config.round_timeout, "probe-out": str(out)}
    status = "not started"
    with ProcessGroup(root / "logs") as group, _busy(config.busy):
        link_proc = group.start_superlink(link, timeout=90)
        registrations = group.register(certs, list(sites), link)
        if any(r.node_id is None for r in registrations):
            raise RuntimeError(f"registration failed: {registrations}")
        nodes = [group.start_supernode(SuperNodeConfig(
            site=site, role="train", data_dir=root, superlink=f"127.0.0.1:{link.port}",
            ca_cert=certs.site_ca(site), private_key=certs.site_key(site),
            state_dir=root / f"node-{site}", port=free_port())) for site in sites]
        for node in nodes:
            node.wait_for_log("SuperNode ID:", timeout=120)
        done = run_command(flwr_run_command(app_folder(root / "app"), link.cli_home, run_config,
                                            defaults={}), timeout=300)
        run_id = parse_run_id(done.stdout, done.stderr)
        status = wait_for_run(run_id, link.cli_home, timeout=config.run_timeout, status_every=5.0,
                              watch=[link_proc])
        link_log = link_proc.log_text()
        locked = link_log.count(LOCKED)
        superexec_died = "in flower_superexec" in link_log  # its traceback, in the SuperLink's log
        exited = [node.poll() for node in nodes if not node.running]
    summary = json.loads(out.read_text()) if out.is_file() else {"rounds": []}
    rounds = summary["rounds"]
    return ProbeResult(status=status, replies=sum(r["ok"] for r in rounds),
                       expected=config.nodes * config.rounds,
                       error_replies=sum(r["error"] for r in rounds),
                       missing=config.nodes * config.rounds - sum(r["ok"] + r["error"] for r in rounds),
                       locked_lines=locked, nodes_exited=exited, superexec_died=superexec_died,
                       seconds=round(time.monotonic() - started, 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.state_probe", description=__doc__.split("\n\n")[0])
    defaults = ProbeConfig()
    parser.add_argument("--nodes", type=int, default=defaults.nodes)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--arrays", type=int, default=defaults.arrays)
    parser.add_argument("--floats", type=int, default=defaults.floats)
    parser.add_argument("--busy", type=int, default=defaults.busy)
    parser.add_argument("--database", choices=("file", "memory"), default=defaults.database)
    parser.add_argument("--flower-defaults", action="store_true",
                        help="run flower-superlink as shipped (without fedliver's state-database settings)")
    parser.add_argument("--round-timeout", type=float, default=defaults.round_timeout,
                        help="seconds the ServerApp waits for one round's replies")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--keep", type=Path, default=None, help="keep each run's folder under this one")
    args = parser.parse_args(argv)
    # A plain `kill` would leave the SuperLink and SuperNodes (own sessions) running: clean up first.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    config = replace(defaults, nodes=args.nodes, rounds=args.rounds, arrays=args.arrays, floats=args.floats,
                     busy=args.busy, database=args.database, flower_defaults=args.flower_defaults,
                     round_timeout=args.round_timeout, run_timeout=max(defaults.run_timeout,
                                                                      2 * args.rounds * args.round_timeout))
    print(json.dumps(asdict(config)), flush=True)
    failed = 0
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="state-probe-") as tmp:
            root = (args.keep / f"run{i}") if args.keep else Path(tmp)
            result = run_probe(root, config)
        failed += not result.clean
        print(json.dumps({"repeat": i, **asdict(result), "clean": result.clean}), flush=True)
    print(f"{args.repeat - failed} of {args.repeat} runs clean", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
