"""The LiQA-like multi-center, multi-phase phantom tree.

Layout written (what `common.discovery` and the LiQA challenge expect):
`OUT/Vendor_<X>/<NNNN>-<X>-S<stage>/<PHASE>.nii.gz`; training centers write `mask_GED4.nii.gz` for
their first `labeled` cases only; held-out (evaluation) centers write `mask_<PHASE>.nii.gz` for every
phase present. Every random draw comes from a generator keyed by (seed, center, case, purpose), so a
case does not change when other centers, cases or phases are added.

Evaluation splits: a training center may also get `test_cases` test cases (a mask for every phase
present, like a held-out center's) and then `validation_cases` labeled validation cases
(`mask_GED4.nii.gz`), numbered after its `cases` training cases and listed in
`Vendor_<X>/splits.json` (`common.splits`): the training cases stay those of the same `cases`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from common.phases import LABELED_PHASE, PHASES, image_filename, mask_filename
from common.splits import TEST, TRAIN, VALIDATION, write_splits
from simulations.phantoms.acquisition import EPIDistortion, Motion, PhaseImage, make_grid, render_phase, write_nifti_gz
from simulations.phantoms.anatomy import Anatomy, sample_anatomy
from simulations.phantoms.centers import PROFILES, CenterProfile, GeometryProfile, center_profile
from simulations.phantoms.contrast import N_TISSUES

DEFAULT_CENTERS: tuple[str, ...] = ("A", "B1", "B2", "C")


@dataclass(frozen=True)
class PhantomConfig:
    centers: Sequence[str] = DEFAULT_CENTERS
    cases: int = 12               # cases per center (training cases at a training center)
    labeled: int = 3              # labeled (mask_GED4) cases per training center
    test_cases: int = 0           # extra test cases per training center (a mask for every phase)
    validation_cases: int = 0     # extra labeled (mask_GED4) validation cases per training center
    seed: int = 0
    profile: str = "demo"         # "demo" | "full"
    heldout: Sequence[str] = ("C",)
    missing_rate: float = 0.1     # chance that a phase (never GED4 of a labeled case) is missing
    preview: bool = False         # also write OUT/preview.png

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r} (choose from {', '.join(PROFILES)})")
        if self.cases < 1 or self.labeled < 0 or self.test_cases < 0 or self.validation_cases < 0:
            raise ValueError("cases must be >= 1 and labeled, test_cases, validation_cases >= 0")


@dataclass
class CenterSummary:
    center: str
    role: str                                   # "train" | "heldout"
    cases: int                                  # training cases at a training center; all at a held-out one
    labeled: int                                # of those, cases with at least one mask
    phases: dict[str, int]                      # phase -> cases holding it
    masks: int                                  # mask files written
    grids: dict[str, tuple[tuple[float, ...], tuple[int, ...]]]  # phase -> (spacing xyz, size xyz)
    test: int = 0                               # test cases held out by splits.json
    validation: int = 0                         # validation cases held out by splits.json


@dataclass
class PhantomSummary:
    root: Path
    seed: int
    profile: str
    centers: list[CenterSummary] = field(default_factory=list)
    preview: Path | None = None

    def format(self) -> str:
        lines = [f"phantoms in {self.root} (profile {self.profile}, seed {self.seed})"]
        for c in self.centers:
            held_out = f" + {c.test} test, {c.validation} validation (splits.json)" if c.test or c.validation else ""
            lines.append(f"  Vendor_{c.center} [{c.role}]: {c.cases} cases, {c.labeled} labeled{held_out}, {c.masks} masks")
            lines.append("    phases: " + ", ".join(f"{p} {n}" for p, n in c.phases.items()))
            for phase in ("GED4", "T2", "DWI_800"):
                if phase in c.grids:
                    sp, sz = c.grids[phase]
                    lines.append(f"    {phase:8s} spacing {'x'.join(f'{s:.2f}' for s in sp)} mm, "
                                 f"size {'x'.join(map(str, sz))}")
        if self.preview:
            lines.append(f"  preview: {self.preview}")
        return "\n".join(lines)

    __str__ = format


def case_rng(seed: int, center: str, case: int, purpose: str) -> np.random.Generator:
    """Independent stream per (seed, center, case, purpose)."""
    return np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(center.encode()), case,
                                  zlib.crc32(purpose.encode())])


def present_phases(seed: int, center: str, case: int, labeled: bool, missing_rate: float) -> list[str]:
    rng = case_rng(seed, center, case, "missing")
    draws = rng.random(len(PHASES))
    present = [p for p, d in zip(PHASES, draws)
               if (p == LABELED_PHASE and (labeled or d >= missing_rate / 2)) or (p != LABELED_PHASE and d >= missing_rate)]
    if len(present) < 2:  # a case always has something to look at
        present = sorted(set(present) | {LABELED_PHASE, "T1"}, key=PHASES.index)
    return present


@dataclass
class PhantomCase:
    case_id: str
    stage: int
    anatomy: Anatomy
    phases: dict[str, PhaseImage]


def render_case(center: str, case: int, seed: int, geometry: GeometryProfile, phases: Sequence[str],
                profile: CenterProfile | None = None) -> PhantomCase:
    """All requested phases of one case, each on its own grid with its own motion."""
    prof = profile or center_profile(center)
    stage = int(case_rng(seed, center, case, "stage").integers(1, 5))
    anatomy = sample_anatomy(case_rng(seed, center, case, "anatomy"), stage)
    r = case_rng(seed, center, case, "scan")
    # the liver's mid-height lies ~8 mm below its frame centre (the dome is flatter than the tip)
    scan_center = np.array([r.uniform(-10, 10), r.uniform(-12, 6), anatomy.liver_center[2] - 8.0 + r.uniform(-8, 8)])
    gain = float(r.uniform(0.8, 1.25))
    out: dict[str, PhaseImage] = {}
    for phase in phases:
        pr = case_rng(seed, center, case, f"phase-{phase}")
        grid = make_grid(geometry.phase(center, phase), prof.orientation,
                         scan_center + np.array([0.0, 0.0, pr.uniform(-6, 6)]))
        motion = Motion.random(pr, pivot=anatomy.liver_center)
        distortion = EPIDistortion.random(pr) if phase == "DWI_800" else None
        jitter = 1.0 + np.clip(pr.normal(0, 0.05, N_TISSUES), -0.12, 0.12)
        out[phase] = render_phase(anatomy, grid, phase, prof, motion, pr, distortion=distortion,
                                  jitter=jitter, gain=gain * float(pr.uniform(0.95, 1.05)))
    return PhantomCase(f"{case + 1:04d}-{center}-S{stage}", stage, anatomy, out)


def generate_liqa_tree(out: Path, config: PhantomConfig) -> PhantomSummary:
    """Write the LiQA-layout phantom tree under `out` and return what was written."""
    out = Path(out)
    geometry = PROFILES[config.profile]
    summary = PhantomSummary(out, config.seed, config.profile)
    preview_rows: list[tuple[str, dict[str, PhaseImage]]] = []
    for center in config.centers:
        heldout = center in config.heldout
        vendor_dir = out / f"Vendor_{center}"
        vendor_dir.mkdir(parents=True, exist_ok=True)
        cs = CenterSummary(center, "heldout" if heldout else "train", config.cases, 0,
                           {p: 0 for p in PHASES}, 0, {})
        # (case number, split, labeled): test and validation cases come after the training cases,
        # so that these keep their numbers (and with them their random draws)
        roster = [(case, TRAIN, heldout or case < config.labeled) for case in range(config.cases)]
        if not heldout:
            test_end = config.cases + config.test_cases
            roster += [(case, TEST, True) for case in range(config.cases, test_end)]
            roster += [(case, VALIDATION, True) for case in range(test_end, test_end + config.validation_cases)]
        plans = [(case, split, labeled, present_phases(config.seed, center, case, labeled, config.missing_rate))
                 for case, split, labeled in roster]
        preview_case = next((c for c, _, _, ph in plans[:config.cases] if len(ph) == len(PHASES)), 0)
        held_out: dict[str, list[str]] = {TEST: [], VALIDATION: []}
        for case, split, labeled, phases in plans:
            # the preview shows every phase of one case; only present phases are written
            render = list(PHASES) if (config.preview and case == preview_case) else phases
            pc = render_case(center, case, config.seed, geometry, render)
            case_dir = vendor_dir / pc.case_id
            case_dir.mkdir(exist_ok=True)
            every_phase_masked = heldout or split == TEST  # test cases are scored on every phase
            for phase in phases:
                img = pc.phases[phase]
                write_nifti_gz(img.image, case_dir / image_filename(phase))
                if split == TRAIN:
                    cs.phases[phase] += 1
                cs.grids.setdefault(phase, (tuple(round(s, 3) for s in img.image.GetSpacing()), img.image.GetSize()))
                if every_phase_masked or (labeled and phase == LABELED_PHASE):
                    write_nifti_gz(img.mask, case_dir / mask_filename(phase))
                    cs.masks += 1
            if split == TRAIN:
                cs.labeled += int(heldout or (labeled and LABELED_PHASE in phases))
            else:
                held_out[split].append(pc.case_id)
            if config.preview and case == preview_case:
                preview_rows.append((center, pc.phases))
        if held_out[TEST] or held_out[VALIDATION]:
            write_splits(vendor_dir, validation=held_out[VALIDATION], test=held_out[TEST])
        cs.test, cs.validation = len(held_out[TEST]), len(held_out[VALIDATION])
        summary.centers.append(cs)
    if config.preview:
        from simulations.phantoms.preview import render_preview

        summary.preview = render_preview(preview_rows, out / "preview.png")
    return summary
