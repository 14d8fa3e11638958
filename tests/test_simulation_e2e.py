"""A short federation through the real Flower simulation engine (`flower-superlink --simulation`,
`flwr run`, Ray): 2 rounds on tiny phantoms, ending with report.json and no process left behind."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import pytest

from deploy.process import list_processes
from simulations.demo import DemoConfig, parse_run_config, run_demo

pytestmark = pytest.mark.e2e

TAG = "FEDLIVER_TEST_RUN"


def _tagged_processes(tag: str) -> set[int]:
    """Live processes started under this test (the tag is in their environment, which every child
    of Flower and Ray inherits), wherever they were reparented to; other tests' processes, which may
    run beside this one under pytest-xdist, are not counted."""
    marker = f"{TAG}={tag}".encode()
    found = set()
    for pid, info in list_processes().items():
        try:
            if info.state != "Z" and marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.add(pid)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def test_two_round_simulation_through_flwr_run(tmp_path, monkeypatch):
    tag = uuid.uuid4().hex
    monkeypatch.setenv(TAG, tag)  # inherited by the SuperLink, flwr, Ray and the apps
    config = DemoConfig(
        run_dir=tmp_path / "run", centers=("A", "B1", "C"), heldout=("C",), cases=2, heldout_cases=1, labeled=1,
        rounds=2, local_iterations=2, patch_size="16,32,32",
        # as `--run-config`; Dice values are not what this test is about: no window overlap, no
        # branch-agreement volumes (tests/test_federation.py covers those in process)
        run_config_overrides=parse_run_config(
            "strategy='fedmedian' evaluate-phases='GED4,T2' evaluate-step=1.0 agreement-volumes=0"),
    )
    seen: set[int] = set()  # what the leftover check below can see while the run goes on
    running = threading.Event()
    running.set()

    def watch() -> None:
        while running.is_set():
            seen.update(_tagged_processes(tag))
            time.sleep(2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        report = run_demo(config)
    finally:
        running.clear()
        watcher.join()
    assert len(seen) >= 3, seen  # the SuperLink, Ray's and the apps' processes carry the tag
    assert [entry["round"] for entry in report["rounds"]] == [1, 2]
    assert set(report["final"]["centers"]["C"]) == {"GED4", "T2"}  # evaluate-phases
    assert 0.0 <= report["final"]["centers"]["C"]["GED4"]["dice"] <= 1.0
    assert (config.run_dir / "plots" / "dice_per_round.png").is_file()
    assert json.loads((config.run_dir / "report.json").read_text())["final_model"]
    assert report["aggregation"]["flower_class"] == "FedMedian"
    assert set(report["rounds"][0]["aggregation"]["update_norms"]) == {"A", "B1"}
    deadline = time.monotonic() + 20  # Ray's workers may take a moment to see their parent gone
    while (leftover := _tagged_processes(tag)) and time.monotonic() < deadline:
        time.sleep(1)
    assert not leftover, f"processes left running: {leftover}"
