"""The evaluation protocol on the server's side: per-case scores pooled exactly from the sites'
sums (mean, sd, n), model selection on the training sites' validation cases only, and the report
(report.json, metrics.csv, the table, the plots)."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from client.evaluation import PhaseScores, SiteEvaluation
from common.federation_config import FederationConfig
from common.planning import default_test_plans
from common.scores import VALIDATION_PREFIX, Moments, PhaseSummary, from_metrics, pool, to_metrics
from server.checkpoints import ServerState
from server.federation import Federation
from server.messaging import NodeInfo
from server.report import NO_VALIDATION, evaluation_entry, format_table, selection_score
from server.strategy import PairAggregator

# per-case Dice and HD95 at each site: (test per phase, validation GED4)
CASES = {
    "A": ({"GED4": ([0.91, 0.85], [9.0, 14.0]), "T2": ([0.20, 0.40], [60.0, 40.0])}, ([0.90], [10.0])),
    "B1": ({"GED4": ([0.70, 0.95, 0.80], [20.0, 5.0, 12.0])}, ([0.5, 0.6, 0.7], [30.0, 20.0, 15.0])),
    "C": ({"GED4": ([0.88, 0.60, 0.75, 0.93], [11.0, 35.0, 20.0, 8.0]), "T2": ([0.1], [90.0])}, ([0.99], [1.0])),
}
TRAINING = {"A", "B1"}


def _evaluation(per_phase: dict[str, tuple[list[float], list[float]]]) -> SiteEvaluation:
    return SiteEvaluation({p: PhaseScores(list(d), list(h)) for p, (d, h) in per_phase.items()}, [], {})


def _site_metrics(site: str) -> dict[str, float]:
    """What the site's evaluate handler sends: test scores, and validation scores prefixed "val-"."""
    test, validation = CASES[site]
    return {**_evaluation(test).metrics(), **_evaluation({"GED4": validation}).metrics(VALIDATION_PREFIX)}


def test_moments_pool_exactly():
    a, b = [0.91, 0.85, 0.7], [0.95, 0.8]
    pooled = Moments.of(a) + Moments.of(b)
    assert pooled.n == 5
    assert pooled.mean == pytest.approx(statistics.mean(a + b))
    assert pooled.sd == pytest.approx(statistics.stdev(a + b))
    assert Moments.of([0.5]).sd is None and Moments.of([0.5, 0.5]).sd == 0.0
    again = Moments.from_mean_sd(pooled.mean, pooled.sd, pooled.n)
    assert (again.n, again.total, again.total_sq) == pytest.approx((pooled.n, pooled.total, pooled.total_sq))


def test_metric_keys_round_trip_without_case_ids():
    metrics = _site_metrics("A")
    assert {k for k in metrics if k.endswith("-GED4")} == {
        "dice-GED4", "dice-sum-GED4", "dice-sumsq-GED4", "hd95-GED4", "hd95-sum-GED4", "hd95-sumsq-GED4",
        "cases-GED4", "val-dice-GED4", "val-dice-sum-GED4", "val-dice-sumsq-GED4", "val-hd95-GED4",
        "val-hd95-sum-GED4", "val-hd95-sumsq-GED4", "val-cases-GED4"}
    assert metrics["dice-sum-GED4"] == pytest.approx(0.91 + 0.85)
    assert metrics["dice-sumsq-GED4"] == pytest.approx(0.91**2 + 0.85**2)
    test, validation = from_metrics(metrics), from_metrics(metrics, VALIDATION_PREFIX)
    assert list(test) == ["GED4", "T2"] and list(validation) == ["GED4"]
    assert test["T2"].hd95.mean == pytest.approx(50.0) and test["T2"].cases == 2
    assert validation["GED4"].dice.mean == pytest.approx(0.90) and validation["GED4"].cases == 1


def test_evaluation_entry_pools_training_sites_test_splits():
    entry = evaluation_entry({site: _site_metrics(site) for site in CASES}, training=TRAINING)
    assert list(entry["centers"]) == ["A", "B1", "C"]
    for site, (test, _) in CASES.items():
        for phase, (dice, hd95) in test.items():
            scores = entry["centers"][site][phase]
            assert scores["cases"] == len(dice)
            assert scores["dice"] == pytest.approx(statistics.mean(dice))
            assert scores["hd95"] == pytest.approx(statistics.mean(hd95))
            assert scores["dice_sd"] == (pytest.approx(statistics.stdev(dice)) if len(dice) > 1 else None)
    pooled = entry["in_distribution"]
    ged4 = CASES["A"][0]["GED4"][0] + CASES["B1"][0]["GED4"][0]  # never C's
    assert pooled["GED4"]["cases"] == 5
    assert pooled["GED4"]["dice"] == pytest.approx(statistics.mean(ged4))
    assert pooled["GED4"]["dice_sd"] == pytest.approx(statistics.stdev(ged4))
    hd95 = CASES["A"][0]["GED4"][1] + CASES["B1"][0]["GED4"][1]
    assert pooled["GED4"]["hd95_sd"] == pytest.approx(statistics.stdev(hd95))
    assert pooled["T2"]["cases"] == 2  # only A has T2 test cases
    # validation comes from training sites only: held-out C's never selects a model
    assert set(entry["validation"]) == TRAINING
    selected = selection_score(entry)
    assert selected.cases == 4
    assert selected.dice.mean == pytest.approx((0.9 + 0.5 + 0.6 + 0.7) / 4)  # weighted by validation cases


def _entry(server_round: int, heldout_c: float, validation: dict[str, list[float]], in_distribution: float) -> dict:
    metrics = {
        "A": {**_evaluation({"GED4": ([in_distribution], [10.0])}).metrics(),
              **_evaluation({"GED4": (validation["A"], [10.0] * len(validation["A"]))}).metrics(VALIDATION_PREFIX)},
        "B1": _evaluation({"GED4": (validation["B1"], [10.0] * len(validation["B1"]))}).metrics(VALIDATION_PREFIX),
        "C": {**_evaluation({"GED4": ([heldout_c, heldout_c], [5.0, 7.0])}).metrics(),
              **_evaluation({"GED4": ([1.0], [0.0])}).metrics(VALIDATION_PREFIX)},  # ignored: C is held out
    }
    return {"round": server_round, **evaluation_entry(metrics, training=TRAINING), "seconds": 1.0}


def _federation(tmp_path: Path, log: list[str]) -> Federation:
    config = FederationConfig.from_run_config({"run-dir": str(tmp_path / "run"), "sites": "A:train,B1:train,C:eval"})
    federation = Federation(grid=None, config=config, log=log.append)  # the grid is not used past identify
    federation.nodes = {1: NodeInfo(1, "A", "train", 1, 1), 2: NodeInfo(2, "B1", "train", 3, 0), 3: NodeInfo(3, "C", "eval", 0, 2)}
    return federation


def _run_rounds(federation: Federation, entries: list[dict]) -> dict:
    plans = default_test_plans()
    state, aggregator = ServerState(), PairAggregator(federation.config, num_train_nodes=2)
    for entry in entries:
        current = {"a.w": np.full(3, entry["round"], np.float32), "b.w": np.zeros(3, np.float32)}
        federation._checkpoint(entry["round"], current, plans, entry, state, aggregator)
    return federation.finish(state)


def test_best_is_selected_on_validation_only(tmp_path):
    # Round 1 is best on held-out C, on in-distribution test, and on the unweighted mean of the
    # sites' validation Dice (0.7 vs 0.625); round 2 on the validation cases pooled (0.6375 vs 0.6).
    entries = [
        _entry(1, heldout_c=0.95, validation={"A": [0.9], "B1": [0.5, 0.5, 0.5]}, in_distribution=0.99),
        _entry(2, heldout_c=0.50, validation={"A": [0.6], "B1": [0.65, 0.65, 0.65]}, in_distribution=0.20),
        _entry(3, heldout_c=0.97, validation={"A": [0.5], "B1": [0.5, 0.5, 0.5]}, in_distribution=0.99),
    ]
    log: list[str] = []
    federation = _federation(tmp_path, log)
    report = _run_rounds(federation, entries)
    assert report["best"] == {"round": 2, "selected_on": "validation GED4 Dice, training sites, n=4",
                              "score": pytest.approx(0.6375)}
    best = json.loads((federation.run.best_dir / "info.json").read_text())
    assert best["round"] == 2 and report["best_model"] == str(federation.run.best_dir)
    assert report["final"]["round"] == 3 and report["final_model"].endswith("round_0003")
    assert report["training_centers"] == ["A", "B1"] and report["heldout_centers"] == ["C"]
    assert report["final"]["centers"]["C"]["GED4"] == {"dice": pytest.approx(0.97), "dice_sd": pytest.approx(0.0),
                                                       "hd95": pytest.approx(6.0), "hd95_sd": pytest.approx(2 ** 0.5),
                                                       "cases": 2}
    for entry in report["rounds"]:  # the contract: every round, every centre, per phase dice and hd95
        assert all({"dice", "hd95"} <= set(scores) for c in entry["centers"].values() for scores in c.values())
    assert not any("no best model" in line for line in log)


def test_no_validation_cases_no_best(tmp_path):
    entries = []
    for server_round, c in ((1, 0.9), (2, 0.95)):
        entry = _entry(server_round, heldout_c=c, validation={"A": [0.5], "B1": [0.5]}, in_distribution=0.8)
        entries.append({**entry, "validation": {}})
    log: list[str] = []
    federation = _federation(tmp_path, log)
    report = _run_rounds(federation, entries)
    assert report["best"] == {"round": None, "selected_on": "validation GED4 Dice, training sites", "score": None,
                              "note": NO_VALIDATION}
    assert report["best_model"] is None and not federation.run.best_dir.exists()
    assert [line for line in log if NO_VALIDATION in line and line.startswith("round")] == [
        f"round 1: {NO_VALIDATION}"]  # said once, not every round, and again with the final table
    assert NO_VALIDATION in log[-1] and "test cases only" in log[-1]
    assert json.loads((tmp_path / "run" / "report.json").read_text())["best"]["round"] is None


def test_csv_table_and_plots(tmp_path):
    entries = [_entry(r, heldout_c=0.8 + r / 100, validation={"A": [0.7], "B1": [0.6, 0.65, 0.7]}, in_distribution=0.9)
               for r in (1, 2)]
    report = _run_rounds(_federation(tmp_path, []), entries)
    with (tmp_path / "run" / "metrics.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    got = {(r["round"], r["site"], r["kind"], r["phase"], r["metric"]): r["value"] for r in rows}
    assert float(got[("2", "C", "test", "GED4", "dice")]) == pytest.approx(0.82)
    assert got[("2", "C", "test", "GED4", "cases")] == "2"
    assert float(got[("2", "pooled", "test", "GED4", "dice")]) == pytest.approx(0.9)  # A's test split alone
    assert got[("2", "pooled", "test", "GED4", "dice_sd")] == ""  # one case: no sd
    assert float(got[("1", "pooled", "validation", "GED4", "dice")]) == pytest.approx((0.7 + 0.6 + 0.65 + 0.7) / 4)
    assert got[("1", "pooled", "validation", "GED4", "cases")] == "4"
    assert float(got[("1", "B1", "validation", "GED4", "dice_sd")]) == pytest.approx(0.05)

    final = report["final"]
    table = format_table(final["centers"], report["heldout_centers"], in_distribution=final["in_distribution"])
    lines = table.splitlines()
    assert lines[0].split() == ["Dice,", "mean±sd", "(n)", "GED4"]
    assert lines[2].split() == ["in-distribution", "0.900", "(1)"]
    assert lines[3].split() == ["A", "0.900", "(1)"]
    assert lines[4].split() == ["C", "*", "0.820±0.000", "(2)"]
    assert "HD95 (mm), mean±sd (n)" in table and "6.0±1.4 (2)" in table
    plot = tmp_path / "run" / "plots" / "dice_per_round.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pool_keeps_phases_apart():
    a = {"GED4": PhaseSummary.of([1.0], [0.0]), "T2": PhaseSummary.of([0.0, 0.2], [50.0, 70.0])}
    b = {"T2": PhaseSummary.of([0.4], [30.0])}
    pooled = pool([a, b])
    assert list(pooled) == ["GED4", "T2"]
    assert pooled["T2"].cases == 3 and pooled["T2"].dice.mean == pytest.approx(0.2)
    assert pooled["T2"].hd95.sd == pytest.approx(20.0)
    assert to_metrics(pooled)["cases-T2"] == 3.0
