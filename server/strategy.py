"""Aggregation of the CPS pair through Flower's own strategies (`flwr.serverapp.strategy`).

The federation keeps its own loop (fingerprint round, evaluate-only nodes, plans pinned by hash,
checkpoints, resume). Inside each round `PairAggregator` drives a Flower `Strategy`:
`configure_train` builds the round's train message (FedProx, FedOpt, FedAvgM and the DP wrappers
read or cache what they need there), the replies are decoded and screened (NaN/Inf, missing keys,
wrong shapes, no weight) in front of the strategy, and `aggregate_train` gets one reply per usable
update: an ArrayRecord with the pair (`a.*` and `b.*` keys, so Flower's per-key averaging is FedAvg
per branch) and a MetricRecord whose `num-examples` is the site's weight (`weighted-by`: labeled
volumes, all samples, or 1). FedProx's proximal term lives in the local trainer; FedBN's local
norms live in the client too (the global model carries the average of the sites' norms, which
held-out centres fall back to).

Central DP wraps the strategy in `DifferentialPrivacyServerSideFixedClipping` or
`...ClientSideFixedClipping` (the client clips with Flower's `fixedclipping_mod`; the server clips
again what it decodes, so that quantisation or a site that does not clip cannot exceed the bound).
Flower's RDP accountant is attached only where its assumptions hold (`accounting_obstacle`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.app.metadata import Metadata
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)
from flwr.serverapp.strategy.fedopt import FedOpt  # FedAdam's and FedYogi's base: m_t, v_t

from common.federation_config import FederationConfig
from common.quantization import decode_update
from common.weights import npy_array, npy_numpy, to_arrayrecord, update_problems
from server.messaging import Failure

WEIGHT_KEYS = {"labeled": "num-labeled", "samples": "num-samples"}
WEIGHT_KEY = "num-examples"  # what Flower's strategies weight by, in each reply's MetricRecord
INT8_UPDATES_KEY = "int8-updates"  # round config: sites send int8 deltas (common/quantization.py)
CLIPPING_NORM_KEY = "clipping_norm"  # what Flower's client-side DP wrapper puts in the train config

#: Strategies whose aggregation is `FedAvg.aggregate_train`: the only ones Flower accounts DP for.
PLAIN_FEDAVG = ("fedavg", "fedprox")

Log = Callable[[str], None]


@dataclass(frozen=True)
class NodeUpdate:
    node_id: int
    site: str
    arrays: dict[str, np.ndarray]
    metrics: dict[str, float]


class _Nodes:
    """The grid as `configure_train` sees it: only the training nodes (it samples all of them)."""

    def __init__(self, node_ids: Sequence[int]):
        self.node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


def base_strategy(config: FederationConfig) -> Strategy:
    """The Flower strategy named by run config `strategy`, with its run-config parameters."""
    a = config.aggregation
    # Every training node, every round; the federation picks the nodes and never waits here.
    common = {"fraction_train": 1.0, "min_train_nodes": 1, "min_evaluate_nodes": 1, "min_available_nodes": 1,
              "weighted_by_key": WEIGHT_KEY}
    fedopt = {"eta": a.fedopt_eta, "beta_1": a.fedopt_beta_1, "beta_2": a.fedopt_beta_2, "tau": a.fedopt_tau}
    builders: dict[str, Callable[[], Strategy]] = {
        "fedavg": lambda: FedAvg(**common),
        "fedavgm": lambda: FedAvgM(**common, server_learning_rate=a.server_learning_rate,
                                   server_momentum=config.server_momentum),
        "fedprox": lambda: FedProx(**common, proximal_mu=config.proximal_mu),
        "fedadam": lambda: FedAdam(**common, **fedopt),
        "fedyogi": lambda: FedYogi(**common, **fedopt),
        "fedmedian": lambda: FedMedian(**common),
        "fedtrimmedavg": lambda: FedTrimmedAvg(**common, beta=a.trimmed_beta),
        "krum": lambda: Krum(**common, num_malicious_nodes=a.num_malicious_nodes),
        "multikrum": lambda: MultiKrum(**common, num_malicious_nodes=a.num_malicious_nodes,
                                       num_nodes_to_select=a.num_nodes_to_select),
    }
    return builders[a.strategy]()


def accounting_obstacle(config: FederationConfig) -> str | None:
    """Why Flower's RDP accountant would not give a valid epsilon for this run (None: it would).

    Its model: client-level DP (one hospital's whole contribution added or removed), every site in
    every round (no sampling amplification), the Gaussian mechanism on the plain average of updates
    clipped to the clipping norm, with equal weights (noise std = multiplier x norm / sites)."""
    a = config.aggregation
    if a.dp == "none":
        return "no differential privacy (dp = none)"
    if a.dp_noise_multiplier <= 0:
        return "dp-noise-multiplier is 0: updates are clipped but no noise is added, so there is no privacy guarantee"
    if a.strategy not in PLAIN_FEDAVG:
        return (f"strategy {a.strategy}: the accountant holds only for FedAvg's averaging (fedavg, fedprox); "
                "what this strategy releases is not a clipped plain average, so the noise is not calibrated to it")
    if config.weighted_by != "uniform":
        return (f"weighted-by {config.weighted_by}: the accountant assumes equal site weights (noise calibrated to "
                "clipping-norm / sites); a heavier site moves the average more. Set weighted-by = \"uniform\"")
    return None


def _accountant(config: FederationConfig, num_train_nodes: int):  # -> RdpAccountant | str
    """Flower's RDP accountant for this run, or a one-line reason why there is none."""
    obstacle = accounting_obstacle(config)
    if obstacle is not None:
        return obstacle
    try:
        from flwr.serverapp import PrivacyConfig, RdpAccountant
        from flwr.supercore.privacy_accounting import NeighboringRelation, SamplingMethod

        return RdpAccountant(PrivacyConfig(
            target_delta=config.aggregation.dp_delta, population_size=num_train_nodes,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION))
    except ImportError:
        return "Flower's accountant needs the dp-accounting package (pip install \"flwr[dp]\"), not installed here"


def build_strategy(config: FederationConfig, num_train_nodes: int = 1) -> Strategy:
    """`base_strategy`, wrapped in Flower's central-DP wrapper if run config `dp` asks for one (with
    the RDP accountant where `accounting_obstacle` finds none). `num_train_nodes`: sites per round."""
    strategy = base_strategy(config)
    a = config.aggregation
    if a.dp == "none":
        return strategy
    accountant = _accountant(config, num_train_nodes)
    wrapper = (DifferentialPrivacyServerSideFixedClipping if a.dp == "server-fixed"
               else DifferentialPrivacyClientSideFixedClipping)
    return wrapper(strategy, a.dp_noise_multiplier, a.dp_clipping_norm, num_train_nodes,
                   accountant=None if isinstance(accountant, str) else accountant)


def _reply(node_id: int, arrays: ArrayRecord, weight: float) -> Message:
    """A train reply as Flower's strategies expect it: one ArrayRecord, one MetricRecord with the weight."""
    metadata = Metadata(run_id=0, message_id=uuid.uuid4().hex, src_node_id=node_id, dst_node_id=0,
                        reply_to_message_id="", group_id="", created_at=time.time(), ttl=0.0,
                        message_type=MessageType.TRAIN)
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({WEIGHT_KEY: float(weight)})})
    return Message(content=content, metadata=metadata)


def _norm(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of the update over all keys: a BLAS dot per tensor (float32, a few 1e-5 relative at
    STU-Net B's sizes), summed in float64; no float64 copy of a 116 M-value pair."""
    total = 0.0
    for key in reference:
        delta = (np.asarray(arrays[key], np.float32) - reference[key]).ravel()
        total += float(np.dot(delta, delta))
    return float(np.sqrt(total))


def _nonzero_delta(update: NodeUpdate, current: Mapping[str, np.ndarray]) -> NodeUpdate:
    """Flower 1.42's server-side clipping divides the clipping norm by the update's norm: an update
    equal to the model sent (a stale site, fp32 transport) would stop the run with ZeroDivisionError.
    Such an update gets its largest weight moved by one float32 step (whose square does not vanish
    in float32), which clipping then leaves as it is."""
    if any(np.any(update.arrays[k] != current[k]) for k in current):
        return update
    arrays = dict(update.arrays)
    key = next((k for k in current if arrays[k].size and np.abs(arrays[k]).max() >= 1e-6), next(iter(current)))
    arrays[key] = np.array(arrays[key], np.float32)
    index = int(np.argmax(np.abs(arrays[key])))
    value = arrays[key].flat[index]
    arrays[key].flat[index] = np.nextafter(value, np.float32(np.inf)) if abs(value) >= 1e-6 else value + np.float32(1e-12)
    return NodeUpdate(update.node_id, update.site, arrays, update.metrics)


class PairAggregator:
    """What the federation calls each round; the strategy itself is Flower's (`build_strategy`)."""

    def __init__(self, config: FederationConfig, num_train_nodes: int, log: Log = print):
        self.config = config
        self.settings = config.aggregation
        self.weighted_by = config.weighted_by
        self.num_train_nodes = num_train_nodes
        self.log = log
        self.strategy = build_strategy(config, num_train_nodes)
        self.base: Strategy = getattr(self.strategy, "strategy", self.strategy)  # inside a DP wrapper
        self.accountant = getattr(self.strategy, "accountant", None)
        self.privacy_note = None if self.accountant is not None else (
            accounting_obstacle(config) or _accountant(config, num_train_nodes))
        self.reference: dict[str, np.ndarray] = {}  # the model as the sites received it this round
        self._momentum: dict[str, np.ndarray] = {}  # FedAvgM buffer restored, until the key order is known
        self.last_round: dict = {}

    # ------------------------------------------------------------------------------ one round
    def configure(self, server_round: int, current: Mapping[str, np.ndarray], config: ConfigRecord,
                  node_ids: Sequence[int]) -> RecordDict:
        """The train message content for `node_ids`, built by the strategy's `configure_train`:
        the pair (as the transport sends it) and the round config with what the strategy adds."""
        self._prepare_state(current)
        round_config = ConfigRecord({**dict(config), INT8_UPDATES_KEY: self.settings.int8_updates})
        current_record = to_arrayrecord(current)  # float32: what FedOpt/FedAvgM/DP take as "current"
        messages = list(self.strategy.configure_train(server_round, current_record, round_config, _Nodes(node_ids))
                        ) if node_ids else []
        content = messages[0].content if messages else RecordDict({"arrays": current_record, "config": round_config})
        sent = to_arrayrecord(current, fp16=self.config.fp16_transport)
        self.reference = decode_update(sent, current)
        return RecordDict({"arrays": sent, "config": content["config"]})

    def decode(self, record: ArrayRecord) -> dict[str, np.ndarray]:
        """A reply's arrays as float32 (int8 deltas against the model sent); one-line ValueError."""
        return decode_update(record, self.reference)

    def weight(self, update: NodeUpdate) -> float:
        if self.weighted_by == "uniform":
            return 1.0
        return float(update.metrics.get(WEIGHT_KEYS[self.weighted_by], 0.0))

    def screen(
        self, updates: Sequence[NodeUpdate], reference: Mapping[str, np.ndarray]
    ) -> tuple[list[NodeUpdate], list[Failure]]:
        """Split updates into usable ones and rejections (NaN/Inf, missing keys, wrong shapes, no weight)."""
        accepted, rejected = [], []
        for update in updates:
            problems = update_problems(update.arrays, reference)
            if not problems and self.weight(update) <= 0:
                problems = [f"aggregation weight {self.weighted_by!r} is {self.weight(update)}"]
            if problems:
                rejected.append(Failure(update.node_id, update.site, "update rejected: " + "; ".join(problems[:3])))
            else:
                accepted.append(update)
        return accepted, rejected

    def aggregate(self, server_round: int, current: Mapping[str, np.ndarray], updates: Sequence[NodeUpdate]
                  ) -> dict[str, np.ndarray]:
        """The next global model from screened updates (the current one if the strategy releases none)."""
        # Each update's L2 distance from the model the sites received: where a DP clipping norm bites.
        norms = {u.site: round(_norm(u.arrays, self.reference or current), 6) for u in updates}
        clipped = self._enforce_client_clipping(updates) if self.settings.dp == "client-fixed" else []
        if self.settings.dp == "server-fixed":
            updates = [_nonzero_delta(u, current) for u in updates]
        replies = [_reply(u.node_id, ArrayRecord({k: npy_array(np.asarray(u.arrays[k], np.float32)) for k in current}),
                          self.weight(u)) for u in updates]
        arrays, _ = self.strategy.aggregate_train(server_round, replies)
        self.last_round = {"strategy": self.settings.strategy, "aggregated_sites": sorted(u.site for u in updates),
                           "update_norms": norms}
        if clipped:
            self.last_round["clipped_on_server"] = clipped
        if arrays is None:
            if updates:
                self.log(f"round {server_round}: the strategy released no model "
                         f"({len(updates)} of {self.num_train_nodes} sites); the global model stays as it was")
            self.last_round["released"] = False
            new = dict(current)
        else:
            self.last_round["released"] = True
            new = {k: npy_numpy(arrays[k]).astype(np.float32, copy=False) for k in current}
        if self.settings.dp != "none":
            self.last_round["privacy"] = self.privacy()
        return new

    def _enforce_client_clipping(self, updates: Sequence[NodeUpdate]) -> list[str]:
        """Client-side DP: clip again what the server decoded (fp16/int8 rounding can push a clipped
        update a hair over the norm; a hostile site need not clip at all). Returns the sites over 1%."""
        from flwr.supercore.differential_privacy import compute_clip_model_update

        norm_bound, over = self.settings.dp_clipping_norm, []
        for update in updates:
            norm = _norm(update.arrays, self.reference)
            if norm > norm_bound:
                keys = list(self.reference)
                values = [update.arrays[k] for k in keys]
                compute_clip_model_update(values, [self.reference[k] for k in keys], norm_bound)
                update.arrays.update({k: np.asarray(v, np.float32) for k, v in zip(keys, values)})
                if norm > 1.01 * norm_bound:
                    over.append(update.site)
                    self.log(f"WARNING site {update.site}: update norm {norm:.4g} exceeds dp-clipping-norm "
                             f"{norm_bound:g} (the site did not clip); clipped on the server")
        return over

    # ------------------------------------------------------------------------------ reporting
    def privacy(self) -> dict:
        """Central DP of the run so far: epsilon at the stated delta where Flower's accountant holds,
        else `epsilon` None and the reason in `note`."""
        a = self.settings
        info: dict = {"dp": a.dp, "noise_multiplier": a.dp_noise_multiplier, "clipping_norm": a.dp_clipping_norm,
                      "noise_std": a.dp_noise_multiplier * a.dp_clipping_norm / max(1, self.num_train_nodes),
                      "sites": self.num_train_nodes}
        if a.dp == "none":
            return {**info, "epsilon": None, "delta": None, "note": self.privacy_note}
        if self.accountant is None:
            return {**info, "epsilon": None, "delta": a.dp_delta, "note": f"not accounted: {self.privacy_note}"}
        spent = self.accountant.get_privacy_spent()
        return {**info, "epsilon": spent.epsilon if spent.num_releases else 0.0, "delta": spent.delta,
                "releases": spent.num_releases, "accounting": f"{spent.accounting_method}, client-level "
                "(one site's whole contribution), no sampling amplification", "note": None}

    def describe(self) -> dict:
        """For report.json: which Flower class aggregates, and what protects the updates."""
        a = self.settings
        return {"strategy": a.strategy, "flower_class": type(self.base).__name__,
                "dp_wrapper": type(self.strategy).__name__ if a.dp != "none" else None,
                "weighted_by": self.weighted_by, "int8_updates": a.int8_updates, "fp16_transport": self.config.fp16_transport,
                "adversarial_sites": {s: v.kind for s, v in a.adversarial.items()}, "privacy": self.privacy()}

    def summary_line(self) -> str:
        a = self.settings
        text = f"Flower {type(self.base).__name__} ({a.strategy}), weighted by {self.weighted_by}"
        if a.dp != "none":
            accounted = "RDP accountant on" if self.accountant is not None else f"not accounted: {self.privacy_note}"
            text += (f"; central DP {a.dp} (noise multiplier {a.dp_noise_multiplier:g}, clipping norm "
                     f"{a.dp_clipping_norm:g}, {accounted})")
        if a.int8_updates:
            text += "; sites send int8 deltas"
        if a.adversarial:
            text += "; simulated adversarial sites " + ", ".join(f"{s}:{v.kind}" for s, v in a.adversarial.items())
        return text

    # ------------------------------------------------------------------------------ resume
    def _prepare_state(self, current: Mapping[str, np.ndarray]) -> None:
        if isinstance(self.base, FedAvgM):
            # Its "current" is the model the federation holds (the checkpoint after a resume), never a
            # copy the strategy kept from before DP noise or a skipped round.
            self.base.current_arrays = None
            if self._momentum:
                self.base.momentum_vector = [self._momentum[k] for k in current]
                self._momentum = {}

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """What resuming needs: the strategy's buffers (FedAvgM momentum, FedAdam/FedYogi moments)
        as arrays, and its name and the DP accountant's ledger as JSON-able info."""
        arrays: dict[str, np.ndarray] = {}
        base = self.base
        if isinstance(base, FedAvgM) and base.momentum_vector is not None and base.current_arrays is not None:
            arrays.update({f"momentum.{k}": np.asarray(v) for k, v in zip(base.current_arrays.keys(), base.momentum_vector)})
        arrays.update({f"momentum.{k}": v for k, v in self._momentum.items()})
        if isinstance(base, FedOpt):
            for name in ("m_t", "v_t"):
                arrays.update({f"{name}.{k}": np.asarray(v) for k, v in (getattr(base, name) or {}).items()})
        info: dict = {"strategy": self.settings.strategy}
        if self.accountant is not None:
            info["accountant"] = self.accountant.state_dict()
        return arrays, info

    def load_state(self, arrays: Mapping[str, np.ndarray], info: Mapping, *, last_round: int | None = None) -> None:
        """Restore `state()` from a checkpoint; state of another strategy is ignored (said in the log).
        State saved after `last_round` (a crash between the two writes of a checkpoint) is used, and
        said: the accountant then counts one release too many, which errs on the safe side."""
        saved_round = info.get("round")
        if last_round is not None and saved_round is not None and int(saved_round) != last_round:
            self.log(f"WARNING strategy state is from round {saved_round}, the run resumes after round {last_round}")
        saved = info.get("strategy", "fedavgm" if arrays else self.settings.strategy)  # old runs: FedAvgM buffer only
        if saved != self.settings.strategy and arrays:
            self.log(f"WARNING strategy state of {saved} ignored: this run aggregates with {self.settings.strategy}")
            arrays = {}
        split: dict[str, dict[str, np.ndarray]] = {}
        for key, value in arrays.items():
            name, _, param = key.partition(".")
            split.setdefault(name, {})[param] = np.asarray(value)
        if isinstance(self.base, FedAvgM):
            self._momentum = split.get("momentum", {})
        if isinstance(self.base, FedOpt):
            self.base.m_t = split.get("m_t") or None
            self.base.v_t = split.get("v_t") or None
        if "accountant" in info and self.accountant is not None:
            try:
                self.accountant.load_state_dict(dict(info["accountant"]))
            except ValueError as error:
                raise ValueError(f"strategy state: the DP accountant of this run folder cannot continue: {error}") from None
