"""docs/deploy.md, executed: its fenced blocks are what a coordinator and three hospitals type.

Every fenced block of the guide carries a `<!-- guide-test: NAME -->` line right above it, and
`HANDLERS` says what this file does with each NAME; an untagged block, an unknown name, or a
name that no longer appears fails the fast test below, so a new command in the guide cannot go
untested. The e2e test runs the shell blocks on loopback in the order people would (coordinator:
certs, SuperLink, registration, run settings; hospitals A and B1 (train) and C (eval): key,
data check, SuperNode; coordinator: status, submit), with the guide's values swapped for temporary
folders, free ports and a tiny run, each swap checked to exist in the block (so the guide cannot
drift silently) and no path of the real machine left (/srv, /etc, /data, /secure). The SuperLink
and SuperNodes run in the background and are stopped with everything they spawned. B2 is
registered but never started: the default four sites of deploy/run.toml with three hospitals,
the situation in which the ServerApp has to name who it is waiting for. The supernode block is
also run with A's key a second time and with an unregistered key: the two meanings of exit code
305, told apart by the SuperLink log lines the guide quotes.

The one addition to a block: the SuperLink gets `--extra '--database :flwr-in-memory:'` (the
guide's *The state database*). Flower stores every object of every message in state.db, which
made this run take 387 s instead of 287 s on 2 shared cores; tests/test_faults.py runs a whole
federation on state.db, as the guide has it. The finished run's report.json is checked as the
coordinator would read it: A and B1 trained, held-out C scored per phase (Dice, HD95), and the
model travelled as float16 both ways (run.toml's `fp16-transport = true`), byte for byte.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy.process import ManagedProcess, free_port, list_processes

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "deploy.md"
TAG = re.compile(r"^<!-- guide-test: (\S+) -->$")
# What happens to each tagged block. "run": executed by test_guide_executes_on_loopback.
HANDLERS = {
    "figure": "not code: the picture of who connects to whom",
    "certs": "run", "superlink": "run (background)", "register": "run", "settings": "run",
    "run-toml": "compared with deploy/run.toml",
    "submit-check": "run", "status": "run (twice: nodes online, run finished)", "submit": "run",
    "store-key": "run per hospital", "check": "run per hospital", "supernode": "run per hospital (background)",
    "docker-site": "not run (no Docker here): its variables are checked against deploy/compose/site.yaml",
    "state-db-repro": "executed by tests/test_deploy_federation.py: Flower's SQLite state gives up after 5 s",
}
HOSPITALS = {"A": "train", "B1": "train", "C": "eval"}  # B2 is registered but stays away
REAL_PATHS = ("/srv/", "/etc/", "/data/", "/secure/", "example.org")


@dataclass(frozen=True)
class Block:
    tag: str | None
    lang: str
    text: str
    line: int


def guide_blocks(text: str) -> list[Block]:
    """Fenced blocks with the tag on the line above each (None when there is none)."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped.startswith("```"):
            start, body = i, []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                body.append(lines[i])
                i += 1
            previous = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            match = TAG.match(previous)
            blocks.append(Block(match.group(1) if match else None, stripped[3:].strip(),
                                textwrap.dedent("\n".join(body)), start + 1))
        i += 1
    return blocks


def the_block(tag: str) -> Block:
    (block,) = [b for b in guide_blocks(GUIDE.read_text()) if b.tag == tag]
    return block


def adapt(block: Block, swaps: dict[str, str], optional: dict[str, str] | None = None) -> str:
    """The block's text with each swap applied; every value of `swaps` must be in the block (those
    of `optional` may be), and no path of the real machine may remain."""
    text = block.text
    for old, new in swaps.items():
        assert old in text, f"docs/deploy.md line {block.line} ({block.tag}): {old!r} no longer in the block"
        text = text.replace(old, new)
    for old, new in (optional or {}).items():
        text = text.replace(old, new)
    left = [p for p in REAL_PATHS if p in text]
    assert not left, f"{block.tag}: {left} left in\n{text}"
    return text


# ----------------------------------------------------------------------------- fast checks
def test_every_block_is_tagged_and_known() -> None:
    blocks = guide_blocks(GUIDE.read_text())
    untagged = [b.line for b in blocks if b.tag is None]
    assert not untagged, f"docs/deploy.md: blocks without <!-- guide-test: NAME --> at lines {untagged}"
    unknown = [(b.line, b.tag) for b in blocks if b.tag not in HANDLERS]
    assert not unknown, f"docs/deploy.md: blocks this test does not run: {unknown}"
    tags = [b.tag for b in blocks]
    assert sorted(tags) == sorted(HANDLERS), "each handled block appears exactly once"
    assert all(b.lang == "bash" for b in blocks if HANDLERS[b.tag].startswith("run")), \
        [(b.tag, b.lang) for b in blocks]


def test_untagged_or_unknown_blocks_are_found() -> None:
    text = "x\n<!-- guide-test: certs -->\n```bash\nfedliver certs X\n```\n\n```bash\nrm -rf /\n```\n" \
           "<!-- guide-test: new-thing -->\n```bash\necho\n```\n"
    blocks = guide_blocks(text)
    assert [(b.tag, b.text.strip()) for b in blocks] == [
        ("certs", "fedliver certs X"), (None, "rm -rf /"), ("new-thing", "echo")]


def test_run_toml_block_is_the_shipped_file() -> None:
    assert the_block("run-toml").text.strip() == (REPO / "deploy" / "run.toml").read_text().strip()


def test_docker_block_sets_only_what_site_yaml_reads() -> None:
    compose = (REPO / "deploy" / "compose" / "site.yaml").read_text()
    names = set(re.findall(r"\b(FEDLIVER_[A-Z_]+)=", the_block("docker-site").text))
    assert names and all(f"${{{name}" in compose for name in names), names
    assert "deploy/compose/site.yaml" in the_block("docker-site").text


@pytest.fixture(scope="module")
def vendor_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from simulations.phantoms import PhantomConfig, generate_liqa_tree

    root = tmp_path_factory.mktemp("liqa")
    generate_liqa_tree(root, PhantomConfig(centers=("A", "B1", "C"), cases=1, labeled=1, seed=0,
                                           profile="demo", heldout=("C",)))
    return {site: root / f"Vendor_{site}" for site in ("A", "B1", "C")}


def _identify(vendor_folders: dict[str, Path], tmp_path: Path, nodes: dict[str, Path]) -> list[str]:
    """The ServerApp's identification against real ClientApps (in-process grid), four sites expected."""
    from client.client_app import app as client_app
    from common.federation_config import FederationConfig
    from server.federation import Federation
    from tests.inprocess_grid import InProcessGrid

    run_config = {"sites": "A:train,B1:train,B2:train,C:eval", "node-wait": 5, "run-dir": str(tmp_path / "run")}
    configs = [{"site": site, "role": "eval" if site == "C" else "train", "data-dir": str(folder),
                "cache-dir": str(tmp_path / f"cache-{site}")} for site, folder in nodes.items()]
    log: list[str] = []
    federation = Federation(InProcessGrid(client_app, configs, run_config),
                            FederationConfig.from_run_config(run_config), log=log.append)
    federation.identify_nodes()
    assert sorted(federation.all_nodes.values()) == ["A", "B1", "C"]  # B2: absent, or without data
    return log


def test_server_names_the_missing_site_while_waiting(vendor_folders: dict[str, Path], tmp_path: Path) -> None:
    log = _identify(vendor_folders, tmp_path, vendor_folders)
    # as soon as the others answered, not after the first 30 s
    assert any(re.fullmatch(r"waiting for B2 \(3 of 4 connected, [1-5] s left\)", line) for line in log), log
    assert any(line.startswith("only 3 of 4 expected sites answered") and line.endswith("going on without B2")
               for line in log), log


def test_a_site_without_data_is_named_at_the_coordinator(vendor_folders: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    log = _identify(vendor_folders, tmp_path, {**vendor_folders, "B2": tmp_path / "empty"})
    (line,) = [line for line in log if "cannot take part" in line]
    assert line.startswith("WARNING site B2 (node ") and "not a dataset" in line, line
    assert not any("site ?" in line or "waiting for" in line for line in log), log


# ----------------------------------------------------------------------------- executed
def _phantoms(root: Path) -> dict[str, Path]:
    """Each hospital's own vendor folder: one case each (GED4 labeled at A and B1, every phase at C)."""
    from simulations.phantoms import PhantomConfig, generate_liqa_tree

    folders = {}
    for site, role in HOSPITALS.items():
        tree = root / f"hospital-{site}" / "liver-mri"
        generate_liqa_tree(tree, PhantomConfig(
            centers=(site,), cases=1, labeled=1, seed=0, profile="demo",
            heldout=(site,) if role == "eval" else ()))
        folders[site] = tree
    return folders


class Shell:
    """Runs adapted blocks with this environment's `fedliver` and `flwr` first on PATH."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                    "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0"}
        self.background: list[ManagedProcess] = []

    def run(self, name: str, script: str, cwd: Path, timeout: float = 300) -> str:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=self.env,
                              capture_output=True, encoding="utf-8", errors="replace", timeout=timeout, check=False)
        output = done.stdout + done.stderr
        (self.root / "logs").mkdir(exist_ok=True)
        (self.root / "logs" / f"{name}.log").write_text(f"$ {script}\n{output}")
        assert done.returncode == 0, f"{name}: exit {done.returncode}\n$ {script}\n{output[-3000:]}"
        return output

    def start(self, name: str, script: str, cwd: Path) -> ManagedProcess:
        proc = ManagedProcess(name, ["bash", "-c", "exec " + script], self.root / "logs" / f"{name}.log",
                              env=self.env, cwd=cwd)
        self.background.append(proc)
        return proc.start()

    def stop_all(self) -> set[int]:
        seen: set[int] = set()
        for proc in reversed(self.background):
            seen |= proc.tree()
            proc.stop(timeout=10)
        return seen


def _set_keys(path: Path, values: dict[str, object]) -> None:
    """The coordinator's edit of run.toml: existing `key = value` lines changed, new keys added."""
    text = path.read_text()
    for key, value in values.items():
        line = f"{key} = {json.dumps(value)}"
        text, n = re.subn(rf"^{re.escape(key)} = .*$", line, text, flags=re.M)
        if not n:
            text += line + "\n"
    path.write_text(text)


@pytest.mark.e2e
def test_guide_executes_on_loopback(tmp_path: Path) -> None:
    started = time.monotonic()
    data = _phantoms(tmp_path)
    port = free_port()
    certs, state = tmp_path / "certs", tmp_path / "state"
    coordinator = {"/secure/fedliver-certs": str(certs), "/srv/fedliver-state": str(state)}
    at_state = {"/srv/fedliver-state": str(state)}
    shell = Shell(tmp_path)
    timings: dict[str, float] = {}
    try:
        shell.run("certs", adapt(the_block("certs"), {"fl.coordinator.example.org": "fl.test"}, coordinator),
                  tmp_path)
        link = shell.start("superlink", adapt(the_block("superlink"), {
            **coordinator, "--host 0.0.0.0": "--host 127.0.0.1",
            "--port 8000": f"--port {port} --extra '--database :flwr-in-memory:'"}), tmp_path)
        link.wait_for_port("127.0.0.1", port, timeout=90)
        out = shell.run("register", adapt(the_block("register"), {**coordinator, "127.0.0.1:8000": f"127.0.0.1:{port}"}),
                        tmp_path)
        assert all(f"{site}: registered, node id" in out for site in ("A", "B1", "B2", "C")), out
        registry = json.loads((state / "sites.json").read_text())
        assert sorted(registry) == ["A", "B1", "B2", "C"]

        shell.run("settings", adapt(the_block("settings"), at_state), REPO)
        run_dir = tmp_path / "run"
        _set_keys(state / "run.toml", {  # the coordinator's edit, made tiny
            "run-dir": str(run_dir), "num-server-rounds": 1, "local-iterations": 1, "node-wait": 40,
            "round-timeout": 300, "evaluate-train-sites": False, "evaluate-step": 1.0, "agreement-volumes": 0})
        out = shell.run("submit-check", adapt(the_block("submit-check"), at_state), tmp_path)
        assert "stunet_T4_synth.safetensors (shipped pretraining" in out, out
        assert "not online now: A, B1, B2, C" in out, out

        for site, role in HOSPITALS.items():
            home = tmp_path / f"hospital-{site}"
            hospital = {"/etc/fedliver": str(home / "keys"), "a.key": f"{site.lower()}.key"}
            shell.run(f"store-key-{site}", adapt(the_block("store-key"), hospital), certs / "sites" / site)
            assert oct((home / "keys" / f"{site.lower()}.key").stat().st_mode & 0o777) == "0o600"
            vendor = {"/data/liver-mri/Vendor_A": str(data[site] / f"Vendor_{site}")}
            shell.run(f"check-{site}", adapt(the_block("check"), vendor), home)
            shell.start(f"supernode-{site}", adapt(the_block("supernode"), {
                **hospital, **vendor, "--site A": f"--site {site}", "--role train": f"--role {role}",
                "fl.coordinator.example.org:8000": f"127.0.0.1:{port}",
                "/srv/fedliver-node": f"{home / 'node'} --port {free_port()}"}), home)
        for proc in shell.background[1:]:
            proc.wait_for_log("SuperNode ID:", timeout=120)

        # The two meanings of exit code 305 (the guide's table): a second node with A's key while A
        # is online, and a key never registered; both give the same lines at the hospital, and
        # the SuperLink log lines the guide quotes.
        shell.run("certs-D", f"fedliver certs {certs} --sites D --add-sites", tmp_path)
        refused = {}
        for name, site, key in (("dup-A", "A", "a.key"), ("unregistered-D", "D", "d.key")):
            folder = certs / "sites" / site
            refused[name] = shell.start(name, adapt(the_block("supernode"), {
                "/etc/fedliver/ca.crt": str(folder / "ca.crt"), "/etc/fedliver/a.key": str(folder / key),
                "/data/liver-mri/Vendor_A": str(data["A"] / "Vendor_A"), "--site A": f"--site {site}",
                "fl.coordinator.example.org:8000": f"127.0.0.1:{port}",
                "/srv/fedliver-node": f"{tmp_path / name} --port {free_port()} --max-retries 1"}), tmp_path)
        for proc in refused.values():
            assert proc.wait(timeout=120) == 1, proc.log_tail()
            assert "Exit Code: 305" in proc.log_text() and "Failed to activate SuperNode" in proc.log_text()
        link_log = link.log_text()
        assert f"exception: SuperNode with node ID {registry['A']['node-id']} could not be activated." in link_log
        assert "exception: No SuperNode found with the given public key." in link_log

        out = shell.run("status", adapt(the_block("status"), at_state), tmp_path)
        assert "sites online: A, B1, C" in out, out
        assert re.search(r"^B2\s+registered\s", out, re.M), out

        # `--wait` prints the ServerApp's log as it comes: B2 is named there while it waits.
        t0, lines = time.monotonic(), []
        proc = subprocess.Popen(["bash", "-c", adapt(the_block("submit"), at_state)], cwd=tmp_path,
                                env=shell.env, encoding="utf-8", errors="replace", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        reader = threading.Thread(target=lambda: lines.extend((time.monotonic() - t0, line) for line in proc.stdout))
        reader.start()
        try:
            proc.wait(timeout=600)
        finally:
            proc.kill()
            reader.join(timeout=10)
        out = "".join(line for _, line in lines)
        (tmp_path / "logs" / "submit.log").write_text(out)
        logs = "\n".join(f"--- {p.name}\n{p.log_tail(30)}" for p in shell.background)
        assert proc.returncode == 0 and "finished:completed" in out, f"{out}\n{logs}"
        named = [t for t, line in lines if re.search(r"waiting for B2 \(3 of 4 connected, \d+ s left\)", line)]
        assert named, out
        timings["B2 named, seconds after fedliver submit started"] = named[0]
        assert re.search(r"initial weights: \S+stunet_T4_synth.safetensors \(shipped", out), out
        assert "going on without B2" in out and "WARNING site ?" not in out, out

        out = shell.run("status-after", adapt(the_block("status"), at_state), tmp_path)
        assert re.search(r"current run: \d+, finished:completed, round 1 of 1 done", out), out
    finally:
        seen = shell.stop_all()
        timings["guide test (s)"] = time.monotonic() - started
        print(f"\ntimings: {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
    left = sorted(p for p in seen if p in list_processes() and list_processes()[p].state != "Z")
    assert not left, f"processes left: {left}"

    report = json.loads((run_dir / "report.json").read_text())
    assert [entry["round"] for entry in report["rounds"]] == [1]
    (entry,) = report["rounds"]
    assert sorted(entry["train"]) == ["A", "B1"] and report["heldout_centers"] == ["C"]
    assert not entry["rejected"] and entry["missing"] == [], entry
    assert set(report["final"]["centers"]) == {"C"}
    heldout = report["final"]["centers"]["C"]
    assert "GED4" in heldout and len(heldout) >= 2, heldout  # C is scored on every phase it has
    for scores in heldout.values():
        assert 0.0 <= scores["dice"] <= 1.0 and scores["hd95"] >= 0.0
    _assert_float16_both_ways(report, run_dir, entry)
    assert report["initial_weights"]["setting"] == "auto"
    assert report["initial_weights"]["file"].endswith("simulations/pretrained/stunet_T4_synth.safetensors")
    assert len(report["initial_weights"]["sha256"]) == 64


def _assert_float16_both_ways(report: dict, run_dir: Path, entry: dict) -> None:
    """run.toml's `fp16-transport = true`: both branches travelled as float16, to and from each site."""
    from common.stunet import build_stunet_from_plans
    from common.weights import flatten, record_nbytes, to_arrayrecord

    assert report["config"]["fp16_transport"] == "True"
    plans = json.loads((run_dir / "plans.json").read_text())
    pair = flatten({name: build_stunet_from_plans(plans).state_dict() for name in ("a", "b")})
    fp16_bytes = record_nbytes(to_arrayrecord(pair, fp16=True))
    assert fp16_bytes < 0.6 * record_nbytes(to_arrayrecord(pair))
    assert entry["bytes"]["to-each-node"] == fp16_bytes
    assert entry["bytes"]["from-node"] == {"A": fp16_bytes, "B1": fp16_bytes}
