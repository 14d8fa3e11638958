"""The site pipeline, shared by the federation's ClientApp and `fedliver train`.

    prepared sites (client.site.SiteData) -> fingerprints, merged -> plans
    -> preprocessed volumes (labeled, unlabeled, validation) -> TrainerConfig -> CPSTrainer

The ClientApp runs it for its one site, one message at a time: its fingerprint goes to the server,
which merges every site's and plans with the same `common.planning.plan_from_fingerprints`; its
train handler takes `site_volumes` and `trainer_config`. `fedliver train`
(`client.local_training.train_locally`) runs all of it in one process, one site per center.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from client.site import SiteData
from client.trainer import TrainerConfig
from common import run_config as schema
from common.fingerprint import FingerprintConfig
from common.label_transfer_config import LabelTransferConfig
from common.phases import ordered_phases
from common.planning import PlanningConfig, plan_from_fingerprints
from common.preprocessing import PreprocessedVolume
from common.problems import Problem

#: Run-config keys of the label-transfer probabilities: location-scale, non-contrast, random-conv, transpose, bias-field.
LABEL_TRANSFER_KEYS = tuple(LabelTransferConfig().to_dict_hyphenated())


class NoLabeledVolume(ValueError):
    """No site has a usable labeled volume: nothing to plan or train on."""


def plan_for_sites(sites: Sequence[SiteData], planning: PlanningConfig,
                   problems: list[Problem] | None = None) -> dict:
    """Each site's fingerprint (from its cache where its files did not change), merged exactly, and
    the plans for all of them: what the federation's round 0 does with the fingerprints it receives.
    A bad file is a line in `problems`; NoLabeledVolume when no site has a labeled volume left."""
    config = FingerprintConfig()  # the server's request: one cache entry serves both
    fingerprints = [site.fingerprint(config, problems)[0] for site in sites]
    if sum(fp.num_labeled for fp in fingerprints) == 0:
        raise NoLabeledVolume("no usable labeled volume")
    plans, _ = plan_from_fingerprints(fingerprints, planning)
    return plans


@dataclass(frozen=True)
class SiteVolumes:
    """What the sites train on, preprocessed for one plans, pooled over the sites."""

    labeled: list[PreprocessedVolume]
    unlabeled: list[PreprocessedVolume]
    validation: list[PreprocessedVolume]  # labeled validation volumes (labeled phases): model selection, the CPS gate
    problems: list[Problem]
    labeled_phases: tuple[str, ...] = ()  # phases of the truly labeled volumes (TrainerConfig.labeled_phases)


def site_volumes(sites: Sequence[SiteData], plans: dict, *, include_unlabeled: bool, propagate_labels: bool,
                 with_validation: bool = False) -> SiteVolumes:
    """The sites' training volumes (their "train" split only) and, `with_validation`, their
    validation volumes, each preprocessed once per plans in its site's cache."""
    labeled: list[PreprocessedVolume] = []
    unlabeled: list[PreprocessedVolume] = []
    validation: list[PreprocessedVolume] = []
    problems: list[Problem] = []
    labeled_phases: list[str] = []
    for site in sites:
        volumes = site.training_volumes(plans, include_unlabeled=include_unlabeled, propagate_labels=propagate_labels)
        labeled += volumes.labeled
        unlabeled += volumes.unlabeled
        problems += volumes.problems
        labeled_phases += volumes.labeled_phases
    if with_validation:  # after every site's training volumes: the problems read in that order
        for site in sites:
            volumes = site.validation_volumes(plans)
            validation += volumes.labeled
            problems += volumes.problems
    return SiteVolumes(labeled, unlabeled, validation, problems, ordered_phases(labeled_phases))


def _axes(value: Any) -> tuple[int, ...]:
    """Mirror axes as the run config writes them ("0,1,2") or already parsed."""
    return schema.parse_mirror_axes(value) if isinstance(value, str) else tuple(int(a) for a in value)


def trainer_config(settings: Mapping[str, object], **fields: Any) -> TrainerConfig:
    """The TrainerConfig of run-config-named `settings` (a train message's config, or `fedliver
    train`'s options under their run-config names; a missing key takes the schema's default), with
    `fields` for what no run-config key says as such (device, the round's seed and ramp-up, the
    site's truly labeled phases: `SiteVolumes.labeled_phases`, which run config `labeled-phases`
    only selects from the data, ...). The one place that maps run-config names to trainer fields."""
    def get(key: str) -> Any:
        return settings[key] if key in settings else schema.default(key)

    mapped: dict[str, Any] = dict(
        mode=str(get("mode")),
        batch_size=int(get("batch-size")),
        unlabeled_batch_size=int(get("unlabeled-batch-size")),
        learning_rate=float(get("learning-rate")),
        lambda_max=float(get("cps-lambda-max")),
        proximal_mu=float(get("proximal-mu")),
        cps_confidence=float(get("cps-confidence")),
        cps_strong_view=bool(get("cps-strong-view")),
        balance_phases=bool(get("balance-phases")),
        mirror_axes=_axes(get("mirror-axes")),
        label_transfer=LabelTransferConfig.from_hyphenated({key: get(key) for key in LABEL_TRANSFER_KEYS}),
        seed=int(get("seed")),
    )
    return TrainerConfig(**{**mapped, **fields})


__all__ = ["LABEL_TRANSFER_KEYS", "NoLabeledVolume", "SiteVolumes", "plan_for_sites", "site_volumes",
           "trainer_config"]
