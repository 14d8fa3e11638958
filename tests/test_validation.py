"""Validation of real malformed NIfTI files written with SimpleITK (or broken byte by byte)."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from common.discovery import Case
from common.nifti import Geometry, ImageReadError, geometry_differences, read_image, read_info, voxel_stats
from common.validation import (
    Problem,
    ValidationConfig,
    ValidationError,
    check_image,
    check_mask,
    validate_case,
    validate_image,
    validate_mask,
)

SHAPE_ZYX = (16, 32, 32)
SPACING_XYZ = (1.0, 1.0, 2.5)


def blob(shape=SHAPE_ZYX) -> np.ndarray:
    """An ellipsoid of ones in the middle of a zero volume (z, y, x)."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    inside = sum(((axis - s / 2) / (s / 3)) ** 2 for axis, s in zip((z, y, x), shape))
    return (inside <= 1).astype(np.uint8)


def write(path: Path, array: np.ndarray, *, spacing=SPACING_XYZ, origin=(0.0, 0.0, 0.0), direction=None) -> Path:
    image = sitk.GetImageFromArray(array)
    if array.ndim == 3:
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        if direction is not None:
            image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def volume(seed: int = 0, shape=SHAPE_ZYX) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(50, 10, shape) + 100 * blob(shape)).astype(np.float32)


@pytest.fixture()
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return write(tmp_path / "GED4.nii.gz", volume()), write(tmp_path / "mask_GED4.nii.gz", blob())


def messages(problems: list[Problem]) -> list[str]:
    return [p.message for p in problems]


def test_good_image_and_mask_pass(pair):
    image, mask = pair
    assert check_image(image) == []
    assert check_mask(mask, image) == []
    geometry = validate_image(image)
    assert geometry.size == (32, 32, 16) and geometry.spacing == SPACING_XYZ
    validate_mask(mask, geometry)  # no exception


def test_truncated_gzip_cannot_be_read(tmp_path, pair):
    data = pair[0].read_bytes()
    broken = tmp_path / "T1.nii.gz"
    broken.write_bytes(data[: len(data) // 2])
    # SimpleITK alone reads this silently with zero-filled voxels; we must not.
    assert sitk.ReadImage(str(broken)).GetSize() == (32, 32, 16)
    [problem] = check_image(broken)
    assert problem.path == broken
    assert problem.message.startswith("cannot read: truncated")
    with pytest.raises(ImageReadError, match="cannot read: truncated"):
        read_image(broken)


def test_truncated_uncompressed_nifti(tmp_path, pair):
    raw = gzip.decompress(pair[0].read_bytes())
    broken = tmp_path / "T2.nii"
    broken.write_bytes(raw[: len(raw) - 1000])
    assert messages(check_image(broken)) == [f"cannot read: truncated file ({len(raw) - 1000} of {len(raw)} bytes)"]


def test_corrupt_gzip_stream(tmp_path, pair):
    data = bytearray(pair[0].read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0x5A for b in data[middle : middle + 64])
    broken = tmp_path / "DWI_800.nii.gz"
    broken.write_bytes(bytes(data))
    [message] = messages(check_image(broken))
    assert message.startswith("cannot read: ")


def test_garbage_and_empty_files(tmp_path):
    garbage = tmp_path / "GED1.nii.gz"
    garbage.write_bytes(b"this is not a NIfTI image\n" * 20)
    empty = tmp_path / "GED2.nii.gz"
    empty.write_bytes(b"")
    assert messages(check_image(garbage)) == ["cannot read: not a gzip file"]
    assert messages(check_image(empty)) == ["cannot read: empty file"]
    assert messages(check_image(tmp_path / "missing.nii.gz")) == ["cannot read: no such file"]


def test_2d_and_4d_images_are_refused(tmp_path):
    flat = write(tmp_path / "flat.nii.gz", np.ones((32, 32), np.float32))
    assert messages(check_image(flat)) == ["expected a 3D image, got 2D (shape (32, 32))"]
    series = sitk.JoinSeries([sitk.GetImageFromArray(volume())] * 2)
    four = tmp_path / "four.nii.gz"
    sitk.WriteImage(series, str(four), useCompression=True)
    assert messages(check_image(four)) == ["expected a 3D image, got 4D (shape (32, 32, 16, 2))"]


def test_nan_and_inf_voxels_are_counted(tmp_path):
    array = volume()
    array[0, 0, :3] = np.nan
    array[5, 5, 5] = np.inf
    bad = write(tmp_path / "GED4.nii.gz", array)
    assert messages(check_image(bad)) == ["contains 4 NaN/Inf voxels"]
    with pytest.raises(ValidationError) as info:
        validate_image(bad)
    assert str(info.value) == f"{bad}: contains 4 NaN/Inf voxels"
    assert "\n" not in str(info.value)


def test_all_zero_image_is_a_problem_but_empty_mask_is_not(tmp_path, pair):
    zero = write(tmp_path / "zero.nii.gz", np.zeros(SHAPE_ZYX, np.float32))
    assert messages(check_image(zero)) == ["image is empty (all voxels are 0)"]
    empty_mask = write(tmp_path / "mask_empty.nii.gz", np.zeros(SHAPE_ZYX, np.uint8))
    assert check_mask(empty_mask, pair[0]) == []


def test_mask_with_value_2(tmp_path, pair):
    labels = blob()
    labels[8, 16, 16] = 2
    bad = write(tmp_path / "mask_GED4.nii.gz", labels)
    assert messages(check_mask(bad, pair[0])) == ["mask is not binary: values {0, 1, 2}"]
    # A label map whose declared labels include 2 (ATLAS tumor) is fine.
    assert check_mask(bad, pair[0], allowed_labels=(0, 1, 2)) == []
    labels[0, 0, 0] = 7
    write(bad, labels)
    assert messages(check_mask(bad, pair[0], allowed_labels=(0, 1, 2))) == [
        "mask has values outside the declared labels [0, 1, 2]: values {0, 1, 2, 7}"
    ]


def test_float_mask_with_fractions(tmp_path, pair):
    soft = write(tmp_path / "mask_soft.nii.gz", blob().astype(np.float32) * 0.5)
    assert messages(check_mask(soft, pair[0])) == ["mask is not binary: values {0, 0.5}"]


def test_mask_of_the_wrong_size(tmp_path, pair):
    small = write(tmp_path / "mask_GED4.nii.gz", blob((8, 32, 32)))
    assert messages(check_mask(small, pair[0])) == [
        "mask geometry differs from GED4.nii.gz: size (32, 32, 8) vs (32, 32, 16)"
    ]


@pytest.mark.parametrize(
    ("change", "word"),
    [
        ({"spacing": (1.0, 1.0, 3.0)}, "spacing (1, 1, 3) vs (1, 1, 2.5)"),
        ({"origin": (0.0, 0.0, 5.0)}, "origin (0, 0, 5) vs (0, 0, 0)"),
        ({"direction": (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)}, "direction (-1, 0, 0"),
    ],
)
def test_mask_with_other_spacing_origin_direction(tmp_path, pair, change, word):
    moved = write(tmp_path / "mask_GED4.nii.gz", blob(), **change)
    [message] = messages(check_mask(moved, pair[0]))
    assert message.startswith("mask geometry differs from GED4.nii.gz: ")
    assert word in message


def test_geometry_tolerances():
    base = Geometry((32, 32, 16), (1.0, 1.0, 2.5), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    close = Geometry((32, 32, 16), (1.0, 1.0, 2.5001), (0.0, 0.005, 0.0), (1.0, 0, 0, 0, 1.0, 0.0005, 0, 0, 1.0))
    assert geometry_differences(close, base) == []
    far = Geometry((32, 32, 16), (1.0, 1.0, 2.51), (0.0, 0.05, 0.0), base.direction)
    assert [d.split(" ")[0] for d in geometry_differences(far, base)] == ["spacing", "origin"]
    config = ValidationConfig(origin_atol_mm=0.1, spacing_rtol=0.01)
    assert geometry_differences(far, base, spacing_rtol=config.spacing_rtol, origin_atol_mm=config.origin_atol_mm) == []
    assert Geometry.from_dict(base.to_dict()) == base


def test_read_info_reads_the_header_only(pair):
    info = read_info(pair[0])
    assert info.geometry.size == (32, 32, 16)
    assert info.components == 1 and info.pixel_type == "32-bit float"


def test_validate_case_consequences(tmp_path, pair):
    image, mask = pair
    t1 = write(tmp_path / "T1.nii.gz", volume(1))
    bad_mask = write(tmp_path / "mask_T1.nii.gz", blob() * 3)
    broken = tmp_path / "T2.nii.gz"
    broken.write_bytes(image.read_bytes()[:500])
    t2_mask = write(tmp_path / "mask_T2.nii.gz", blob())
    case = Case("0001-A-S2", "A", 2, images={"GED4": image, "T1": t1, "T2": broken},
                masks={"GED4": mask, "T1": bad_mask, "T2": t2_mask})
    kept, problems = validate_case(case)
    assert kept is not None
    assert list(kept.images) == ["GED4", "T1"]
    assert list(kept.masks) == ["GED4"]  # T1 stays as unlabeled, T2 went with its image
    lines = {p.path.name: p.message for p in problems}
    assert set(lines) == {"T2.nii.gz", "mask_T1.nii.gz"}
    assert lines["T2.nii.gz"].endswith("(phase T2 skipped, with its mask)")
    assert lines["mask_T1.nii.gz"] == "mask is not binary: values {0, 3} (mask ignored; T1 used unlabeled)"
    # The returned case is an ordinary, picklable value.
    assert pickle.loads(pickle.dumps(kept)) == kept and hash(kept) == hash(kept)


def test_case_without_valid_image_is_dropped(tmp_path):
    broken = tmp_path / "0002-A" / "GED4.nii.gz"
    broken.parent.mkdir()
    broken.write_bytes(b"\x1f\x8b garbage")
    kept, problems = validate_case(Case("0002-A", "A", None, images={"GED4": broken}, masks={}))
    assert kept is None
    assert [str(p) for p in problems][-1] == f"{broken.parent}: case 0002-A dropped: no valid image"


def test_voxel_stats_streams_in_chunks(tmp_path):
    array = volume()
    array[3, 4, 5] = np.nan
    array[10, :, 0] = 0
    path = write(tmp_path / "GED4.nii.gz", array)
    whole = voxel_stats(path)
    pieces = voxel_stats(path, chunk_bytes=1000)  # 17 chunks and a remainder
    assert whole == pieces
    assert whole.count == array.size and whole.non_finite == 1
    assert whole.nonzero == int(np.count_nonzero(np.nan_to_num(array)))
    labels = blob()
    labels[0, 0, 0] = 2
    stats = voxel_stats(write(tmp_path / "mask.nii.gz", labels), max_values=5, chunk_bytes=777)
    assert stats.values == (0.0, 1.0, 2.0)


def test_image_given_as_mask(tmp_path, pair):
    [message] = messages(check_mask(pair[0], pair[0]))
    assert message == "mask is not binary: values {more than 10 distinct}"


def test_gzip_crc_error_is_caught(tmp_path, pair):
    # Intact data and length field, a wrong CRC32 (trailer bytes -8..-5).
    data = bytearray(pair[1].read_bytes())
    data[-5] ^= 0xFF
    broken = tmp_path / "mask_GED4.nii.gz"
    broken.write_bytes(bytes(data))
    [message] = messages(check_mask(broken, pair[0]))
    assert message.startswith("cannot read: ")
    with pytest.raises(ImageReadError, match="CRC check failed"):
        voxel_stats(broken)
