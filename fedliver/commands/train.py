"""`fedliver train --data ROOT --out MODEL_DIR`: train a CPS pair of STU-Nets without federation.

One center gives a site's local baseline; several centers are pooled (the centralized baseline).
The steps are those of the federation, run in one process (`client.local_training`): each center's
prepared dataset (index, fingerprint, preprocessed volumes) in its own cache folder <cache>/<center>,
one fingerprint per center, merged, nnU-Net planning (STU-Net size and patch overrides), local CPS
training, and a MODEL_DIR usable by `fedliver predict`. Run again on unchanged data, it reads no
file to index or fingerprint it.

Labeled samples are the phases with a mask (GED4 in LiQA); unlabeled ones are the unlabeled GED4
volumes plus --unlabeled-phases, each phase volume its own sample, from training cases only (what
a center's splits.json lists as validation or test is never used). --pretrain trains supervised on
every labeled volume of an nnU-Net raw set (e.g. `fedliver atlas`, labels 1 and 2 = liver); its
MODEL_DIR can then be passed to --init. A bad file prints one line `path: problem` and is skipped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from client.local_training import CPU_WIDTH, UNLABELED_BATCH, LocalTrainingConfig, train_locally
from common.federation_config import parse_spacing
from common.label_transfer_config import LabelTransferConfig
from common.postprocessing import METHODS
from common.run_config import BY_NAME, parse_mirror_axes

# Options that are run-config settings too take the schema's default (common/run_config.py), through
# LocalTrainingConfig: the command line and a script calling `train_locally` start from the same.
D = LocalTrainingConfig.defaults()
#: The cross term's confidence threshold and cross-phase label propagation unless told otherwise
#: (README: the measured best).
DEFAULT_CPS_CONFIDENCE = D["cps_confidence"]
DEFAULT_PROPAGATE_LABELS = D["propagate_labels"]


def _ints(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive integers z,y,x, got {text!r}")
    return values  # type: ignore[return-value]


def _spacing(text: str) -> tuple[float, float, float] | None:
    try:
        return parse_spacing(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_label_transfer_arguments(parser: argparse.ArgumentParser) -> None:
    """--location-scale/--non-contrast/--random-conv/--transpose/--bias-field: probability per sample."""
    group = parser.add_argument_group("label transfer (probability per labeled sample; 0: off)")
    for name in LabelTransferConfig().to_dict_hyphenated():  # location-scale, ..., bias-field
        value = D["label_transfer"].to_dict_hyphenated()[name]
        group.add_argument(f"--{name}", type=float, default=value, metavar="P",
                           help=f"{BY_NAME[name].help} (default {value})")


def label_transfer_from_args(args: argparse.Namespace) -> LabelTransferConfig:
    return LabelTransferConfig(**{name: getattr(args, name) for name in LabelTransferConfig().to_dict()})


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a CPS pair of STU-Nets on one center (local) or several pooled (centralized)",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, required=True, metavar="ROOT",
                        help="LiQA root (Vendor_<X>/...), one Vendor_<X> folder, or an nnU-Net raw dataset")
    parser.add_argument("--out", type=Path, required=True, metavar="MODEL_DIR", help="MODEL_DIR to write")
    parser.add_argument("--centers", type=_names, default=None, metavar="A,B1,B2",
                        help="centers to train on, pooled (default: every center found)")
    parser.add_argument("--mode", choices=("cps", "supervised"), default=D["mode"],
                        help="cps: labeled + unlabeled with cross pseudo supervision; supervised: labeled only")
    parser.add_argument("--pretrain", action="store_true",
                        help="supervised pretraining on every labeled volume (ATLAS-like nnU-Net raw set)")
    parser.add_argument("--init", type=Path, default=None, metavar="PRETRAINED",
                        help="initial body weights for both nets: a MODEL_DIR (branch a) or .pth/.model/.safetensors "
                             "(default: the shipped pretraining, stunet_T4_synth, for the CPU net, --size T --base-width 4, "
                             "as the demo; else random; 'none': random)")
    parser.add_argument("--iterations", type=int, default=D["iterations"],
                        help=f"training iterations (default {D['iterations']})")
    parser.add_argument("--size", default=D["size"], choices=("T", "S", "B", "L", "H"),
                        help=f"STU-Net size (default {D['size']})")
    parser.add_argument("--base-width", type=int, default=D["base_width"],
                        help=f"override the size's first-stage width (default: {CPU_WIDTH} for T, the CPU net; "
                             "the published width for S/B/L/H)")
    parser.add_argument("--patch", type=_ints, default=D["patch"], metavar="Z,Y,X",
                        help=f"patch size (default {','.join(map(str, D['patch']))}; rounded to the network's strides)")
    parser.add_argument("--spacing", type=_spacing, default=D["spacing"], metavar="Z,Y,X",
                        help="resample to this spacing in mm, 3d_lowres-like (default: the planner's median spacing; "
                             "run config target-spacing)")
    parser.add_argument("--batch", type=int, default=D["batch"],
                        help=f"labeled samples per iteration (default {D['batch']})")
    parser.add_argument("--unlabeled-batch", type=int, default=D["unlabeled_batch"],
                        help=f"unlabeled samples per CPS iteration (default {UNLABELED_BATCH}, as the demo)")
    parser.add_argument("--lr", type=float, default=D["lr"],
                        help=f"initial learning rate of the poly schedule (default {D['lr']})")
    parser.add_argument("--encoder-lr-scale", type=float, default=D["encoder_lr_scale"],
                        help="the encoder's learning rate relative to --lr (0: frozen; default "
                             f"{D['encoder_lr_scale']}; measured on real MRI, not adopted: README 'Real MRI')")
    parser.add_argument("--lambda-max", type=float, default=D["lambda_max"],
                        help=f"CPS weight after ramp-up (default {D['lambda_max']})")
    parser.add_argument("--rampup", type=int, default=D["rampup"],
                        help="CPS ramp-up iterations (default: 40%% of --iterations)")
    parser.add_argument("--cps-loss", choices=("ce", "dice_ce"), default=D["cps_loss"],
                        help=f"cross term (default {D['cps_loss']})")
    parser.add_argument("--cps-confidence", type=float, default=DEFAULT_CPS_CONFIDENCE,
                        help="cross term only on voxels where the teacher's softmax exceeds this "
                             f"(0: all; default {DEFAULT_CPS_CONFIDENCE})")
    parser.add_argument("--cps-strong-view", action=argparse.BooleanOptionalAction, default=D["cps_strong_view"],
                        help="students see unlabeled samples through a label-free intensity view (bias field, "
                             f"random convolutions, a random curve), teachers as augmented (default {D['cps_strong_view']})")
    parser.add_argument("--cps-gate", type=float, default=D["cps_gate"],
                        help="cross term off until the validation Dice (splits.json validation cases, the labeled "
                             f"phases) reaches this; checked every 25 iterations (0: no gate; default {D['cps_gate']})")
    parser.add_argument("--propagate-labels", action=argparse.BooleanOptionalAction, default=DEFAULT_PROPAGATE_LABELS,
                        help="also train on the labeled cases' other phases under their labeled phase's mask (GED4 "
                             f"first) carried over through scanner coordinates (default {DEFAULT_PROPAGATE_LABELS})")
    parser.add_argument("--labeled-phases", default=D["labeled_phases"], metavar="auto|T2,GED4,...",
                        help="phases whose masks are labels (labeled batches, validation for the gate, the source of "
                             "propagation): auto, every phase with a mask among a center's training and validation "
                             f"cases, or a comma list (default {D['labeled_phases']})")
    parser.add_argument("--balance-phases", action=argparse.BooleanOptionalAction, default=D["balance_phases"],
                        help="draw a phase first, then a volume of it; --no-balance-phases: volumes uniformly "
                             f"(default {D['balance_phases']})")
    parser.add_argument("--mirror-axes", type=parse_mirror_axes, default=D["mirror_axes"], metavar="AXES",
                        help="patch axes (z,y,x) nnU-Net's augmentation mirrors; \"\": none; arrays are RAS, so "
                             f"x is left-right (default {','.join(map(str, D['mirror_axes']))!r})")
    add_label_transfer_arguments(parser)
    parser.add_argument("--unlabeled-phases", type=_names, default=list(D["unlabeled_phases"]), metavar="T1,T2,...",
                        help="phases used as unlabeled samples besides unlabeled GED4 and labeled phases (default T1,T2,DWI_800; "
                             "add GED1,GED2,GED3 for the dynamic phases)")
    parser.add_argument("--seed", type=int, default=D["seed"], help="seed (net a: seed, net b: seed + 1)")
    parser.add_argument("--cache", type=Path, default=D["cache"],
                        help="cache folder: each center's prepared dataset in <cache>/<center> (default: <out>/../cache)")
    parser.add_argument("--agreement-volumes", type=int, default=D["agreement_volumes"],
                        help="unlabeled volumes per phase for the branch agreement signal (0: skip)")
    parser.add_argument("--threads", type=int, default=D["threads"], help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default=D["device"],
                        help="auto (a CUDA GPU when there is one, with fp16 mixed precision; else the CPU), "
                             f"cpu, cuda or cuda:N (default {D['device']})")
    parser.add_argument("--log-every", type=int, default=D["log_every"],
                        help=f"progress line every N iterations (default {D['log_every']})")
    parser.add_argument("--postprocessing", choices=METHODS, default=D["postprocessing"],
                        help="what `fedliver predict` applies with this model by default (stored in info.json; "
                             f"default {D['postprocessing']})")
    parser.add_argument("--postprocessing-phases", default=D["postprocessing_phases"],
                        help="phases it applies to, comma-separated, '*' for all (default "
                             f"{D['postprocessing_phases']}: every phase, as chosen on the development set)")
    parser.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> LocalTrainingConfig:
    """The parsed command line as the function's configuration."""
    return LocalTrainingConfig(
        data=args.data, out=args.out, centers=tuple(args.centers) if args.centers is not None else None,
        mode=args.mode, pretrain=args.pretrain, init=args.init, iterations=args.iterations, size=args.size,
        base_width=args.base_width, patch=tuple(args.patch), spacing=args.spacing, batch=args.batch, unlabeled_batch=args.unlabeled_batch,
        lr=args.lr, encoder_lr_scale=args.encoder_lr_scale, lambda_max=args.lambda_max, rampup=args.rampup, cps_loss=args.cps_loss,
        cps_confidence=args.cps_confidence, cps_strong_view=args.cps_strong_view, cps_gate=args.cps_gate, propagate_labels=args.propagate_labels,
        labeled_phases=args.labeled_phases, balance_phases=args.balance_phases, mirror_axes=tuple(args.mirror_axes),
        label_transfer=label_transfer_from_args(args), unlabeled_phases=tuple(args.unlabeled_phases), seed=args.seed,
        cache=args.cache, agreement_volumes=args.agreement_volumes, threads=args.threads, device=args.device,
        log_every=args.log_every, postprocessing=args.postprocessing, postprocessing_phases=args.postprocessing_phases,
    )


def run(args: argparse.Namespace) -> int:
    return train_locally(config_from_args(args))
