"""Domain-randomised pretraining: an STU-Net pair trained only on images drawn from label maps.

    pretrain_on_label_maps(DomainRandomisedPretraining(out=MODEL_DIR, maps=48, iterations=3000))

SynthSeg's recipe (Billot et al., Medical Image Analysis 2023) on our phantom anatomy: every sample is
a crop of a whole-trunk tissue label map (`label_maps`) made into an image with a new random contrast,
resolution, field of view, bias field, noise and gamma (`transforms`), then augmented by nnU-Net's
own pipeline. No image is ever shown twice, and no contrast is the one that teaches the liver, so
what the net learns is shape and context. Optionally real labeled scans join the draw (`extra_data`:
nnU-Net raw datasets, the liver found by name in `dataset.json`), each seen as it is.

The pair (branches a and b from different seeds) is written as a MODEL_DIR after every
`checkpoint_every` iterations, so a long run can be inspected, and scored (`simulations.experiments
real-mri`), while it goes on.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from common.preprocessing import PreprocessedVolume
from simulations.synthesis.label_maps import LabelMapConfig, write_label_maps
from simulations.synthesis.transforms import SynthesisConfig, synthesis_transforms

#: Phase name of label-map volumes (their crops go through the generator) and of real extra scans.
SYNTHETIC_PHASE, REAL_PHASE = "synthetic", "real"
#: The grid the start is trained on: the demo sites' median spacing (z, y, x) and the CPU patch.
PRETRAIN_SPACING = (6.0, 3.6, 3.6)
PRETRAIN_PATCH = (32, 64, 64)


@dataclass(frozen=True)
class DomainRandomisedPretraining:
    out: Path                                   # the MODEL_DIR written (and refreshed at every checkpoint)
    work: Path                                  # label maps and preprocessed extra data (kept between runs)
    maps: int = 48                              # label maps (patients)
    iterations: int = 3000
    base_width: int = 4
    seed: int = 0
    batch: int = 2
    learning_rate: float = 0.01
    init: Path | None = None                    # a pair file or MODEL_DIR to start from (None: random)
    extra_data: tuple[Path, ...] = ()           # nnU-Net raw datasets with a "liver" label
    exclude_cases: tuple[str, ...] = ()         # extra-data cases left out (to measure on them)
    checkpoint_every: int = 250
    threads: int | None = None
    device: str = "cpu"
    label_maps: LabelMapConfig = field(default_factory=LabelMapConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)


def pretraining_plans(base_width: int) -> dict:
    """Plans for the start's grid: nnU-Net's topology rule for the CPU patch at `PRETRAIN_SPACING`."""
    from common.planning import default_test_plans

    return default_test_plans(patch_size=PRETRAIN_PATCH, spacing=PRETRAIN_SPACING, size="T", base_width=base_width,
                              source="domain-randomised pretraining (simulations.synthesis)")


def _liver_label(dataset_json: dict, where: Path) -> int:
    """The value of the label named liver (case-insensitive) in an nnU-Net `dataset.json`."""
    labels = dataset_json.get("labels", {})
    found = [int(v) for k, v in labels.items() if str(k).strip().lower() == "liver" and not isinstance(v, list)]
    if not found:
        raise ValueError(f"{where}: dataset.json names no 'liver' label (labels: {', '.join(labels) or 'none'})")
    return found[0]


def extra_volumes(datasets: Sequence[Path], plans: dict, work: Path, *, exclude: Sequence[str] = (),
                  log: Callable[[str], None] = print) -> list[PreprocessedVolume]:
    """Every labeled case of nnU-Net raw `datasets` (channel 0), preprocessed with `plans` under `work`,
    the liver (found by name) as foreground. A case that cannot be read is one line, then skipped."""
    import numpy as np

    from common.preprocessing import foreground_locations, preprocess_image

    volumes: list[PreprocessedVolume] = []
    for root in map(Path, datasets):
        dataset_file = root / "dataset.json"
        if not dataset_file.is_file():
            raise ValueError(f"{root}: no dataset.json (an nnU-Net raw dataset is expected)")
        meta = json.loads(dataset_file.read_text(encoding="utf-8"))
        liver, ending = _liver_label(meta, dataset_file), meta.get("file_ending", ".nii.gz")
        for label in sorted((root / "labelsTr").glob(f"*{ending}")):
            case = label.name[: -len(ending)]
            if case in exclude:
                continue
            image = root / "imagesTr" / f"{case}_0000{ending}"
            stem = work / "extra" / root.name / case
            files = [Path(f"{stem}{s}") for s in (".npy", "_seg.npy", "_fg.npy", ".json")]
            if not files[3].is_file():
                try:
                    data, seg, props = preprocess_image(image, plans, label, foreground_labels=(liver,))
                except Exception as e:  # one bad case costs one line, never the run
                    log(f"{image}: skipped ({e})")
                    continue
                stem.parent.mkdir(parents=True, exist_ok=True)
                np.save(files[0], data)
                np.save(files[1], seg)
                np.save(files[2], foreground_locations(seg))
                files[3].write_text(json.dumps({"properties": props}))
            volumes.append(PreprocessedVolume(f"{root.name}/{case}", REAL_PHASE, *files[:2], files[3], files[2]))
    return volumes


def pretrain_on_label_maps(config: DomainRandomisedPretraining, log: Callable[[str], None] = print) -> dict:
    """Train the pair; returns the MODEL_DIR's info (also in `config.out/info.json`)."""
    import torch

    from client.trainer import CPSTrainer, TrainerConfig
    from common.label_transfer_config import LabelTransferConfig
    from common.model_dir import save_model_dir

    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    plans = pretraining_plans(config.base_width)
    volumes = write_label_maps(Path(config.work) / "label_maps", config.maps, config.seed, config.label_maps, log=log)
    extra = extra_volumes(config.extra_data, plans, Path(config.work), exclude=config.exclude_cases, log=log)
    log(f"{len(volumes)} label maps, {len(extra)} real extra volumes, prepared in {time.perf_counter() - started:.0f} s")
    trainer_config = TrainerConfig(
        mode="supervised", batch_size=config.batch, patch_size=PRETRAIN_PATCH, learning_rate=config.learning_rate,
        label_transfer=LabelTransferConfig(), mirror_axes=(), seed=config.seed, log_every=50,
        pretrained=str(config.init) if config.init else None, device=config.device,
        # real scans and label maps drawn as two "phases", half the batches each
        balance_phases=bool(extra),
    )
    trainer = CPSTrainer(plans, [*volumes, *extra], [], trainer_config, log=log,
                         synthesis={SYNTHETIC_PHASE: synthesis_transforms(config.synthesis)})
    info = {
        "kind": "pretrain", "generator": "domain-randomised label maps (simulations.synthesis)",
        "mode": "supervised", "maps": config.maps, "seed": config.seed, "size": "T", "base_width": config.base_width,
        "patch_size": list(PRETRAIN_PATCH), "spacing": list(PRETRAIN_SPACING), "batch_size": config.batch,
        "learning_rate": config.learning_rate, "init": str(config.init) if config.init else None,
        "extra_data": [str(p) for p in config.extra_data], "extra_volumes": len(extra),
        "excluded_cases": list(config.exclude_cases), "mirror_axes": [],
        "synthesis": asdict(config.synthesis), "label_maps": json.loads(json.dumps(asdict(config.label_maps))),
    }
    done = 0
    while done < config.iterations:
        chunk = min(config.checkpoint_every, config.iterations - done)
        stats = trainer.train(chunk, start_iteration=done, total_iterations=config.iterations)
        done += chunk
        info.update(iterations=done, seconds=round(time.perf_counter() - started, 1),
                    seconds_per_iteration=round(stats.seconds_per_iteration, 3), last_loss=round(stats.total, 4))
        save_model_dir(Path(config.out), trainer.state_dicts(), plans, info)
        log(f"checkpoint {done}/{config.iterations}: {config.out} ({info['seconds']:.0f} s)")
    return info
