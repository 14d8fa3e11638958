"""Segmenting a dataset or folder with a MODEL_DIR, as a function: `fedliver predict`.

    predict(PredictConfig(input=IN, output=OUT, model=MODEL_DIR)) -> exit status

Writes OUT/<case>/<PHASE>_pred.nii.gz (uint8, 0 background / 1 liver) on each input's raw grid, and
OUT/predictions.csv / .json: each volume's quality control (`client.quality_control`: liver volume,
branch agreement, entropy, position, cross-phase consistency, the verdict `ok` | `review`); what
IN may be and how plain file names map to <case> and <PHASE> is `fedliver predict --help`
(fedliver/commands/predict.py). The hospital's use of the federated model, hence `client/`, beside
`client.local_training`. Progress lines go to stdout, each problem is one line on stderr; the exit
status is the command's: 0 done, 1 a volume or the model failed (or nothing to predict), 2 an
unusable --device.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from client.quality_control import QCReport, VolumeQC, measure
from common.atomic_write import atomic_path
from common.postprocessing import Postprocessing

_ENDINGS = (".nii.gz", ".nii")


@dataclass(frozen=True)
class PredictConfig:
    """`fedliver predict`'s options."""

    input: Path                                  # LiQA/nnU-Net dataset, plain folder of .nii.gz files, or one file
    output: Path                                 # OUT/<case>/<PHASE>_pred.nii.gz
    model: Path                                  # a MODEL_DIR
    branch: str | None = None                    # "a", "b", "both" (mean softmax); None: every branch in MODEL_DIR
    mirror: bool = False                         # test-time mirroring over all axes
    phases: tuple[str, ...] | None = None        # only these phases (None: every phase found)
    step: float = 0.5                            # sliding-window step as a fraction of the patch
    postprocessing: str = "model"                # "model": MODEL_DIR's info.json; else a common.postprocessing method
    device: str = "auto"                         # auto, cpu, cuda, cuda:N
    threads: int | None = None                   # torch CPU threads (None: torch's choice)
    review_dir: Path | None = None               # an overlay PNG of each volume QC flags `review`
    dicom_source: Path | None = None             # IN came from `fedliver import-dicom` of this: a DICOM SEG each
    dicom_seg: bool = False                      # IN is a DICOM folder: import it (phase_map), predict, SEG each
    phase_map: Path | None = None                # import-dicom's phase map, with dicom_seg

    def __post_init__(self) -> None:  # a script may give paths as text
        for name in ("input", "output", "model", "review_dir", "dicom_source", "phase_map"):
            if (value := getattr(self, name)) is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))


@dataclass(frozen=True)
class Job:
    case_id: str
    phase: str
    image: Path


def _nifti_stem(name: str) -> str | None:
    for ending in _ENDINGS:
        if name.endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)]
    return None


def plain_jobs(paths: list[Path], folder_name: str) -> tuple[list[Job], list[str]]:
    """Map plain files to (case, phase) by the naming rules of `fedliver predict --help`."""
    from common.phases import LABELED_PHASE, PHASES

    jobs: dict[tuple[str, str], Job] = {}
    notes: list[str] = []
    for path in paths:
        stem = _nifti_stem(path.name)
        if stem is None or stem.startswith("mask_") or path.name.startswith("."):
            continue
        head, _, tail = stem.rpartition("_")
        if stem in PHASES:
            case_id, phase = folder_name, stem
        elif head and stem.endswith("_DWI_800") and len(stem) > len("_DWI_800"):
            case_id, phase = stem[: -len("_DWI_800")], "DWI_800"
        elif head and tail in PHASES:
            case_id, phase = head, tail
        elif head and tail == "0000":
            case_id, phase = head, LABELED_PHASE
        else:
            case_id, phase = stem, LABELED_PHASE
        if (case_id, phase) in jobs:
            notes.append(f"{path}: second image for {case_id} {phase} (skipped; using "
                         f"{jobs[case_id, phase].image.name})")
            continue
        jobs[case_id, phase] = Job(case_id, phase, path)
    return list(jobs.values()), notes


def find_jobs(root: Path) -> tuple[list[Job], list[str], list[str]]:
    """(jobs, failures, notes): what to predict under `root`; failures count toward exit status 1."""
    from common.discovery import index_dataset
    from common.validation import ValidationError

    if root.is_file():
        jobs, notes = plain_jobs([root], root.parent.name)
        return jobs, ([] if jobs else [f"{root}: not a .nii.gz/.nii image"]), notes
    try:
        index = index_dataset(root, validate=False)  # each image is read (and checked) when predicted
    except ValidationError as e:
        if not root.is_dir():
            return [], [str(e)], []
        files = sorted(p for p in root.iterdir() if p.is_file())
        jobs, notes = plain_jobs(files, root.name)
        if not jobs:
            return [], [f"{root}: no .nii.gz/.nii images and not a dataset (LiQA or nnU-Net layout)"], notes
        return jobs, [], notes
    jobs = [Job(c.case_id, phase, Path(path)) for c in index.cases for phase, path in c.images.items()]
    return jobs, [], [str(p) for p in index.problems]


def predict(config: PredictConfig) -> int:
    """Predict as `fedliver predict` does and write `config.output`; the exit status (0, 1 or 2)."""
    import SimpleITK as sitk
    import torch

    from common.device import resolve_device
    from common.inference import predict_image
    from common.model_dir import ModelDirError, load_model_dir

    try:  # a GPU this machine does not have: one line, before the model is read
        device = resolve_device(config.device)
    except ValueError as e:
        print(f"--device: {e}", file=sys.stderr)
        return 2
    if config.threads is not None:
        torch.set_num_threads(max(1, config.threads))
    try:
        bundle = load_model_dir(config.model)
        names = sorted(bundle.branches) if config.branch in (None, "both") else [config.branch]
        if config.branch == "both" and len(names) < 2:
            raise ModelDirError(f"{config.model}: --branch both needs two branches, the model has {names}")
        nets = bundle.build_nets(names, device=device)
        postprocessing = Postprocessing.from_info(
            bundle.info.get("postprocessing") if config.postprocessing == "model" else config.postprocessing)
    except Exception as e:  # tampered dir, weights that do not fit the plans, an unusable --device
        print(" ".join(str(e).split()) or type(e).__name__, file=sys.stderr)
        return 1
    try:
        root, seg_writer = dicom_input(config, bundle.manifest.get("manifest_sha256", ""))
    except ValueError as e:  # no phase map, an unreadable one, no DICOM, no import mapping
        print(" ".join(str(e).split()), file=sys.stderr)
        return 1
    jobs, failures, notes = find_jobs(root)
    for line in notes:
        print(f"note: {line}", file=sys.stderr)
    if config.phases is not None:
        jobs = [j for j in jobs if j.phase in config.phases]
    for line in failures:
        print(line, file=sys.stderr)
    if not jobs:
        print(f"{config.input}: nothing to predict", file=sys.stderr)
        return 1

    print(f"predicting {len(jobs)} volume(s) with branch(es) {'+'.join(names)}"
          f"{' and mirroring' if config.mirror else ''}, postprocessing {postprocessing}, on {device}; "
          f"{torch.get_num_threads()} CPU thread(s)",
          flush=True)
    failed = len(failures)
    started = time.perf_counter()
    measured: list[VolumeQC] = []
    for job in jobs:
        t0 = time.perf_counter()
        out = config.output / job.case_id / f"{job.phase}_pred.nii.gz"
        try:
            seg, probabilities = predict_image(nets, job.image, bundle.plans, mirror=config.mirror, step=config.step,
                                               postprocessing=postprocessing.for_phase(job.phase),
                                               with_probabilities=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(out, suffix=".nii.gz") as tmp:  # never a half-written prediction under the final name
                sitk.WriteImage(seg, str(tmp), useCompression=True)
        except Exception as e:  # one bad volume must not stop the others
            failed += 1
            _print_error(job.image, e)
            continue
        try:
            measured.append(measure(job.case_id, job.phase, job.image, out, seg, probabilities))
        except Exception as e:  # the prediction stands; only its QC row is missing
            _print_error(job.image, e, "quality control failed: ")
        if seg_writer is not None:
            try:
                seg_writer.write(job.case_id, job.phase, seg, config.output)
            except Exception as e:  # the NIfTI prediction stands; no SEG file for this series
                failed += 1
                _print_error(job.image, e, "DICOM SEG not written: ")
        print(f"{job.case_id} {job.phase}: {time.perf_counter() - t0:.1f} s -> {out}", flush=True)
    done = len(jobs) - (failed - len(failures))
    print(f"{done} of {len(jobs)} volume(s) predicted in {time.perf_counter() - started:.1f} s"
          f"{f'; {failed} failed' if failed else ''}")
    if measured:
        report_quality(QCReport.judge(measured), config)
    return 1 if failed else 0


def dicom_input(config: PredictConfig, model_sha256: str):
    """(the folder to predict, a `client.dicom_seg.SegWriter` or None). With `dicom_seg`, IN is a
    DICOM folder: imported first into OUT/dicom_import/ (its mapping holds patient identifiers:
    mode 0600, as import-dicom writes it)."""
    if not config.dicom_seg and config.dicom_source is None:
        return config.input, None
    from client.dicom_seg import SegWriter

    if not config.dicom_seg:
        return config.input, SegWriter.for_tree(config.input, config.dicom_source, model_sha256)
    from client.dicom_import import DicomImportConfig, import_dicom, read_phase_map

    if config.phase_map is None:
        raise ValueError("--dicom-seg: give --phase-map phases.json (SeriesDescription -> phase, as import-dicom)")
    imported = config.output / "dicom_import"
    result = import_dicom(config.input, imported, DicomImportConfig(site="PACS", phase_map=read_phase_map(config.phase_map)))
    print(result.format(), flush=True)
    return imported, SegWriter.for_tree(imported, config.input, model_sha256)


def _print_error(image: Path, error: Exception, prefix: str = "") -> None:
    message = prefix + (" ".join(str(error).split()) or type(error).__name__)
    print(message if str(image) in message else f"{image}: {message}", file=sys.stderr, flush=True)


def report_quality(report: QCReport, config: PredictConfig) -> None:
    """predictions.csv/.json, one line per volume to review, and its overlay in --review-dir."""
    csv_path, _ = report.write(config.output)
    review = report.review
    print(f"quality control: {len(review)} of {len(report.volumes)} volume(s) to review -> {csv_path}")
    for v in review:
        print(f"  review {v.case} {v.phase} (score {v.qc_score:.2f}): {v.qc_reasons}")
    if config.review_dir is None or not review:
        return
    from client.overlays import overlay

    config.review_dir.mkdir(parents=True, exist_ok=True)
    for v in review:
        try:
            overlay(Path(v.file), None, None, Path(v.prediction), f"{v.case} {v.phase}: {v.qc_reasons}",
                    config.review_dir / f"{v.case}_{v.phase}.png")
        except Exception as e:  # a missing overlay must not cost the predictions
            _print_error(Path(v.file), e, "review overlay failed: ")
