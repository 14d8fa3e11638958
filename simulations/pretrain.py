"""Pretrain the demo's STU-Net pair on public-like sets, as the method starts from pretrained weights.

    python -m simulations.pretrain --threads 1   # = --generator label-maps --maps 64 --iterations 4000
        --init simulations/pretrained/stunet_T4_multiseq_nomirror.safetensors
        --out simulations/pretrained/stunet_T4_synth.safetensors     # the default start (domain-randomised,
                                        # `simulations.synthesis`; 42 min on 1 thread; its JSON holds the init's too)
    python -m simulations.pretrain --generator phantoms --threads 1 \
        --out simulations/pretrained/stunet_T4_multiseq_nomirror.safetensors  # the start before it
                                        # (16 subjects x T1CE, T1, T2, DWI; 1000 its, no mirroring; 38 min)
    python -m simulations.pretrain --generator phantoms --mirror-axes 0,1,2 \
        --out simulations/pretrained/stunet_T4_multiseq.safetensors     # the earlier start (nnU-Net's mirroring)
    python -m simulations.pretrain --generator phantoms --sequences T1CE --iterations 500 \
        --out simulations/pretrained/stunet_T4_atlas.safetensors       # ATLAS-like only (T1CE)
    python -m simulations.pretrain --generator phantoms --sequences T1CE --label-transfer --cases 32 --iterations 2000 \
        --out simulations/pretrained/stunet_T4_atlas_lt.safetensors    # with the label-transfer augmentations

--generator label-maps (the default): images drawn from phantom tissue label maps at every sample
(`simulations.synthesis`: SynthSeg-style domain randomisation), optionally with the real labeled
scans of --extra-data. --generator phantoms: generates the public set (what `fedliver atlas --sequences` writes: ATLAS-like contrast-enhanced T1,
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
PHANTOM_OUT = REPO / "simulations" / "pretrained" / "stunet_T4_multiseq_nomirror.safetensors"  # the start before it
#: Label transfer during pretraining: every augmentation, often (the shape prior is the point).
PRETRAIN_LABEL_TRANSFER = LabelTransferConfig(location_scale=0.5, non_contrast=0.25, random_conv=0.25, transpose=0.5)


def _save_pair(model: Path, out: Path) -> None:
    """Both nets of MODEL_DIR `model`, heads included (`a.*`, `b.*`), as one safetensors file: each CPS
    branch starts from its own."""
    pair = {f"{b}.{k}": v for b, state in load_model_dir(model).branches.items() for k, v in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(pair, out)


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
    _save_pair(model, out)
    info = json.loads((model / "info.json").read_text(encoding="utf-8")) if (model / "info.json").exists() else {}
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


def _provenance_of(init: Path | None) -> dict | None:
    """The start's own command, cost and hash, when it is a pretrained file with a provenance JSON (a chain of stages)."""
    if init is None or not Path(init).with_suffix(".json").is_file():
        return None
    earlier = json.loads(Path(init).with_suffix(".json").read_text(encoding="utf-8"))
    return {k: earlier.get(k) for k in ("command", "iterations", "train_seconds", "sha256", "init", "init_provenance")}


def pretrain_label_maps(out: Path, *, maps: int, iterations: int, base_width: int, seed: int, work: Path,
                        init: Path | None, extra_data: tuple[Path, ...] = (), exclude: tuple[str, ...] = (),
                        threads: int | None = None, model_dir: Path | None = None, learning_rate: float = 0.01) -> dict:
    """The domain-randomised start (`simulations.synthesis`): a pair file and its provenance JSON."""
    from simulations.synthesis.pretraining import DomainRandomisedPretraining, pretrain_on_label_maps

    model = model_dir or work / "model"
    info = pretrain_on_label_maps(DomainRandomisedPretraining(
        out=model, work=work, maps=maps, iterations=iterations, base_width=base_width, seed=seed, init=init,
        extra_data=extra_data, exclude_cases=exclude, threads=threads, learning_rate=learning_rate))
    _save_pair(model, out)
    extra = f" --extra-data {','.join(map(str, extra_data))}" if extra_data else ""
    extra += f" --exclude {','.join(exclude)}" if exclude else ""
    provenance = {
        "what": "STU-Net pair (branches a and b from different seeds, heads included) pretrained on images drawn "
                "at every sample from phantom tissue label maps (domain randomisation, SynthSeg-style)"
                + (" and on the real scans of --extra-data" if extra_data else ""),
        "command": f"python -m simulations.pretrain --generator label-maps --maps {maps} --iterations {iterations} "
                   f"--base-width {base_width} --seed {seed} --lr {learning_rate}"
                   + (f" --init {Path(init).name}" if init else " --init none") + extra + f" --out {out.name}",
        **{k: info[k] for k in ("generator", "maps", "seed", "size", "base_width", "iterations", "patch_size",
                                "spacing", "batch_size", "learning_rate", "synthesis", "label_maps", "mirror_axes",
                                "extra_volumes", "excluded_cases")},
        "init": Path(init).name if init else None,
        "init_provenance": _provenance_of(init),
        "train_seconds": info["seconds"], "seconds_per_iteration": info["seconds_per_iteration"],
        "threads": threads,
        "plans": json.loads((model / "plans.json").read_text(encoding="utf-8")),
        "sha256": sha256_file(out),
    }
    out.with_suffix(".json").write_text(json.dumps(provenance, indent=1) + "\n")
    return provenance


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help=f"default: {DEFAULT_OUT.name} (label-maps), {PHANTOM_OUT.name} (phantoms)")
    parser.add_argument("--generator", choices=("label-maps", "phantoms"), default="label-maps",
                        help="label-maps: images drawn from tissue label maps at every sample (domain randomisation, "
                             "the default start); phantoms: the rendered public phantom set (the earlier starts)")
    parser.add_argument("--maps", type=int, default=64, help="label maps (patients) of --generator label-maps")
    parser.add_argument("--init", default=str(PHANTOM_OUT),
                        help='label-maps: a pair file or MODEL_DIR to start from ("none": random; default: the '
                             'phantom start, stunet_T4_multiseq_nomirror)')
    parser.add_argument("--extra-data", default="",
                        help="label-maps: nnU-Net raw datasets (comma-separated) whose liver label (found by name "
                             "in dataset.json) also trains, e.g. CHAOS or AMOS-MRI")
    parser.add_argument("--exclude", default="", help="extra-data cases (comma-separated ids) left out")
    parser.add_argument("--lr", type=float, default=0.01, help="label-maps: initial learning rate of the poly schedule")
    parser.add_argument("--work", type=Path, default=None,
                        help="label-maps: keep label maps, preprocessed extra data and the MODEL_DIR here")
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=None, help="default: 4000 (label-maps), 1000 (phantoms)")
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
    args.out = args.out or (DEFAULT_OUT if args.generator == "label-maps" else PHANTOM_OUT)
    if args.generator == "label-maps":
        split = lambda text: tuple(v.strip() for v in text.split(",") if v.strip())  # noqa: E731
        with tempfile.TemporaryDirectory(prefix="fedliver-pretrain-") as tmp:
            work = args.work or Path(tmp)
            provenance = pretrain_label_maps(
                args.out, maps=args.maps, iterations=args.iterations or 4000, base_width=args.base_width,
                seed=args.seed, work=work, init=None if args.init == "none" else Path(args.init),
                extra_data=tuple(Path(p) for p in split(args.extra_data)), exclude=split(args.exclude),
                threads=args.threads, learning_rate=args.lr)
        print(json.dumps({k: v for k, v in provenance.items() if k != "plans"}, indent=1))
        return 0
    args.iterations = args.iterations or 1000
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
