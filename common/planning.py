"""nnU-Net plans for STU-Net: from a merged federated fingerprint, or a tiny test plan.

`plan_from_fingerprint` runs nnunetv2's own `ExperimentPlanner` on the merged fingerprint (written
into a private, temporary nnU-Net folder tree) and then adapts the "3d_fullres" configuration to
STU-Net: kernels all 3x3x3, exactly 5 strided stages, per-image z-score, optional CPU patch size.
Plans are pinned by `plans_hash`: the SHA-256 of their canonical JSON.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from common.atomic_write import atomic_write_text
from common.image_io import DEFAULT_READER
from common.names import CONFIGURATION  # re-exported: `from common.planning import CONFIGURATION` keeps working
from common.nnunet_env import private_nnunet_env

if TYPE_CHECKING:  # avoid importing the fingerprint module (and numpy work) just for a type
    from common.fingerprint import SiteFingerprint

DATASET_NAME = "Dataset999_FedLiver"
PLANS_NAME = "fedliverPlans"

#: The dataset.json nnU-Net sees: one MRI channel, two labels. Preprocessing uses it for labels.
DATASET_JSON: dict = {
    "channel_names": {"0": "MRI"},
    "labels": {"background": 0, "liver": 1},
    "file_ending": ".nii.gz",
}

SIZES = ("T", "S", "B", "L", "H")  # STU-Net sizes (common.stunet.STUNET_SIZES); "T" is the CPU width


@dataclass
class PlanningConfig:
    size: str = "T"                                   # STU-Net size: T, S, B, L, H
    base_width: int | None = None                     # overrides the size's first-stage width
    # Patch sizes are in the plans' axis order (after transpose_forward), which is (z, y, x) whenever z
    # has the coarsest spacing (LiQA, ATLAS). nnU-Net's planner sizes its patch for its own plain U-Net
    # at gpu_memory_target_gb, not for STU-Net: on CPU or for large STU-Nets set one of these.
    patch_size: tuple[int, int, int] | None = None    # replaces the planner's; rounded to the strides' products
    max_patch_size: tuple[int, int, int] | None = None  # caps the planner's per axis (rounded down)
    batch_size: int | None = None                     # None: keep the planner's choice
    # A coarser target spacing (mm, plans' axis order), nnU-Net's 3d_lowres idea: the same patch then
    # covers more of the body. None: the planner's 3d_fullres spacing (the median of the data).
    spacing: tuple[float, float, float] | None = None
    gpu_memory_target_gb: float = 8.0                 # nnU-Net planner's VRAM target (caps the patch)
    dataset_name: str = DATASET_NAME


# --------------------------------------------------------------------------------------------- STU-Net glue
def _architecture_block(size: str, base_width: int | None, strides: Sequence[Sequence[int]]) -> dict:
    """The plans' "architecture" block; common.stunet owns its format (imported lazily: torch)."""
    from common.stunet import stunet_architecture_block

    return stunet_architecture_block(size, base_width, strides)


def _stunet_strides(pool_op_kernel_sizes: Sequence[Sequence[int]]) -> list[list[int]]:
    """6 entries, the first [1,1,1], then the plan's strides cut or padded (with [1,1,1]) to 5."""
    from common.stunet import stunet_strides

    return [[1, 1, 1]] + stunet_strides(pool_op_kernel_sizes)


def _divisor(strides: Sequence[Sequence[int]]) -> list[int]:
    """What a patch edge must be divisible by: the product of the strides per axis."""
    return [int(np.prod([s[a] for s in strides])) for a in range(3)]


def _round_patch(patch_size: Sequence[int], divisor: Sequence[int]) -> list[int]:
    """Round each edge to the nearest multiple of its divisor (at least one multiple)."""
    return [max(d, int(round(p / d)) * d) for p, d in zip(patch_size, divisor)]


def _strides_for_patch(patch_size: Sequence[int], spacing: Sequence[float]) -> list[list[int]]:
    """nnU-Net's own topology rule for a given patch and spacing, adapted to STU-Net."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    _, pool, _, _, _ = get_pool_and_conv_props(list(spacing), list(patch_size), 4, 999999)
    return _stunet_strides(pool)


def _adapt_configuration(conf: dict, config: PlanningConfig) -> dict:
    """A STU-Net copy of a planner 3d_fullres configuration."""
    conf = deepcopy(conf)
    strides = _stunet_strides(conf["architecture"]["arch_kwargs"]["strides"])
    if config.spacing is not None:
        conf = _with_spacing(conf, config.spacing)
        if config.patch_size is None and config.max_patch_size is None:
            strides = _strides_for_patch(conf["patch_size"], conf["spacing"])
    if config.patch_size is not None:
        patch = list(config.patch_size)
        strides = _strides_for_patch(patch, conf["spacing"])
        patch = _round_patch(patch, _divisor(strides))
    elif config.max_patch_size is not None:
        patch = [min(int(p), int(m)) for p, m in zip(conf["patch_size"], config.max_patch_size)]
        strides = _strides_for_patch(patch, conf["spacing"])
        patch = [max(d, (p // d) * d) for p, d in zip(patch, _divisor(strides))]
    else:
        patch = _round_patch(conf["patch_size"], _divisor(strides))
    conf["patch_size"] = patch
    conf["architecture"] = _architecture_block(config.size, config.base_width, strides)
    conf["normalization_schemes"] = ["ZScoreNormalization"]
    conf["use_mask_for_norm"] = [False]
    if config.batch_size is not None:
        conf["batch_size"] = int(config.batch_size)
    conf["data_identifier"] = f"{PLANS_NAME}_{CONFIGURATION}"
    conf.pop("next_stage", None)
    conf.pop("previous_stage", None)
    conf.pop("inherits_from", None)
    return conf


def _with_spacing(conf: dict, spacing: Sequence[float]) -> dict:
    """`conf` resampled to `spacing`: the median image shrinks (or grows) with it, and so does a
    planner patch larger than that image (nnU-Net never plans a patch beyond the median shape)."""
    spacing = [float(s) for s in spacing]
    if len(spacing) != 3 or not all(s > 0 for s in spacing):
        raise ValueError(f"spacing needs 3 positive values (z,y,x mm), got {spacing}")
    scale = [old / new for old, new in zip(conf["spacing"], spacing)]
    median = [max(1, int(round(v * f))) for v, f in zip(conf["median_image_size_in_voxels"], scale)]
    conf["spacing"] = spacing
    conf["median_image_size_in_voxels"] = median
    conf["patch_size"] = [min(int(p), m) for p, m in zip(conf["patch_size"], median)]
    return conf


# --------------------------------------------------------------------------------------------- test plans
def default_test_plans(patch_size=(16, 32, 32), spacing=(4.0, 3.0, 3.0), size: str = "T",
                       base_width: int | None = None, source: str = "default_test_plans") -> dict:
    """A valid plans dict without any fingerprint, for tests of inference and training.

    spacing is (z, y, x) in mm; patch_size (z, y, x) is rounded to the strides' products.
    """
    strides = _strides_for_patch(patch_size, spacing)
    patch = _round_patch(patch_size, _divisor(strides))
    conf = {
        "data_identifier": f"{PLANS_NAME}_{CONFIGURATION}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": patch,
        "median_image_size_in_voxels": [int(p) * 2 for p in patch],
        "spacing": [float(s) for s in spacing],
        "normalization_schemes": ["ZScoreNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": _architecture_block(size, base_width, strides),
        "batch_dice": False,
    }
    return {
        "dataset_name": DATASET_NAME,
        "plans_name": PLANS_NAME,
        "original_median_spacing_after_transp": [float(s) for s in spacing],
        "original_median_shape_after_transp": [int(p) * 2 for p in patch],
        "image_reader_writer": DEFAULT_READER,
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {CONFIGURATION: conf},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        # Unused by ZScoreNormalization (per-image statistics), present because nnU-Net expects it.
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 1.0, "mean": 0.0, "median": 0.0, "min": -1.0,
                  "percentile_00_5": -1.0, "percentile_99_5": 1.0, "std": 1.0}
        },
        "fedliver": {"source": source},
    }


# --------------------------------------------------------------------------------------------- planning
@contextmanager
def _pool_workers_from_fork_server() -> Iterator[None]:
    """nnU-Net's planner opens a multiprocessing Pool. Forked from a process with other threads (a
    ServerApp's Flower threads, a pytest-xdist worker's), a worker can inherit a held lock and block
    forever, and planning hangs (seen at round 0 on loopback, and in the test suite): workers come
    from a clean fork server while planning."""
    start_method = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("forkserver", force=True)
    try:
        yield
    finally:
        multiprocessing.set_start_method(start_method, force=True)


def plan_from_fingerprint(fp: "SiteFingerprint", config: PlanningConfig | None = None,
                          timings: dict | None = None) -> dict:
    """Run nnU-Net's ExperimentPlanner on a merged fingerprint and adapt its plan to STU-Net.

    Deterministic: the same fingerprint and config give the same plans (and hash), so sites'
    preprocessing caches survive a re-plan. `timings`, when given, receives "planner_seconds".
    numTraining is the number of fingerprinted images (CPS trains on every one of them); nnU-Net
    uses it only to cap the batch size at 5% of the data.
    """
    # Imported by module path: nnunetv2's lookup by class name would import torchvision (broken here).
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    config = config or PlanningConfig()
    if config.size not in SIZES:
        raise ValueError(f"unknown STU-Net size {config.size!r}; expected one of {', '.join(SIZES)}")
    nn_fp = fp.to_nnunet_fingerprint()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedliver_plan_") as tmp, private_nnunet_env(Path(tmp)) as paths:
        raw = paths.raw / config.dataset_name
        pre = paths.preprocessed / config.dataset_name
        (raw / "imagesTr").mkdir(parents=True)
        pre.mkdir(parents=True)
        dataset_json = dict(DATASET_JSON, numTraining=int(max(fp.num_images, 1)))
        # The planner looks at one training image only to pick the reader; a 1-voxel stand-in does.
        _write_placeholder_case(raw, dataset_json)
        _write_json(raw / "dataset.json", dataset_json)
        _write_json(pre / "dataset_fingerprint.json", nn_fp)
        with _pool_workers_from_fork_server():
            planner = ExperimentPlanner(config.dataset_name, gpu_memory_target_in_gb=config.gpu_memory_target_gb,
                                        plans_name=PLANS_NAME)
            nn_plans = _quiet(planner.plan_experiment)
    if timings is not None:
        timings["planner_seconds"] = time.perf_counter() - started

    plans = {k: deepcopy(v) for k, v in nn_plans.items() if k != "configurations"}
    plans["configurations"] = {CONFIGURATION: _adapt_configuration(nn_plans["configurations"][CONFIGURATION], config)}
    plans["experiment_planner_used"] = "ExperimentPlanner"
    plans["image_reader_writer"] = DEFAULT_READER  # the fingerprint's reader, not the placeholder's
    plans["fedliver"] = {
        "planner_patch_size": list(nn_plans["configurations"][CONFIGURATION]["patch_size"]),
        "planner_strides": nn_plans["configurations"][CONFIGURATION]["architecture"]["arch_kwargs"]["strides"],
        "size": config.size,
        "base_width": config.base_width,
        "fingerprint": fp.summary(),
    }
    return json.loads(canonical_json(plans))  # plain JSON types only (no tuples, no numpy)


def plan_from_fingerprints(fingerprints: Sequence["SiteFingerprint"],
                           config: PlanningConfig | None = None) -> tuple[dict, "SiteFingerprint"]:
    """The sites' fingerprints merged exactly, and the plans for all of them: round 0 of the
    federation and `fedliver train` (one fingerprint per center) alike. Returns (plans, merged)."""
    from common.fingerprint import merge_fingerprints

    merged = merge_fingerprints(list(fingerprints))
    return plan_from_fingerprint(merged, config), merged


def _write_placeholder_case(raw: Path, dataset_json: dict) -> None:
    import SimpleITK as sitk

    img = sitk.Image([2, 2, 2], sitk.sitkUInt8)
    sitk.WriteImage(img, str(raw / "imagesTr" / f"placeholder_0000{dataset_json['file_ending']}"))
    (raw / "labelsTr").mkdir(exist_ok=True)
    sitk.WriteImage(img, str(raw / "labelsTr" / f"placeholder{dataset_json['file_ending']}"))


def _quiet(fn):
    """nnU-Net's planner prints each configuration; keep the console for our own messages."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return fn()


# --------------------------------------------------------------------------------------------- hashing / IO
def canonical_json(obj) -> str:
    """Sorted keys, no whitespace, numpy scalars as Python numbers: the form plans are hashed in."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default, allow_nan=False)


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (tuple, set)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def plans_hash(plans: dict) -> str:
    """SHA-256 (hex) of the plans' canonical JSON: independent of key order."""
    return hashlib.sha256(canonical_json(plans).encode("utf-8")).hexdigest()


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default))


def write_plans(plans: dict, path: Path) -> str:
    """Write plans.json and plans.sha256 into folder `path` (or next to a file path ending in .json).

    Atomic per file; returns the hash.
    """
    path = Path(path)
    folder, name = (path.parent, path.name) if path.suffix == ".json" else (path, "plans.json")
    folder.mkdir(parents=True, exist_ok=True)
    digest = plans_hash(plans)
    for target, text in ((folder / name, json.dumps(plans, indent=2, sort_keys=True, default=_json_default)),
                         (folder / (Path(name).stem + ".sha256"), digest + "\n")):
        atomic_write_text(target, text)
    return digest


def read_plans(path: Path) -> dict:
    """Read plans.json (folder or file); refuses it when a plans.sha256 beside it does not match."""
    path = Path(path)
    file = path if path.suffix == ".json" else path / "plans.json"
    plans = json.loads(file.read_text())
    sha = file.with_name(file.stem + ".sha256")
    if sha.is_file() and sha.read_text().strip() != plans_hash(plans):
        raise ValueError(f"{file}: content does not match {sha.name}")
    return plans


__all__ = [
    "CONFIGURATION", "DATASET_JSON", "PlanningConfig", "default_test_plans", "plan_from_fingerprint",
    "plans_hash", "canonical_json", "write_plans", "read_plans",
]
