"""`fedliver evaluate --pred OUT --truth IN [--json FILE]`: Dice and HD95 of predictions against masks.

Every OUT/<case>/<PHASE>_pred.nii.gz (what `fedliver predict` writes) is compared with its
reference mask in IN:
  - a LiQA tree: <case folder>/mask_<PHASE>.nii.gz; an nnU-Net raw dataset: labelsTr/<case>.nii.gz
    (every phase of the case; dataset.json's liver/tumour labels count as liver);
  - otherwise IN/<case>/mask_<PHASE>.nii.gz, or IN/<case>.nii.gz for GED4.
Writes per case, per phase Dice and HD95 (mm) with a per-phase summary (mean, sd, median, n) to
OUT/evaluation.json (or --json FILE) and prints a table. HD95 is the larger of the two directed
95th percentiles of surface distances (MONAI's definition); an empty prediction or reference (not
both) scores the diagonal of the volume in mm, both empty score Dice 1 and HD95 0.
Predictions without a reference are listed, not fatal. A prediction that cannot be read or lies on
another grid than its reference prints one line and the rest goes on; the exit status is then 1
(and also when nothing could be evaluated).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from client.prediction_evaluation import EvaluateConfig, evaluate_predictions


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="per case, per phase Dice and HD95 (mm) of predictions against reference masks",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pred", type=Path, required=True, metavar="OUT",
                        help="predictions: OUT/<case>/<PHASE>_pred.nii.gz")
    parser.add_argument("--truth", type=Path, required=True, metavar="IN",
                        help="references: a LiQA tree, an nnU-Net raw dataset or a folder of case folders")
    parser.add_argument("--json", type=Path, default=EvaluateConfig.json, metavar="FILE",
                        help="where to write the results (default OUT/evaluation.json)")
    parser.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> EvaluateConfig:
    """The parsed command line as the function's configuration."""
    return EvaluateConfig(pred=args.pred, truth=args.truth, json=args.json)


def run(args: argparse.Namespace) -> int:
    return evaluate_predictions(config_from_args(args))
