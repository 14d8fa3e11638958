"""Names written into fedliver's files and messages, declared once.

`CONFIGURATION` is the one nnU-Net configuration the plans hold (`plans["configurations"][...]`,
the export's `init_args`). `BRANCHES` are the CPS pair's branch names: the key prefixes of
MODEL_DIR's "<branch>.<parameter>", the Flower ArrayRecord, pretrained pair checkpoints, the nnU-Net
export's folds. This module imports nothing, so it sits below every other (common.planning,
common.stunet and common.weights re-use it) and a CLI parser can offer the names without torch.
"""

CONFIGURATION = "3d_fullres"
BRANCHES: tuple[str, ...] = ("a", "b")

__all__ = ["BRANCHES", "CONFIGURATION"]
