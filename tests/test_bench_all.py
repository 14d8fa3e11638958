"""`make bench`'s runner: real benchmark subprocesses at tiny sizes into a document, the document
writer's held / missed logic on fixed figures, and the trainer benchmark's bare step."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from simulations.benchmarks import run_all
from simulations.benchmarks.run_all import render, rows_of, summary_line

TABLE_ROW = re.compile(r"^\| (\S+) \| (.+?) \| (.+?) \| (.+?) \| ([^|]+) \| ([^|]+) \| ([^|]+) \|")


def _table_rows(document: str, title: str) -> list[tuple[str, ...]]:
    """The data rows of the table under `## {title}`."""
    section = document.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    return [m.groups() for line in section.splitlines()
            if (m := TABLE_ROW.match(line)) and not line.startswith("| size") and not line.startswith("| ---")]


def test_quick_run_of_two_stages_writes_the_document(tmp_path, capsys):
    out = tmp_path / "benchmarks.md"
    code = run_all.main(["--quick", "--stages", "preprocessing,aggregation", "--out", str(out),
                         "--work-dir", str(tmp_path / "work")])
    printed = capsys.readouterr().out.strip().splitlines()
    assert code == 0, printed
    document = out.read_text()

    pre = _table_rows(document, "Preprocessing of one volume")
    agg = _table_rows(document, "Aggregation of 10 sites' CPS pairs")
    assert [(r[0], r[1]) for r in pre] == [("quick", "ours vs DefaultPreprocessor.run_case"), ("quick", "cache hit vs miss")]
    assert len(agg) == 1 and agg[0][0] == "quick" and "PairAggregator vs numpy sum" in agg[0][1]
    for size, measure, ours, baseline, ratio, target, holds in pre + agg:
        assert float(ours.removesuffix(" s")) > 0 and float(baseline.removesuffix(" s")) > 0
        assert float(ratio) == pytest.approx(float(ours.removesuffix(" s")) / float(baseline.removesuffix(" s")), rel=0.1, abs=5e-3)
        assert holds in ("yes", "**no**") and (holds == "yes") == (float(ratio) <= float(target.removeprefix("<= ")))
    # the ratios come from the benchmarks' own JSON, written by the commands the document lists
    figures = json.loads((tmp_path / "work" / "preprocessing-quick.json").read_text())
    assert figures["cache_hit_s"] < figures["cache_miss_s"]
    assert "bench_preprocessing --threads 1 --repeats 1" in document and "--json" in document
    assert "## Machine" in document and "commit " in document and "load average" in document
    summary = [line for line in document.splitlines() if line.startswith("summary: ")]
    assert len(summary) == 2 and summary[0] == summary[1] == document.rstrip().splitlines()[-1]
    assert re.match(r"summary: \d of 3 targets held: ", summary[0])
    assert printed[-1] == summary[0]  # the last line printed
    assert sum(line.startswith("[") for line in printed) == 2  # one progress line per run


def test_bad_stage_is_one_line(capsys):
    assert run_all.main(["--quick", "--stages", "inference,nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown nope" in err[0]


# ------------------------------------------------------------------------------------ the document writer
def _record(stage: str, data, size: str = "liqa") -> dict:
    return {"stage": stage, "size": size, "command": f"python -m simulations.benchmarks.x {stage}", "returncode": 0,
            "seconds": 12.0, "load_before": 0.1, "data": data, "error": None, "log": f"runs/bench/{stage}.log"}


def _inference(ours: float, base: float, peak_ours: float | None, peak_base: float | None) -> dict:
    return {"shape": "64,320,380", "spacing": "2.5,1,1", "patch": [48, 128, 128], "size": "T", "threads": 2,
            "device": "cpu", "mirror": False, "repeats": 1, "ours_s": ours, "baseline_s": base, "ratio": ours / base,
            "cpu_s": {"ours": 50.0, "nnunetv2": 40.0}, "system_s": {"ours": 9.0, "nnunetv2": 5.0},
            "peak_mb": None if peak_ours is None else {"ours": peak_ours, "nnunetv2": peak_base},
            "dice": 0.999, "equal_pct": 99.95}


def _trainer(supervised: float, cps: float, bare: float) -> dict:
    def mode(name: str, s: float, unlabeled: int) -> dict:
        return {"mode": name, "size": "T", "patch": "48x128x128", "batch": 2, "unlabeled_batch": unlabeled,
                "threads": 2, "s_per_iter": s, "data_wait_s": 0.01, "peak_rss_MiB": 2000, "device": "cpu",
                "autocast": "off", "peak_gpu_MiB": None}

    return {"modes": {"supervised": mode("supervised", supervised, 0), "cps": mode("cps", cps, 1),
                      "bare": mode("bare", bare, 1)}, "load_before": 0.1, "load_after": 0.2}


FIXED = [
    _record("inference", _inference(30.5, 25.0, 900.0, 1000.0)),        # 1.22 missed, memory 0.9 held
    _record("inference-mirror", _inference(8.0, 20.0, None, None)),     # 0.4 held, no memory row
    _record("preprocessing", {"shape": [64, 320, 380], "spacing": [2.5, 1, 1], "target_spacing": [2.5, 1, 1],
                              "threads": 2, "repeats": 3, "ours_s": 1.1, "baseline_s": 1.0, "ratio": 1.1,
                              "cache_miss_s": 2.0, "cache_hit_s": 0.2, "cache_ratio": 0.1, "peak_rss_mib": 800}),
    _record("trainer", _trainer(supervised=4.0, cps=6.0, bare=5.0)),     # 1.5 held, 1.2 missed
    _record("aggregation", {"size": "B", "width": None, "sites": 10, "repeats": 3, "values": 116_000_000,
                            "ours_s": 3.0, "baseline_s": 2.5, "ratio": 1.2, "peak_rss_mib": 9000}),
    _record("transport", [{"net": "B", "params_M": 116.0, "dtype": d, "payload": n, "reply_wire": n,
                           "objects": 99, "to_site_wire": n} for d, n in (("fp32", 400), ("fp16", 200), ("int8", 120))]),
    _record("stunet", [{"size": "T", "width": 4, "params_M": 0.9, "patch": "48x128x128", "batch": 2, "threads": 2,
                        "s_per_iter": 3.2, "min_s": 3.1, "peak_rss_MiB": 1500}]),
    {**_record("aggregation", None, size="demo"), "returncode": 1, "error": "exit 1: MemoryError"},
]
EXPECTED = [  # (stage, ratio, target, held) of every row, in order
    ("inference", 1.22, 0.8, False), ("inference", 0.9, 1.0, True),
    ("inference-mirror", 0.4, 0.8, True),
    ("preprocessing", 1.1, 1.1, True), ("preprocessing", 0.1, 0.05, False),
    ("trainer", 1.5, 1.6, True), ("trainer", 1.2, 1.1, False),
    ("aggregation", 1.2, 1.5, True),
    ("transport", 0.5, None, None), ("transport", 0.3, 0.25, False),
    ("stunet", None, None, None),
    ("aggregation", None, None, None),
]


def test_rows_judge_each_ratio_against_its_target():
    rows = [row for record in FIXED for row in rows_of(record)]
    got = [(r.stage, None if r.ratio is None else round(r.ratio, 2), r.target, r.held) for r in rows]
    assert got == EXPECTED
    assert rows[-1].measure == "failed" and "MemoryError" in rows[-1].notes
    summary = summary_line(rows)
    assert summary.startswith("summary: 5 of 9 targets held, 1 runs failed: ")
    assert "inference/liqa time 1.220 (<= 0.8 MISSED)" in summary and "inference/liqa memory 0.900 (<= 1 held)" in summary
    assert "preprocessing/liqa cache 0.100 (<= 0.05 MISSED)" in summary and "aggregation/demo FAILED" in summary
    assert "fp16" not in summary  # no target, not judged


def test_document_from_fixed_figures():
    machine = {"cpu_model": "Test CPU", "cores": 2, "usable_cores": 2, "memory": "8.0 GiB", "torch_threads": 2,
               "omp_wait_policy": "(unset)", "python": "3.11", "platform": "Linux", "versions": {"torch": "2"},
               "commit": "abc1234+dirty", "date": "2026-01-01T00:00:00+00:00", "load_before": 0.12,
               "load_after": 0.34, "wall": "20.0 min"}
    document = render(machine, FIXED, "python -m simulations.benchmarks.run_all")
    assert "Test CPU, 2 cores" in document and "abc1234+dirty" in document and "0.12 before, 0.34 after" in document
    inference = _table_rows(document, "Inference, no mirroring")
    assert [(r[2], r[3], r[4], r[6]) for r in inference] == [("30.50 s", "25.00 s", "1.220", "**no**"),
                                                            ("900 MB", "1000 MB", "0.900", "yes")]
    trainer = _table_rows(document, "Local training")
    assert [(r[1], r[4], r[5], r[6]) for r in trainer] == [
        ("CPS vs supervised iteration", "1.500", "<= 1.6", "yes"),
        ("trainer overhead: CPS iteration vs bare step", "1.200", "<= 1.1", "**no**")]
    aggregation = _table_rows(document, "Aggregation of 10 sites' CPS pairs")
    assert [(r[0], r[1], r[6]) for r in aggregation] == [("liqa", "10 STU-Net B pairs: PairAggregator vs numpy sum", "yes"),
                                                        ("demo", "failed", "-")]
    assert "| aggregation | demo | 12 | 0.10 | 1 | `python -m simulations.benchmarks.x aggregation` |" in document
    assert "bench_scale" in document  # run separately, said so
    assert document.rstrip().splitlines()[-1] == summary_line([r for rec in FIXED for r in rows_of(rec)])


# ------------------------------------------------------------------------------------ the bare training step
def test_bare_step_trains_the_trainers_nets_without_its_data(tmp_path, one_thread):
    import torch

    from client.trainer import CPSTrainer, TrainerConfig
    from common.planning import default_test_plans
    from simulations.benchmarks.bench_trainer import _volumes, bare_step_seconds

    plans = default_test_plans((16, 32, 32), size="T", base_width=4)
    labeled, unlabeled = _volumes(tmp_path, plans, (32, 64, 64), cases=1)
    trainer = CPSTrainer(plans, labeled, unlabeled, TrainerConfig(mode="cps", batch_size=2, unlabeled_batch_size=1,
                                                                  prefetch=0, augment=False), log=lambda _: None)
    before = {b: {k: v.clone() for k, v in sd.items()} for b, sd in trainer.state_dicts().items()}
    drawn = []
    trainer._next_batches = lambda: drawn.append(1)  # the bare step must not touch the data pipeline
    seconds = bare_step_seconds(trainer, samples=3, iterations=1)
    assert 0 < seconds < 60 and not drawn
    after = trainer.state_dicts()
    for branch in ("a", "b"):  # both nets took SGD steps
        assert any(not torch.equal(before[branch][k], after[branch][k]) for k in before[branch]), branch
