"""Real scans as a benchmark: each model predicted and scored per case on any dataset `fedliver check` reads.

    python -m simulations.experiments real-mri --data ../shared/data/chaos_t2spir \
        --models start=simulations/pretrained/stunet_T4_synth.safetensors,demo=runs/demo/final_model --out OUT

A model is a MODEL_DIR, or a pretrained pair file (`simulations/pretrain.py`), scored on the plans
its provenance JSON holds (older starts without them: the pretraining grid, `PRETRAIN_SPACING`).
`NAME=PATH` names a model; otherwise its folder or file name does. Predictions are
`fedliver predict` (`client.prediction.predict`, the model's own postprocessing), scores `fedliver
evaluate` (`evaluate_predictions`: Dice and HD95 on the raw grid). Writes:

- OUT/results.csv: model, case, phase, dice, hd95 (one row per scored volume);
- OUT/table.md: per model and phase, mean ± sd, median, n, HD95 and the worst case;
- OUT/overlays/<model>_<rank>_<case>_<phase>.png: each model's three worst cases, three axial
  slices through the true liver with the truth (green) and prediction (red) contours.

Predictions and scores of a model are kept (OUT/pred/<model>/), so a rerun adds only new models.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

from client.overlays import overlay
from client.prediction import PredictConfig, predict
from client.prediction_evaluation import EvaluateConfig, evaluate_predictions

WORST = 3


def parse_models(text: str) -> dict[str, Path]:
    """"NAME=PATH,PATH2" -> {NAME: PATH, <PATH2's name>: PATH2}; ValueError on a repeated name."""
    models: dict[str, Path] = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, _, path = item.rpartition("=")
        path_obj = Path(path)
        name = name or (path_obj.stem if path_obj.suffix == ".safetensors" else path_obj.name)
        if name in models:
            raise ValueError(f"--models: the name {name!r} is given twice (use NAME=PATH)")
        models[name] = path_obj
    if not models:
        raise ValueError("--models: no model given")
    return models


def model_dir_of(path: Path, work: Path) -> Path:
    """`path` if it is a MODEL_DIR; for a pair file, a MODEL_DIR under `work` built from it and its plans."""
    if path.is_dir():
        return path
    if not path.is_file():
        raise ValueError(f"{path}: no such MODEL_DIR or pretrained file")
    from common.model_dir import save_model_dir
    from common.pretrained import read_checkpoint
    from simulations.synthesis.pretraining import pretraining_plans

    provenance_file = path.with_suffix(".json")
    provenance = json.loads(provenance_file.read_text(encoding="utf-8")) if provenance_file.is_file() else {}
    state = read_checkpoint(path)
    branches: dict[str, dict] = {}
    for key, tensor in state.items():
        branch, _, name = key.partition(".")
        branches.setdefault(branch, {})[name] = tensor
    if set(branches) - {"a", "b"}:  # a single net: one branch
        branches = {"a": state}
    width = int(provenance.get("base_width", 4))
    plans = provenance.get("plans") or pretraining_plans(width)
    out = work / path.stem
    save_model_dir(out, branches, plans, {"kind": "pretrained start", "source": str(path),
                                          "plans_from": "provenance" if "plans" in provenance else "pretraining grid"})
    return out


def _stats(values: list[float]) -> tuple[float, float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0), statistics.median(values)


def score_model(name: str, path: Path, data: Path, out: Path, threads: int | None) -> list[dict]:
    """Rows (model, case, phase, dice, hd95) of one model on `data`; kept predictions are reused."""
    pred = out / "pred" / name
    scores = pred / "evaluation.json"
    if not scores.is_file():
        model = model_dir_of(path, out / "models")
        status = predict(PredictConfig(input=data, output=pred, model=model, threads=threads))
        if status not in (0, 1) or not pred.is_dir():  # 1: some volumes failed (each said why); none: the model
            raise RuntimeError(f"{name}: fedliver predict failed")
        evaluate_predictions(EvaluateConfig(pred=pred, truth=data, json=scores))
    report = json.loads(scores.read_text(encoding="utf-8"))
    return [{"model": name, "case": case, "phase": phase, "dice": m["dice"], "hd95": m["hd95"]}
            for case, phases in sorted(report["cases"].items()) for phase, m in sorted(phases.items())]


def format_table(rows: list[dict], data: Path) -> str:
    lines = [f"Real MRI: `{data}`, Dice per case (liver), mean ± sd over n cases.", "",
             "| model | phase | n | Dice mean ± sd | median | HD95 mm | worst case |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["phase"]), []).append(row)
    for (model, phase), group in groups.items():
        mean, sd, median = _stats([r["dice"] for r in group])
        hd = statistics.fmean(r["hd95"] for r in group)
        worst = min(group, key=lambda r: r["dice"])
        lines.append(f"| {model} | {phase} | {len(group)} | {mean:.3f} ± {sd:.3f} | {median:.3f} | {hd:.1f} | "
                     f"{worst['case']} {worst['dice']:.3f} |")
    return "\n".join(lines) + "\n"


def write_overlays(rows: list[dict], data: Path, out: Path) -> list[Path]:
    from client.prediction_evaluation import TruthLookup
    from common.discovery import index_dataset

    cases = {c.case_id: c for c in index_dataset(data, validate=False).cases}
    truth = TruthLookup(data)
    folder = out / "overlays"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for model in dict.fromkeys(r["model"] for r in rows):
        worst = sorted((r for r in rows if r["model"] == model), key=lambda r: r["dice"])[:WORST]
        for rank, row in enumerate(worst, 1):
            case = cases.get(row["case"])
            mask, labels = truth.find(row["case"], row["phase"])
            if case is None or mask is None or row["phase"] not in case.images:
                continue
            target = folder / f"{model}_{rank}_{row['case']}_{row['phase']}.png"
            overlay(Path(case.images[row["phase"]]), mask, labels,
                    out / "pred" / model / row["case"] / f"{row['phase']}_pred.nii.gz",
                    f"{model}: {row['case']} {row['phase']} Dice {row['dice']:.3f}", target)
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.experiments real-mri", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="any dataset fedliver check accepts, with masks")
    parser.add_argument("--models", required=True, help="MODEL_DIRs or pretrained pair files, NAME=PATH,...")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        models = parse_models(args.models)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    if not args.data.exists():
        print(f"{args.data}: no such dataset", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for name, path in models.items():
        try:
            rows += score_model(name, path, args.data, args.out, args.threads)
        except (ValueError, RuntimeError) as e:
            print(" ".join(str(e).split()), file=sys.stderr)
            return 1
    with (args.out / "results.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["model", "case", "phase", "dice", "hd95"])
        writer.writeheader()
        writer.writerows({**r, "dice": f"{r['dice']:.4f}", "hd95": f"{r['hd95']:.2f}"} for r in rows)
    table = format_table(rows, args.data)
    (args.out / "table.md").write_text(table, encoding="utf-8")
    overlays = write_overlays(rows, args.data, args.out)
    print(table)
    print(f"{len(rows)} volume(s) scored -> {args.out / 'results.csv'}, {args.out / 'table.md'}, "
          f"{len(overlays)} overlay(s) in {args.out / 'overlays'}")
    return 0 if rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
