"""Quality control of predictions: each term on constructed masks, the verdict, predictions.csv from
`fedliver predict`, `--review-dir`, and `fedliver evaluate`'s join to Dice (recall, false flags, AUROC)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from test_inference import _liqa_tree, model_dir, write_model_dir  # noqa: F401 (fixture)

from client.qc_evaluation import auroc, qc_summary
from client.quality_control import COLUMNS, QCReport, QCRules, VolumeQC, branch_terms, measure, relative_centroid
from common.inference import BranchProbabilities

SHAPE = (20, 60, 80)  # z, y, x; identity direction: x runs to the patient's left, y to posterior (LPS)


def _image(spacing=(7.0, 7.0, 7.0)) -> sitk.Image:
    """A body (a bright block) filling x 10-69, y 10-49 of every slice."""
    array = np.zeros(SHAPE, np.float32)
    array[:, 10:50, 10:70] = 100.0
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    return image


def _mask(x: slice, y: slice = slice(15, 35), z: slice = slice(4, 16), like: sitk.Image | None = None) -> sitk.Image:
    array = np.zeros(SHAPE, np.uint8)
    array[z, y, x] = 1
    mask = sitk.GetImageFromArray(array)
    mask.CopyInformation(like or _image())
    return mask


def _volume(**overrides) -> VolumeQC:
    base = dict(case="c1", phase="GED4", file="c1.nii.gz", prediction="p.nii.gz", volume_ml=1500.0, voxels=75_000,
                components=1, largest_share=1.0, agreement=0.92, entropy=0.1, centroid_left=0.3,
                centroid_posterior=0.5, centroid_superior=0.6)
    return VolumeQC(**{**base, **overrides})


def _measure(tmp_path: Path, mask: sitk.Image, probabilities=None) -> VolumeQC:
    image = _image()
    sitk.WriteImage(image, str(tmp_path / "image.nii.gz"))
    return measure("c1", "GED4", tmp_path / "image.nii.gz", tmp_path / "p.nii.gz", mask, probabilities)


def test_centroid_is_relative_to_the_body_in_patient_coordinates():
    image = _image()
    array = sitk.GetArrayFromImage(image)
    right = sitk.GetArrayFromImage(_mask(slice(12, 30))) > 0  # low x = the patient's right (LPS)
    left, posterior, superior = relative_centroid(right, array, image)
    assert left == pytest.approx((21 - 10) / 59, abs=0.03) and posterior == pytest.approx(0.39, abs=0.05)
    # The same voxels in a scan stored right-to-left (x axis flipped): still on the right.
    flipped = sitk.GetImageFromArray(array[:, :, ::-1].copy())
    flipped.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert relative_centroid(right[:, :, ::-1], array[:, :, ::-1], flipped)[0] == pytest.approx(left, abs=0.03)


def test_a_liver_on_the_patients_left_is_flagged(tmp_path):
    rules = QCRules()
    good = rules.verdict(_measure(tmp_path, _mask(slice(12, 30))))
    wrong_side = rules.verdict(_measure(tmp_path, _mask(slice(50, 68))))
    assert good.qc == "ok", good.qc_reasons
    assert wrong_side.qc == "review" and "left" in wrong_side.qc_reasons
    assert wrong_side.qc_score < 0.5 <= good.qc_score
    assert good.voxels == 12 * 20 * 18 and good.volume_ml == pytest.approx(12 * 20 * 18 * 0.343)  # 7 mm voxels


def test_branches_that_disagree_are_flagged():
    a = np.zeros(SHAPE, np.float32)
    a[4:16, 15:35, 12:30] = 1.0
    b = np.zeros(SHAPE, np.float32)
    b[4:16, 15:35, 40:58] = 1.0
    mean = (a + b) / 2
    mean[4:16, 15:35, 12:30] = 0.6  # the mean decides branch a's region, as a CPS pair's average might
    terms = branch_terms(mean, 2 * mean - b)
    assert terms["agreement"] < 0.1
    same = branch_terms(a, a)
    assert same["agreement"] == 1.0 and same["components"] == 1 and same["largest_share"] == 1.0
    assert same["entropy"] == pytest.approx(0.0, abs=1e-3) and terms["entropy"] > 0.9  # p = 0.6: 0.97 bits
    verdict = QCRules().verdict(_volume(agreement=terms["agreement"]))
    assert verdict.qc == "review" and "branches disagree" in verdict.qc_reasons


def test_fragments_and_a_missing_liver_are_flagged():
    mean = np.zeros(SHAPE, np.float32)
    mean[2:8, 10:20, 10:20] = 0.9
    mean[12:18, 30:40, 50:60] = 0.9
    terms = branch_terms(mean, mean)
    assert terms["components"] == 2 and terms["largest_share"] == pytest.approx(0.5)
    assert "fragmented" in QCRules().verdict(_volume(largest_share=0.5)).qc_reasons
    empty = QCRules().verdict(_volume(voxels=0, volume_ml=0.0))
    assert (empty.qc, empty.qc_score, empty.qc_reasons) == ("review", 0.0, "no liver found")


def test_a_phase_twice_the_others_volume_is_flagged():
    volumes = [_volume(phase=p, volume_ml=v) for p, v in (("GED4", 1500.0), ("T1", 1550.0), ("T2", 1480.0),
                                                          ("DWI_800", 3000.0))]
    volumes.append(_volume(case="c2", phase="GED4"))  # alone in its case: no cross-phase term
    report = QCReport.judge(volumes)
    by_phase = {(v.case, v.phase): v for v in report.volumes}
    assert by_phase["c1", "DWI_800"].phase_volume_deviation == pytest.approx(3000 / 1525 - 1)
    assert by_phase["c1", "DWI_800"].qc == "review" and "other phases" in by_phase["c1", "DWI_800"].qc_reasons
    assert all(by_phase["c1", p].qc == "ok" for p in ("GED4", "T1", "T2"))
    assert math.isnan(by_phase["c2", "GED4"].phase_volume_deviation) and by_phase["c2", "GED4"].qc == "ok"
    assert [v.case for v in report.review] == ["c1"]


def test_predictions_csv_schema(tmp_path):
    report = QCReport.judge([_volume(), _volume(case="c2", agreement=0.1)])
    csv_path, json_path = report.write(tmp_path)
    with csv_path.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == COLUMNS and list(COLUMNS[-3:]) == ["qc_score", "qc", "qc_reasons"]
    assert [r["qc"] for r in rows] == ["ok", "review"]
    assert all(0.0 <= float(r["qc_score"]) <= 1.0 for r in rows)
    assert rows[0]["phase_volume_deviation"] == ""  # one phase: no cross-phase term, an empty cell
    saved = json.loads(json_path.read_text(encoding="utf-8"))
    assert saved["rules"]["min_agreement"] == QCRules().min_agreement and len(saved["volumes"]) == 2


def test_sliding_window_keeps_the_first_branch():
    """`BranchProbabilities.first` is branch a's own sliding window; 2 * mean - first is branch b's."""
    from common.inference import _sliding_window
    from common.planning import default_test_plans
    from common.stunet import build_stunet_from_plans

    plans = default_test_plans(patch_size=(16, 32, 32))
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(build_stunet_from_plans(plans, deep_supervision=False))
    data = torch.randn(1, 20, 40, 36)
    mean, _, first = _sliding_window(nets, data, (16, 32, 32), 0.5, False, 1, keep_first=True)
    alone_a, _, none = _sliding_window(nets[:1], data, (16, 32, 32), 0.5, False, 1, keep_first=True)
    alone_b, _, _ = _sliding_window(nets[1:], data, (16, 32, 32), 0.5, False, 1)
    assert none is None  # one branch: nothing to compare
    assert torch.allclose(first, alone_a, atol=1e-5) and torch.allclose(2 * mean - first, alone_b, atol=1e-5)
    plain, _, kept = _sliding_window(nets, data, (16, 32, 32), 0.5, False, 1)
    assert kept is None and torch.equal(plain, mean)  # keeping it changes nothing


def test_predict_writes_qc_and_evaluate_joins_it(tmp_path, model_dir, capsys):
    from fedliver.cli import main

    data = _liqa_tree(tmp_path / "data")
    out, review = tmp_path / "pred", tmp_path / "review"
    main(["predict", "-i", str(data), "-o", str(out), "-m", str(model_dir), "--review-dir", str(review)])
    printed = capsys.readouterr().out
    with (out / "predictions.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    # The corrupt T2 has no prediction and no row; the two others of case 1 are compared with each other.
    assert sorted((r["case"], r["phase"]) for r in rows) == [("0001-A-S1", "GED4"), ("0001-A-S1", "T1"),
                                                              ("0002-A-S2", "GED4")]
    assert all(r["agreement"] != "" and float(r["voxels"]) >= 0 for r in rows)
    assert {r["phase_volume_deviation"] != "" for r in rows if r["case"] == "0001-A-S1"} == {True}
    flagged = [r for r in rows if r["qc"] == "review"]
    assert f"{len(flagged)} of 3 volume(s) to review" in printed
    assert sorted(p.name for p in review.glob("*.png")) == sorted(f"{r['case']}_{r['phase']}.png" for r in flagged)

    assert main(["evaluate", "--pred", str(out), "--truth", str(data)]) == 0
    report = json.loads((out / "evaluation.json").read_text(encoding="utf-8"))
    summary = report["quality_control"]["summary"]
    assert summary["n"] == 2  # the volumes with a reference (GED4 of both cases)
    assert {v["case"] for v in report["quality_control"]["volumes"]} == {"0001-A-S1", "0002-A-S2"}
    assert (out / "evaluation_qc.png").stat().st_size > 0 and "AUROC" in capsys.readouterr().out


def test_qc_summary_and_auroc():
    assert auroc([0.9, 0.8], [0.1, 0.2]) == 1.0 and auroc([0.1], [0.9]) == 0.0 and auroc([0.5], [0.5]) == 0.5
    assert auroc([], [0.3]) is None
    rows = [{"dice": 0.2, "qc_score": 0.1, "qc": "review"}, {"dice": 0.6, "qc_score": 0.6, "qc": "ok"},
            {"dice": 0.9, "qc_score": 0.9, "qc": "ok"}, {"dice": 0.95, "qc_score": 0.4, "qc": "review"}]
    s = qc_summary(rows)
    assert (s["failures"], s["failures_flagged"], s["recall_of_failures"]) == (2, 1, 0.5)
    assert (s["good"], s["good_flagged"], s["false_flag_rate"]) == (2, 1, 0.5)
    assert s["auroc"] == pytest.approx(0.75)  # failures' 1 - score: 0.9, 0.4; the others: 0.1, 0.6
