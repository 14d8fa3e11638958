"""Model weights on the wire: the CPS pair as one Flower ArrayRecord, and checks on what comes back.

Keys are `"<branch>.<parameter>"` (branches "a" and "b"). Arrays travel as numpy (never pickled;
Flower serialises them with `np.save(allow_pickle=False)`), optionally as float16 to halve the bytes.
`npy_array` / `npy_numpy` write and read exactly those `.npy` bytes in one copy each: Flower's own
`Array(ndarray)` and `Array.numpy()` go through a growing BytesIO and 256 KiB chunks (about three
passes over an STU-Net B pair's 465 MB each way).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from io import BytesIO

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from common.names import BRANCHES  # noqa: F401  (re-exported; declared in common.names)

Branches = dict[str, dict[str, torch.Tensor]]
NumpyBranches = dict[str, dict[str, np.ndarray]]


def flatten(branches: Mapping[str, Mapping[str, torch.Tensor | np.ndarray]]) -> dict[str, np.ndarray]:
    """`{"a": {"w": t}}` -> `{"a.w": array}` as float32 numpy arrays."""
    flat: dict[str, np.ndarray] = {}
    for branch, state in branches.items():
        for name, value in state.items():
            array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            flat[f"{branch}.{name}"] = array.astype(np.float32, copy=False)
    return flat


def unflatten(flat: Mapping[str, np.ndarray]) -> NumpyBranches:
    branches: NumpyBranches = {}
    for key, array in flat.items():
        branch, _, name = key.partition(".")
        branches.setdefault(branch, {})[name] = array
    return branches


def to_torch(branches: Mapping[str, Mapping[str, np.ndarray]]) -> Branches:
    return {
        branch: {name: torch.from_numpy(np.array(a, dtype=np.float32)) for name, a in state.items()}
        for branch, state in branches.items()
    }


def npy_array(ndarray: np.ndarray) -> Array:
    """Flower's `Array(ndarray)`, byte for byte (the `.npy` format, version 1.0, no pickle), written
    with a single copy of the data."""
    a = np.asarray(ndarray)
    if not a.flags.c_contiguous:  # (np.ascontiguousarray would also turn a 0-d array into 1-d)
        a = np.ascontiguousarray(a)
    if a.dtype.hasobject:
        raise ValueError("object arrays do not travel (they would need pickle)")
    header = BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(a))
    data = b"".join((header.getvalue(), memoryview(a).cast("B") if a.size else b""))
    return Array(dtype=str(a.dtype), shape=tuple(a.shape), stype="numpy.ndarray", data=data)


def npy_numpy(array: Array) -> np.ndarray:
    """`array.numpy()` in one copy: a writable array of the `.npy` bytes (pickled objects refused)."""
    if array.stype != "numpy.ndarray":
        return array.numpy()  # Flower's own error for other serialisations
    fp = BytesIO(array.data)
    version = np.lib.format.read_magic(fp)
    if version not in ((1, 0), (2, 0)):
        return array.numpy()
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(fp)
    if dtype.hasobject:
        raise ValueError("refusing an object array (it would need pickle)")
    count = int(np.prod(shape, dtype=np.int64))
    flat = np.frombuffer(array.data, dtype=dtype, count=count, offset=fp.tell())
    return flat.reshape(shape, order="F" if fortran_order else "C").copy(order="K")


def to_arrayrecord(flat: Mapping[str, np.ndarray], *, fp16: bool = False) -> ArrayRecord:
    """Pack flat float32 arrays; with `fp16` they travel as float16 (decoded back to float32)."""
    dtype = np.float16 if fp16 else np.float32
    return ArrayRecord({key: npy_array(np.asarray(a, dtype=dtype)) for key, a in flat.items()})


def from_arrayrecord(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Unpack to float32 arrays, whatever precision they travelled in."""
    return {key: npy_numpy(array).astype(np.float32, copy=False) for key, array in record.items()}


def record_nbytes(record: ArrayRecord) -> int:
    """Bytes of array payload in a record (what a round costs per direction per node)."""
    return int(sum(len(array.data) for array in record.values()))


def update_problems(
    update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], *, expected: Iterable[str] | None = None
) -> list[str]:
    """Why an update cannot be aggregated (empty when it can): missing or unexpected keys,
    wrong shapes, NaN or Inf. `expected` limits the keys a node must send (FedBN sends fewer)."""
    wanted = set(reference) if expected is None else set(expected)
    problems: list[str] = []
    missing = sorted(wanted - set(update))
    unexpected = sorted(set(update) - set(reference))
    if missing:
        problems.append(f"{len(missing)} missing keys (first: {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
    for key in sorted(wanted & set(update)):
        if update[key].shape != reference[key].shape:
            problems.append(f"{key}: shape {update[key].shape} instead of {reference[key].shape}")
        elif not np.isfinite(update[key]).all():
            problems.append(f"{key}: contains NaN or Inf")
    return problems


def is_norm_parameter(key: str) -> bool:
    """Instance-norm scale/shift of STU-Net (`...norm1.weight`), kept local under FedBN."""
    return ".norm" in key
