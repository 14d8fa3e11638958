"""Central differential privacy through Flower's wrappers: clipping, noise, and epsilon where it holds."""

import time
import uuid

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.metadata import Metadata
from flwr.serverapp import strategy as flower
from flwr.supercore.task_identity import TaskIdentity

from client.client_app import central_dp_clipping_mod
from common.federation_config import FederationConfig
from common.weights import from_arrayrecord, to_arrayrecord
from server.checkpoints import RunFolder
from server.strategy import NodeUpdate, PairAggregator, build_strategy

SITES = "A:train,B1:train,B2:train,C:eval"


@pytest.fixture(autouse=True)
def server_task():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0


def _config(**run_config) -> FederationConfig:
    return FederationConfig.from_run_config({"sites": SITES, "dp-clipping-norm": 1.0, **run_config})


def _current() -> dict[str, np.ndarray]:
    return {"a.w": np.zeros((4, 5), np.float32), "b.w": np.ones((100, 100), np.float32)}


def _shifted(node: int, current: dict, delta: dict, labeled: float = 1.0) -> NodeUpdate:
    arrays = {k: (v + delta.get(k, 0)).astype(np.float32) for k, v in current.items()}
    return NodeUpdate(node, f"S{node}", arrays, {"num-labeled": labeled, "num-samples": 1.0})


def _norm(new: dict, current: dict) -> float:
    return float(np.sqrt(sum(np.sum((new[k].astype(np.float64) - current[k]) ** 2) for k in current)))


def _round(aggregator: PairAggregator, server_round: int, current: dict, updates: list[NodeUpdate]) -> dict:
    aggregator.configure(server_round, current, ConfigRecord({}), list(range(1, aggregator.num_train_nodes + 1)))
    return aggregator.aggregate(server_round, current, updates)


def _two_large_updates(current: dict) -> list[NodeUpdate]:
    first, second = np.zeros((4, 5), np.float32), np.zeros((4, 5), np.float32)
    first[0, 0], second[1, 1] = 10.0, -20.0  # norms 10 and 20, orthogonal
    return [_shifted(1, current, {"a.w": first}, labeled=1), _shifted(2, current, {"a.w": second}, labeled=3)]


@pytest.mark.parametrize("weighted_by", ["uniform", "labeled"])
def test_server_side_wrapper_clips_each_update(weighted_by):
    config = _config(dp="server-fixed", **{"dp-noise-multiplier": 0.0, "weighted-by": weighted_by})
    strategy = build_strategy(config, 2)
    assert type(strategy) is flower.DifferentialPrivacyServerSideFixedClipping and type(strategy.strategy) is flower.FedAvg
    current = _current()
    new = _round(PairAggregator(config, 2, log=lambda s: None), 1, current, _two_large_updates(current))
    assert _norm(new, current) <= 1.0 + 1e-6
    weights = (0.5, 0.5) if weighted_by == "uniform" else (0.25, 0.75)
    assert new["a.w"][0, 0] == pytest.approx(weights[0] * 1.0) and new["a.w"][1, 1] == pytest.approx(-weights[1] * 1.0)
    np.testing.assert_array_equal(new["b.w"], current["b.w"])  # no noise, nothing else moved


def test_noise_std_is_multiplier_times_norm_over_sites():
    config = _config(dp="server-fixed", **{"dp-noise-multiplier": 1.0, "dp-clipping-norm": 1.0, "weighted-by": "uniform"})
    current = _current()
    new = _round(PairAggregator(config, 2, log=lambda s: None), 1, current, [_shifted(1, current, {}), _shifted(2, current, {})])
    noise = (new["b.w"] - current["b.w"]).ravel()
    assert noise.std() == pytest.approx(1.0 * 1.0 / 2, rel=0.03) and abs(noise.mean()) < 0.02


def test_client_side_clipping_mod_clips_and_the_server_enforces_the_bound():
    config = _config(dp="client-fixed", **{"dp-noise-multiplier": 0.0})
    aggregator = PairAggregator(config, 2, log=(said := []).append)
    assert type(aggregator.strategy) is flower.DifferentialPrivacyClientSideFixedClipping
    current = _current()
    content = aggregator.configure(1, current, ConfigRecord({"seed": 0}), [1, 2])
    assert content["config"]["clipping_norm"] == 1.0  # the wrapper asks the sites to clip

    # The site's train handler behind Flower's fixedclipping_mod: an update of norm 5 comes out at 1.
    metadata = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=60.0, message_type="train")
    request = Message(content=content, metadata=metadata)
    big = {k: v + (5.0 / np.sqrt(v.size * 2)) for k, v in from_arrayrecord(request.content["arrays"]).items()}

    def handler(msg: Message, ctxt: Context) -> Message:
        return Message(RecordDict({"arrays": to_arrayrecord(big), "metrics": MetricRecord({"num-labeled": 1.0})}),
                       reply_to=msg)

    context = Context(1, 1, {"partition-id": 0}, RecordDict(), {})
    clipped = from_arrayrecord(central_dp_clipping_mod(request, context, handler).content["arrays"])
    assert _norm(big, current) == pytest.approx(5.0, rel=1e-4) and _norm(clipped, current) == pytest.approx(1.0, rel=1e-4)
    unasked = Message(content=RecordDict({"arrays": request.content["arrays"], "config": ConfigRecord({})}), metadata=metadata)
    assert _norm(from_arrayrecord(central_dp_clipping_mod(unasked, context, handler).content["arrays"]), current) > 4.9

    # A site that did not clip (hostile, or a client without the mod): the server clips it.
    honest = NodeUpdate(1, "A", clipped, {"num-labeled": 1.0})
    hostile = NodeUpdate(2, "B2", big, {"num-labeled": 1.0})
    new = aggregator.aggregate(1, current, [honest, hostile])
    assert _norm(new, current) <= 1.0 + 1e-5
    assert aggregator.last_round["clipped_on_server"] == ["B2"] and any("did not clip" in line for line in said)


def test_epsilon_per_round_from_flowers_accountant(tmp_path):
    from flwr.serverapp import PrivacyConfig, RdpAccountant
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent, NeighboringRelation, SamplingMethod

    config = _config(dp="server-fixed", **{"dp-noise-multiplier": 1.2, "weighted-by": "uniform", "dp-delta": 1e-4})
    aggregator = PairAggregator(config, 3, log=lambda s: None)
    assert aggregator.accountant is not None
    reference = RdpAccountant(PrivacyConfig(1e-4, 3, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION))
    current, epsilons = _current(), []
    for server_round in (1, 2):
        current = _round(aggregator, server_round, current, [_shifted(n, current, {}) for n in (1, 2, 3)])
        reference.compose(GaussianPrivacyEvent(1.2, 3, 3))
        privacy = aggregator.last_round["privacy"]
        assert privacy["delta"] == 1e-4 and privacy["releases"] == server_round and privacy["note"] is None
        assert privacy["epsilon"] == pytest.approx(reference.get_epsilon(1e-4))
        epsilons.append(privacy["epsilon"])
    assert 0 < epsilons[0] < epsilons[1]

    # A site missing: no release (the accountant's model needs every site), nothing spent.
    before = dict(current)
    assert _round(aggregator, 3, current, [_shifted(1, current, {})])["b.w"] is before["b.w"]
    assert aggregator.last_round["released"] is False and aggregator.privacy()["epsilon"] == epsilons[1]

    # Resume: the accountant's ledger comes back with the checkpoint.
    run = RunFolder(tmp_path / "run")
    run.save_strategy_state(*aggregator.state())
    resumed = PairAggregator(config, 3, log=lambda s: None)
    resumed.load_state(*run.load_strategy_state())
    assert resumed.privacy()["epsilon"] == pytest.approx(epsilons[1])
    with pytest.raises(ValueError, match="accountant"):  # four sites now: another privacy model
        PairAggregator(config, 4, log=lambda s: None).load_state(*run.load_strategy_state())


@pytest.mark.parametrize("run_config, says", [
    ({"weighted-by": "labeled"}, "equal site weights"),
    ({"weighted-by": "uniform", "strategy": "fedadam"}, "FedAvg's averaging"),
    ({"weighted-by": "uniform", "strategy": "krum"}, "FedAvg's averaging"),
    ({"weighted-by": "uniform", "dp-noise-multiplier": 0.0}, "no privacy guarantee"),
])
def test_no_epsilon_where_the_accountant_does_not_hold(run_config, says):
    config = _config(dp="server-fixed", **run_config)
    aggregator = PairAggregator(config, 3, log=lambda s: None)
    current = _current()
    _round(aggregator, 1, current, [_shifted(n, current, {}) for n in (1, 2, 3)])
    privacy = aggregator.last_round["privacy"]
    assert privacy["epsilon"] is None and says in privacy["note"] and privacy["note"].startswith("not accounted")
    assert aggregator.describe()["privacy"]["epsilon"] is None


def test_a_stale_site_under_server_side_clipping_does_not_stop_the_run():
    # Flower divides the clipping norm by the update's norm: an update equal to the model sent had
    # raised ZeroDivisionError; it now counts as (almost exactly) no change.
    config = _config(dp="server-fixed", **{"dp-noise-multiplier": 0.0, "weighted-by": "uniform"})
    current = _current()
    stale, moving = _shifted(1, current, {}), _two_large_updates(current)[0]
    new = _round(PairAggregator(config, 2, log=lambda s: None), 1, current, [stale, moving])
    assert new["a.w"][0, 0] == pytest.approx(0.5) and _norm(new, current) == pytest.approx(0.5, rel=1e-6)
