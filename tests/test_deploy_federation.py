"""The whole federation in its deployment form, on loopback: a real `flower-superlink` with TLS and
node authentication, three real `flower-supernode`s (training sites A and B1, evaluate-only site
C, each with its own phantom data folder and its own registered key), and a 2-round run submitted
with `flwr run` exactly as the coordinator would (deployment defaults: fp16 transport).

Rejection of an unregistered node and of a node without the CA certificate is shown in
tests/test_deploy_loopback.py, against the same launcher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.stunet import build_stunet_from_plans
from common.weights import flatten, record_nbytes, to_arrayrecord
from deploy.certs import CertConfig, generate_federation_certs
from deploy.launch import (
    DEPLOYMENT_RUN_CONFIG, IN_MEMORY_DATABASE, LaunchError, ProcessGroup, SuperLinkConfig,
    SuperNodeConfig, flwr_run_command, parse_run_id, parse_run_status, submit_run,
    superlink_command, wait_for_run,
)
from deploy.process import free_port, list_processes
from simulations.phantoms import PhantomConfig, generate_liqa_tree

REPO_ROOT = Path(__file__).resolve().parents[1]
SITES = {"A": "train", "B1": "train", "C": "eval"}


def _phantoms(root: Path) -> dict[str, Path]:
    """One data folder per hospital: 2 cases (1 labeled) at A and B1, 1 fully labeled case at C."""
    folders = {}
    for site, role in SITES.items():
        folders[site] = root / site
        generate_liqa_tree(folders[site], PhantomConfig(
            centers=(site,), cases=2 if role == "train" else 1, labeled=1, seed=0, profile="demo",
            heldout=(site,) if role == "eval" else ()))
    return folders


def _alive(pids: set[int]) -> list[int]:
    procs = list_processes()
    return sorted(p for p in pids if p in procs and procs[p].state != "Z")


@pytest.mark.e2e
def test_two_rounds_over_tls_with_node_auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two sites train at once on a 2-core runner: one torch thread per ClientApp (inherited).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = _phantoms(tmp_path / "data")
    certs = generate_federation_certs(tmp_path / "certs", CertConfig(sites=tuple(SITES)))
    # In-memory SuperLink state: with state.db, Flower 1.42's SQLite store gave up on its 5 s lock
    # wait ("database is locked", HTTP 500) while the nodes trained on this shared 2-core
    # machine, and a site's reply was lost or the SuperExec died (docs/deploy.md, Troubleshooting).
    # The persisted state itself is exercised by tests/test_deploy_loopback.py.
    link = SuperLinkConfig.from_certs(certs.root, tmp_path / "link", port=free_port(), persist_state=False)
    run_dir = tmp_path / "run"  # absolute: the ServerApp runs in the SuperLink's state folder
    run_config = {
        "num-server-rounds": 2, "local-iterations": 2, "net-width": 2, "patch-size": "32,64,64",
        "evaluate-step": 1.0, "agreement-volumes": 1, "sites": ",".join(f"{s}:{r}" for s, r in SITES.items()),
        "run-dir": str(run_dir), "data-root": "",
        # Only the held-out centre evaluates: every evaluation is one more ClientApp process.
        "evaluate-train-sites": False, "node-wait": 120, "round-timeout": 240,
    }
    seen: set[int] = set()
    with ProcessGroup(tmp_path / "logs") as group:
        try:
            group.start_superlink(link, timeout=90)
            registrations = group.register(certs, list(SITES), link)
            assert all(r.node_id is not None for r in registrations), registrations
            nodes = [group.start_supernode(SuperNodeConfig(
                site=site, role=role, data_dir=data[site], superlink=f"127.0.0.1:{link.port}",
                ca_cert=certs.site_ca(site), private_key=certs.site_key(site),
                state_dir=tmp_path / f"node-{site}", port=free_port())) for site, role in SITES.items()]
            for node in nodes:
                node.wait_for_log("SuperNode ID:", timeout=90)  # the SuperLink accepted its key
            run_id = submit_run(REPO_ROOT, link.cli_home, run_config)
            # `flwr ls` costs ~2 s of CPU: ask every minute, and every second once the report exists.
            status = wait_for_run(run_id, link.cli_home, timeout=600, status_every=60,
                                  watch=group.processes, ready=(run_dir / "report.json").exists)
            logs = "\n".join(f"--- {p.name}\n{p.log_tail(40)}" for p in group.processes)
            assert status == "finished:completed", f"run {run_id}: {status}\n{logs}"
        finally:
            for proc in group.processes:
                seen |= proc.tree()
    # ProcessGroup stopped the SuperLink, the SuperNodes and everything they spawned.
    assert not _alive(seen), f"processes left after stop_all: {_alive(seen)}"

    report = json.loads((run_dir / "report.json").read_text())
    assert [entry["round"] for entry in report["rounds"]] == [1, 2]
    assert report["heldout_centers"] == ["C"]
    assert set(report["final"]["centers"]) == {"C"}
    heldout = report["final"]["centers"]["C"]
    assert "GED4" in heldout and len(heldout) >= 2, heldout  # C is evaluated on every phase it has
    for scores in heldout.values():
        assert 0.0 <= scores["dice"] <= 1.0 and scores["hd95"] >= 0.0
    for entry in report["rounds"]:
        assert sorted(entry["train"]) == ["A", "B1"] and not entry["rejected"], entry
    # The deployment default: both branches travelled as float16, both ways.
    assert DEPLOYMENT_RUN_CONFIG["fp16-transport"] is True
    assert report["config"]["fp16_transport"] == "True"
    plans = json.loads((run_dir / "plans.json").read_text())
    pair = flatten({name: build_stunet_from_plans(plans).state_dict() for name in ("a", "b")})
    fp16_bytes = record_nbytes(to_arrayrecord(pair, fp16=True))
    assert fp16_bytes < 0.6 * record_nbytes(to_arrayrecord(pair))
    for entry in report["rounds"]:
        assert entry["bytes"]["to-each-node"] == fp16_bytes
        assert entry["bytes"]["from-node"] == {"A": fp16_bytes, "B1": fp16_bytes}


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
