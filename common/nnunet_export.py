"""Export a MODEL_DIR as an nnU-Net v2 trained-model folder, one fold per CPS branch.

Layout written (what `nnUNetPredictor.initialize_from_trained_model_folder` and
`nnUNetv2_predict_from_modelfolder -m OUT -f 0 1` read)::

    OUT/
      dataset.json               channel_names, labels {background: 0, liver: 1}, file_ending .nii.gz
      plans.json                 MODEL_DIR's plans unchanged (they are nnU-Net plans already: the same
                                 normalization, spacing, transposes, resampling and patch), the STU-Net
                                 `architecture` block naming `common.stunet.STUNet` by import path
      fold_0/checkpoint_final.pth   branch a: {network_weights, init_args, trainer_name,
      fold_1/checkpoint_final.pth   branch b:  inference_allowed_mirroring_axes}
      fedliver_export.json       provenance: source MODEL_DIR and its manifest hash, fold -> branch,
                                 SHA-256 of each checkpoint, what nnU-Net does not apply (postprocessing)

The `.pth` files are the one place fedliver writes a pickle, because nnU-Net's format demands it;
fedliver never loads them. They hold only tensors and plain containers (no torch.device, no numpy),
so `torch.load(..., weights_only=True)` opens them.

To use OUT with `nnUNetv2_predict -d 999 -tr nnUNetTrainer -p fedliverPlans -c 3d_fullres`, place it
at `$nnUNet_results/Dataset999_FedLiver/nnUNetTrainer__fedliverPlans__3d_fullres` (the plans'
dataset_name and plans_name). The process running nnU-Net must be able to import fedliver's
`common` package (installing fedliver is enough).

The preprocessing and the net are the same bit for bit; the decision rule is not quite: nnU-Net
averages (over tiles and folds) and resamples to the raw grid *logits*, `fedliver predict` softmax
probabilities. Boundary voxels move: on phantoms, per-volume Dice 0.988-0.990 and voxel agreement
0.998 between the two (tests/test_nnunet_export.py). nnU-Net does not apply MODEL_DIR's
postprocessing (largest component): fedliver_export.json records it. With `ensemble="softmax"` the
pair is one net in fold_0 (`common.stunet.STUNetEnsemble`: the mean of the branches' softmaxes, fedliver's rule):
Dice 0.9999 per volume to `fedliver predict` in the same test.
"""

from __future__ import annotations

import json
from copy import deepcopy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from common.atomic_write import atomic_directory
from common.hashing import sha256_file
from common.model_dir import ModelBundle, load_model_dir
from common.names import BRANCHES, CONFIGURATION
from common.planning import DATASET_JSON
from common.postprocessing import Postprocessing

STUNET_CLASS = "common.stunet.STUNet"
ENSEMBLE_CLASS = "common.stunet.STUNetEnsemble"
ENSEMBLES = ("folds", "softmax")
CHECKPOINT_NAME = "checkpoint_final.pth"
PROVENANCE_FILE = "fedliver_export.json"


class ExportError(ValueError):
    """A MODEL_DIR that cannot be expressed as an nnU-Net model folder, or an OUT that may not be written."""


@dataclass(frozen=True)
class ExportConfig:
    branches: Sequence[str] | None = None          # fold k = branches[k]; None: every branch, sorted (a, b)
    trainer_name: str = "nnUNetTrainer"            # builds the net from the plans alone (get_network_from_plans)
    # nnU-Net mirrors these when TTA is on (its default); None: the axes the model trained with
    # (MODEL_DIR info `mirror_axes`; (0, 1, 2) when it does not say), so a net trained unmirrored is
    # not averaged over flips it never saw.
    mirroring_axes: tuple[int, ...] | None = None
    overwrite: bool = False                        # replace OUT if it is an earlier export (has PROVENANCE_FILE)
    # "folds": one fold per branch (nnU-Net averages their logits); "softmax": fold_0 holds the pair as
    # one net returning the mean softmax, fedliver predict's rule (Dice >= 0.99 to it per volume).
    ensemble: str = "folds"

    def __post_init__(self) -> None:
        if self.ensemble not in ENSEMBLES:
            raise ExportError(f"ensemble {self.ensemble!r}: use one of {', '.join(ENSEMBLES)}")


@dataclass
class ExportResult:
    out: Path
    folds: dict[int, str]                          # fold -> branch
    notes: list[str] = field(default_factory=list)

    def predict_command(self) -> str:
        folds = " ".join(str(f) for f in sorted(self.folds))
        return f"nnUNetv2_predict_from_modelfolder -i IN -o OUT -m {self.out} -f {folds}"


# --------------------------------------------------------------------------------------------- pieces
def nnunet_plans(plans: dict, where: str = "plans.json") -> dict:
    """MODEL_DIR's plans as nnU-Net reads them: a copy, with the STU-Net class named if missing.

    Everything that decides preprocessing (normalization, spacing, transposes, resampling) is kept
    as it is: the exported model must see the same input as fedliver's own predictor.
    """
    plans = deepcopy(plans)
    try:
        conf = plans["configurations"][CONFIGURATION]
        arch = conf["architecture"]
        kwargs = arch["arch_kwargs"]
    except (KeyError, TypeError):
        raise ExportError(f"{where}: no configurations.{CONFIGURATION}.architecture.arch_kwargs "
                          f"(not STU-Net plans written by fedliver)") from None
    if not isinstance(kwargs, dict):
        raise ExportError(f"{where}: architecture.arch_kwargs is not an object")
    arch.setdefault("network_class_name", STUNET_CLASS)
    arch.setdefault("_kw_requires_import", [])
    for key in ("transpose_forward", "transpose_backward"):  # nnU-Net reads them; older plans may lack them
        plans.setdefault(key, [0, 1, 2])
    plans.setdefault("image_reader_writer", "SimpleITKIO")
    plans.setdefault("label_manager", "LabelManager")
    return plans


def nnunet_dataset_json(plans: dict, num_training: int = 0) -> dict:
    """dataset.json for the export: one channel per normalization scheme, fedliver's labels."""
    schemes = plans["configurations"][CONFIGURATION].get("normalization_schemes") or ["ZScoreNormalization"]
    base = DATASET_JSON["channel_names"]["0"]
    channels = {str(i): base if i == 0 else f"{base}_{i}" for i in range(len(schemes))}
    return {
        "channel_names": channels,
        "labels": dict(DATASET_JSON["labels"]),
        "file_ending": DATASET_JSON["file_ending"],
        "numTraining": int(num_training),
        "description": "liver segmentation exported by `fedliver export-nnunet`; "
                       "fold k = CPS branch k, see fedliver_export.json",
    }


def _check_network(plans: dict, dataset_json: dict, states: dict[str, dict[str, torch.Tensor]],
                   bundle: ModelBundle) -> None:
    """Build the net the way nnU-Net will (get_network_from_plans) and check every branch fits it.

    Built on the meta device: only names and shapes matter, nothing is allocated.
    """
    import pydoc

    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    where = bundle._where("plans.json")
    arch = plans["configurations"][CONFIGURATION]["architecture"]
    if pydoc.locate(arch["network_class_name"]) is None:
        raise ExportError(f"{where}: network class {arch['network_class_name']!r} cannot be imported")
    num_classes = len(dataset_json["labels"])
    try:
        with torch.device("meta"):
            net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"],
                                         arch["_kw_requires_import"], len(dataset_json["channel_names"]),
                                         num_classes, allow_init=False, deep_supervision=False)
    except Exception as e:  # a constructor that does not take these kwargs
        raise ExportError(f"{where}: nnU-Net cannot build {arch['network_class_name']} from its "
                          f"arch_kwargs ({' '.join(str(e).split())})") from None
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    for name, state in states.items():
        got = {k: tuple(v.shape) for k, v in state.items()}
        if got != expected:
            missing = sorted(set(expected) - set(got))
            extra = sorted(set(got) - set(expected))
            shapes = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
            detail = (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra
                      else f"{shapes[0]} is {got[shapes[0]]}, the plans make {expected[shapes[0]]}")
            raise ExportError(f"{bundle._where('model.safetensors')}: branch {name!r} does not fit the net "
                              f"nnU-Net builds from plans.json with {num_classes} classes and "
                              f"{len(dataset_json['channel_names'])} channel(s): {detail}")


def _checkpoint(state: dict[str, torch.Tensor], plans: dict, dataset_json: dict, fold: int,
                config: ExportConfig) -> dict:
    """What nnUNetTrainer.save_checkpoint writes, minus the training state inference does not read."""
    return {
        "network_weights": {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v
                            for k, v in state.items()},
        "init_args": {"plans": plans, "configuration": CONFIGURATION, "fold": fold, "dataset_json": dataset_json},
        "trainer_name": config.trainer_name,
        # None, not (): nnU-Net's predictor skips mirroring for None and fails on an empty tuple.
        "inference_allowed_mirroring_axes": tuple(int(a) for a in config.mirroring_axes) or None,
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _check_out(out: Path, overwrite: bool) -> bool:
    """True when `out` holds an earlier export to replace. Only an absent or empty folder, or an
    earlier export with `overwrite`, may be written: an export never deletes anything else."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder")
    if not any(out.iterdir()):
        return False
    if not (out / PROVENANCE_FILE).is_file():
        raise ExportError(f"{out}: exists, is not empty and is not an earlier export; choose another OUT")
    if not overwrite:
        raise ExportError(f"{out}: an earlier export is there (use --force to replace it)")
    return True


# --------------------------------------------------------------------------------------------- export
def export_nnunet(model_dir: Path, out: Path, config: ExportConfig | None = None) -> ExportResult:
    """Write the nnU-Net v2 model folder for `model_dir` at `out` (see module docstring).

    Raises ModelDirError (a missing or tampered MODEL_DIR, naming the file) or ExportError.
    Nothing is left at `out` when it fails.
    """
    config = config or ExportConfig()
    model_dir, out = Path(model_dir), Path(out)
    bundle = load_model_dir(model_dir)
    if config.mirroring_axes is None:
        config = replace(config, mirroring_axes=tuple(int(a) for a in bundle.info.get("mirror_axes", (0, 1, 2))))
    branches = list(config.branches) if config.branches else sorted(bundle.branches)
    unknown = [b for b in branches if b not in bundle.branches]
    if unknown:
        raise ExportError(f"{model_dir}: no branch {unknown[0]!r} (has {', '.join(sorted(bundle.branches))})")
    plans = nnunet_plans(bundle.plans, bundle._where("plans.json"))
    num_labeled = bundle.info.get("num_labeled")
    dataset_json = nnunet_dataset_json(plans, num_labeled if isinstance(num_labeled, int) else 0)
    if config.ensemble == "softmax":
        if branches != list(BRANCHES):
            raise ExportError(f"--ensemble softmax exports the pair {', '.join(BRANCHES)} as one net "
                              f"(got {', '.join(branches)})")
        plans["configurations"][CONFIGURATION]["architecture"]["network_class_name"] = ENSEMBLE_CLASS
        states = {"a+b": {f"{b}.{k}": v for b in branches for k, v in bundle.branches[b].items()}}
    else:
        states = {name: bundle.branches[name] for name in branches}
    _check_network(plans, dataset_json, states, bundle)
    if config.trainer_name != "nnUNetTrainer":  # the default is nnU-Net's own; others must be findable
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

        try:
            recursive_find_trainer_class_by_name(config.trainer_name)
        except Exception:
            raise ExportError(f"trainer {config.trainer_name!r}: nnU-Net cannot find it under "
                              f"nnunetv2.training.nnUNetTrainer") from None

    _check_out(out, config.overwrite)  # refuse before any work
    folds = {k: name for k, name in enumerate(states)}
    notes = []
    try:
        postprocessing = str(Postprocessing.from_info(bundle.info.get("postprocessing")))
    except (ValueError, TypeError, AttributeError):  # free JSON: describe, never fail on it
        postprocessing = json.dumps(bundle.info.get("postprocessing"))
    if postprocessing != "none":
        notes.append(f"MODEL_DIR's postprocessing, {postprocessing}, is not part of the export: nnU-Net "
                     f"writes the raw argmax, like `fedliver predict --postprocessing none`")
    with atomic_directory(out) as tmp:  # an earlier export is replaced only once the new one is whole
        _write_json(tmp / "dataset.json", dataset_json)
        _write_json(tmp / "plans.json", plans)
        digests = {}
        for fold, name in folds.items():
            folder = tmp / f"fold_{fold}"
            folder.mkdir()
            torch.save(_checkpoint(states[name], plans, dataset_json, fold, config), folder / CHECKPOINT_NAME)
            digests[f"fold_{fold}/{CHECKPOINT_NAME}"] = sha256_file(folder / CHECKPOINT_NAME)
        _write_json(tmp / PROVENANCE_FILE, {
            "exported_from": str(model_dir.resolve()),
            "source_manifest_sha256": bundle.manifest.get("manifest_sha256"),
            "folds": {str(k): v for k, v in folds.items()},
            "trainer_name": config.trainer_name,
            "configuration": CONFIGURATION,
            "checkpoints_sha256": digests,
            "postprocessing_not_applied_by_nnunet": postprocessing,
            "ensembling": ("fold 0 is the pair, returning the mean of its softmaxes: fedliver predict's rule"
                           if config.ensemble == "softmax" else
                           "nnU-Net averages the folds' logits; fedliver predict averages the branches' softmaxes"),
        })
        _check_out(out, config.overwrite)  # again: OUT may have been written to while we exported
    return ExportResult(out=out, folds=folds, notes=notes)


__all__ = ["ExportConfig", "ExportError", "ExportResult", "export_nnunet", "nnunet_plans", "nnunet_dataset_json"]
