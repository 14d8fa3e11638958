"""Which nnU-Net reader a run uses, and the way back from its array order to a file's own.

Scanners store slices in their own order: LiQA-like centre C stores them transposed and flipped
(orientation code PLI) where the others store RAS or LPS. nnU-Net's default reader keeps the
stored order, so a net trained on RAS-stored sites sees C's liver transposed, in a place and shape
it never saw. nnU-Net's own `SimpleITKIOWithReorient` reorients every image to RAS on read: axis
permutations and flips taken from the header's direction cosines, lossless, no resampling, nothing
estimated. Plans name the reader (`image_reader_writer`), so preprocessing, inference and an
exported nnU-Net model (whose predictor writes segmentations back in the file's orientation) all
read the same way. Plans without the key keep nnU-Net's default, `SimpleITKIO`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Readers a plans file may name: nnunetv2's SimpleITK readers, nothing imported by arbitrary name.
READERS = ("SimpleITKIO", "SimpleITKIOWithReorient")
#: What fedliver's plans name: every site's arrays in one (RAS) orientation.
DEFAULT_READER = "SimpleITKIOWithReorient"
#: nnU-Net's own default, for plans that do not say.
NNUNET_DEFAULT_READER = "SimpleITKIO"


def reader_name(plans: dict | None) -> str:
    """The reader `plans` name (nnU-Net's default when they name none); ValueError for any other."""
    name = (plans or {}).get("image_reader_writer", NNUNET_DEFAULT_READER)
    if name not in READERS:
        raise ValueError(f"plans: image_reader_writer {name!r} is not supported; expected one of {', '.join(READERS)}")
    return name


def image_reader(name: str = DEFAULT_READER) -> Any:
    """An instance of the nnunetv2 reader called `name` (one of READERS)."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO, SimpleITKIOWithReorient

    classes = {"SimpleITKIO": SimpleITKIO, "SimpleITKIOWithReorient": SimpleITKIOWithReorient}
    if name not in classes:
        raise ValueError(f"unknown image reader {name!r}; expected one of {', '.join(READERS)}")
    return classes[name]()


def to_file_order(array: np.ndarray, properties: dict) -> np.ndarray:
    """A (z, y, x) array in the reader's orientation -> the same voxels in the file's stored order.

    The inverse of what `SimpleITKIOWithReorient` did on read (nnU-Net's `write_seg` does the same
    with `DICOMOrient`); arrays read by `SimpleITKIO` come back unchanged."""
    stuff = properties.get("sitk_stuff", {})
    original = stuff.get("original_orientation")
    if not original:
        return array
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing([float(s) for s in stuff["spacing"]])
    image.SetOrigin([float(o) for o in stuff["origin"]])
    image.SetDirection([float(d) for d in stuff["direction"]])
    return sitk.GetArrayFromImage(sitk.DICOMOrient(image, original))


__all__ = ["READERS", "DEFAULT_READER", "NNUNET_DEFAULT_READER", "reader_name", "image_reader", "to_file_order"]
