"""One hospital as the ClientApp sees it: who it is, where its data and cache live, what it trains on.

In deployment the SuperNode's node_config names the site (`site="A" role="train" data-dir="/data"`);
in simulation node_config holds only the partition id, mapped to a site through the run config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from common.discovery import Case, CaseIndex, Problem, index_dataset
from common.federation_config import FederationConfig, SiteAssignment
from common.phases import LABELED_PHASE, NON_CONTRAST_PHASES
from common.preprocessing import PreprocessedVolume, PreprocessingCache, preprocess_case_phases


@dataclass(frozen=True)
class SiteIdentity:
    site: str
    role: str
    data_dir: Path
    cache_dir: Path
    output_dir: Path
    centers: tuple[str, ...] | None = None  # restrict a multi-vendor root to this site's vendor

    @property
    def assignment(self) -> SiteAssignment:
        return SiteAssignment(self.site, self.role)


def resolve_identity(node_config: Mapping[str, object], run_config: Mapping[str, object]) -> SiteIdentity:
    """The site behind this node, from node_config (deployment) or partition id (simulation)."""
    if "site" in node_config:
        site = str(node_config["site"])
        data_dir = Path(str(node_config.get("data-dir", ""))).expanduser().resolve()
        cache_dir = Path(str(node_config.get("cache-dir", "") or data_dir.parent / f"fedliver-cache-{site}"))
        output_dir = Path(str(node_config.get("output-dir", "") or cache_dir / "outputs"))
        centers = str(node_config.get("centers", ""))
        return SiteIdentity(
            site=site,
            role=str(node_config.get("role", "train")),
            data_dir=data_dir,
            cache_dir=cache_dir.resolve(),
            output_dir=output_dir.resolve(),
            centers=tuple(c for c in centers.split(",") if c) or None,
        )
    config = FederationConfig.from_run_config(run_config)
    partition = int(node_config["partition-id"])  # type: ignore[arg-type]
    if partition >= len(config.sites):
        raise ValueError(f"partition {partition} has no site in run config 'sites' ({len(config.sites)} given)")
    if config.data_root is None:
        raise ValueError("run config 'data-root' is empty: the simulation needs the phantom tree")
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


class SiteData:
    """The site's validated case index and what it trains and evaluates on."""

    def __init__(self, identity: SiteIdentity, *, unlabeled_phases: tuple[str, ...] = NON_CONTRAST_PHASES):
        self.identity = identity
        self.unlabeled_phases = unlabeled_phases

    @cached_property
    def index(self) -> CaseIndex:
        return index_dataset(self.identity.data_dir, centers=self.identity.centers)

    @property
    def cases(self) -> list[Case]:
        return self.index.cases

    def labeled_pairs(self) -> list[tuple[Case, str]]:
        """(case, phase) with a mask: the few labeled GED4 volumes at a training site."""
        return [(case, phase) for case in self.cases for phase in case.masks if phase in case.images]

    def unlabeled_pairs(self) -> list[tuple[Case, str]]:
        """Unlabeled GED4 plus every case's non-contrast phases; each phase its own sample."""
        pairs = []
        for case in self.cases:
            if LABELED_PHASE in case.images and LABELED_PHASE not in case.masks:
                pairs.append((case, LABELED_PHASE))
            pairs.extend((case, phase) for phase in self.unlabeled_phases if phase in case.images and phase not in case.masks)
        return pairs

    def fingerprint_pairs(self) -> list[tuple[Path, Path | None]]:
        """Every image the site trains on, with its mask where it has one."""
        pairs = [(case.images[phase], case.masks[phase]) for case, phase in self.labeled_pairs()]
        pairs += [(case.images[phase], None) for case, phase in self.unlabeled_pairs()]
        return pairs

    def training_volumes(self, plans: dict, *, include_unlabeled: bool = True) -> TrainingVolumes:
        cache = PreprocessingCache(self.identity.cache_dir / "preprocessed", plans)
        labeled, problems = _preprocess(cache, self.labeled_pairs(), with_masks=True)
        unlabeled: list[PreprocessedVolume] = []
        if include_unlabeled:
            unlabeled, more = _preprocess(cache, self.unlabeled_pairs(), with_masks=False)
            problems += more
        return TrainingVolumes(labeled, unlabeled, problems)

    def evaluation_pairs(self) -> list[tuple[Case, str]]:
        """Every phase with ground truth: all phases at a held-out centre, labeled GED4 elsewhere."""
        return self.labeled_pairs()


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
