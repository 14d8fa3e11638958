"""Training batches from preprocessed phase volumes: nnU-Net cropping, augmentation and prefetching.

Three small pieces, composed by the trainer:

- `PatchSampler` crops nnU-Net's larger "initial patch" (room for rotation and scaling) from one
  volume, centred on a foreground voxel when asked (nnU-Net's foreground oversampling), with the
  bounds and padding rules of `nnunetv2.training.dataloading.data_loader.nnUNetDataLoader.get_bbox`.
- `BatchBuilder` draws volumes, crops them and runs the batchgeneratorsv2 pipeline that
  `nnUNetTrainer.get_training_transforms` builds, including deep-supervision target downsampling.
  Unlabeled volumes go through the same pipeline with an all-zero segmentation, which is dropped.
- `Prefetcher` runs a producer in one bounded background thread (safe in a Ray actor and in a plain
  process: no multiprocessing, no spawn) and shuts it down cleanly.

Arrays are (c, z, y, x) as in nnU-Net. Every random choice comes from the builder's own
`numpy.random.Generator`; batchgeneratorsv2 draws from the global numpy/torch generators, so each
sample's transforms run under a per-sample seed drawn from that generator (global state saved and
restored, under a lock): the same seed gives the same batches in any thread.
"""

from __future__ import annotations

import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Generic, Iterator, Mapping, Sequence, TypeVar

import numpy as np
import torch

from client.label_transfer import insert_after_spatial, label_transfer_transforms
from common.label_transfer_config import LabelTransferConfig
from common.preprocessing import MAX_FOREGROUND_SAMPLES, foreground_locations

#: nnU-Net pads the image with 0 and the segmentation with -1 outside the volume.
_PAD_DATA, _PAD_SEG = 0.0, -1


# --------------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class AugmentationParams:
    """What nnU-Net's `configure_rotation_dummyDA_mirroring_and_inital_patch_size` decides for a patch."""
    patch_size: tuple[int, int, int]          # (z, y, x) the network sees
    initial_patch_size: tuple[int, int, int]  # (z, y, x) cropped before rotation/scaling
    rotation: tuple[float, float]             # radians
    dummy_2d: bool                            # anisotropic patch: rotate in-plane only
    mirror_axes: tuple[int, ...]


def augmentation_params(patch_size: Sequence[int], mirror_axes: Sequence[int] = (0, 1, 2)) -> AugmentationParams:
    """nnU-Net's 3D rule: 2D-style augmentation for very flat patches, else +-30 degrees rotation.

    Same thresholds and `get_patch_size` call as `nnUNetTrainer`, whose method needs a full trainer.
    `mirror_axes`: nnU-Net mirrors every axis; with every site's arrays in one orientation (RAS,
    common/image_io.py) leaving out x keeps "the liver is on the patient's right" learnable.
    """
    from nnunetv2.configuration import ANISO_THRESHOLD
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size

    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3:
        raise ValueError(f"patch_size must be (z, y, x), got {patch}")
    dummy_2d = (max(patch) / patch[0]) > ANISO_THRESHOLD
    angle = np.pi if dummy_2d else 30.0 / 360 * 2.0 * np.pi
    rotation = (-angle, angle)
    initial = [int(v) for v in get_patch_size(patch, rotation, rotation, rotation, (0.85, 1.25))]
    if dummy_2d:
        initial[0] = patch[0]
    return AugmentationParams(patch, tuple(initial), rotation, dummy_2d, tuple(int(a) for a in mirror_axes))


def deep_supervision_scales(strides: Sequence[Sequence[int]], num_outputs: int = 5) -> list[list[float]]:
    """Scale of each deep-supervision output, highest resolution first (nnU-Net's rule).

    `strides` are the network's per-stage strides (z, y, x), the first usually [1, 1, 1]; output i
    has the resolution of stage i: 1 / prod(strides[:i + 1]).
    """
    cum = np.cumprod(np.asarray(strides, dtype=float), axis=0)
    if len(cum) < num_outputs:
        raise ValueError(f"{len(cum)} strides cannot give {num_outputs} deep-supervision outputs")
    return [[float(v) for v in 1.0 / cum[i]] for i in range(num_outputs)]


def build_training_transforms(params: AugmentationParams, ds_scales: Sequence[Sequence[float]] | None,
                              label_transfer: LabelTransferConfig | None = None, *, labeled: bool = True,
                              synthesis: Sequence = ()):
    """The batchgeneratorsv2 `ComposeTransforms` nnU-Net trains with (11 transforms + DS downsampling),
    with the label-transfer transforms of `label_transfer` inserted after its spatial transform and
    `synthesis` (transforms that make an image of a crop, e.g. from a label map) before everything."""
    # By module path: nnunetv2's trainer lookup by name would import torchvision (broken in this stack).
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    compose = nnUNetTrainer.get_training_transforms(
        params.patch_size, params.rotation, list(ds_scales) if ds_scales is not None else None,
        params.mirror_axes, params.dummy_2d, use_mask_for_norm=[False], is_cascaded=False,
        foreground_labels=[1], regions=None, ignore_label=None,
    )
    if label_transfer is not None:
        insert_after_spatial(compose, label_transfer_transforms(label_transfer, labeled))
    compose.transforms[0:0] = list(synthesis)
    return compose


_GLOBAL_RNG_LOCK = threading.Lock()


@contextmanager
def _seeded_global_rng(seed: int) -> Iterator[None]:
    """Seed numpy's and torch's global generators for one sample, restoring them afterwards."""
    with _GLOBAL_RNG_LOCK:
        np_state = np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            np.random.seed(seed)
            torch.manual_seed(seed)
            try:
                yield
            finally:
                np.random.set_state(np_state)


# --------------------------------------------------------------------------------------------- cropping
class PatchSampler:
    """Crops the initial patch from a (c, z, y, x) volume like nnU-Net's data loader.

    The crop may reach past the volume by half the difference between the initial and the final
    patch (so border regions are seen), or further when the volume is smaller than the patch;
    outside the volume the image is 0 and the segmentation -1 (removed later by the transforms).
    """

    def __init__(self, initial_patch_size: Sequence[int], patch_size: Sequence[int]):
        self.initial_patch_size = np.asarray(initial_patch_size, dtype=int)
        self.need_to_pad = self.initial_patch_size - np.asarray(patch_size, dtype=int)

    def bbox(self, shape: Sequence[int], rng: np.random.Generator,
             foreground: np.ndarray | None = None) -> list[list[int]]:
        """[[lo, hi], ...] per spatial axis; centred on a random row of `foreground` (k, 3) when given."""
        patch = self.initial_patch_size
        pad = np.maximum(self.need_to_pad, patch - np.asarray(shape, dtype=int))
        lbs = [-(int(pad[d]) // 2) for d in range(3)]
        ubs = [int(shape[d]) + int(pad[d]) // 2 + int(pad[d]) % 2 - int(patch[d]) for d in range(3)]
        if foreground is not None and len(foreground):
            voxel = foreground[rng.integers(len(foreground))]
            lo = [max(lbs[d], int(voxel[d]) - int(patch[d]) // 2) for d in range(3)]
        else:
            lo = [int(rng.integers(lbs[d], ubs[d] + 1)) for d in range(3)]
        return [[lo[d], lo[d] + int(patch[d])] for d in range(3)]

    def crop(self, data: np.ndarray, seg: np.ndarray | None, rng: np.random.Generator,
             foreground: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(image float32, seg int16) tensors of shape (c, *initial_patch_size); seg zeros when None."""
        from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd

        box = self.bbox(data.shape[1:], rng, foreground)
        image = torch.from_numpy(np.ascontiguousarray(crop_and_pad_nd(data, box, _PAD_DATA), dtype=np.float32))
        if seg is None:
            target = torch.zeros((1, *self.initial_patch_size.tolist()), dtype=torch.int16)
        else:
            target = torch.from_numpy(crop_and_pad_nd(seg, box, _PAD_SEG, cast_cropped_to=np.int16)).to(torch.int16)
        return image, target


# --------------------------------------------------------------------------------------------- batches
@dataclass
class Batch:
    data: torch.Tensor                       # (b, 1, z, y, x) float32
    target: list[torch.Tensor] | None        # deep-supervision targets (b, 1, ...), highest resolution first
    keys: list[str] = field(default_factory=list)   # "case_id/phase" per sample
    strong: torch.Tensor | None = None       # unlabeled: the same crops through `strong_view` (CPS's student)


class _Volume:
    """One PreprocessedVolume, opened lazily (memory-mapped) and kept open."""

    def __init__(self, volume, with_seg: bool):
        self.volume = volume
        self.with_seg = with_seg
        self._arrays: tuple[np.ndarray, np.ndarray | None] | None = None
        self._foreground: np.ndarray | None = None

    @property
    def key(self) -> str:
        return f"{self.volume.case_id}/{self.volume.phase}"

    def arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self._arrays is None:
            data, seg, _ = self.volume.load(mmap=True)
            if self.with_seg and seg is None:
                raise ValueError(f"{self.volume.data_file}: labeled volume has no segmentation")
            self._arrays = (data, seg if self.with_seg else None)
        return self._arrays

    def foreground(self) -> np.ndarray | None:
        if not self.with_seg:
            return None
        if self._foreground is None:  # stored by preprocessing; computed for volumes from elsewhere
            stored = self.volume.foreground() if hasattr(self.volume, "foreground") else None
            self._foreground = stored if stored is not None else foreground_locations(self.arrays()[1])
        return self._foreground


class BatchBuilder:
    """Augmented batches from labeled or unlabeled volumes, reproducible from `seed`.

    Labeled: the last `round(b * oversample_foreground)` samples of each batch are centred on a
    foreground voxel (nnU-Net's `_oversample_last_XX_percent`); targets are the transformed masks,
    downsampled per deep-supervision scale. Unlabeled: random crops, `Batch.target` is None.
    `balance_phases`: draw a phase uniformly, then one of its volumes (a site with 30 T2 and
    5 DWI volumes still shows DWI as often as T2); otherwise every volume is equally likely.
    `phase_weights` (with `balance_phases`): relative weight of a phase (missing phases: 1).
    `strong_view` (unlabeled): intensity transforms applied after nnU-Net's to a copy of each sample,
    which becomes `Batch.strong`; seeded from the sample's own seed, so it too is reproducible.
    `transforms_by_phase`: {phase: pipeline} used instead of `transforms` for volumes of that phase
    (label maps whose crops are turned into images, beside real volumes).
    """

    def __init__(self, volumes: Sequence, batch_size: int, params: AugmentationParams, transforms,
                 *, labeled: bool, seed: int, oversample_foreground: float = 0.33, augment: bool = True,
                 balance_phases: bool = False, phase_weights: Mapping[str, float] | None = None,
                 strong_view=None, transforms_by_phase: Mapping[str, object] | None = None):
        if not volumes:
            raise ValueError("BatchBuilder needs at least one volume")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.volumes = [_Volume(v, labeled) for v in volumes]
        self.batch_size = batch_size
        self.params = params
        self.transforms = transforms
        self.transforms_by_phase = dict(transforms_by_phase or {})
        self.labeled = labeled
        self.oversample_foreground = oversample_foreground if labeled else 0.0
        self.augment = augment
        self.strong_view = None if labeled else strong_view
        self.rng = np.random.default_rng(seed)
        initial = params.initial_patch_size if augment else params.patch_size
        self.sampler = PatchSampler(initial, params.patch_size)
        groups: dict[str, list[int]] = {}
        for i, v in enumerate(self.volumes):
            groups.setdefault(v.volume.phase if balance_phases else "", []).append(i)
        self._groups = [groups[k] for k in sorted(groups)]
        weights = np.array([float((phase_weights or {}).get(k, 1.0)) for k in sorted(groups)])
        self._group_p = weights / weights.sum() if phase_weights else None

    def _draw_volume(self) -> "_Volume":
        if len(self._groups) == 1:
            group = self._groups[0]
        elif self._group_p is None:
            group = self._groups[int(self.rng.integers(len(self._groups)))]
        else:
            group = self._groups[int(self.rng.choice(len(self._groups), p=self._group_p))]
        return self.volumes[group[int(self.rng.integers(len(group)))]]

    def _force_foreground(self, j: int) -> bool:
        return j >= round(self.batch_size * (1 - self.oversample_foreground))

    def sample(self, j: int) -> tuple[torch.Tensor, list[torch.Tensor] | torch.Tensor, str, torch.Tensor | None]:
        volume = self._draw_volume()
        data, seg = volume.arrays()
        fg = volume.foreground() if self._force_foreground(j) else None
        image, target = self.sampler.crop(data, seg, self.rng, fg)
        seed = int(self.rng.integers(2**31 - 1))
        if self.augment:
            transforms = self.transforms_by_phase.get(volume.volume.phase, self.transforms)
            with _seeded_global_rng(seed), torch.no_grad():
                out = transforms(image=image, segmentation=target)
            image, target = out["image"], out["segmentation"]
        else:
            target = torch.where(target < 0, torch.zeros_like(target), target)
        strong = None
        if self.strong_view is not None:
            with _seeded_global_rng(seed + 1), torch.no_grad():
                strong = self.strong_view(image=image.clone())["image"]
        return image, target, volume.key, strong

    def next_batch(self) -> Batch:
        images, targets, keys, strong = [], [], [], []
        for j in range(self.batch_size):
            image, target, key, strong_image = self.sample(j)
            images.append(image)
            targets.append(target if isinstance(target, list) else [target])
            keys.append(key)
            strong.append(strong_image)
        data = torch.stack(images).float()
        if not self.labeled:
            return Batch(data, None, keys, torch.stack(strong).float() if self.strong_view is not None else None)
        per_scale = [torch.stack([t[s] for t in targets]) for s in range(len(targets[0]))]
        return Batch(data, per_scale, keys)


# --------------------------------------------------------------------------------------------- prefetch
T = TypeVar("T")


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher(Generic[T]):
    """Calls `produce()` in one background daemon thread, keeping up to `depth` results ready.

    `get()` returns results in production order and re-raises a producer's exception. `close()`
    (or leaving the `with` block) stops and joins the thread; it is safe to call twice.
    With `depth=0` nothing runs in the background: `get()` calls `produce()` directly.
    `limit`: produce at most that many items (then the thread ends), so a producer with its own
    random state advances by a known amount whatever the timing.
    """

    def __init__(self, produce: Callable[[], T], depth: int = 2, name: str = "fedliver-prefetch",
                 limit: int | None = None):
        self._produce = produce
        self._depth = depth
        self._limit = limit
        self._produced = 0
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._thread: threading.Thread | None = None
        if depth > 0:
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

    def _exhausted(self) -> bool:
        return self._limit is not None and self._produced >= self._limit

    def _run(self) -> None:
        while not self._stop.is_set() and not self._exhausted():
            self._produced += 1
            try:
                item = self._produce()
            except BaseException as e:  # handed to the consumer, which re-raises it
                item = _Failure(e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, _Failure):
                return

    def get(self, timeout: float | None = None) -> T:
        if self._stop.is_set():
            raise RuntimeError("prefetcher is closed")
        if self._thread is None:
            if self._exhausted():
                raise RuntimeError(f"prefetcher limit of {self._limit} items reached")
            self._produced += 1
            return self._produce()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:  # short waits, so a producer that has ended (limit reached) is noticed
            try:
                item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError(f"prefetcher has nothing more to give (limit {self._limit})") from None
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"no batch within {timeout} s") from None
        if isinstance(item, _Failure):
            raise item.error
        return item

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is None:
            return
        while self._thread.is_alive():
            try:  # unblock a producer waiting on a full queue
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.1)
            timeout -= 0.1
            if timeout <= 0:
                raise RuntimeError(f"prefetch thread {self._thread.name} did not stop")
        while not self._queue.empty():
            self._queue.get_nowait()

    def __enter__(self) -> "Prefetcher[T]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # last resort; close() is the contract
        self._stop.set()


__all__ = [
    "AugmentationParams", "augmentation_params", "deep_supervision_scales", "build_training_transforms",
    "PatchSampler", "foreground_locations", "Batch", "BatchBuilder", "Prefetcher", "MAX_FOREGROUND_SAMPLES",
]
