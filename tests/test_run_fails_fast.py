"""A simulation that can never start fails in seconds with one line saying what to do: too few
nodes for run config `sites` (`flwr run .` alone starts Flower's default 2 nodes for 4 sites), an
empty `data-root`, a site folder that does not exist. A deployed node without data still sits out
while the run goes on (tests/test_deploy_guide.py, tests/test_faults.py)."""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.metadata import Metadata

from client.client_app import app as client_app
from common.federation_config import FederationConfig
from inprocess_grid import InProcessGrid
from server.federation import Federation
from server.messaging import CannotStart, simulation_cannot_start

DEFAULT_SITES = ["A", "B1", "B2", "C"]  # pyproject's `sites`
HINT = "to run: `make demo`"


def _reply(site: str, *, error: str = "", partitions: int | None = None) -> Message:
    identity = {"site": site, "role": "train", **({"error": error} if error else {})}
    content = RecordDict({"identity": ConfigRecord(identity), "counts": MetricRecord({"cases": 0 if error else 3})})
    if partitions is not None:
        content["simulation"] = MetricRecord({"partition-id": 0, "num-partitions": partitions})
    metadata = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=1, dst_node_id=0, reply_to_message_id="x",
                        group_id="identify", created_at=time.time(), ttl=60.0, message_type="query.identify")
    return Message(content=content, metadata=metadata)


# --------------------------------------------------------------------------- the decision alone
def test_a_simulation_with_fewer_nodes_than_sites_can_never_start():
    reason = simulation_cannot_start({1: _reply("A", partitions=2)}, DEFAULT_SITES)
    assert reason is not None and "\n" not in reason
    assert reason.startswith("the simulation has 2 nodes and run config 'sites' names 4 (A, B1, B2, C); " + HINT)
    assert "--federation-config \"num-supernodes=4\"" in reason and "data-root=" in reason


def test_a_simulation_with_a_node_per_site_may_start():
    assert simulation_cannot_start({1: _reply("A", partitions=4), 2: _reply("B1", partitions=4)}, DEFAULT_SITES) is None


def test_a_simulated_site_without_data_stops_the_run_naming_the_sites():
    replies = {1: _reply("A", error="no data", partitions=4), 2: _reply("B2", error="no data", partitions=4),
               3: _reply("B1", error="other", partitions=4)}
    reason = simulation_cannot_start(replies, DEFAULT_SITES)
    assert reason is not None and reason.startswith("sites A, B2: no data; site B1: other; " + HINT), reason
    assert "the simulation has" not in reason  # 4 nodes for 4 sites


def test_an_extra_partition_without_a_site_does_not_stop_the_run():
    replies = {1: _reply("partition 4", error="partition 4 has no site", partitions=5), 2: _reply("A", partitions=5)}
    assert simulation_cannot_start(replies, DEFAULT_SITES) is None


def test_deployed_nodes_are_never_judged():
    """No `simulation` record: a hospital's node without data sits out, however few nodes are connected."""
    assert simulation_cannot_start({1: _reply("A", error="no data")}, DEFAULT_SITES) is None


# --------------------------------------------------------------------------- the ServerApp's side
def _identify(tmp_path: Path, nodes: list[dict], data_root: str) -> tuple[str, float, list[str]]:
    values = {"data-root": data_root, "run-dir": str(tmp_path / "run")}  # `sites` and node-wait: the defaults
    log: list[str] = []
    federation = Federation(InProcessGrid(client_app, nodes, values), FederationConfig.from_run_config(values),
                            log=log.append)
    started = time.monotonic()
    with pytest.raises(CannotStart) as error:
        federation.identify_nodes()
    return str(error.value), time.monotonic() - started, log


def test_flowers_default_two_nodes_fail_at_once_with_the_hint(tmp_path):
    nodes = [{"partition-id": i, "num-partitions": 2} for i in range(2)]
    line, seconds, log = _identify(tmp_path, nodes, "")
    assert seconds < 20  # node-wait is 300 s
    assert log[-1] == f"cannot start: {line}"
    assert line.startswith("the simulation has 2 nodes and run config 'sites' names 4 (A, B1, B2, C); "
                           "sites A, B1: run config 'data-root' is empty"), line
    assert HINT in line and "\n" not in line


def test_a_missing_site_folder_fails_the_simulation_at_once(tmp_path):
    from simulations.phantoms import PhantomConfig, generate_liqa_tree

    root = tmp_path / "phantoms"
    generate_liqa_tree(root, PhantomConfig(centers=("A", "B1", "C"), cases=1, labeled=1, seed=0, profile="demo",
                                           heldout=("C",)))  # no Vendor_B2
    nodes = [{"partition-id": i, "num-partitions": 4} for i in range(4)]
    line, seconds, _ = _identify(tmp_path, nodes, str(root))
    assert seconds < 30
    assert line.startswith("site B2: ") and "no Vendor_B2 folder" in line and HINT in line, line


# --------------------------------------------------------------------------- through real Flower
def _flwr_run_alone(tmp_path: Path, num_supernodes: int) -> tuple[str, dict, float]:
    """`flwr run . --stream` as a new user types it, against a local simulation SuperLink of
    `num_supernodes` nodes: (its output, the run as `flwr ls` lists it, seconds until it returned)."""
    from deploy.launch import flower_executable, run_command, run_status_command
    from deploy.process import ManagedProcess, free_port
    from simulations.runner import REPO_ROOT, SimulationSpec, flower_env, write_connection

    flwr_home, port = tmp_path / "flwr_home", free_port()
    write_connection(flwr_home, port, SimulationSpec(run_dir=tmp_path, run_config={}, num_supernodes=num_supernodes,
                                                     gpus_per_node=0))
    env = flower_env(flwr_home)
    argv = [flower_executable("flower-superlink"), "--insecure", "--simulation",
            "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port)]
    superlink = ManagedProcess("flower-superlink", argv, tmp_path / "superlink.log", env=env, cwd=tmp_path)
    try:
        superlink.start().wait_for_port("127.0.0.1", port, timeout=60)
        argv = [flower_executable("flwr"), "run", ".", "--stream"]
        started = time.monotonic()
        done = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace",
                              timeout=120)
        seconds = time.monotonic() - started
        output = done.stdout + done.stderr
        run_id = int(re.search(r"Successfully started run (\d+)", output).group(1))
        listed = run_command(run_status_command(run_id, flwr_home)).stdout
        (run,) = json.loads(listed[listed.index("{"):])["runs"]
        return output, run, seconds
    finally:
        superlink.stop(timeout=10)


# node-wait is 300 s: a run that waited for the missing sites would take that long. Here the time is
# Flower's (bundle, Ray, one ClientApp process): 35-50 s on 2 shared cores, hence the margin.
MAX_SECONDS = 90


def _the_line(output: str, run: dict) -> str:
    lines = [line for line in output.splitlines() if "[server] cannot start:" in line]
    assert len(lines) == 1, output[-3000:]
    assert run["status"] == "finished:failed", run
    reason = lines[0].split("[server] cannot start: ", 1)[1]
    assert reason in run["status-details"], run  # also what `flwr ls` says, for `flwr run .` without --stream
    return reason


@pytest.mark.e2e
def test_flwr_run_alone_says_in_one_line_how_to_run(tmp_path):
    output, run, seconds = _flwr_run_alone(tmp_path, num_supernodes=2)  # Flower's default simulation
    reason = _the_line(output, run)
    assert reason.startswith("the simulation has 2 nodes and run config 'sites' names 4 (A, B1, B2, C); "), reason
    assert HINT in reason and "--federation-config \"num-supernodes=4\"" in reason, reason
    assert seconds < MAX_SECONDS, seconds


@pytest.mark.e2e
def test_an_empty_data_root_fails_a_full_simulation_in_seconds(tmp_path):
    output, run, seconds = _flwr_run_alone(tmp_path, num_supernodes=4)
    reason = _the_line(output, run)
    assert "run config 'data-root' is empty" in reason and "the simulation has" not in reason, reason
    assert HINT in reason
    assert seconds < MAX_SECONDS, seconds
