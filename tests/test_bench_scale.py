"""bench_scale's parts that can go wrong: the exponent fit, N-centre naming and phantoms, the
ServerApp's per-round "server" cost, and reading a report into rows."""

from __future__ import annotations

import math
import time

import pytest

from common.discovery import index_dataset
from server.round_cost import SiteWaitGrid, peak_rss_mib
from simulations.benchmarks.bench_scale import (
    RoundRow, format_rows, growth_exponent, rows_from_report, steady, summary,
)
from simulations.phantoms import PhantomConfig, generate_liqa_tree, training_center_names
from simulations.phantoms.centers import CENTERS, center_profile


def test_growth_exponent_recovers_known_powers():
    ns = [3, 6, 12, 24]
    assert growth_exponent(ns, [2.0 * n for n in ns]) == pytest.approx(1.0)
    assert growth_exponent(ns, [0.5 * n**2 for n in ns]) == pytest.approx(2.0)
    assert growth_exponent(ns, [7.0] * 4) == pytest.approx(0.0, abs=1e-12)
    assert growth_exponent(ns, [math.sqrt(n) for n in ns]) == pytest.approx(0.5)
    # noisy linear: a least-squares slope, not the last pair's
    assert growth_exponent(ns, [3.3, 5.7, 12.6, 23.1]) == pytest.approx(0.94, abs=0.03)


@pytest.mark.parametrize("ns, times", [([3, 3], [1.0, 2.0]), ([3], [1.0]), ([3, 6], [1.0, 0.0]), ([3, 6], [1.0])])
def test_growth_exponent_refuses_what_it_cannot_fit(ns, times):
    with pytest.raises(ValueError):
        growth_exponent(ns, times)


def test_training_center_names_are_distinct_site_names_that_keep_liqas():
    assert training_center_names(1) == ("A",)
    assert training_center_names(3) == ("A", "B1", "B2")
    names = training_center_names(24)
    assert len(set(names)) == 24 and names[:3] == ("A", "B1", "B2") and names[3] == "H04" and names[-1] == "H24"
    assert "C" not in names and all(n.isalnum() for n in names)
    assert training_center_names(6) == names[:6]  # a centre is the same whatever N is
    with pytest.raises(ValueError):
        training_center_names(0)
    # LiQA's centres keep their own profiles; a new one gets a profile of its own, from its name
    assert center_profile("B1") is CENTERS["B1"]
    assert center_profile("H04") == center_profile("H04") and center_profile("H04") != center_profile("H05")


def test_a_numbered_centre_is_a_site_the_data_index_finds(tmp_path):
    generate_liqa_tree(tmp_path, PhantomConfig(centers=("H07",), cases=1, labeled=1, validation_cases=1,
                                               heldout=("C",), missing_rate=1.0))
    index = index_dataset(tmp_path, centers=("H07",))
    assert not index.problems
    assert [(c.center, c.split, sorted(c.masks)) for c in index.cases] == [
        ("H07", "train", ["GED4"]), ("H07", "validation", ["GED4"])]


class _SlowGrid:
    """Stands in for Flower's Grid only where timing matters: replies take `delay` seconds."""

    def __init__(self, delay: float):
        self.delay = delay

    def send_and_receive(self, messages, *, timeout=None):
        time.sleep(self.delay)
        return list(messages)

    def get_node_ids(self):
        return [1, 2]


def test_site_wait_grid_splits_waiting_from_the_servers_own_time():
    grid = SiteWaitGrid(_SlowGrid(0.2))
    assert grid.get_node_ids() == [1, 2]  # everything else is delegated
    grid.start_round()
    assert grid.send_and_receive(["m"], timeout=1) == ["m"]
    time.sleep(0.1)  # the server's own wall time, without CPU
    busy = time.thread_time() + 0.1
    while time.thread_time() < busy:  # the server's own CPU work
        pass
    cost = grid.round_cost()
    assert cost["site-wait-seconds"] == pytest.approx(0.2, abs=0.05)
    assert cost["wait-cpu-seconds"] < 0.05  # sleeping in a wait costs the thread no CPU
    assert cost["seconds"] >= 0.2 and cost["cpu-seconds"] == pytest.approx(0.1, abs=0.03)
    assert 0 < cost["rss-mib"] <= cost["peak-rss-mib"] == pytest.approx(peak_rss_mib(), rel=0.05)
    grid.start_round()  # a new round starts from zero
    assert grid.round_cost()["site-wait-seconds"] == 0


def _entry(r: int, server: dict | None) -> dict:
    entry = {"round": r, "seconds": 9.0, "bytes": {"to-each-node": 1000, "from-node": {"A": 1000, "B1": 900}},
             "validation": {"A": {}, "B1": {}}, "train": {}}
    if r == 2:
        entry["centers"] = {"C": {}}
    return entry | ({"server": server} if server else {})


def test_rows_from_report_reads_time_memory_and_bytes():
    report = {"training_centers": ["A", "B1"], "rounds": [
        _entry(1, {"seconds": 0.5, "cpu-seconds": 0.4, "site-wait-seconds": 9.5, "wait-cpu-seconds": 0.2,
                   "peak-rss-mib": 700.0, "rss-mib": 650.0}),
        _entry(2, {"seconds": 0.3, "cpu-seconds": 0.2, "site-wait-seconds": 5.7, "wait-cpu-seconds": 0.1,
                   "peak-rss-mib": 710.0, "rss-mib": 660.0}),
    ]}
    first, second = rows_from_report(report)
    assert (first.round, first.wall_s, first.server_s, first.per_site_s) == (1, 10.0, 0.5, 5.0)
    assert (first.peak_rss_mib, first.rss_mib, first.server_cpu_s, first.messaging_cpu_s) == (700.0, 650.0, 0.4, 0.2)
    # to each of 2 training sites and each evaluating site (A, B1; round 2 also C); back: both updates
    assert (first.sent_bytes, second.sent_bytes, first.received_bytes) == (4000, 5000, 1900)
    assert steady([first, second], "wall_s") == 6.0 and steady([first], "server_s") == 0.5


def test_rows_from_report_without_server_cost_falls_back_and_says_so():
    (row,) = rows_from_report({"training_centers": ["A"], "rounds": [_entry(1, None)]})
    assert isinstance(row, RoundRow) and row.wall_s == 9.0 and row.server_s is None
    with pytest.raises(ValueError, match="server"):
        steady([row], "server_s")
    with pytest.raises(ValueError, match="round 3"):
        rows_from_report({"training_centers": ["A"], "rounds": [{"round": 3}]})
    with pytest.raises(ValueError, match="training_centers"):
        rows_from_report({"rounds": []})


def test_closing_lines_fit_each_part_and_end_with_the_exponent_line():
    measured = [(n, {"wall": 10.0 * n, "server": 0.1 * n**2, "server CPU": 0.05 * n, "messaging CPU": 0.02})
                for n in (3, 6, 12)]
    lines = summary(measured)
    assert lines[-1] == ("round time growth exponent in N: 1.00 "
                         "(server side: 2.00; server CPU: 1.00; messaging CPU: 0.00)")
    assert lines[1].split() == ["N=3", "wall", "30.000,", "server", "0.900,", "server", "CPU", "0.150,",
                                "messaging", "CPU", "0.020"]
    row = RoundRow(2, 12.0, 0.25, 0.2, 0.1, 3, 700.0, 690.0, 4_000_000, 2_000_000)
    header, line = format_rows(3, [row])
    assert line.split() == ["3", "2", "12.0", "0.250", "0.200", "0.100", "4.00", "700", "690", "4.00", "2.00"]
