"""Every benchmark of this folder at the demo's size and at LiQA's, each against its baseline in the
same run, into one document (`make bench`):

    python -m simulations.benchmarks.run_all [--sizes demo,liqa] [--stages inference,...] [--out docs/benchmarks.md] [--quick]

Each (stage, size) runs its `bench_*.py` as a subprocess with `--json`, one after the other (they
would slow each other down); its printed output goes to WORK_DIR/<stage>-<size>.log. One progress
line per run, then the document: the machine, date and commit, a table per stage (ours, the
baseline, the ratio ours / baseline, the target of issue 15 and whether it holds, peak memory) and
the exact command of every run. The last line printed, also the document's, sums up every ratio.
A benchmark that fails is listed as failed and the exit status is 1; a missed target is a result,
not a failure. `--quick`: tiny sizes and one repeat, to check the machinery, not a measurement
(written to WORK_DIR/benchmarks-quick.md unless --out says otherwise).
`bench_scale` (a Flower simulation per site count, tens of minutes) is not run here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SIZES = ("demo", "liqa")
# LiQA's geometry: about 1 x 1 x 2.5 mm, 380 x 320 x 64 voxels (x, y, z), the plans' patch 48 x 128 x 128.
LIQA_VOLUME = ("--shape", "64,320,380", "--spacing", "2.5,1,1", "--patch", "48,128,128")
TINY_VOLUME = ("--shape", "16,40,48", "--patch", "16,32,32")


@dataclass(frozen=True)
class Stage:
    bench: str                        # module in simulations.benchmarks
    title: str
    about: str                        # what is compared, for the document
    args: dict[str, tuple[str, ...]]  # size (demo, liqa, quick) -> command-line arguments



def _volume_args(demo_repeats: int, liqa_repeats: int, extra: tuple[str, ...] = (),
                 large_extra: tuple[str, ...] = ()) -> dict[str, tuple[str, ...]]:
    """Arguments of a bench that takes a volume (inference, preprocessing) at each size; `large_extra`
    is left out at the demo's size only."""
    return {"demo": ("--threads", "2", "--repeats", str(demo_repeats), *extra),
            "liqa": ("--threads", "2", "--repeats", str(liqa_repeats), *extra, *large_extra, *LIQA_VOLUME),
            "quick": ("--threads", "1", "--repeats", "1", *extra, *large_extra, *TINY_VOLUME)}

STAGES: dict[str, Stage] = {
    "inference": Stage(
        "bench_inference", "Inference, no mirroring",
        "`fedliver predict`'s path (`common.inference.predict_image`) vs `nnUNetPredictor.predict_single_npy_array` "
        "(same STU-Net weights, plans, step 0.5, Gaussian), NIfTI file in, segmentation on the raw grid out; "
        "median seconds per volume; peak RSS of one prediction in a fresh process per side.",
        _volume_args(demo_repeats=3, liqa_repeats=1)),
    "inference-mirror": Stage(
        "bench_inference", "Inference, with mirroring",
        "As above with test-time mirroring in both (8 flips: 8x the work). At LiQA size one repeat and no "
        "peak-memory processes (the accumulators are the same as without mirroring).",
        _volume_args(demo_repeats=3, liqa_repeats=1, extra=("--mirror",), large_extra=("--no-memory",))),
    "preprocessing": Stage(
        "bench_preprocessing", "Preprocessing of one volume",
        "`common.preprocessing.preprocess_image` vs `DefaultPreprocessor.run_case` alone (crop, z-score, "
        "resampling to the plans' spacing, here the volume's own); the site cache's hit vs its miss. One "
        "process runs all four, so its peak RSS is theirs together.",
        _volume_args(demo_repeats=3, liqa_repeats=3)),
    "trainer": Stage(
        "bench_trainer", "Local training",
        "One `CPSTrainer` iteration (both nets, nnU-Net augmentation in the background prefetcher): CPS "
        "(2 labeled + 1 unlabeled samples) vs supervised (2 labeled), and CPS vs a bare step of the same two "
        "nets on the same 3 samples with no data loading (forward, cross-entropy per head, backward, SGD): what "
        "the trainer adds. STU-Net T, width 4 (the demo's net), CPU float32; each mode in its own process.",
        {"demo": ("--threads", "2", "--iterations", "5"),
         "liqa": ("--threads", "2", "--iterations", "3", "--patch", "48,128,128", "--spacing", "2.5,1,1"),
         "quick": ("--threads", "1", "--iterations", "1", "--patch", "16,32,32")}),
    "aggregation": Stage(
        "bench_aggregation", "Aggregation of 10 sites' CPS pairs",
        "`server.strategy.PairAggregator` (screening, Flower's FedAvg per branch, update norms) vs a numpy "
        "weighted sum of the same float32 arrays (the memory-bandwidth bound). Demo size: STU-Net T width 4 "
        "pairs; LiQA size: STU-Net B pairs (2 x 58 M parameters each).",
        {"demo": ("--size", "T", "--width", "4", "--sites", "10", "--repeats", "3"),
         "liqa": ("--size", "B", "--sites", "10", "--repeats", "3"),
         "quick": ("--size", "T", "--width", "4", "--sites", "3", "--repeats", "1")}),
    "transport": Stage(
        "bench_transport", "Bytes per training site per round",
        "A site's reply (the CPS pair) as Flower 1.42 puts it on the wire, fp16 and int8 deltas vs fp32 "
        "(bytes, not seconds; int8's design target is <= 0.25). Demo size: STU-Net T width 4; LiQA size: B.",
        {"demo": ("--sizes", "T:4"),
         "liqa": ("--sizes", "B", "--volumes", "0"),
         "quick": ("--sizes", "T:4", "--volumes", "0")}),
    "stunet": Stage(
        "bench_stunet", "STU-Net alone",
        "Forward + backward + SGD step of one STU-Net T (width 4) with a deep-supervision cross-entropy: "
        "the cost floor under training, no baseline.",
        {"demo": ("--size", "T", "--widths", "4", "--patches", "32x64x64", "--iterations", "3"),
         "liqa": ("--size", "T", "--widths", "4", "--patches", "48x128x128", "--iterations", "3"),
         "quick": ("--size", "T", "--widths", "4", "--patches", "16x32x32", "--iterations", "1", "--threads", "1")}),
}

# Issue 15's targets: ratio ours / baseline at most this.
TARGETS = {"inference": 0.8, "inference memory": 1.0, "preprocessing": 1.1, "cache": 0.05, "cps": 1.6,
           "trainer overhead": 1.1, "aggregation": 1.5, "int8": 0.25}


@dataclass(frozen=True)
class Run:
    stage: str
    size: str
    command: tuple[str, ...]  # without --json
    json_path: Path
    log_path: Path


@dataclass(frozen=True)
class Row:
    """One comparison in a stage's table."""
    stage: str
    size: str
    measure: str
    ours: str
    baseline: str
    ratio: float | None
    target: float | None
    memory: str = ""
    notes: str = ""

    @property
    def held(self) -> bool | None:
        if self.ratio is None or self.target is None:
            return None
        return self.ratio <= self.target


def plan(stages: list[str], sizes: list[str], work_dir: Path) -> list[Run]:
    runs = []
    for stage in stages:
        spec = STAGES[stage]
        for size in sizes:
            name = f"{stage}-{size}"
            command = (sys.executable, "-m", f"simulations.benchmarks.{spec.bench}", *spec.args[size])
            runs.append(Run(stage, size, command, work_dir / f"{name}.json", work_dir / f"{name}.log"))
    return runs


def shown(command: tuple[str, ...] | list[str]) -> str:
    """The command as typed in the repository root (paths under it relative)."""
    parts = []
    for part in command:
        path = Path(part)
        if path.is_absolute() and path.is_relative_to(ROOT):
            part = str(path.relative_to(ROOT))
        parts.append(part)
    return shlex.join(parts)


def execute(run: Run) -> dict:
    """Runs one benchmark; the record the document is written from."""
    run.json_path.unlink(missing_ok=True)
    command = [*run.command, "--json", str(run.json_path)]
    started = time.perf_counter()
    load = os.getloadavg()[0]
    with open(run.log_path, "w", encoding="utf-8") as log:
        done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    record = {"stage": run.stage, "size": run.size, "command": shown(command), "returncode": done.returncode,
              "seconds": round(time.perf_counter() - started, 1), "load_before": round(load, 2), "data": None,
              "error": None, "log": shown([str(run.log_path)])}
    if done.returncode == 0 and run.json_path.is_file():
        record["data"] = json.loads(run.json_path.read_text())
    else:
        tail = run.log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        record["error"] = f"exit {done.returncode}: " + " | ".join(line.strip() for line in tail)
    return record


# ------------------------------------------------------------------------------------------ rows
def _s(seconds: float) -> str:
    return f"{seconds:.4f} s" if seconds < 0.1 else f"{seconds:.2f} s"


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def _inference_rows(stage: str, size: str, d: dict) -> list[Row]:
    peak = d.get("peak_mb")
    memory = f"ours {peak['ours']:.0f} MB, nnunetv2 {peak['nnunetv2']:.0f} MB" if peak else "not measured"
    notes = (f"{d['shape']} voxels (z,y,x) at {d['spacing']} mm, patch {'x'.join(map(str, d['patch']))}, "
             f"{d['threads']} threads, median of {d['repeats']}; {d['equal_pct']:.2f}% of voxels equal (Dice "
             f"{d['dice']:.4f}); CPU s ours {d['cpu_s']['ours']:.1f} (system {d['system_s']['ours']:.1f}), "
             f"nnunetv2 {d['cpu_s']['nnunetv2']:.1f} (system {d['system_s']['nnunetv2']:.1f})")
    rows = [Row(stage, size, "s per volume, ours vs nnUNetPredictor", _s(d["ours_s"]), _s(d["baseline_s"]),
                d["ratio"], TARGETS["inference"], memory, notes)]
    if peak:
        rows.append(Row(stage, size, "peak RSS of one prediction", f"{peak['ours']:.0f} MB",
                        f"{peak['nnunetv2']:.0f} MB", peak["ours"] / peak["nnunetv2"], TARGETS["inference memory"]))
    return rows


def _preprocessing_rows(stage: str, size: str, d: dict) -> list[Row]:
    memory = f"{d['peak_rss_mib']:.0f} MiB (process)"
    notes = (f"{'x'.join(map(str, d['shape']))} voxels at {d['spacing']} mm, {d['threads']} threads, "
             f"median of {d['repeats']}")
    return [Row(stage, size, "ours vs DefaultPreprocessor.run_case", _s(d["ours_s"]), _s(d["baseline_s"]),
                d["ratio"], TARGETS["preprocessing"], memory, notes),
            Row(stage, size, "cache hit vs miss", _s(d["cache_hit_s"]), _s(d["cache_miss_s"]), d["cache_ratio"],
                TARGETS["cache"])]


def _trainer_rows(stage: str, size: str, d: dict) -> list[Row]:
    modes = d["modes"]

    def it(mode: str) -> str:
        return f"{modes[mode]['s_per_iter']:.3f} s/it"

    def peak(mode: str) -> str:
        m = modes[mode]
        return f"{m['peak_rss_MiB']} MiB" + (f" (GPU {m['peak_gpu_MiB']} MiB)" if m.get("peak_gpu_MiB") else "")

    rows = []
    if "cps" in modes and "supervised" in modes:
        c, s = modes["cps"], modes["supervised"]
        rows.append(Row(stage, size, "CPS vs supervised iteration", it("cps"), it("supervised"),
                        c["s_per_iter"] / s["s_per_iter"], TARGETS["cps"],
                        f"CPS {peak('cps')}, supervised {peak('supervised')}",
                        f"patch {c['patch']}, batch {c['batch']}+{c['unlabeled_batch']} vs {s['batch']}, "
                        f"{c['threads']} threads, {c['device']}, autocast {c['autocast']}; data wait "
                        f"{c['data_wait_s']:.3f} / {s['data_wait_s']:.3f} s/it"))
    if "cps" in modes and "bare" in modes:
        rows.append(Row(stage, size, "trainer overhead: CPS iteration vs bare step", it("cps"), it("bare"),
                        modes["cps"]["s_per_iter"] / modes["bare"]["s_per_iter"], TARGETS["trainer overhead"],
                        f"bare {peak('bare')}", "bare: the two nets on one fixed batch of the same samples"))
    return rows


def _aggregation_rows(stage: str, size: str, d: dict) -> list[Row]:
    net = f"{d['size']}" + (f" w{d['width']}" if d.get("width") else "")
    return [Row(stage, size, f"{d['sites']} STU-Net {net} pairs: PairAggregator vs numpy sum", _s(d["ours_s"]),
                _s(d["baseline_s"]), d["ratio"], TARGETS["aggregation"], f"{d['peak_rss_mib']:.0f} MiB (process)",
                f"{d['values'] / 1e6:.1f} M values per pair, median of {d['repeats']}")]


def _transport_rows(stage: str, size: str, d: list[dict]) -> list[Row]:
    fp32 = {r["net"]: r for r in d if r["dtype"] == "fp32"}
    rows = []
    for r in d:
        if r["dtype"] == "fp32":
            continue
        base = fp32[r["net"]]
        rows.append(Row(stage, size, f"STU-Net {r['net']} pair, site's reply {r['dtype']} vs fp32 (wire bytes)",
                        _mib(r["reply_wire"]), _mib(base["reply_wire"]), r["reply_wire"] / base["reply_wire"],
                        TARGETS["int8"] if r["dtype"] == "int8" else None, "",
                        f"{r['params_M']:.2f} M parameters; array payload {_mib(r['payload'])}; to the site "
                        f"{_mib(r['to_site_wire'])} ({r['dtype'] if r['dtype'] == 'fp16' else 'fp32'})"))
    return rows


def _stunet_rows(stage: str, size: str, d: list[dict]) -> list[Row]:
    return [Row(stage, size, f"STU-Net {r['size']} w{r['width']}, patch {r['patch']}, batch {r['batch']}: "
                "fwd + bwd + step", f"{r['s_per_iter']:.3f} s/it", "-", None, None, f"{r['peak_rss_MiB']} MiB",
                f"{r['params_M']} M parameters, {r['threads']} threads, min {r['min_s']} s") for r in d]


ROW_BUILDERS = {"inference": _inference_rows, "inference-mirror": _inference_rows, "preprocessing": _preprocessing_rows,
                "trainer": _trainer_rows, "aggregation": _aggregation_rows, "transport": _transport_rows,
                "stunet": _stunet_rows}


def rows_of(record: dict) -> list[Row]:
    if record["data"] is None:
        return [Row(record["stage"], record["size"], "failed", "-", "-", None, None, "", record["error"] or "")]
    return ROW_BUILDERS[record["stage"]](record["stage"], record["size"], record["data"])


def _ratio(r: float) -> str:
    return f"{r:.3f}" if r < 10 else f"{r:.1f}"


def summary_line(rows: list[Row]) -> str:
    """One line: every ratio that has a target, held or missed, then the count."""
    judged = [r for r in rows if r.held is not None]
    failed = [r for r in rows if r.measure == "failed"]
    parts = [f"{r.stage}/{r.size} {_short(r.measure)} {_ratio(r.ratio)} (<= {r.target:g} "
             f"{'held' if r.held else 'MISSED'})" for r in judged]
    parts += [f"{r.stage}/{r.size} FAILED" for r in failed]
    held = sum(bool(r.held) for r in judged)
    return (f"summary: {held} of {len(judged)} targets held" + (f", {len(failed)} runs failed" if failed else "")
            + ": " + "; ".join(parts))


def _short(measure: str) -> str:
    """A row's name in the summary line."""
    for key, short in (("peak RSS", "memory"), ("cache", "cache"), ("overhead", "overhead"), ("CPS vs", "cps"),
                       ("int8", "int8"), ("fp16", "fp16")):
        if key in measure:
            return short
    return "time"


# ------------------------------------------------------------------------------------------ document
def machine_facts() -> dict:
    """What the numbers depend on: the CPU, the threads, the load, the versions, the commit."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    memory = "unknown"
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
            memory = f"{kib / 2**20:.1f} GiB"
    except (OSError, StopIteration):
        pass
    import torch

    versions = {}
    for package in ("torch", "nnunetv2", "flwr", "numpy", "SimpleITK"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {"cpu_model": model, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "memory": memory, "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"), "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions, "commit": git_commit(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def git_commit() -> str:
    """`git rev-parse --short HEAD`, with "+dirty" when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + ("+dirty" if dirty else "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(machine: dict, records: list[dict], invocation: str) -> str:
    """The Markdown document from the machine facts and the runs' records (`execute`'s)."""
    rows = [row for record in records for row in rows_of(record)]
    summary = summary_line(rows)
    quick = any(r["size"] == "quick" for r in records)
    m = machine
    lines = ["# Benchmarks", "",
             f"Written by `make bench` (`{invocation}`); do not edit by hand. Every ratio is ours / the "
             "baseline's, measured in the same run, one benchmark at a time; a target holds when the ratio is "
             "at most the target (issue 15).", ""]
    if quick:
        lines += ["**`--quick`: tiny sizes and one repeat, a check of the machinery, not a measurement.**", ""]
    lines += ["## Machine", "",
              f"- CPU: {m['cpu_model']}, {m['cores']} cores ({m['usable_cores']} usable), {m['memory']} memory",
              f"- torch threads: {m['torch_threads']} by default; each benchmark sets its own (`--threads` in "
              f"its command); OMP_WAIT_POLICY {m['omp_wait_policy']}",
              f"- load average (1 min): {m['load_before']:.2f} before, {m['load_after']:.2f} after",
              f"- date: {m['date']}; commit {m['commit']}; {m.get('wall', '?')} in all",
              f"- Python {m['python']} on {m['platform']}; "
              + ", ".join(f"{k} {v}" for k, v in m["versions"].items()), "",
              "Sizes: **demo** = the demo phantom's (30 x 80 x 96 voxels, z, y, x, at 6 x 3.8 x 3.8 mm, patch "
              "32 x 64 x 64); **liqa** = LiQA's geometry (64 x 320 x 380 voxels at 2.5 x 1 x 1 mm, patch "
              "48 x 128 x 128).", "",
              "## Summary", "", summary, ""]
    for stage, spec in STAGES.items():
        stage_rows = [r for r in rows if r.stage == stage]
        if not stage_rows:
            continue
        lines += [f"## {spec.title} (`{spec.bench}`)", "", spec.about, "",
                  "| size | measure | ours | baseline | ratio | target | holds | peak memory | notes |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in stage_rows:
            held = "-" if r.held is None else ("yes" if r.held else "**no**")
            lines.append("| " + " | ".join(_cell(c) for c in (
                r.size, r.measure, r.ours, r.baseline, "-" if r.ratio is None else _ratio(r.ratio),
                "-" if r.target is None else f"<= {r.target:g}", held, r.memory or "-", r.notes or "-")) + " |")
        lines.append("")
    lines += ["## Commands", "", "Run from the repository root, one after the other; each one's output is in its log.",
              "", "| stage | size | seconds | load before | exit | command |", "| --- | --- | --- | --- | --- | --- |"]
    for r in records:
        lines.append(f"| {r['stage']} | {r['size']} | {r['seconds']:.0f} | {r['load_before']:.2f} | "
                     f"{r['returncode']} | `{_cell(r['command'])}` |")
    lines += ["", "Not run here: `python -m simulations.benchmarks.bench_scale --sites 3,6,12,24` (a Flower "
              "simulation per site count, how a round's cost grows with the number of sites; tens of minutes) "
              "and `python -m simulations.benchmarks.bench_site` (a site's four messages in fresh processes, "
              "today's path vs the prepared dataset, on 30 full-size cases; building them takes about 20 "
              "minutes the first time), run them separately.", "", summary, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.benchmarks.run_all",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma separated, of demo, liqa (default: both)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma separated, of {', '.join(STAGES)} (default: all)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the document (default docs/benchmarks.md; with --quick WORK_DIR/benchmarks-quick.md)")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench", help="JSON and logs of each run")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a check, not a measurement")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    sizes = ["quick"] if args.quick else [s for s in args.sizes.split(",") if s]
    for flag, given, known in (("--stages", stages, tuple(STAGES)), ("--sizes", sizes, SIZES + ("quick",))):
        unknown = [v for v in given if v not in known]
        if unknown or not given:
            print(f"{flag}: {'unknown ' + ', '.join(unknown) if unknown else 'none given'} "
                  f"(known: {', '.join(k for k in known if k != 'quick')})", file=sys.stderr)
            return 2
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.out is None:  # a --quick check never overwrites the measured document
        args.out = args.work_dir / "benchmarks-quick.md" if args.quick else ROOT / "docs" / "benchmarks.md"
    given = argv if argv is not None else sys.argv[1:]
    invocation = shown(["python", "-m", "simulations.benchmarks.run_all", *given])
    machine = machine_facts()
    machine["load_before"] = os.getloadavg()[0]
    runs = plan(stages, sizes, args.work_dir.resolve())
    print(f"{len(runs)} benchmark runs, one at a time; logs in {shown([str(args.work_dir.resolve())])}; "
          f"load average {machine['load_before']:.2f} on {machine['cores']} cores", flush=True)
    started = time.perf_counter()
    records = []
    for i, run in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {run.stage} {run.size}: {shown(run.command)}", flush=True)
        record = execute(run)
        records.append(record)
        if record["data"] is None:
            print(f"    FAILED after {record['seconds']:.0f} s: {record['error']} (log: {record['log']})", flush=True)
            continue
        for row in rows_of(record):
            verdict = "" if row.held is None else f" (<= {row.target:g}: {'held' if row.held else 'missed'})"
            ratio = "" if row.ratio is None else f", ratio {_ratio(row.ratio)}{verdict}"
            print(f"    {row.measure}: {row.ours} vs {row.baseline}{ratio}", flush=True)
        print(f"    {record['seconds']:.0f} s", flush=True)
    machine["load_after"] = os.getloadavg()[0]
    machine["wall"] = f"{(time.perf_counter() - started) / 60:.1f} min"
    (args.work_dir / "results.json").write_text(json.dumps({"machine": machine, "runs": records}, indent=1))
    document = render(machine, records, invocation)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(document, encoding="utf-8")
    print(f"wrote {shown([str(args.out.resolve())])}")
    print(document.rstrip().splitlines()[-1])
    return 0 if all(r["data"] is not None for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
