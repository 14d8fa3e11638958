"""Sending one kind of message to a set of nodes and sorting the replies into results and failures."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
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
    labeled_phases: tuple[str, ...] = ()  # the phases its masks label (identify's "labeled-phases")


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
        if node_id not in nodes:  # an error the SuperLink wrote itself ("Node Unavailable"): its
            # source is not the node; the message it answers (ids are set on push) names the node
            sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
            node_id = sent.get(reply.metadata.reply_to_message_id, node_id)
        if reply.has_error():
            reason = " ".join(str(reply.error.reason).split())[-400:]
            failures.append(Failure(node_id, nodes.get(node_id, "?"), f"{message_type} failed: {reason}"))
        else:
            replies[node_id] = reply
    answered = set(replies) | {f.node_id for f in failures}
    failures += [Failure(n, nodes[n], f"no {message_type} reply within {timeout:.0f}s") for n in nodes if n not in answered]
    return replies, failures


class _Identify:
    """`query.identify` to each node as it connects, replies collected as they come (push/pull);
    grids that only deliver synchronously (the in-process test grid) answer at once."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.pending: dict[str, int] = {}  # message id -> node id
        self.asked: set[int] = set()
        self.replies: dict[int, Message] = {}
        self.failures: list[Failure] = []
        self._push = True

    def ask(self, node_ids: list[int], timeout: float) -> None:
        new = [n for n in node_ids if n not in self.asked]
        self.asked.update(new)
        if not new:
            return
        if self._push:
            messages = [Message(RecordDict(), n, "query.identify", group_id="identify") for n in new]
            try:
                self.pending.update(zip(self.grid.push_messages(messages), new))
                return
            except NotImplementedError:
                self._push = False
        replies, failures = broadcast(self.grid, {n: UNIDENTIFIED for n in new}, "query.identify",
                                      RecordDict(), group="identify", timeout=timeout)
        self.replies.update(replies)
        self.failures += failures

    def collect(self) -> None:
        if not self.pending:
            return
        for reply in self.grid.pull_messages(list(self.pending)):
            node_id = self.pending.pop(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if reply.has_error():
                reason = " ".join(str(reply.error.reason).split())[-400:]
                self.failures.append(Failure(node_id, UNIDENTIFIED, f"query.identify failed: {reason}"))
            else:
                self.replies[node_id] = reply

    def sites(self) -> set[str]:
        """Sites that said who they are (also those that said they cannot take part)."""
        return {str(reply.content["identity"]["site"]) for reply in self.replies.values()}


UNIDENTIFIED = "unidentified"


class CannotStart(RuntimeError):
    """A run that can never start as configured; `str()` is one line saying why and what to do."""


def run_hint(num_sites: int) -> str:
    """How to run the app, for someone who typed `flwr run .` (the README's commands)."""
    return (f"to run: `make demo` (phantoms and a federation), or flwr run . --federation-config "
            f"\"num-supernodes={num_sites}\" --run-config \"data-root='/abs/phantoms'\"")


def simulation_cannot_start(replies: Mapping[int, Message], expected_sites: Sequence[str]) -> str | None:
    """Why this simulation can never start, judged from the identify replies so far; None if it may.

    Only simulation nodes are judged (their reply carries a `simulation` record: Flower's
    `num-partitions`): a simulation's nodes share one run config and one data root, so fewer nodes
    than run config `sites` names, or a named site without usable data (an empty `data-root`, a
    missing Vendor_<X> folder), never resolves. A deployed node without usable data sits out and
    the run goes on without it (it is never judged here)."""
    simulated = {n: r for n, r in replies.items() if "simulation" in r.content}
    if not simulated:
        return None
    problems: list[str] = []
    nodes = min(int(r.content["simulation"]["num-partitions"]) for r in simulated.values())
    if nodes < len(expected_sites):
        problems.append(f"the simulation has {nodes} nodes and run config 'sites' names {len(expected_sites)} "
                        f"({', '.join(expected_sites)})")
    refused: dict[str, list[str]] = {}  # the node's reason -> its sites (an empty data-root: all of them)
    for reply in simulated.values():
        identity = reply.content["identity"]
        if "error" in identity and str(identity["site"]) in expected_sites:  # not an extra partition
            refused.setdefault(str(identity["error"]), []).append(str(identity["site"]))
    for reason, sites in refused.items():
        named = ", ".join(sorted(sites, key=list(expected_sites).index))
        problems.append(f"site{'s' if len(sites) > 1 else ''} {named}: {reason}")
    return f"{'; '.join(problems)}; {run_hint(len(expected_sites))}" if problems else None


def identify_while_waiting(
    grid: Grid, expected_sites: list[str], count: int, timeout: float, reply_timeout: float,
    log: Callable[[str], None], *, report_every: float = 30.0, poll: float = 1.0,
) -> tuple[dict[int, Message], list[Failure]]:
    """Ask every node who it is as soon as it connects, until the expected sites (or, without
    names, `count` nodes) have answered or `timeout` runs out. A missing site is logged by name as
    soon as everyone connected has answered, then every `report_every` seconds. A simulation that
    can never start (`simulation_cannot_start`) raises CannotStart at its first telling reply,
    after one line "cannot start: ..." in `log`."""
    identify = _Identify(grid)
    started = time.monotonic()
    deadline, next_report, last_said = started + timeout, started + report_every, None
    expected = count if not expected_sites else len(expected_sites)
    while True:
        node_ids = sorted(grid.get_node_ids())
        identify.ask(node_ids, reply_timeout)
        identify.collect()
        if reason := simulation_cannot_start(identify.replies, expected_sites):
            log(f"cannot start: {reason}")
            raise CannotStart(reason)
        missing = [s for s in expected_sites if s not in identify.sites()]
        answered = len(identify.replies) + len(identify.failures)
        done = not missing if expected_sites else len(identify.replies) >= count
        now = time.monotonic()
        if done:
            return identify.replies, identify.failures
        if now > deadline:
            break
        answering = len(identify.pending)
        said = (tuple(missing), len(node_ids))
        if now >= next_report or (not answering and said != last_said):
            what = ", ".join(missing) if missing else f"{expected - answered} more nodes"
            busy = f", {answering} still answering" if answering else ""
            log(f"waiting for {what} ({len(node_ids)} of {expected} connected{busy}, {deadline - now:.0f} s left)")
            next_report, last_said = now + report_every, said
        time.sleep(poll)
    if identify.pending:  # connected, not yet answered: they take part, so wait for who they are
        log(f"node-wait ({timeout:.0f} s) is over; {len(identify.pending)} connected nodes are still answering")
    until = time.monotonic() + reply_timeout
    while identify.pending and time.monotonic() < until:
        time.sleep(poll)
        identify.collect()
    identify.failures += [Failure(n, UNIDENTIFIED, f"no query.identify reply within {reply_timeout:.0f}s")
                          for n in identify.pending.values()]
    missing = [s for s in expected_sites if s not in identify.sites()]
    log(f"only {len(identify.replies)} of {expected} expected sites answered after {timeout:.0f} s; going on"
        + (f" without {', '.join(missing)}" if missing else ""))
    return identify.replies, identify.failures

