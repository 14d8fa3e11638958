"""The run configuration of a federation, read from Flower's run config (pyproject `[tool.flwr.app.config]`).

Both apps read it: the ServerApp for the schedule and aggregation, the ClientApp for its local
trainer, so it lives in `common`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from common.aggregation_config import AggregationConfig
from common.label_transfer_config import DEFAULT_LABEL_TRANSFER, LabelTransferConfig
from common.phases import parse_phase_list
from common.postprocessing import Postprocessing

ROLES = ("train", "eval")

#: `init-weights` value for the shipped pretraining of the CPU net (STU-Net T, first-stage width 4: a
#: pair pretrained on the multi-sequence public phantom set, `simulations/pretrain.py`), as the demo
#: and `fedliver train` start from; any other size starts from random weights.
AUTO_INIT = "auto"
SHIPPED_PRETRAINING = Path("simulations") / "pretrained" / "stunet_T4_multiseq.safetensors"


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


@dataclass(frozen=True)
class FederationConfig:
    data_root: Path | None
    run_dir: Path
    sites: tuple[SiteAssignment, ...]
    num_rounds: int = 5
    local_iterations: int = 30
    evaluate_every: int = 1
    net_size: str = "T"
    base_width: int | None = None  # None: the size's published width
    patch_size: tuple[int, int, int] = (32, 64, 64)
    batch_size: int = 2
    unlabeled_batch_size: int = 2
    learning_rate: float = 0.01
    mode: str = "cps"
    cps_lambda_max: float = 1.0
    cps_rampup_rounds: int = 2
    cps_confidence: float = 0.0  # cross term only where the teacher's softmax exceeds this (0: all voxels)
    cps_gate: float = 0.0  # cross term off until the validation GED4 Dice of the last round reaches this
    balance_phases: bool = True  # batches draw a phase first, then a volume
    propagate_labels: bool = True  # labeled cases' other phases train under their GED4 mask (scanner coordinates)
    label_transfer: LabelTransferConfig = DEFAULT_LABEL_TRANSFER  # augmentations of labeled samples
    weighted_by: str = "labeled"
    proximal_mu: float = 0.0
    server_momentum: float = 0.0
    local_norm: bool = False
    local_momentum: bool = False  # sites keep their SGD momentum between rounds (context.state)
    fp16_transport: bool = False
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)  # strategy, DP, int8 updates
    min_train_nodes: int = 1
    round_timeout_s: float = 3600.0
    node_wait_s: float = 300.0
    init_weights: str = ""
    evaluate_step: float = 0.5  # sliding-window step (fraction of the patch) for evaluation
    postprocessing: Postprocessing = Postprocessing()  # largest liver component on GED4 predictions
    evaluate_train_sites: bool = True  # training sites also score their test split (validation: always)
    evaluate_phases: tuple[str, ...] | None = None  # phases of test cases scored (None: all); sent to sites
    agreement_volumes: int = 1  # unlabeled volumes per phase for the branch-agreement signal
    device: str = "auto"  # sites' torch device (node config `device` overrides; resolved by the ClientApp)
    seed: int = 0

    @property
    def total_iterations(self) -> int:
        return self.num_rounds * self.local_iterations

    @property
    def rampup_iterations(self) -> int:
        return self.cps_rampup_rounds * self.local_iterations

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object]) -> FederationConfig:
        def get(key: str, default: object) -> object:
            return run_config.get(key, default)

        data_root = str(get("data-root", ""))
        run_dir = str(get("run-dir", "")) or "runs/federation"
        weighted_by = str(get("weighted-by", "labeled"))
        if weighted_by not in ("labeled", "samples", "uniform"):
            raise ValueError(f"weighted-by must be labeled, samples or uniform, got {weighted_by!r}")
        mode = str(get("mode", "cps"))
        if mode not in ("cps", "supervised"):
            raise ValueError(f"mode must be cps or supervised, got {mode!r}")
        return cls(
            data_root=Path(data_root).resolve() if data_root else None,
            run_dir=Path(run_dir).resolve(),
            sites=tuple(parse_sites(str(get("sites", "")))),
            num_rounds=int(get("num-server-rounds", 5)),
            local_iterations=int(get("local-iterations", 30)),
            evaluate_every=max(1, int(get("evaluate-every", 1))),
            net_size=str(get("net-size", "T")),
            base_width=int(get("net-width", 0)) or None,
            patch_size=parse_patch(str(get("patch-size", "32,64,64"))),
            batch_size=int(get("batch-size", 2)),
            unlabeled_batch_size=int(get("unlabeled-batch-size", 2)),
            learning_rate=float(get("learning-rate", 0.01)),
            mode=mode,
            cps_lambda_max=float(get("cps-lambda-max", 1.0)),
            cps_rampup_rounds=int(get("cps-rampup-rounds", 2)),
            cps_confidence=float(get("cps-confidence", 0.0)),
            cps_gate=float(get("cps-gate", 0.0)),
            balance_phases=bool(get("balance-phases", True)),
            propagate_labels=bool(get("propagate-labels", True)),
            label_transfer=LabelTransferConfig.from_hyphenated(run_config, DEFAULT_LABEL_TRANSFER),
            weighted_by=weighted_by,
            proximal_mu=float(get("proximal-mu", 0.0)),
            server_momentum=float(get("server-momentum", 0.0)),
            local_norm=bool(get("local-norm", False)),
            local_momentum=bool(get("local-momentum", False)),
            fp16_transport=bool(get("fp16-transport", False)),
            aggregation=AggregationConfig.from_run_config(run_config),
            min_train_nodes=int(get("min-train-nodes", 1)),
            round_timeout_s=float(get("round-timeout", 3600.0)),
            node_wait_s=float(get("node-wait", 300.0)),
            init_weights=str(get("init-weights", "")),
            evaluate_step=float(get("evaluate-step", 0.5)),
            postprocessing=Postprocessing.parse(str(get("postprocessing", "largest-component")),
                                                str(get("postprocessing-phases", "GED4"))),
            evaluate_train_sites=bool(get("evaluate-train-sites", True)),
            evaluate_phases=parse_phase_list(str(get("evaluate-phases", "*")), "evaluate-phases"),
            agreement_volumes=int(get("agreement-volumes", 1)),
            device=str(get("device", "auto")),
            seed=int(get("seed", 0)),
        )
