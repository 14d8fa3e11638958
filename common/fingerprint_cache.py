"""A site's fingerprint, kept per volume: only new or changed volumes are read again.

`cached_site_fingerprint` gives what `compute_site_fingerprint` gives (the merge is exact: counts,
sums, M2, min, max and histograms add up), but keeps each volume's own fingerprint in
`<folder>/<key>.npz` (plain numeric arrays, loaded without pickle), its key the SHA-256 of the
image's and mask's path, size and modification time and of the FingerprintConfig. A volume that
could not be fingerprinted keeps its problem line in `<key>.json`, reported again each time.
Entries of volumes the site no longer has are removed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.atomic_write import atomic_write_bytes, atomic_write_json
from common.file_checks import FileStamp
from common.fingerprint import FingerprintConfig, SiteFingerprint, compute_site_fingerprint, merge_fingerprints
from common.problems import Problem

#: Bump when a volume's fingerprint is computed differently, so stored ones are recomputed.
ENTRY_FORMAT = 1


@dataclass
class FingerprintCacheStats:
    computed: int = 0  # volumes read and fingerprinted now
    reused: int = 0    # volumes served from the folder


def _key(image: Path, mask: Path | None, config: FingerprintConfig) -> str:
    parts = [ENTRY_FORMAT, config.to_array().tolist()]
    for path in (image, mask):
        stamp = FileStamp.of(path) if path is not None else None
        parts.append([str(path), stamp.size, stamp.mtime_ns] if stamp else [str(path), None, None])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:40]


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _load(entry: Path) -> SiteFingerprint | None:
    try:
        with np.load(entry, allow_pickle=False) as arrays:
            return SiteFingerprint.from_arrays({name: arrays[name] for name in arrays.files})
    except (OSError, ValueError, KeyError):
        return None  # missing or damaged: computed again


def cached_site_fingerprint(pairs: Sequence[tuple[Path, Path | None]], folder: Path,
                            config: FingerprintConfig | None = None,
                            problems: list[Problem] | None = None) -> tuple[SiteFingerprint, FingerprintCacheStats]:
    """The fingerprint of (image, mask or None) `pairs`, each volume's part stored under `folder`.

    A bad file is one line in `problems` (as `compute_site_fingerprint` reports it) and is skipped.
    """
    config = config or FingerprintConfig()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stats = FingerprintCacheStats()
    parts: list[SiteFingerprint] = [SiteFingerprint(config=config)]
    kept: set[str] = set()
    for image, mask in pairs:
        image, mask = Path(image), (Path(mask) if mask is not None else None)
        key = _key(image, mask, config)
        entry, failure = folder / f"{key}.npz", folder / f"{key}.json"
        kept.update({entry.name, failure.name})
        if failure.is_file():
            try:
                stored = [Problem(Path(p["path"]), str(p["message"])) for p in json.loads(failure.read_text())]
            except (OSError, ValueError, KeyError, TypeError):
                stored = None
            if stored is not None:
                stats.reused += 1
                if problems is not None:
                    problems += stored
                continue
        if (part := _load(entry)) is not None and part.config == config:
            stats.reused += 1
            parts.append(part)
            continue
        found: list[Problem] = []
        part = compute_site_fingerprint([(image, mask)], config, problems=found)
        stats.computed += 1
        if found:
            atomic_write_json(failure, [{"path": str(p.path), "message": p.message} for p in found])
            if problems is not None:
                problems += found
            continue
        atomic_write_bytes(entry, _npz_bytes(part.to_arrays()))
        parts.append(part)
    for stale in folder.iterdir():
        if stale.suffix in (".npz", ".json") and stale.name not in kept:
            stale.unlink(missing_ok=True)
    return merge_fingerprints(parts), stats


__all__ = ["cached_site_fingerprint", "FingerprintCacheStats"]
