"""Labeled phases follow the data: a site whose masks are on T2 trains, validates, gates and
propagates from T2; a GED4 site behaves as before."""

from __future__ import annotations

import shutil

import pytest

from client.label_propagation import propagate_mask
from client.site import SiteData, SiteIdentity
from client.trainer import CPSTrainer, TrainerConfig
from common.phases import parse_labeled_phases
from common.planning import default_test_plans
from server.report import best_section, format_table, selection_score
from test_trainer import _quiet, _tiny_plans

PLANS = default_test_plans((16, 32, 32))


def _liqa_site(root, *, relabel_on: str | None = None, labeled_phases=None) -> SiteData:
    """A one-centre phantom site (2 labeled + 1 unlabeled training cases, 1 validation, 1 test);
    with `relabel_on`, every GED4 mask of a training or validation case is replaced by the same
    liver drawn on that phase's grid (as radiologists who label T2 would hand it over)."""
    from simulations.phantoms import PhantomConfig, generate_liqa_tree

    data = root / "data"
    generate_liqa_tree(data, PhantomConfig(centers=("A",), heldout=(), cases=3, labeled=2, seed=3,
                                           test_cases=1, validation_cases=1, missing_rate=0.0))
    if relabel_on:
        for ged4_mask in (data / "Vendor_A").glob("*/mask_GED4.nii.gz"):
            case = ged4_mask.parent
            if (case / "mask_T1.nii.gz").exists():  # a test case: a mask on every phase stays
                continue
            propagate_mask(ged4_mask, case / f"{relabel_on}.nii.gz", case / f"mask_{relabel_on}.nii.gz", (1, 2))
            ged4_mask.unlink()
    identity = SiteIdentity("A", "train", data, root / "cache", root / "out", centers=("A",))
    return SiteData(identity, unlabeled_phases=("T1", "T2"), labeled_phases=labeled_phases)


@pytest.fixture(scope="module")
def t2_site(tmp_path_factory):
    return _liqa_site(tmp_path_factory.mktemp("t2-labeled"), relabel_on="T2")


@pytest.fixture(scope="module")
def ged4_site(tmp_path_factory):
    return _liqa_site(tmp_path_factory.mktemp("ged4-labeled"))


def test_labeled_phases_setting_parses_auto_and_lists():
    assert parse_labeled_phases("auto") is None
    assert parse_labeled_phases("T2,GED4") == ("GED4", "T2")  # GED4 first, whatever the order given
    with pytest.raises(ValueError, match="'T5'.*auto"):
        parse_labeled_phases("T2,T5")


def test_a_t2_labeled_site_trains_validates_and_propagates_from_t2(t2_site):
    assert t2_site.labeled_phases == ("T2",)
    labeled = sorted((c.case_id, p) for c, p in t2_site.labeled_pairs())
    assert [p for _, p in labeled] == ["T2", "T2"]
    # Validation (model selection, the CPS gate) looks at the validation case's T2.
    assert [p for _, p in t2_site.validation_pairs()] == ["T2"]
    volumes = t2_site.training_volumes(PLANS, propagate_labels=True)
    assert volumes.labeled_phases == ("T2",) and not volumes.problems
    by_case = {}
    for v in volumes.labeled:
        by_case.setdefault(v.case_id, set()).add(v.phase)
    # Each labeled case: its T2 mask, carried onto GED4 and T1 (GED4 first in training order).
    assert by_case == {case: {"GED4", "T1", "T2"} for case, _ in labeled}
    propagated = sorted(p.name for p in (t2_site.identity.cache_dir / "propagated").rglob("*.nii.gz"))
    assert propagated == sorted(f"mask_{q}_from_T2.nii.gz" for _ in labeled for q in ("GED4", "T1"))
    # The unlabeled training case gives GED4, T1 and T2 unlabeled; no labeled volume is also unlabeled.
    unlabeled = {(v.case_id, v.phase) for v in volumes.unlabeled}
    assert not unlabeled & {(v.case_id, v.phase) for v in volumes.labeled}
    assert {p for _, p in unlabeled} == {"GED4", "T1", "T2"}


def test_an_explicit_setting_overrides_auto(tmp_path):
    site = _liqa_site(tmp_path, relabel_on="T2", labeled_phases=("GED4",))
    assert site.labeled_phases == ("GED4",)
    assert site.labeled_pairs() == [] and site.validation_pairs() == []  # no GED4 mask at this site


def test_a_ged4_site_is_unchanged(ged4_site):
    assert ged4_site.labeled_phases == ("GED4",)
    assert {p for _, p in ged4_site.labeled_pairs()} == {"GED4"}
    assert [p for _, p in ged4_site.validation_pairs()] == ["GED4"]
    propagated = {p.name for p in (ged4_site.identity.cache_dir / "propagated").rglob("*.nii.gz")}
    ged4_site.training_volumes(PLANS, propagate_labels=True)
    propagated = {p.name for p in (ged4_site.identity.cache_dir / "propagated").rglob("*.nii.gz")} - propagated
    assert propagated == {"mask_T1_from_GED4.nii.gz", "mask_T2_from_GED4.nii.gz"}


def test_the_true_labels_keep_their_share_whatever_the_phase(t2_site):
    volumes = t2_site.training_volumes(PLANS, propagate_labels=True)
    config = TrainerConfig(mode="supervised", batch_size=1, prefetch=0, log_every=0, labeled_phases=("T2",))
    trainer = CPSTrainer(_tiny_plans(), volumes.labeled, [], config, log=_quiet)
    weights = trainer._labeled_phase_weights()
    # T2 (true) drawn half the time, GED4 and T1 (propagated) sharing the rest, as GED4 did before.
    assert weights == {"T2": 2.0, "GED4": 1.0, "T1": 1.0}


def _round(round_number: int, **validation):
    scores = {site: {phase: {"dice": dice, "dice_sd": None, "hd95": 5.0, "hd95_sd": None, "cases": 1}
                     for phase, dice in phases.items()} for site, phases in validation.items()}
    return {"round": round_number, "validation": scores}


def test_selection_pools_the_labeled_phases_and_says_so():
    history = [_round(1, A={"T2": 0.8, "T1": 0.1}, B={"GED4": 0.9})]
    assert selection_score(history[0], ["T2"]).dice.mean == pytest.approx(0.8)
    assert selection_score(history[0], ["GED4", "T2"]).dice.mean == pytest.approx(0.85)
    assert selection_score(history[0], ["GED4", "T2"]).cases == 2
    best = best_section(history, 1, ["GED4", "T2"])
    assert best["selected_on"] == "validation GED4+T2 Dice, training sites, n=2"
    assert best_section(history, 1, ["T2"])["selected_on"].startswith("validation T2 Dice")
    table = format_table({"A": {}}, [], labeled={"A": ["T2"], "B": ["GED4"]})
    assert table.splitlines()[-1].endswith("A T2; B GED4")


def test_a_bad_labeled_phase_is_one_line_at_the_command_line(tmp_path, capsys):
    from fedliver.cli import main

    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "M"), "--labeled-phases", "T9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "T9" in err[0] and "--labeled-phases" in err[0]
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_a_federation_of_t2_and_ged4_sites_selects_on_each_sites_labels(tmp_path):
    """Real ServerApp and ClientApp code in process: A's masks are on T2, B1's on GED4; validation,
    `checkpoints/best` and the report follow each site's labels."""
    import json

    import torch

    from client.client_app import app as client_app
    from common.federation_config import FederationConfig
    from inprocess_grid import InProcessGrid
    from server.federation import Federation
    from simulations.phantoms import PhantomConfig, generate_liqa_tree

    torch.set_num_threads(1)
    data = tmp_path / "data"
    generate_liqa_tree(data, PhantomConfig(centers=("A", "B1", "C"), cases=2, labeled=1, seed=3, profile="demo",
                                           heldout=("C",), test_cases=1, validation_cases=1, missing_rate=0.0))
    for ged4_mask in (data / "Vendor_A").glob("*/mask_GED4.nii.gz"):
        case = ged4_mask.parent
        if not (case / "mask_T1.nii.gz").exists():  # training and validation cases: relabel on T2
            propagate_mask(ged4_mask, case / "T2.nii.gz", case / "mask_T2.nii.gz", (1, 2))
            ged4_mask.unlink()
    sites = "A:train,B1:train,C:eval"
    run_config = {"data-root": str(data), "run-dir": str(tmp_path / "run"), "sites": sites, "num-server-rounds": 1,
                  "local-iterations": 2, "net-size": "T", "net-width": 2, "patch-size": "32,64,64", "batch-size": 1,
                  "mode": "cps", "seed": 0, "evaluate-every": 1, "agreement-volumes": 0}
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    log: list[str] = []
    report = Federation(InProcessGrid(client_app, nodes, run_config), FederationConfig.from_run_config(run_config),
                        log=log.append).run_all()

    assert report["labeled_phases"] == {"A": ["T2"], "B1": ["GED4"]}
    assert {site: sorted(scores) for site, scores in report["final"]["validation"].items()} == \
        {"A": ["T2"], "B1": ["GED4"]}
    assert report["best"]["round"] == 1
    assert report["best"]["selected_on"] == "validation GED4+T2 Dice, training sites, n=2"
    assert any("site A (train)" in line and "labeled T2" in line for line in log)
    assert json.loads((tmp_path / "run" / "report.json").read_text())["labeled_phases"]["A"] == ["T2"]
