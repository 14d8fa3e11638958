"""Overlay PNGs of a prediction: what a reader looks at first (worst cases, volumes QC flags)."""

from __future__ import annotations

from pathlib import Path


def overlay(image: Path, truth: Path | None, labels, pred: Path, title: str, out: Path) -> None:
    """Three axial slices through the true liver (without `truth`: the predicted one), the image with
    the truth (green) and prediction (red) contours; `labels` the truth's liver values (None: > 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import SimpleITK as sitk

    def read(path: Path) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS"))

    img, seg = read(image), read(pred)
    ref = np.zeros(seg.shape, bool) if truth is None else read(truth)
    ref = np.isin(ref, labels) if labels else ref > 0
    zs = np.flatnonzero(ref.any(axis=(1, 2))) if ref.any() else np.flatnonzero(seg.any(axis=(1, 2)))
    if zs.size == 0:
        zs = np.array([img.shape[0] // 2])
    picks = [int(np.percentile(zs, q)) for q in (25, 50, 75)]
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.8))
    for ax, z in zip(axes, picks):
        ax.imshow(img[z], cmap="gray")
        if ref[z].any():
            ax.contour(ref[z], levels=[0.5], colors="lime", linewidths=1.0)
        if seg[z].any():
            ax.contour(seg[z] > 0, levels=[0.5], colors="red", linewidths=1.0)
        ax.set_title(f"slice {z}", fontsize=9)
        ax.axis("off")
    legend = "red: prediction" if truth is None else "green: truth, red: prediction"
    fig.suptitle(f"{title} ({legend}; patient's right on the left)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
