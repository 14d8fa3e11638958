"""`python -m simulations.experiments real-mri` on a tiny generated nnU-Net raw dataset: every model
predicted and scored per case, the CSV, the table and the worst-case overlays."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_inference import write_model_dir

from simulations.experiments import real_mri


def _real_like_dataset(root: Path, cases: int = 4) -> Path:
    """An nnU-Net raw set (channel T2) whose label map has several organs; the liver is label 2."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(cases):
        labels = np.zeros((10, 40, 36), np.uint8)
        labels[2:8, 6:26, 4 + i:20 + i] = 2      # liver
        labels[3:7, 28:36, 24:32] = 1            # another organ
        image = rng.normal(20, 3, labels.shape).astype(np.float32) + 60.0 * (labels == 2) + 120.0 * (labels == 1)
        for array, path in ((image, root / "imagesTr" / f"case_{i:03d}_0000.nii.gz"),
                            (labels, root / "labelsTr" / f"case_{i:03d}.nii.gz")):
            img = sitk.GetImageFromArray(array)
            img.SetSpacing((1.5, 1.5, 3.0))
            sitk.WriteImage(img, str(path), useCompression=True)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T2"}, "labels": {"background": 0, "spleen": 1, "liver": 2},
        "numTraining": cases, "file_ending": ".nii.gz"}))
    return root


def _pair_file(model_dir: Path, path: Path) -> Path:
    """A pretrained pair file (`a.*`, `b.*`) with the plans in its provenance, as simulations.pretrain writes."""
    from common.model_dir import load_model_dir
    from common.pretrained import save_safetensors

    bundle = load_model_dir(model_dir)
    save_safetensors({f"{b}.{k}": v for b, s in bundle.branches.items() for k, v in s.items()}, path)
    path.with_suffix(".json").write_text(json.dumps({"base_width": 4, "plans": bundle.plans}))
    return path


def test_real_mri_scores_every_model_per_case(tmp_path):
    data = _real_like_dataset(tmp_path / "Dataset900_Real")
    model = write_model_dir(tmp_path / "model")
    start = _pair_file(model, tmp_path / "start.safetensors")
    out = tmp_path / "out"
    assert real_mri.main(["--data", str(data), "--models", f"tuned={model},{start}", "--out", str(out),
                          "--threads", "1"]) == 0

    with (out / "results.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["model", "case", "phase", "dice", "hd95"]
    assert sorted({r["model"] for r in rows}) == ["start", "tuned"]
    assert len(rows) == 8 and {r["phase"] for r in rows} == {"T2"}
    # The same nets: the pair file scores exactly as its MODEL_DIR (the plans came from the provenance).
    by_model = {m: [float(r["dice"]) for r in rows if r["model"] == m] for m in ("start", "tuned")}
    assert by_model["start"] == by_model["tuned"]
    # Scored against the liver only (label 2 by name), as `fedliver evaluate` does.
    evaluation = json.loads((out / "pred" / "tuned" / "evaluation.json").read_text(encoding="utf-8"))
    assert float(rows[0]["dice"]) == pytest.approx(evaluation["cases"][rows[0]["case"]]["T2"]["dice"], abs=1e-4)

    table = (out / "table.md").read_text(encoding="utf-8")
    worst = min(by_model["tuned"])
    assert "| tuned | T2 | 4 |" in table and f"{worst:.3f} |" in table
    overlays = sorted(p.name for p in (out / "overlays").glob("*.png"))
    assert len(overlays) == 6 and sum(name.startswith("tuned_") for name in overlays) == 3

    # Kept: a rerun with one more model predicts only that one.
    stamp = (out / "pred" / "tuned" / "evaluation.json").stat().st_mtime_ns
    assert real_mri.main(["--data", str(data), "--models", f"tuned={model},again={model}", "--out", str(out),
                          "--threads", "1"]) == 0
    assert (out / "pred" / "tuned" / "evaluation.json").stat().st_mtime_ns == stamp
    assert (out / "pred" / "again" / "evaluation.json").is_file()


def test_real_mri_refuses_a_repeated_name_and_a_missing_model(tmp_path, capsys):
    with pytest.raises(ValueError, match="given twice"):
        real_mri.parse_models("m=a,m=b")
    data = _real_like_dataset(tmp_path / "Dataset901_Real", cases=1)
    assert real_mri.main(["--data", str(data), "--models", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    assert "no such MODEL_DIR or pretrained file" in capsys.readouterr().err
