"""Model weights on the wire: the CPS pair as one Flower ArrayRecord, and checks on what comes back.

Keys are `"<branch>.<parameter>"` (branches "a" and "b"). Arrays travel as numpy (never pickled;
Flower serialises them with `np.save(allow_pickle=False)`), optionally as float16 to halve the bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

Branches = dict[str, dict[str, torch.Tensor]]
NumpyBranches = dict[str, dict[str, np.ndarray]]

BRANCHES: tuple[str, ...] = ("a", "b")


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


def to_arrayrecord(flat: Mapping[str, np.ndarray], *, fp16: bool = False) -> ArrayRecord:
    """Pack flat float32 arrays; with `fp16` they travel as float16 (decoded back to float32)."""
    dtype = np.float16 if fp16 else np.float32
    return ArrayRecord({key: Array(np.ascontiguousarray(a, dtype=dtype)) for key, a in flat.items()})


def from_arrayrecord(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Unpack to float32 arrays, whatever precision they travelled in."""
    return {key: array.numpy().astype(np.float32, copy=False) for key, array in record.items()}


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
