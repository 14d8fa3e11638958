"""The hospital's Flower ClientApp.

Messages it answers (the server drives them in this order):
- `query.identify`    -> site name and role, and counts (never case ids)
- `query.fingerprint` -> the site's mergeable fingerprint (aggregate statistics only)
- `train`             -> local CPS from the global pair; both branches back, with numeric metrics
- `evaluate`          -> per-phase Dice and HD95 of the global model: on the test split (every case
                         at a held-out site) and, prefixed "val-", on the validation split's
                         labeled phases (run config `labeled-phases`; GED4 at a LiQA site)

Every reply holds arrays with the global model's keys and numbers; nothing pickled, no voxels.
In deployment each message starts a fresh process: everything lasting sits in the site's cache
folder (preprocessed volumes) or in `context.state` (FedBN's local norms, the optimiser's momentum).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from client.evaluation import SiteEvaluation, evaluate_pairs, write_qualitative_png
from client.pipeline import site_volumes, trainer_config
from client.site import SiteData, resolve_identity
from client.trainer import CPSTrainer, TrainerConfig
from client.update_encoding import update_encoding_mod
from common.device import describe, resolve_device
from common.federation_config import parse_sites
from common.phases import parse_labeled_phases, parse_phase_list
from common.fingerprint import FingerprintConfig
from common.planning import plans_hash
from common.postprocessing import Postprocessing
from common import run_config as schema
from common.scores import VALIDATION_PREFIX
from common.splits import TEST, VALIDATION
from common.stunet import build_stunet_from_plans
from common.names import BRANCHES
from common.weights import (
    flatten,
    from_arrayrecord,
    is_norm_parameter,
    to_arrayrecord,
    to_torch,
    unflatten,
)

app = ClientApp()

LOCAL_NORM_KEY = "local-norm"
MOMENTUM_KEY = "optimizer-momentum"


def setting(config: Mapping[str, object], key: str) -> object:
    """Run-config `key` as the server sent it in a message's config (under its schema name), else
    the schema's default (common/run_config.py)."""
    return config[key] if key in config else schema.default(key)


def _site(context: Context, config: Mapping[str, object] | None = None) -> SiteData:
    """The node's site. Its labeled phases: run config `labeled-phases` as a train or evaluate
    message's `config` carries it, else as the run config says (identify, fingerprint)."""
    source = config if config is not None and "labeled-phases" in config else context.run_config
    labeled = parse_labeled_phases(str(setting(source, "labeled-phases")))
    return SiteData(resolve_identity(context.node_config, context.run_config), labeled_phases=labeled)


def site_device(site: str, node_config: Mapping[str, object], run_config: Mapping[str, object]) -> torch.device:
    """The site's torch device: node config `device` (a site matter: `--node-config "device='cuda:1'"`)
    over run config `device` (default `auto`: a CUDA GPU when the node has one). One-line ValueError
    naming the site for a device it does not have."""
    spec = node_config.get("device") or run_config.get("device") or schema.default("device")
    try:
        return resolve_device(str(spec))
    except ValueError as error:
        raise ValueError(f"site {site}: {error}") from None


def _log(site: SiteData, text: str) -> None:
    print(f"[site {site.identity.site}] {text}", flush=True)


def _verified_plans(config: ConfigRecord) -> tuple[dict, str]:
    """The plans sent by the server and the hash this node computes for them; the node refuses
    to work with plans whose hash differs from the one the server pinned."""
    plans = json.loads(str(config["plans-json"]))
    local_hash = plans_hash(plans)
    if local_hash != str(config["plans-sha256"]):
        raise ValueError(f"plans hash mismatch: server {config['plans-sha256']}, node {local_hash}")
    return plans, local_hash


def _cannot_take_part(msg: Message, context: Context, site: str, role: str, error: object) -> Message:
    """The identify reply of a node without usable data: the server names it and goes on without
    it (or, with too few training sites left or in a simulation, fails the run at once with this reason)."""
    print(f"[site {site}] cannot take part: {error}", flush=True)
    text = " ".join(str(error).split())
    identity = ConfigRecord({"site": site, "role": role, "error": text if len(text) <= 300 else text[:297] + "..."})
    return Message(RecordDict({"identity": identity, "counts": MetricRecord({"cases": 0}), **_simulation(context)}),
                   reply_to=msg)


def _partition_assignment(context: Context) -> tuple[str, str]:
    """(site, role) a simulation node plays by its partition id, as far as run config `sites` says."""
    partition = context.node_config.get("partition-id", "?")
    try:
        assignment = parse_sites(str(setting(context.run_config, "sites")))[int(partition)]  # type: ignore[arg-type]
    except (ValueError, IndexError, TypeError):
        return f"partition {partition}", "train"
    return assignment.site, assignment.role


def _simulation(context: Context) -> dict[str, MetricRecord]:
    """A simulation node's identify reply says how many nodes the simulation has (Flower's
    `num-partitions`): with fewer than run config `sites` names, the server knows at once that the
    missing sites never come. A deployed node (node config `site`) adds nothing."""
    node = context.node_config
    if "site" in node or "num-partitions" not in node:
        return {}
    return {"simulation": MetricRecord({"partition-id": int(node.get("partition-id", -1)),  # type: ignore[arg-type]
                                        "num-partitions": int(node["num-partitions"])})}  # type: ignore[arg-type]


@app.query("identify")
def identify(msg: Message, context: Context) -> Message:
    try:
        site = _site(context)
    except ValueError as err:  # simulation: an empty data-root, a partition without a site
        return _cannot_take_part(msg, context, *_partition_assignment(context), err)
    try:
        problems = site.index.problems
        if not site.cases:  # the site's folder is missing or holds no usable case
            first = f" ({len(problems)} problem(s), the first: {problems[0]})" if problems else ""
            raise ValueError(f"{site.identity.data_dir}: no usable case{first}")
    except Exception as err:  # noqa: BLE001  (no usable data: say so under the site's name)
        return _cannot_take_part(msg, context, site.identity.site, site.identity.role, err)
    for problem in problems:
        _log(site, str(problem))
    if site.identity.prepared:
        _log(site, f"index: {len(site.cases)} cases; {site.file_checks.read} files read and checked, "
                   f"{site.file_checks.reused} unchanged since the last message")
    counts = MetricRecord(
        {
            "cases": len(site.cases),
            "labeled-volumes": len(site.labeled_pairs()),
            "unlabeled-volumes": len(site.unlabeled_pairs()),
            "validation-cases": len(site.cases_in(VALIDATION)),
            "test-cases": len(site.cases_in(TEST)),
            "problems": len(site.index.problems),
        }
    )
    identity = ConfigRecord({"site": site.identity.site, "role": site.identity.role,
                             "labeled-phases": ",".join(site.labeled_phases)})  # what its masks label
    return Message(RecordDict({"identity": identity, "counts": counts, **_simulation(context)}), reply_to=msg)


@app.query("fingerprint")
def fingerprint(msg: Message, context: Context) -> Message:
    site = _site(context)
    started = time.perf_counter()
    config = FingerprintConfig.from_array(msg.content["fingerprint-config"]["config"].numpy())
    problems: list = []
    fp, stats = site.fingerprint(config, problems)
    for problem in problems:
        _log(site, str(problem))
    _log(site, f"fingerprint of {fp.num_images} volumes in {time.perf_counter() - started:.1f}s "
               f"({stats.computed} read now, {stats.reused} unchanged)")
    arrays = ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in fp.to_arrays().items()})
    return Message(RecordDict({"fingerprint": arrays}), reply_to=msg)


def central_dp_clipping_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `fixedclipping_mod` when the server's client-side DP wrapper asks for it (its train
    config carries `clipping_norm`); otherwise the reply passes unchanged."""
    if "clipping_norm" in msg.content["config"]:
        return fixedclipping_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def simulated_adversary_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Run config `adversarial-sites`, honoured on simulation nodes only (client/adversarial.py);
    a deployed SuperNode names its site in node_config and never gets here."""
    if "site" in ctxt.node_config or not str(setting(ctxt.run_config, "adversarial-sites")).strip():
        return call_next(msg, ctxt)
    from client.adversarial import adversarial_mod

    return adversarial_mod(msg, ctxt, call_next)


# Outermost first: the wire encoding (fp16 / int8 deltas) sees the final float32 update; a simulated
# hostile site skips clipping; Flower's clipping sees the update as trained.
@app.train(mods=[update_encoding_mod, simulated_adversary_mod, central_dp_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    site = _site(context, config)
    device = site_device(site.identity.site, context.node_config, context.run_config)  # before any work
    if device.type == "cuda":
        _log(site, f"training on {describe(device)}, mixed precision fp16")
    plans, local_hash = _verified_plans(config)

    volumes = site_volumes([site], plans, include_unlabeled=str(setting(config, "mode")) == "cps",
                           propagate_labels=bool(setting(config, "propagate-labels")))
    for problem in volumes.problems:
        _log(site, str(problem))
    if not volumes.labeled:
        raise ValueError(f"site {site.identity.site} has no usable labeled volume")

    global_flat = from_arrayrecord(msg.content["arrays"])
    branches = unflatten(global_flat)
    local_norm = bool(setting(config, "local-norm"))
    if local_norm and LOCAL_NORM_KEY in context.state:  # FedBN: this site's own norm scale/shift
        for key, value in from_arrayrecord(context.state[LOCAL_NORM_KEY]).items():
            branch, _, name = key.partition(".")
            branches[branch][name] = value

    trainer = CPSTrainer(plans, volumes.labeled, volumes.unlabeled,
                         _trainer_config(config, device, labeled_phases=volumes.labeled_phases))
    trainer.cross_term_enabled = bool(config.get("cps-enabled", True))  # the server's validation gate
    reference = to_torch(branches)
    trainer.load_state_dicts(reference)
    keep_momentum = bool(setting(config, "local-momentum"))
    if keep_momentum and MOMENTUM_KEY in context.state:
        restored = trainer.load_momentum_buffers(from_arrayrecord(context.state[MOMENTUM_KEY]))
        _log(site, f"momentum of {restored} parameters carried over from the last round")
    iterations, server_round = int(setting(config, "local-iterations")), int(config["server-round"])
    stats = trainer.train(
        iterations,
        start_iteration=(server_round - 1) * iterations,  # the lr and the CPS ramp-up go on across rounds
        total_iterations=int(setting(config, "num-server-rounds")) * iterations,
        reference=reference if float(setting(config, "proximal-mu")) > 0 else None,
        log=lambda line: _log(site, line),
    )
    per_phase = int(setting(config, "agreement-volumes"))
    agreement = trainer.branch_agreement(volumes.unlabeled, max_per_phase=per_phase) if per_phase > 0 else {}

    updated = flatten(trainer.state_dicts())
    if keep_momentum:  # site-local state: never sent to the server
        context.state[MOMENTUM_KEY] = to_arrayrecord(trainer.momentum_buffers())
    if local_norm:
        context.state[LOCAL_NORM_KEY] = to_arrayrecord({k: v for k, v in updated.items() if is_norm_parameter(k)})
    metrics = {
        "num-labeled": float(len(volumes.labeled)),
        "num-samples": float(len(volumes.labeled) + len(volumes.unlabeled)),
        "loss-sup-a": stats.sup_a,
        "loss-sup-b": stats.sup_b,
        "loss-cps": stats.cps,
        "loss-total": stats.total,
        "seconds-per-iteration": stats.seconds_per_iteration,
        "peak-memory-mib": stats.peak_memory_mib,
        **{f"agreement-{phase}": value for phase, value in agreement.items()},
    }
    content = RecordDict(
        {
            "arrays": to_arrayrecord(updated),  # float32; update_encoding_mod puts it on the wire
            "metrics": MetricRecord(metrics),
            "plans": ConfigRecord({"sha256": local_hash}),
        }
    )
    return Message(content, reply_to=msg)


def _trainer_config(config: ConfigRecord, device: torch.device | str = "cpu", *,
                    labeled_phases: tuple[str, ...] | None = None) -> TrainerConfig:
    """The round's trainer settings from the train message's config (run-config names, mapped by
    client.pipeline.trainer_config); the ramp-up and the seed follow the round; `labeled_phases`:
    the phases of the site's truly labeled volumes (None: TrainerConfig's GED4)."""
    return trainer_config(
        config, device=str(device),
        rampup_iterations=int(setting(config, "cps-rampup-rounds")) * int(setting(config, "local-iterations")),
        seed=int(setting(config, "seed")) + 1000 * int(config["server-round"]),  # each round samples anew
        **({"labeled_phases": labeled_phases} if labeled_phases else {}),
    )


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    site = _site(context, config)
    device = site_device(site.identity.site, context.node_config, context.run_config)
    plans, _ = _verified_plans(config)
    branches = to_torch(unflatten(from_arrayrecord(msg.content["arrays"])))
    nets = []
    for name in BRANCHES:
        net = build_stunet_from_plans(plans, deep_supervision=False)
        net.load_state_dict(branches[name])
        nets.append(net.eval())
    started = time.perf_counter()
    postprocessing = Postprocessing.parse(str(setting(config, "postprocessing")),
                                          str(setting(config, "postprocessing-phases")))

    def score(pairs: list) -> SiteEvaluation:
        return evaluate_pairs(nets, plans, pairs, step=float(setting(config, "evaluate-step")),
                              postprocessing=postprocessing, log=lambda line: _log(site, line), device=device,
                              cache=site.preprocessing_cache(plans) if site.identity.prepared else None)

    # Training cases are never scored: validation (selection only) and test (report only) stay apart.
    held_out = site.identity.role == "eval"
    # Run config `evaluate-phases`, as the server parsed it: which phases' test cases are scored.
    phases = parse_phase_list(str(setting(config, "evaluate-phases")), "evaluate-phases")
    test_pairs = [(case, phase) for case, phase in site.test_pairs() if phases is None or phase in phases]
    test = score(test_pairs if held_out or bool(config.get("evaluate-test", True)) else [])
    validation = score(site.validation_pairs())
    metrics = {**test.metrics(), **validation.metrics(VALIDATION_PREFIX),
               "problems": float(len(test.problems) + len(validation.problems))}
    server_round = int(config.get("server-round", 0))
    summary = _dice_summary({"test": test, "validation": validation})
    _log(site, f"round {server_round} evaluation in {time.perf_counter() - started:.1f}s: {summary}")
    if server_round == int(setting(config, "num-server-rounds")):  # the last round: a picture of it
        png = site.identity.output_dir / f"qualitative_{site.identity.site}.png"
        shown, split = (test, "test") if test.examples else (validation, "validation")
        write_qualitative_png(shown, png, f"site {site.identity.site}, {split} split, round {server_round}")
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def _dice_summary(evaluations: dict[str, SiteEvaluation]) -> str:
    """`test Dice GED4 0.912 (n=2), T2 0.301 (n=2); validation Dice GED4 0.905 (n=1)` for the site's log."""
    parts = [
        f"{split} Dice " + ", ".join(f"{phase} {s.dice.mean:.3f} (n={s.cases})" for phase, s in scores.items())
        for split, evaluation in evaluations.items()
        if (scores := evaluation.summaries())
    ]
    return "; ".join(parts) or "no case to score"
