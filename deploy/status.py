"""What the coordinator needs to see: which hospitals are online (by site name), and the runs.

Flower knows nodes by id only (`flwr supernode list` has no site names; the `--name` given at
registration is not listed). `fedliver register` therefore records, in the SuperLink's state
folder, which node id each site's public key got, and `fedliver submit` which run used which
settings file and run folder:

    <state>/sites.json   {"A": {"node-id": "123...", "public-key-sha256": "...", "registered-at": "..."}}
    <state>/runs.json    {"7": {"settings": "/srv/.../run.toml", "run-dir": "/srv/.../r1",
                                "sites": "A:train,...", "rounds": 5, "submitted-at": "..."}}

`gather_status` joins them with `flwr supernode list --format json` and `flwr ls --format json`;
`format_status` prints its own table (Flower's tables are cut to the terminal's width).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.atomic_write import atomic_write_json
from deploy.launch import (
    CONNECTION_NAME, QUIET_ENV, Command, LaunchError, Registration, _json_from, flower_executable, list_nodes,
    run_command,
)

SITES_FILE = "sites.json"
RUNS_FILE = "runs.json"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _write_json(path: Path, data: Mapping) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data, indent=1, sort_keys=True)


def key_fingerprint(public_key: Path) -> str:
    """SHA-256 of the key's base64 body (the comment after it does not count)."""
    parts = Path(public_key).read_text().split()
    return hashlib.sha256((parts[1] if len(parts) > 1 else "".join(parts)).encode()).hexdigest()


def record_registrations(state_dir: Path, results: Sequence[Registration],
                         public_keys: Mapping[str, Path]) -> Path:
    """Add the node ids of new registrations to `<state>/sites.json`. A key registered before
    keeps its entry (Flower does not tell its node id again); a replaced key gets the new id."""
    path = Path(state_dir) / SITES_FILE
    sites = _read_json(path)
    for result in results:
        if result.node_id is None:
            continue
        pub = public_keys.get(result.site)
        sites[result.site] = {"node-id": str(result.node_id), "registered-at": _now(),
                              "public-key-sha256": key_fingerprint(pub) if pub and pub.is_file() else ""}
    _write_json(path, sites)
    return path


def record_run(state_dir: Path, run_id: int, settings: Path, values: Mapping[str, object]) -> Path:
    path = Path(state_dir) / RUNS_FILE
    runs = _read_json(path)
    runs[str(run_id)] = {"settings": str(settings), "run-dir": str(values.get("run-dir", "")),
                         "sites": str(values.get("sites", "")), "rounds": values.get("num-server-rounds"),
                         "submitted-at": _now()}
    _write_json(path, runs)
    return path


def list_runs_command(flwr_home: Path, connection: str = CONNECTION_NAME, bin_dir: Path | None = None) -> Command:
    argv = [flower_executable("flwr", bin_dir), "ls", connection, "--format", "json"]
    return Command(tuple(argv), {"FLWR_HOME": str(flwr_home), **QUIET_ENV})


def list_runs(flwr_home: Path, bin_dir: Path | None = None) -> list[dict]:
    done = run_command(list_runs_command(flwr_home, bin_dir=bin_dir))
    data = _json_from(done.stdout)
    if not data.get("success"):
        raise LaunchError(f"flwr ls: {data.get('error-message') or done.stderr.strip() or 'no answer'}")
    return list(data.get("runs", []))


@dataclass(frozen=True)
class SiteStatus:
    site: str            # "" for a node no `fedliver register` recorded
    node_id: str
    status: str          # online | offline | registered | unregistered | not registered


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    status: str          # Flower's: pending, starting, running, finished:completed, finished:failed, ...
    elapsed: str
    round_done: int | None
    rounds: int | None
    run_dir: str
    details: str = ""


@dataclass(frozen=True)
class Status:
    sites: list[SiteStatus]
    runs: list[RunStatus] = field(default_factory=list)  # newest first


def _elapsed(seconds: object) -> str:
    try:
        total = int(float(seconds))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""
    return f"{total // 3600}h{total % 3600 // 60:02d}m{total % 60:02d}s" if total >= 3600 else \
        f"{total // 60}m{total % 60:02d}s"


def _round_done(run_dir: str) -> int | None:
    """Last complete round, from the run folder's server_state.json (None if not readable here)."""
    if not run_dir:
        return None
    state = _read_json(Path(run_dir) / "server_state.json")
    return int(state.get("last_round", 0)) if state or Path(run_dir).is_dir() else None


def combine(registry: Mapping[str, Mapping], nodes: Sequence[Mapping], runs: Sequence[Mapping],
            submitted: Mapping[str, Mapping]) -> Status:
    """The status from the records and Flower's JSON (kept apart from the I/O for testing)."""
    by_id = {str(n.get("node-id")): str(n.get("status", "")) for n in nodes}
    sites, named = [], set()
    for site, entry in sorted(registry.items()):
        node_id = str(entry.get("node-id", ""))
        named.add(node_id)
        sites.append(SiteStatus(site, node_id, by_id.get(node_id, "not registered")))
    sites += [SiteStatus("", node_id, status) for node_id, status in sorted(by_id.items())
              if node_id not in named and status != "unregistered"]
    ordered = sorted(runs, key=lambda r: str(r.get("pending-at") or ""), reverse=True)
    run_rows = []
    for run in ordered:
        run_id = str(run.get("run-id", ""))
        record = submitted.get(run_id, {})
        run_dir = str(record.get("run-dir", ""))
        rounds = record.get("rounds")
        run_rows.append(RunStatus(run_id, str(run.get("status", "")), _elapsed(run.get("elapsed")),
                                  _round_done(run_dir), int(rounds) if rounds is not None else None,
                                  run_dir, str(run.get("status-details") or "")))
    return Status(sites, run_rows)


def gather_status(state_dir: Path, bin_dir: Path | None = None) -> Status:
    state_dir = Path(state_dir)
    home = state_dir / "cli-home"
    return combine(_read_json(state_dir / SITES_FILE), list_nodes(home, bin_dir), list_runs(home, bin_dir),
                   _read_json(state_dir / RUNS_FILE))


def run_status(state_dir: Path, run_id: int, bin_dir: Path | None = None) -> RunStatus | None:
    """One run's status and round (one `flwr ls` call, no node list)."""
    state_dir = Path(state_dir)
    status = combine({}, [], list_runs(state_dir / "cli-home", bin_dir), _read_json(state_dir / RUNS_FILE))
    return next((r for r in status.runs if r.run_id == str(run_id)), None)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [line(header), line(["-" * w for w in widths]), *map(line, rows)]


def format_status(status: Status, runs: int = 5) -> str:
    """Plain text, never cut: the hospitals, then the newest runs."""
    online = [s.site or f"node {s.node_id}" for s in status.sites if s.status == "online"]
    lines = [f"sites online: {', '.join(online) if online else 'none'}"]
    lines += _table(["site", "status", "node id"],
                    [[s.site or "(unknown: not registered with fedliver register)", s.status, s.node_id]
                     for s in status.sites])
    lines.append("")
    if not status.runs:
        return "\n".join(lines + ["runs: none"])
    current = status.runs[0]
    progress = (f"round {current.round_done} of {current.rounds} done" if current.round_done is not None
                and current.rounds else "round unknown (run folder not readable here)")
    lines.append(f"current run: {current.run_id}, {current.status}, {progress}, {current.elapsed}")
    lines += _table(["run", "status", "rounds done", "elapsed", "run folder"],
                    [[r.run_id, r.status + (f" ({r.details})" if r.details else ""),
                      f"{r.round_done}/{r.rounds}" if r.round_done is not None and r.rounds else "?",
                      r.elapsed, r.run_dir or "(not submitted with fedliver submit)"]
                     for r in status.runs[:runs]])
    return "\n".join(lines)
