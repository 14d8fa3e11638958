"""A short federation through the real Flower simulation engine (`flower-superlink --simulation`,
`flwr run`, Ray): 2 rounds on tiny phantoms, ending with report.json and no process left behind."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from simulations.demo import DemoConfig, parse_run_config, run_demo

pytestmark = pytest.mark.e2e


FLOWER_OR_RAY = re.compile(r"flower-superlink|flower-supernode|flwr-|flwr |raylet|gcs_server|ray::|ray/dashboard|default_worker")


def _flower_and_ray_processes() -> set[int]:
    """Processes of Flower and Ray, wherever they were reparented to."""
    listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return {int(line.split(None, 1)[0]) for line in listing.splitlines() if FLOWER_OR_RAY.search(line)}


def test_two_round_simulation_through_flwr_run(tmp_path):
    before = _flower_and_ray_processes()
    config = DemoConfig(
        run_dir=tmp_path / "run", centers=("A", "B1", "C"), heldout=("C",), cases=2, heldout_cases=1, labeled=1,
        rounds=2, local_iterations=2, patch_size="16,32,32",
        run_config_overrides=parse_run_config("strategy='fedmedian' evaluate-phases='GED4,T2'"),  # as `--run-config`
    )
    report = run_demo(config)
    assert [entry["round"] for entry in report["rounds"]] == [1, 2]
    assert set(report["final"]["centers"]["C"]) == {"GED4", "T2"}  # evaluate-phases
    assert 0.0 <= report["final"]["centers"]["C"]["GED4"]["dice"] <= 1.0
    assert (config.run_dir / "plots" / "dice_per_round.png").is_file()
    assert json.loads((config.run_dir / "report.json").read_text())["final_model"]
    assert report["aggregation"]["flower_class"] == "FedMedian"
    assert set(report["rounds"][0]["aggregation"]["update_norms"]) == {"A", "B1"}
    deadline = time.monotonic() + 20  # Ray's workers may take a moment to see their parent gone
    while (leftover := _flower_and_ray_processes() - before) and time.monotonic() < deadline:
        time.sleep(1)
    assert not leftover, f"processes left running: {leftover}"
