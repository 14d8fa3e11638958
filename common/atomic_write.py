"""Crash-safe writes: a reader (or a restart after a crash) sees the old file or the new one, never half.

A file is written to a hidden sibling `.<name>.<pid>.tmp` (same folder, so the rename stays on one
file system), flushed and fsynced, then `os.replace`d over the target; the folder is fsynced after
the rename where the system allows it, so the rename itself survives a power cut. If anything fails
the temporary is removed and the target is left as it was.

A folder cannot be renamed over a non-empty folder on POSIX, so `replace_directory` moves the old one
aside, renames the new one in and only then deletes the old one (putting it back if the second
rename fails). `atomic_directory` wraps that for a folder built from scratch.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


def temporary_sibling(path: Path, suffix: str = "") -> Path:
    """`.<name>.<pid>.tmp<suffix>` beside `path`: hidden (data discovery skips dot files), per process."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")


def fsync_directory(folder: Path) -> None:
    """Make a rename in `folder` durable; a no-op where folders cannot be opened (Windows) or synced."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_open(path: Path, mode: str = "wb", *, encoding: str = "utf-8", newline: str | None = None,
                permissions: int | None = None) -> Iterator[IO[Any]]:
    """An open temporary file ("wb" or "w") that becomes `path` when the block ends without error.

    `permissions` sets the file's mode from its first byte (0o600 for files holding patient
    identifiers); None gives the usual 0o666 less the umask.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode {mode!r} (use 'w' or 'wb')")
    path = Path(path)
    tmp = temporary_sibling(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if permissions is None else permissions)
    try:
        if permissions is not None:
            os.fchmod(fd, permissions)  # a stale temporary of the same name would keep its old mode
        text = mode == "w"
        with os.fdopen(fd, mode, encoding=encoding if text else None, newline=newline if text else None) as f:
            fd = -1  # the file object owns it now
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


@contextmanager
def atomic_path(path: Path, *, suffix: str = "") -> Iterator[Path]:
    """A temporary path for writers that want a file name (SimpleITK, safetensors, torch.save); when
    the block ends without error the file is fsynced and renamed to `path`. `suffix` keeps an ending
    the writer reads the format from (".nii.gz")."""
    path = Path(path)
    tmp = temporary_sibling(path, suffix)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def atomic_write_bytes(path: Path, data: bytes, *, permissions: int | None = None) -> None:
    with atomic_open(path, "wb", permissions=permissions) as f:
        f.write(data)


def atomic_write_text(path: Path, text: str, *, encoding: str = "utf-8", permissions: int | None = None) -> None:
    with atomic_open(path, "w", encoding=encoding, permissions=permissions) as f:
        f.write(text)


def atomic_write_json(path: Path, obj: Any, *, permissions: int | None = None, **json_kwargs: Any) -> None:
    """`json.dumps(obj, **json_kwargs)` plus a final newline. The text is built before the file is
    opened, so an object JSON cannot encode leaves nothing behind."""
    atomic_write_text(path, json.dumps(obj, **json_kwargs) + "\n", permissions=permissions)


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """`np.save` (no pickles) under the crash-safe rule."""
    import numpy as np  # here, not at the top: deploy's light commands write JSON and never need numpy

    with atomic_open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


# --------------------------------------------------------------------------------------------- folders
def _fsync_tree(folder: Path) -> None:
    for here, _, files in os.walk(folder):
        for name in files:
            _fsync_file(Path(here) / name)
        fsync_directory(Path(here))


def replace_directory(tmp_dir: Path, target: Path) -> None:
    """Put the finished folder `tmp_dir` at `target`, replacing a folder there.

    An existing `target` is renamed aside first (`.<name>.<pid>.<random>.old`, same folder), `tmp_dir`
    renamed into place, and the old folder deleted only then; if the second rename fails the old one is
    put back. A crash between the two renames leaves the old folder whole under the aside name.
    `tmp_dir` is not removed on failure: it belongs to the caller. NotADirectoryError when `target`
    is a file.
    """
    tmp_dir, target = Path(tmp_dir), Path(target)
    if not target.exists() and not target.is_symlink():
        os.replace(tmp_dir, target)
        fsync_directory(target.parent)
        return
    if not target.is_dir():
        raise NotADirectoryError(f"{target}: exists and is not a folder")
    aside = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.old")
    os.replace(target, aside)
    try:
        os.replace(tmp_dir, target)
    except BaseException:
        os.replace(aside, target)  # put the previous folder back
        raise
    fsync_directory(target.parent)
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """An empty temporary folder beside `target` to fill; when the block ends without error its files
    are fsynced and it replaces `target` (`replace_directory`). On error it is removed and `target`
    is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()  # not mkdtemp: its 0700 mode would become the folder's
    try:
        yield tmp
        _fsync_tree(tmp)
        replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = [
    "atomic_directory", "atomic_open", "atomic_path", "atomic_save_npy", "atomic_write_bytes", "atomic_write_json",
    "atomic_write_text", "fsync_directory", "replace_directory", "temporary_sibling",
]
