"""Aggregation of the CPS pair and the screening of node updates."""

import numpy as np
import pytest
from flwr.app import ArrayRecord

from common.weights import flatten, from_arrayrecord, record_nbytes, to_arrayrecord, unflatten, update_problems
from server.strategy import NodeUpdate, PairAggregator


def _global() -> dict[str, np.ndarray]:
    return {"a.w": np.zeros((2, 3), np.float32), "b.w": np.ones((2, 3), np.float32), "a.norm1.weight": np.ones(2, np.float32)}


def _update(node: int, value: float, labeled: float, samples: float = 10.0) -> NodeUpdate:
    arrays = {k: np.full_like(v, value) for k, v in _global().items()}
    return NodeUpdate(node, f"S{node}", arrays, {"num-labeled": labeled, "num-samples": samples})


def test_fedavg_is_weighted_per_key_and_branch():
    updates = [_update(1, 1.0, labeled=1), _update(2, 4.0, labeled=3)]
    new = PairAggregator("labeled").aggregate(_global(), updates)
    assert np.allclose(new["a.w"], (1 * 1 + 3 * 4) / 4)
    assert np.allclose(new["b.w"], (1 * 1 + 3 * 4) / 4)
    uniform = PairAggregator("uniform").aggregate(_global(), updates)
    assert np.allclose(uniform["a.w"], 2.5)


def test_branches_are_averaged_separately():
    first, second = _update(1, 0.0, 1), _update(2, 0.0, 1)
    first.arrays["a.w"][:] = 2.0
    second.arrays["a.w"][:] = 4.0
    first.arrays["b.w"][:] = -1.0
    second.arrays["b.w"][:] = -3.0
    new = PairAggregator("labeled").aggregate(_global(), [first, second])
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
    accepted, rejected = PairAggregator("labeled").screen([good, nan, missing, shaped, unweighted], _global())
    assert [u.node_id for u in accepted] == [1]
    reasons = {r.node_id: r.reason for r in rejected}
    assert "NaN" in reasons[2] and "missing" in reasons[3] and "shape" in reasons[4] and "weight" in reasons[5]


def test_no_usable_update_keeps_the_model():
    current = _global()
    assert PairAggregator().aggregate(current, [])["b.w"] is current["b.w"]


def test_server_momentum_accumulates():
    aggregator = PairAggregator("uniform", server_momentum=0.9)
    current = _global()
    step1 = aggregator.aggregate(current, [_update(1, 1.0, 1)])
    assert np.allclose(step1["a.w"], 1.0)  # first step equals FedAvg
    step2 = aggregator.aggregate(step1, [_update(1, 2.0, 1)])
    assert np.allclose(step2["a.w"], 1.0 + 1.0 + 0.9 * 1.0)  # delta 1 plus momentum of the first


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
