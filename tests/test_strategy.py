"""Aggregation of the CPS pair through Flower's strategies, the screening in front of them, and resume."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import strategy as flower
from flwr.supercore.task_identity import TaskIdentity

from common.federation_config import FederationConfig
from common.weights import flatten, from_arrayrecord, record_nbytes, to_arrayrecord, unflatten, update_problems
from server.checkpoints import RunFolder
from server.strategy import NodeUpdate, PairAggregator, build_strategy

NODES = [1, 2, 3, 4]


@pytest.fixture(autouse=True)
def server_task():
    # configure_train builds Messages, which read the running task's identity (a SuperLink sets it).
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0


def _config(**run_config) -> FederationConfig:
    return FederationConfig.from_run_config({"sites": "A:train,B1:train,B2:train,C:eval", **run_config})


def _global() -> dict[str, np.ndarray]:
    return {"a.w": np.zeros((2, 3), np.float32), "b.w": np.ones((2, 3), np.float32), "a.norm1.weight": np.ones(2, np.float32)}


def _update(node: int, value: float, labeled: float, samples: float = 10.0) -> NodeUpdate:
    arrays = {k: np.full_like(v, value) for k, v in _global().items()}
    return NodeUpdate(node, f"S{node}", arrays, {"num-labeled": labeled, "num-samples": samples})


def _round(aggregator: PairAggregator, server_round: int, current: dict, updates: list[NodeUpdate]) -> dict:
    aggregator.configure(server_round, current, ConfigRecord({"server-round": server_round}), NODES[:len(updates)])
    return aggregator.aggregate(server_round, current, updates)


def _legacy_fedavg(current: dict, updates: list[NodeUpdate], weighted_by: str) -> dict:
    """The home-made FedAvg the Flower strategies replaced (server/strategy.py before), verbatim."""
    keys = {"labeled": "num-labeled", "samples": "num-samples"}
    weights = np.array([1.0 if weighted_by == "uniform" else u.metrics[keys[weighted_by]] for u in updates], np.float64)
    weights /= weights.sum()
    return {key: sum(w * u.arrays[key].astype(np.float64) for w, u in zip(weights, updates)).astype(np.float32)
            for key in current}


# name -> (run config, Flower class, updates as (value, labeled volumes), expected value of every weight)
ADAM_DELTA = (1 * 1 + 3 * 4) / 4  # the weighted average moves every weight from 0 by 3.25
CASES = {
    "fedavg": ({}, flower.FedAvg, [(1, 1), (4, 3)], ADAM_DELTA),
    "fedprox": ({"proximal-mu": 0.1}, flower.FedProx, [(1, 1), (4, 3)], ADAM_DELTA),
    "fedavgm": ({"server-momentum": 0.9}, flower.FedAvgM, [(1, 1), (4, 3)], ADAM_DELTA),  # first step: FedAvg
    "fedadam": ({"fedopt-eta": 0.5}, flower.FedAdam, [(1, 1), (4, 3)],
                # m = 0.1 d, v = 0.01 d^2; bias-corrected step eta sqrt(1 - 0.99^2) / (1 - 0.9^2) at round 1
                0.5 * np.sqrt(1 - 0.99 ** 2) / (1 - 0.9 ** 2) * 0.1 * ADAM_DELTA / (0.1 * ADAM_DELTA + 1e-3)),
    "fedyogi": ({"fedopt-eta": 0.5}, flower.FedYogi, [(1, 1), (4, 3)],
                0.5 * 0.1 * ADAM_DELTA / (0.1 * ADAM_DELTA + 1e-3)),  # no bias correction
    "fedmedian": ({}, flower.FedMedian, [(1, 1), (4, 3), (100, 1)], 4.0),  # unweighted median
    "fedtrimmedavg": ({"trimmed-beta": 0.34}, flower.FedTrimmedAvg, [(1, 1), (4, 3), (100, 1)], 4.0),  # 1 cut each end
    # Krum scores each update by its distances to the n - f - 2 nearest others (f = 0: two):
    # 1.2 is closest to the rest, then 1; the hostile 100 is never chosen.
    "krum": ({"num-malicious-nodes": 0}, flower.Krum, [(1, 1), (1.2, 3), (1.5, 1), (100, 1)], 1.2),
    "multikrum": ({"num-malicious-nodes": 0, "num-nodes-to-select": 2}, flower.MultiKrum,
                  [(1, 1), (1.2, 3), (1.5, 1), (100, 1)], (1 * 1 + 3 * 1.2) / 4),  # the best two, weighted
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_strategy_is_flowers_class_and_aggregates_known_updates(name):
    run_config, cls, updates, expected = CASES[name]
    config = _config(strategy=name, **run_config)
    assert type(build_strategy(config, 3)) is cls
    aggregator = PairAggregator(config, len(updates), log=lambda s: None)
    current = {k: np.zeros_like(v) for k, v in _global().items()}
    new = _round(aggregator, 1, current, [_update(i + 1, v, w) for i, (v, w) in enumerate(updates)])
    assert set(new) == set(current) and all(a.dtype == np.float32 for a in new.values())
    for key in current:
        np.testing.assert_allclose(new[key], expected, rtol=1e-5, err_msg=f"{name} {key}")


def test_default_fedavg_equals_the_previous_aggregation():
    rng = np.random.default_rng(0)
    current = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in {**_global(), "b.big": np.zeros((64, 33))}.items()}
    updates = [NodeUpdate(n, f"S{n}", {k: (v + rng.normal(0, 0.1, v.shape)).astype(np.float32) for k, v in current.items()},
                          {"num-labeled": float(n + 1), "num-samples": 7.0 * n}) for n in NODES]
    config = _config()  # strategy fedavg, weighted by labeled volumes
    assert config.aggregation.strategy == "fedavg" and config.weighted_by == "labeled"
    for weighted_by in ("labeled", "samples", "uniform"):
        aggregator = PairAggregator(_config(**{"weighted-by": weighted_by}), 3, log=lambda s: None)
        new, old = _round(aggregator, 1, current, updates), _legacy_fedavg(current, updates, weighted_by)
        for key in current:  # equal to float32 rounding
            np.testing.assert_allclose(new[key], old[key], rtol=2e-6, atol=1e-7, err_msg=f"{weighted_by} {key}")


def test_trimmed_mean_of_three_sites_is_their_median():
    """Why robust-aggregation runs FedTrimmedAvg last: with three sites and trimmed-beta >= 1/3 it
    keeps each coordinate's middle value, FedMedian's result exactly (weights ignored by both)."""
    rng = np.random.default_rng(1)
    current = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in _global().items()}
    updates = [NodeUpdate(n, f"S{n}", {k: (v + rng.normal(0, 1, v.shape)).astype(np.float32) for k, v in current.items()},
                          {"num-labeled": float(n)}) for n in NODES[:3]]
    median = _round(PairAggregator(_config(strategy="fedmedian"), 3), 1, current, updates)
    trimmed = _round(PairAggregator(_config(strategy="fedtrimmedavg", **{"trimmed-beta": 0.34}), 3), 1, current, updates)
    untrimmed = _round(PairAggregator(_config(strategy="fedtrimmedavg"), 3), 1, current, updates)  # beta 0.2: cuts none
    for key in current:
        np.testing.assert_array_equal(trimmed[key], median[key])
        assert not np.array_equal(untrimmed[key], median[key])


def test_each_round_records_the_update_norms():
    """report.json's rounds[i].aggregation.update_norms: each site's L2 distance from the model it
    received, the figure to choose dp-clipping-norm from."""
    current = {k: np.zeros_like(v) for k, v in _global().items()}
    aggregator = PairAggregator(_config(), 2, log=lambda s: None)
    _round(aggregator, 1, current, [_update(1, 1.0, 1), _update(2, -2.0, 1)])
    size = sum(v.size for v in current.values())
    assert aggregator.last_round["update_norms"] == pytest.approx({"S1": np.sqrt(size), "S2": 2 * np.sqrt(size)})


def test_branches_are_averaged_separately():
    first, second = _update(1, 0.0, 1), _update(2, 0.0, 1)
    first.arrays["a.w"][:], second.arrays["a.w"][:] = 2.0, 4.0
    first.arrays["b.w"][:], second.arrays["b.w"][:] = -1.0, -3.0
    new = _round(PairAggregator(_config(), 2), 1, _global(), [first, second])
    assert np.allclose(new["a.w"], 3.0) and np.allclose(new["b.w"], -2.0)


def test_screen_rejects_nan_missing_and_wrong_shapes():
    good = _update(1, 1.0, 2)
    nan = _update(2, 1.0, 2)
    nan.arrays["a.w"][0, 0] = np.nan
    missing = _update(3, 1.0, 2)
    del missing.arrays["b.w"]
    shaped = _update(4, 1.0, 2)
    shaped.arrays["a.w"] = np.zeros((3, 3), np.float32)
    unweighted = _update(5, 1.0, 0)
    accepted, rejected = PairAggregator(_config(), 5).screen([good, nan, missing, shaped, unweighted], _global())
    assert [u.node_id for u in accepted] == [1]
    reasons = {r.node_id: r.reason for r in rejected}
    assert "NaN" in reasons[2] and "missing" in reasons[3] and "shape" in reasons[4] and "weight" in reasons[5]


def test_no_usable_update_keeps_the_model():
    current = _global()
    assert _round(PairAggregator(_config(), 2), 1, current, [])["b.w"] is current["b.w"]


def test_fedavgm_momentum_accumulates_as_before():
    aggregator = PairAggregator(_config(strategy="fedavgm", **{"server-momentum": 0.9, "weighted-by": "uniform"}), 1)
    step1 = _round(aggregator, 1, _global(), [_update(1, 1.0, 1)])
    assert np.allclose(step1["a.w"], 1.0)  # first step equals FedAvg
    step2 = _round(aggregator, 2, step1, [_update(1, 2.0, 1)])
    assert np.allclose(step2["a.w"], 1.0 + 1.0 + 0.9 * 1.0)  # delta 1 plus momentum of the first


def test_configure_sends_the_round_config_with_what_the_strategy_adds():
    aggregator = PairAggregator(_config(strategy="fedprox", **{"proximal-mu": 0.25, "fp16-transport": True,
                                                                "int8-updates": True}), 3)
    content = aggregator.configure(4, _global(), ConfigRecord({"plans-sha256": "x"}), NODES)
    config = content["config"]
    assert config["server-round"] == 4 and config["proximal-mu"] == 0.25 and config["int8-updates"] is True
    assert config["plans-sha256"] == "x"
    assert next(iter(content["arrays"].values())).dtype == "float16"  # fp16 transport as before


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedavgm"])
def test_resume_restores_the_strategy_state(name, tmp_path):
    """Two rounds, a checkpoint, a fresh aggregator from the run folder: round 3 as if never stopped."""
    config = _config(strategy=name, **({"server-momentum": 0.9} if name == "fedavgm" else {}))
    rng = np.random.default_rng(1)

    def updates(current):
        return [NodeUpdate(n, f"S{n}", {k: (v + rng.normal(0, 0.1, v.shape)).astype(np.float32)
                                        for k, v in current.items()}, {"num-labeled": 1.0 + n, "num-samples": 1.0})
                for n in NODES[:3]]

    running = PairAggregator(config, 3)
    current = _global()
    for server_round in (1, 2):
        current = _round(running, server_round, current, updates(current))
    run = RunFolder(tmp_path / "run")
    arrays, info = running.state()
    assert arrays and info["strategy"] == name
    run.save_strategy_state(arrays, {**info, "round": 2})

    resumed = PairAggregator(config, 3)
    resumed.load_state(*run.load_strategy_state(), last_round=2)
    if name != "fedavgm":  # FedAdam/FedYogi: both moments come back exactly
        for moment in ("m_t", "v_t"):
            for key, value in getattr(running.base, moment).items():
                np.testing.assert_array_equal(getattr(resumed.base, moment)[key], value)
    third = updates(current)
    expected = _round(running, 3, current, third)["a.w"]
    np.testing.assert_array_equal(_round(resumed, 3, current, third)["a.w"], expected)
    assert not np.allclose(_round(PairAggregator(config, 3), 3, current, third)["a.w"], expected)  # state matters


def test_legacy_momentum_file_resumes_fedavgm(tmp_path):
    from safetensors.numpy import save_file

    (tmp_path / "run").mkdir()
    save_file({"a.w": np.full((2, 3), 0.5, np.float32)}, str(tmp_path / "run" / "momentum.safetensors"))
    arrays, info = RunFolder(tmp_path / "run").load_strategy_state()
    assert info["strategy"] == "fedavgm" and set(arrays) == {"momentum.a.w"}


def test_run_config_errors_are_one_line():
    with pytest.raises(ValueError, match="strategy must be one of fedavg"):
        _config(strategy="fedsgd")
    with pytest.raises(ValueError, match='needs strategy = "fedavgm"'):
        _config(**{"server-momentum": 0.9})
    with pytest.raises(ValueError, match="proximal-mu > 0"):
        _config(strategy="fedprox")
    with pytest.raises(ValueError, match="dp must be one of"):
        _config(dp="local")


def test_update_problems_flags_unexpected_keys():
    update = dict(_global(), **{"a.extra": np.zeros(1, np.float32)})
    assert any("unexpected" in p for p in update_problems(update, _global()))


def test_fp16_transport_halves_bytes_and_round_trips():
    flat = {"a.w": np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)}
    full, half = to_arrayrecord(flat), to_arrayrecord(flat, fp16=True)
    assert isinstance(half, ArrayRecord)
    assert record_nbytes(half) < 0.52 * record_nbytes(full)
    back = from_arrayrecord(half)
    assert back["a.w"].dtype == np.float32
    assert np.allclose(back["a.w"], flat["a.w"], atol=1e-2)


def test_flatten_unflatten_round_trip():
    branches = {"a": {"x": np.ones(2, np.float32)}, "b": {"x": np.zeros(2, np.float32)}}
    assert unflatten(flatten(branches))["b"]["x"].tolist() == [0.0, 0.0]
    with pytest.raises(KeyError):
        unflatten(flatten(branches))["c"]
