"""Pretrain the demo's STU-Net on the ATLAS-like public set, as the method pretrains on ATLAS.

    python -m simulations.pretrain --out simulations/pretrained/stunet_T4_atlas.safetensors

Generates the ATLAS-like set (`fedliver atlas`), runs `fedliver train --pretrain` (supervised,
liver = labels 1 and 2), and exports the body of branch "a" as safetensors with a provenance
JSON beside it. The demo starts its CPS pair from this file; real sites use released STU-Net
checkpoints (`--init`), which load through the same code.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common.hashing import sha256_file
from common.model_dir import load_model_dir
from common.pretrained import HEAD_PREFIX, save_safetensors
from fedliver.cli import main as fedliver

DEFAULT_OUT = Path(__file__).resolve().parent / "pretrained" / "stunet_T4_atlas.safetensors"


def pretrain(out: Path, *, cases: int, iterations: int, base_width: int, seed: int, work: Path) -> dict:
    atlas, model = work / "atlas", work / "model"
    if fedliver(["atlas", str(atlas), "--cases", str(cases), "--seed", str(seed)]) != 0:
        raise RuntimeError("fedliver atlas failed")
    train_args = [
        "train", "--data", str(atlas), "--pretrain", "--out", str(model), "--iterations", str(iterations),
        "--size", "T", "--base-width", str(base_width), "--seed", str(seed), "--agreement-volumes", "0",
    ]
    if fedliver(train_args) != 0:
        raise RuntimeError("fedliver train --pretrain failed")
    body = {k: v for k, v in load_model_dir(model).branches["a"].items() if not k.startswith(HEAD_PREFIX)}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(body, out)
    provenance = {
        "what": "STU-Net body (no seg_outputs heads) pretrained on the ATLAS-like phantom set",
        "command": f"python -m simulations.pretrain --cases {cases} --iterations {iterations} "
        f"--base-width {base_width} --seed {seed}",
        "atlas": {"cases": cases, "seed": seed},
        "size": "T", "base_width": base_width, "iterations": iterations,
        "sha256": sha256_file(out),
    }
    out.with_suffix(".json").write_text(json.dumps(provenance, indent=1) + "\n")
    return provenance


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--base-width", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedliver-pretrain-") as work:
        provenance = pretrain(
            args.out, cases=args.cases, iterations=args.iterations, base_width=args.base_width, seed=args.seed,
            work=Path(work),
        )
    print(json.dumps(provenance, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
