"""`fedliver export-nnunet`: the exported folder runs with nnunetv2's own predictor and console script.

A MODEL_DIR trained briefly (30 supervised iterations from the shipped pretrained body, ~15 s) on
phantoms, so the liver is found and Dice between the two predictors means something. What is
asserted, from strict to loose:
  - the export carries MODEL_DIR's plans unchanged and each branch's weights bit for bit;
  - nnU-Net's preprocessing of an input from the exported folder equals fedliver's, and the net
    nnU-Net builds from the exported plans gives fedliver's outputs exactly, for every fold;
  - end to end, nnU-Net's predictor vs `fedliver predict --postprocessing none`: voxel agreement
    >= 99% and Dice >= 0.97 per volume. Not 0.99: nnU-Net averages and resamples *logits*,
    fedliver *softmax probabilities* (common/inference.py), which moves boundary voxels when the
    prediction is resampled to the raw grid (measured 0.98-0.99 here); with the probabilities of
    nnU-Net's own logits resampled the way fedliver does, Dice is >= 0.99, which is asserted too;
  - the console script `nnUNetv2_predict_from_modelfolder -f 0 1 -device cpu` writes a
    segmentation on the input's grid that matches the in-process predictor.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from common.model_dir import load_model_dir
from common.nnunet_env import private_nnunet_env
from common.nnunet_export import CHECKPOINT_NAME, PROVENANCE_FILE

PRETRAINED = Path(__file__).resolve().parents[1] / "simulations" / "pretrained" / "stunet_T4_atlas.safetensors"
VOLUMES = (("0001-A-S2", "GED4"), ("0002-A-S1", "GED4"), ("0001-A-S2", "DWI_800"))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int((a == 1).sum() + (b == 1).sum())
    return 2.0 * int(((a == 1) & (b == 1)).sum()) / total if total else 1.0


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(root, MODEL_DIR, exported folder, input folder of <case>_<PHASE>_0000.nii.gz)."""
    from fedliver.cli import main

    root = tmp_path_factory.mktemp("nnunet_export")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with private_nnunet_env(root / "nnunet"):
        assert main(["phantoms", str(root / "data"), "--centers", "A", "--cases", "3", "--labeled", "3",
                     "--seed", "0", "--missing-rate", "0"]) == 0
        assert main(["train", "--data", str(root / "data"), "--centers", "A", "--out", str(root / "model"),
                     "--mode", "supervised", "--iterations", "30", "--init", str(PRETRAINED), "--base-width", "4",
                     "--patch", "16,32,32", "--no-propagate-labels", "--threads", "1", "--log-every", "30",
                     "--cache", str(root / "cache")]) == 0
        torch.set_num_threads(1)
        assert main(["export-nnunet", str(root / "model"), str(root / "export")]) == 0
        inputs = root / "in"
        inputs.mkdir()
        for case, phase in VOLUMES:
            shutil.copy(root / "data" / "Vendor_A" / case / f"{phase}.nii.gz", inputs / f"{case}_{phase}_0000.nii.gz")
        yield root, root / "model", root / "export", inputs
    torch.set_num_threads(threads)


def _nnunet_predictor(export: Path, folds: tuple[int, ...]):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    # fedliver predict's defaults: step 0.5, Gaussian weighting, no mirroring.
    p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, perform_everything_on_device=False,
                        device=torch.device("cpu"), verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    p.initialize_from_trained_model_folder(str(export), use_folds=folds, checkpoint_name=CHECKPOINT_NAME)
    return p


def _fedliver_predictions(root: Path, model: Path, inputs: Path) -> Path:
    """`fedliver predict` on the inputs (once per module), raw argmax."""
    from fedliver.cli import main

    out = root / "pred_fedliver"
    if not out.exists():
        assert main(["predict", "-i", str(inputs), "-o", str(out), "-m", str(model), "--postprocessing", "none",
                     "--threads", "1"]) == 0
        torch.set_num_threads(1)
    return out


def _prediction_pairs(nn_out: Path, fl_out: Path):
    """(volume name, nnU-Net's mask, fedliver's mask) for every test volume."""
    for case, phase in VOLUMES:
        name = f"{case}_{phase}"
        yield name, _array(nn_out / f"{name}.nii.gz"), _array(fl_out / name / "GED4_pred.nii.gz")


@pytest.fixture(scope="module")
def predictor(setup):
    return _nnunet_predictor(setup[2], (0, 1))


def test_export_layout(setup):
    _, model, export, _ = setup
    bundle = load_model_dir(model)
    assert json.loads((export / "plans.json").read_text()) == bundle.plans  # same preprocessing, same net
    dataset = json.loads((export / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "MRI"} and dataset["labels"] == {"background": 0, "liver": 1}
    assert dataset["file_ending"] == ".nii.gz"
    provenance = json.loads((export / PROVENANCE_FILE).read_text())
    assert provenance["folds"] == {"0": "a", "1": "b"}
    assert provenance["source_manifest_sha256"] == bundle.manifest["manifest_sha256"]
    for fold, branch in ((0, "a"), (1, "b")):
        # Only tensors and plain containers: loads without unpickling arbitrary objects.
        ckpt = torch.load(export / f"fold_{fold}" / CHECKPOINT_NAME, weights_only=True)
        assert ckpt["trainer_name"] == "nnUNetTrainer"
        assert ckpt["init_args"]["configuration"] == "3d_fullres" and ckpt["init_args"]["fold"] == fold
        # trained without mirroring (mirror-axes ""): nnU-Net's test-time mirroring stays off (None)
        assert bundle.info["mirror_axes"] == [] and ckpt["inference_allowed_mirroring_axes"] is None
        state = bundle.branches[branch]
        assert set(ckpt["network_weights"]) == set(state)
        assert all(torch.equal(ckpt["network_weights"][k], state[k]) for k in state)


def test_nnunet_builds_the_same_net_and_preprocessing(setup, predictor):
    from common.preprocessing import preprocess_image
    from common.stunet import STUNet

    _, model, _, inputs = setup
    bundle = load_model_dir(model)
    assert type(predictor.network) is STUNet and not predictor.network.deep_supervision
    x = torch.randn(2, 1, *predictor.configuration_manager.patch_size, generator=torch.Generator().manual_seed(0))
    for params, branch in zip(predictor.list_of_parameters, ("a", "b")):
        predictor.network.load_state_dict(params)
        (ours,) = bundle.build_nets([branch])
        with torch.inference_mode():
            assert torch.equal(predictor.network.eval()(x), ours(x))

    image = inputs / "0001-A-S2_DWI_800_0000.nii.gz"
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    theirs, _, _ = preprocessor.run_case([str(image)], None, predictor.plans_manager,
                                         predictor.configuration_manager, predictor.dataset_json)
    ours, _, _ = preprocess_image(image, bundle.plans)
    np.testing.assert_array_equal(theirs, ours)


def test_nnunet_predictor_matches_fedliver_predict(setup, predictor, capsys):
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    from common.image_io import to_file_order

    root, model, _, inputs = setup
    nn_out = root / "pred_nnunet"
    nn_out.mkdir()
    # nnU-Net's pipeline (preprocess, sliding window over both folds, export) without worker processes;
    # the console-script test below runs predict_from_files with its workers.
    predictor.predict_from_files_sequential(str(inputs), str(nn_out), save_probabilities=False, overwrite=True)
    fl_out = _fedliver_predictions(root, model, inputs)
    figures = []
    for name, theirs, ours in _prediction_pairs(nn_out, fl_out):
        assert theirs.shape == ours.shape
        assert min((theirs == 1).sum(), (ours == 1).sum()) > 1000  # a trained model: Dice is meaningful
        figures.append((name, _dice(theirs, ours), float((theirs == ours).mean())))
    with capsys.disabled():
        print("\nnnU-Net predictor vs fedliver predict (Dice, voxel agreement): "
              + "; ".join(f"{n} {d:.4f} {a:.4f}" for n, d, a in figures))
    for name, dice, agreement in figures:
        assert agreement >= 0.99, (name, agreement)
        assert dice >= 0.97, (name, dice)

    # The same comparison with nnU-Net's per-fold probabilities averaged and resampled as fedliver does.
    name = "0001-A-S2_DWI_800"
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    data, _, props = preprocessor.run_case([str(inputs / f"{name}_0000.nii.gz")], None, predictor.plans_manager,
                                           predictor.configuration_manager, predictor.dataset_json)
    folds = predictor.list_of_parameters
    try:  # fold by fold: fedliver averages the branches' softmaxes, nnU-Net the folds' logits
        probs = []
        for params in folds:
            predictor.list_of_parameters = [params]
            probs.append(torch.softmax(predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).float(), 0))
    finally:
        predictor.list_of_parameters = folds
    seg = to_file_order(np.asarray(convert_predicted_logits_to_segmentation_with_correct_shape(
        sum(probs) / len(probs), predictor.plans_manager, predictor.configuration_manager,
        predictor.label_manager, props)), props)  # back from the plans' reader's (RAS) order, as write_seg does
    same_rule = _dice(np.asarray(seg), _array(fl_out / name / "GED4_pred.nii.gz"))
    with capsys.disabled():
        print(f"{name}, nnU-Net probabilities resampled: Dice {same_rule:.4f}")
    assert same_rule >= 0.99



def test_softmax_ensemble_export_follows_fedliver_predict(setup, capsys):
    """--ensemble softmax: fold_0 is the pair returning the mean of its softmaxes, fedliver's own rule."""
    from common.stunet import STUNetEnsemble
    from fedliver.cli import main

    root, model, _, inputs = setup
    export, nn_out = root / "export_softmax", root / "pred_nnunet_softmax"
    assert main(["export-nnunet", str(model), str(export), "--ensemble", "softmax"]) == 0
    assert sorted(p.name for p in export.glob("fold_*")) == ["fold_0"]
    p = _nnunet_predictor(export, (0,))
    assert type(p.network) is STUNetEnsemble
    nn_out.mkdir()
    p.predict_from_files_sequential(str(inputs), str(nn_out), save_probabilities=False, overwrite=True)
    figures = [(name, _dice(theirs, ours))
               for name, theirs, ours in _prediction_pairs(nn_out, _fedliver_predictions(root, model, inputs))]
    with capsys.disabled():
        print("\nnnU-Net (--ensemble softmax) vs fedliver predict, Dice: "
              + "; ".join(f"{n} {d:.4f}" for n, d in figures))
    assert all(dice >= 0.99 for _, dice in figures), figures
    with pytest.raises(SystemExit):
        main(["export-nnunet", str(model), str(root / "x"), "--ensemble", "mean"])

def test_console_script_predicts_on_the_input_grid(setup):
    root, _, export, inputs = setup
    script = Path(sys.executable).parent / "nnUNetv2_predict_from_modelfolder"
    assert script.is_file(), script
    one = root / "in_one"
    one.mkdir()
    name = "0001-A-S2_DWI_800"
    shutil.copy(inputs / f"{name}_0000.nii.gz", one)
    out = root / "pred_console"
    env = dict(os.environ, nnUNet_raw=str(root / "nnunet" / "nnUNet_raw"),
               nnUNet_preprocessed=str(root / "nnunet" / "nnUNet_preprocessed"),
               nnUNet_results=str(root / "nnunet" / "nnUNet_results"), OMP_NUM_THREADS="1")
    result = subprocess.run([str(script), "-i", str(one), "-o", str(out), "-m", str(export), "-f", "0", "1",
                             "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1", "--disable_progress_bar"],
                            cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    pred, src = sitk.ReadImage(str(out / f"{name}.nii.gz")), sitk.ReadImage(str(one / f"{name}_0000.nii.gz"))
    assert (pred.GetSize(), pred.GetSpacing(), pred.GetOrigin(), pred.GetDirection()) == \
           (src.GetSize(), src.GetSpacing(), src.GetOrigin(), src.GetDirection())
    seg = sitk.GetArrayFromImage(pred)
    assert set(np.unique(seg)) == {0, 1}
    in_process = root / "pred_nnunet" / f"{name}.nii.gz"
    if in_process.is_file():  # written by the previous test: same code and weights, other thread count
        assert (seg == _array(in_process)).mean() >= 0.999


def test_refuses_bad_model_dir_and_foreign_out(setup, tmp_path, capsys):
    from fedliver.cli import main

    _, model, export, _ = setup
    tampered = tmp_path / "tampered"
    shutil.copytree(model, tampered)
    info = tampered / "info.json"
    info.write_text(info.read_text().replace("supervised", "cps"))
    assert main(["export-nnunet", str(tampered), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "info.json" in err[0]
    assert not (tmp_path / "out").exists()

    (tampered / "model.safetensors").unlink()
    assert main(["export-nnunet", str(tampered), str(tmp_path / "out")]) == 1
    assert "model.safetensors" in capsys.readouterr().err

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    assert main(["export-nnunet", str(model), str(foreign)]) == 1
    assert "not an earlier export" in capsys.readouterr().err
    assert (foreign / "keep.txt").read_text() == "mine" and len(list(foreign.iterdir())) == 1

    assert main(["export-nnunet", str(model), str(tmp_path / "x"), "--branches", "a,c"]) == 1
    assert "no branch 'c'" in capsys.readouterr().err

    again = tmp_path / "again"
    shutil.copytree(export, again)
    assert main(["export-nnunet", str(model), str(again)]) == 1  # an earlier export needs --force
    assert "--force" in capsys.readouterr().err
    assert main(["export-nnunet", str(model), str(again), "--force", "--branches", "b"]) == 0
    assert sorted(p.name for p in again.iterdir() if p.is_dir()) == ["fold_0"]
    assert json.loads((again / PROVENANCE_FILE).read_text())["folds"] == {"0": "b"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
