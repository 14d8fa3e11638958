"""Does site training keep what the start knows about real MRI? One start, site-training arms, two scores.

    python -m simulations.experiments start-retention --phantoms P --real ../shared/data/chaos_t2spir \
        --start simulations/pretrained/stunet_T4_synth.safetensors --arms default,frozen-encoder --out OUT

Each arm is pooled `fedliver train` (`train_locally`) on the phantom training centres (A, B1, B2) of P
from the same start, at one budget and seed, then scored on real scans (`real-mri`: Dice per case)
and on P's held-out centre C (`fedliver predict` + `fedliver evaluate`, per phase). The start itself
is scored on the real scans as the reference. Arms (site-training options):

- default: today's defaults;
- encoder-lr-0.1 / frozen-encoder: the encoder at 0.1x the learning rate / frozen (`--encoder-lr-scale`);
- label-transfer: location-scale and random convolutions at 0.5 (`client/label_transfer.py`);
- lr-0.003: a lower learning rate everywhere.

Writes OUT/table.md and OUT/results.csv (arm, group, phase, n, dice_mean, dice_sd, dice_min). Finished
arms are kept (OUT/<arm>/), so a rerun only runs what is missing.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

from client.local_training import LocalTrainingConfig, train_locally
from client.prediction import PredictConfig, predict
from client.prediction_evaluation import EvaluateConfig, evaluate_predictions
from common.label_transfer_config import LabelTransferConfig
from simulations.experiments.real_mri import score_model

ARMS: dict[str, dict] = {
    "default": {},
    "encoder-lr-0.1": {"encoder_lr_scale": 0.1},
    "frozen-encoder": {"encoder_lr_scale": 0.0},
    "label-transfer": {"label_transfer": LabelTransferConfig(location_scale=0.5, random_conv=0.5)},
    "lr-0.003": {"lr": 0.003},
}
PHASES = ("GED4", "T1", "T2", "DWI_800")


def run_arm(name: str, base: LocalTrainingConfig, out: Path, real: Path, heldout: Path, threads: int) -> list[dict]:
    folder = out / name
    model = folder / "model"
    if not (model / "info.json").is_file():
        if train_locally(replace(base, out=model, **ARMS[name])) != 0:
            raise RuntimeError(f"arm {name}: training failed")
    scores = folder / "C" / "evaluation.json"
    if not scores.is_file():
        predict(PredictConfig(input=heldout, output=folder / "C", model=model, threads=threads))
        evaluate_predictions(EvaluateConfig(pred=folder / "C", truth=heldout, json=scores))
    real_rows = score_model(name, model, real, out / "real", threads)
    rows = [_row(name, "real", real_rows[0]["phase"], [r["dice"] for r in real_rows])]
    summary = json.loads(scores.read_text())["summary"]
    cases = json.loads(scores.read_text())["cases"]
    for phase in PHASES:
        if phase in summary:
            rows.append(_row(name, "C", phase, [c[phase]["dice"] for c in cases.values() if phase in c]))
    return rows


def _row(arm: str, group: str, phase: str, dice: list[float]) -> dict:
    return {"arm": arm, "group": group, "phase": phase, "n": len(dice), "dice_mean": statistics.fmean(dice),
            "dice_sd": statistics.stdev(dice) if len(dice) > 1 else 0.0, "dice_min": min(dice)}


def format_table(rows: list[dict], start_row: dict) -> str:
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    head = "| arm | real (n) | real min | " + " | ".join(f"C {p}" for p in PHASES) + " |"
    lines = [head, "|" + " --- |" * (3 + len(PHASES)),
             f"| the start itself | {start_row['dice_mean']:.3f} ± {start_row['dice_sd']:.3f} ({start_row['n']}) | "
             f"{start_row['dice_min']:.3f} |" + " |" * len(PHASES)]
    for arm in arms:
        real = next(r for r in rows if r["arm"] == arm and r["group"] == "real")
        c = {r["phase"]: r for r in rows if r["arm"] == arm and r["group"] == "C"}
        lines.append(f"| {arm} | {real['dice_mean']:.3f} ± {real['dice_sd']:.3f} ({real['n']}) | {real['dice_min']:.3f} | "
                     + " | ".join(f"{c[p]['dice_mean']:.3f}" if p in c else "-" for p in PHASES) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.experiments start-retention",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--phantoms", type=Path, required=True, help="a phantom tree with training centres and C")
    parser.add_argument("--real", type=Path, required=True, help="real scans with masks (any dataset fedliver check reads)")
    parser.add_argument("--start", type=Path, required=True, help="the pretrained pair file every arm starts from")
    parser.add_argument("--arms", default="default,frozen-encoder", help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--centers", default="A,B1,B2")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        print(f"--arms: unknown arm(s) {', '.join(unknown)} (choose from {', '.join(ARMS)})", file=sys.stderr)
        return 2
    base = LocalTrainingConfig(data=args.phantoms, out=args.out / "unused", centers=tuple(args.centers.split(",")),
                               init=args.start, iterations=args.iterations, seed=args.seed, threads=args.threads,
                               cache=args.out / "cache")
    start = score_model("start", args.start, args.real, args.out / "real", args.threads)
    start_row = _row("start", "real", start[0]["phase"], [r["dice"] for r in start])
    rows = []
    for arm in arms:
        rows += run_arm(arm, base, args.out, args.real, args.phantoms / "Vendor_C", args.threads)
    with (args.out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([start_row, *rows])
    table = format_table(rows, start_row)
    (args.out / "table.md").write_text(f"Start: `{args.start.name}`; {args.iterations} pooled iterations on "
                                       f"{args.centers}, seed {args.seed}; real: `{args.real}`.\n\n" + table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
