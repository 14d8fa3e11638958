"""The federation's logic with the real ServerApp code and the real ClientApp, in process.

A crash in round 3 and a resume must finish the planned rounds with continuous numbering; every
reply a site sends must hold only the model's arrays, numbers, and the site's name and role; sites
train on their training split only and are scored on cases held out from it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from client.client_app import MOMENTUM_KEY, app as client_app
from common.federation_config import FederationConfig
from common.model_dir import load_model_dir
from server.report import selection_score
from server.federation import Federation
from simulations.phantoms import PhantomConfig, generate_liqa_tree
from inprocess_grid import InProcessGrid

SITES = "A:train,B1:train,C:eval"


class Crash(Exception):
    """Stands for the server process dying mid-round."""


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    generate_liqa_tree(root, PhantomConfig(centers=("A", "B1", "C"), cases=2, labeled=1, seed=3, profile="demo",
                                           heldout=("C",), test_cases=1, validation_cases=1))
    # a site with a bad file still takes part: the file is reported and skipped
    bad = sorted(root.glob("Vendor_A/*/T2.nii.gz"))[0]
    bad.write_bytes(bad.read_bytes()[:2000])
    return root


def _run_config(data: Path, run_dir: Path, rounds: int) -> dict:
    return {
        "data-root": str(data), "run-dir": str(run_dir), "sites": SITES, "num-server-rounds": rounds,
        "local-iterations": 2, "net-size": "T", "net-width": 2, "patch-size": "32,64,64", "batch-size": 1,
        "mode": "cps", "seed": 0, "fp16-transport": True, "evaluate-every": rounds, "evaluate-step": 1.0,
        "agreement-volumes": 1,
        # One labeled volume per site, so that the count below says "its one labeled training case"
        # (propagated phases: tests/test_label_propagation.py).
        "propagate-labels": False,
    }


def _site_of(grid: InProcessGrid, reply) -> str:
    partition = grid.contexts[reply.metadata.src_node_id].node_config["partition-id"]
    return SITES.split(",")[partition].split(":")[0]


def _grid(run_config: dict, **kwargs) -> InProcessGrid:
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    return InProcessGrid(client_app, nodes, run_config, **kwargs)


def test_crash_and_resume_keeps_round_numbering(phantom_root, tmp_path):
    torch.set_num_threads(1)
    run_config = _run_config(phantom_root, tmp_path / "run", rounds=3)
    config = FederationConfig.from_run_config(run_config)

    def crash_in_round_3(message) -> None:
        if message.metadata.message_type == "train" and message.metadata.group_id == "3":
            raise Crash()

    with pytest.raises(Crash):
        Federation(_grid(run_config, before_send=crash_in_round_3), config, log=lambda s: None).run_all()
    state = json.loads((config.run_dir / "server_state.json").read_text())
    assert state["last_round"] == 2
    assert not (config.run_dir / "report.json").exists()

    grid = _grid(run_config)
    log: list[str] = []
    report = Federation(grid, config, log=log.append).run_all()
    assert any("resuming after round 2" in line for line in log)
    assert [entry["round"] for entry in report["rounds"]] == [1, 2, 3]
    assert report["final"]["round"] == 3
    assert set(report["final"]["centers"]) == {"A", "B1", "C"}  # A and B1: their test split
    assert {"dice", "hd95"} <= set(report["final"]["centers"]["C"]["GED4"])
    assert report["final"]["centers"]["C"]["GED4"]["cases"] == 2  # every case of the held-out centre
    assert len(report["final"]["centers"]["C"]) >= 3  # C is evaluated on every phase it has
    assert len(report["final"]["centers"]["A"]) >= 3  # so is the test case of a training site
    assert report["final"]["in_distribution"]["GED4"]["cases"] == 2  # A's and B1's test cases pooled
    assert {site: s["GED4"]["cases"] for site, s in report["final"]["validation"].items()} == {"A": 1, "B1": 1}
    # best = the round whose pooled validation GED4 Dice is highest (first on ties), nothing else
    validation = {e["round"]: selection_score(e).dice.mean for e in report["rounds"]}
    assert report["best"]["round"] == max(validation, key=lambda r: (validation[r], -r))
    assert report["best"]["score"] == pytest.approx(validation[report["best"]["round"]])
    assert report["best"]["selected_on"].endswith("training sites, n=2")
    # each site trained on its one labeled training case, never on its labeled validation or test case
    assert all(m["num-labeled"] == 1.0 for entry in report["rounds"] for m in entry["train"].values())
    bundle = load_model_dir(Path(report["final_model"]))
    assert bundle.info["round"] == 3
    # the resumed run sent no fingerprint query: plans came from the run folder
    assert not any(r.metadata.message_type == "query.fingerprint" for r in grid.replies)


def test_replies_hold_only_model_arrays_and_numbers(phantom_root, tmp_path):
    torch.set_num_threads(1)
    run_config = {**_run_config(phantom_root, tmp_path / "run", rounds=1), "local-momentum": True}
    config = FederationConfig.from_run_config(run_config)
    grid = _grid(run_config)
    report = Federation(grid, config, log=lambda s: None).run_all()
    final = load_model_dir(Path(report["final_model"]))
    assert final.info["postprocessing"] == {"method": "largest-component", "phases": "*"}  # for `fedliver predict`
    global_arrays = final.branches
    shapes = {f"{b}.{k}": tuple(v.shape) for b, state in global_arrays.items() for k, v in state.items()}
    case_ids = {p.name for p in phantom_root.glob("Vendor_*/*")}
    seen_types = set()
    for reply in grid.replies:
        assert not reply.has_error(), reply.error.reason
        kind = reply.metadata.message_type
        seen_types.add(kind)
        for name, record in reply.content.items():
            if isinstance(record, MetricRecord):
                assert all(isinstance(v, (int, float)) for v in record.values())
                if kind == "evaluate":  # aggregates per phase: test, and validation at training sites only
                    assert "cases-GED4" in record and "dice-sumsq-GED4" in record
                    assert ("val-cases-GED4" in record) == (_site_of(grid, reply) != "C")
            elif isinstance(record, ArrayRecord):
                arrays = {k: a.numpy() for k, a in record.items()}
                if kind == "train":
                    assert {k: a.shape for k, a in arrays.items()} == shapes
                else:  # the fingerprint: aggregates only, no per-case vectors
                    assert kind == "query.fingerprint"
                    assert all(a.dtype.kind in "fiu" for a in arrays.values())
            else:
                assert isinstance(record, ConfigRecord)
                allowed = {"query.identify": {"site", "role", "labeled-phases"}, "train": {"sha256"}}[kind]
                assert set(record) == allowed
                assert not any(str(v) in case_ids for v in record.values())
    assert seen_types == {"query.identify", "query.fingerprint", "train", "evaluate"}
    # fp16 transport: the train replies carry float16 arrays
    train_reply = next(r for r in grid.replies if r.metadata.message_type == "train")
    assert next(iter(train_reply.content["arrays"].values())).dtype == np.dtype("float16").name
    # the optimiser momentum each training site keeps for its next round stays in its own context
    kept = [ctx.state[MOMENTUM_KEY] for ctx in grid.contexts.values() if MOMENTUM_KEY in ctx.state]
    assert len(kept) == 2 and all(len(record) > len(shapes) / 2 for record in kept)
    assert all(shapes[k] == a.shape for record in kept for k, a in record.items())
