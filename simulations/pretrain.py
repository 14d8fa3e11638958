"""Pretrain the demo's STU-Net pair on public-like sets, as the method starts from pretrained weights.

    python -m simulations.pretrain --threads 1  # stunet_T4_multiseq_nomirror.safetensors: the default start
                                        # (16 subjects x T1CE, T1, T2, DWI; 1000 its, no mirroring; 38 min)
    python -m simulations.pretrain --mirror-axes 0,1,2 \
        --out simulations/pretrained/stunet_T4_multiseq.safetensors     # the earlier start (nnU-Net's mirroring)
    python -m simulations.pretrain --sequences T1CE --iterations 500 \
        --out simulations/pretrained/stunet_T4_atlas.safetensors       # ATLAS-like only (T1CE)
    python -m simulations.pretrain --sequences T1CE --label-transfer --cases 32 --iterations 2000 \
        --out simulations/pretrained/stunet_T4_atlas_lt.safetensors    # with the label-transfer augmentations

Generates the public set (what `fedliver atlas --sequences` writes: ATLAS-like contrast-enhanced T1,
and by default also the non-contrast sequences public abdominal MRI collections label: T1, T2, DWI),
trains as `fedliver train --pretrain` does (`client.local_training.train_locally`: supervised, liver
= labels 1 and 2), optionally with the label-transfer
augmentations (`client/label_transfer.py`), and exports both nets (branches a and b from different
seeds, heads included: a pair file, `common.pretrained`) as safetensors with a provenance JSON
beside it. No hepatobiliary (GED4) image is in it: those only the sites have. Real sites with GPUs
use released STU-Net checkpoints (`--init`), which load through the same code.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from client.local_training import LocalTrainingConfig, train_locally
from common.federation_config import SHIPPED_PRETRAINING
from common.hashing import sha256_file
from common.label_transfer_config import LabelTransferConfig
from common.model_dir import load_model_dir
from common.pretrained import save_safetensors
from common.run_config import parse_mirror_axes
from simulations.phantoms import generate_atlas_tree

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / SHIPPED_PRETRAINING  # what the demo, `fedliver train` and init-weights "auto" start from
#: Label transfer during pretraining: every augmentation, often (the shape prior is the point).
PRETRAIN_LABEL_TRANSFER = LabelTransferConfig(location_scale=0.5, non_contrast=0.25, random_conv=0.25, transpose=0.5)


def pretrain(out: Path, *, cases: int, iterations: int, base_width: int, seed: int, work: Path,
             label_transfer: LabelTransferConfig = LabelTransferConfig(), sequences: str = "T1CE",
             mirror_axes: tuple[int, ...] = (), threads: int | None = None) -> dict:
    atlas, model = work / "atlas", work / "model"
    generate_atlas_tree(atlas, cases, seed, sequences=[q.strip() for q in sequences.split(",") if q.strip()])
    config = LocalTrainingConfig(
        data=atlas, out=model, pretrain=True, iterations=iterations, size="T", base_width=base_width, seed=seed,
        agreement_volumes=0, log_every=50, label_transfer=label_transfer,
        mirror_axes=mirror_axes, threads=threads,
    )
    if train_locally(config) != 0:
        raise RuntimeError("pretraining (fedliver train --pretrain) failed")
    # Both pretrained nets, heads included (`a.*`, `b.*`): each CPS branch starts from its own.
    pair = {f"{b}.{k}": v for b, state in load_model_dir(model).branches.items() for k, v in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(pair, out)
    info = json.loads((model / "info.json").read_text()) if (model / "info.json").exists() else {}
    flag = (" --label-transfer" if label_transfer.enabled else "") + f" --sequences {sequences}"
    flag += f" --mirror-axes '{','.join(map(str, mirror_axes))}'"
    provenance = {
        "what": "STU-Net pair (branches a and b from different seeds, heads included) pretrained on the "
                + ("multi-sequence public phantom set" if sequences != "T1CE" else "ATLAS-like phantom set"),
        "command": f"python -m simulations.pretrain --cases {cases} --iterations {iterations} "
        f"--base-width {base_width} --seed {seed}{flag} --out {out.name}",
        "atlas": {"cases": cases, "seed": seed, "sequences": sequences.split(",")},
        "size": "T", "base_width": base_width, "iterations": iterations,
        "label_transfer": label_transfer.to_dict(),
        "mirror_axes": list(mirror_axes),
        "train_seconds": info.get("seconds"),
        "sha256": sha256_file(out),
    }
    out.with_suffix(".json").write_text(json.dumps(provenance, indent=1) + "\n")
    return provenance


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--base-width", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sequences", default="T1CE,T1,T2,DWI",
                        help="sequences per public subject (fedliver atlas --sequences; default T1CE,T1,T2,DWI)")
    parser.add_argument("--label-transfer", action="store_true",
                        help="with the label-transfer augmentations (location-scale 0.5, non-contrast 0.25, "
                             "random-conv 0.25, transpose 0.5)")
    parser.add_argument("--mirror-axes", default="",
                        help='axes nnU-Net\'s mirroring flips (default "": none, as the sites train; "0,1,2": how '
                             'stunet_T4_multiseq and the ATLAS-like pairs were made)')
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedliver-pretrain-") as work:
        provenance = pretrain(
            args.out, cases=args.cases, iterations=args.iterations, base_width=args.base_width, seed=args.seed,
            work=Path(work), label_transfer=PRETRAIN_LABEL_TRANSFER if args.label_transfer else LabelTransferConfig(),
            sequences=args.sequences, mirror_axes=parse_mirror_axes(args.mirror_axes), threads=args.threads,
        )
    print(json.dumps(provenance, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
