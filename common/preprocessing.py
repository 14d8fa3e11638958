"""nnU-Net preprocessing of one phase volume, and a content-addressed on-disk cache of the results.

`preprocess_image` runs nnunetv2's `DefaultPreprocessor.run_case_npy` in-process from a plans dict
held in memory: transpose, crop to the nonzero region, per-image z-score, resample to the plans'
spacing. `PreprocessingCache` stores the result per (plans, case, phase) as plain `.npy` + `.json`
(no pickle), keyed by the input files (size, mtime, SHA-256) and the plans' hash, so unchanged inputs are reused.

Cache layout::

    <root>/<plans_hash[:16]>/<case_id>/<phase>.npy        data   (1, z, y, x) float32
                                       <phase>_seg.npy    labels (1, z, y, x) int8 (only with a mask)
                                       <phase>_fg.npy     foreground voxels (k, 3) int64 (only with a mask)
                                       <phase>.json       properties + input/plans hashes and stamps
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from common.atomic_write import atomic_save_npy, atomic_write_text
from common.cases import Case
from common.hashing import sha256_file
from common.image_io import image_reader, reader_name
from common.planning import CONFIGURATION, DATASET_JSON, plans_hash
from common.problems import Problem, one_line

#: Bump when what is stored changes, so old cache entries are recomputed (2: foreground locations).
CACHE_FORMAT = 2


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
#: Foreground voxels kept per labeled volume for oversampling (nnU-Net keeps about 10k per class).
MAX_FOREGROUND_SAMPLES = 10_000


def foreground_locations(seg: np.ndarray, max_samples: int = MAX_FOREGROUND_SAMPLES,
                         seed: int = 1234) -> np.ndarray:
    """(k, 3) voxel coordinates (z, y, x) of foreground (seg > 0), subsampled like nnU-Net's class_locations."""
    coords = np.argwhere(np.asarray(seg[0]) > 0)
    if len(coords) > max_samples:
        coords = coords[np.random.default_rng(seed).choice(len(coords), max_samples, replace=False)]
    return coords


@dataclass(frozen=True)
class PreprocessedVolume:
    case_id: str
    phase: str
    data_file: Path
    seg_file: Path | None
    properties_file: Path
    foreground_file: Path | None = None  # (k, 3) int64 foreground voxels of `seg` (labeled volumes)

    def load(self, mmap: bool = True) -> tuple[np.ndarray, np.ndarray | None, dict]:
        """(data (1,z,y,x) float32, seg (1,z,y,x) int8 or None, properties). Read-only memmaps if mmap."""
        mode = "r" if mmap else None
        data = np.load(self.data_file, mmap_mode=mode, allow_pickle=False)
        seg = np.load(self.seg_file, mmap_mode=mode, allow_pickle=False) if self.seg_file is not None else None
        return data, seg, self.properties()

    def properties(self) -> dict:
        """What `preprocess_image` returned as properties: enough to put a prediction back on the raw grid."""
        return json.loads(Path(self.properties_file).read_text())["properties"]

    def foreground(self) -> np.ndarray | None:
        """The stored foreground locations; None for an unlabeled volume or an entry without them."""
        if self.foreground_file is None or not self.foreground_file.is_file():
            return None
        return np.load(self.foreground_file, allow_pickle=False)


class PreprocessingCache:
    """Preprocessed volumes under `<root>/<plans_hash[:16]>/`, recomputed only when inputs change.

    Each entry's `<phase>.json` (written last: an entry without a matching JSON is never used, so a
    crash mid-way leaves at worst an orphan `.npy` that the next call overwrites) records the plans'
    hash and each input file's SHA-256, size and modification time. An input whose size and mtime
    are unchanged is trusted without being read; one whose stamp changed is hashed, and only a
    changed content is preprocessed again (a `touch` costs one hash, not a preprocessing).
    """

    def __init__(self, root: Path, plans: dict, *, trust_stamps: bool = True):
        self.root = Path(root)
        self.trust_stamps = trust_stamps  # False: hash every input each time (no prepared dataset)
        self.plans = plans
        self.plans_sha256 = plans_hash(plans)
        self.folder = self.root / self.plans_sha256[:16]
        self.computed = 0  # volumes actually preprocessed by this object (not served from disk)
        self.hashed = 0    # input files this object read to hash them

    def _paths(self, case_id: str, phase: str) -> tuple[Path, Path, Path, Path]:
        for name in (case_id, phase):  # they become path components: no separators, no "..", no hidden names
            if not name or name.startswith(".") or "/" in name or "\\" in name:
                raise ValueError(f"{name!r} cannot name a cache entry")
        folder = self.folder / case_id
        return folder / f"{phase}.npy", folder / f"{phase}_seg.npy", folder / f"{phase}_fg.npy", folder / f"{phase}.json"

    def get(self, case: Case, phase: str, with_mask: bool) -> PreprocessedVolume:
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
        data_file, seg_file, fg_file, json_file = self._paths(case.case_id, phase)
        volume = PreprocessedVolume(case.case_id, phase, data_file, seg_file if with_mask else None, json_file,
                                    fg_file if with_mask else None)
        settings = {"format": CACHE_FORMAT, "plans_sha256": self.plans_sha256,
                    "foreground_labels": [int(v) for v in case.foreground_labels]}
        # Without the mask only the image matters: a labeled entry of the same image serves too
        # (its data is the same), so evaluation and training never fight over one entry.
        inputs = {"image": image, **({"mask": mask} if mask is not None else {})}
        stamps = {f"{name}_stamp": _stamp(path) for name, path in inputs.items()}
        entry = self._entry(volume)
        if entry is not None and all(entry.get(k) == v for k, v in settings.items()):
            if self.trust_stamps and all(entry.get(k) == v for k, v in stamps.items()):
                return volume  # inputs unchanged since they were preprocessed: nothing read
            hashes = self._hashes(inputs)
            if all(entry.get(k) == v for k, v in hashes.items()):  # touched, same content
                if any(entry.get(k) != v for k, v in stamps.items()):
                    atomic_write_text(json_file, json.dumps({**entry, **stamps}, indent=1, sort_keys=True))
                return volume
        else:
            hashes = self._hashes(inputs)
        data, seg, props = preprocess_image(image, self.plans, mask, case.foreground_labels)
        data_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_npy(data_file, data)
        for stale in (seg_file, fg_file):  # a maskless entry keeps no labels of an earlier one
            stale.unlink(missing_ok=True)
        if seg is not None:
            atomic_save_npy(seg_file, seg)
            atomic_save_npy(fg_file, foreground_locations(seg))
        entry = dict(settings, **hashes, **stamps, case_id=case.case_id, phase=phase, image=image.name,
                     mask=mask.name if mask is not None else None, properties=props)
        atomic_write_text(json_file, json.dumps(entry, indent=1, sort_keys=True))
        self.computed += 1
        return volume

    def _hashes(self, inputs: dict[str, Path]) -> dict[str, str]:
        self.hashed += len(inputs)
        return {f"{name}_sha256": sha256_file(path) for name, path in inputs.items()}

    @staticmethod
    def _entry(volume: PreprocessedVolume) -> dict | None:
        """The entry's JSON when its arrays are all there; None otherwise."""
        try:
            entry = json.loads(volume.properties_file.read_text())
        except (OSError, ValueError):
            return None
        files = [volume.data_file, volume.seg_file, volume.foreground_file]
        return entry if isinstance(entry, dict) and all(f is None or f.is_file() for f in files) else None


def _stamp(path: Path) -> list[int] | None:
    """[size, mtime_ns] of a file, None when it cannot be stat'ed."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def preprocess_case_phases(cache: PreprocessingCache, cases: Sequence[Case], phases: Sequence[str],
                           with_masks: bool) -> tuple[list[PreprocessedVolume], list[Problem]]:
    """Preprocess every listed phase each case has; a bad file becomes a Problem, the rest goes on.

    With `with_masks`, only phases that have a mask are taken (labeled volumes); without, images
    are preprocessed without their masks (unlabeled use).
    """
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
                problems.append(Problem(Path(bad), f"preprocessing failed: {one_line(e)}"))
    return volumes, problems


__all__ = ["preprocess_image", "PreprocessedVolume", "PreprocessingCache", "preprocess_case_phases", "sha256_file",
           "foreground_locations", "MAX_FOREGROUND_SAMPLES"]
