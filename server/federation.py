"""The federation as the coordinator runs it, round by round.

    identify nodes -> round 0: federated planning (fingerprints -> merged -> plans, pinned by hash)
    -> rounds 1..N: local CPS at training sites -> screen + FedAvg per branch
                    -> evaluation of the global pair on cases no site trains on: training sites'
                       validation cases on their labeled phases (select checkpoints/best) and test
                       splits, held-out centres'
                       every case (per phase) -> checkpoint
    -> report.json, metrics.csv, plots

Resuming a run folder continues after its last complete round with the same numbering.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp import Grid

from common.federation_config import FederationConfig, resolve_init_weights
from common.hashing import sha256_file
from common.fingerprint import FingerprintConfig, SiteFingerprint
from common.model_dir import read_manifest
from common.names import BRANCHES, CONFIGURATION
from common.phases import labeled_phases_text, ordered_phases
from common.planning import PlanningConfig, plan_from_fingerprints, plans_hash
from common.pretrained import load_initial_weights
from common.stunet import build_stunet_from_plans
from common.weights import flatten, record_nbytes, to_arrayrecord
from server.checkpoints import RunFolder, ServerState
from server.messaging import Failure, NodeInfo, broadcast, identify_while_waiting
from server.plots import plot_run
from server.report import (NO_VALIDATION, build_report, evaluation_entry, format_table, selection_phases,
                           selection_score, training_labeled_phases, validation_name, write_report)
from server.round_cost import SiteWaitGrid
from server.strategy import NodeUpdate, PairAggregator

Log = Callable[[str], None]

# A SuperNode restarted after a crash is refused by the SuperLink until the dead one's heartbeat
# expires (Flower 1.42: 30 s interval x patience 2, so up to 60 s after its last heartbeat): a
# training site that is not connected when a round starts gets this long (at most node-wait) to
# come back, once per absence; after that rounds go on without it until it is connected again.
REJOIN_WAIT_S = 90.0

#: Keys of the messages' config records that are not run-config keys (common/run_config.py): what
#: the protocol or this round says. Every other key a site reads travels under its run-config name.
PROTOCOL_KEYS = {
    "server-round": "the round (Flower's strategies set it too)",
    "plans-json": "the federation's plans (round 0's merged fingerprints)",
    "plans-sha256": "their hash: a site refuses plans that hash otherwise",
    "cps-enabled": "the CPS cross term this round (cps-gate, judged on the validation scores)",
    "evaluate-test": "evaluate messages: training sites score their test split this time",
    "clipping_norm": "Flower's client-side DP wrapper: the norm the site clips its update to",
}


def round_config(c: FederationConfig, server_round: int, plans_json: str, digest: str, *,
                 cps_enabled: bool = True) -> ConfigRecord:
    """The config of a round's train and evaluate messages: the run-config keys the sites read,
    under their schema names and with their values (a site derives its iteration numbers, CPS
    ramp-up and seed of the round from them), plus the PROTOCOL_KEYS."""
    return ConfigRecord(
        {
            "server-round": server_round,
            "plans-json": plans_json,
            "plans-sha256": digest,
            "cps-enabled": cps_enabled,
            "num-server-rounds": c.num_rounds,
            "local-iterations": c.local_iterations,
            "mode": c.mode,
            "batch-size": c.batch_size,
            "unlabeled-batch-size": c.unlabeled_batch_size,
            "learning-rate": c.learning_rate,
            "cps-lambda-max": c.cps_lambda_max,
            "cps-rampup-rounds": c.cps_rampup_rounds,
            "cps-confidence": c.cps_confidence,
            "cps-strong-view": c.cps_strong_view,
            "balance-phases": c.balance_phases,
            "propagate-labels": c.propagate_labels,
            "labeled-phases": labeled_phases_text(c.labeled_phases),
            "mirror-axes": ",".join(str(a) for a in c.mirror_axes),
            **c.label_transfer.to_dict_hyphenated(),
            "proximal-mu": c.proximal_mu,
            "local-norm": c.local_norm,
            "local-momentum": c.local_momentum,
            "fp16-transport": c.fp16_transport,
            "seed": c.seed,
            "evaluate-step": c.evaluate_step,
            "evaluate-phases": ",".join(c.evaluate_phases or ("*",)),  # phases whose test cases are scored
            "postprocessing": c.postprocessing.method,
            "postprocessing-phases": c.postprocessing.to_info()["phases"],
            "agreement-volumes": c.agreement_volumes,
        }
    )


class Federation:
    def __init__(self, grid: Grid, config: FederationConfig, log: Log = print):
        self.grid = SiteWaitGrid(grid)  # times the waits on sites: round entries' "server" cost
        self.config = config
        self.log = log
        self.run = RunFolder(config.run_dir)
        self.nodes: dict[int, NodeInfo] = {}
        self._said_no_validation = False
        self._absent: set[int] = set()  # training nodes waited for once and not connected since
        self.init_path: Path | None = None  # resolved from init-weights by run_all

    # ------------------------------------------------------------------------------ nodes
    def identify_nodes(self) -> None:
        expected = {a.site: a.role for a in self.config.sites}
        replies, failures = identify_while_waiting(
            self.grid, list(expected), self.config.min_train_nodes, self.config.node_wait_s,
            self.config.round_timeout_s, self.log)
        for node_id, reply in sorted(replies.items()):
            identity = reply.content["identity"]
            counts = reply.content["counts"]
            site, role = str(identity["site"]), str(identity["role"])
            if "error" in identity:  # the node answered but cannot take part (its data, mostly)
                failures.append(Failure(node_id, site, f"cannot take part: {identity['error']}"))
                continue
            if expected and expected.get(site, role) != role:
                self.log(f"WARNING site {site}: the node says role {role}, the run's sites say "
                         f"{expected[site]}; the node's role applies")
            elif expected and site not in expected:
                self.log(f"WARNING site {site} (node {node_id}) is not in the run's sites "
                         f"({', '.join(expected)}); it takes part as {role}")
        self._report_failures(failures)
        for node_id, reply in replies.items():
            identity = reply.content["identity"]
            counts = reply.content["counts"]
            if "error" in identity:
                continue
            info = NodeInfo(node_id, str(identity["site"]), str(identity["role"]),
                            validation_cases=int(counts.get("validation-cases", 0)),
                            test_cases=int(counts.get("test-cases", 0)),
                            labeled_phases=ordered_phases(str(identity.get("labeled-phases", "")).split(",")))
            self.nodes[node_id] = info
            labeled = f"labeled {'+'.join(info.labeled_phases)}, " if info.labeled_phases else ""
            self.log(
                f"node {node_id}: site {info.site} ({info.role}), {int(counts['cases'])} cases "
                f"({info.validation_cases} validation, {info.test_cases} test), {labeled}"
                f"{int(counts['labeled-volumes'])} labeled / {int(counts['unlabeled-volumes'])} unlabeled volumes, "
                f"{int(counts['problems'])} input problems"
            )
        if len(self.training_nodes) < self.config.min_train_nodes:  # one line, with the first reason
            why = f": {failures[0]}" if failures else ""
            if len(failures) > 1:
                why += f" (and {len(failures) - 1} more above)"
            raise RuntimeError(f"{len(self.training_nodes)} training nodes, {self.config.min_train_nodes} required{why}")

    @property
    def training_nodes(self) -> dict[int, str]:
        return {n: i.site for n, i in self.nodes.items() if i.role == "train"}

    @property
    def all_nodes(self) -> dict[int, str]:
        return {n: i.site for n, i in self.nodes.items()}

    @property
    def heldout_sites(self) -> list[str]:
        return sorted(i.site for i in self.nodes.values() if i.role == "eval")

    @property
    def labeled_phases(self) -> dict[str, tuple[str, ...]]:
        """{training site: the phases its masks label}, as its identify reply said."""
        return {i.site: i.labeled_phases for i in sorted(self.nodes.values(), key=lambda i: i.site) if i.role == "train"}

    @property
    def validation_phases(self) -> list[str]:
        """The phases whose pooled validation Dice selects `checkpoints/best` and opens the CPS gate:
        every training site's labeled phases (none said: every phase the sites validate on)."""
        return training_labeled_phases(self.labeled_phases)

    # ------------------------------------------------------------------------------ round 0
    def federated_plans(self) -> dict:
        """Merge the training sites' fingerprints exactly and plan once for everyone."""
        existing = self.run.load_plans()
        if existing is not None:
            self.log(f"plans from {self.run.plans_file} (sha256 {plans_hash(existing)[:12]})")
            return existing
        request = RecordDict({"fingerprint-config": ArrayRecord({"config": Array(FingerprintConfig().to_array())})})
        replies, failures = broadcast(
            self.grid, self.training_nodes, "query.fingerprint", request, group="0", timeout=self.config.round_timeout_s
        )
        self._report_failures(failures)
        if not replies:
            raise RuntimeError("no training site sent a fingerprint: cannot plan")
        fingerprints = [
            SiteFingerprint.from_arrays({k: a.numpy() for k, a in reply.content["fingerprint"].items()})
            for reply in replies.values()
        ]
        plans, _ = plan_from_fingerprints(  # merged exactly, as `fedliver train` merges its centers
            fingerprints,
            PlanningConfig(
                size=self.config.net_size, base_width=self.config.base_width, patch_size=self.config.patch_size,
                batch_size=self.config.batch_size, spacing=self.config.target_spacing,
            ),
        )
        digest = self.run.save_plans(plans)
        configuration = plans["configurations"][CONFIGURATION]
        self.log(
            f"round 0: plans from {len(fingerprints)} site fingerprints, spacing {configuration['spacing']}, "
            f"patch {configuration['patch_size']}, sha256 {digest[:12]}"
        )
        return plans

    def initial_model(self, plans: dict) -> dict[str, np.ndarray]:
        """Two STU-Nets with different seeds (heads always differ), optionally from pretrained weights."""
        branches = {}
        for offset, name in enumerate(BRANCHES):
            torch.manual_seed(self.config.seed + offset)
            net = build_stunet_from_plans(plans)
            if self.init_path is not None:
                self.log(f"branch {name}: {load_initial_weights(net, self.init_path, name)}")
            branches[name] = net.state_dict()
        return flatten(branches)

    # ------------------------------------------------------------------------------ rounds
    def cross_term_open(self, history: list[Mapping]) -> bool:
        """The CPS gate: open once the latest validation Dice (the labeled phases, pooled) reaches
        `cps-gate` (0: always open). Pseudo-labels from a pair that cannot yet segment the labeled
        phase teach noise."""
        if self.config.cps_gate <= 0:
            return True
        for entry in reversed(history):
            if (selected := selection_score(entry, self.validation_phases)) is not None:
                return selected.dice.mean >= self.config.cps_gate
        return False

    def round_config(self, server_round: int, plans_json: str, digest: str, *, cps_enabled: bool = True) -> ConfigRecord:
        return round_config(self.config, server_round, plans_json, digest, cps_enabled=cps_enabled)

    def connected_training_nodes(self, server_round: int, poll: float = 1.0) -> dict[int, str]:
        """The training nodes connected now. Those that are not get up to REJOIN_WAIT_S seconds
        (at most node-wait) to connect, once per absence: a restarted SuperNode needs that long
        before the SuperLink takes it back. A message to a node that is not connected would come
        back at once as `Node Unavailable`, and the node would run it when it returns: they get none."""
        connected = set(self.grid.get_node_ids())
        self._absent &= set(self.training_nodes) - connected  # connected again: may be waited for again
        waiting = [n for n in self.training_nodes if n not in connected and n not in self._absent]
        if waiting:
            wait = min(self.config.node_wait_s, REJOIN_WAIT_S)
            names = ", ".join(self.training_nodes[n] for n in waiting)
            self.log(f"round {server_round}: waiting up to {wait:.0f} s for {names} to connect again")
            started = time.monotonic()
            while time.monotonic() - started < wait and not set(waiting) <= connected:
                time.sleep(poll)
                connected = set(self.grid.get_node_ids())
            back = [self.training_nodes[n] for n in waiting if n in connected]
            if back:
                self.log(f"round {server_round}: {', '.join(back)} connected again after "
                         f"{time.monotonic() - started:.0f} s")
            self._absent |= {n for n in waiting if n not in connected}
        return {n: site for n, site in self.training_nodes.items() if n in connected}

    def train_round(
        self, server_round: int, current: dict[str, np.ndarray], config: ConfigRecord, aggregator: PairAggregator
    ) -> tuple[dict[str, np.ndarray], dict]:
        nodes = self.connected_training_nodes(server_round)
        content = aggregator.configure(server_round, current, config, list(nodes))
        arrays = content["arrays"]
        replies, failures = broadcast(
            self.grid, nodes, "train", content, group=str(server_round), timeout=self.config.round_timeout_s
        )
        failures += [Failure(n, site, "not connected when the round started")
                     for n, site in self.training_nodes.items() if n not in nodes]
        # Sites with no update at all: not connected, no reply in time, or an error reply (a
        # site's ClientApp that raised, e.g. its data folder gone: Flower's reason names the error).
        missing = sorted({f.site for f in failures})
        updates, train_metrics, reply_bytes = [], {}, {}
        for node_id, reply in replies.items():
            site = self.nodes[node_id].site
            returned_hash = str(reply.content["plans"]["sha256"]) if "plans" in reply.content else ""
            if returned_hash != str(config["plans-sha256"]):
                failures.append(Failure(node_id, site, f"refused: plans hash {returned_hash[:12]} differs"))
                continue
            metrics = {k: float(v) for k, v in reply.content["metrics"].items()}
            try:
                decoded = aggregator.decode(reply.content["arrays"])
            except ValueError as error:
                failures.append(Failure(node_id, site, f"update rejected: {error}"))
                continue
            updates.append(NodeUpdate(node_id, site, decoded, metrics))
            train_metrics[site] = metrics
            reply_bytes[site] = record_nbytes(reply.content["arrays"])
        accepted, rejected = aggregator.screen(updates, current)
        failures += rejected
        self._report_failures(failures)
        if not accepted:
            self.log(f"round {server_round}: no usable update; the global model stays as it was")
        new = aggregator.aggregate(server_round, current, accepted)
        if missing:
            self.log(f"round {server_round}: no update from {', '.join(missing)}; aggregated "
                     f"{len(accepted)} of {len(self.training_nodes)} training sites")
        for site, metrics in sorted(train_metrics.items()):
            self.log(
                f"round {server_round} site {site}: loss {metrics['loss-total']:.3f} (cps {metrics['loss-cps']:.3f}), "
                f"{metrics['seconds-per-iteration']:.2f} s/it, peak {metrics['peak-memory-mib']:.0f} MiB"
            )
        return new, {
            "train": train_metrics,
            "missing": missing,
            "rejected": [str(f) for f in failures],
            "bytes": {"to-each-node": record_nbytes(arrays), "from-node": reply_bytes},
            "aggregation": aggregator.last_round,
        }

    def evaluation_nodes(self, test: bool = True) -> dict[int, str]:
        """Training sites with validation cases (model selection needs them every round); with
        `test`, also held-out centres and the training sites' test splits (`evaluate-train-sites`)."""
        def evaluates(info: NodeInfo) -> bool:
            return info.validation_cases > 0 or test and (info.role == "eval" or (
                self.config.evaluate_train_sites and info.test_cases > 0))

        return {n: info.site for n, info in self.nodes.items() if evaluates(info)}

    def evaluate_round(self, server_round: int, current: dict[str, np.ndarray], config: ConfigRecord,
                       *, test: bool = True) -> dict:
        """`centers` (test scores per centre), `in_distribution` and `validation` of a round entry;
        without `test`, validation only (the rounds between two `evaluate-every` rounds)."""
        config = ConfigRecord({**dict(config), "evaluate-test": bool(test and self.config.evaluate_train_sites)})
        content = RecordDict({"arrays": to_arrayrecord(current, fp16=self.config.fp16_transport), "config": config})
        replies, failures = broadcast(
            self.grid, self.evaluation_nodes(test), "evaluate", content, group=f"eval-{server_round}",
            timeout=self.config.round_timeout_s,
        )
        self._report_failures(failures)
        metrics = {self.nodes[n].site: {k: float(v) for k, v in reply.content["metrics"].items()}
                   for n, reply in replies.items()}
        return evaluation_entry(metrics, training=set(self.training_nodes.values()))

    # ------------------------------------------------------------------------------ the run
    def run_all(self) -> dict:
        c = self.config
        # Before waiting for anyone: a missing checkpoint fails the run at once, in one line.
        self.init_path, note = resolve_init_weights(c.init_weights, c.net_size, c.base_width)
        self.log(f"initial weights: {note}")
        self.initial_weights = {"setting": c.init_weights, "file": str(self.init_path) if self.init_path else None,
                                "sha256": sha256_file(self.init_path) if self.init_path and self.init_path.is_file() else None,
                                "note": note}
        self.identify_nodes()
        plans = self.federated_plans()
        plans_json, digest = json.dumps(plans, sort_keys=True), plans_hash(plans)
        state = self.run.load_state()
        aggregator = self.aggregator = PairAggregator(c, len(self.training_nodes), log=self.log)
        self.log(f"aggregation: {aggregator.summary_line()}")
        if state.last_round:
            current = self.run.load_round(state.last_round)
            aggregator.load_state(*self.run.load_strategy_state(), last_round=state.last_round)
            # The manifest's hash names the checkpoint exactly (load_round checked its files against it).
            manifest = read_manifest(self.run.round_dir(state.last_round))["manifest_sha256"]
            self.log(f"resuming after round {state.last_round} of {c.num_rounds} from "
                     f"{self.run.round_dir(state.last_round)} (manifest sha256 {manifest})")
        else:
            current = self.initial_model(plans)
        for server_round in range(state.last_round + 1, c.num_rounds + 1):
            started = time.perf_counter()
            self.grid.start_round()
            cps_enabled = self.cross_term_open(state.history)
            if c.mode == "cps" and c.cps_gate > 0:
                self.log(f"round {server_round}: CPS cross term {'on' if cps_enabled else 'off'} "
                         f"(gate: {validation_name(self.validation_phases)} >= {c.cps_gate})")
            config = self.round_config(server_round, plans_json, digest, cps_enabled=cps_enabled)
            current, entry = self.train_round(server_round, current, config, aggregator)
            test_round = server_round % c.evaluate_every == 0 or server_round == c.num_rounds
            evaluation = self.evaluate_round(server_round, current, config, test=test_round)
            entry.update(evaluation if test_round else {"validation": evaluation.get("validation", {})})
            entry = {"round": server_round, **entry, "seconds": round(time.perf_counter() - started, 1)}
            self._checkpoint(server_round, current, plans, entry, state, aggregator)
            self._log_round(entry)
        return self.finish(state)

    def _checkpoint(
        self, server_round: int, current: dict[str, np.ndarray], plans: dict, entry: dict, state: ServerState,
        aggregator: PairAggregator,
    ) -> None:
        info = {"metrics": entry.get("centers", {}), "validation": entry.get("validation", {}),
                "postprocessing": self.config.postprocessing.to_info(), "mirror_axes": list(self.config.mirror_axes)}
        self.run.save_round(server_round, current, plans, info)
        arrays, strategy_info = aggregator.state()
        self.run.save_strategy_state(arrays, {**strategy_info, "round": server_round})
        # Selection looks at the training sites' validation cases only, never at a test score.
        selected = selection_score(entry, self.validation_phases)
        if selected is not None and selected.dice.mean > state.best_score:
            state.best_round, state.best_score = server_round, selected.dice.mean
            self.run.promote_best(server_round)
        elif selected is None and "centers" in entry and not self._said_no_validation:
            self.log(f"round {server_round}: {NO_VALIDATION}")
            self._said_no_validation = True
        entry["server"] = self.grid.round_cost()  # the server's own seconds (no site waits), its memory
        state.history.append(entry)
        state.last_round = server_round
        self.run.save_state(state)  # last: the round is complete only now
        self.run.prune(keep={server_round})

    def _log_round(self, entry: Mapping) -> None:
        parts = [f"round {entry['round']}/{self.config.num_rounds} in {entry['seconds']:.0f}s"]
        if (selected := selection_score(entry, self.validation_phases)) is not None:
            name = validation_name(selection_phases(entry, self.validation_phases))
            parts.append(f"{name} {selected.dice.mean:.3f} (n={selected.cases})")
        groups = [("in-distribution", entry.get("in_distribution", {}))]
        groups += [(site, entry.get("centers", {}).get(site, {})) for site in self.heldout_sites]
        for name, scores in groups:
            parts += [f"{name} {phase} Dice {s['dice']:.3f} (n={s['cases']})" for phase, s in scores.items()]
        self.log(" | ".join(parts))

    def finish(self, state: ServerState) -> dict:
        report = build_report(
            state.history,
            heldout=self.heldout_sites,
            training=sorted(self.training_nodes.values()),
            final_model=self.run.round_dir(state.last_round),
            best_model=self.run.best_dir if state.best_round else None,
            best_round=state.best_round,
            config={k: str(v) for k, v in asdict(self.config).items()},
            labeled_phases=self.labeled_phases,
        )
        report["initial_weights"] = getattr(self, "initial_weights", {"setting": self.config.init_weights})
        if getattr(self, "aggregator", None) is not None:  # strategy, DP and epsilon (per round: rounds[i].aggregation)
            report["aggregation"] = self.aggregator.describe()
        path = write_report(self.config.run_dir, report)
        plot_run(state.history, self.config.run_dir / "plots", heldout=self.heldout_sites,
                 labeled_phases=self.validation_phases)
        self.log(f"report: {path}")
        final = report["final"]
        table = format_table(final["centers"], self.heldout_sites, in_distribution=final["in_distribution"],
                             labeled=self.labeled_phases)
        best = report["best"]
        selection = (f"best: round {best['round']} on {best['selected_on']} (Dice {best['score']:.3f})"
                     if best["round"] else f"best: {best['note']}")
        self.log(f"final evaluation (round {final['round']}), test cases only:\n{table}\n{selection}")
        return report

    def _report_failures(self, failures: list[Failure]) -> None:
        for failure in failures:
            self.log(f"WARNING {failure}")
