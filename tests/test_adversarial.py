"""Simulated hostile or broken sites: what each kind sends, that only simulation honours it, and
that the Byzantine-robust strategies keep such an update out."""

import time
import uuid

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.metadata import Metadata
from flwr.supercore.task_identity import TaskIdentity

from client.client_app import simulated_adversary_mod
from common.aggregation_config import Adversary, parse_adversarial_sites
from common.federation_config import FederationConfig
from common.weights import from_arrayrecord, to_arrayrecord
from server.strategy import NodeUpdate, PairAggregator
from client.adversarial import corrupt_update

SITES = "A:train,B1:train,B2:train,C:eval"


def _models() -> tuple[dict, dict]:
    rng = np.random.default_rng(0)
    received = {"a.w": rng.normal(0, 0.1, (6, 7)).astype(np.float32), "b.w": rng.normal(0, 0.1, 5000).astype(np.float32)}
    trained = {k: (v + rng.normal(0, 0.01, v.shape)).astype(np.float32) for k, v in received.items()}
    return received, trained


def test_each_kind_changes_the_update_as_described():
    received, trained = _models()
    delta = {k: trained[k] - received[k] for k in received}
    sent = {kind: corrupt_update(Adversary("B2", kind, 0.5), trained, received, np.random.default_rng(1))
            for kind in ("sign-flip", "scale-100", "gaussian-noise", "stale")}
    for key in received:
        np.testing.assert_allclose(sent["sign-flip"][key], received[key] - delta[key], atol=1e-6)
        np.testing.assert_allclose(sent["scale-100"][key], received[key] + 100 * delta[key], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(sent["stale"][key], received[key])
        assert all(sent[kind][key].dtype == np.float32 for kind in sent)
    noise = np.concatenate([(sent["gaussian-noise"][k] - trained[k]).ravel() for k in received])
    assert noise.std() == pytest.approx(0.5, rel=0.05) and abs(noise.mean()) < 0.05


def test_run_config_spells_site_and_kind():
    assert parse_adversarial_sites("B2:sign-flip, A:gaussian-noise=0.1") == {
        "B2": Adversary("B2", "sign-flip"), "A": Adversary("A", "gaussian-noise", 0.1)}
    with pytest.raises(ValueError, match="sign-flip, scale-100, gaussian-noise, stale"):
        parse_adversarial_sites("B2:flip")
    with pytest.raises(ValueError, match="not among the run's sites"):
        FederationConfig.from_run_config({"sites": SITES, "adversarial-sites": "Z:stale"})


def _train_message(received: dict) -> Message:
    metadata = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=60.0, message_type="train")
    content = RecordDict({"arrays": to_arrayrecord(received), "config": ConfigRecord({"seed": 1000})})
    return Message(content=content, metadata=metadata)


@pytest.mark.parametrize("node_config, altered", [
    ({"partition-id": 2, "num-partitions": 4}, True),    # simulation node playing B2
    ({"partition-id": 0, "num-partitions": 4}, False),   # simulation node playing A
    ({"site": "B2", "role": "train", "data-dir": "/data"}, False),  # a deployed B2: never altered
])
def test_only_a_simulation_node_of_a_named_site_is_altered(node_config, altered):
    received, trained = _models()

    def handler(msg: Message, ctxt: Context) -> Message:
        return Message(RecordDict({"arrays": to_arrayrecord(trained), "metrics": MetricRecord({"num-labeled": 1.0})}),
                       reply_to=msg)

    context = Context(1, 1, node_config, RecordDict(), {"sites": SITES, "adversarial-sites": "B2:sign-flip"})
    sent = from_arrayrecord(simulated_adversary_mod(_train_message(received), context, handler).content["arrays"])
    expected = {k: received[k] - (trained[k] - received[k]) for k in received} if altered else trained
    for key in received:
        np.testing.assert_allclose(sent[key], expected[key], atol=1e-6)


@pytest.mark.parametrize("kind", ["sign-flip", "scale-100", "gaussian-noise"])
def test_krum_and_the_median_keep_a_hostile_update_out(kind):
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    received, _ = _models()
    rng = np.random.default_rng(3)
    step = {k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in received.items()}  # the honest direction
    honest = [{k: received[k] + step[k] + rng.normal(0, 0.001, v.shape).astype(np.float32) for k, v in received.items()}
              for _ in range(3)]
    hostile = corrupt_update(Adversary("B2", kind, 1.0), honest[0], received, np.random.default_rng(4))
    updates = [NodeUpdate(n, s, arrays, {"num-labeled": 1.0})
               for n, (s, arrays) in enumerate(zip(("A", "B1", "B3", "B2"), honest + [hostile]), start=1)]

    def error(strategy: str, **extra) -> float:
        config = FederationConfig.from_run_config({"sites": "A:train,B1:train,B2:train,B3:train", "strategy": strategy,
                                                   "weighted-by": "uniform", **extra})
        aggregator = PairAggregator(config, 4, log=lambda s: None)
        aggregator.configure(1, received, ConfigRecord({}), [1, 2, 3, 4])
        new = aggregator.aggregate(1, received, updates)
        return float(np.sqrt(sum(np.sum((new[k] - received[k] - step[k]) ** 2) for k in received)))

    honest_size = float(np.sqrt(sum(np.sum(v ** 2) for v in step.values())))
    assert error("fedavg") > 0.5 * honest_size  # plain averaging lets the hostile site in
    for robust in ("krum", "multikrum", "fedmedian"):
        assert error(robust, **{"num-malicious-nodes": 1}) < 0.2 * honest_size, robust
