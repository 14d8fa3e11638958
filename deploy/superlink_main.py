"""`python -m deploy.superlink_main FLAGS`: `flower-superlink FLAGS` with a longer SQLite lock wait.

Flower 1.42 keeps the SuperLink's state (runs, nodes, messages and every message's object tree)
in SQLite (`--database state.db`, WAL mode) and sets `PRAGMA busy_timeout = 5000` on each
connection: a write waits at most 5 s for the database's single write lock, then fails with
`database is locked`, which the SuperLink answers with HTTP 500. Pushing one message preregisters
its whole object tree in one write transaction (about 8 statements per object: some 340 for a
message of 40 arrays, over 1500 for the STU-Net pair's 200), so while the SuperLink shares its
cores with training processes that transaction alone can hold the lock for seconds, and the
other writers queued behind it (each SuperNode's pull, heartbeats, the SuperExec, the ServerApp's
task heartbeat) run out of their 5 s. Flower's clients do not retry an HTTP 500: the SuperNode
exits (status 0), the SuperExec dies (no ServerApp starts again), the ServerApp's run fails.

This entry point raises the wait to `BUSY_TIMEOUT_S` and leaves every other setting as Flower
ships it. 60 s is twice the 30 s after which Flower's HTTP clients give up on a request and try
again: on a starved SuperLink a request then times out at its client, which Flower retries
(at worst a message or reply is lost for that round: the SuperLink completes a pull whose client
had stopped waiting), where a `database is locked` answer would have been final (a SuperNode
that quits, a SuperExec that is gone for good). Measurements: docs/deploy.md, *The state
database*; reproduction: `python -m deploy.state_probe`.
"""

from __future__ import annotations

import sys

BUSY_TIMEOUT_S = 60.0  # > 30 s, flwr.supercore.protobuf.client.ProtobufClient's default timeout


def sqlite_pragmas(busy_timeout_s: float = BUSY_TIMEOUT_S) -> tuple[tuple[str, str], ...]:
    """Flower's pragmas with `busy_timeout` replaced (milliseconds, as SQLite takes it)."""
    from flwr.supercore.constant import SQLITE_PRAGMAS

    names = [name for name, _ in SQLITE_PRAGMAS]
    if "busy_timeout" not in names:  # a Flower that no longer sets it: this module needs a look
        raise RuntimeError("flwr.supercore.constant.SQLITE_PRAGMAS has no busy_timeout")
    return tuple((name, str(int(busy_timeout_s * 1000)) if name == "busy_timeout" else value)
                 for name, value in SQLITE_PRAGMAS)


def apply_state_settings(busy_timeout_s: float = BUSY_TIMEOUT_S) -> tuple[tuple[str, str], ...]:
    """Install the pragmas before any state is opened: the connect hook reads the module global."""
    from flwr.supercore import constant, sql_mixin

    pragmas = sqlite_pragmas(busy_timeout_s)
    constant.SQLITE_PRAGMAS = pragmas
    sql_mixin.SQLITE_PRAGMAS = pragmas
    return pragmas


def main() -> None:
    apply_state_settings()
    from flwr.superlink.cli import flower_superlink

    sys.argv[0] = "flower-superlink"  # Flower's own name in its usage and log lines
    flower_superlink()


if __name__ == "__main__":
    main()
