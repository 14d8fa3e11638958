"""Sending one kind of message to a set of nodes and sorting the replies into results and failures."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid


@dataclass(frozen=True)
class NodeInfo:
    node_id: int
    site: str
    role: str  # "train" | "eval"
    validation_cases: int = 0  # held out from training by the site's splits.json
    test_cases: int = 0  # every case at a held-out ("eval") site


@dataclass(frozen=True)
class Failure:
    node_id: int
    site: str
    reason: str

    def __str__(self) -> str:
        return f"site {self.site} (node {self.node_id}): {self.reason}"


def broadcast(
    grid: Grid,
    nodes: Mapping[int, str],
    message_type: str,
    content: Callable[[int], RecordDict] | RecordDict,
    *,
    group: str,
    timeout: float,
) -> tuple[dict[int, Message], list[Failure]]:
    """Send to every node (`node_id -> site label`) and wait up to `timeout` seconds for replies.

    Nodes that reply with an error or do not reply in time become failures; the caller goes on
    with the replies it has, so a dropped node never hangs the run."""
    messages = [
        Message(content(node_id) if callable(content) else content, node_id, message_type, group_id=group)
        for node_id in nodes
    ]
    replies: dict[int, Message] = {}
    failures: list[Failure] = []
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node_id = reply.metadata.src_node_id
        if reply.has_error():
            reason = " ".join(str(reply.error.reason).split())[-400:]
            failures.append(Failure(node_id, nodes.get(node_id, "?"), f"{message_type} failed: {reason}"))
        else:
            replies[node_id] = reply
    answered = set(replies) | {f.node_id for f in failures}
    failures += [Failure(n, nodes[n], f"no {message_type} reply within {timeout:.0f}s") for n in nodes if n not in answered]
    return replies, failures


def wait_for_nodes(grid: Grid, count: int, timeout: float, log: Callable[[str], None]) -> list[int]:
    """Node ids once `count` nodes are connected, or whoever is there when `timeout` runs out."""
    deadline = time.monotonic() + timeout
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= count or time.monotonic() > deadline:
            if len(node_ids) < count:
                log(f"only {len(node_ids)} of {count} expected nodes connected after {timeout:.0f}s; going on")
            return node_ids
        time.sleep(1.0)
