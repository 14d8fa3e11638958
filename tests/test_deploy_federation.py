"""The deployment launcher's pieces, fast: the `flwr run` command and its deployment defaults
(float16 transport), parsing Flower's JSON output, the SuperLink's state database setting, and
why that setting exists: Flower 1.42's SQLite state gives up on a held write lock after 5 s
("database is locked", an HTTP 500 that makes a SuperNode quit or the SuperExec die); the
SuperLink we launch waits 60 s (deploy/superlink_main.py, docs/deploy.md *The state database*).

Whole federations through real processes (TLS, node authentication, state.db) run elsewhere:
tests/test_deploy_guide.py executes docs/deploy.md (three hospitals, one round, report.json with
the held-out centre's scores and the float16 bytes each way), tests/test_faults.py kills a
SuperNode and the SuperLink mid-round and takes a site's data away (three rounds and a resume),
tests/test_deploy_loopback.py turns away unregistered and CA-less nodes."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from deploy.launch import (
    DEPLOYMENT_RUN_CONFIG, IN_MEMORY_DATABASE, LaunchError, SuperLinkConfig, flwr_run_command,
    parse_run_id, parse_run_status, superlink_command, superlink_launch_command,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- fast checks
def test_run_command_defaults_to_fp16_and_parses_back_through_flower(tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args

    cmd = flwr_run_command(tmp_path / "app", tmp_path / "home",
                           {"run-dir": str(tmp_path / "r 1"), "num-server-rounds": 3})
    assert cmd.argv[1:4] == ("run", str(tmp_path / "app"), "fedliver")
    assert cmd.env["FLWR_HOME"] == str(tmp_path / "home")
    assert cmd.env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    parsed = parse_config_args([cmd.argv[cmd.argv.index("--run-config") + 1]])
    assert parsed == {"fp16-transport": True, "run-dir": str(tmp_path / "r 1"), "num-server-rounds": 3}
    # An explicit value wins over the deployment default; no defaults leaves pyproject's.
    off = flwr_run_command(tmp_path, tmp_path, {"fp16-transport": False})
    assert parse_config_args([off.argv[-1]]) == {"fp16-transport": False}
    assert "--run-config" not in flwr_run_command(tmp_path, tmp_path, defaults={}).argv


def test_deployment_defaults_are_run_config_keys() -> None:
    import tomllib

    keys = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(DEPLOYMENT_RUN_CONFIG) <= set(keys)  # flwr run refuses unknown keys


def test_parse_run_output() -> None:
    assert parse_run_id('{"success": true, "run-id": 42}') == 42
    with pytest.raises(LaunchError, match="flwr run: .*connection refused"):
        parse_run_id('{"success": false, "error-message": "x\nconnection refused"}')
    with pytest.raises(LaunchError, match="boom"):
        parse_run_id("", "boom")
    listed = '{"success": true, "runs": [{"run-id": 42, "status": "finished:completed"}]}'
    assert parse_run_status("some log line\n" + listed) == "finished:completed"
    assert parse_run_status('{"success": true, "runs": []}') == ""
    assert parse_run_status("not json") == ""


def test_in_memory_state_flag(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    persisted = superlink_command(SuperLinkConfig.from_certs(certs, tmp_path / "s")).argv
    memory = superlink_command(SuperLinkConfig.from_certs(certs, tmp_path / "s", persist_state=False)).argv
    assert persisted[persisted.index("--database") + 1] == str(tmp_path / "s" / "state.db")
    assert memory[memory.index("--database") + 1] == IN_MEMORY_DATABASE


# ----------------------------------------------------------------------------- state database
def _write_under_held_lock(db: Path, hold_s: float) -> tuple[float, str]:
    """Flower's SQLite object store (the SuperLink's state.db, WAL, Flower's connect pragmas as
    installed now) writes while another connection holds the write lock for `hold_s` seconds, the
    way one message push holds it (docs/deploy.md, The state database). Seconds taken, error text."""
    import sqlite3
    import threading
    import time

    from flwr.supercore.object_store.sql_object_store import SqlObjectStore
    from sqlalchemy.exc import OperationalError

    store = SqlObjectStore(str(db))
    store.initialize()
    locked = threading.Event()

    def hold() -> None:
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the write lock, as a long transaction holds it
        locked.set()
        time.sleep(hold_s)
        holder.execute("COMMIT")
        holder.close()

    thread = threading.Thread(target=hold)
    thread.start()
    locked.wait(10)
    started = time.monotonic()
    try:
        store.clear()  # a write: Flower's object-store mutation lock row, then deletes
        error = ""
    except OperationalError as err:
        error = str(err).splitlines()[0]
    elapsed = time.monotonic() - started
    thread.join()
    return elapsed, error


def _guide_block(tag: str) -> str:
    text = (REPO_ROOT / "docs" / "deploy.md").read_text()
    start = text.index(f"<!-- guide-test: {tag} -->")
    body = text[text.index("\n", text.index("```", start)) + 1:]
    return textwrap.dedent(body[:body.index("```")])


def test_state_db_lock_wait_flower_gives_up_after_5_s_ours_waits(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time

    from flwr.supercore import constant, sql_mixin
    from sqlalchemy.exc import OperationalError

    from deploy.superlink_main import BUSY_TIMEOUT_S, sqlite_pragmas

    # As Flower ships it, the guide's reproduction: "database is locked" after its 5 s busy_timeout
    # (an HTTP 500 at the SuperLink) while another writer holds the lock for 10 s.
    assert dict(constant.SQLITE_PRAGMAS)["busy_timeout"] == "5000"
    code = _guide_block("state-db-repro").replace("/tmp/state.db", str(tmp_path / "flower.db"))
    threads = set(threading.enumerate())
    started = time.monotonic()
    with pytest.raises(OperationalError, match="database is locked"):
        exec(compile(code, "docs/deploy.md (state-db-repro)", "exec"), {})
    assert time.monotonic() - started > 5.0  # it did wait its 5 s (the holder keeps the lock 10 s)
    # What `fedliver superlink` / ProcessGroup install in the SuperLink (deploy/superlink_main.py).
    pragmas = sqlite_pragmas()
    # Longer than Flower's 30 s HTTP client timeout: a client retries a timeout, not an HTTP 500.
    assert dict(pragmas)["busy_timeout"] == str(int(BUSY_TIMEOUT_S * 1000)) and BUSY_TIMEOUT_S > 30
    assert [k for k, _ in pragmas] == [k for k, _ in constant.SQLITE_PRAGMAS]  # only that one changed
    monkeypatch.setattr(constant, "SQLITE_PRAGMAS", pragmas)
    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", pragmas)
    elapsed, error = _write_under_held_lock(tmp_path / "ours.db", hold_s=6.5)
    assert not error and elapsed >= 6.0, (elapsed, error)
    for thread in set(threading.enumerate()) - threads:
        thread.join()  # the guide block's lock holder


def test_launch_command_runs_the_superlink_with_the_longer_lock_wait(tmp_path: Path) -> None:
    import sys

    certs = tmp_path / "certs"
    flower = superlink_command(SuperLinkConfig.from_certs(certs, tmp_path / "s"))
    ours = superlink_launch_command(SuperLinkConfig.from_certs(certs, tmp_path / "s"))
    assert ours.argv[:3] == (sys.executable, "-m", "deploy.superlink_main")
    assert ours.argv[3:] == flower.argv[1:] and ours.env == flower.env and ours.cwd == flower.cwd
    # In-memory state has no SQLite file; the reproduction runs Flower's SuperLink as shipped.
    for config in (SuperLinkConfig.from_certs(certs, tmp_path / "s", persist_state=False),
                   SuperLinkConfig.from_certs(certs, tmp_path / "s", flower_lock_wait=True)):
        assert superlink_launch_command(config).argv[0].endswith("flower-superlink")


@pytest.mark.e2e
def test_held_state_lock_kills_flowers_superexec_and_node_not_ours(tmp_path: Path) -> None:
    """The failure as it happens in deployment, deterministically: while another connection holds
    state.db's write lock for 12 s (as one message push did under load), Flower's SuperLink answers
    the SuperExec's and the SuperNode's next write with HTTP 500; the SuperExec dies (no ServerApp
    would start again) and the SuperNode quits. The SuperLink as we launch it waits."""
    import sqlite3
    import time

    from deploy.certs import CertConfig, generate_federation_certs
    from deploy.launch import ProcessGroup, SuperNodeConfig
    from deploy.process import free_port

    certs = generate_federation_certs(tmp_path / "certs", CertConfig(sites=("A", "B1")))
    links = {name: SuperLinkConfig.from_certs(certs.root, tmp_path / name, port=free_port(),
                                              flower_lock_wait=name == "flower") for name in ("flower", "ours")}
    site = {"flower": "A", "ours": "B1"}
    with ProcessGroup(tmp_path / "logs") as group:
        procs = {name: group.start_superlink(link, timeout=120, name=f"superlink-{name}")
                 for name, link in links.items()}
        for name, link in links.items():
            (registration,) = group.register(certs, [site[name]], link)
            assert registration.node_id is not None, registration.message
        nodes = {name: group.start_supernode(SuperNodeConfig(
            site=site[name], role="train", data_dir=tmp_path, superlink=f"127.0.0.1:{link.port}",
            ca_cert=certs.site_ca(site[name]), private_key=certs.site_key(site[name]),
            state_dir=tmp_path / f"node-{name}", port=free_port())) for name, link in links.items()}
        for node in nodes.values():
            node.wait_for_log("SuperNode ID:", timeout=120)
        holders = [sqlite3.connect(link.database, isolation_level=None) for link in links.values()]
        for holder in holders:
            holder.execute("BEGIN IMMEDIATE")
        time.sleep(12.0)
        for holder in holders:
            holder.execute("COMMIT")
            holder.close()
        time.sleep(3.0)
        logs = {name: proc.log_text() for name, proc in procs.items()}
        node_logs = {name: node.log_text() for name, node in nodes.items()}
    assert "database is locked" in logs["flower"] and "in flower_superexec" in logs["flower"], logs["flower"][-3000:]
    assert "500 Internal Server Error" in node_logs["flower"], node_logs["flower"][-2000:]  # then it quits
    assert "database is locked" not in logs["ours"] and "Traceback" not in logs["ours"], logs["ours"][-3000:]
    assert "Server error" not in node_logs["ours"] and "terminated" not in node_logs["ours"], node_logs["ours"][-2000:]
