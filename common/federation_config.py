"""The run configuration of a federation, read from Flower's run config (pyproject `[tool.flwr.app.config]`).

Both apps read it: the ServerApp for the schedule and aggregation, the ClientApp for its local
trainer, so it lives in `common`. The keys, their types and defaults are declared once, in
`common/run_config.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from common.aggregation_config import AggregationConfig
from common.label_transfer_config import LabelTransferConfig
from common.phases import parse_labeled_phases, parse_phase_list
from common.postprocessing import Postprocessing
from common.run_config import parse_mirror_axes
from common.run_config import validate as validate_run_config

ROLES = ("train", "eval")

#: `init-weights` value for the shipped pretraining of the CPU net (STU-Net T, first-stage width 4: a
#: pair pretrained on the multi-sequence public phantom set, `simulations/pretrain.py`), as the demo
#: and `fedliver train` start from; any other size starts from random weights.
AUTO_INIT = "auto"
SHIPPED_PRETRAINING = Path("simulations") / "pretrained" / "stunet_T4_synth.safetensors"


def shipped_pretraining() -> Path | None:
    """The shipped file, or None. Looked up along sys.path and in the source folder of an editable
    install: the app bundle a deployed ServerApp runs from never carries it (Flower bundles no
    .safetensors), the coordinator's fedliver installation does."""
    import json
    import sys
    from importlib import metadata

    roots = [Path(p or ".") for p in sys.path]
    try:  # `pip install -e .`: direct_url.json names the source folder
        url = json.loads(metadata.distribution("fedliver").read_text("direct_url.json") or "{}").get("url", "")
        if url.startswith("file://"):
            roots.append(Path(url[len("file://"):]))
    except (metadata.PackageNotFoundError, ValueError):
        pass
    roots.append(Path(__file__).resolve().parents[1])
    return next(((root / SHIPPED_PRETRAINING).resolve() for root in roots if (root / SHIPPED_PRETRAINING).is_file()), None)


def resolve_init_weights(value: str, net_size: str, base_width: int | None) -> tuple[Path | None, str]:
    """(file to start from, None for random weights; one line saying which and why) for an
    `init-weights` value: "auto", "" / "none" (random), or a checkpoint path. ValueError when the
    file is missing."""
    value = str(value).strip()
    if value.lower() in ("", "none", "random"):
        return None, "random (init-weights is empty)"
    if value.lower() == AUTO_INIT:
        if net_size != "T" or base_width != 4:
            return None, f"random (init-weights auto: no shipped pretraining for STU-Net {net_size} width {base_width})"
        found = shipped_pretraining()
        if found is None:
            raise ValueError(f"init-weights auto: {SHIPPED_PRETRAINING} not found in the fedliver installation "
                             "of this host; give a checkpoint path or \"none\"")
        return found, f"{found} (shipped pretraining, init-weights auto)"
    path = Path(value).expanduser()
    if not path.exists():
        raise ValueError(f"init-weights {value}: not found on this host")
    return path.resolve(), f"{path.resolve()} (init-weights)"


@dataclass(frozen=True)
class SiteAssignment:
    """A hospital and what it does in the federation."""

    site: str
    role: str  # "train" (local CPS, sends updates) or "eval" (held out: evaluates only)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"site {self.site}: role must be one of {ROLES}, got {self.role!r}")


def parse_sites(text: str) -> list[SiteAssignment]:
    """`"A:train,B1:train,C:eval"` -> assignments, in partition-id order."""
    assignments = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        site, _, role = item.partition(":")
        assignments.append(SiteAssignment(site.strip(), (role or "train").strip()))
    if len({a.site for a in assignments}) != len(assignments):
        raise ValueError(f"sites repeat in {text!r}")
    return assignments


def parse_patch(text: str) -> tuple[int, int, int]:
    values = tuple(int(v) for v in str(text).replace("x", ",").split(","))
    if len(values) != 3:
        raise ValueError(f"patch size needs 3 values (z,y,x), got {text!r}")
    return values  # type: ignore[return-value]


def parse_spacing(text: str) -> tuple[float, float, float] | None:
    """Run config `target-spacing`: "" (the planner's) or "z,y,x" in mm."""
    if not str(text).strip():
        return None
    values = tuple(float(v) for v in str(text).replace("x", ",").split(","))
    if len(values) != 3 or not all(v > 0 for v in values):
        raise ValueError(f"target-spacing needs 3 positive values (z,y,x mm) or \"\", got {text!r}")
    return values  # type: ignore[return-value]


WEIGHTINGS = ("labeled", "samples", "uniform")
MODES = ("cps", "supervised")


@dataclass(frozen=True)
class FederationConfig:
    """The run config, parsed; built by `from_run_config`, whose defaults are the schema's
    (common/run_config.py): no field has a default of its own."""

    data_root: Path | None
    run_dir: Path
    sites: tuple[SiteAssignment, ...]
    num_rounds: int
    local_iterations: int
    evaluate_every: int
    net_size: str
    base_width: int | None  # None: the size's published width
    patch_size: tuple[int, int, int]
    target_spacing: tuple[float, float, float] | None  # None: the planner's (median) spacing
    batch_size: int
    unlabeled_batch_size: int
    learning_rate: float
    mode: str
    cps_lambda_max: float
    cps_rampup_rounds: int
    cps_confidence: float  # cross term only where the teacher's softmax exceeds this (0: all voxels)
    cps_strong_view: bool  # students see unlabeled samples through a label-free intensity view
    cps_gate: float  # cross term off until the validation Dice (labeled phases) of the last round reaches this
    balance_phases: bool  # batches draw a phase first, then a volume
    propagate_labels: bool  # labeled cases' other phases train under their labeled phase's mask (scanner coordinates)
    labeled_phases: tuple[str, ...] | None  # phases whose masks are labels (None: "auto", each site's masked phases)
    mirror_axes: tuple[int, ...]  # patch axes nnU-Net's mirroring augmentation flips
    label_transfer: LabelTransferConfig  # augmentations of labeled samples
    weighted_by: str
    proximal_mu: float
    server_momentum: float
    local_norm: bool
    local_momentum: bool  # sites keep their SGD momentum between rounds (context.state)
    fp16_transport: bool
    aggregation: AggregationConfig  # strategy, DP, int8 updates
    min_train_nodes: int
    round_timeout_s: float
    node_wait_s: float
    init_weights: str
    evaluate_step: float  # sliding-window step (fraction of the patch) for evaluation
    postprocessing: Postprocessing  # e.g. the largest liver component on GED4 predictions
    evaluate_train_sites: bool  # training sites also score their test split (validation: always)
    evaluate_phases: tuple[str, ...] | None  # phases of test cases scored (None: all); sent to sites
    agreement_volumes: int  # unlabeled volumes per phase for the branch-agreement signal
    device: str  # sites' torch device (node config `device` overrides; resolved by the ClientApp)
    seed: int

    @property
    def total_iterations(self) -> int:
        return self.num_rounds * self.local_iterations

    @property
    def rampup_iterations(self) -> int:
        return self.cps_rampup_rounds * self.local_iterations

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object]) -> FederationConfig:
        """Checked against the schema first: an unknown key (with the nearest valid one) or a value
        of the wrong type is a one-line ValueError. A missing key takes the schema's default."""
        v = validate_run_config(run_config)
        if v["weighted-by"] not in WEIGHTINGS:
            raise ValueError(f"weighted-by must be labeled, samples or uniform, got {v['weighted-by']!r}")
        if v["mode"] not in MODES:
            raise ValueError(f"mode must be cps or supervised, got {v['mode']!r}")
        return cls(
            data_root=Path(v["data-root"]).resolve() if v["data-root"] else None,
            run_dir=Path(v["run-dir"] or "runs/federation").resolve(),
            sites=tuple(parse_sites(v["sites"])),
            num_rounds=v["num-server-rounds"],
            local_iterations=v["local-iterations"],
            evaluate_every=max(1, v["evaluate-every"]),
            net_size=v["net-size"],
            base_width=v["net-width"] or None,
            patch_size=parse_patch(v["patch-size"]),
            target_spacing=parse_spacing(v["target-spacing"]),
            batch_size=v["batch-size"],
            unlabeled_batch_size=v["unlabeled-batch-size"],
            learning_rate=v["learning-rate"],
            mode=v["mode"],
            cps_lambda_max=v["cps-lambda-max"],
            cps_rampup_rounds=v["cps-rampup-rounds"],
            cps_confidence=v["cps-confidence"],
            cps_strong_view=v["cps-strong-view"],
            cps_gate=v["cps-gate"],
            balance_phases=v["balance-phases"],
            propagate_labels=v["propagate-labels"],
            labeled_phases=parse_labeled_phases(v["labeled-phases"]),
            mirror_axes=parse_mirror_axes(v["mirror-axes"]),
            label_transfer=LabelTransferConfig.from_hyphenated(v),
            weighted_by=v["weighted-by"],
            proximal_mu=v["proximal-mu"],
            server_momentum=v["server-momentum"],
            local_norm=v["local-norm"],
            local_momentum=v["local-momentum"],
            fp16_transport=v["fp16-transport"],
            aggregation=AggregationConfig.from_run_config(v),
            min_train_nodes=v["min-train-nodes"],
            round_timeout_s=v["round-timeout"],
            node_wait_s=v["node-wait"],
            init_weights=v["init-weights"],
            evaluate_step=v["evaluate-step"],
            postprocessing=Postprocessing.parse(v["postprocessing"], v["postprocessing-phases"]),
            evaluate_train_sites=v["evaluate-train-sites"],
            evaluate_phases=parse_phase_list(v["evaluate-phases"], "evaluate-phases"),
            agreement_volumes=v["agreement-volumes"],
            device=v["device"],
            seed=v["seed"],
        )
