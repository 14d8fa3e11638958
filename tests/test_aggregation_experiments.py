"""The demo's `--run-config` (Flower's syntax, checked against the app's keys) and the arms of the
robust-aggregation and DP-cost experiments (simulations/experiments/aggregation.py)."""

from __future__ import annotations

import pytest

from common.aggregation_config import ADVERSARIAL_KINDS
from common.federation_config import FederationConfig
from simulations.demo import DemoConfig, parse_run_config
from simulations.experiments.aggregation import (
    Arm,
    Budget,
    dp_arms,
    epsilon,
    non_contrast_mean,
    robust_arms,
    rows,
    write_outputs,
)


def test_run_config_takes_flowers_syntax_and_types():
    values = parse_run_config("strategy='krum' adversarial-sites='B2:scale-100' dp-noise-multiplier=0.1 int8-updates=true")
    assert values == {"strategy": "krum", "adversarial-sites": "B2:scale-100", "dp-noise-multiplier": 0.1,
                      "int8-updates": True}
    assert parse_run_config("  ") == {}


@pytest.mark.parametrize("text, message", [
    ("local-iteration=5", "unknown key 'local-iteration' (did you mean 'local-iterations'?)"),
    ("num-server-rounds='3'", "num-server-rounds = '3': expected an integer"),
    ("sites='A:train'", "sites is the demo's"),
    ("strategy=krum", "not Flower's KEY=VALUE syntax"),
])
def test_run_config_problems_are_one_line(text, message):
    with pytest.raises(ValueError, match="--run-config") as error:
        parse_run_config(text)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_run_config_overrides_the_demo_options(tmp_path):
    config = DemoConfig(run_dir=tmp_path, local_iterations=22, run_config_overrides={"local-iterations": 5, "strategy": "krum"},
                        data=tmp_path / "shared")
    run_config = config.run_config()
    assert run_config["local-iterations"] == 5 and run_config["strategy"] == "krum"
    assert run_config["data-root"] == str((tmp_path / "shared").resolve())


def test_robust_arms_cover_every_strategy_and_kind_and_parse_back():
    arms = robust_arms(["fedavg", "krum", "fedtrimmedavg"], list(ADVERSARIAL_KINDS))
    assert len(arms) == 3 * (1 + len(ADVERSARIAL_KINDS))
    names = {a.name for a in arms}
    assert {"fedavg_none", "krum_scale-100", "fedtrimmedavg_stale"} <= names
    for arm in arms:
        values = parse_run_config(arm.run_config_arg())  # what the demo receives is what the arm says
        assert values == dict(arm.run_config)
        config = FederationConfig.from_run_config({"sites": "A:train,B1:train,B2:train,C:eval", **values})
        assert config.aggregation.strategy == arm.labels["strategy"]
        expected = {} if arm.labels["adversary"] == "none" else {"B2": arm.labels["adversary"].split(":")[1]}
        assert {s: a.kind for s, a in config.aggregation.adversarial.items()} == expected
    # With three sites, trimmed mean must cut one update at each end: int(beta x 3) >= 1.
    trimmed = next(a for a in arms if a.labels["strategy"] == "fedtrimmedavg")
    assert int(trimmed.run_config["trimmed-beta"] * 3) == 1


def test_dp_arms_use_server_clipping_with_equal_weights():
    arms = dp_arms([0.0, 0.3], clipping_norm=0.5, delta=1e-5)
    assert [a.name for a in arms] == ["fedavg_none", "dp_noise0", "dp_noise0.3"]  # robust-aggregation's clean arm
    config = FederationConfig.from_run_config({"sites": "A:train,B1:train,C:eval", **parse_run_config(arms[2].run_config_arg())})
    assert (config.aggregation.dp, config.aggregation.dp_noise_multiplier, config.aggregation.dp_clipping_norm) == (
        "server-fixed", 0.3, 0.5)
    assert config.weighted_by == "uniform"  # where Flower's accountant holds


def _report(dice: float, privacy: dict | None = None) -> dict:
    scores = {p: {"dice": dice, "dice_sd": 0.1, "cases": 8} for p in ("GED4", "T1", "T2", "DWI_800")}
    return {"final": {"centers": {"C": scores}, "in_distribution": scores},
            "aggregation": {"privacy": privacy or {"dp": "none"}}}


def test_table_rows_and_outputs(tmp_path):
    arms = [Arm("fedavg_none", {"strategy": "fedavg"}, {"strategy": "fedavg", "adversary": "none"}),
            Arm("krum_scale-100", {"strategy": "krum"}, {"strategy": "krum", "adversary": "B2:scale-100"})]
    for arm in arms:
        (tmp_path / "arms" / arm.name).mkdir(parents=True)
        (tmp_path / "arms" / arm.name / "arm.json").write_text('{"seconds": 12.5}')
    table = rows(arms, {"fedavg_none": _report(0.8), "krum_scale-100": _report(0.6)}, tmp_path)
    assert table[1]["C non-contrast mean"] == pytest.approx(0.6)
    path = write_outputs(table, tmp_path, "robust-aggregation", "python -m simulations.experiments robust-aggregation --out X",
                         Budget(), ("strategy", "adversary"))
    text = path.read_text()
    assert "| krum | B2:scale-100 | 0.600 ± 0.100 (8)" in text and "robust-aggregation --out X" in text
    assert len((tmp_path / "robust-aggregation.csv").read_text().splitlines()) == 1 + 2 * 2 * 4


def test_epsilon_cell_says_when_there_is_no_accounting():
    assert epsilon(_report(0.5)) == "-"
    assert epsilon(_report(0.5, {"dp": "server-fixed", "epsilon": None})) == "not accounted"
    assert epsilon(_report(0.5, {"dp": "server-fixed", "epsilon": 12.345, "delta": 1e-5})) == "12.3 (δ=1e-05)"
    assert non_contrast_mean({"T1": {"dice": 0.3}}) is None
