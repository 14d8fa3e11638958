"""A site's validation findings, stored: each file is read and checked once per change.

`StoredFileChecks` is the `FileInspector` of a site's prepared dataset (`<cache>/index/files.json`).
Each file's check (its geometry and its problem lines) is kept under the file's path, size and
modification time: while those three are unchanged the stored finding is served and no voxel is
read; a changed or new file is read, checked and stored again. Files that are gone drop out of the
store when it is saved. The findings are reported every time (discovery turns them into the index's
problem lines), whether they were read now or earlier.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from common.atomic_write import atomic_write_json
from common.nifti import Geometry
from common.validation import FileCheck, ValidationConfig, inspect_image, inspect_mask

#: Bump when what a check finds changes (new rules), so stored findings are read again.
CHECKS_FORMAT = 1


@dataclass(frozen=True)
class FileStamp:
    """What says a file is unchanged without reading it: its size and modification time."""

    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileStamp | None:
        try:
            stat = os.stat(path)
        except OSError:
            return None
        return cls(stat.st_size, stat.st_mtime_ns)


def _geometry_json(geometry: Geometry | None) -> dict | None:
    if geometry is None:
        return None
    return {"size": list(geometry.size), "spacing": list(geometry.spacing),
            "origin": list(geometry.origin), "direction": list(geometry.direction)}


def _geometry(entry: dict | None) -> Geometry | None:
    if entry is None:
        return None
    return Geometry(size=tuple(int(v) for v in entry["size"]), spacing=tuple(float(v) for v in entry["spacing"]),
                    origin=tuple(float(v) for v in entry["origin"]), direction=tuple(float(v) for v in entry["direction"]))


class StoredFileChecks:
    """Findings per (kind, path, size, mtime), loaded from and saved to `store` (JSON, no pickle).

    `read` counts the files read by this object, `reused` those served from the store.
    """

    def __init__(self, store: Path):
        self.store = Path(store)
        self.read = 0
        self.reused = 0
        self._stored = self._load()
        self._used: dict[str, dict] = {}

    def _load(self) -> dict[str, dict]:
        try:
            content = json.loads(self.store.read_text())
        except (OSError, ValueError):
            return {}  # no store yet, or an unreadable one: every file is read again
        if not isinstance(content, dict) or content.get("format") != CHECKS_FORMAT:
            return {}
        checks = content.get("checks")
        return checks if isinstance(checks, dict) else {}

    def image(self, path: Path, config: ValidationConfig) -> FileCheck:
        return self._check(f"image|{path}", path, config, lambda: inspect_image(path, config))

    def mask(self, path: Path, allowed_labels: Iterable[int], config: ValidationConfig) -> FileCheck:
        allowed = ",".join(str(v) for v in sorted({0, *(int(v) for v in allowed_labels)}))
        return self._check(f"mask|{allowed}|{path}", path, config, lambda: inspect_mask(path, allowed_labels, config))

    def _check(self, key: str, path: Path, config: ValidationConfig, inspect) -> FileCheck:
        stamp = FileStamp.of(path)
        stored = self._stored.get(key)
        if stamp is not None and stored is not None and stored.get("stamp") == [stamp.size, stamp.mtime_ns] \
                and stored.get("config") == repr(config):
            try:
                check = FileCheck(Path(path), _geometry(stored["geometry"]), tuple(str(p) for p in stored["problems"]))
            except (KeyError, TypeError, ValueError):
                check = None  # a damaged entry: read the file again
            if check is not None:
                self.reused += 1
                self._used[key] = stored
                return check
        check = inspect()
        self.read += 1
        if stamp is not None and stamp == FileStamp.of(path):  # unchanged while it was read
            self._used[key] = {"stamp": [stamp.size, stamp.mtime_ns], "config": repr(config),
                               "geometry": _geometry_json(check.geometry), "problems": list(check.problems)}
        return check

    @property
    def changed(self) -> bool:
        return self.read > 0 or set(self._used) != set(self._stored)

    def save(self) -> None:
        """Keep the findings of the files checked this time (files gone since drop out)."""
        if not self.changed:
            return
        self.store.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.store, {"format": CHECKS_FORMAT, "checks": self._used}, sort_keys=True)
        self._stored = dict(self._used)


__all__ = ["CHECKS_FORMAT", "FileStamp", "StoredFileChecks"]
