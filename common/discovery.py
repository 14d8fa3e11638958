"""Finding a site's cases on disk (LiQA or nnU-Net raw layout) and validating their files.

Layouts `index_dataset` understands:
- LiQA: `<root>/Vendor_<X>/<case>/<PHASE>.nii.gz` and `mask_<PHASE>.nii.gz`, case folders named
  `0001-A-S2` (fibrosis stage 2) or `0001-A` (validation style, no stage); `root` may also be a
  single `Vendor_<X>` folder. The center is the `<X>` of the Vendor folder.
- nnU-Net raw: `imagesTr/<case>_<CCCC>.nii.gz`, `labelsTr/<case>.nii.gz`, `dataset.json`; also ATLAS
  naming `imagesTr/im<N>.nii.gz` with `labelsTr/lb<N>.nii.gz`. Channel `CCCC`'s name in
  `channel_names` is its phase when it names one (T1WI, T2WI and DWI are read as T1, T2, DWI_800);
  any other name (e.g. "MRI") is taken as the labeled phase GED4. One label file serves every
  channel of its case. `imagesTs/` is not indexed. Without a dataset.json: one channel (GED4),
  labels {0, 1}, or {0, 1 liver, 2 tumor} with ATLAS naming.

Splits: an optional `splits.json` in a Vendor_<X> folder (or beside an nnU-Net raw dataset.json)
holds cases out of training as validation or test (`common.splits`); every `Case` carries its split.

Label rule: the classes here are background and liver, so every non-background label of
dataset.json whose name contains "liver", "tumor"/"tumour" or "lesion" counts as liver
(`Case.foreground_labels`; ATLAS gives (1, 2)). Other declared labels may occur in masks and count
as background. Hidden files (".DS_Store") are skipped silently; any other unknown file is a problem.

Links: a symbolic link is followed like the file or folder it names, except one that cannot be
(a loop, a missing target) and a folder link to a folder that holds it (a cycle): each is one
problem line and is skipped. Folders are never walked deeper than the layout says, so no link
makes discovery hang.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from common.cases import Case
from common.phases import LABELED_PHASE, PHASES
from common.problems import Problem, ValidationError
from common.splits import SPLIT_FILE, SPLITS, read_splits
from common.validation import READ_EVERY_FILE, FileInspector, ValidationConfig, validate_case

__all__ = [
    "Case", "CaseIndex", "Problem", "index_dataset", "detect_layout", "liver_labels", "phase_for_channel",
]

VENDOR_PREFIX = "Vendor_"
LIVER_LABEL_WORDS: tuple[str, ...] = ("liver", "tumor", "tumour", "lesion")
_ENDINGS = (".nii.gz", ".nii")
_STAGE = re.compile(r"-S(\d+)$")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_ATLAS_IMAGE = re.compile(r"^im(?P<n>\d+)$")
_PHASE_ALIASES = {"T1WI": "T1", "T2WI": "T2", "DWI": "DWI_800", "DWI800": "DWI_800"}


@dataclass
class CaseIndex:
    root: Path
    layout: str  # "liqa" | "nnunet"
    cases: list[Case]
    problems: list[Problem] = field(default_factory=list)

    @property
    def centers(self) -> list[str]:
        return sorted({c.center for c in self.cases})

    def summary(self) -> str:
        """Per center: cases, labeled cases, stages, images and masks per phase, split sizes; then problems."""
        name = {"liqa": "LiQA", "nnunet": "nnU-Net raw"}.get(self.layout, self.layout)
        labeled = sum(c.labeled for c in self.cases)
        lines = [f"{name} layout at {self.root}: {_count(len(self.centers), 'center')}, "
                 f"{_count(len(self.cases), 'case')} ({labeled} labeled)"]
        for center in self.centers:
            cases = [c for c in self.cases if c.center == center]
            images = Counter(p for c in cases for p in c.images)
            masks = Counter(p for c in cases for p in c.masks)
            stages = Counter(c.stage for c in cases)
            stage_text = ", ".join(f"S{s} {stages[s]}" for s in sorted(s for s in stages if s is not None))
            if stages[None]:
                stage_text += (", " if stage_text else "") + f"unknown {stages[None]}"
            lines += [f"center {center or '(none)'}: {_count(len(cases), 'case')}, "
                      f"{sum(c.labeled for c in cases)} labeled",
                      f"  stages: {stage_text}",
                      f"  {'phase':<8} {'images':>6} {'masks':>6}"]
            phases = [p for p in PHASES if p in images] + sorted(set(images) - set(PHASES))
            lines += [f"  {p:<8} {images[p]:>6} {masks[p]:>6}" for p in phases]
            splits = Counter(c.split for c in cases)
            lines.append("  split: " + ", ".join(f"{splits[s]} {s}" for s in SPLITS))
        lines.append(_count(len(self.problems), "problem"))
        lines += [str(p) for p in self.problems]
        return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def detect_layout(root: Path) -> str:
    """"liqa" or "nnunet"; raises `ValidationError` for a folder that is neither."""
    root = Path(root)
    if why := _link_problem(root):
        raise ValidationError(root, why)
    if not root.is_dir():
        raise ValidationError(root, "no such folder" if not root.exists() else "not a folder")
    if root.name.startswith(VENDOR_PREFIX) or any(
        d.is_dir() and d.name.startswith(VENDOR_PREFIX) for d in root.iterdir()
    ):
        return "liqa"
    if (root / "imagesTr").is_dir() or (root / "dataset.json").is_file():
        return "nnunet"
    raise ValidationError(root, "not a dataset: expected Vendor_<X>/ folders, a Vendor_<X> folder, "
                                "or an nnU-Net raw dataset (imagesTr/, labelsTr/, dataset.json)")


def phase_for_channel(name: str) -> str:
    """The LiQA phase a dataset.json channel name stands for (unknown names: the labeled phase)."""
    key = str(name).strip().upper()
    if key in PHASES:
        return key
    return _PHASE_ALIASES.get(key.replace("-", "").replace(" ", ""), LABELED_PHASE)


def liver_labels(labels: Mapping[str, int | Sequence[int]]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(foreground labels, all declared labels) of a dataset.json `labels` block.

    Region-based entries (lists of values) are flattened. Foreground: non-zero values of labels
    whose name contains one of `LIVER_LABEL_WORDS`; empty when none does.
    """
    foreground, declared = set(), {0}
    for name, value in labels.items():
        values = [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        declared.update(values)
        if any(word in name.lower() for word in LIVER_LABEL_WORDS):
            foreground.update(v for v in values if v != 0)
    return tuple(sorted(foreground)), tuple(sorted(declared))


def _nifti_stem(name: str, endings: Sequence[str] = _ENDINGS) -> str | None:
    for ending in endings:
        if name.endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)]
    return None


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _link_problem(path: Path) -> str | None:
    """Why the symbolic link `path` cannot be followed (a loop, a missing target); None otherwise."""
    if not path.is_symlink():
        return None
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 reports a loop this way
        return "symbolic link loop"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop"
        return f"broken symbolic link to {os.readlink(path)}"
    return None


def _cycle_problem(folder: Path) -> str | None:
    """A folder link to a folder that holds it: a cycle (`case -> .` would list the cases as files)."""
    if not folder.is_symlink():
        return None
    target, parent = folder.resolve(), folder.parent.resolve()
    if target == parent or target in parent.parents:
        return f"symbolic link to {target}, a folder that holds it"
    return None


def _unfollowable(entry: Path, problems: list[Problem]) -> bool:
    """Record a link that cannot be followed or that cycles (each skipped); True when it was one."""
    why = _link_problem(entry) or (_cycle_problem(entry) if entry.is_dir() else None)
    if why:
        problems.append(Problem(entry, f"{why} (ignored)"))
    return why is not None


def _liqa_case(case_dir: Path, center: str, problems: list[Problem]) -> Case | None:
    found: dict[str, dict[str, Path]] = {"image": {}, "mask": {}}
    for f in _visible(case_dir):
        if _unfollowable(f, problems):
            continue
        stem = _nifti_stem(f.name) if f.is_file() else None
        kind, phase = ("mask", stem[5:]) if stem and stem.startswith("mask_") else ("image", stem)
        if f.is_dir():
            problems.append(Problem(f, "unexpected folder (ignored)"))
        elif phase not in PHASES:
            problems.append(Problem(f, "unexpected file (ignored)"))
        elif phase in found[kind]:
            problems.append(Problem(f, f"second {kind} for {phase} (ignored; using {found[kind][phase].name})"))
        else:
            found[kind][phase] = f
    images, masks = found["image"], found["mask"]
    for phase, mask in masks.items():
        if phase not in images:
            problems.append(Problem(mask, f"mask without its image {phase}.nii.gz (ignored)"))
    if not images:
        problems.append(Problem(case_dir, f"case {case_dir.name} dropped: no phase image"))
        return None
    stage = _STAGE.search(case_dir.name)
    return Case(case_id=case_dir.name, center=center, stage=int(stage.group(1)) if stage else None,
                images=images, masks={p: m for p, m in masks.items() if p in images})


def _discover_liqa(root: Path, centers: Sequence[str] | None, problems: list[Problem]) -> list[Case]:
    if root.name.startswith(VENDOR_PREFIX):
        vendors = [root]
    else:
        vendors = [d for d in _visible(root) if d.name.startswith(VENDOR_PREFIX)
                   and not _unfollowable(d, problems) and d.is_dir()]
    by_center = {d.name[len(VENDOR_PREFIX):]: d for d in vendors}
    if centers is not None:
        problems += [Problem(root, f"no {VENDOR_PREFIX}{c} folder") for c in centers if c not in by_center]
        by_center = {c: d for c, d in by_center.items() if c in centers}
    cases = []
    for center, vendor in sorted(by_center.items()):
        found, folders = [], []
        for entry in _visible(vendor):
            if _unfollowable(entry, problems):
                continue
            if entry.is_dir():
                folders.append(entry.name)
                if case := _liqa_case(entry, center, problems):
                    found.append(case)
            elif entry.name != SPLIT_FILE:
                problems.append(Problem(entry, "unexpected file (cases are folders)"))
        cases += _with_splits(found, vendor / SPLIT_FILE, folders, problems)
    return cases


def _with_splits(cases: list[Case], split_file: Path, case_ids: Sequence[str], problems: list[Problem]) -> list[Case]:
    """`cases` with the split their folder's splits.json gives them (ids: every case folder found)."""
    splits, split_problems = read_splits(split_file, case_ids)
    problems += split_problems
    return [dataclasses.replace(c, split=splits[c.case_id]) if c.case_id in splits else c for c in cases]


def _read_dataset_json(root: Path, problems: list[Problem]) -> dict:
    path = root / "dataset.json"
    if not path.is_file():
        return {}
    defaults = "; ignored: using the defaults (one GED4 channel, label 1 is liver, .nii.gz files)"
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        problems.append(Problem(path, f"not valid JSON ({' '.join(str(e).split())}){defaults}"))
        return {}
    if not isinstance(meta, dict):
        problems.append(Problem(path, f"expected a JSON object, got a JSON {type(meta).__name__}{defaults}"))
        return {}
    return meta


def _dataset_json_cases(meta: dict, path: Path, case_ids: Sequence[str], ending: str, problems: list[Problem]) -> None:
    """What dataset.json says about the cases (numTraining, an MSD-style "training" list) against imagesTr."""
    count = meta.get("numTraining")
    if isinstance(count, int) and not isinstance(count, bool) and count != len(case_ids):
        problems.append(Problem(path, f"numTraining is {count} but imagesTr holds {_count(len(case_ids), 'case')}"))
    training = meta.get("training")
    if not isinstance(training, list):
        return
    known, missing = set(case_ids), []
    for entry in training:
        image = entry.get("image") if isinstance(entry, dict) else entry
        stem = _nifti_stem(Path(image).name, [ending]) if isinstance(image, str) else None
        if stem is None or stem in known:
            continue
        channel = _CHANNEL.match(stem)  # "case_0000.nii.gz" names case "case" too
        if channel is None or channel["case"] not in known:
            missing.append(stem)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        problems.append(Problem(path, f"training lists {shown}, which imagesTr does not hold (ignored)"))


def _discover_nnunet(root: Path, problems: list[Problem]) -> tuple[list[Case], tuple[int, ...]]:
    """Cases of an nnU-Net raw dataset and the declared label values."""
    meta = _read_dataset_json(root, problems)
    ending = str(meta.get("file_ending", ".nii.gz"))
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        problems.append(Problem(images_dir, "no such folder"))
        return [], (0, 1)
    image_files = [f for f in _visible(images_dir) if not _unfollowable(f, problems)]
    atlas = any(_ATLAS_IMAGE.match(_nifti_stem(f.name, [ending]) or "") for f in image_files)

    channels = meta.get("channel_names") or meta.get("modality") or {"0": LABELED_PHASE}
    if not isinstance(channels, dict):
        problems.append(Problem(root / "dataset.json", "channel_names is not an object (using one GED4 channel)"))
        channels = {"0": LABELED_PHASE}
    phase_of: dict[int, str] = {}
    for key, name in sorted(channels.items(), key=lambda kv: str(kv[0]).zfill(4)):
        if not str(key).isdigit():
            problems.append(Problem(root / "dataset.json", f"channel key {key!r} is not a number (ignored)"))
            continue
        phase = phase_for_channel(name)
        if phase in phase_of.values():
            problems.append(Problem(root / "dataset.json", f"channel {key} ({name}) repeats phase {phase} (ignored)"))
        else:
            phase_of[int(key)] = phase

    default_labels = {"background": 0, "liver": 1, **({"tumor": 2} if atlas else {})}
    try:
        foreground, declared = liver_labels(meta.get("labels") or default_labels)
    except (TypeError, ValueError, AttributeError):
        problems.append(Problem(root / "dataset.json", "labels are not name -> value (using liver = 1)"))
        foreground, declared = (1,), (0, 1)
    if not foreground:
        problems.append(Problem(root / "dataset.json",
                                f"no label named {'/'.join(LIVER_LABEL_WORDS)} (taking 1 as liver)"))
        foreground, declared = (1,), tuple(sorted({*declared, 1}))

    grouped: dict[str, dict[str, Path]] = {}
    for f in image_files:
        stem = _nifti_stem(f.name, [ending]) if f.is_file() else None
        match = _CHANNEL.match(stem or "")
        case_id, channel = (match["case"], int(match["channel"])) if match else (stem, 0)
        if stem is None:
            problems.append(Problem(f, "unexpected file (ignored)"))
        elif channel not in phase_of:
            problems.append(Problem(f, f"channel {channel:04d} is not in dataset.json channel_names (ignored)"))
        elif phase_of[channel] in grouped.setdefault(case_id, {}):
            problems.append(Problem(f, f"second image for case {case_id} channel {channel:04d} (ignored)"))
        else:
            grouped[case_id][phase_of[channel]] = f

    labels = {f.name: f for f in _visible(labels_dir) if not _unfollowable(f, problems)} if labels_dir.is_dir() else {}
    cases, used = [], set()
    for case_id, images in sorted(grouped.items()):
        names = [case_id + ending]
        if atlas_match := _ATLAS_IMAGE.match(case_id):
            names.append(f"lb{atlas_match['n']}{ending}")
        label = next((labels[n] for n in names if n in labels), None)
        used.update(n for n in names if n in labels)
        cases.append(Case(case_id=case_id, center="", stage=None, images=images,
                          masks={p: label for p in images} if label else {}, foreground_labels=foreground))
    for name in sorted(set(labels) - used):
        known = labels[name].is_file() and name.endswith(ending)
        message = "mask without its image (ignored)" if known else "unexpected file (ignored)"
        problems.append(Problem(labels[name], message))
    _dataset_json_cases(meta, root / "dataset.json", list(grouped), ending, problems)
    return _with_splits(cases, root / SPLIT_FILE, list(grouped), problems), declared


def index_dataset(
    root: Path,
    *,
    centers: Sequence[str] | None = None,
    validate: bool = True,
    config: ValidationConfig | None = None,
    inspector: FileInspector = READ_EVERY_FILE,
) -> CaseIndex:
    """Find the cases under `root` and, with `validate`, keep only files that pass validation.

    `validate=False` only walks folders (no file is opened), for callers that validated before.
    `inspector` checks each file: by default every file is read; a site's prepared dataset passes
    its stored findings (common/file_checks.py), so only new or changed files are read.
    `centers` keeps only those LiQA centers. Raises `ValidationError` when `root` is no dataset.
    """
    root = Path(root)
    layout = detect_layout(root)
    problems: list[Problem] = []
    if layout == "liqa":
        found, declared = _discover_liqa(root, centers, problems), (0, 1)
    else:
        found, declared = _discover_nnunet(root, problems)
        if centers:
            problems.append(Problem(root, f"nnU-Net raw layout has no centers (filter {','.join(centers)} ignored)"))
    if not validate:
        return CaseIndex(root, layout, found, problems)
    config = config or ValidationConfig()
    cases = []
    for case in found:
        kept, case_problems = validate_case(case, config, allowed_labels=declared, inspector=inspector)
        problems += case_problems
        if kept is not None:
            cases.append(kept)
    return CaseIndex(root, layout, cases, problems)
