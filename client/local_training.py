"""Training without federation, as a function: `fedliver train`, the pooled and local baselines, pretraining.

    train_locally(LocalTrainingConfig(data=ROOT, out=MODEL_DIR, centers=("A", "B1"))) -> exit status

One center gives a site's local baseline; several centers are pooled (the centralized baseline).
The steps are the federation's (client.pipeline), run in one process with one `SiteData` per center:
each center's prepared dataset (index, fingerprint, preprocessed volumes) in its own cache folder
`<cache>/<center>`, as a site keeps it; the centers' fingerprints merged and planned; local CPS
training; a MODEL_DIR usable by `fedliver predict`. Run again on unchanged files, it reads no file
to index or fingerprint them and trains from the preprocessed volumes.

Progress lines go to `log` (stdout); each problem and error is one line on stderr. The exit status
is the command's: 0 done, 1 no usable data, 2 an option that cannot work.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from common.federation_config import parse_patch, parse_spacing
from common.label_transfer_config import LabelTransferConfig
from common.phases import ordered_phases, parse_labeled_phases
from common.run_config import default, defaults, parse_mirror_axes

if TYPE_CHECKING:  # torch is imported once OMP_WAIT_POLICY is set
    import torch

    from client.site import SiteData

#: First-stage width of the CPU net (size T): run config `net-width`'s default, as the demo.
CPU_WIDTH = int(default("net-width"))
#: Unlabeled samples per CPS iteration: the demo's 1, not run config `unlabeled-batch-size`'s 2
#: (a deliberate difference: the pooled and local baselines match the demo's budget).
UNLABELED_BATCH = 1
#: Phases used as unlabeled samples besides unlabeled GED4 (GED1-3, the dynamic phases, on request).
UNLABELED_PHASES = ("T1", "T2", "DWI_800")


def _error(text: object) -> None:
    print(text, file=sys.stderr)


@dataclass(frozen=True)
class LocalTrainingConfig:
    """`fedliver train`'s options; a setting that is a run-config key too takes the schema's default."""

    data: Path                                   # LiQA root, one Vendor_<X> folder, or an nnU-Net raw dataset
    out: Path                                    # the MODEL_DIR to write
    centers: tuple[str, ...] | None = None       # LiQA centers, pooled (None: every center found)
    mode: str = str(default("mode"))             # "cps" | "supervised"
    pretrain: bool = False                       # supervised on every labeled volume (an ATLAS-like raw set)
    init: Path | str | None = None               # MODEL_DIR or checkpoint; None: the shipped pretraining for
                                                 # the CPU net (size T, CPU_WIDTH), else random; "none": random
    iterations: int = 200
    size: str = str(default("net-size"))         # STU-Net size T, S, B, L, H
    base_width: int | None = None                # None: CPU_WIDTH for size T, the published width otherwise
    patch: tuple[int, int, int] = parse_patch(str(default("patch-size")))  # z, y, x
    spacing: tuple[float, float, float] | None = parse_spacing(str(default("target-spacing")))  # z, y, x mm
    batch: int = int(default("batch-size"))
    unlabeled_batch: int | None = UNLABELED_BATCH  # None: `batch`
    lr: float = float(default("learning-rate"))
    encoder_lr_scale: float = 1.0                # the encoder's lr relative to `lr` (TrainerConfig.encoder_lr_scale)
    lambda_max: float = float(default("cps-lambda-max"))
    rampup: int | None = None                    # CPS ramp-up iterations (None: 40% of `iterations`)
    cps_loss: str = "ce"                         # "ce" | "dice_ce"
    cps_confidence: float = float(default("cps-confidence"))
    cps_strong_view: bool = bool(default("cps-strong-view"))
    cps_gate: float = float(default("cps-gate"))
    propagate_labels: bool = bool(default("propagate-labels"))
    labeled_phases: str = str(default("labeled-phases"))  # run config `labeled-phases`: "auto" or e.g. "T2,GED4"
    balance_phases: bool = bool(default("balance-phases"))
    mirror_axes: tuple[int, ...] = parse_mirror_axes(str(default("mirror-axes")))
    label_transfer: LabelTransferConfig = LabelTransferConfig.from_hyphenated(defaults())
    unlabeled_phases: tuple[str, ...] = UNLABELED_PHASES
    seed: int = int(default("seed"))             # net a: seed, net b: seed + 1
    cache: Path | None = None                    # None: <out>/../cache; each center in <cache>/<center>
    agreement_volumes: int = int(default("agreement-volumes"))
    threads: int | None = None                   # torch CPU threads (None: torch's choice)
    device: str = str(default("device"))         # auto, cpu, cuda, cuda:N
    log_every: int = 10
    postprocessing: str = str(default("postprocessing"))  # what `fedliver predict` applies by default
    postprocessing_phases: str = str(default("postprocessing-phases"))

    def __post_init__(self) -> None:  # a script may give paths as text
        for name in ("data", "out", "cache"):
            if (value := getattr(self, name)) is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))

    @classmethod
    def defaults(cls) -> dict[str, object]:
        """{field: default} of every option with one (the command line's defaults)."""
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING}

    @property
    def training_mode(self) -> str:
        return "supervised" if self.pretrain else self.mode

    @property
    def width(self) -> int | None:
        return CPU_WIDTH if self.base_width is None and self.size == "T" else self.base_width

    def initial_weights(self) -> Path | None:
        """`init`, or the shipped pretraining when training the CPU net without one (never to pretrain)."""
        if self.init is not None:
            return None if str(self.init) == "none" else Path(self.init).resolve()
        if self.pretrain or self.size != "T" or self.width != CPU_WIDTH:
            return None
        from common.federation_config import shipped_pretraining

        return shipped_pretraining()  # the file init-weights "auto" finds: one lookup for both

    def run_settings(self) -> dict[str, object]:
        """The options that are run-config settings too, under their schema names (client.pipeline.trainer_config)."""
        return {"mode": self.training_mode, "batch-size": self.batch,
                "unlabeled-batch-size": self.unlabeled_batch or self.batch, "learning-rate": self.lr,
                "cps-lambda-max": self.lambda_max, "cps-confidence": self.cps_confidence,
                "cps-strong-view": self.cps_strong_view,
                "balance-phases": self.balance_phases, "mirror-axes": self.mirror_axes,
                **self.label_transfer.to_dict_hyphenated(), "seed": self.seed}


def train_locally(config: LocalTrainingConfig, log: Callable[[str], None] = print) -> int:
    """Train as `fedliver train` does and write `config.out`; the exit status (0, 1 or 2)."""
    init = config.initial_weights()
    log(f"initial weights: {init or 'random'}")
    if config.iterations < 1 or config.batch < 1 or (config.unlabeled_batch is not None and config.unlabeled_batch < 1):
        _error("--iterations, --batch and --unlabeled-batch must be >= 1")
        return 2
    try:
        _labeled_phases(config)
    except ValueError as e:
        _error(e)
        return 2
    # Busy-waiting OpenMP threads slow training many times over when other processes share the
    # cores; only effective before torch is first imported (the caller's setting wins).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from common.device import describe, resolve_device

    try:  # before any data is read: a missing GPU is one line, not a CUDA traceback later
        device = resolve_device(config.device)
    except ValueError as e:
        _error(f"--device: {e}")
        return 2
    log(f"device: {describe(device)}")
    from common.phases import PHASES

    unknown = [p for p in config.unlabeled_phases if p not in PHASES]
    if unknown:
        _error(f"--unlabeled-phases: unknown phase(s) {', '.join(unknown)}")
        return 2
    if config.threads:
        torch.set_num_threads(config.threads)
    return _train(config, init, device, log)


def _labeled_phases(config: LocalTrainingConfig) -> tuple[str, ...] | None:
    """`config.labeled_phases` parsed (None: auto); a one-line ValueError naming a bad phase."""
    return parse_labeled_phases(config.labeled_phases, "--labeled-phases")


def center_sites(config: LocalTrainingConfig) -> list[SiteData]:
    """One `SiteData` per center to train on, each with its own cache folder `<cache>/<center>`
    (an nnU-Net raw set: one site, `<cache>/<its folder name>`); prints the data's problems.
    Raises ValidationError when `config.data` is no dataset."""
    from client.site import SiteData, SiteIdentity
    from common.discovery import index_dataset

    data, out = config.data.resolve(), config.out.resolve()
    cache = (config.cache or out.parent / "cache").resolve()
    # The folders only, to learn the layout and centers: each site's index checks its own files,
    # reading only those that changed since its last run.
    walk = index_dataset(config.data, centers=config.centers, validate=False)
    if walk.layout == "liqa":
        explicit = bool(config.centers)
        groups = [(c, (c,)) for c in (config.centers or walk.centers)]
    else:
        explicit, groups = False, [(data.name, None)]
    sites = [SiteData(SiteIdentity(site=name, role="train", data_dir=data, cache_dir=cache / name,
                                   output_dir=out.parent, centers=centers),
                      unlabeled_phases=tuple(config.unlabeled_phases), labeled_phases=_labeled_phases(config))
             for name, centers in groups]
    for problem in dict.fromkeys([*walk.problems, *(p for site in sites for p in site.index.problems)]):
        _error(problem)
    kept = []
    for site in sites:
        if site.cases or walk.layout != "liqa":
            kept.append(site)
        elif explicit:  # a center asked for by name that has no usable case
            _error(f"{config.data}: no usable case of center {site.identity.site}")
    return kept


def _train(config: LocalTrainingConfig, init: Path | None, device: torch.device, log: Callable[[str], None]) -> int:
    from client.pipeline import NoLabeledVolume, plan_for_sites, site_volumes, trainer_config
    from client.trainer import CPSTrainer
    from common.model_dir import save_model_dir
    from common.names import CONFIGURATION
    from common.planning import PlanningConfig, plans_hash
    from common.postprocessing import Postprocessing
    from common.problems import ValidationError

    mode = config.training_mode
    out = config.out.resolve()
    started = time.perf_counter()
    try:
        sites = center_sites(config)
    except ValidationError as e:
        _error(e)
        return 1
    if not sites:
        _error(f"{config.data}: nothing to train on")
        return 1
    names = [site.identity.site for site in sites]
    # SiteData trains on the "train" split only: splits.json's validation and test cases stay unseen.
    held_out = {split: sum(len(site.cases_in(split)) for site in sites) for split in ("validation", "test")}
    if any(held_out.values()):
        log(f"splits.json holds out {held_out['validation']} validation and {held_out['test']} test cases "
            f"(not trained on)")

    # Every image the sites train on in CPS mode, whatever the mode: ablations share one plan.
    problems: list = []
    planning = PlanningConfig(size=config.size, base_width=config.width, patch_size=tuple(config.patch),
                              batch_size=config.batch, spacing=config.spacing)
    try:
        plans = plan_for_sites(sites, planning, problems)
    except NoLabeledVolume:
        for problem in problems:
            _error(problem)
        _error(f"{config.data}: no usable labeled volume")
        return 1
    conf = plans["configurations"][CONFIGURATION]
    log(f"plans {plans_hash(plans)[:12]}: spacing {conf['spacing']} (z, y, x), patch {conf['patch_size']}, "
        f"STU-Net {config.size} {conf['architecture']['arch_kwargs']['features_per_stage']}")

    gate = mode == "cps" and config.cps_gate > 0
    volumes = site_volumes(sites, plans, include_unlabeled=mode == "cps",
                           propagate_labels=config.propagate_labels and not config.pretrain, with_validation=gate)
    if gate and not volumes.validation:
        _error(f"--cps-gate {config.cps_gate}: no validation case (splits.json) to check it on; "
               "the cross term runs from the start")
    elif gate:
        phases = ordered_phases(v.phase for v in volumes.validation)
        log(f"CPS gate on {len(volumes.validation)} validation volumes ({', '.join(phases)})")
    for problem in problems + volumes.problems:
        _error(problem)
    labeled, unlabeled = volumes.labeled, volumes.unlabeled
    if not labeled:
        _error(f"{config.data}: no labeled volume could be preprocessed")
        return 1
    cache = (config.cache or out.parent / "cache").resolve()
    log(f"{len(labeled)} labeled and {len(unlabeled)} unlabeled volumes from {', '.join(names)} (cache {cache}), "
        f"prepared in {time.perf_counter() - started:.0f} s")

    rampup = config.rampup if config.rampup is not None else (config.iterations * 2) // 5
    trainer_settings = trainer_config(config.run_settings(), device=str(device), patch_size=tuple(conf["patch_size"]),
                                      rampup_iterations=rampup, cps_loss=config.cps_loss, cps_gate=config.cps_gate,
                                      log_every=config.log_every, pretrained=str(init) if init else None,
                                      encoder_lr_scale=config.encoder_lr_scale,
                                      **({"labeled_phases": volumes.labeled_phases} if volumes.labeled_phases else {}))
    try:
        trainer = CPSTrainer(plans, labeled, unlabeled, trainer_settings, validation=volumes.validation, log=log)
    except (ValueError, FileNotFoundError) as e:
        _error(e)
        return 1
    stats = trainer.train(config.iterations)
    agreement = {}
    if mode == "cps" and unlabeled and config.agreement_volumes > 0:
        agreement = trainer.branch_agreement(unlabeled, max_per_phase=config.agreement_volumes)
        log("branch agreement (Dice a vs b): " + ", ".join(f"{p} {v:.3f}" for p, v in agreement.items()))

    info = {
        "kind": "pretrain" if config.pretrain else ("local" if len(sites) == 1 else "centralized"),
        "mode": mode,
        "iterations": config.iterations,
        "centers": names,
        "data": str(config.data.resolve()),
        "size": config.size,
        "patch_size": conf["patch_size"],
        "batch_size": config.batch,
        "unlabeled_batch_size": config.unlabeled_batch or config.batch,
        "learning_rate": config.lr,
        "encoder_lr_scale": config.encoder_lr_scale,
        "lambda_max": config.lambda_max,
        "rampup_iterations": rampup,
        "cps_loss": config.cps_loss,
        "cps_confidence": config.cps_confidence,
        "cps_strong_view": config.cps_strong_view,
        "cps_gate": config.cps_gate,
        "balance_phases": config.balance_phases,
        "mirror_axes": list(trainer_settings.mirror_axes),
        "propagate_labels": config.propagate_labels and not config.pretrain,
        "labeled_phases": list(volumes.labeled_phases),
        "label_transfer": trainer_settings.label_transfer.to_dict(),
        "unlabeled_phases": list(config.unlabeled_phases),
        "seed": config.seed,
        "device": str(device),
        "postprocessing": Postprocessing.parse(config.postprocessing, config.postprocessing_phases).to_info(),
        "init": str(init) if init else None,
        "num_labeled": len(labeled),
        "num_unlabeled": len(unlabeled),
        "stats": stats.to_dict(),
        "branch_agreement": agreement,
        "seconds": round(time.perf_counter() - started, 1),
    }
    save_model_dir(out, trainer.state_dicts(), plans, info)
    log(f"wrote {out} ({stats.seconds_per_iteration:.2f} s/it, peak {stats.peak_memory_mib:.0f} MiB, "
        f"{info['seconds']:.0f} s in all)")
    return 0


__all__ = ["CPU_WIDTH", "UNLABELED_BATCH", "UNLABELED_PHASES", "LocalTrainingConfig", "center_sites", "train_locally"]
