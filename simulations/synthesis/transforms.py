"""Images drawn from tissue label maps at every sample: SynthSeg's generator as batchgeneratorsv2 transforms.

A crop of a label map (`simulations.synthesis.label_maps`: the image channel holds tissue classes,
the segmentation the liver) goes through these, in order, before nnU-Net's own pipeline (spatial,
noise, blur, contrast, gamma) runs on the result:

1. `RandomFieldOfView`: the scan ends at a random height (its top or its bottom), as real scans
   run from the lung bases or heart to the kidneys or the pelvis. Beyond the cut the image and the
   liver are gone together: outside-the-volume (-1), nnU-Net's padding.
2. `RandomTissueIntensities`: a random intensity per class (a Gaussian mixture: mean and spread per
   class), drawn uniformly or around a real sequence's contrast (T1, T2, DWI, the dynamic phases)
   with a wide jitter, with a smooth within-tissue texture. Air stays dark, as in every MRI.
3. `RandomResolution`: acquired at a coarser resolution and slice thickness, then resampled back
   (partial-volume blur and blockiness of thick slices).
4. `client.label_transfer.RandomBiasField`: a coil's smooth shading.
5. `RicianNoise`, `RandomGamma`: magnitude noise of a random level; a random gamma.
6. `ZScoreInVolume`: nnU-Net's z-score, over the voxels inside the volume; outside it is 0, as
   nnU-Net pads a z-scored image.

Every transform draws from torch's global generator, which the trainer's `BatchBuilder` seeds per
sample: a seed gives the same images in any thread. Images are (c, z, y, x) float tensors;
segmentations (1, z, y, x): 1 liver, 0 rest, -1 outside the volume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform

from client.label_transfer import RandomBiasField
from simulations.phantoms.contrast import Tissue, signal_table
from simulations.synthesis.label_maps import LIVER_CYST, N_LABELS, RENAL_CYST

#: Sequences whose contrast the mixture may be drawn around (`simulations.phantoms.contrast`).
PRIOR_SEQUENCES = ("T1", "T2", "DWI_800", "GED1", "GED2", "GED3", "GED4")
#: Classes dark on every MRI sequence.
DARK = (int(Tissue.AIR), int(Tissue.LUNG), int(Tissue.GAS))
#: Outside-the-volume label (nnU-Net's padding of segmentations).
OUTSIDE = -1


def _u(lo: float, hi: float, n: int | None = None) -> torch.Tensor | float:
    if n is None:
        return lo + (hi - lo) * float(torch.rand(()))
    return lo + (hi - lo) * torch.rand(n)


def prior_table(sequence: str, fat_suppression: float) -> torch.Tensor:
    """Relative signal per label class of `sequence` (cysts as fluid: the gallbladder's signal)."""
    table = np.zeros(N_LABELS, np.float32)
    table[:LIVER_CYST] = signal_table(sequence, fat_suppression=fat_suppression)
    table[LIVER_CYST] = table[RENAL_CYST] = table[int(Tissue.GALLBLADDER)]
    return torch.from_numpy(table)


class RandomFieldOfView(BasicTransform):
    """Cut the patch at a random z (in its middle `span`): above it (or below, half the time) image
    and segmentation become outside-the-volume. The liver beyond the cut leaves with the image."""

    def __init__(self, span: tuple[float, float] = (0.2, 0.8)):
        super().__init__()
        self.span = span

    def apply(self, data_dict: dict, **params) -> dict:
        image, seg = data_dict["image"], data_dict["segmentation"]
        depth = image.shape[1]
        cut = int(round(_u(*self.span) * depth))
        region = slice(cut, depth) if float(torch.rand(())) < 0.5 else slice(0, cut)
        image, seg = image.clone(), seg.clone()
        image[:, region] = 0.0  # class 0: air, the synthesis leaves it dark; the z-score sets it to 0
        seg[:, region] = OUTSIDE
        data_dict["image"], data_dict["segmentation"] = image, seg
        return data_dict


class RandomTissueIntensities(BasicTransform):
    """Tissue classes (image channel 0, rounded) -> intensities from a random Gaussian mixture.

    With `p_prior` the class means follow a random sequence of `PRIOR_SEQUENCES` (random fat
    suppression), each scaled by exp(N(0, `prior_jitter`)); otherwise each is U(0, 1). The spread
    of each class is U(`spread`) of the range, as a smooth texture (noise drawn at half resolution)
    plus fine noise. `DARK` classes stay below 0.05 (with `p_dark`).
    """

    def __init__(self, p_prior: float = 0.5, prior_jitter: float = 0.35, spread: tuple[float, float] = (0.01, 0.1),
                 p_dark: float = 0.95):
        super().__init__()
        self.p_prior, self.prior_jitter, self.spread, self.p_dark = p_prior, prior_jitter, spread, p_dark

    def means(self) -> torch.Tensor:
        if float(torch.rand(())) < self.p_prior:
            sequence = PRIOR_SEQUENCES[int(torch.randint(len(PRIOR_SEQUENCES), ()))]
            table = prior_table(sequence, fat_suppression=float(_u(0.6, 1.0)))
            table = table * torch.exp(torch.randn(N_LABELS) * self.prior_jitter)
            return (table / table.max().clamp_min(1e-6)).clamp(0.0, 1.0)
        return _u(0.0, 1.0, N_LABELS)

    def apply(self, data_dict: dict, **params) -> dict:
        image = data_dict["image"]
        labels = image[0].round().long().clamp_(0, N_LABELS - 1)
        means, spread = self.means(), _u(*self.spread, N_LABELS)
        if float(torch.rand(())) < self.p_dark:
            means[list(DARK)] = _u(0.0, 0.05, len(DARK))
        shape = labels.shape
        coarse = F.interpolate(torch.randn(1, 1, *(max(2, s // 2) for s in shape)), size=shape,
                               mode="trilinear", align_corners=False)[0, 0]
        texture = 0.7 * coarse / coarse.std().clamp_min(1e-6) + 0.3 * torch.randn(shape)
        out = (means[labels] + spread[labels] * texture).clamp_min(0.0)
        data_dict["image"] = out[None].to(image.dtype).repeat(image.shape[0], 1, 1, 1)
        return data_dict


class RandomResolution(BasicTransform):
    """Resample the image to a coarser grid (each axis by U(1, `max_factor`): z up to
    `max_factor_z`, in-plane together) by area averaging, and back by trilinear interpolation."""

    def __init__(self, max_factor_z: float = 2.5, max_factor_inplane: float = 1.8):
        super().__init__()
        self.max_factor_z, self.max_factor_inplane = max_factor_z, max_factor_inplane

    def apply(self, data_dict: dict, **params) -> dict:
        image = data_dict["image"]
        shape = image.shape[1:]
        fz, fxy = _u(1.0, self.max_factor_z), _u(1.0, self.max_factor_inplane)
        small = [max(2, int(round(n / f))) for n, f in zip(shape, (fz, fxy, fxy))]
        low = F.interpolate(image[None].float(), size=small, mode="area")
        data_dict["image"] = F.interpolate(low, size=tuple(shape), mode="trilinear", align_corners=False)[0].to(image.dtype)
        return data_dict


class RicianNoise(BasicTransform):
    """|image + n1 + i n2|, n1, n2 ~ N(0, sigma^2), sigma U(`sigma`) of the image's 99th percentile."""

    def __init__(self, sigma: tuple[float, float] = (0.0, 0.06)):
        super().__init__()
        self.sigma = sigma

    def apply(self, data_dict: dict, **params) -> dict:
        image = data_dict["image"]
        scale = float(torch.quantile(image.flatten()[:: max(1, image.numel() // 100_000)].float(), 0.99)) or 1.0
        s = _u(*self.sigma) * scale
        data_dict["image"] = torch.sqrt((image + s * torch.randn_like(image)) ** 2 + (s * torch.randn_like(image)) ** 2)
        return data_dict


class RandomGamma(BasicTransform):
    """image ** exp(N(0, `log_sd`)) on the image scaled to [0, 1] by its maximum."""

    def __init__(self, log_sd: float = 0.4):
        super().__init__()
        self.log_sd = log_sd

    def apply(self, data_dict: dict, **params) -> dict:
        image = data_dict["image"]
        top = float(image.max()) or 1.0
        data_dict["image"] = (image / top).clamp_min(0.0) ** float(np.exp(float(torch.randn(())) * self.log_sd))
        return data_dict


class ZScoreInVolume(BasicTransform):
    """nnU-Net's z-score over the voxels inside the volume (segmentation >= 0); outside it, 0."""

    def apply(self, data_dict: dict, **params) -> dict:
        image, seg = data_dict["image"], data_dict["segmentation"]
        inside = seg[0] >= 0
        out = torch.zeros_like(image)
        for c in range(image.shape[0]):
            values = image[c][inside]
            if values.numel() > 1:
                out[c][inside] = (values - values.mean()) / values.std().clamp_min(1e-6)
        data_dict["image"] = out
        return data_dict


@dataclass(frozen=True)
class SynthesisConfig:
    """Probabilities of the optional steps (the mixture and the z-score always run)."""
    field_of_view: float = 0.3
    resolution: float = 0.5
    bias_field: float = 0.6
    noise: float = 0.8
    gamma: float = 0.5
    p_prior: float = 0.5


def synthesis_transforms(config: SynthesisConfig = SynthesisConfig()) -> list[BasicTransform]:
    """The generator, in order: to run before nnU-Net's spatial transform (`BatchBuilder` crops first)."""
    def maybe(p: float, t: BasicTransform) -> list[BasicTransform]:
        return [RandomTransform(t, apply_probability=p)] if p > 0 else []

    return [*maybe(config.field_of_view, RandomFieldOfView()),
            RandomTissueIntensities(p_prior=config.p_prior),
            *maybe(config.resolution, RandomResolution()),
            *maybe(config.bias_field, RandomBiasField(strength=0.3)),
            *maybe(config.noise, RicianNoise()),
            *maybe(config.gamma, RandomGamma()),
            ZScoreInVolume()]


__all__ = ["RandomFieldOfView", "RandomTissueIntensities", "RandomResolution", "RicianNoise", "RandomGamma",
           "ZScoreInVolume", "SynthesisConfig", "synthesis_transforms", "prior_table", "PRIOR_SEQUENCES"]
