"""Point nnU-Net's environment variables at a private folder, only for the duration of a block.

nnunetv2 reads `nnUNet_raw`, `nnUNet_preprocessed` and `nnUNet_results` from the environment each
time a path is used (`nnunetv2.paths._EnvPath`), so setting them inside a context manager and
restoring them afterwards is enough; nothing leaks into the rest of the process.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

_VARS = {"raw": "nnUNet_raw", "preprocessed": "nnUNet_preprocessed", "results": "nnUNet_results"}
# Bounded worker counts: this project runs nnU-Net in-process on small machines.
_PROC_VARS = {"nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1"}


@dataclass(frozen=True)
class NnunetPaths:
    raw: Path
    preprocessed: Path
    results: Path


@contextmanager
def private_nnunet_env(root: Path) -> Iterator[NnunetPaths]:
    """Create `root/{nnUNet_raw,nnUNet_preprocessed,nnUNet_results}` and point nnU-Net at them.

    The previous values (or their absence) are restored on exit, even after an exception.
    Not thread-safe: the environment is process-wide.
    """
    root = Path(root)
    paths = NnunetPaths(root / "nnUNet_raw", root / "nnUNet_preprocessed", root / "nnUNet_results")
    wanted = {_VARS["raw"]: str(paths.raw), _VARS["preprocessed"]: str(paths.preprocessed),
              _VARS["results"]: str(paths.results)}
    wanted.update({k: v for k, v in _PROC_VARS.items() if k not in os.environ})
    saved = {k: os.environ.get(k) for k in wanted}
    for p in (paths.raw, paths.preprocessed, paths.results):
        p.mkdir(parents=True, exist_ok=True)
    try:
        os.environ.update(wanted)
        yield paths
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
