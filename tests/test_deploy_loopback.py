"""Real Flower processes on loopback with the deployment setup: TLS with our CA, node
authentication with our site keys. A registered node connects; an unregistered node and a node
without the CA certificate are turned away (Flower logs exit code 305; the process exits 1)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from deploy.certs import CertConfig, CertLayout, generate_federation_certs
from deploy.launch import (
    Command, ProcessGroup, SuperLinkConfig, SuperNodeConfig, list_nodes, supernode_command,
)
from deploy.process import ManagedProcess, free_port, list_processes

pytestmark = pytest.mark.e2e


class Federation:
    def __init__(self, root: Path, group: ProcessGroup, certs: CertLayout,
                 link: SuperLinkConfig, link_proc: ManagedProcess, node_ids: dict[str, int]) -> None:
        self.root, self.group, self.certs = root, group, certs
        self.link, self.link_proc, self.node_ids = link, link_proc, node_ids

    def node_config(self, site: str, **kw: object) -> SuperNodeConfig:
        (self.root / "data" / site).mkdir(parents=True, exist_ok=True)
        return SuperNodeConfig(site=site, role="train", data_dir=self.root / "data" / site,
                               superlink=f"127.0.0.1:{self.link.port}",
                               ca_cert=self.certs.site_ca(site), private_key=self.certs.site_key(site),
                               state_dir=self.root / f"node-{site}", port=free_port(),
                               **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("loopback")
    certs = generate_federation_certs(root / "certs", CertConfig(sites=("A", "C")))
    link = SuperLinkConfig.from_certs(certs.root, root / "link", port=free_port())
    with ProcessGroup(root / "logs") as group:
        link_proc = group.start_superlink(link, timeout=90)
        (reg,) = group.register(certs, ["A"], link)  # C stays unregistered
        assert reg.node_id is not None, reg.message
        yield Federation(root, group, certs, link, link_proc, {"A": reg.node_id})
        trees = [p.tree() for p in group.processes]
    left = [pid for tree in trees for pid in tree
            if pid in list_processes() and list_processes()[pid].state != "Z"]
    assert not left, f"processes left after stop_all: {left}"


def _wait_exit(proc: ManagedProcess, timeout: float = 90.0) -> int:
    deadline = time.monotonic() + timeout
    while proc.running and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not proc.running, f"{proc.name} still running:\n{proc.log_tail()}"
    return proc.wait()


def test_registered_node_connects(federation: Federation) -> None:
    node = federation.group.start_supernode(federation.node_config("A"), wait_connected=True,
                                            timeout=90)
    assert f"SuperNode ID: {federation.node_ids['A']}" in node.log_text()
    status = {int(n["node-id"]): n["status"] for n in list_nodes(federation.link.cli_home)}
    assert status[federation.node_ids["A"]] == "online"
    assert node.running


def test_unregistered_node_is_rejected(federation: Federation) -> None:
    proc = federation.group.start_supernode(federation.node_config("C", max_retries=1))
    rc = _wait_exit(proc)
    log = proc.log_text()
    assert rc != 0
    assert "Exit Code: 305" in log and "Failed to activate SuperNode" in log
    assert "SuperNode ID:" not in log


def test_node_without_ca_certificate_cannot_connect(federation: Federation) -> None:
    # Registered key, but no --root-certificates: the system trust store does not know our CA.
    cmd = supernode_command(replace(federation.node_config("A", max_retries=1),
                                    state_dir=federation.root / "node-A-noca"))
    i = cmd.argv.index("--root-certificates")
    proc = federation.group.start("supernode-A-noca",
                                  Command(cmd.argv[:i] + cmd.argv[i + 2:], cmd.env, cmd.cwd))
    rc = _wait_exit(proc)
    log = proc.log_text()
    assert rc != 0
    assert "Exit Code: 305" in log and "CERTIFICATE_VERIFY_FAILED" in log
