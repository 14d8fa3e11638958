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
    DEPLOYMENT_RUN_CONFIG, ProcessGroup, SuperLinkConfig, SuperNodeConfig, submit_run, wait_for_run,
)
from deploy.process import free_port, list_processes
from simulations.phantoms import PhantomConfig, generate_liqa_tree

pytestmark = pytest.mark.e2e

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


def test_two_rounds_over_tls_with_node_auth(tmp_path: Path) -> None:
    data = _phantoms(tmp_path / "data")
    certs = generate_federation_certs(tmp_path / "certs", CertConfig(sites=tuple(SITES)))
    link = SuperLinkConfig.from_certs(certs.root, tmp_path / "link", port=free_port())
    run_dir = tmp_path / "run"
    run_config = {
        "num-server-rounds": 2, "local-iterations": 2, "net-width": 2, "patch-size": "32,64,64",
        "evaluate-step": 1.0, "agreement-volumes": 1, "sites": ",".join(f"{s}:{r}" for s, r in SITES.items()),
        "run-dir": str(run_dir), "data-root": "", "node-wait": 120, "round-timeout": 300,
    }
    seen: set[int] = set()
    with ProcessGroup(tmp_path / "logs") as group:
        try:
            group.start_superlink(link, timeout=90)
            registrations = group.register(certs, list(SITES), link)
            assert all(r.node_id is not None for r in registrations), registrations
            for site, role in SITES.items():
                group.start_supernode(SuperNodeConfig(
                    site=site, role=role, data_dir=data[site], superlink=f"127.0.0.1:{link.port}",
                    ca_cert=certs.site_ca(site), private_key=certs.site_key(site),
                    state_dir=tmp_path / f"node-{site}", port=free_port()), wait_connected=True, timeout=90)
            run_id = submit_run(REPO_ROOT, link.cli_home, run_config)
            status = wait_for_run(run_id, link.cli_home, timeout=400, poll=5, watch=group.processes)
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
    assert set(report["final"]["centers"]) == set(SITES)
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
