"""How a federated round scales with the number of training sites.

    python -m simulations.benchmarks.bench_scale --sites 3,6,12,24 [--rounds 2] [--local-iterations 1]

For each N: a real Flower simulation (`simulations.runner`, as the demo runs it) with N training
centres (A, B1, B2, then H04, H05, ...: `simulations.phantoms.training_center_names`) and the
held-out centre C. Tiny phantoms (profile demo; per training centre 2 training cases, 1 labeled,
plus 1 validation case; C: 2 cases), supervised, a few local iterations, so the sites' work stays
small and the coordinator's cost shows. Per round it prints, from the run's report.json:
- wall: the round's seconds in the ServerApp, from configure to its checkpoint;
- server: the ServerApp's own part (decode, screen, aggregate, bookkeeping, checkpoint), i.e. wall
  minus the time inside `Grid.send_and_receive` (`server.round_cost`), which holds the sites' work
  and the messages' push/pull; "server cpu" is the same part in the ServerApp thread's CPU seconds,
  which other processes on the cores do not inflate, and "msg cpu" that thread's CPU seconds inside
  `send_and_receive` (serialising and pushing the messages, polling and reading the replies);
- per site: wall / N. Ray runs as many sites at once as the cores allow (2 cores: one at a time),
  so the sites' part grows with N by construction; the server part is what should not grow faster;
- peak / now MiB: the ServerApp process's peak and current RSS at round end (in simulation Flower's
  engine and Ray's driver share that process);
- sent MB: the model to each training site (report "bytes") plus the same arrays to each evaluating
  site; received MB: the training sites' updates.
The last line is the least-squares slope of log(round time) on log(N), for the wall time, the
server part (wall), its CPU seconds and the messaging CPU seconds, each averaged over the rounds
after the first (round 1 also pays each site's first preprocessing).
Phantoms are generated once for the largest N under RUN_ROOT/data and reused; each N runs in
RUN_ROOT/sites-N (its Flower log: RUN_ROOT/sites-N/simulation.log). The output also goes to
RUN_ROOT/bench_scale.txt.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

HELDOUT = "C"
MIB = 2**20


@dataclass(frozen=True)
class ScaleConfig:
    run_root: Path = Path("runs/bench_scale")
    sites: tuple[int, ...] = (3, 6, 12, 24)
    cases: int = 2  # training cases per training centre
    labeled: int = 1
    validation_cases: int = 1  # every round each training site also evaluates one case (model selection)
    heldout_cases: int = 2
    rounds: int = 2
    local_iterations: int = 1
    mode: str = "supervised"
    seed: int = 0

    @property
    def data_dir(self) -> Path:
        return self.run_root / "data"

    def phantom_settings(self) -> dict[str, object]:
        return {"cases": self.cases, "labeled": self.labeled, "validation_cases": self.validation_cases,
                "heldout_cases": self.heldout_cases, "seed": self.seed, "profile": "demo"}


@dataclass(frozen=True)
class RoundRow:
    round: int
    wall_s: float
    server_s: float | None  # None: a report without the "server" entry
    server_cpu_s: float | None
    messaging_cpu_s: float | None
    sites: int
    peak_rss_mib: float | None
    rss_mib: float | None
    sent_bytes: int
    received_bytes: int

    @property
    def per_site_s(self) -> float:
        return self.wall_s / self.sites


def rows_from_report(report: Mapping) -> list[RoundRow]:
    """One row per round of a report.json; raises ValueError naming what a round lacks."""
    sites = len(report.get("training_centers", []))
    if sites < 1:
        raise ValueError("report.json: no training_centers")
    rows = []
    for entry in report.get("rounds", []):
        if "bytes" not in entry or "seconds" not in entry:
            raise ValueError(f"report.json: round {entry.get('round')} has no 'bytes' or 'seconds'")
        server = entry.get("server")
        per_node = int(entry["bytes"]["to-each-node"])
        evaluated = set(entry.get("validation", {})) | set(entry.get("centers", {}))
        rows.append(RoundRow(
            round=int(entry["round"]),
            wall_s=float(server["seconds"] + server["site-wait-seconds"]) if server else float(entry["seconds"]),
            server_s=float(server["seconds"]) if server else None,
            server_cpu_s=float(server["cpu-seconds"]) if server else None,
            messaging_cpu_s=float(server["wait-cpu-seconds"]) if server else None,
            sites=sites,
            peak_rss_mib=float(server["peak-rss-mib"]) if server else None,
            rss_mib=float(server["rss-mib"]) if server else None,
            sent_bytes=per_node * (sites + len(evaluated)),
            received_bytes=sum(int(b) for b in entry["bytes"]["from-node"].values()),
        ))
    return rows


def growth_exponent(ns: Sequence[float], times: Sequence[float]) -> float:
    """Least-squares slope of log(time) on log(N): 1 is linear, 0 flat, 2 quadratic."""
    if len(ns) != len(times):
        raise ValueError(f"{len(ns)} site counts but {len(times)} times")
    if len(set(ns)) < 2:
        raise ValueError("growth exponent: needs at least two different site counts")
    if min(ns) <= 0 or min(times) <= 0:
        raise ValueError("growth exponent: site counts and times must be positive")
    xs, ys = [math.log(n) for n in ns], [math.log(t) for t in times]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def steady(rows: Sequence[RoundRow], field: str) -> float:
    """Mean of `field` over the rounds after the first (all rounds when there is one)."""
    later = rows[1:] or rows
    values = [getattr(r, field) for r in later]
    if any(v is None for v in values):
        raise ValueError(f"rounds without {field}: the ServerApp did not record its 'server' cost")
    return sum(values) / len(values)


def format_rows(n: int, rows: Sequence[RoundRow]) -> list[str]:
    header = (f"{'N':>3} {'round':>5} {'wall s':>8} {'server s':>9} {'server cpu':>10} {'msg cpu':>8} "
              f"{'per site s':>10} {'peak MiB':>9} {'now MiB':>8} {'sent MB':>8} {'recv MB':>8}")
    lines = [header]
    for r in rows:
        def number(value: float | None, digits: int) -> str:
            return "-" if value is None else f"{value:.{digits}f}"

        lines.append(f"{n:>3} {r.round:>5} {r.wall_s:>8.1f} {number(r.server_s, 3):>9} "
                     f"{number(r.server_cpu_s, 3):>10} {number(r.messaging_cpu_s, 3):>8} {r.per_site_s:>10.2f} "
                     f"{number(r.peak_rss_mib, 0):>9} {number(r.rss_mib, 0):>8} {r.sent_bytes / 1e6:>8.2f} "
                     f"{r.received_bytes / 1e6:>8.2f}")
    return lines


#: What the closing lines fit, by name: RoundRow fields.
SUMMARY_FIELDS = {"wall": "wall_s", "server": "server_s", "server CPU": "server_cpu_s",
                  "messaging CPU": "messaging_cpu_s"}


def summary(measured: Sequence[tuple[int, Mapping[str, float]]]) -> list[str]:
    """The closing lines from (N, steady-state seconds by SUMMARY_FIELDS name); the last one is
    `round time growth exponent in N: X (server side: Y; ...)`."""
    ns = [n for n, _ in measured]
    lines = ["steady-state round (mean of rounds after the first), seconds:"]
    lines += [f"  N={n:<3} " + ", ".join(f"{name} {means[name]:.3f}" for name in SUMMARY_FIELDS)
              for n, means in measured]
    slope = {name: growth_exponent(ns, [means[name] for _, means in measured]) for name in SUMMARY_FIELDS}
    lines.append(f"round time growth exponent in N: {slope['wall']:.2f} (server side: {slope['server']:.2f}; "
                 f"server CPU: {slope['server CPU']:.2f}; messaging CPU: {slope['messaging CPU']:.2f})")
    return lines


# ------------------------------------------------------------------------------ running


def ensure_phantoms(config: ScaleConfig, n_max: int) -> None:
    """The phantoms of `n_max` training centres and C under data_dir; only missing centres are made
    (a centre's cases do not depend on which others exist)."""
    from simulations.phantoms import PhantomConfig, generate_liqa_tree, training_center_names

    marker = config.data_dir / ".complete"
    settings = config.phantom_settings()
    done: list[str] = []
    if marker.is_file():
        recorded = json.loads(marker.read_text())
        if recorded.get("settings") == settings:
            done = list(recorded.get("centers", []))
    if not done:
        shutil.rmtree(config.data_dir, ignore_errors=True)
    wanted = list(training_center_names(n_max)) + [HELDOUT]
    missing = [c for c in wanted if c not in done]
    if not missing:
        return
    started = time.perf_counter()
    for centers, cases in (([c for c in missing if c != HELDOUT], config.cases),
                           ([c for c in missing if c == HELDOUT], config.heldout_cases)):
        if centers:
            for center in centers:  # one by one: the marker then records whatever got written
                shutil.rmtree(config.data_dir / f"Vendor_{center}", ignore_errors=True)
                generate_liqa_tree(config.data_dir, PhantomConfig(
                    centers=(center,), cases=cases, labeled=config.labeled, seed=config.seed, profile="demo",
                    heldout=(HELDOUT,), validation_cases=config.validation_cases))
                done.append(center)
                marker.write_text(json.dumps({"settings": settings, "centers": done}) + "\n")
    print(f"phantoms: {', '.join(missing)} in {time.perf_counter() - started:.0f}s under {config.data_dir}", flush=True)


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr, and its children's, to `path` (the Flower log)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with path.open("ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_config(config: ScaleConfig, n: int, run_dir: Path) -> dict[str, object]:
    from simulations.demo import DemoConfig
    from simulations.phantoms import training_center_names

    demo = DemoConfig(run_dir=run_dir, centers=training_center_names(n) + (HELDOUT,), heldout=(HELDOUT,),
                      seed=config.seed, rounds=config.rounds, local_iterations=config.local_iterations,
                      evaluate_every=config.rounds, mode=config.mode, init_weights=None)
    # node-wait: 25 sites identify one after another on 2 cores, which can take longer than the default
    return {**demo.run_config(), "data-root": str(config.data_dir.resolve()), "batch-size": 1,
            "evaluate-step": 1.0, "node-wait": 3600}


def run_scale(config: ScaleConfig, n: int) -> tuple[list[RoundRow], float]:
    """One simulation with `n` training sites and C; its rounds and its whole wall time."""
    from simulations.runner import SimulationSpec, run_simulation

    run_dir = (config.run_root / f"sites-{n}").resolve()
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    started = time.perf_counter()
    with output_to(run_dir / "simulation.log"):
        run_simulation(SimulationSpec(run_dir=run_dir, run_config=run_config(config, n, run_dir),
                                      num_supernodes=n + 1))
    total = time.perf_counter() - started
    return rows_from_report(json.loads((run_dir / "report.json").read_text())), total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.benchmarks.bench_scale",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="3,6,12,24", help="training site counts N, comma-separated")
    parser.add_argument("--rounds", type=int, default=ScaleConfig.rounds)
    parser.add_argument("--local-iterations", type=int, default=ScaleConfig.local_iterations)
    parser.add_argument("--run-root", type=Path, default=ScaleConfig.run_root)
    args = parser.parse_args(argv)
    try:
        sites = tuple(sorted({int(s) for s in args.sites.split(",") if s.strip()}))
    except ValueError:
        parser.error(f"--sites {args.sites!r}: expected whole numbers, e.g. 3,6,12,24")
    if not sites or min(sites) < 1:
        parser.error(f"--sites {args.sites!r}: every N must be >= 1")
    if args.rounds < 1 or args.local_iterations < 1:
        parser.error("--rounds and --local-iterations must be >= 1")
    config = ScaleConfig(run_root=args.run_root.resolve(), sites=sites, rounds=args.rounds,
                         local_iterations=args.local_iterations)
    config.run_root.mkdir(parents=True, exist_ok=True)
    out_path = config.run_root / "bench_scale.txt"
    out_path.write_text("")

    def say(line: str = "") -> None:
        print(line, flush=True)
        with out_path.open("a") as stream:
            stream.write(line + "\n")

    say(f"bench_scale: N = {','.join(map(str, sites))} training sites + held-out {HELDOUT}; "
        + ", ".join(f"{k} {v}" for k, v in asdict(config).items() if k not in ("run_root", "sites"))
        + f"; {os.cpu_count()} CPUs")
    ensure_phantoms(config, max(sites))
    measured: list[tuple[int, dict[str, float]]] = []
    for n in sites:
        try:
            rows, total = run_scale(config, n)
        except (RuntimeError, TimeoutError, ValueError) as error:
            say(f"N={n}: failed: {error}")
            break
        say()
        say(f"N={n}: whole run {total:.0f}s (start-up, identify, round-0 planning, {len(rows)} rounds, report)")
        for line in format_rows(n, rows):
            say(line)
        measured.append((n, {name: steady(rows, field) for name, field in SUMMARY_FIELDS.items()}))
    say()
    if len(measured) < 2:
        say("round time growth exponent in N: needs two site counts that finished")
        return 1
    for line in summary(measured):
        say(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
