"""`fedliver predict -i IN -o OUT -m MODEL_DIR`: segment every phase volume under IN with a MODEL_DIR.

Writes OUT/<case>/<PHASE>_pred.nii.gz (uint8, 0 background / 1 liver) on each input's raw grid
(same size, spacing, origin and direction), the LiQA challenge's output layout, and
OUT/predictions.csv (and .json): per volume the liver volume (mL), connected components, branch
agreement Dice(a, b), entropy, the liver's position in the body, each phase's volume against the
case's median, and the verdict columns qc_score (0-1, higher = more trustworthy), qc (ok | review)
and qc_reasons. --review-dir R writes an overlay PNG of each `review` volume into R.

IN may be:
  - a dataset `fedliver check` accepts: a LiQA root (Vendor_<X>/<case>/<PHASE>.nii.gz), one
    Vendor_<X> folder, or an nnU-Net raw dataset (its imagesTr/; pass imagesTs/ as a plain folder);
  - a plain folder of .nii.gz/.nii files (or one such file). File names map to <case> and <PHASE>:
      <PHASE>.nii.gz          case = the folder's name (a single LiQA case folder), e.g. T1.nii.gz
      <case>_<PHASE>.nii.gz   e.g. 0001-A_T2.nii.gz
      <case>_0000.nii.gz      nnU-Net channel naming: case = <case>, phase GED4
      <case>.nii.gz           phase GED4 (the hepatobiliary phase, the one the model is labeled on)
    Files named mask_*.nii.gz are labels and skipped.
A bad input file prints one line `path: problem` and the rest goes on; the exit status is 1 when
any volume failed. One progress line per volume with its seconds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from client.prediction import PredictConfig, predict
from common.names import BRANCHES
from common.postprocessing import METHODS


def register(subparsers: argparse._SubParsersAction) -> None:
    # Defaults are the function's (client/prediction.py): the command line and a script start from the same.
    parser = subparsers.add_parser(
        "predict",
        help="segment the liver in every phase volume of a dataset or folder with a MODEL_DIR",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-i", "--input", type=Path, required=True, metavar="IN",
                        help="LiQA/nnU-Net dataset, plain folder of .nii.gz files, or one .nii.gz file")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="OUT",
                        help="output folder: OUT/<case>/<PHASE>_pred.nii.gz")
    parser.add_argument("-m", "--model", type=Path, required=True, metavar="MODEL_DIR",
                        help="a MODEL_DIR (model.safetensors, plans.json, info.json, manifest.json)")
    parser.add_argument("--branch", choices=(*BRANCHES, "both"), default=PredictConfig.branch,
                        help="CPS branch to use; 'both' averages the two softmaxes (default: every "
                             "branch in MODEL_DIR)")
    parser.add_argument("--mirror", action="store_true",
                        help="test-time mirroring over all axes (8x slower, usually a little better)")
    parser.add_argument("--phases", type=_phase_list, default=PredictConfig.phases, metavar="GED4,T1,...",
                        help="only these phases (default: every phase found)")
    parser.add_argument("--step", type=float, default=PredictConfig.step,
                        help=f"sliding-window step as a fraction of the patch (default {PredictConfig.step})")
    parser.add_argument("--postprocessing", choices=("model", *METHODS), default=PredictConfig.postprocessing,
                        help="'largest-component' keeps the largest liver component in every phase, 'none' the "
                             "raw argmax (default 'model': what MODEL_DIR's info.json says, for the phases it "
                             "names; 'none' if it says nothing)")
    parser.add_argument("--device", default=PredictConfig.device,
                        help="auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N "
                             f"(default {PredictConfig.device})")
    parser.add_argument("--dicom-source", type=Path, default=PredictConfig.dicom_source, metavar="DICOM_DIR",
                        help="IN was made by `fedliver import-dicom DICOM_DIR`: also write OUT/<case>/<PHASE>_seg.dcm, "
                             "a DICOM SEG over each source series")
    parser.add_argument("--dicom-seg", action="store_true",
                        help="IN is a DICOM folder: import it (--phase-map) into OUT/dicom_import, predict, and write "
                             "a DICOM SEG per series")
    parser.add_argument("--phase-map", type=Path, default=PredictConfig.phase_map, metavar="JSON",
                        help="with --dicom-seg: SeriesDescription -> phase, as for import-dicom (deploy/phases.json)")
    parser.add_argument("--review-dir", type=Path, default=PredictConfig.review_dir, metavar="R",
                        help="an overlay PNG (three slices, contours) of each volume quality control flags `review`")
    parser.add_argument("--threads", type=int, default=PredictConfig.threads,
                        help="CPU threads for torch (default: torch's own choice, usually every core)")
    parser.set_defaults(run=run)


def _phase_list(text: str) -> list[str]:
    from common.phases import PHASES

    phases = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown or not phases:
        raise argparse.ArgumentTypeError(f"unknown phase(s) {', '.join(unknown) or '(none given)'}; "
                                         f"expected some of {','.join(PHASES)}")
    return phases


def config_from_args(args: argparse.Namespace) -> PredictConfig:
    """The parsed command line as the function's configuration."""
    return PredictConfig(
        input=args.input, output=args.output, model=args.model, branch=args.branch, mirror=args.mirror,
        phases=tuple(args.phases) if args.phases is not None else None, step=args.step,
        postprocessing=args.postprocessing, device=args.device, threads=args.threads,
        review_dir=args.review_dir, dicom_source=args.dicom_source, dicom_seg=args.dicom_seg,
        phase_map=args.phase_map,
    )


def run(args: argparse.Namespace) -> int:
    return predict(config_from_args(args))
