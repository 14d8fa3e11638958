"""The `.npy` codec of model arrays on the wire: Flower's bytes, fewer copies, nothing pickled."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array

from common.weights import from_arrayrecord, npy_array, npy_numpy, to_arrayrecord

RNG = np.random.default_rng(0)
ARRAYS = {
    "3-d float32": RNG.standard_normal((3, 4, 5), dtype=np.float32),
    "0-d": np.array(3.5, np.float32),
    "empty": np.zeros((0, 3), np.float32),
    "float16": RNG.standard_normal(7).astype(np.float16),
    "int8": np.arange(-5, 5, dtype=np.int8),
    "big-endian": np.arange(6, dtype=">f4").reshape(2, 3),
}


@pytest.mark.parametrize("name", list(ARRAYS))
def test_bytes_equal_flowers_and_decode_both_ways(name):
    a = ARRAYS[name]
    ours, flowers = npy_array(a), Array(a)
    assert ours.data == flowers.data and (ours.dtype, ours.shape, ours.stype) == (flowers.dtype, flowers.shape, flowers.stype)
    for decoded in (npy_numpy(flowers), flowers.numpy(), npy_numpy(ours)):
        assert decoded.dtype == a.dtype and decoded.shape == a.shape
        np.testing.assert_array_equal(decoded, a)
    assert npy_numpy(ours).flags.writeable  # a copy, not a view of the message's bytes


def test_non_contiguous_and_fortran_arrays_travel_by_value():
    a = RNG.standard_normal((4, 6))
    for view in (a[:, ::2], np.asfortranarray(a)):
        np.testing.assert_array_equal(npy_numpy(npy_array(view)), view)
        np.testing.assert_array_equal(npy_numpy(Array(np.asfortranarray(view))), view)  # Flower's Fortran order


def test_objects_never_travel():
    with pytest.raises(ValueError, match="pickle"):
        npy_array(np.array([{"x": 1}], dtype=object))
    header = io.BytesIO()  # a peer's message: an object array's .npy header, then a pickle
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(np.empty(1, object)))
    hostile = Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=header.getvalue() + b"\x80\x04K\x01.")
    with pytest.raises(ValueError, match="pickle"):
        npy_numpy(hostile)


def test_records_round_trip_in_float32_and_float16():
    flat = {"a.w": RNG.standard_normal((2, 3), dtype=np.float32), "b.w": RNG.standard_normal(4, dtype=np.float32)}
    back = from_arrayrecord(to_arrayrecord(flat))
    assert all(np.array_equal(back[k], flat[k]) and back[k].dtype == np.float32 for k in flat)
    half = from_arrayrecord(to_arrayrecord(flat, fp16=True))
    assert all(np.array_equal(half[k], flat[k].astype(np.float16).astype(np.float32)) for k in flat)
