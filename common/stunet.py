"""STU-Net (Huang et al. 2023) with the official parameter names, so released checkpoints load unchanged.

Structure (shapes checked against shared/reference/stunet_official_state_dict.json):
6 encoder stages of residual blocks (the first block of stages >= 1 strided), 5 decoder stages, each
upsampling with nearest interpolation + 1x1x1 conv (no transposed conv: weights do not depend on the
plan's strides), and 5 deep-supervision heads. The first block of every stage, encoder and decoder,
has a 1x1x1 shortcut conv `conv3`. Tensors are (b, c, z, y, x); strides are per axis in (z, y, x).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn import functional as F

from common.names import CONFIGURATION

# size -> (base width, residual blocks per stage); channels per stage = base * STAGE_MULTIPLIERS.
STUNET_SIZES: dict[str, tuple[int, int]] = {
    "T": (8, 1),  # CPU demo width (not published)
    "S": (16, 1),
    "B": (32, 1),
    "L": (64, 2),
    "H": (96, 3),
}
STAGE_MULTIPLIERS = (1, 2, 4, 8, 16, 16)
# Pooling of the published checkpoints (TotalSegmentator plan, 1.5 mm isotropic, patch 128^3).
PRETRAINING_STRIDES: list[list[int]] = [[2, 2, 2]] * 4 + [[1, 1, 2]]


def stunet_strides(pool_op_kernel_sizes: Sequence[Sequence[int]] | None) -> list[list[int]]:
    """Cut or pad a plan's pooling strides to exactly the 5 STU-Net needs.

    A leading [1, 1, 1] (nnU-Net v2 `strides`, where stage 0 does not downsample) is dropped;
    missing strides are padded with [1, 1, 1]; extra ones are cut. None gives the pretraining strides.
    """
    if pool_op_kernel_sizes is None:
        return [list(s) for s in PRETRAINING_STRIDES]
    strides = [[int(v) for v in s] for s in pool_op_kernel_sizes]
    if any(len(s) != 3 or min(s) < 1 for s in strides):
        raise ValueError(f"STU-Net is 3D: every stride needs 3 positive ints, got {pool_op_kernel_sizes}")
    if strides and strides[0] == [1, 1, 1]:
        strides = strides[1:]
    return (strides + [[1, 1, 1]] * 5)[:5]


def stage_features(size: str = "S", base_width: int | None = None) -> tuple[list[int], int]:
    """(channels of the 6 stages, blocks per stage) for a size, optionally with another base width."""
    if size not in STUNET_SIZES:
        raise ValueError(f"unknown STU-Net size {size!r}; choose one of {sorted(STUNET_SIZES)}")
    width, blocks = STUNET_SIZES[size]
    width = width if base_width is None else int(base_width)
    if width < 1:
        raise ValueError(f"base_width must be >= 1, got {base_width}")
    return [width * m for m in STAGE_MULTIPLIERS], blocks


class BasicResBlock(nn.Module):
    """conv-IN-LReLU-conv-IN plus the (optionally 1x1x1-projected) input, then LReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: Sequence[int] = (1, 1, 1),
                 use_1x1conv: bool = False) -> None:
        super().__init__()
        stride = tuple(stride)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.norm1 = nn.InstanceNorm3d(out_channels, affine=True)
        self.act1 = nn.LeakyReLU(0.01, inplace=True)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.norm2 = nn.InstanceNorm3d(out_channels, affine=True)
        self.act2 = nn.LeakyReLU(0.01, inplace=True)
        self.conv3 = nn.Conv3d(in_channels, out_channels, 1, stride=stride) if use_1x1conv else None
        if self.conv3 is None and (in_channels != out_channels or stride != (1, 1, 1)):
            raise ValueError("a block that changes channels or stride needs its 1x1x1 shortcut")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        y = y + (self.conv3(x) if self.conv3 is not None else x)
        return self.act2(y)


class UpsampleLayer(nn.Module):
    """Nearest-neighbour upsampling by the stage's stride, then a 1x1x1 conv to the skip's width."""

    def __init__(self, in_channels: int, out_channels: int, stride: Sequence[int]) -> None:
        super().__init__()
        self.stride = tuple(int(s) for s in stride)
        self.conv = nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = [n * s for n, s in zip(x.shape[2:], self.stride)]
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


def _stage(in_channels: int, out_channels: int, blocks: int, stride: Sequence[int]) -> nn.Sequential:
    first = BasicResBlock(in_channels, out_channels, stride, use_1x1conv=True)
    return nn.Sequential(first, *[BasicResBlock(out_channels, out_channels) for _ in range(blocks - 1)])


class STUNet(nn.Module):
    """STU-Net. The signature follows nnU-Net's `get_network_from_plans` (input_channels, num_classes,
    then the plan's `arch_kwargs`). `strides` may be the plan's 6 (first [1,1,1]) or the 5 pooling strides.

    forward(x) returns the full-resolution logits, or, when `self.deep_supervision` is True, the 5
    heads' logits at their own resolutions, highest resolution first (nnU-Net v2 convention).
    """

    def __init__(self, input_channels: int, num_classes: int,
                 features_per_stage: Sequence[int] = (16, 32, 64, 128, 256, 256),
                 blocks_per_stage: int = 1,
                 strides: Sequence[Sequence[int]] | None = None,
                 kernel_sizes: Sequence[Sequence[int]] | None = None,
                 deep_supervision: bool = True) -> None:
        super().__init__()
        dims = [int(f) for f in features_per_stage]
        if len(dims) != 6:
            raise ValueError(f"STU-Net has 6 stages, got features_per_stage={list(features_per_stage)}")
        if int(blocks_per_stage) < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, got {blocks_per_stage}")
        if kernel_sizes is not None and any(list(k) != [3, 3, 3] for k in kernel_sizes):
            raise ValueError(f"STU-Net uses 3x3x3 kernels only, got kernel_sizes={kernel_sizes}")
        self.input_channels = int(input_channels)
        self.num_classes = int(num_classes)
        self.strides = stunet_strides(strides)
        self.deep_supervision = bool(deep_supervision)
        blocks = int(blocks_per_stage)

        self.conv_blocks_context = nn.ModuleList(
            [_stage(self.input_channels, dims[0], blocks, (1, 1, 1))]
            + [_stage(dims[d - 1], dims[d], blocks, self.strides[d - 1]) for d in range(1, 6)])
        # Decoder lists are ordered deepest first (index 0 works on the lowest resolution).
        self.upsample_layers = nn.ModuleList(
            [UpsampleLayer(dims[5 - u], dims[4 - u], self.strides[4 - u]) for u in range(5)])
        self.conv_blocks_localization = nn.ModuleList(
            [_stage(2 * dims[4 - u], dims[4 - u], blocks, (1, 1, 1)) for u in range(5)])
        self.seg_outputs = nn.ModuleList([nn.Conv3d(dims[4 - u], self.num_classes, 1) for u in range(5)])
        self.apply(self.initialize)

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """nnU-Net's InitWeights_He(1e-2); the caller seeds with torch.manual_seed."""
        if isinstance(module, nn.Conv3d):
            nn.init.kaiming_normal_(module.weight, a=1e-2)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @property
    def divisor(self) -> tuple[int, int, int]:
        """Input sizes (z, y, x) must be multiples of these: the product of the strides per axis."""
        return tuple(math.prod(s[a] for s in self.strides) for a in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if x.ndim != 5 or x.shape[1] != self.input_channels:
            raise ValueError(f"STU-Net expects (b, {self.input_channels}, z, y, x), got {tuple(x.shape)}")
        if any(n % d for n, d in zip(x.shape[2:], self.divisor)):
            raise ValueError(f"STU-Net input size {tuple(x.shape[2:])} (z, y, x) is not divisible by "
                             f"{self.divisor}, the product of the strides {self.strides}")
        skips = []
        for stage in self.conv_blocks_context[:-1]:
            x = stage(x)
            skips.append(x)
        x = self.conv_blocks_context[-1](x)
        outputs = []
        for u in range(5):
            x = self.upsample_layers[u](x)
            x = self.conv_blocks_localization[u](torch.cat((x, skips[-(u + 1)]), dim=1))
            if self.deep_supervision or u == 4:
                outputs.append(self.seg_outputs[u](x))
        return outputs[::-1] if self.deep_supervision else outputs[-1]



class STUNetEnsemble(nn.Module):
    """The CPS pair as one net (`a.*`, `b.*`, as a MODEL_DIR stores it) for nnU-Net's predictor: it
    returns the mean of both branches' softmaxes. nnU-Net blends tiles, resamples and takes the argmax
    of whatever the net returns as it would logits; on probabilities that is `fedliver predict`'s own
    rule (nnU-Net's fold ensemble averages logits instead). Built by nnU-Net from plans whose
    `network_class_name` names it (`fedliver export-nnunet --ensemble softmax`)."""

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False, **arch_kwargs) -> None:
        super().__init__()
        # Inference only: one full-resolution output per branch, whatever nnU-Net asks for.
        self.a = STUNet(input_channels, num_classes, deep_supervision=False, **arch_kwargs)
        self.b = STUNet(input_channels, num_classes, deep_supervision=False, **arch_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.softmax(self.a(x).float(), 1) + torch.softmax(self.b(x).float(), 1)) / 2

def build_stunet(size: str = "S", in_channels: int = 1, num_classes: int = 2,
                 strides: Sequence[Sequence[int]] | None = None, base_width: int | None = None,
                 deep_supervision: bool = True, device: torch.device | str | None = None) -> STUNet:
    """A published (S, B, L, H) or CPU (T) STU-Net; `base_width` rescales the channels
    (base_width * (1, 2, 4, 8, 16, 16)); `strides` are 5 (z, y, x) strides, None = pretraining's.
    `device="meta"` builds the structure without allocating memory."""
    features, blocks = stage_features(size, base_width)
    with torch.device(device) if device is not None else nullcontext():
        return STUNet(in_channels, num_classes, features, blocks, strides, deep_supervision=deep_supervision)


def stunet_architecture_block(size: str = "T", base_width: int | None = None,
                              strides: Sequence[Sequence[int]] | None = None) -> dict:
    """The `architecture` block of an nnU-Net plans configuration describing this STU-Net."""
    features, blocks = stage_features(size, base_width)
    return {
        "network_class_name": "common.stunet.STUNet",
        "arch_kwargs": {
            "features_per_stage": features,
            "blocks_per_stage": blocks,
            "strides": [[1, 1, 1]] + stunet_strides(strides),
            "kernel_sizes": [[3, 3, 3]] * 6,
        },
        "_kw_requires_import": [],
    }


def build_stunet_from_plans(plans: dict, num_classes: int = 2, deep_supervision: bool = True) -> STUNet:
    """STU-Net from `plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]`."""
    try:
        kwargs = dict(plans["configurations"][CONFIGURATION]["architecture"]["arch_kwargs"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"plans have no configurations.{CONFIGURATION}.architecture.arch_kwargs ({e})") from None
    missing = [k for k in ("features_per_stage", "blocks_per_stage", "strides") if k not in kwargs]
    if missing:
        raise ValueError(f"plans arch_kwargs lack {missing}")
    return STUNet(int(kwargs.get("in_channels", 1)), num_classes, kwargs["features_per_stage"],
                  kwargs["blocks_per_stage"], kwargs["strides"], kwargs.get("kernel_sizes"), deep_supervision)

