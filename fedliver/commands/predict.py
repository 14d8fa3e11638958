"""`fedliver predict -i IN -o OUT -m MODEL_DIR`: segment every phase volume under IN with a MODEL_DIR.

Writes OUT/<case>/<PHASE>_pred.nii.gz (uint8, 0 background / 1 liver) on each input's raw grid
(same size, spacing, origin and direction), the LiQA challenge's output layout.

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
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common.postprocessing import METHODS, Postprocessing

_ENDINGS = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Job:
    case_id: str
    phase: str
    image: Path


def register(subparsers: argparse._SubParsersAction) -> None:
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
    parser.add_argument("--branch", choices=("a", "b", "both"), default=None,
                        help="CPS branch to use; 'both' averages the two softmaxes (default: every "
                             "branch in MODEL_DIR)")
    parser.add_argument("--mirror", action="store_true",
                        help="test-time mirroring over all axes (8x slower, usually a little better)")
    parser.add_argument("--phases", type=_phase_list, default=None, metavar="GED4,T1,...",
                        help="only these phases (default: every phase found)")
    parser.add_argument("--step", type=float, default=0.5,
                        help="sliding-window step as a fraction of the patch (default 0.5)")
    parser.add_argument("--postprocessing", choices=("model", *METHODS), default="model",
                        help="'largest-component' keeps the largest liver component in every phase, 'none' the "
                             "raw argmax (default 'model': what MODEL_DIR's info.json says, for the phases it "
                             "names; 'none' if it says nothing)")
    parser.add_argument("--device", default="auto",
                        help="auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--threads", type=int, default=None,
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


def _nifti_stem(name: str) -> str | None:
    for ending in _ENDINGS:
        if name.endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)]
    return None


def plain_jobs(paths: list[Path], folder_name: str) -> tuple[list[Job], list[str]]:
    """Map plain files to (case, phase) by the naming rules in the module docstring."""
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


def run(args: argparse.Namespace) -> int:
    import SimpleITK as sitk
    import torch

    from common.inference import predict_image
    from common.model_dir import ModelDirError, load_model_dir

    from common.device import resolve_device

    try:  # a GPU this machine does not have: one line, before the model is read
        device = resolve_device(args.device)
    except ValueError as e:
        print(f"--device: {e}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    try:
        bundle = load_model_dir(args.model)
        names = sorted(bundle.branches) if args.branch in (None, "both") else [args.branch]
        if args.branch == "both" and len(names) < 2:
            raise ModelDirError(f"{args.model}: --branch both needs two branches, the model has {names}")
        nets = bundle.build_nets(names, device=device)
        postprocessing = Postprocessing.from_info(
            bundle.info.get("postprocessing") if args.postprocessing == "model" else args.postprocessing)
    except Exception as e:  # tampered dir, weights that do not fit the plans, an unusable --device
        print(" ".join(str(e).split()) or type(e).__name__, file=sys.stderr)
        return 1
    jobs, failures, notes = find_jobs(args.input)
    for line in notes:
        print(f"note: {line}", file=sys.stderr)
    if args.phases is not None:
        jobs = [j for j in jobs if j.phase in args.phases]
    for line in failures:
        print(line, file=sys.stderr)
    if not jobs:
        print(f"{args.input}: nothing to predict", file=sys.stderr)
        return 1

    print(f"predicting {len(jobs)} volume(s) with branch(es) {'+'.join(names)}"
          f"{' and mirroring' if args.mirror else ''}, postprocessing {postprocessing}, on {device}; "
          f"{torch.get_num_threads()} CPU thread(s)",
          flush=True)
    failed = len(failures)
    started = time.perf_counter()
    for job in jobs:
        t0 = time.perf_counter()
        out = args.output / job.case_id / f"{job.phase}_pred.nii.gz"
        tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")  # keeps the .nii.gz ending for ITK
        try:
            seg = predict_image(nets, job.image, bundle.plans, mirror=args.mirror, step=args.step,
                                postprocessing=postprocessing.for_phase(job.phase))
            out.parent.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(seg, str(tmp), useCompression=True)
            os.replace(tmp, out)  # never a half-written prediction under the final name
        except Exception as e:  # one bad volume must not stop the others
            tmp.unlink(missing_ok=True)
            failed += 1
            message = " ".join(str(e).split()) or type(e).__name__
            print(message if str(job.image) in message else f"{job.image}: {message}", file=sys.stderr, flush=True)
            continue
        print(f"{job.case_id} {job.phase}: {time.perf_counter() - t0:.1f} s -> {out}", flush=True)
    done = len(jobs) - (failed - len(failures))
    print(f"{done} of {len(jobs)} volume(s) predicted in {time.perf_counter() - started:.1f} s"
          f"{f'; {failed} failed' if failed else ''}")
    return 1 if failed else 0
