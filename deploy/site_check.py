"""What `fedliver supernode` checks in a hospital's data folder before it connects.

A SuperNode with nothing usable would connect, look healthy, and fail only once a run starts (a
traceback at the hospital, a lost site at the coordinator). So the folder is indexed first, the
way `fedliver check` does, but without opening the images (seconds, whatever the data size):

- it must be a LiQA vendor folder (`Vendor_<X>/<case>/<PHASE>.nii.gz`) or an nnU-Net raw dataset;
- a LiQA tree with several `Vendor_<X>` folders is refused: a node trains on everything under its
  data folder, so it must point at its own vendor folder;
- a training site needs at least one labeled training case, a held-out (eval) site at least one
  case with a mask to score.

`fedliver check DIR` still validates every file (geometry, labels); run it once per new data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.discovery import VENDOR_PREFIX, index_dataset
from common.splits import TRAIN
from common.validation import ValidationError


@dataclass(frozen=True)
class DataCheck:
    ok: bool
    message: str  # one line: the refusal, or what was found


def check_site_data(data_dir: Path, role: str) -> DataCheck:
    """Is `data_dir` one site's usable data for `role` ("train" or "eval")?"""
    data_dir = Path(data_dir)
    try:
        index = index_dataset(data_dir, validate=False)
    except ValidationError as err:
        return DataCheck(False, str(err))
    vendors = sorted({case.center for case in index.cases if case.center} | _vendor_folders(data_dir))
    if len(vendors) > 1:
        listed = ", ".join(f"{VENDOR_PREFIX}{v}" for v in vendors)
        return DataCheck(False, f"{data_dir}: holds {len(vendors)} vendor folders ({listed}); a node trains on "
                                f"everything under --data-dir: point it at this site's own folder, e.g. "
                                f"{data_dir / (VENDOR_PREFIX + vendors[0])}")
    if not index.cases:
        return DataCheck(False, f"{data_dir}: no case with an image found ({len(index.problems)} problems; "
                                f"`fedliver check {data_dir}` lists them)")
    labeled = [c for c in index.cases if c.masks and (role == "eval" or c.split == TRAIN)]
    if not labeled:
        need = "a labeled training case (a mask_GED4 not held out by splits.json)" if role == "train" \
            else "a case with a mask to score"
        return DataCheck(False, f"{data_dir}: {len(index.cases)} cases but none usable for role {role}: "
                                f"needs {need}")
    return DataCheck(True, f"{data_dir}: {len(index.cases)} cases, {len(labeled)} labeled"
                           f"{' for training' if role == 'train' else ''}, {len(index.problems)} problems "
                           f"(not opened here; `fedliver check` validates every file)")


def _vendor_folders(root: Path) -> set[str]:
    if root.name.startswith(VENDOR_PREFIX):
        return {root.name[len(VENDOR_PREFIX):]}
    try:
        return {d.name[len(VENDOR_PREFIX):] for d in root.iterdir()
                if d.is_dir() and d.name.startswith(VENDOR_PREFIX)}
    except OSError:
        return set()
