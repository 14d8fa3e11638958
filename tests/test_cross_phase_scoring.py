"""The cross-phase ablation scores an arm's MODEL_DIR through `client.prediction.predict` and
`client.prediction_evaluation.evaluate_predictions` (each in a spawned process, its output in the arm's
log), not through `fedliver`'s command line: a tiny random model, a held-out centre of two cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_inference import write_model_dir


def _write(array: np.ndarray, path: Path, spacing_xyz=(1.5, 1.5, 3.0)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing_xyz)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)


def _heldout_centre(root: Path) -> Path:
    """Vendor_C with two cases: GED4, T1 and GED2 images, a mask for each; GED2 is not a reported phase."""
    rng = np.random.default_rng(0)
    for n, case in enumerate(("0001-C-S1", "0002-C-S2")):
        for phase in ("GED4", "T1", "GED2"):
            image = rng.normal(10.0, 2.0, (8, 36, 32)).astype(np.float32)
            image[2:6, 8:24, 6 + n:20 + n] += 90.0
            _write(image, root / case / f"{phase}.nii.gz")
            _write((image > 50).astype(np.uint8), root / case / f"mask_{phase}.nii.gz")
    return root


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_model_dir(tmp_path / "model", base_width=2)


def test_score_predicts_and_evaluates_through_the_functions(tmp_path, model_dir):
    from common.metrics import evaluate_pair
    from simulations.experiments.cross_phase import score

    folder = _heldout_centre(tmp_path / "data" / "Vendor_C")
    work, log = tmp_path / "arm", tmp_path / "arm" / "log.txt"
    scores = score(model_dir, {"C": folder}, work, log, threads=1)

    pred = work / "pred-C"
    assert sorted(str(p.relative_to(pred)) for p in pred.rglob("*.nii.gz")) == [
        "0001-C-S1/GED4_pred.nii.gz", "0001-C-S1/T1_pred.nii.gz",
        "0002-C-S2/GED4_pred.nii.gz", "0002-C-S2/T1_pred.nii.gz"]  # --phases: the reported ones only
    expected = {phase: [evaluate_pair(pred / case / f"{phase}_pred.nii.gz",
                                      folder / case / f"mask_{phase}.nii.gz")["dice"]
                        for case in ("0001-C-S1", "0002-C-S2")] for phase in ("GED4", "T1")}
    assert scores == {"C": expected}  # per case, in case order, read back from evaluation.json
    assert json.loads((pred / "evaluation.json").read_text())["summary"]["T1"]["dice"]["n"] == 2
    text = log.read_text()  # both functions' output, in the arm's log
    assert "predicting 4 volume(s) with branch(es) a+b" in text and "1 CPU thread(s)" in text
    assert "4 volume(s) evaluated, 0 without reference, 0 error(s)" in text


def test_score_names_the_failing_step_and_its_log(tmp_path):
    from simulations.experiments.cross_phase import score

    folder = _heldout_centre(tmp_path / "data" / "Vendor_C")
    log = tmp_path / "arm" / "log.txt"
    with pytest.raises(RuntimeError, match=r"fedliver predict failed \(exit 1\); see .*log\.txt"):
        score(tmp_path / "no-model", {"C": folder}, tmp_path / "arm", log, threads=1)
    assert "no-model" in log.read_text()  # the function's one line, in the log


def test_simulations_never_drive_fedliver_through_argv():
    """No module under simulations/ imports fedliver's command line or names it for a subprocess
    (`python -m fedliver.cli ...`, `["fedliver", ...]`): they call the functions behind the commands."""
    import ast

    root = Path(__file__).resolve().parents[1]
    found = []
    for path in sorted((root / "simulations").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [node.value] if isinstance(node, ast.Constant) and isinstance(node.value, str) else [])
            found += [f"{path.relative_to(root)}:{node.lineno}: {name}" for name in names
                      if name in ("fedliver", "fedliver.cli", "fedliver.__main__")
                      or name.startswith("fedliver.commands")]
    assert not found, "simulations/ goes through fedliver's command line:\n" + "\n".join(found)
