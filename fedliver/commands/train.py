"""`fedliver train --data ROOT --out MODEL_DIR`: train a CPS pair of STU-Nets without federation.

One center gives a site's local baseline; several centers are pooled (the centralized baseline).
The steps are those of the federation, run in one process: index and validate the data, one
fingerprint per center, merged, nnU-Net planning (STU-Net size and patch overrides), preprocessing
into a cache, local CPS training, and a MODEL_DIR usable by `fedliver predict`.

Labeled samples are the phases with a mask (GED4 in LiQA); unlabeled ones are the unlabeled GED4
volumes plus --unlabeled-phases, each phase volume its own sample, from training cases only (what
a center's splits.json lists as validation or test is never used). --pretrain trains supervised on
every labeled volume of an nnU-Net raw set (e.g. `fedliver atlas`, labels 1 and 2 = liver); its
MODEL_DIR can then be passed to --init. A bad file prints one line `path: problem` and is skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from common.label_transfer_config import LabelTransferConfig
from common.postprocessing import METHODS, Postprocessing
from common.run_config import BY_NAME, default, parse_mirror_axes

# Options that are run-config settings too take the schema's default (common/run_config.py).
#: The cross term's confidence threshold and cross-phase label propagation unless told otherwise
#: (README: the measured best).
DEFAULT_CPS_CONFIDENCE = default("cps-confidence")
DEFAULT_PROPAGATE_LABELS = default("propagate-labels")
#: First-stage width of the CPU net (size T): run config `net-width`'s default, as the demo.
CPU_WIDTH = default("net-width")
#: Unlabeled samples per CPS iteration: the demo's 1, not run config `unlabeled-batch-size`'s 2
#: (a deliberate difference: the pooled and local baselines match the demo's budget).
UNLABELED_BATCH = 1


def initial_weights(args: argparse.Namespace) -> Path | None:
    """--init, or the shipped pretraining when training the CPU net without one (never for --pretrain)."""
    if args.init is not None:
        return None if str(args.init) == "none" else args.init.resolve()
    if args.pretrain or args.size != "T" or args.base_width != CPU_WIDTH:
        return None
    from common.federation_config import shipped_pretraining

    return shipped_pretraining()  # the file init-weights "auto" finds: one lookup for both


def _ints(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive integers z,y,x, got {text!r}")
    return values  # type: ignore[return-value]


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_label_transfer_arguments(parser: argparse.ArgumentParser) -> None:
    """--location-scale/--non-contrast/--random-conv/--transpose: probability per labeled sample."""
    group = parser.add_argument_group("label transfer (probability per labeled sample; 0: off)")
    for name in LabelTransferConfig().to_dict_hyphenated():  # location-scale, non-contrast, random-conv, transpose
        group.add_argument(f"--{name}", type=float, default=default(name), metavar="P",
                           help=f"{BY_NAME[name].help} (default {default(name)})")


def label_transfer_from_args(args: argparse.Namespace) -> LabelTransferConfig:
    return LabelTransferConfig(location_scale=args.location_scale, non_contrast=args.non_contrast,
                               random_conv=args.random_conv, transpose=args.transpose)


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
    parser.add_argument("--mode", choices=("cps", "supervised"), default=default("mode"),
                        help="cps: labeled + unlabeled with cross pseudo supervision; supervised: labeled only")
    parser.add_argument("--pretrain", action="store_true",
                        help="supervised pretraining on every labeled volume (ATLAS-like nnU-Net raw set)")
    parser.add_argument("--init", type=Path, default=None, metavar="PRETRAINED",
                        help="initial body weights for both nets: a MODEL_DIR (branch a) or .pth/.model/.safetensors "
                             "(default: the shipped pretraining, stunet_T4_multiseq, for the CPU net, --size T --base-width 4, "
                             "as the demo; else random; 'none': random)")
    parser.add_argument("--iterations", type=int, default=200, help="training iterations (default 200)")
    parser.add_argument("--size", default=default("net-size"), choices=("T", "S", "B", "L", "H"),
                        help=f"STU-Net size (default {default('net-size')})")
    parser.add_argument("--base-width", type=int, default=None,
                        help=f"override the size's first-stage width (default: {CPU_WIDTH} for T, the CPU net; "
                             "the published width for S/B/L/H)")
    parser.add_argument("--patch", type=_ints, default=_ints(default("patch-size")), metavar="Z,Y,X",
                        help=f"patch size (default {default('patch-size')}; rounded to the network's strides)")
    parser.add_argument("--batch", type=int, default=default("batch-size"),
                        help=f"labeled samples per iteration (default {default('batch-size')})")
    parser.add_argument("--unlabeled-batch", type=int, default=UNLABELED_BATCH,
                        help=f"unlabeled samples per CPS iteration (default {UNLABELED_BATCH}, as the demo)")
    parser.add_argument("--lr", type=float, default=default("learning-rate"),
                        help=f"initial learning rate of the poly schedule (default {default('learning-rate')})")
    parser.add_argument("--lambda-max", type=float, default=default("cps-lambda-max"),
                        help=f"CPS weight after ramp-up (default {default('cps-lambda-max')})")
    parser.add_argument("--rampup", type=int, default=None,
                        help="CPS ramp-up iterations (default: 40%% of --iterations)")
    parser.add_argument("--cps-loss", choices=("ce", "dice_ce"), default="ce", help="cross term (default ce)")
    parser.add_argument("--cps-confidence", type=float, default=DEFAULT_CPS_CONFIDENCE,
                        help="cross term only on voxels where the teacher's softmax exceeds this "
                             f"(0: all; default {DEFAULT_CPS_CONFIDENCE})")
    parser.add_argument("--cps-gate", type=float, default=default("cps-gate"),
                        help="cross term off until the validation GED4 Dice (splits.json validation cases) "
                             f"reaches this; checked every 25 iterations (0: no gate; default {default('cps-gate')})")
    parser.add_argument("--propagate-labels", action=argparse.BooleanOptionalAction, default=DEFAULT_PROPAGATE_LABELS,
                        help="also train on the labeled cases' other phases under their GED4 mask carried over "
                             f"through scanner coordinates (default {DEFAULT_PROPAGATE_LABELS})")
    parser.add_argument("--balance-phases", action=argparse.BooleanOptionalAction, default=default("balance-phases"),
                        help="draw a phase first, then a volume of it; --no-balance-phases: volumes uniformly "
                             f"(default {default('balance-phases')})")
    parser.add_argument("--mirror-axes", type=parse_mirror_axes, default=default("mirror-axes"), metavar="AXES",
                        help="patch axes (z,y,x) nnU-Net's augmentation mirrors; \"\": none; arrays are RAS, so "
                             f"x is left-right (default {default('mirror-axes')!r})")
    add_label_transfer_arguments(parser)
    parser.add_argument("--unlabeled-phases", type=_names, default=["T1", "T2", "DWI_800"], metavar="T1,T2,...",
                        help="phases used as unlabeled samples besides unlabeled GED4 (default T1,T2,DWI_800; "
                             "add GED1,GED2,GED3 for the dynamic phases)")
    parser.add_argument("--seed", type=int, default=default("seed"), help="seed (net a: seed, net b: seed + 1)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="preprocessing cache folder (default: <out>/../cache)")
    parser.add_argument("--agreement-volumes", type=int, default=default("agreement-volumes"),
                        help="unlabeled volumes per phase for the branch agreement signal (0: skip)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default=default("device"),
                        help="auto (a CUDA GPU when there is one, with fp16 mixed precision; else the CPU), "
                             f"cpu, cuda or cuda:N (default {default('device')})")
    parser.add_argument("--log-every", type=int, default=10, help="progress line every N iterations")
    parser.add_argument("--postprocessing", choices=METHODS, default=default("postprocessing"),
                        help="what `fedliver predict` applies with this model by default (stored in info.json; "
                             f"default {default('postprocessing')})")
    parser.add_argument("--postprocessing-phases", default=default("postprocessing-phases"),
                        help="phases it applies to, comma-separated, '*' for all (default "
                             f"{default('postprocessing-phases')}: the labeled phase, where it can be validated)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.base_width is None and args.size == "T":
        args.base_width = CPU_WIDTH
    args.init = initial_weights(args)
    print(f"initial weights: {args.init or 'random'}")
    if args.iterations < 1 or args.batch < 1 or (args.unlabeled_batch is not None and args.unlabeled_batch < 1):
        print("--iterations, --batch and --unlabeled-batch must be >= 1", file=sys.stderr)
        return 2
    # Busy-waiting OpenMP threads slow training many times over when other processes share the
    # cores; only effective before torch is first imported (the caller's setting wins).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from common.device import describe, resolve_device

    try:  # before any data is read: a missing GPU is one line, not a CUDA traceback later
        device = resolve_device(args.device)
    except ValueError as e:
        print(f"--device: {e}", file=sys.stderr)
        return 2
    print(f"device: {describe(device)}")
    from client.site import SiteData, SiteIdentity
    from common.discovery import index_dataset
    from common.fingerprint import compute_site_fingerprint, merge_fingerprints
    from common.model_dir import save_model_dir
    from common.phases import PHASES
    from common.planning import PlanningConfig, plan_from_fingerprint, plans_hash
    from common.validation import ValidationError

    unknown = [p for p in args.unlabeled_phases if p not in PHASES]
    if unknown:
        print(f"--unlabeled-phases: unknown phase(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    mode = "supervised" if args.pretrain else args.mode
    out = args.out.resolve()
    cache = (args.cache or out.parent / "cache").resolve()
    started = time.perf_counter()

    # Index once to learn the layout and centers; then one "site" per center, like the federation.
    try:
        index = index_dataset(args.data, centers=args.centers)
    except ValidationError as e:
        print(e, file=sys.stderr)
        return 1
    for problem in index.problems:
        print(problem, file=sys.stderr)
    if index.layout == "liqa":
        centers = args.centers or index.centers
        missing = [c for c in centers if c not in index.centers]
        for c in missing:
            print(f"{args.data}: no usable case of center {c}", file=sys.stderr)
        groups = [(c, (c,)) for c in centers if c not in missing]
    else:
        groups = [(args.data.name, None)]
    unlabeled_phases = tuple(args.unlabeled_phases)
    sites = [SiteData(SiteIdentity(site=name, role="train", data_dir=args.data.resolve(), cache_dir=cache,
                                   output_dir=out.parent, centers=filt), unlabeled_phases=unlabeled_phases)
             for name, filt in groups]
    if not sites:
        print(f"{args.data}: nothing to train on", file=sys.stderr)
        return 1
    # SiteData trains on the "train" split only: splits.json's validation and test cases stay unseen.
    held_out = {split: sum(len(site.cases_in(split)) for site in sites) for split in ("validation", "test")}
    if any(held_out.values()):
        print(f"splits.json holds out {held_out['validation']} validation and {held_out['test']} test cases "
              f"(not trained on)")

    # Fingerprints per center, merged exactly, then planned: what the federation's first round does.
    problems: list = []
    fingerprints = []
    for site in sites:
        # Every image the site trains on in CPS mode, whatever the mode: ablations share one plan.
        fingerprints.append(compute_site_fingerprint(site.fingerprint_pairs(), problems=problems))
    merged = merge_fingerprints(fingerprints)
    if merged.num_labeled == 0:
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"{args.data}: no usable labeled volume", file=sys.stderr)
        return 1
    plans = plan_from_fingerprint(merged, PlanningConfig(size=args.size, base_width=args.base_width,
                                                         patch_size=tuple(args.patch), batch_size=args.batch))
    conf = plans["configurations"]["3d_fullres"]
    print(f"plans {plans_hash(plans)[:12]}: spacing {conf['spacing']} (z, y, x), patch {conf['patch_size']}, "
          f"STU-Net {args.size} {conf['architecture']['arch_kwargs']['features_per_stage']}")

    labeled, unlabeled = [], []
    for site in sites:
        volumes = site.training_volumes(plans, include_unlabeled=mode == "cps",
                                        propagate_labels=args.propagate_labels and not args.pretrain)
        labeled += volumes.labeled
        unlabeled += volumes.unlabeled
        problems += volumes.problems
    validation = []
    if mode == "cps" and args.cps_gate > 0:
        for site in sites:
            volumes = site.validation_volumes(plans)
            validation += volumes.labeled
            problems += volumes.problems
        if not validation:
            print(f"--cps-gate {args.cps_gate}: no validation case (splits.json) to check it on; "
                  "the cross term runs from the start", file=sys.stderr)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not labeled:
        print(f"{args.data}: no labeled volume could be preprocessed", file=sys.stderr)
        return 1
    print(f"{len(labeled)} labeled and {len(unlabeled)} unlabeled volumes from "
          f"{', '.join(name for name, _ in groups)} (cache {cache}), "
          f"prepared in {time.perf_counter() - started:.0f} s")

    from client.trainer import CPSTrainer, TrainerConfig

    rampup = args.rampup if args.rampup is not None else (args.iterations * 2) // 5
    config = TrainerConfig(mode=mode, batch_size=args.batch, unlabeled_batch_size=args.unlabeled_batch,
                           patch_size=tuple(conf["patch_size"]),
                           learning_rate=args.lr, lambda_max=args.lambda_max, rampup_iterations=rampup,
                           cps_loss=args.cps_loss, cps_confidence=args.cps_confidence, cps_gate=args.cps_gate,
                           balance_phases=args.balance_phases, label_transfer=label_transfer_from_args(args),
                           mirror_axes=args.mirror_axes, seed=args.seed, log_every=args.log_every,
                           pretrained=str(args.init.resolve()) if args.init else None, device=str(device))
    try:
        trainer = CPSTrainer(plans, labeled, unlabeled, config, validation=validation, log=print)
    except (ValueError, FileNotFoundError) as e:
        print(e, file=sys.stderr)
        return 1
    stats = trainer.train(args.iterations)
    agreement = {}
    if mode == "cps" and unlabeled and args.agreement_volumes > 0:
        agreement = trainer.branch_agreement(unlabeled, max_per_phase=args.agreement_volumes)
        print("branch agreement (Dice a vs b): " + ", ".join(f"{p} {v:.3f}" for p, v in agreement.items()))

    info = {
        "kind": "pretrain" if args.pretrain else ("local" if len(sites) == 1 else "centralized"),
        "mode": mode,
        "iterations": args.iterations,
        "centers": [name for name, _ in groups],
        "data": str(args.data.resolve()),
        "size": args.size,
        "patch_size": conf["patch_size"],
        "batch_size": args.batch,
        "unlabeled_batch_size": args.unlabeled_batch or args.batch,
        "learning_rate": args.lr,
        "lambda_max": args.lambda_max,
        "rampup_iterations": rampup,
        "cps_loss": args.cps_loss,
        "cps_confidence": args.cps_confidence,
        "cps_gate": args.cps_gate,
        "balance_phases": args.balance_phases,
        "mirror_axes": list(config.mirror_axes),
        "propagate_labels": args.propagate_labels and not args.pretrain,
        "label_transfer": config.label_transfer.to_dict(),
        "unlabeled_phases": list(unlabeled_phases),
        "seed": args.seed,
        "device": str(device),
        "postprocessing": Postprocessing.parse(args.postprocessing, args.postprocessing_phases).to_info(),
        "init": str(args.init.resolve()) if args.init else None,
        "num_labeled": len(labeled),
        "num_unlabeled": len(unlabeled),
        "stats": stats.to_dict(),
        "branch_agreement": agreement,
        "seconds": round(time.perf_counter() - started, 1),
    }
    save_model_dir(out, trainer.state_dicts(), plans, info)
    print(f"wrote {out} ({stats.seconds_per_iteration:.2f} s/it, peak {stats.peak_memory_mib:.0f} MiB, "
          f"{info['seconds']:.0f} s in all)")
    return 0
