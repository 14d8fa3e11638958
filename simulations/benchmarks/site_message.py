"""One site message in this process, as a deployed SuperNode runs it: the worker of `bench_site`.

    python -m simulations.benchmarks.site_message MESSAGE --data DIR --cache DIR --plans plans.json
        [--no-prepared] [--run-config "local-iterations=1 ..."]

MESSAGE is identify, fingerprint, train or evaluate. The message is built as the ServerApp builds it
(the round config of `server.federation.round_config`, a pair initialised from the plans with the
run's seed) and handed to the real ClientApp object with the node config of a deployed site. The
last line printed is JSON: the message, `seconds` (the ClientApp call alone), `compute_seconds` (of
those, the model's own work, the same on either path: local training iterations, sliding-window
inference and its export to the raw grid, scoring) and `process_seconds` (since this module was
imported: imports included). What remains is the message's overhead: finding, checking, hashing,
reading and preprocessing the site's files.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PROCESS_START = time.perf_counter()

MESSAGE_TYPES = {"identify": "query.identify", "fingerprint": "query.fingerprint", "train": "train",
                 "evaluate": "evaluate"}


def _parse_run_config(text: str) -> dict:
    """`"local-iterations=1 evaluate-phases='GED4'"` -> {key: value}, with Flower's parser."""
    from flwr.common.config import parse_config_args

    return parse_config_args([text]) if text else {}


def _content(message: str, plans_file: Path, run_config: dict):
    import torch
    from flwr.app import Array, ArrayRecord, RecordDict

    from common.federation_config import FederationConfig
    from common.fingerprint import FingerprintConfig
    from common.planning import plans_hash
    from common.stunet import build_stunet_from_plans
    from common.weights import BRANCHES, flatten, to_arrayrecord
    from server.federation import round_config

    if message == "identify":
        return RecordDict()
    if message == "fingerprint":
        return RecordDict({"fingerprint-config": ArrayRecord({"config": Array(FingerprintConfig().to_array())})})
    plans_json = plans_file.read_text()
    plans = json.loads(plans_json)
    config = FederationConfig.from_run_config(run_config)
    branches = {}
    for offset, name in enumerate(BRANCHES):
        torch.manual_seed(config.seed + offset)
        branches[name] = build_stunet_from_plans(plans).state_dict()
    return RecordDict({"arrays": to_arrayrecord(flatten(branches)),
                       "config": round_config(config, 1, plans_json, plans_hash(plans))})


class ComputeClock:
    """Seconds spent inside the model's own work, timed around the real functions (outermost call only)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._depth = 0

    def wrap(self, function):
        def timed(*args, **kwargs):
            self._depth += 1
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += time.perf_counter() - started
        return timed

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Time the model's work while the block runs: the trainer's iterations, every sliding window
        and its export to the raw grid, and the scoring (Dice, HD95) of each prediction."""
        import client.evaluation as evaluation
        import client.trainer as trainer
        import common.inference as inference

        targets = [(inference, "_sliding_window"), (inference, "predict_preprocessed"), (trainer.CPSTrainer, "train"),
                   (evaluation, "predict_preprocessed"), (evaluation, "dice"), (evaluation, "hd95")]
        originals = [getattr(owner, name) for owner, name in targets]
        for (owner, name), original in zip(targets, originals):
            setattr(owner, name, self.wrap(original))
        try:
            yield
        finally:
            for (owner, name), original in zip(targets, originals):
                setattr(owner, name, original)


def run_message(message: str, data: Path, cache: Path, plans_file: Path | None, *, prepared: bool,
                run_config: dict) -> tuple[float, float]:
    """(seconds the ClientApp took to answer `message`, of which model compute); raises when the
    reply is an error."""
    from flwr.app import Context, Message, RecordDict
    from flwr.app.metadata import Metadata

    from client.client_app import app
    from common.run_config import defaults

    config = {**defaults(), **run_config}
    content = _content(message, plans_file, config) if message in ("identify", "fingerprint") or plans_file \
        else None
    if content is None:
        raise SystemExit(f"{message} needs --plans")
    metadata = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=3600.0, message_type=MESSAGE_TYPES[message])
    node_config = {"site": "A", "role": "train", "data-dir": str(data), "cache-dir": str(cache),
                   "output-dir": str(cache / "outputs"), "prepared-dataset": prepared}
    context = Context(1, 1, node_config, RecordDict(), config)
    clock = ComputeClock()
    with clock.installed():
        started = time.perf_counter()
        reply = app(Message(content=content, metadata=metadata), context)
        seconds = time.perf_counter() - started
    if reply.has_error():
        raise SystemExit(f"{message}: {reply.error.reason}")
    if message == "identify" and "error" in reply.content["identity"]:
        raise SystemExit(f"identify: {reply.content['identity']['error']}")
    return seconds, clock.seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.benchmarks.site_message", description=__doc__.splitlines()[0])
    parser.add_argument("message", choices=tuple(MESSAGE_TYPES))
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--plans", type=Path, default=None)
    parser.add_argument("--no-prepared", dest="prepared", action="store_false",
                        help="node config prepared-dataset=false: every message reads the raw files")
    parser.add_argument("--run-config", default="", help='run-config overrides, e.g. "local-iterations=1"')
    args = parser.parse_args(argv)
    seconds, compute = run_message(args.message, args.data, args.cache, args.plans, prepared=args.prepared,
                                   run_config=_parse_run_config(args.run_config))
    print(json.dumps({"message": args.message, "prepared": args.prepared, "seconds": round(seconds, 3),
                      "compute_seconds": round(compute, 3),
                      "process_seconds": round(time.perf_counter() - PROCESS_START, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
