"""nnU-Net preprocessing of one phase volume, and a content-addressed on-disk cache of the results.

`preprocess_image` runs nnunetv2's `DefaultPreprocessor.run_case_npy` in-process from a plans dict
held in memory: transpose, crop to the nonzero region, per-image z-score, resample to the plans'
spacing. `PreprocessingCache` stores the result per (plans, case, phase) as plain `.npy` + `.json`
(no pickle), keyed by SHA-256 of the input files and of the plans, so unchanged inputs are reused.

Cache layout::

    <root>/<plans_hash[:16]>/<case_id>/<phase>.npy        data   (1, z, y, x) float32
                                       <phase>_seg.npy    labels (1, z, y, x) int8 (only with a mask)
                                       <phase>.json       properties + input/plans hashes
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from common.image_io import image_reader, reader_name
from common.planning import CONFIGURATION, DATASET_JSON, plans_hash
from common.hashing import sha256_file

if TYPE_CHECKING:
    from common.discovery import Case, Problem

#: Bump when what is stored changes, so old cache entries are recomputed.
CACHE_FORMAT = 1


# --------------------------------------------------------------------------------------------- one volume
def _json_safe(obj):
    """Tuples/numpy -> lists/Python numbers, recursively."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj


def preprocess_image(image: Path, plans: dict, mask: Path | None = None,
                     foreground_labels: Sequence[int] = (1,)) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Crop, z-score and resample one volume exactly like nnU-Net's DefaultPreprocessor.

    Returns
      data: (1, z, y, x) float32 on the plans' spacing (after the plans' transpose_forward);
      seg:  (1, z, y, x) int8 or None without a mask: 1 where the mask holds any of
            `foreground_labels`, 0 elsewhere, and -1 (nnU-Net's convention, kept) for background
            outside the image's nonzero region; training treats -1 as background;
      properties: JSON-safe dict with `spacing` (z, y, x, of the input), `shape_before_cropping`,
            `bbox_used_for_cropping`, `shape_after_cropping_and_before_resampling`,
            `shape_after_resampling`, `target_spacing` and `sitk_stuff` (SimpleITK's
            spacing/origin/direction in (x, y, z) order, after the plans' reader reoriented the
            image, and the file's `original_orientation` when it did): all that
            `nnunetv2.inference.export_prediction.convert_predicted_logits_to_segmentation_with_correct_shape`
            needs to put a prediction back on the raw grid.
    Raises ValueError with the file named when the mask's grid does not match the image.
    nnU-Net's `class_locations` (foreground samples for oversampling) are dropped: they are
    arrays, not JSON; derive them from `seg` when needed.
    """
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    image, mask = Path(image), (Path(mask) if mask is not None else None)
    plans_manager = PlansManager(plans)
    configuration = plans_manager.get_configuration(CONFIGURATION)
    io = image_reader(reader_name(plans))  # the plans' reader: RAS for fedliver's plans (common.image_io)
    data, props = io.read_images([str(image)])
    seg = None
    if mask is not None:
        raw_seg, seg_props = io.read_seg(str(mask))
        if raw_seg.shape != data.shape:
            raise ValueError(f"{mask}: mask shape {tuple(raw_seg.shape[1:])} (z, y, x) does not match "
                             f"image {image.name} shape {tuple(data.shape[1:])}")
        if not np.allclose(seg_props["spacing"], props["spacing"], rtol=1e-3, atol=1e-4):
            raise ValueError(f"{mask}: mask spacing {seg_props['spacing']} does not match "
                             f"image {image.name} spacing {props['spacing']}")
        seg = np.isin(raw_seg, np.asarray(foreground_labels)).astype(np.int8)
    preprocessor = DefaultPreprocessor(verbose=False)
    out_data, out_seg, props = preprocessor.run_case_npy(data, seg, props, plans_manager, configuration,
                                                         dict(DATASET_JSON))
    props.pop("class_locations", None)
    props["shape_after_resampling"] = list(out_data.shape[1:])
    props["target_spacing"] = list(configuration.spacing)
    out_data = np.ascontiguousarray(out_data, dtype=np.float32)
    out_seg = np.ascontiguousarray(out_seg, dtype=np.int8) if mask is not None else None
    return out_data, out_seg, _json_safe(props)


# --------------------------------------------------------------------------------------------- cache


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class PreprocessedVolume:
    case_id: str
    phase: str
    data_file: Path
    seg_file: Path | None
    properties_file: Path

    def load(self, mmap: bool = True) -> tuple[np.ndarray, np.ndarray | None, dict]:
        """(data (1,z,y,x) float32, seg (1,z,y,x) int8 or None, properties). Read-only memmaps if mmap."""
        mode = "r" if mmap else None
        data = np.load(self.data_file, mmap_mode=mode, allow_pickle=False)
        seg = np.load(self.seg_file, mmap_mode=mode, allow_pickle=False) if self.seg_file is not None else None
        entry = json.loads(Path(self.properties_file).read_text())
        return data, seg, entry["properties"]


class PreprocessingCache:
    """Preprocessed volumes under `<root>/<plans_hash[:16]>/`, recomputed only when inputs change.

    Entries are validated by the SHA-256 of the image (and mask) file and of the plans, stored in
    `<phase>.json`, which is written last: an entry without a matching JSON is never used, so a
    crash mid-way leaves at worst an orphan `.npy` that the next call overwrites.
    """

    def __init__(self, root: Path, plans: dict):
        self.root = Path(root)
        self.plans = plans
        self.plans_sha256 = plans_hash(plans)
        self.folder = self.root / self.plans_sha256[:16]
        self.computed = 0  # volumes actually preprocessed by this object (not served from disk)

    def _paths(self, case_id: str, phase: str) -> tuple[Path, Path, Path]:
        for name in (case_id, phase):  # they become path components: no separators, no "..", no hidden names
            if not name or name.startswith(".") or "/" in name or "\\" in name:
                raise ValueError(f"{name!r} cannot name a cache entry")
        folder = self.folder / case_id
        return folder / f"{phase}.npy", folder / f"{phase}_seg.npy", folder / f"{phase}.json"

    def get(self, case: "Case", phase: str, with_mask: bool) -> PreprocessedVolume:
        """The cached volume of `case`'s `phase`, preprocessing it first when missing or stale.

        Raises KeyError when the case lacks that phase (or its mask with `with_mask`), and the
        errors of `preprocess_image` (ValueError, RuntimeError from SimpleITK) for bad files.
        """
        if phase not in case.images:
            raise KeyError(f"{case.case_id}: no {phase} image")
        if with_mask and phase not in case.masks:
            raise KeyError(f"{case.case_id}: no {phase} mask")
        image = Path(case.images[phase])
        mask = Path(case.masks[phase]) if with_mask else None
        data_file, seg_file, json_file = self._paths(case.case_id, phase)
        volume = PreprocessedVolume(case.case_id, phase, data_file, seg_file if with_mask else None, json_file)
        inputs = {
            "format": CACHE_FORMAT,
            "plans_sha256": self.plans_sha256,
            "image_sha256": sha256_file(image),
            "mask_sha256": sha256_file(mask) if mask is not None else None,
            "foreground_labels": [int(v) for v in case.foreground_labels],
        }
        if self._is_fresh(volume, inputs):
            return volume
        data, seg, props = preprocess_image(image, self.plans, mask, case.foreground_labels)
        data_file.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save_npy(data_file, data)
        if seg is not None:
            _atomic_save_npy(seg_file, seg)
        elif seg_file.exists():
            seg_file.unlink()  # a stale label file must not outlive a maskless entry
        entry = dict(inputs, case_id=case.case_id, phase=phase, image=image.name,
                     mask=mask.name if mask is not None else None, properties=props)
        _atomic_write_text(json_file, json.dumps(entry, indent=1, sort_keys=True))
        self.computed += 1
        return volume

    @staticmethod
    def _is_fresh(volume: PreprocessedVolume, inputs: dict) -> bool:
        try:
            entry = json.loads(volume.properties_file.read_text())
        except (OSError, ValueError):
            return False
        if any(entry.get(k) != v for k, v in inputs.items()):
            return False
        return volume.data_file.is_file() and (volume.seg_file is None or volume.seg_file.is_file())


def preprocess_case_phases(cache: PreprocessingCache, cases: Sequence["Case"], phases: Sequence[str],
                           with_masks: bool) -> tuple[list[PreprocessedVolume], list["Problem"]]:
    """Preprocess every listed phase each case has; a bad file becomes a Problem, the rest goes on.

    With `with_masks`, only phases that have a mask are taken (labeled volumes); without, images
    are preprocessed without their masks (unlabeled use).
    """
    from common.discovery import Problem

    volumes: list[PreprocessedVolume] = []
    problems: list[Problem] = []
    for case in cases:
        for phase in phases:
            if phase not in case.images or (with_masks and phase not in case.masks):
                continue
            try:
                volumes.append(cache.get(case, phase, with_masks))
            except Exception as e:  # one unreadable or inconsistent file must not stop the site
                bad = case.masks[phase] if with_masks and isinstance(e, ValueError) and "mask" in str(e) \
                    else case.images[phase]
                problems.append(Problem(Path(bad), f"preprocessing failed: {_one_line(e)}"))
    return volumes, problems


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) < 300 else text[:297] + "..."


__all__ = ["preprocess_image", "PreprocessedVolume", "PreprocessingCache", "preprocess_case_phases", "sha256_file"]
