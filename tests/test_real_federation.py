"""`python -m simulations.experiments real-federation`: the split it writes (sizes, test cases never
train, unlabeled cases' masks neither written nor read) and the experiment end to end on a tiny
generated nnU-Net raw set, through `fedliver train` and the real Flower simulation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_real_mri_benchmark import _real_like_dataset

from common.discovery import index_dataset
from simulations.experiments.real_federation import plan_split, write_site_tree
from simulations.experiments import real_federation

IDS = [f"case_{i:03d}" for i in range(12)]


def test_split_sizes_roles_and_seed():
    plan = plan_split(IDS, sites=3, labeled_per_site=1, test_per_site=1, seed=0)
    assert list(plan) == ["S1", "S2", "S3"]
    for roles in plan.values():
        assert {k: len(v) for k, v in roles.items()} == {"test": 1, "labeled": 1, "validation": 1, "unlabeled": 1}
    every = [c for roles in plan.values() for ids in roles.values() for c in ids]
    assert sorted(every) == IDS  # each case once
    assert plan_split(IDS, 3, 1, 1, seed=0) == plan
    assert plan_split(IDS, 3, 1, 1, seed=1) != plan
    # Too few for a validation case and an unlabeled one: no validation.
    small = plan_split(IDS[:9], 3, 1, 1, seed=0)
    assert all(len(r["validation"]) == 0 and len(r["unlabeled"]) == 1 for r in small.values())
    with pytest.raises(ValueError, match="site S3"):
        plan_split(IDS[:5], 3, 1, 1, seed=0)


def test_site_tree_keeps_test_out_of_training_and_never_reads_unlabeled_masks(tmp_path):
    source = _real_like_dataset(tmp_path / "Dataset901_Real", cases=12)
    plan = plan_split(IDS, 3, 1, 1, seed=0)
    unlabeled = [c for roles in plan.values() for c in roles["unlabeled"]]
    for case_id in unlabeled:  # a read of these would fail: the split must not need them
        (source / "labelsTr" / f"{case_id}.nii.gz").write_bytes(b"not a NIfTI file")
    tree = write_site_tree(source, plan, tmp_path / "data")

    index = index_dataset(tree)
    assert not index.problems, index.problems
    by_id = {c.case_id: c for c in index.cases}
    assert sorted(by_id) == IDS and index.centers == ["S1", "S2", "S3"]
    for site, roles in plan.items():
        assert json.loads((tree / f"Vendor_{site}" / "splits.json").read_text(encoding="utf-8")) == {
            "validation": roles["validation"], "test": roles["test"]}
        for role, ids in roles.items():
            for case_id in ids:
                case = by_id[case_id]
                assert case.center == site
                assert case.split == {"test": "test", "validation": "validation"}.get(role, "train")
                assert set(case.images) == {"T2"}
                assert bool(case.masks) == (role != "unlabeled")  # no mask file in the written tree
                if case.masks:  # the liver alone (label 2 of the source's map), binary
                    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(case.masks["T2"])))
                    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "labelsTr" / f"{case_id}.nii.gz")))
                    assert set(np.unique(mask)) == {0, 1} and np.array_equal(mask == 1, truth == 2)
    trained = [c.case_id for c in index.cases if c.split == "train"]
    assert not set(trained) & {c for roles in plan.values() for c in roles["test"] + roles["validation"]}
    assert write_site_tree(source, plan, tmp_path / "data") == tree  # the same plan: kept as written


def test_real_federation_end_to_end(tmp_path):
    data = _real_like_dataset(tmp_path / "Dataset902_Real", cases=12)
    holdout = _real_like_dataset(tmp_path / "Dataset903_Holdout", cases=2)
    out = tmp_path / "out"
    arms = "local-cps,federated-cps,pooled-cps,pooled-supervised,pooled-full"
    assert real_federation.main([
        "--data", str(data), "--holdout", str(holdout), "--out", str(out), "--sites", "3",
        "--labeled-per-site", "1", "--test-per-site", "1", "--site-iterations", "3", "--rounds", "1",
        "--threads", "1", "--arms", arms, "--target-spacing", "3.0,3.0,3.0",
        "--federated-run-config", "proximal-mu=0.01"]) == 0

    with (out / "results.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["arm", "group", "phase", "seed", "n", "dice_mean", "dice_sd", "hd95_mean"]
    overall = {(r["arm"], r["group"]): r for r in rows if r["seed"] == "all"}
    assert {a for a, _ in overall} == set(arms.split(","))
    for arm in arms.split(","):
        assert int(overall[arm, "in-distribution"]["n"]) == 3  # one test case per site
        assert int(overall[arm, "holdout"]["n"]) == 2 and int(overall[arm, "validation"]["n"]) == 3
        assert all(0.0 <= float(r["dice_mean"]) <= 1.0 for r in rows if r["arm"] == arm)
    (federated,) = (out / "arms").glob("federated-cps_*")
    assert federated.name.endswith("_r1_proximal-mu-0.01")  # overrides name the arm: no stale reuse
    report = json.loads((federated / "federation" / "report.json").read_text(encoding="utf-8"))
    assert float(report["config"]["proximal_mu"]) == 0.01
    assert report["labeled_phases"] == {"S1": ["T2"], "S2": ["T2"], "S3": ["T2"]}
    assert "local-cps" in (out / "table.md").read_text(encoding="utf-8") and (out / "real_federation.png").stat().st_size > 0
    # The federation's plans carry the target spacing.
    plans = json.loads(next((out / "arms").glob("federated-cps_*/federation/plans.json")).read_text(encoding="utf-8"))
    assert plans["configurations"]["3d_fullres"]["spacing"] == [3.0, 3.0, 3.0]


def test_demo_federates_a_liqa_tree_the_user_has(tmp_path):
    """`python -m simulations.demo --data-root DIR --sites ...`: no phantoms, the user's sites and roles."""
    from simulations import demo

    source = _real_like_dataset(tmp_path / "Dataset904_Real", cases=9)
    tree = write_site_tree(source, plan_split([f"case_{i:03d}" for i in range(9)], 3, 1, 1, seed=0), tmp_path / "data")
    run_dir = tmp_path / "run"
    assert demo.main(["--data-root", str(tree), "--sites", "S1:train,S2:train,S3:eval", "--rounds", "1",
                      "--local-iterations", "1", "--run-dir", str(run_dir),
                      "--run-config", "patch-size='16,32,32' target-spacing='3.0,3.0,3.0'"]) == 0
    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    assert report["training_centers"] == ["S1", "S2"] and report["heldout_centers"] == ["S3"]
    assert set(report["final"]["centers"]["S3"]) == {"T2"}  # every case of the held-out site, its masked phase
    assert not (run_dir / "data").exists()  # nothing generated
    with pytest.raises(SystemExit):
        demo.main(["--sites", "S1:train"])  # --sites belongs to --data-root
