"""`simulations.benchmarks.bench_site`'s pieces on a tiny site: the worker answers each message in a
fresh process on either path, and the two paths' replies agree. Figures are the benchmark's business
(docs/benchmarks.md); this only checks that what it times is the real message, done right."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from simulations.benchmarks.bench_site import _site, build_site, plan_site
from simulations.benchmarks.site_message import run_message


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory) -> tuple[Path, Path, Path]:
    work = tmp_path_factory.mktemp("bench_site")
    data = build_site(work / "data", cases=6, profile="demo", seed=3)
    plans = plan_site(data, work / "planning-cache", work / "plans.json")
    return work, data, plans


def test_a_fresh_process_answers_identify_on_either_path(tiny_site):
    work, data, plans = tiny_site
    for flag in ([], ["--no-prepared"]):
        done = subprocess.run([sys.executable, "-m", "simulations.benchmarks.site_message", "identify", "--data",
                               str(data), "--cache", str(work / "cache-worker"), "--plans", str(plans), *flag],
                              capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["message"] == "identify" and result["prepared"] == (flag == [])
        assert result["seconds"] > 0 and result["compute_seconds"] == 0.0  # no model work in identify
        assert result["process_seconds"] >= result["seconds"]


def test_prepared_and_raw_evaluation_time_the_same_model_work(tiny_site, capsys):
    work, data, plans = tiny_site
    _site(data, work / "cache-prepared").prepare(json.loads(plans.read_text()))
    config = {"local-iterations": 1, "num-server-rounds": 2, "evaluate-phases": "GED4"}
    seconds, compute = run_message("evaluate", data, work / "cache-prepared", plans, prepared=True, run_config=config)
    assert 0 < compute < seconds
    logs = capsys.readouterr().out
    raw_seconds, raw_compute = run_message("evaluate", data, work / "cache-raw", plans, prepared=False,
                                           run_config=config)
    raw_logs = capsys.readouterr().out
    assert 0 < raw_compute < raw_seconds
    summary = [line.split("evaluation in")[1].split(":", 1)[1] for line in logs.splitlines() if "evaluation in" in line]
    raw_summary = [line.split("evaluation in")[1].split(":", 1)[1] for line in raw_logs.splitlines()
                   if "evaluation in" in line]
    assert summary and summary == raw_summary  # the same Dice per phase, from the cache and from the raw files
