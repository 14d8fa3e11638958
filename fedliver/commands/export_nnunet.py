"""`fedliver export-nnunet MODEL_DIR OUT`: a MODEL_DIR as an nnU-Net v2 trained-model folder.

Writes OUT/dataset.json, OUT/plans.json (MODEL_DIR's plans: the same preprocessing; the architecture
names fedliver's STU-Net by import path) and one fold per CPS branch, fold_0 = a and fold_1 = b,
each fold_K/checkpoint_final.pth. Then, wherever fedliver is installed:

    nnUNetv2_predict_from_modelfolder -i IN -o PRED -m OUT -f 0 1 -device cpu --disable_tta

(IN holds <case>_0000.nii.gz files). nnU-Net averages the folds' logits where `fedliver predict`
averages the branches' softmaxes, and does not apply MODEL_DIR's postprocessing, so the two agree
closely but not voxel for voxel. OUT/fedliver_export.json records the source and the fold mapping.
The .pth files are pickles because nnU-Net's format demands it; fedliver never loads them.
OUT must be absent or empty, or an earlier export (replaced with --force).

--ensemble softmax writes the pair as one net in fold_0 instead (run it with `-f 0`): it returns the
mean of both branches' softmaxes, `fedliver predict`'s own rule, so the two agree to
Dice >= 0.99 per volume.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export-nnunet",
        help="write a MODEL_DIR as an nnU-Net v2 model folder (one fold per CPS branch)",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", type=Path, metavar="MODEL_DIR", help="a MODEL_DIR (fedliver train, federation checkpoints)")
    parser.add_argument("out", type=Path, metavar="OUT", help="the nnU-Net model folder to write")
    parser.add_argument("--branches", default=None, metavar="a,b",
                        help="branches to export, fold k = the k-th (default: every branch, sorted)")
    parser.add_argument("--trainer", default="nnUNetTrainer",
                        help="trainer_name in the checkpoints; nnU-Net builds the net with its "
                             "build_network_architecture (default nnUNetTrainer)")
    parser.add_argument("--ensemble", choices=("folds", "softmax"), default="folds",
                        help="folds: one fold per branch (nnU-Net averages logits; default); softmax: "
                             "fold_0 = the pair returning the mean softmax, fedliver predict's rule")
    parser.add_argument("--force", action="store_true", help="replace OUT if it holds an earlier export")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from common.nnunet_export import ExportConfig, export_nnunet

    branches = [b.strip() for b in args.branches.split(",") if b.strip()] if args.branches else None
    config = ExportConfig(branches=branches, trainer_name=args.trainer, overwrite=args.force, ensemble=args.ensemble)
    try:
        result = export_nnunet(args.model, args.out, config)
    except Exception as e:  # ModelDirError / ExportError name the file; anything else still one line
        print(" ".join(str(e).split()) or type(e).__name__, file=sys.stderr)
        return 1
    folds = ", ".join(f"fold_{k} = branch {name}" for k, name in sorted(result.folds.items()))
    print(f"wrote nnU-Net model folder {result.out} ({folds}, trainer {args.trainer})")
    for note in result.notes:
        print(f"note: {note}")
    print(f"predict with: {result.predict_command()} -device cpu")
    return 0
