"""Faults a federation across hospitals must survive, through real processes on loopback.

One federation in its deployment form (a `flower-superlink` with TLS, node authentication and
its state in state.db, started as `fedliver superlink` starts it; two training hospitals A and B1,
each a real `flower-supernode` with its own registered key and phantom data folder) runs a
2-round run submitted with `flwr run` (small plans given, so no round 0), and the faults happen
to it one after the other:

1. round 1: B1's SuperNode is killed with SIGKILL (with everything it spawned) while it trains.
   The round goes on with A's update; report.json names B1 under the round's `missing`. Flower
   declares the dead node unavailable once its heartbeat expires (30 s interval x patience 2),
   which ends the round before `round-timeout`; a SuperNode restarted with B1's key is refused
   until then, and is accepted after. The ServerApp waits for it at the start of round 2, and
   B1 trains in round 2.
2. round 2, while its messages go out: the SuperLink is killed with SIGKILL, and with it its
   SuperExec and the ServerApp. Restarted on the same state folder (registrations survive in state.db; the
   SuperNodes reconnect by themselves) and the run submitted again, the ServerApp resumes after
   round 1 with the same numbering, from the round-1 checkpoint whose manifest hash was taken
   before the kill; round 1 in report.json is the one written before.
3. between rounds, once A has answered the resumed run: A's data folder disappears. A's round-2
   reply is an error the ServerApp logs with A's name (`WARNING site A (node ...): train failed:
   ...Vendor_A: no such folder`); round 2 goes on with B1, and A's SuperNode keeps running.

The SuperLink's longer wait for state.db's lock (deploy/superlink_main.py) is what lets this
run on state.db at all on shared cores (tests/test_deploy_federation.py shows Flower's own).
Every message carries STU-Net's ~260 arrays, one HTTPS request and one state.db write each:
that, not training, sets how long a round takes here.

The scenario runs once (module fixture); each test checks one fault, with the timings printed.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from common.planning import default_test_plans, write_plans
from deploy.certs import CertConfig, generate_federation_certs
from deploy.launch import (
    CONNECTION_NAME, QUIET_ENV, Command, ProcessGroup, SuperLinkConfig, SuperNodeConfig, flower_executable,
    run_command, submit_run, wait_for_run,
)
from deploy.process import ManagedProcess, free_port, list_processes
from simulations.phantoms import PhantomConfig, generate_liqa_tree

pytestmark = pytest.mark.faults

REPO_ROOT = Path(__file__).resolve().parents[1]
SITES = ("A", "B1")
# Well above Flower's heartbeat expiry (up to 60 s after the last heartbeat), which ends the killed
# node's round; a healthy site must never hit it, even on cores shared with other work.
ROUND_TIMEOUT = 300
# Hang guards only: how long the test waits for one step before it fails.
STEP_LIMIT = 900
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _log(proc: ManagedProcess) -> str:
    return ANSI.sub("", proc.log_text())


def _in_order(text: str, *markers: str) -> bool:
    position = 0
    for marker in markers:
        position = text.find(marker, position)
        if position < 0:
            return False
        position += len(marker)
    return True


class Timeline:
    """Seconds since the run was submitted, by event."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.events: dict[str, float] = {}

    def mark(self, event: str) -> float:
        self.events[event] = round(time.monotonic() - self.t0, 1)
        return self.events[event]

    def between(self, first: str, second: str) -> float:
        return round(self.events[second] - self.events[first], 1)


def _wait(what: str, condition: Callable[[], bool], timeout: float,
          watch: Sequence[ManagedProcess] = (), poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for proc in watch:
            proc.tree()  # remember the short-lived ClientApp/ServerApp processes for stop_all()
            if not proc.running:
                raise AssertionError(f"{what}: {proc.name} exited ({proc.poll()})\n{proc.log_tail(30)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(poll)


def _last_round(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "server_state.json").read_text())["last_round"])
    except (OSError, ValueError, KeyError):
        return 0


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _server_log(run_id: int, cli_home: Path) -> str:
    done = run_command(Command((flower_executable("flwr"), "log", str(run_id), CONNECTION_NAME, "--show"),
                               {"FLWR_HOME": str(cli_home), **QUIET_ENV}), timeout=120)
    return ANSI.sub("", done.stdout + done.stderr)


def _start_until_accepted(group: ProcessGroup, config: SuperNodeConfig, name: str,
                          timeout: float = 120.0) -> tuple[ManagedProcess, int]:
    """A restarted SuperNode is refused (exit 1, Flower's code 305) while the SuperLink still
    counts the dead one as online; start it again until it is accepted. Attempts made."""
    deadline, attempt = time.monotonic() + timeout, 0
    while True:
        attempt += 1
        proc = group.start_supernode(config, name=f"{name}-{attempt}")
        _wait(f"{name} attempt {attempt}", lambda: "SuperNode ID:" in proc.log_text() or not proc.running,
              timeout=90)
        if "SuperNode ID:" in proc.log_text():
            return proc, attempt
        assert "Exit Code: 305" in _log(proc), proc.log_tail(30)
        assert time.monotonic() < deadline, f"{name}: refused for {timeout:.0f} s"
        time.sleep(3)


@dataclass
class Scenario:
    timeline: Timeline = field(default_factory=Timeline)
    facts: dict = field(default_factory=dict)
    report: dict | None = None
    error: str = ""
    logs: str = ""

    def need(self, *keys: str) -> None:
        """Fail a test whose part of the scenario did not happen, with what went wrong."""
        missing = [k for k in keys if k not in self.facts]
        assert not missing, f"scenario stopped before {missing}: {self.error}\n{self.logs}"


def _phantoms(root: Path) -> dict[str, Path]:
    """Each hospital's own vendor folder: one case, GED4 labeled."""
    folders = {}
    for site in SITES:
        generate_liqa_tree(root / site, PhantomConfig(centers=(site,), cases=1, labeled=1, seed=0, profile="demo"))
        folders[site] = root / site / f"Vendor_{site}"
    return folders


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    root = tmp_path_factory.mktemp("faults")
    data = _phantoms(root / "data")
    certs = generate_federation_certs(root / "certs", CertConfig(sites=SITES))
    link = SuperLinkConfig.from_certs(certs.root, root / "link", port=free_port())  # state.db
    run_dir = root / "run"
    # Round 0 (fingerprints, planning) is not what these faults are about (tests/test_deploy_guide.py
    # runs it): the run folder starts with small plans, which the ServerApp takes as they are.
    write_plans(default_test_plans(patch_size=(16, 32, 32), spacing=(6.25, 3.7, 3.7), base_width=2), run_dir)
    run_config = {
        "num-server-rounds": 2, "local-iterations": 1, "agreement-volumes": 0, "data-root": "",
        "sites": ",".join(f"{s}:train" for s in SITES), "run-dir": str(run_dir),
        "evaluate-train-sites": False, "node-wait": 90, "round-timeout": ROUND_TIMEOUT,
    }
    node_configs = {site: SuperNodeConfig(
        site=site, role="train", data_dir=data[site], superlink=f"127.0.0.1:{link.port}",
        ca_cert=certs.site_ca(site), private_key=certs.site_key(site), state_dir=root / f"node-{site}",
        port=free_port()) for site in SITES}
    s = Scenario()
    seen: set[int] = set()
    gone = data["A"].with_name("Vendor_A.gone")
    with ProcessGroup(root / "logs") as group:
        try:
            link_proc = group.start_superlink(link, timeout=120)
            registrations = group.register(certs, list(SITES), link)
            assert all(r.node_id is not None for r in registrations), registrations
            nodes = {site: group.start_supernode(node_configs[site]) for site in SITES}
            for node in nodes.values():
                node.wait_for_log("SuperNode ID:", timeout=120)

            # ---- round 1: B1 dies while it trains; the round goes on with A
            run_id = submit_run(REPO_ROOT, link.cli_home, run_config, timeout=300)
            s.timeline = timeline = Timeline()
            r1, r2 = f"[RUN {run_id}, ROUND 1]", f"[RUN {run_id}, ROUND 2]"
            _wait("B1 starts training in round 1",
                  lambda: _in_order(_log(nodes["B1"]), r1, "Start `flwr-clientapp` process"),
                  timeout=STEP_LIMIT, watch=[link_proc, *nodes.values()])
            killed = nodes["B1"].kill()
            timeline.mark("B1 killed")
            s.facts["b1_pids_left"] = [p for p in killed if p in list_processes()
                                       and list_processes()[p].state != "Z"]
            _wait("round 1 complete", lambda: _last_round(run_dir) >= 1, timeout=STEP_LIMIT,
                  watch=[link_proc, nodes["A"]])
            timeline.mark("round 1 complete")
            state = json.loads((run_dir / "server_state.json").read_text())
            s.facts["round1"] = state["history"][0]
            s.facts["history_before_kill"] = state["history"]
            round1_dir = run_dir / "checkpoints" / "round_0001"
            s.facts["round1_manifest"] = json.loads((round1_dir / "manifest.json").read_text())["manifest_sha256"]
            s.facts["round1_hashes"] = _hashes(round1_dir)

            # ---- B1 restarted with the same key: refused until its heartbeat expired, then back
            nodes["B1"], s.facts["b1_attempts"] = _start_until_accepted(group, node_configs["B1"], "supernode-B1")
            timeline.mark("B1 accepted again")

            # ---- round 2 starts (the ServerApp sees B1 and sends the round's messages): the
            # SuperLink, its SuperExec and the ServerApp die
            def b1_back() -> bool:
                s.facts["run1_log"] = _server_log(run_id, link.cli_home)
                return "round 2: B1 connected again" in s.facts["run1_log"]

            _wait("the ServerApp sees B1 again", b1_back, timeout=STEP_LIMIT, watch=[link_proc], poll=1.0)
            killed = link_proc.kill()
            timeline.mark("SuperLink killed")
            s.facts["link_pids_left"] = [p for p in killed if p in list_processes()
                                         and list_processes()[p].state != "Z"]
            s.facts["round1_hashes_after_kill"] = _hashes(round1_dir)
            s.facts["state_at_kill"] = _last_round(run_dir)
            link_proc = group.start_superlink(link, timeout=120, name="superlink-restarted")
            timeline.mark("SuperLink up again")
            run_id2 = submit_run(REPO_ROOT, link.cli_home, run_config, timeout=300)
            timeline.mark("run submitted again")

            # ---- A's data folder disappears once A has said who it is: round 2 goes on with B1
            _wait("A answers the resumed run", lambda: _in_order(
                _log(nodes["A"]), f"[RUN {run_id2}, ROUND identify]", "Sending: query.identify", "Sent successfully"),
                timeout=STEP_LIMIT, watch=[link_proc, *nodes.values()])
            shutil.move(data["A"], gone)
            timeline.mark("A's data gone")
            status = wait_for_run(run_id2, link.cli_home, timeout=STEP_LIMIT, status_every=60,
                                  watch=[link_proc, *nodes.values()], ready=(run_dir / "report.json").exists)
            timeline.mark("resumed run finished")
            s.facts["status2"] = status
            s.facts["nodes_alive"] = {site: proc.running for site, proc in nodes.items()}
            s.facts["run2_log"] = _server_log(run_id2, link.cli_home)
            s.report = json.loads((run_dir / "report.json").read_text())
        except Exception as err:  # noqa: BLE001  (each test says which of its facts are missing)
            s.error = f"{type(err).__name__}: {err}"
            s.logs = "\n".join(f"--- {p.name}\n{p.log_tail(25)}" for p in group.processes)
        finally:
            for proc in group.processes:
                seen |= proc.tree()
            if gone.exists():
                shutil.move(gone, data["A"])
    left = sorted(p for p in seen if p in list_processes() and list_processes()[p].state != "Z")
    s.facts["left_after_stop"] = left
    print(f"\nfault timeline (s since submit): {json.dumps(s.timeline.events)}")
    yield s


def _round(scenario: Scenario, number: int) -> dict:
    assert scenario.report is not None, f"no report.json: {scenario.error}\n{scenario.logs}"
    (entry,) = [e for e in scenario.report["rounds"] if e["round"] == number]
    return entry


def test_killed_supernode_misses_its_round_and_rejoins_the_next(scenario: Scenario) -> None:
    scenario.need("round1", "b1_attempts", "run1_log", "status2")
    t, facts = scenario.timeline, scenario.facts
    assert facts["b1_pids_left"] == []
    round1 = facts["round1"]
    assert round1["missing"] == ["B1"] and sorted(round1["train"]) == ["A"], round1
    # No hang: the ServerApp stopped waiting for B1 when Flower declared it unavailable (its
    # heartbeat expired, <= 60 s after the last one) or at round-timeout, and went on with A.
    (b1,) = [r for r in round1["rejected"] if r.startswith("site B1 ")]
    assert "Node Unavailable" in b1 or f"no train reply within {ROUND_TIMEOUT}s" in b1, b1
    # Restarted with the same key, B1 was waited for at the start of round 2 and trained in it.
    assert "round 2: B1 connected again" in facts["run1_log"], facts["run1_log"][-3000:]
    assert "B1" in _round(scenario, 2)["train"], _round(scenario, 2)
    print(f"\nB1 killed: round 1 complete {t.between('B1 killed', 'round 1 complete')} s later; "
          f"B1 accepted again {t.between('B1 killed', 'B1 accepted again')} s after the kill "
          f"({facts['b1_attempts']} starts)")


def test_site_whose_data_vanished_replies_an_error_named_by_site(scenario: Scenario) -> None:
    scenario.need("run2_log")
    round2 = _round(scenario, 2)
    assert round2["missing"] == ["A"] and sorted(round2["train"]) == ["B1"], round2
    (a,) = [r for r in round2["rejected"] if r.startswith("site A ")]
    assert "train failed" in a and "Vendor_A: no such folder" in a, a  # names the folder
    log = scenario.facts["run2_log"]
    assert any("WARNING site A (node " in line and "train failed" in line for line in log.splitlines()), log[-3000:]
    assert scenario.facts["nodes_alive"]["A"]  # the SuperNode itself kept running


def test_killed_superlink_resumes_after_the_last_complete_round(scenario: Scenario) -> None:
    scenario.need("status2", "run2_log")
    t, facts, report = scenario.timeline, scenario.facts, scenario.report
    assert facts["link_pids_left"] == [] and facts["state_at_kill"] == 1  # killed in round 2
    assert facts["status2"] == "finished:completed", f"{facts['status2']}\n{scenario.logs}"
    assert facts["nodes_alive"] == {"A": True, "B1": True}  # they reconnected by themselves
    assert facts["round1_hashes_after_kill"] == facts["round1_hashes"]
    resumed = [line for line in facts["run2_log"].splitlines() if "resuming after round 1 of 2" in line]
    assert resumed and resumed[0].endswith(f"(manifest sha256 {facts['round1_manifest']})"), resumed
    assert report is not None and [e["round"] for e in report["rounds"]] == [1, 2]
    assert report["rounds"][:1] == facts["history_before_kill"]  # round 1 as written before the kill
    assert facts["left_after_stop"] == []
    print(f"\nSuperLink killed at {t.events['SuperLink killed']} s: up again after "
          f"{t.between('SuperLink killed', 'SuperLink up again')} s, resumed run finished "
          f"{t.between('run submitted again', 'resumed run finished')} s after the new submit")
