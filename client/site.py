"""One hospital as the ClientApp sees it: who it is, where its data and cache live, what it trains on.

Its cache folder holds the site's prepared dataset, nnU-Net's persistent raw -> preprocessed stage:
everything a message needs that can be computed once per change of the files.

    <cache>/index/files.json              each file's validation findings (path, size, mtime)
    <cache>/fingerprint/<key>.npz         each volume's fingerprint (merged exactly per message)
    <cache>/preprocessed/<plans hash>/    each volume's data, seg, foreground locations, properties
    <cache>/propagated/                   labeled masks carried onto the other phases

In deployment every message is a fresh process: an unchanged site reads no voxel to be indexed or
fingerprinted, and trains and evaluates from the preprocessed entries. `prepare` builds all of it
ahead of the first message (`fedliver prepare`).

What each case is for follows the evaluation protocol: at a training site, only cases of the
"train" split are trained on (and fingerprinted); "validation" cases (labeled) only serve model
selection, "test" cases only the report. At a held-out site (role "eval") every case is a test case.

Labeled phases (run config `labeled-phases`): the phases whose masks are labels, GED4 at a LiQA
site, T2 or T1 at many others. "auto" takes every phase with a mask among the site's training and
validation cases (test cases, masked on every phase, say nothing about what the site labels). They
drive the labeled batches, the validation volumes (selection and the CPS gate) and the source of
label propagation (a case's first labeled phase in PHASES order: GED4 first).

In deployment the SuperNode's node_config names the site (`site="A" role="train" data-dir="/data"`);
in simulation node_config holds only the partition id, mapped to a site through the run config.
"""

from __future__ import annotations

import dataclasses

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from client.label_propagation import propagate_mask
from common.discovery import Case, CaseIndex, Problem, index_dataset
from common.federation_config import FederationConfig, SiteAssignment
from common.file_checks import StoredFileChecks
from common.fingerprint import FingerprintConfig, SiteFingerprint, compute_site_fingerprint
from common.fingerprint_cache import FingerprintCacheStats, cached_site_fingerprint
from common.phases import LABELED_PHASE, NON_CONTRAST_PHASES, ordered_phases
from common.planning import plans_hash
from common.preprocessing import PreprocessedVolume, PreprocessingCache, preprocess_case_phases
from common.splits import SPLITS, TEST, TRAIN, VALIDATION


@dataclass(frozen=True)
class SiteIdentity:
    site: str
    role: str
    data_dir: Path
    cache_dir: Path
    output_dir: Path
    centers: tuple[str, ...] | None = None  # restrict a multi-vendor root to this site's vendor
    # False: no prepared dataset, every message reads and checks the raw files again (the behaviour
    # before it; node config `prepared-dataset=false`, the baseline of simulations.benchmarks.bench_site)
    prepared: bool = True

    @property
    def assignment(self) -> SiteAssignment:
        return SiteAssignment(self.site, self.role)


def _resolved(path: Path) -> Path:
    """`path` absolute, links resolved; only absolute when a link loops (Python 3.11 raises), so the
    data check names the loop under the site's name instead of the handler failing here."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):
        return path.absolute()


def resolve_identity(node_config: Mapping[str, object], run_config: Mapping[str, object]) -> SiteIdentity:
    """The site behind this node, from node_config (deployment) or partition id (simulation)."""
    if "site" in node_config:
        site = str(node_config["site"])
        data_dir = _resolved(Path(str(node_config.get("data-dir", ""))).expanduser())
        cache_dir = Path(str(node_config.get("cache-dir", "") or data_dir.parent / f"fedliver-cache-{site}"))
        output_dir = Path(str(node_config.get("output-dir", "") or cache_dir / "outputs"))
        centers = str(node_config.get("centers", ""))
        return SiteIdentity(
            site=site,
            role=str(node_config.get("role", "train")),
            data_dir=data_dir,
            cache_dir=_resolved(cache_dir),
            output_dir=_resolved(output_dir),
            centers=tuple(c for c in centers.split(",") if c) or None,
            prepared=str(node_config.get("prepared-dataset", True)).lower() not in ("false", "0", "no"),
        )
    config = FederationConfig.from_run_config(run_config)
    partition = int(node_config["partition-id"])  # type: ignore[arg-type]
    if partition >= len(config.sites):
        raise ValueError(f"partition {partition} has no site in run config 'sites' ({len(config.sites)} given)")
    if config.data_root is None:
        raise ValueError("run config 'data-root' is empty (a simulation reads every site's Vendor_<X> tree under it)")
    assignment = config.sites[partition]
    site_dir = config.run_dir / "sites" / assignment.site
    return SiteIdentity(
        site=assignment.site,
        role=assignment.role,
        data_dir=config.data_root,
        cache_dir=site_dir / "cache",
        output_dir=site_dir,
        centers=(assignment.site,),
    )


@dataclass(frozen=True)
class TrainingVolumes:
    labeled: list[PreprocessedVolume]
    unlabeled: list[PreprocessedVolume]
    problems: list[Problem]
    labeled_phases: tuple[str, ...] = ()  # phases of the truly labeled volumes (not propagated), PHASES order


class SiteData:
    """The site's validated case index and what it trains and evaluates on."""

    def __init__(self, identity: SiteIdentity, *, unlabeled_phases: tuple[str, ...] = NON_CONTRAST_PHASES,
                 labeled_phases: tuple[str, ...] | None = None):
        """`labeled_phases`: the phases whose masks are labels (None: run config "auto", see the module docstring)."""
        self.identity = identity
        self.unlabeled_phases = unlabeled_phases
        self._labeled_setting = None if labeled_phases is None else ordered_phases(labeled_phases)
        self._caches: dict[str, PreprocessingCache] = {}

    @cached_property
    def file_checks(self) -> StoredFileChecks:
        """The site's stored validation findings; `read` says how many files this message read."""
        return StoredFileChecks(self.identity.cache_dir / "index" / "files.json")

    @cached_property
    def index(self) -> CaseIndex:
        """The validated case index: folders walked now, each file checked once per change."""
        if not self.identity.prepared:
            return index_dataset(self.identity.data_dir, centers=self.identity.centers)
        index = index_dataset(self.identity.data_dir, centers=self.identity.centers, inspector=self.file_checks)
        try:
            self.file_checks.save()
        except OSError as error:  # a read-only cache folder costs speed, never the message
            print(f"[site {self.identity.site}] cannot store the file checks: {error}", flush=True)
        return index

    def preprocessing_cache(self, plans: dict) -> PreprocessingCache:
        """The preprocessed volumes for `plans`; one object per plans, so its counters add up."""
        key = plans_hash(plans)
        if key not in self._caches:
            self._caches[key] = PreprocessingCache(self.identity.cache_dir / "preprocessed", plans,
                                                   trust_stamps=self.identity.prepared)
        return self._caches[key]

    def fingerprint(self, config: FingerprintConfig | None = None,
                    problems: list[Problem] | None = None) -> tuple[SiteFingerprint, FingerprintCacheStats]:
        """The site's fingerprint of `fingerprint_pairs()`, each volume's part kept in the cache."""
        if not self.identity.prepared:
            pairs = self.fingerprint_pairs()
            return compute_site_fingerprint(pairs, config, problems), FingerprintCacheStats(computed=len(pairs))
        return cached_site_fingerprint(self.fingerprint_pairs(), self.identity.cache_dir / "fingerprint",
                                       config, problems)

    @property
    def cases(self) -> list[Case]:
        """Every usable case of the site, whatever its split."""
        return self.index.cases

    def cases_in(self, split: str) -> list[Case]:
        """The site's cases of one split; a held-out site has no split: every case is a test case."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
        if self.identity.role == "eval":
            return list(self.cases) if split == TEST else []
        return [case for case in self.cases if case.split == split]

    @cached_property
    def labeled_phases(self) -> tuple[str, ...]:
        """The phases whose masks label at this site, in PHASES order: the given ones, or ("auto")
        every phase with a mask among training and validation cases (none at a held-out site)."""
        if self._labeled_setting is not None:
            return self._labeled_setting
        return ordered_phases(phase for split in (TRAIN, VALIDATION) for case in self.cases_in(split)
                              for phase in case.masks if phase in case.images)

    def _labeled_phases_of(self, case: Case) -> list[str]:
        """The case's labeled phases (mask and image present), GED4 first."""
        return [phase for phase in self.labeled_phases if phase in case.masks and phase in case.images]

    @property
    def _training_phases(self) -> tuple[str, ...]:
        """Phases a training case contributes, in this order: GED4, the labeled phases, the
        unlabeled phases (each once). A GED4 site: GED4 then `unlabeled_phases`, as before."""
        return tuple(dict.fromkeys((LABELED_PHASE, *self.labeled_phases, *self.unlabeled_phases)))

    def labeled_pairs(self) -> list[tuple[Case, str]]:
        """(case, phase) with a mask on a labeled phase among training cases: the few labeled volumes."""
        labeled = set(self.labeled_phases)
        return [(case, phase) for case in self.cases_in(TRAIN) for phase in case.masks
                if phase in case.images and phase in labeled]

    def unlabeled_pairs(self) -> list[tuple[Case, str]]:
        """The training cases' phases without a mask (GED4, the labeled phases, the unlabeled
        phases: `_training_phases`); each phase its own sample."""
        phases = self._training_phases
        return [(case, phase) for case in self.cases_in(TRAIN) for phase in phases
                if phase in case.images and phase not in case.masks]

    def fingerprint_pairs(self) -> list[tuple[Path, Path | None]]:
        """Every image the site trains on, with its mask where it has one."""
        pairs = [(case.images[phase], case.masks[phase]) for case, phase in self.labeled_pairs()]
        pairs += [(case.images[phase], None) for case, phase in self.unlabeled_pairs()]
        return pairs

    def propagated_pairs(self) -> tuple[list[tuple[Case, str]], list[Problem]]:
        """(case, phase) of the labeled training cases' other phases without a mask (of
        `_training_phases`), each case carrying the mask of its first labeled phase (GED4 first)
        propagated onto that phase's grid (`client.label_propagation`)."""
        pairs, problems = [], []
        for case in self.cases_in(TRAIN):
            sources = self._labeled_phases_of(case)
            if not sources:
                continue
            source = sources[0]
            for phase in self._training_phases:
                if phase == source or phase not in case.images or phase in case.masks:
                    continue
                out = self.identity.cache_dir / "propagated" / case.case_id / f"mask_{phase}_from_{source}.nii.gz"
                try:
                    mask = propagate_mask(case.masks[source], case.images[phase], out, case.foreground_labels)
                except Exception as e:  # an unreadable image must not stop the site
                    problems.append(Problem(case.images[phase], f"label propagation failed: {' '.join(str(e).split())}"))
                    continue
                pairs.append((dataclasses.replace(case, masks={phase: mask}), phase))
        return pairs, problems

    def training_volumes(self, plans: dict, *, include_unlabeled: bool = True,
                         propagate_labels: bool = False) -> TrainingVolumes:
        """Labeled (with `propagate_labels`, also the labeled cases' other phases under their
        propagated mask) and unlabeled volumes of the training cases, preprocessed."""
        cache = self.preprocessing_cache(plans)
        labeled, problems = _preprocess(cache, self.labeled_pairs(), with_masks=True)
        labeled_phases = ordered_phases(volume.phase for volume in labeled)
        unlabeled_pairs = self.unlabeled_pairs()
        if propagate_labels:
            pairs, failed = self.propagated_pairs()
            more, failed_too = _preprocess(cache, pairs, with_masks=True)
            labeled += more
            problems += failed + failed_too
            # Now labeled: also unlabeled, they would share (and fight over) one cache entry.
            taken = {(case.case_id, phase) for case, phase in pairs}
            unlabeled_pairs = [(case, phase) for case, phase in unlabeled_pairs if (case.case_id, phase) not in taken]
        unlabeled: list[PreprocessedVolume] = []
        if include_unlabeled:
            unlabeled, more = _preprocess(cache, unlabeled_pairs, with_masks=False)
            problems += more
        return TrainingVolumes(labeled, unlabeled, problems, labeled_phases)

    def validation_pairs(self) -> list[tuple[Case, str]]:
        """(case, phase) of validation cases for each labeled phase with a mask: what model
        selection looks at (GED4 at a LiQA site)."""
        return [(case, phase) for case in self.cases_in(VALIDATION) for phase in self._labeled_phases_of(case)]

    def validation_volumes(self, plans: dict) -> TrainingVolumes:
        """The validation volumes of the labeled phases, preprocessed with their masks (the trainer's CPS gate)."""
        labeled, problems = _preprocess(self.preprocessing_cache(plans), self.validation_pairs(), with_masks=True)
        return TrainingVolumes(labeled, [], problems)

    def test_pairs(self) -> list[tuple[Case, str]]:
        """(case, phase) for every phase with a mask of test cases (every labeled phase at a held-out site)."""
        return [(case, phase) for case in self.cases_in(TEST) for phase in case.masks if phase in case.images]

    def prepare(self, plans: dict | None = None, *, propagate_labels: bool = True,
                fingerprint_config: FingerprintConfig | None = None) -> PreparedSite:
        """Build or refresh the prepared dataset: index, fingerprint and, with `plans`, every volume
        a message would preprocess (training, validation and test), as the messages will ask for them."""
        problems = list(self.index.problems)
        _, fingerprint = self.fingerprint(fingerprint_config, problems)
        preprocessed = cache = None
        if plans is not None:
            cache = self.preprocessing_cache(plans)
            volumes = self.training_volumes(plans, include_unlabeled=True, propagate_labels=propagate_labels)
            validation = self.validation_volumes(plans)
            test, failed = _preprocess(cache, self.test_pairs(), with_masks=False)  # as evaluation reads them
            problems += volumes.problems + validation.problems + failed
            preprocessed = len(volumes.labeled) + len(volumes.unlabeled) + len(validation.labeled) + len(test)
        return PreparedSite(self.index, self.file_checks.read, self.file_checks.reused, fingerprint,
                            preprocessed, cache, _unique(problems))


@dataclass(frozen=True)
class PreparedSite:
    """What `SiteData.prepare` did, for `fedliver prepare` to print."""

    index: CaseIndex
    files_read: int
    files_unchanged: int
    fingerprint: FingerprintCacheStats
    volumes: int | None  # preprocessed volumes in the cache (None without plans)
    cache: PreprocessingCache | None
    problems: list[Problem]

    def summary(self) -> list[str]:
        cases = self.index.cases
        lines = [f"index: {len(cases)} cases ({sum(c.labeled for c in cases)} labeled); "
                 f"{self.files_read} files read and checked, {self.files_unchanged} unchanged",
                 f"fingerprint: {self.fingerprint.computed} volumes read, {self.fingerprint.reused} unchanged"]
        if self.cache is not None:
            lines.append(f"preprocessed/{self.cache.folder.name}: {self.volumes} volumes, "
                         f"{self.cache.computed} preprocessed now, {self.cache.hashed} files hashed")
        lines.append(f"{len(self.problems)} problem(s)")
        return lines + [str(p) for p in self.problems]


def _unique(problems: list[Problem]) -> list[Problem]:
    """Each problem line once (the index and preprocessing may name the same file)."""
    return list(dict.fromkeys(problems))


def _preprocess(
    cache: PreprocessingCache, pairs: list[tuple[Case, str]], *, with_masks: bool
) -> tuple[list[PreprocessedVolume], list[Problem]]:
    volumes: list[PreprocessedVolume] = []
    problems: list[Problem] = []
    for case, phase in pairs:
        done, failed = preprocess_case_phases(cache, [case], [phase], with_masks)
        volumes += done
        problems += failed
    return volumes, problems
