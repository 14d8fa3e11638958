"""What a round costs the coordinator itself, apart from waiting on the sites.

`SiteWaitGrid` wraps the ServerApp's `Grid` and counts the seconds spent inside `send_and_receive`
(pushing the messages, the sites' work, pulling the replies). The rest of a round is the server's
own: decoding and screening updates, aggregation, evaluation bookkeeping, checkpointing. Round
entries record it as `"server": {"seconds", "cpu-seconds", "site-wait-seconds", "wait-cpu-seconds",
"peak-rss-mib", "rss-mib"}` (`simulations/benchmarks/bench_scale.py` reads it). The CPU seconds are
the ServerApp thread's own (`time.thread_time`): unlike wall seconds they do not grow when other
processes share the cores; "wait-cpu-seconds" is what the thread spent inside `send_and_receive`
(serialising, pushing and polling messages). The memory figures are this process's: in a
simulation the ServerApp shares it with Flower's simulation engine (Ray's driver), in deployment
it is the ServerApp alone.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid


class SiteWaitGrid:
    """A `Grid` that delegates everything and times `send_and_receive`."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.waiting_s = 0.0  # over the whole run, wall
        self.waiting_cpu_s = 0.0  # over the whole run, this thread's CPU
        self._round_started: tuple[float, float] | None = None  # wall, thread CPU
        self._round_waited = (0.0, 0.0)

    def __getattr__(self, name: str):  # get_node_ids, push_messages, pull_messages, run, ...
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        started, cpu = time.perf_counter(), time.thread_time()
        try:
            return self._grid.send_and_receive(messages, timeout=timeout)
        finally:
            self.waiting_s += time.perf_counter() - started
            self.waiting_cpu_s += time.thread_time() - cpu

    def start_round(self) -> None:
        self._round_started = time.perf_counter(), time.thread_time()
        self._round_waited = self.waiting_s, self.waiting_cpu_s

    def round_cost(self) -> dict[str, float]:
        """Since `start_round` (on the thread that called it): the server's own wall and CPU
        seconds, the seconds spent waiting on sites (and this thread's CPU in them), and memory."""
        wall = cpu = waited = waited_cpu = 0.0
        if self._round_started is not None:
            wall = time.perf_counter() - self._round_started[0]
            cpu = time.thread_time() - self._round_started[1]
            waited, waited_cpu = self.waiting_s - self._round_waited[0], self.waiting_cpu_s - self._round_waited[1]
        rss = current_rss_mib()  # before the peak: memory may grow in other threads between the two reads
        return {"seconds": round(wall - waited, 3), "cpu-seconds": round(cpu - waited_cpu, 3),
                "site-wait-seconds": round(waited, 3), "wait-cpu-seconds": round(waited_cpu, 3),
                "peak-rss-mib": round(max(peak_rss_mib(), rss), 1), "rss-mib": round(rss, 1)}


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (getrusage: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def current_rss_mib() -> float:
    """This process's resident memory now (/proc on Linux; the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as stream:
            pages = int(stream.read().split()[1])
    except (OSError, IndexError, ValueError):
        return peak_rss_mib()
    return pages * resource.getpagesize() / 2**20
