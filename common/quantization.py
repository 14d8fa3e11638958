"""Smaller updates: a site's update as 8-bit deltas against the model it received.

Per tensor, delta = update - received is sent as int8 `q` with one float32 scale `s`:

    s = max|delta| / 127          (0 for an all-zero delta; NaN if the delta has NaN/Inf)
    q = clip(rint(delta / s), -127, 127)
    decoded = received + q * s    (float32; |delta - q * s| <= s / 2 up to float32 rounding)

All tensors travel packed in two arrays, `int8-values` (every q, the reference's keys in sorted
order) and `int8-scales` (one per tensor, same order), so the record carries two array headers
instead of one per tensor: 1 byte per weight, at most 1/4 of the float32 update in bytes.
The server decodes against the model it sent (after fp16 transport: its fp16 rounding, the same
values the site received). Flower 1.42 has no update codec of its own (its quantisation belongs
to SecAgg+), hence this one.

The site's side, which puts a reply on the wire this way, is `client/update_encoding.py`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord

from common.weights import from_arrayrecord, npy_array, npy_numpy, to_arrayrecord

VALUES_KEY = "int8-values"
SCALES_KEY = "int8-scales"
INT8_MAX = 127


def quantize_int8(delta: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """(q as int8 of delta's shape, scale) as the module docstring defines them."""
    x = np.asarray(delta, dtype=np.float32)
    if x.size == 0 or not np.any(x):
        return np.zeros(x.shape, np.int8), np.float32(0.0)
    if not np.isfinite(x).all():  # sent as NaN: the server's screening rejects the update
        return np.zeros(x.shape, np.int8), np.float32(np.nan)
    scale = np.float32(np.abs(x).max() / np.float32(INT8_MAX))
    if scale == 0:  # below float32's smallest step once divided: nothing to send
        return np.zeros(x.shape, np.int8), np.float32(0.0)
    q = np.clip(np.rint(x / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale


def dequantize_int8(q: np.ndarray, scale: float | np.floating) -> np.ndarray:
    return q.astype(np.float32) * np.float32(scale)


def encode_int8_delta(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> ArrayRecord:
    """The update as packed int8 deltas against `reference` (same keys and shapes required)."""
    if set(update) != set(reference):
        raise ValueError(f"int8 update: keys differ from the received model ({len(update)} vs {len(reference)})")
    values, scales = [], []
    for key in sorted(reference):
        if update[key].shape != reference[key].shape:
            raise ValueError(f"int8 update: {key} has shape {update[key].shape}, the received model {reference[key].shape}")
        q, scale = quantize_int8(np.asarray(update[key], np.float32) - np.asarray(reference[key], np.float32))
        values.append(q.ravel())
        scales.append(scale)
    packed = np.concatenate(values) if values else np.zeros(0, np.int8)
    return ArrayRecord({VALUES_KEY: npy_array(packed), SCALES_KEY: npy_array(np.asarray(scales, np.float32))})


def is_int8_record(record: ArrayRecord) -> bool:
    return set(record.keys()) == {VALUES_KEY, SCALES_KEY}


def decode_int8_delta(record: ArrayRecord, reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """float32 arrays `reference + q * s`; ValueError (one line) if the record does not fit the reference."""
    values, scales = npy_numpy(record[VALUES_KEY]), npy_numpy(record[SCALES_KEY])
    keys = sorted(reference)
    sizes = [int(np.asarray(reference[k]).size) for k in keys]
    if values.dtype != np.int8 or values.ndim != 1 or values.size != sum(sizes):
        raise ValueError(f"int8 update: {values.size} {values.dtype} values for a model of {sum(sizes)} weights")
    if scales.shape != (len(keys),):
        raise ValueError(f"int8 update: {scales.size} scales for a model of {len(keys)} tensors")
    decoded, offset = {}, 0
    for key, size, scale in zip(keys, sizes, scales.astype(np.float32)):
        ref = np.asarray(reference[key], np.float32)
        decoded[key] = ref + dequantize_int8(values[offset:offset + size], scale).reshape(ref.shape)
        offset += size
    return {key: decoded[key] for key in reference}  # the reference's key order


def decode_update(record: ArrayRecord, reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A site's update as float32 arrays, whatever it travelled as (int8 deltas, fp16, fp32)."""
    return decode_int8_delta(record, reference) if is_int8_record(record) else from_arrayrecord(record)
