"""Augmentations that make GED4 labels teach the liver on every phase (batchgeneratorsv2 transforms).

With labels on the hepatobiliary phase only, "brightest organ = liver" fits every labeled sample,
and nnU-Net's intensity augmentations are monotone, so the shortcut survives them. These small
transforms break it on the labeled side; each is one class, inserted into nnU-Net's own pipeline
right after the spatial transform (so nnU-Net's noise, blur, contrast and gamma still follow):

- `LocationScaleIntensity` (SLAug, Su et al. 2023): a random Bezier intensity curve per class
  (liver, rest), the liver's inverted half the time, plus a random scale and shift per class. The
  liver can come out darker or brighter than anything around it: only shape and context remain.
- `SimulatedNonContrast` (MA2, CARE 2025 winner): darken the liver inside its mask, as without
  gadoxetate uptake.
- `RandomConvolutionMix` (GIN, Ouyang et al. 2023): a few random-weight convolutions with leaky
  ReLU, mixed with the input: non-monotone intensity maps with local texture, no mask needed.
- `RandomBiasField`: a smooth multiplicative field (the exponential of a random cubic polynomial
  over the patch, TorchIO's `RandomBiasField`), on labeled and unlabeled samples: a centre's coils
  and field strength shade its images more or less than the training sites' do.
- `RandomInPlaneTranspose`: swap the two in-plane axes. Scanners store slices row- or column-major
  and nnU-Net does not reorient, so a centre whose arrays are transposed shows the liver's shape
  transposed; mirroring covers flips, this covers the swap.

`strong_view_transforms` is the label-free part (bias field, GIN, a global random intensity curve):
CPS's student may see an unlabeled sample through it while its teacher sees the sample as nnU-Net
augmented it (`cps-strong-view`), so agreement has to hold across contrasts, not only within one.

Every transform draws from torch's global generator, which `BatchBuilder` seeds per sample, so a
seed gives the same samples in any thread. Images are z-scored (c, z, y, x) float tensors; the
intensity transforms work on the patch's [0.5, 99.5] percentile range mapped to [0, 1] and map the
result back to the patch's original mean and standard deviation, so the net's input scale stays.
Segmentations are (1, z, y, x): 1 liver, 0 rest, -1 outside the volume (nnU-Net's padding).
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform, ImageOnlyTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform

from common.label_transfer_config import LabelTransferConfig

#: Resolution of the intensity look-up curves.
_CURVE_POINTS = 256


# --------------------------------------------------------------------------------------------- helpers
def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(()))


def _to_unit_range(image: torch.Tensor) -> torch.Tensor:
    """The image mapped to [0, 1] by its 0.5 and 99.5 percentiles (clipped)."""
    flat = image.flatten()
    if flat.numel() > 200_000:  # percentiles of a strided subsample: same to ~1e-3, far cheaper
        flat = flat[:: flat.numel() // 100_000]
    lo, hi = (float(v) for v in torch.quantile(flat.float(), torch.tensor([0.005, 0.995])))
    if hi - lo < 1e-6:
        return torch.zeros_like(image)
    return ((image - lo) / (hi - lo)).clamp_(0.0, 1.0)


def _restandardize(out: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`out` with the mean and standard deviation of `reference` (the net's z-scored input scale)."""
    std = float(out.std())
    if not math.isfinite(std) or std < 1e-6:
        return reference.clone()
    return (out - float(out.mean())) / std * float(reference.std()) + float(reference.mean())


def bezier_curve(control: torch.Tensor, points: int = _CURVE_POINTS) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) samples of the Bezier curve through `control` ((k, 2) points), x ascending."""
    k = control.shape[0]
    t = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
    basis = torch.stack([math.comb(k - 1, i) * t**i * (1 - t) ** (k - 1 - i) for i in range(k)])  # (k, points)
    curve = basis.T @ control.double()
    order = torch.argsort(curve[:, 0])
    return curve[order, 0].float(), curve[order, 1].float()


CURVES = ("monotone", "inverted", "random")


def random_intensity_curve(kind: str = "monotone", n_control: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A random curve from [0, 1] to [0, 1] (SLAug's `non_linear_transformation` on a fixed range).

    "monotone": end points fixed, inner control points sorted; "inverted": the same, 1 - y;
    "random": every control point's y random (end points included), so the order of intensities
    is shuffled, not only reversed (fat brighter than muscle need not hold any more).
    """
    if kind not in CURVES:
        raise ValueError(f"curve kind must be one of {CURVES}, got {kind!r}")
    x = torch.cat([torch.zeros(1), torch.sort(torch.rand(n_control - 2)).values, torch.ones(1)])
    if kind == "random":
        y = torch.rand(n_control)
    else:
        y = torch.cat([torch.zeros(1), torch.sort(torch.rand(n_control - 2)).values, torch.ones(1)])
    cx, cy = bezier_curve(torch.stack([x, y], dim=1))
    return cx, (1.0 - cy) if kind == "inverted" else cy


def _random_curve_map(values: torch.Tensor, kind: str) -> torch.Tensor:
    """`values` (on [0, 1]) through a fresh random curve of `kind` (more control points when shuffled)."""
    x, y = random_intensity_curve(kind, n_control=6 if kind == "random" else 4)
    return apply_curve(values, x, y)


def _curve_kind(p_invert: float, p_random: float = 0.0) -> str:
    u = float(torch.rand(()))
    return "random" if u < p_random else "inverted" if u < p_random + (1 - p_random) * p_invert else "monotone"


def apply_curve(values: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of (x, y) at `values` (numpy.interp for tensors)."""
    idx = torch.searchsorted(x, values.contiguous()).clamp(1, x.numel() - 1)
    x0, x1, y0, y1 = x[idx - 1], x[idx], y[idx - 1], y[idx]
    w = ((values - x0) / (x1 - x0).clamp_min(1e-8)).clamp(0.0, 1.0)
    return y0 + w * (y1 - y0)


def _location_scale(values: torch.Tensor, slide_limit: float = 0.2) -> torch.Tensor:
    """SLAug's location-scale step: x * s + l, s ~ N(1, 0.1) in [0.9, 1.1], l ~ N(0, 0.5) clipped so
    that the middle 60% of the values stays inside [0, 1]."""
    if values.numel() == 0:
        return values
    scale = min(max(1.0 + 0.1 * float(torch.randn(())), 0.9), 1.1)
    location = 0.5 * float(torch.randn(()))
    lo, hi = (float(v) for v in torch.quantile(values[:: max(1, values.numel() // 50_000)],
                                               torch.tensor([slide_limit, 1 - slide_limit])))
    location = min(max(location, -lo * scale), 1.0 - hi * scale)
    return (values * scale + location).clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------- transforms
class LocationScaleIntensity(BasicTransform):
    """Per-class random intensity curves (SLAug's class-local variant, liver and rest).

    Rest (segmentation <= 0) and liver (1) each get a random Bezier curve, then a random scale and
    shift. The liver's curve is monotone (its texture keeps its sense) and inverted with
    `p_invert_liver`; the rest's is a shuffled ("random") curve with `p_random_rest` (as SLAug's
    background curve), else monotone or inverted. Voxels at the patch's lowest intensities (air,
    padding: below `background` on the [0, 1] range) keep their value, as in SLAug. The segmentation
    is unchanged. A sample without liver gets the rest's curve only.
    """

    def __init__(self, p_invert_liver: float = 0.5, p_invert_rest: float = 0.5, p_random_rest: float = 0.5,
                 background: float = 0.01):
        super().__init__()
        self.p_invert_liver = p_invert_liver
        self.p_invert_rest = p_invert_rest
        self.p_random_rest = p_random_rest
        self.background = background

    def apply(self, data_dict: dict, **params) -> dict:
        image, seg = data_dict["image"], data_dict.get("segmentation")
        liver = (seg[0] == 1) if seg is not None else torch.zeros(image.shape[1:], dtype=torch.bool)
        out = torch.empty_like(image)
        for c in range(image.shape[0]):
            unit = _to_unit_range(image[c])
            mapped = unit.clone()
            for region, kind in ((~liver, _curve_kind(self.p_invert_rest, self.p_random_rest)),
                                 (liver, _curve_kind(self.p_invert_liver))):
                if not bool(region.any()):
                    continue
                mapped[region] = _location_scale(_random_curve_map(unit[region], kind))
            keep = unit <= self.background
            mapped[keep] = unit[keep]
            out[c] = _restandardize(mapped, image[c])
        data_dict["image"] = out
        return data_dict


class SimulatedNonContrast(BasicTransform):
    """Darken the liver inside its mask by U(0, min(mean + std, max_drop)) of the [0, 1] range (MA2).

    Without gadoxetate uptake the liver is no brighter than its neighbours; this shows the net GED4
    samples where it is not. The segmentation is unchanged; samples without liver are unchanged.
    """

    def __init__(self, max_drop: float = 0.8):
        super().__init__()
        self.max_drop = max_drop

    def apply(self, data_dict: dict, **params) -> dict:
        image, seg = data_dict["image"], data_dict.get("segmentation")
        if seg is None or not bool((seg[0] == 1).any()):
            return data_dict
        liver = seg[0] == 1
        out = torch.empty_like(image)
        for c in range(image.shape[0]):
            unit = _to_unit_range(image[c])
            inside = unit[liver]
            drop = _uniform(0.0, min(float(inside.mean() + inside.std()), self.max_drop))
            unit[liver] = (inside - drop).clamp_min(0.0)
            out[c] = _restandardize(unit, image[c])
        data_dict["image"] = out
        return data_dict


class RandomConvolutionMix(ImageOnlyTransform):
    """GIN: `n_layers` random 3D convolutions (kernel 1 or 3, leaky ReLU between), mixed with the input
    by alpha ~ U(0, 1) and rescaled to the input's norm (Ouyang et al., `GINGroupConv`)."""

    def __init__(self, n_layers: int = 4, hidden: int = 2, kernel_sizes: tuple[int, ...] = (1, 3)):
        super().__init__()
        self.n_layers = n_layers
        self.hidden = hidden
        self.kernel_sizes = kernel_sizes

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        channels = img.shape[0]
        x = img.unsqueeze(0).float()
        for layer in range(self.n_layers):
            c_in = channels if layer == 0 else self.hidden
            c_out = channels if layer == self.n_layers - 1 else self.hidden
            k = self.kernel_sizes[int(torch.randint(len(self.kernel_sizes), ()))]
            weight = torch.randn(c_out, c_in, k, k, k)
            bias = torch.randn(c_out)
            x = F.conv3d(x, weight, bias, padding=k // 2)
            if layer < self.n_layers - 1:
                x = F.leaky_relu(x, 0.2)
        alpha = float(torch.rand(()))
        mixed = alpha * x[0] + (1 - alpha) * img
        norm_in, norm_out = float(img.norm()), float(mixed.norm())
        mixed = mixed * (norm_in / norm_out) if norm_out > 1e-8 else img.clone()
        return torch.stack([_restandardize(mixed[c], img[c]) for c in range(channels)])


class RandomBiasField(ImageOnlyTransform):
    """Multiply the image by exp(p(z, y, x)), p a polynomial of degree <= `order` in the patch's
    coordinates scaled to [-1, 1], its coefficients U(-`strength`, `strength`) (TorchIO's
    `RandomBiasField`, coefficients 0.5 by default there). Works on the [0, 1] range, so the field
    shades tissue, not the z-score's sign, and the result keeps the patch's mean and sd."""

    def __init__(self, strength: float = 0.2, order: int = 3):
        super().__init__()
        self.strength = strength
        self.order = order

    def field(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """exp of the random polynomial on a (z, y, x) grid of `shape`."""
        z, y, x = torch.meshgrid(*(torch.linspace(-1.0, 1.0, n) for n in shape), indexing="ij")
        log = torch.zeros(shape)
        for i in range(self.order + 1):
            for j in range(self.order + 1 - i):
                for k in range(self.order + 1 - i - j):
                    if i + j + k:
                        log += _uniform(-self.strength, self.strength) * z**i * y**j * x**k
        return torch.exp(log)

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        field = self.field(tuple(img.shape[1:]))
        return torch.stack([_restandardize(_to_unit_range(img[c]) * field, img[c]) for c in range(img.shape[0])])


class RandomIntensityCurve(ImageOnlyTransform):
    """One random Bezier curve over the whole image (no mask): monotone, inverted or shuffled
    (`random_intensity_curve`), so the order of tissue intensities may change; voxels at the lowest
    intensities (air, padding) keep theirs. Keeps the patch's mean and sd."""

    def __init__(self, p_invert: float = 0.3, p_random: float = 0.3, background: float = 0.01):
        super().__init__()
        self.p_invert = p_invert
        self.p_random = p_random
        self.background = background

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        out = torch.empty_like(img)
        for c in range(img.shape[0]):
            unit = _to_unit_range(img[c])
            mapped = _random_curve_map(unit, _curve_kind(self.p_invert, self.p_random))
            keep = unit <= self.background
            mapped[keep] = unit[keep]
            out[c] = _restandardize(mapped, img[c])
        return out


class RandomInPlaneTranspose(BasicTransform):
    """Swap the two in-plane axes (y, x) of image and segmentation; a no-op when they differ in size
    (the patch must keep its shape)."""

    def apply(self, data_dict: dict, **params) -> dict:
        for key in ("image", "segmentation"):
            value = data_dict.get(key)
            if value is not None and value.shape[-1] == value.shape[-2]:
                data_dict[key] = value.transpose(-1, -2).contiguous()
        return data_dict


# --------------------------------------------------------------------------------------------- pipeline
def label_transfer_transforms(config: LabelTransferConfig, labeled: bool) -> list[BasicTransform]:
    """The transforms to insert after nnU-Net's spatial transform, each behind its probability.
    Unlabeled samples get only the transpose and the bias field (an acquisition's shading, not a
    relabeling of tissue): their intensities are what CPS must learn to read."""
    chosen: list[tuple[float, BasicTransform]] = [(config.transpose, RandomInPlaneTranspose()),
                                                   (config.bias_field, RandomBiasField())]
    if labeled:
        chosen += [(config.non_contrast, SimulatedNonContrast()),
                   (config.location_scale, LocationScaleIntensity()),
                   (config.random_conv, RandomConvolutionMix())]
    return [RandomTransform(t, apply_probability=p) for p, t in chosen if p > 0]


def strong_view_transforms(p: float = 0.5):
    """The label-free intensity transforms of CPS's strong view, each with probability `p`: a bias
    field, GIN's random convolutions and a global random intensity curve. Intensity only: the view
    stays voxel-aligned with the weak one, so the teacher's labels on one fit the student's on the other."""
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

    return ComposeTransforms([RandomTransform(t, apply_probability=p)
                              for t in (RandomBiasField(), RandomConvolutionMix(), RandomIntensityCurve())])


def insert_after_spatial(compose, extra: list[BasicTransform]):
    """Insert `extra` into nnU-Net's `ComposeTransforms` right after its spatial transform (and the
    3D -> 2D -> 3D wrapper of anisotropic patches), before every intensity transform."""
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform

    if not extra:
        return compose
    position = None
    for i, transform in enumerate(compose.transforms):
        inner = transform.transform if isinstance(transform, RandomTransform) else transform
        if isinstance(inner, (SpatialTransform, Convert2DTo3DTransform)):
            position = i + 1
    if position is None:
        raise ValueError("nnU-Net's training transforms have no SpatialTransform to insert after")
    compose.transforms[position:position] = list(extra)
    return compose


__all__ = ["LocationScaleIntensity", "SimulatedNonContrast", "RandomConvolutionMix", "RandomBiasField",
           "RandomIntensityCurve", "RandomInPlaneTranspose", "strong_view_transforms",
           "label_transfer_transforms", "insert_after_spatial", "bezier_curve", "random_intensity_curve", "apply_curve"]
