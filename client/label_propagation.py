"""Cross-phase label propagation: a labeled case's GED4 mask carried onto its other phases.

The phases of one examination are not co-registered, but they share the scanner's patient
coordinate system: resampling the GED4 mask onto the T1 (T2, DWI) grid through those coordinates
(identity transform, nearest neighbour; no registration, nothing estimated) gives a label that
is right up to the patient's motion between the two acquisitions (breathing: about a centimetre
along z; rigid shifts of a few mm). That noisy label shows the nets what the liver looks like
where it is not bright, which no intensity augmentation of GED4 can; CPS then refines the
boundary on the unlabeled volumes. Only the site's own files are used, and the derived masks stay
in its cache folder.
"""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from common.atomic_write import atomic_path


def _grid_of(image: Path) -> sitk.Image:
    """An empty uint8 image with `image`'s grid (size, spacing, origin, direction), voxels unread."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(image))
    reader.ReadImageInformation()
    reference = sitk.Image([int(s) for s in reader.GetSize()[:3]], sitk.sitkUInt8)
    reference.SetSpacing(reader.GetSpacing()[:3])
    reference.SetOrigin(reader.GetOrigin()[:3])
    direction = reader.GetDirection()
    reference.SetDirection(direction if len(direction) == 9 else tuple(direction[i * 4 + j] for i in range(3)
                                                                       for j in range(3)))
    return reference


def propagate_mask(mask: Path, image: Path, out: Path, foreground_labels: tuple[int, ...] = (1,)) -> Path:
    """Write `mask` (liver = `foreground_labels`) resampled onto `image`'s grid as a 0/1 uint8 NIfTI
    at `out`; kept when `out` is newer than both inputs. Returns `out`."""
    out = Path(out)
    if out.is_file() and out.stat().st_mtime >= max(Path(mask).stat().st_mtime, Path(image).stat().st_mtime):
        return out
    source = sitk.ReadImage(str(mask))
    liver = sitk.Image(source.GetSize(), sitk.sitkUInt8)
    liver.CopyInformation(source)
    for label in foreground_labels:
        liver = liver | (source == int(label))
    propagated = sitk.Resample(liver, _grid_of(image), sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, suffix=".nii.gz") as partial:  # never a half-written mask under the final name
        sitk.WriteImage(propagated, str(partial), True)
    return out


__all__ = ["propagate_mask"]
