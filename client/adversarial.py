"""A hostile or broken site, in simulation only: what the Byzantine-robust strategies are tested against.

Run config `adversarial-sites = "B2:sign-flip"` (comma-separated SITE:KIND; parsed and checked by
`common.aggregation_config.parse_adversarial_sites`). With `received` the model the site got and
`delta = trained - received` its honest update, the site sends:

    sign-flip            received - delta             (pushes the federation the other way)
    scale-100            received + 100 * delta       (an update 100 times too large)
    gaussian-noise[=S]   trained + N(0, S^2) per weight (S default 1.0: garbage)
    stale                received                      (trained nothing, returned what it got)

The site still trains (its metrics and timing stay honest); only the arrays it returns change.
`adversarial_mod` sits on the ClientApp's train handler inside the wire encoding and outside
Flower's `fixedclipping_mod`: a hostile site does not clip. It acts only on a simulation node
(node_config without `site`, mapped to a site through its partition id): a deployed SuperNode
names its site in node_config and is never altered, whatever the run config says.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from common.aggregation_config import ADVERSARIAL_KINDS, Adversary, parse_adversarial_sites
from common.federation_config import parse_sites
from common.weights import from_arrayrecord, to_arrayrecord

Arrays = dict[str, np.ndarray]


def _sign_flip(trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray], **_: object) -> Arrays:
    return {k: (2 * received[k] - trained[k]).astype(np.float32) for k in trained}


def _scale_100(trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray], **_: object) -> Arrays:
    return {k: (received[k] + 100 * (trained[k] - received[k])).astype(np.float32) for k in trained}


def _gaussian_noise(trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray], *,
                    std: float, rng: np.random.Generator) -> Arrays:
    return {k: (v + rng.normal(0.0, std, v.shape)).astype(np.float32) for k, v in trained.items()}


def _stale(trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray], **_: object) -> Arrays:
    return {k: np.array(received[k], np.float32) for k in trained}


TRANSFORMS: dict[str, Callable[..., Arrays]] = {
    "sign-flip": _sign_flip, "scale-100": _scale_100, "gaussian-noise": _gaussian_noise, "stale": _stale,
}
assert tuple(TRANSFORMS) == ADVERSARIAL_KINDS


def corrupt_update(adversary: Adversary, trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray],
                   rng: np.random.Generator | None = None) -> Arrays:
    """What the adversarial site sends instead of `trained` (float32 arrays, same keys)."""
    return TRANSFORMS[adversary.kind](trained, received, std=adversary.noise_std,
                                      rng=rng if rng is not None else np.random.default_rng())


def simulated_site(context: Context) -> str | None:
    """The site a simulation node plays (None on a deployed SuperNode, which names its own site)."""
    if "site" in context.node_config or "partition-id" not in context.node_config:
        return None
    sites = parse_sites(str(context.run_config.get("sites", "")))
    partition = int(context.node_config["partition-id"])  # type: ignore[arg-type]
    return sites[partition].site if partition < len(sites) else None


def adversarial_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Train-handler mod: a simulation node named in `adversarial-sites` corrupts its update."""
    reply = call_next(msg, ctxt)
    site = simulated_site(ctxt)
    adversary = parse_adversarial_sites(str(ctxt.run_config.get("adversarial-sites", ""))).get(site or "")
    if adversary is None or reply.has_error() or "arrays" not in reply.content.array_records:
        return reply
    config = msg.content["config"]
    round_seed = int(config.get("seed", 0)) + 1000 * int(config.get("server-round", 0))  # as the site's trainer
    rng = np.random.default_rng([round_seed, int(ctxt.node_config["partition-id"])])  # type: ignore[arg-type]
    trained, received = from_arrayrecord(reply.content["arrays"]), from_arrayrecord(msg.content["arrays"])
    reply.content["arrays"] = to_arrayrecord(corrupt_update(adversary, trained, received, rng))
    print(f"[site {site}] simulation: sending a {adversary.kind} update (adversarial-sites)", flush=True)
    return reply
