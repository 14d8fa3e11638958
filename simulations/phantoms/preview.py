"""A PNG contact sheet of the phantoms: rows = centers, columns = phases.

Each panel is the axial slice through the middle of the liver, reoriented to the radiological view
(patient right on the image's left, anterior up) whatever the file's direction matrix, with the
liver mask drawn as a contour where a mask exists.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from common.phases import PHASES, image_filename, mask_filename

Panel = tuple[sitk.Image, "sitk.Image | None"]


def _as_panel(item) -> Panel:
    if isinstance(item, tuple):
        return item
    return item.image, item.mask  # PhaseImage


def render_preview(rows: Sequence[tuple[str, Mapping[str, object]]], png: Path,
                   phases: Sequence[str] = ("T1", "T2", "DWI_800", "GED1", "GED2", "GED3", "GED4")) -> Path:
    """Draw `rows` of (center, {phase: (image, mask|None) or PhaseImage}) into `png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(len(rows), len(phases), figsize=(1.55 * len(phases), 1.4 * len(rows) + 0.3),
                             squeeze=False, facecolor="black")
    for r, (center, panels) in enumerate(rows):
        for c, phase in enumerate(phases):
            ax = axes[r, c]
            ax.set_facecolor("black")
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if r == 0:
                ax.set_title(phase, color="white", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"Vendor_{center}", color="white", fontsize=8)
            if phase not in panels:
                ax.text(0.5, 0.5, "missing", color="gray", ha="center", va="center", fontsize=7,
                        transform=ax.transAxes)
                continue
            image, mask = _as_panel(panels[phase])
            _draw(ax, image, mask)
    fig.subplots_adjust(left=0.03, right=0.995, top=0.93, bottom=0.01, wspace=0.03, hspace=0.05)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, facecolor="black", format="png")
    plt.close(fig)
    # an adaptive 8-bit palette keeps the sheet small (grey levels plus the contour colour)
    from PIL import Image

    Image.open(buf).convert("RGB").quantize(colors=160).save(png, optimize=True)
    return png


def _draw(ax, image: sitk.Image, mask: sitk.Image | None) -> None:
    img = sitk.DICOMOrient(image, "LPS")  # index axes -> +x (patient left), +y (posterior), +z
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    sx, sy, _ = img.GetSpacing()
    m = sitk.GetArrayFromImage(sitk.DICOMOrient(mask, "LPS")) if mask is not None else None
    if m is not None and m.any():
        z = int(round(float(np.argwhere(m)[:, 0].mean())))  # the liver's centroid slice
    else:
        z = arr.shape[0] // 2
    sl = arr[z]
    lo, hi = np.percentile(sl, [1, 99.5])
    extent = (0, sl.shape[1] * sx, sl.shape[0] * sy, 0)
    ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, extent=extent, interpolation="bilinear")
    if m is not None and m[z].any():
        yy = (np.arange(sl.shape[0]) + 0.5) * sy
        xx = (np.arange(sl.shape[1]) + 0.5) * sx
        ax.contour(xx, yy, m[z], levels=[0.5], colors=["#ff5a36"], linewidths=0.7)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])


def write_preview(root: Path, png: Path) -> Path:
    """Preview of an existing LiQA tree: for each `Vendor_<X>`, the case holding the most phases."""
    root = Path(root)
    rows = []
    for vendor in sorted(p for p in root.glob("Vendor_*") if p.is_dir()):
        cases = sorted(p for p in vendor.iterdir() if p.is_dir())
        if not cases:
            continue
        best = max(cases, key=lambda d: (sum((d / image_filename(p)).exists() for p in PHASES),
                                         sum((d / mask_filename(p)).exists() for p in PHASES)))
        panels = {}
        for phase in PHASES:
            f = best / image_filename(phase)
            if f.exists():
                mf = best / mask_filename(phase)
                panels[phase] = (sitk.ReadImage(str(f)), sitk.ReadImage(str(mf)) if mf.exists() else None)
        rows.append((vendor.name.removeprefix("Vendor_"), panels))
    if not rows:
        raise FileNotFoundError(f"{root}: no Vendor_<X> folders with cases")
    return render_preview(rows, png)
