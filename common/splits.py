"""A site's split of its cases into training, validation and test: `splits.json`.

The file sits at the root of a site's vendor folder (`Vendor_<X>/splits.json`; for an nnU-Net raw
dataset, beside `dataset.json`) and names the cases held out from training:

    {"validation": ["0011-A-S2"], "test": ["0009-A-S1", "0010-A-S4"]}

Every other case trains. Validation cases are labeled and never trained on: the only thing model
selection may look at. Test cases are never trained on and never used to select. Without the file
every case trains (a held-out centre needs none: all its cases are test by its role).

A bad file never stops a site; each problem is one line naming the file:
- not JSON, or not an object of lists: the file is ignored and every case trains;
- an unknown key, or a key whose value is not a list of case ids: that key is ignored;
- an unknown case id: that entry is ignored;
- a case under both keys: it is taken as test (never trained on, never selected on).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path

from common.atomic_write import atomic_write_json
from common.problems import Problem

SPLIT_FILE = "splits.json"
TRAIN, VALIDATION, TEST = "train", "validation", "test"
SPLITS: tuple[str, ...] = (TRAIN, VALIDATION, TEST)
HELD_OUT_SPLITS: tuple[str, ...] = (VALIDATION, TEST)  # the keys splits.json may hold


def read_splits(path: Path, case_ids: Collection[str]) -> tuple[dict[str, str], list[Problem]]:
    """`{case id: "validation" | "test"}` for the cases `path` holds out, and its problems.

    `case_ids` are the cases of the folder the file belongs to; a missing file holds out nothing.
    """
    path = Path(path)
    if not path.is_file():
        return {}, []
    ignored = "; ignored: every case trains"
    try:
        content = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        return {}, [Problem(path, f"not valid JSON ({' '.join(str(error).split())}){ignored}")]
    if not isinstance(content, Mapping):
        expected = '{"validation": [case ids], "test": [case ids]}'
        return {}, [Problem(path, f"expected {expected}, got a JSON {type(content).__name__}{ignored}")]

    problems: list[Problem] = []
    listed: dict[str, list[str]] = {}
    for key, value in content.items():
        if key not in HELD_OUT_SPLITS:
            problems.append(Problem(path, f"unknown key {key!r} (ignored; the keys are {', '.join(HELD_OUT_SPLITS)})"))
        elif not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            problems.append(Problem(path, f"{key!r} is not a list of case ids (ignored)"))
        else:
            listed[key] = list(dict.fromkeys(value))  # repeats mean nothing more

    known = set(case_ids)
    splits: dict[str, str] = {}
    for key in HELD_OUT_SPLITS:  # test last: a case under both keys ends up test
        unknown = [case for case in listed.get(key, []) if case not in known]
        if unknown:
            problems.append(Problem(path, f"unknown case id{'s' if len(unknown) > 1 else ''} under {key!r}: "
                                          f"{', '.join(unknown)} (ignored)"))
        splits.update({case: key for case in listed.get(key, []) if case in known})
    both = sorted(set(listed.get(VALIDATION, [])) & set(listed.get(TEST, [])) & known)
    if both:
        problems.append(Problem(path, f"listed under both validation and test: {', '.join(both)} (taken as test)"))
    return splits, problems


def write_splits(folder: Path, *, validation: Collection[str] = (), test: Collection[str] = ()) -> Path:
    """Write `folder/splits.json` holding out these cases."""
    path = Path(folder) / SPLIT_FILE
    atomic_write_json(path, {VALIDATION: list(validation), TEST: list(test)}, indent=1)
    return path


__all__ = ["SPLIT_FILE", "SPLITS", "HELD_OUT_SPLITS", "TRAIN", "VALIDATION", "TEST", "read_splits", "write_splits"]
