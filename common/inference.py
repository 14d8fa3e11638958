"""Sliding-window inference of one or more STU-Nets, and whole-image prediction on the raw grid.

`sliding_window_predict` follows nnU-Net v2's predictor (`nnUNetPredictor`): pad to at least the
patch, tiles from `compute_steps_for_sliding_window`, Gaussian importance weights from
`compute_gaussian`, optional mirroring over every combination of the spatial axes. Unlike nnU-Net,
which averages logits, it averages *softmax probabilities* (the CPS recipe: "one branch, or the mean
of both softmaxes"), so the result is a proper distribution over classes at every voxel.

`predict_image` is the whole path for one NIfTI: `common.preprocessing.preprocess_image` (crop to
nonzero, z-score, resample to the plans' spacing), sliding window, then nnunetv2's way back to the
raw grid (resample the probabilities to the cropped shape, decide, uncrop, transpose back), the
chosen postprocessing, and the input's own header (size, spacing, origin, direction) on the result.

Speed on the CPU (issue 15; measured with `simulations.benchmarks.bench_inference`, 2 cores):
- tiles run one per worker thread, each worker on one intra-op thread (`torch.get_num_threads()`
  workers). Two threads inside every op of a batch-of-one STU-Net spent most of their time at the
  barriers between ~110 small ops per tile; whole tiles in parallel have none;
- `STUNet` runs through `_stunet_forward_cpu`: channels-last activations (3x3x3 convs with 8-16
  channels 1.4-1.6x faster in oneDNN), every conv sent to oneDNN directly (PyTorch's heuristics send
  batch-of-one convs with one input channel or few rows to a reference kernel 5x slower, and
  channels-last 1x1x1 convs on one thread to another), the 1x1x1 conv of each upsampling applied
  before the nearest-neighbour upsampling (they commute: 4x less work), only the full-resolution head;
- with two classes only the foreground probability, softmax[1] = sigmoid(l1 - l0), is accumulated
  (in place, fp32) and resampled; the label is p > 0.5, the argmax of (1 - p, p).
"""

from __future__ import annotations

import ctypes
import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


@contextmanager
def _eval_mode(nets: Sequence[nn.Module]) -> Iterator[None]:
    """Eval mode for the duration; a trainer that evaluates mid-training gets its modes back."""
    modes = [[m.training for m in net.modules()] for net in nets]
    for net in nets:
        net.eval()
    try:
        yield
    finally:
        for net, flags in zip(nets, modes):
            for m, flag in zip(net.modules(), flags):
                m.training = flag


def _device_of(net: nn.Module) -> torch.device:
    p = next(net.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _full_resolution(output) -> torch.Tensor:
    """Deep-supervision nets return a list, highest resolution first."""
    return output[0] if isinstance(output, (list, tuple)) else output


# --------------------------------------------------------------------------------------------- STU-Net on the CPU
_CL = torch.channels_last_3d


def _fast_stunet(net: nn.Module) -> bool:
    """Whether `_stunet_forward_cpu` computes exactly what `net` does: a plain fp32 STUNet on the CPU
    (not a subclass), instance norms without running statistics, oneDNN available."""
    from common.stunet import STUNet

    if type(net) is not STUNet or not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in net.parameters()):
        return False
    norms_ok = all(not m.track_running_stats for m in net.modules() if isinstance(m, nn.InstanceNorm3d))
    convs_ok = all(m.padding_mode == "zeros" for m in net.modules() if isinstance(m, nn.Conv3d))
    return norms_ok and convs_ok


def _conv(m: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """oneDNN convolution, channels-last in and out. A one-channel input cannot carry the layout
    (both layouts have the same strides), so the weight asks for it with explicit channels-last
    strides (`.contiguous(memory_format=...)` keeps a one-channel weight's strides as they are)."""
    w = m.weight
    if x.shape[1] == 1:
        o, i, d, h, k = w.shape
        w = torch.empty_strided(w.shape, (d * h * k * i, 1, h * k * i, k * i, i), dtype=w.dtype).copy_(w)
    return torch.ops.aten.mkldnn_convolution(x, w, m.bias, list(m.padding), list(m.stride), list(m.dilation),
                                             m.groups)


def _instance_norm_(m: nn.InstanceNorm3d, x: torch.Tensor) -> torch.Tensor:
    """Instance norm of one channels-last sample (1, c, z, y, x), in place (no second full-size
    tensor). Two-pass statistics summed in short runs: as precise as PyTorch's instance norm on
    contiguous tensors, where batch_norm on channels-last sums 786k values a channel in one fp32
    run (errors ~1e-3 at a 48x128x128 patch)."""
    if not x.is_contiguous(memory_format=_CL):
        x = x.contiguous(memory_format=_CL)
    c = x.shape[1]
    voxels = x.permute(0, 2, 3, 4, 1).reshape(-1, c)  # (n, c): a view of the channels-last memory
    n = voxels.shape[0]
    k = math.gcd(n, 256)
    rows = voxels.view(n // k, k * c)  # column sums run over n / k values, then k of those
    mean = rows.sum(0).view(k, c).sum(0).div_(n)
    centre = mean.repeat(k)
    step = max(1, (1 << 18) // (k * c))  # ~1 MB temporaries
    squares = sum((chunk - centre).square_().sum(0) for chunk in rows.split(step))
    scale = torch.rsqrt(squares.view(k, c).sum(0).div_(n).add_(m.eps))
    if m.weight is not None:
        scale.mul_(m.weight)
    shift = -mean * scale
    if m.bias is not None:
        shift.add_(m.bias)
    torch.addcmul(shift, voxels, scale, out=voxels)  # x * scale + shift, elementwise in place
    return x


def _res_block(block, box: list) -> torch.Tensor:
    """One BasicResBlock. The input comes in a one-item list that is emptied, so that it can be
    freed as soon as the convolutions have read it (the decoder's concatenation is two
    full-resolution tensors)."""
    x = box.pop()
    shortcut = _conv(block.conv3, x) if block.conv3 is not None else x
    y = _conv(block.conv1, x)
    del x
    y = F.leaky_relu_(_instance_norm_(block.norm1, y), block.act1.negative_slope)
    y = _instance_norm_(block.norm2, _conv(block.conv2, y)).add_(shortcut)
    return F.leaky_relu_(y, block.act2.negative_slope)


def _stage(stage: nn.Sequential, box: list) -> torch.Tensor:
    for block in stage:
        box = [_res_block(block, box)]
    return box.pop()


def _stunet_stem(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The first encoder stage (full resolution) of one tile (1, c, z, y, x): its output, channels-last."""
    return _stage(net.conv_blocks_context[0], [x])


def _stunet_inner(net: nn.Module, stem: torch.Tensor) -> torch.Tensor:
    """Every stage between the stem and the last decoder stage: the last decoder stage's low-resolution
    input. Reads `stem` (the first skip connection) without keeping it."""
    skips, x = [], stem
    for stage in net.conv_blocks_context[1:-1]:
        x = _stage(stage, [x])
        skips.append(x)
    x = _stage(net.conv_blocks_context[-1], [x])
    for up, stage in zip(net.upsample_layers[:-1], net.conv_blocks_localization[:-1]):
        x = _stage(stage, [_up_and_concat(up, x, skips.pop())])
    return x


def _stunet_head(net: nn.Module, x: torch.Tensor, stem: list) -> torch.Tensor:
    """The last decoder stage (full resolution) and the full-resolution segmentation head: logits.
    `stem` comes in a one-item list that is emptied, so that it is freed once concatenated."""
    box = [_up_and_concat(net.upsample_layers[-1], x, stem.pop())]
    del x
    return _conv(net.seg_outputs[-1], _stage(net.conv_blocks_localization[-1], box))


def _up_and_concat(up, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    size = [n * s for n, s in zip(x.shape[2:], up.stride)]
    # A 1x1x1 conv commutes with nearest-neighbour upsampling: convolve the small tensor.
    return torch.cat((F.interpolate(_conv(up.conv, x), size=size, mode="nearest"), skip), dim=1)


def _stunet_forward_cpu(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`STUNet.forward(x)` at full resolution on the CPU, channels-last logits, for nets `_fast_stunet`
    accepts (tests check it against `net(x)`): stem, inner stages, head."""
    if x.ndim != 5 or x.shape[1] != net.input_channels or any(n % d for n, d in zip(x.shape[2:], net.divisor)):
        return _full_resolution(net(x))  # STUNet.forward's own one-line error
    if x.shape[0] != 1:
        return torch.cat([_stunet_forward_cpu(net, x[i:i + 1]) for i in range(x.shape[0])])
    stem = [_stunet_stem(net, x)]
    return _stunet_head(net, _stunet_inner(net, stem[0]), stem)


def _forward(net: nn.Module, x: torch.Tensor, fast: bool) -> torch.Tensor:
    """net(x) at full resolution. Other nets' batch of one is run as two on the CPU: PyTorch sends 3D
    convs with batch 1 and few rows to its slow reference kernel and batches of 2+ to oneDNN."""
    if fast and x.device.type == "cpu":
        return _stunet_forward_cpu(net, x)
    if x.shape[0] == 1 and x.device.type == "cpu":
        return _full_resolution(net(x.expand(2, *x.shape[1:])))[:1]
    return _full_resolution(net(x))


def _probabilities(logits: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """softmax(logits) over dim 1, flipped back over `axes`; with two classes only the foreground's,
    (b, 1, z, y, x): softmax[1] = sigmoid(l1 - l0)."""
    logits = logits.float()
    probs = torch.sigmoid(logits[:, 1:] - logits[:, :1]) if logits.shape[1] == 2 else torch.softmax(logits, dim=1)
    return torch.flip(probs, axes) if axes else probs


def _mean_probabilities(nets: Sequence[nn.Module], fast: Sequence[bool], x: torch.Tensor,
                        mirror_axes: Sequence[tuple[int, ...]]) -> tuple[torch.Tensor, int, torch.Tensor]:
    """(mean over nets and mirrorings of softmax(net(x)), number of classes, the first net's own
    mean over mirrorings); x (b, c, z, y, x) on the nets' device; see `_probabilities` for two classes."""
    total, classes, first = None, 0, None
    for k, (net, net_fast) in enumerate(zip(nets, fast)):
        for axes in [()] + list(mirror_axes):
            logits = _forward(net, torch.flip(x, axes) if axes else x, net_fast)
            classes = logits.shape[1]
            probs = _probabilities(logits, axes)
            total = probs if total is None else total.add_(probs)
        if k == 0:
            first = total / (1 + len(mirror_axes))
    return total.div_(len(nets) * (1 + len(mirror_axes))), classes, first


def _pipelined_probabilities(nets: Sequence[nn.Module], inputs: Iterator[torch.Tensor],
                             mirror_axes: Sequence[tuple[int, ...]], threads: int) -> Iterator[tuple[torch.Tensor, int]]:
    """`_mean_probabilities` (all three values) of every tile from `inputs` ((1, c, z, y, x) each), in order, for
    STU-Nets on the CPU, on two threads: this one runs every full-resolution stage (stem and head:
    ~55% of the work, and all of the 25 MB tensors of a 48x128x128 patch) one tile at a time, as a
    single-threaded predictor would; a helper runs the inner stages of the next (net, flip, tile)
    meanwhile. One intra-op thread each (`threads - 1` here): two threads inside every op spent most
    of their time at the barriers between ~110 small ops a tile, on a shared 2-core machine."""
    jobs = [(net, axes) for net in nets for axes in [()] + list(mirror_axes)]
    per_net = 1 + len(mirror_axes)

    def inner(net, stem):
        with torch.inference_mode():
            return _stunet_inner(net, stem)

    def stems():  # [job index in the tile, net, axes, inner's future, stem], one job ahead of the heads
        for x in inputs:
            for j, (net, axes) in enumerate(jobs):
                stem = _stunet_stem(net, torch.flip(x, axes) if axes else x)
                yield [j, net, axes, helper.submit(inner, net, stem), stem]

    helper = ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,))
    torch.set_num_threads(max(1, threads - 1))
    try:
        pending, total = None, None
        for item in itertools.chain(stems(), [None]):
            current, pending = pending, item
            if current is None:
                continue
            stem = [current.pop()]  # only the head holds it now: freed once concatenated
            j, net, axes, future = current
            del current
            logits = _stunet_head(net, future.result(), stem)
            del future
            probs = _probabilities(logits, axes)
            classes = logits.shape[1]
            del logits
            total = probs if total is None else total.add_(probs)
            _release_free_memory()  # the helper's arena grows otherwise (see below)
            if j == per_net - 1:
                first = total / per_net
            if j == len(jobs) - 1:
                yield total.div_(len(jobs)), classes, first
                total = None
    finally:
        helper.shutdown(wait=True, cancel_futures=True)


def _release_free_memory() -> None:
    """Hand the memory this thread's allocator holds free back to the system (glibc malloc_trim):
    the helper thread allocates from an arena of its own and cannot reuse what reading and
    preprocessing the volume freed here."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _sliding_window(nets: Sequence[nn.Module] | nn.Module, data: torch.Tensor | np.ndarray,
                    patch_size: Sequence[int], step: float, mirror: bool, batch_size: int,
                    keep_first: bool = False) -> tuple[torch.Tensor, bool, torch.Tensor | None]:
    """(probabilities (channels, z, y, x) on the nets' device, cropped back to `data`; whether the
    one channel is the foreground of two classes; with `keep_first` and several nets, the first
    net's own probabilities, else None). See `sliding_window_predict`."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

    if isinstance(nets, nn.Module):
        nets = [nets]
    nets = list(nets)
    if not nets:
        raise ValueError("sliding_window_predict: no network given")
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1], got {step}")
    data = torch.as_tensor(data, dtype=torch.float32)
    if data.ndim != 4:
        raise ValueError(f"data must be (c, z, y, x), got shape {tuple(data.shape)}")
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3:
        raise ValueError(f"patch_size must have 3 entries (z, y, x), got {patch_size}")
    device = _device_of(nets[0])

    # Pad (centred, zeros: the z-scored background is ~0 after cropping to nonzero) up to the patch.
    padded, revert = pad_nd_image(data, patch, "constant", {"value": 0}, True, None)
    shape = tuple(padded.shape[1:])
    steps = compute_steps_for_sliding_window(shape, patch, step)
    tiles = [tuple(slice(s, s + p) for s, p in zip(start, patch)) for start in itertools.product(*steps)]
    # compute_gaussian is lru-cached: never modify its result in place.
    gaussian = compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, dtype=torch.float32,
                                device=torch.device("cpu")).to(device)
    mirror_axes = [c for i in range(1, 4) for c in itertools.combinations((2, 3, 4), i)] if mirror else []
    padded = padded.to(device)
    fast = [_fast_stunet(net) for net in nets]
    on_cpu = device.type == "cpu"
    per_step = 1 if on_cpu else max(1, int(batch_size))
    batches = [tiles[i:i + per_step] for i in range(0, len(tiles), per_step)]
    pipelined = (on_cpu and all(fast) and torch.get_num_threads() > 1
                 and len(tiles) * len(nets) * (1 + len(mirror_axes)) > 1
                 and all(data.shape[0] == net.input_channels and not any(p % d for p, d in zip(patch, net.divisor))
                         for net in nets))  # else the plain path, and STUNet's own error

    def tile_input(batch):
        return torch.stack([padded[(slice(None), *t)] for t in batch])

    weights = torch.zeros(shape, dtype=torch.float32, device=device)
    probs: torch.Tensor | None = None
    first: torch.Tensor | None = None
    keep_first = keep_first and len(nets) > 1
    classes = 0
    if all(fast) and len({net.num_classes for net in nets}) == 1:
        # Allocated before any tile: a long-lived buffer above the tiles' temporaries would pin them
        # in the allocator's heap (~250 MB more resident at LiQA's size).
        channels = 1 if nets[0].num_classes == 2 else nets[0].num_classes
        probs = torch.zeros((channels, *shape), dtype=torch.float32, device=device)
    old_threads = torch.get_num_threads()
    try:
        with torch.inference_mode(), _eval_mode(nets):
            if pipelined:
                _release_free_memory()
                results = _pipelined_probabilities(nets, map(tile_input, batches), mirror_axes, old_threads)
            else:
                results = (_mean_probabilities(nets, fast, tile_input(b), mirror_axes) for b in batches)
            for batch, (out, classes, out_first) in zip(batches, results):  # in tile order: deterministic sums
                if probs is None:
                    probs = torch.zeros((out.shape[1], *shape), dtype=torch.float32, device=device)
                if keep_first and first is None:
                    first = torch.zeros_like(probs)
                for k, (tile, p) in enumerate(zip(batch, out)):
                    probs[(slice(None), *tile)].addcmul_(p, gaussian)
                    weights[tile].add_(gaussian)
                    if keep_first:  # the same weights: the branches' probabilities average to `probs`
                        first[(slice(None), *tile)].addcmul_(out_first[k], gaussian)
            probs.div_(weights)  # every voxel is covered by at least one tile; the Gaussian has no zeros
            if first is not None:
                first.div_(weights)
    finally:
        torch.set_num_threads(old_threads)
    crop = (slice(None), *revert[1:])
    return probs[crop], classes == 2, (first[crop] if first is not None else None)


def sliding_window_predict(nets: Sequence[nn.Module] | nn.Module, data: torch.Tensor | np.ndarray,
                           patch_size: Sequence[int], *, step: float = 0.5, mirror: bool = False,
                           batch_size: int = 2) -> torch.Tensor:
    """Mean softmax of `nets` over `data` (c, z, y, x): float32 probabilities (classes, z, y, x) on CPU.

    step: tile overlap as a fraction of the patch (nnU-Net's `tile_step_size`, 0.5 by default).
    mirror: test-time augmentation over all 7 flips of (z, y, x) (8x the work).
    batch_size: tiles per forward pass on a GPU; on the CPU every tile runs alone, on one of
    `torch.get_num_threads()` worker threads. The nets run on their own device (the first net's);
    the result comes back on the CPU. Modules are put in eval mode for the call and restored after.
    """
    probs, foreground, _ = _sliding_window(nets, data, patch_size, step, mirror, batch_size)
    if foreground:
        probs = torch.cat((1 - probs, probs))
    return probs.to("cpu").contiguous()


def _foreground_to_raw_grid(foreground: torch.Tensor, plans_manager, configuration, properties: dict) -> np.ndarray:
    """nnunetv2's `convert_predicted_logits_to_segmentation_with_correct_shape` for the foreground
    probability (1, z, y, x) of two classes: resample it to the cropped shape (as nnU-Net resamples
    every class; order-1 weights sum to one, so the background stays 1 - p), label p > 0.5 (the
    argmax of (1 - p, p)), uncrop, transpose back. Half the resampling work of both classes."""
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

    shape = properties["shape_after_cropping_and_before_resampling"]
    spacing = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    current = configuration.spacing if len(configuration.spacing) == len(shape) else [spacing[0], *configuration.spacing]
    foreground = configuration.resampling_fn_probabilities(foreground.numpy(), shape, current, spacing)
    seg = np.zeros(properties["shape_before_cropping"], dtype=np.uint8)
    insert_crop_into_image(seg, (foreground[0] > 0.5).astype(np.uint8), properties["bbox_used_for_cropping"])
    return seg.transpose(plans_manager.transpose_backward)


@dataclass(frozen=True)
class BranchProbabilities:
    """Foreground probabilities on the network's grid (the plans' axes and spacing, cropped to the
    nonzero box), what quality control reads: the branches' mean and the first branch's own."""

    mean: np.ndarray                        # float32 (z, y, x)
    first: np.ndarray | None                # branch a's (None: one branch); the other's is 2 * mean - first
    spacing: tuple[float, float, float]     # mm per voxel, the plans' spacing


def predict_preprocessed(nets: Sequence[nn.Module] | nn.Module, data: np.ndarray | torch.Tensor, properties: dict,
                         plans: dict, *, mirror: bool = False, step: float = 0.5, batch_size: int = 2,
                         postprocessing: str = "none") -> np.ndarray:
    """Segment one volume preprocessed with `plans` (`common.preprocessing.preprocess_image`, or a
    site's cached entry): a uint8 0/1 array (z, y, x) on the raw file's grid, in the file's order.

    postprocessing: "none" or "largest-component" (`common.postprocessing`).
    """
    return predict_preprocessed_with_probabilities(nets, data, properties, plans, mirror=mirror, step=step,
                                                   batch_size=batch_size, postprocessing=postprocessing,
                                                   keep_probabilities=False)[0]


def predict_preprocessed_with_probabilities(
        nets: Sequence[nn.Module] | nn.Module, data: np.ndarray | torch.Tensor, properties: dict, plans: dict, *,
        mirror: bool = False, step: float = 0.5, batch_size: int = 2, postprocessing: str = "none",
        keep_probabilities: bool = True) -> tuple[np.ndarray, BranchProbabilities | None]:
    """`predict_preprocessed`, and the `BranchProbabilities` behind it (two classes only, else None)."""
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from common.image_io import to_file_order
    from common.planning import CONFIGURATION, DATASET_JSON
    from common.postprocessing import check_method, postprocess_mask

    check_method(postprocessing)
    plans_manager = PlansManager(plans)
    configuration = plans_manager.get_configuration(CONFIGURATION)
    data = torch.from_numpy(np.ascontiguousarray(data)) if isinstance(data, np.ndarray) else data
    probs, foreground, first = _sliding_window(nets, data, configuration.patch_size, step, mirror, batch_size,
                                               keep_first=keep_probabilities)
    probs = probs.to("cpu")
    kept = None
    if keep_probabilities and foreground:
        kept = BranchProbabilities(probs[0].numpy().copy(), first[0].to("cpu").numpy() if first is not None else None,
                                   tuple(float(v) for v in configuration.spacing))
    if foreground:
        seg = _foreground_to_raw_grid(probs, plans_manager, configuration, properties)
    else:
        # Probabilities, not logits, go in: the order-1 resampling and argmax give the same decision
        # rule nnU-Net applies to logits, on the quantity we averaged.
        seg = convert_predicted_logits_to_segmentation_with_correct_shape(
            probs.contiguous(), plans_manager, configuration, plans_manager.get_label_manager(dict(DATASET_JSON)),
            properties, return_probabilities=False, num_threads_torch=torch.get_num_threads())
    seg = to_file_order(np.asarray(seg), properties)  # undo the plans' reader's reorientation
    return postprocess_mask(seg, postprocessing), kept


def predict_image(nets: Sequence[nn.Module] | nn.Module, image: Path, plans: dict, *, mirror: bool = False,
                  step: float = 0.5, batch_size: int = 2, postprocessing: str = "none",
                  with_probabilities: bool = False):
    """Segment one NIfTI volume: a uint8 0/1 `SimpleITK.Image` with exactly the input's grid; with
    `with_probabilities`, (that image, its `BranchProbabilities` or None).

    postprocessing: "none" or "largest-component" (`common.postprocessing`).

    Raises `common.nifti.ImageReadError` for an unreadable file and ValueError for other bad input.
    """
    import SimpleITK as sitk

    from common.nifti import read_info
    from common.postprocessing import check_method
    from common.preprocessing import preprocess_image

    check_method(postprocessing)
    image = Path(image)
    info = read_info(image)  # one-line error for unreadable files, before nnunetv2 sees them
    if info.geometry.dimension != 3 or info.components != 1:
        raise ValueError(f"{image}: expected a 3-D scalar image, got {info.geometry.dimension}-D "
                         f"with {info.components} component(s)")
    data, _, properties = preprocess_image(image, plans)
    seg, probabilities = predict_preprocessed_with_probabilities(
        nets, data, properties, plans, mirror=mirror, step=step, batch_size=batch_size,
        postprocessing=postprocessing, keep_probabilities=with_probabilities)
    expected = tuple(reversed(info.geometry.size))
    if seg.shape != expected:
        raise RuntimeError(f"{image}: prediction shape {seg.shape} (z, y, x) does not match the input {expected}")
    result = info.geometry.apply_to(sitk.GetImageFromArray(seg))
    return (result, probabilities) if with_probabilities else result


__all__ = ["BranchProbabilities", "sliding_window_predict", "predict_preprocessed",
           "predict_preprocessed_with_probabilities", "predict_image"]
