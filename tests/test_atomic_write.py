"""common.atomic_write: what is written arrives whole, and a failure mid-write changes nothing."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import SimpleITK as sitk

import common.atomic_write as aw
from common.atomic_write import (
    atomic_directory, atomic_open, atomic_path, atomic_save_npy, atomic_write_bytes, atomic_write_json,
    atomic_write_text, replace_directory,
)


def _leftovers(folder):
    """Hidden temporaries (and aside folders) the helpers may have left."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_each_writer_writes_its_content(tmp_path):
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "t.txt", "héllo\n")
    atomic_write_json(tmp_path / "j.json", {"b": 1, "a": [1.5]}, indent=1, sort_keys=True)
    atomic_save_npy(tmp_path / "a.npy", np.arange(6, dtype=np.int16).reshape(2, 3))
    with atomic_open(tmp_path / "c.csv", "w", newline="") as f:
        f.write("x,y\r\n")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "j.json").read_text() == '{\n "a": [\n  1.5\n ],\n "b": 1\n}\n'
    loaded = np.load(tmp_path / "a.npy", allow_pickle=False)
    assert loaded.dtype == np.int16 and loaded.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert (tmp_path / "c.csv").read_bytes() == b"x,y\r\n"
    assert _leftovers(tmp_path) == []


def test_replaces_an_existing_file_and_sets_permissions(tmp_path):
    path = tmp_path / "ids.json"
    path.write_text("old")
    os.chmod(path, 0o644)
    atomic_write_json(path, {"patient": "x"}, permissions=0o600)
    assert json.loads(path.read_text()) == {"patient": "x"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    atomic_write_text(path, "plain")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_unserialisable_json_leaves_the_previous_file(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_json(path, {"round": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"round": 2, "bad": object()})
    with pytest.raises(ValueError):
        atomic_write_json(path, {"dice": float("nan")}, allow_nan=False)
    assert json.loads(path.read_text()) == {"round": 1}
    assert _leftovers(tmp_path) == []


def test_a_write_that_fails_midway_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    atomic_write_text(path, "complete old content\n")

    class DiskFull(OSError):
        pass

    def failing_fsync(fd):  # the data went out but never reached the disk
        raise DiskFull("No space left on device")

    monkeypatch.setattr(aw.os, "fsync", failing_fsync)
    with pytest.raises(DiskFull):
        atomic_write_text(path, "half of the new")
    monkeypatch.undo()
    with pytest.raises(RuntimeError):  # an exception while the caller writes into the open file
        with atomic_open(path, "w") as f:
            f.write("partial")
            raise RuntimeError("writer crashed")
    with pytest.raises(ValueError):  # np.save refuses object arrays without pickle
        atomic_save_npy(tmp_path / "a.npy", np.array([{"x": 1}], dtype=object))
    assert path.read_text() == "complete old content\n"
    assert not (tmp_path / "a.npy").exists()
    assert _leftovers(tmp_path) == []


def test_atomic_path_for_writers_that_want_a_name(tmp_path):
    image = sitk.GetImageFromArray(np.ones((3, 4, 5), dtype=np.uint8))
    out = tmp_path / "case" / "GED4_pred.nii.gz"
    out.parent.mkdir()
    with atomic_path(out, suffix=".nii.gz") as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".") and tmp.name.endswith(".nii.gz")
        sitk.WriteImage(image, str(tmp), useCompression=True)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(out))).sum() == 60
    with pytest.raises(RuntimeError):  # ITK cannot write an image to a format it does not know
        with atomic_path(out, suffix=".unknown-format") as tmp:
            sitk.WriteImage(image, str(tmp))
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(out))).sum() == 60
    assert _leftovers(out.parent) == []


def _tree(folder, content):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "file.txt").write_text(content)
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "deep.txt").write_text(content * 2)


def test_replace_directory_swaps_a_full_folder(tmp_path):
    target = tmp_path / "model"
    _tree(target, "old")
    (target / "only_in_old").write_text("gone after the swap")
    new = tmp_path / ".new"
    _tree(new, "new")
    replace_directory(new, target)
    assert (target / "file.txt").read_text() == "new" and (target / "sub" / "deep.txt").read_text() == "newnew"
    assert not (target / "only_in_old").exists() and not new.exists()
    assert _leftovers(tmp_path) == []
    fresh = tmp_path / ".fresh"  # no folder at the target yet
    _tree(fresh, "first")
    replace_directory(fresh, tmp_path / "other")
    assert (tmp_path / "other" / "file.txt").read_text() == "first"


def test_replace_directory_restores_the_old_folder_when_the_swap_fails(tmp_path):
    target = tmp_path / "model"
    _tree(target, "old")
    with pytest.raises(FileNotFoundError):  # the second rename fails: nothing to move in
        replace_directory(tmp_path / ".never-written", target)
    assert (target / "file.txt").read_text() == "old" and (target / "sub" / "deep.txt").read_text() == "oldold"
    assert _leftovers(tmp_path) == []
    (tmp_path / "plain").write_text("a file")
    _tree(tmp_path / ".new", "new")
    with pytest.raises(NotADirectoryError, match="plain: exists and is not a folder"):
        replace_directory(tmp_path / ".new", tmp_path / "plain")
    assert (tmp_path / "plain").read_text() == "a file"


def test_atomic_directory_fills_then_swaps_or_leaves_nothing(tmp_path):
    target = tmp_path / "best"
    with atomic_directory(target) as tmp:
        _tree(tmp, "round 3")
        assert not target.exists()  # nothing visible until the block ends
    assert (target / "file.txt").read_text() == "round 3"
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~_umask()  # not mkdtemp's 0700
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            _tree(tmp, "round 4")
            raise RuntimeError("crashed while copying")
    assert (target / "file.txt").read_text() == "round 3"
    assert _leftovers(tmp_path) == []
