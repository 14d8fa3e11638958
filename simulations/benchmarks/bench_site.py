"""Site message overhead: today's path (every message reads the raw files) vs the prepared dataset.

    python -m simulations.benchmarks.bench_site [--cases 30 --profile full --repeats 2]

Builds one training site of `--cases` phantom cases (`--profile full`: full-size grids; 3 test and 1
validation case among them), plans for it as round 0 would, then sends it the four messages of a
round — identify, fingerprint, train (1 local iteration) and evaluate — each in a fresh process as a
deployed SuperNode runs it (`simulations.benchmarks.site_message`), once with node config
`prepared-dataset=false` (no prepared dataset: each message indexes and validates every file, the
fingerprint reads every volume, train hashes every input, evaluate preprocesses the raw test
volumes) and once on the prepared dataset (`fedliver prepare` ran first). Both caches are warmed
first (a train message each), so both compare a site whose files did not change.

Prints, per message, the median ClientApp seconds of each path, the model's work among them
(training iterations, sliding-window inference and its export to the raw grid, scoring: the same
on either path) and the overhead (the rest: finding, checking, hashing, reading and preprocessing
the site's files). The last line is
`site message overhead ratio R`: prepared / today overhead, summed over the four messages (target
<= 0.1); the line before it gives the same ratio of whole message times.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

MESSAGES = ("identify", "fingerprint", "train", "evaluate")
#: One local iteration; the model's own work kept small, because it is the same on both paths and
#: only the rest is compared: no branch-agreement inference after training, and evaluate scores
#: GED4 only (3 test + 1 validation volume; the per-volume overhead is the same for every phase).
RUN_CONFIG = "local-iterations=1 num-server-rounds=2 agreement-volumes=0 evaluate-phases='GED4'"


def _say(line: str) -> None:
    print(line, flush=True)


def _message(message: str, data: Path, cache: Path, plans: Path, *, prepared: bool,
             run_config: str) -> tuple[float, float]:
    """(ClientApp seconds, of which model compute) of one message, in a fresh process."""
    command = [sys.executable, "-m", "simulations.benchmarks.site_message", message, "--data", str(data),
               "--cache", str(cache), "--plans", str(plans), "--run-config", run_config]
    if not prepared:
        command.append("--no-prepared")
    done = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace")
    if done.returncode != 0:
        raise SystemExit(f"{message} ({'prepared' if prepared else 'today'}) failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return float(result["seconds"]), float(result["compute_seconds"])


def build_site(root: Path, cases: int, profile: str, seed: int) -> Path:
    """`root/Vendor_A`: `cases` cases in all (3 test, 1 validation, about a third labeled)."""
    from simulations.phantoms import PhantomConfig, generate_liqa_tree

    site = root / "Vendor_A"
    if not site.is_dir():
        held = 4
        generate_liqa_tree(root, PhantomConfig(centers=("A",), cases=cases - held, labeled=max(1, (cases - held) // 3),
                                               test_cases=3, validation_cases=1, seed=seed, profile=profile, heldout=()))
    return site


def _site(data: Path, cache: Path):
    from client.site import SiteData, SiteIdentity

    return SiteData(SiteIdentity(site="A", role="train", data_dir=data, cache_dir=cache, output_dir=cache / "outputs"))


def plan_site(data: Path, cache: Path, out: Path) -> Path:
    """Round 0 for this one site: its fingerprint, planned with the run config's defaults."""
    from common.federation_config import FederationConfig
    from common.planning import PlanningConfig, plan_from_fingerprint
    from common.run_config import defaults

    if out.is_file():
        return out
    config = FederationConfig.from_run_config(defaults())
    fingerprint, _ = _site(data, cache).fingerprint()
    plans = plan_from_fingerprint(fingerprint, PlanningConfig(size=config.net_size, base_width=config.base_width,
                                                              patch_size=config.patch_size, batch_size=config.batch_size))
    out.write_text(json.dumps(plans, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.benchmarks.bench_site", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=30)
    parser.add_argument("--profile", default="full", choices=("demo", "full"))
    parser.add_argument("--repeats", type=int, default=2, help="fresh-process runs of each message per path (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("runs/bench_site"), help="phantoms and caches (kept, reused)")
    args = parser.parse_args(argv)

    work = args.work.resolve() / f"{args.profile}-{args.cases}-seed{args.seed}"
    started = time.perf_counter()
    data = build_site(work / "data", args.cases, args.profile, args.seed)
    volumes = sum(1 for _ in data.rglob("*.nii.gz"))
    _say(f"site A: {args.cases} cases ({args.profile} profile), {volumes} NIfTI files, built in "
         f"{time.perf_counter() - started:.0f} s")
    plans = plan_site(data, work / "planning-cache", work / "plans.json")
    caches = {False: work / "cache-today", True: work / "cache-prepared"}

    started = time.perf_counter()
    prepared_site = _site(data, caches[True]).prepare(json.loads(plans.read_text()))  # what `fedliver prepare` runs
    _say(f"prepared dataset (`fedliver prepare`, once): {time.perf_counter() - started:.1f} s")
    for line in prepared_site.summary():
        _say(f"  {line}")
    # Today's path caches preprocessed training volumes too (keyed by file hashes): start it from the
    # same entries (what its own first train message would write), then warm both.
    for folder in ("preprocessed", "propagated"):
        if not (caches[False] / folder).exists():
            shutil.copytree(caches[True] / folder, caches[False] / folder)
    for prepared in (False, True):
        _message("train", data, caches[prepared], plans, prepared=prepared, run_config=RUN_CONFIG)

    runs: dict[tuple[str, bool], list[tuple[float, float]]] = {}
    for _ in range(args.repeats):  # interleaved, so both paths see the same load
        for message in MESSAGES:
            for prepared in (False, True):
                runs.setdefault((message, prepared), []).append(
                    _message(message, data, caches[prepared], plans, prepared=prepared, run_config=RUN_CONFIG))
    _say(f"{'message':<12} {'today s':>8} {'compute':>8} {'overhead':>9} | {'prepared s':>10} {'compute':>8} "
         f"{'overhead':>9} | {'overhead ratio':>14}   (median of {args.repeats} fresh processes each)")
    totals = {key: 0.0 for key in ("today", "prepared", "today-overhead", "prepared-overhead")}
    for message in MESSAGES:
        row = []
        for prepared, name in ((False, "today"), (True, "prepared")):
            seconds = statistics.median(s for s, _ in runs[(message, prepared)])
            compute = statistics.median(c for _, c in runs[(message, prepared)])
            overhead = max(seconds - compute, 0.0)
            totals[name] += seconds
            totals[f"{name}-overhead"] += overhead
            row += [seconds, compute, overhead]
        _say(f"{message:<12} {row[0]:>8.2f} {row[1]:>8.2f} {row[2]:>9.2f} | {row[3]:>10.2f} {row[4]:>8.2f} "
             f"{row[5]:>9.2f} | {row[5] / max(row[2], 1e-9):>14.3f}")
    _say(f"{'sum':<12} {totals['today']:>8.2f} {'':>8} {totals['today-overhead']:>9.2f} | "
         f"{totals['prepared']:>10.2f} {'':>8} {totals['prepared-overhead']:>9.2f}")
    _say(f"site message time ratio {totals['prepared'] / totals['today']:.3f} (whole messages, compute included)")
    _say(f"site message overhead ratio {totals['prepared-overhead'] / totals['today-overhead']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
