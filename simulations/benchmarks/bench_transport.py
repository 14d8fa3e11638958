"""What one federated round costs on the network, and what fp16 / int8 transport does to the model.

    python -m simulations.benchmarks.bench_transport [--sizes T:4,B] [--model-dir DIR] [--volumes 3]

1. Bytes per round per training site for the CPS pair (both branches), fp32, fp16
   (`common.weights.to_arrayrecord(..., fp16=True)`) and int8 deltas (run config `int8-updates`,
   `common.quantization.encode_int8_delta`: the site's update only; the server still sends fp32 or
   fp16): the array payload (`record_nbytes`, what the ServerApp logs as "bytes") and the message
   as Flower 1.42 puts it on the wire: every object of the content-addressed tree (records, arrays,
   5 MiB array chunks) deflated with Flower's own `deflate()`, counted once per object id, as the
   SuperNode pushes them. Server -> site carries the same arrays plus the round's config (plans
   JSON); TLS/HTTP framing is not included. The last lines give both ratios of the reply,
   fp16/fp32 and int8/fp32 (target of int8: <= 0.25).
2. The fp16 round trip of a model's weights (max / relative error, values that flush to zero), and
   the int8 round trip of a synthetic update (N(0, 1e-3) per weight): error per tensor against
   half its quantisation step.
3. If a trained MODEL_DIR exists (default runs/demo/checkpoints/best): Dice of the pair's
   predictions on phantom volumes with the original and the fp16-round-tripped weights
   (`common.inference.predict_image`, `common.metrics.dice`). Nothing is trained here.

Memory: STU-Net B is 2 x 58 M parameters; its pair takes about 2 GB while measured.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from common.names import BRANCHES

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[2] / "runs" / "demo" / "checkpoints" / "best"


def wire_bytes(content) -> tuple[int, int]:
    """(bytes, objects) of a RecordDict as Flower transmits it: each unique object's deflated form."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    objects = get_all_nested_objects(content)  # keyed by object id: duplicates travel once
    return sum(len(obj.deflate()) for obj in objects.values()), len(objects)


def pair_of(size: str, width: int | None) -> dict[str, np.ndarray]:
    """Both CPS branches of an STU-Net (2 classes, deep-supervision heads, as trained), flattened."""
    import torch

    from common.stunet import build_stunet
    from common.weights import flatten

    branches = {}
    for seed, name in enumerate(BRANCHES):
        torch.manual_seed(seed)
        branches[name] = build_stunet(size, num_classes=2, base_width=width).state_dict()
    return flatten(branches)


def transport_rows(size: str, width: int | None) -> list[dict]:
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from common.quantization import encode_int8_delta
    from common.weights import record_nbytes, to_arrayrecord

    flat = pair_of(size, width)
    params = sum(a.size for a in flat.values())
    trained = synthetic_update(flat)
    # The round config carries the plans JSON (a few KB); the reply a handful of metrics.
    config = ConfigRecord({"plans-json": "x" * 6000, "plans-sha256": "0" * 64, "server-round": 1})
    rows = []
    for dtype in ("fp32", "fp16", "int8"):
        arrays = encode_int8_delta(trained, flat) if dtype == "int8" else to_arrayrecord(trained, fp16=dtype == "fp16")
        reply = RecordDict({"arrays": arrays, "metrics": MetricRecord({f"m{i}": 0.0 for i in range(12)}),
                            "plans": ConfigRecord({"sha256": "0" * 64})})
        send, _ = wire_bytes(RecordDict({"arrays": to_arrayrecord(flat, fp16=dtype == "fp16"), "config": config}))
        back, objects = wire_bytes(reply)
        rows.append({"net": f"{size}{'' if width is None else f' w{width}'}", "params_M": params / 1e6,
                     "dtype": dtype, "payload": record_nbytes(arrays),
                     "reply_wire": back, "objects": objects, "to_site_wire": send})
    return rows


def synthetic_update(flat: dict[str, np.ndarray], std: float = 1e-3) -> dict[str, np.ndarray]:
    """The pair after a round of local training, as far as bytes and rounding go: N(0, std) per weight."""
    rng = np.random.default_rng(0)
    return {k: (v + rng.normal(0.0, std, v.shape)).astype(np.float32) for k, v in flat.items()}


def mib(n: float) -> str:
    return f"{n / 2**20:9.2f}"


def print_transport(rows: list[dict]) -> None:
    print("bytes per round per training site (CPS pair = both branches; MiB = 2^20 bytes)")
    print(f"{'net':<8}{'pair params':>13}{'dtype':>6}{'payload MiB':>13}{'reply wire':>12}{'objects':>9}"
          f"{'to site wire':>14}{'reply/fp32':>12}")
    fp32, ratios = {}, {}
    for row in rows:
        ratio = ""
        if row["dtype"] == "fp32":
            fp32[row["net"]] = row["reply_wire"]
        else:
            ratios[(row["net"], row["dtype"])] = row["reply_wire"] / fp32[row["net"]]
            ratio = f"{ratios[(row['net'], row['dtype'])]:.3f}"
        print(f"{row['net']:<8}{row['params_M']:>12.2f}M{row['dtype']:>6}{mib(row['payload']):>13}"
              f"{mib(row['reply_wire']):>12}{row['objects']:>9}{mib(row['to_site_wire']):>14}{ratio:>12}")
    print("per round a training site receives the pair once for training and once for evaluation "
          "(fp16 with fp16-transport, else fp32; int8 is for the site's update only), and sends it back once.")
    for net in fp32:
        print(f"{net}: reply bytes on the wire fp16/fp32 = {ratios[(net, 'fp16')]:.4f}, "
              f"int8/fp32 = {ratios[(net, 'int8')]:.4f} (int8 target <= 0.25)")


def roundtrip(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from common.weights import from_arrayrecord, to_arrayrecord

    return from_arrayrecord(to_arrayrecord(flat, fp16=True))


def print_roundtrip_error(flat: dict[str, np.ndarray], label: str) -> None:
    back = roundtrip(flat)
    a = np.concatenate([v.ravel() for v in flat.values()])
    b = np.concatenate([back[k].ravel() for k in flat])
    err = np.abs(a - b)
    flushed = int(((a != 0) & (b == 0)).sum())
    print(f"fp16 round trip of {label}: {a.size} values, max |err| {err.max():.3g}, "
          f"relative L2 error {np.linalg.norm(a - b) / np.linalg.norm(a):.3g}, "
          f"max relative error (|w| >= 1e-4) {(err / np.maximum(np.abs(a), 1e-4)).max():.3g}, "
          f"{flushed} nonzero values flushed to 0, |w| max {np.abs(a).max():.3g} (fp16 max 65504)")


def print_int8_error(flat: dict[str, np.ndarray], label: str) -> None:
    from common.quantization import decode_int8_delta, dequantize_int8, encode_int8_delta, quantize_int8

    trained = synthetic_update(flat)
    decoded = decode_int8_delta(encode_int8_delta(trained, flat), flat)
    codec, model, delta_sq, error_sq = 0.0, 0.0, 0.0, 0.0
    for key, value in flat.items():
        delta = trained[key] - value
        q, scale = quantize_int8(delta)
        if not scale:
            continue
        codec = max(codec, float(np.abs(dequantize_int8(q, scale) - delta).max() / scale))
        error = decoded[key].astype(np.float64) - trained[key]
        model = max(model, float(np.abs(error).max() / scale))
        delta_sq, error_sq = delta_sq + float(np.sum(delta.astype(np.float64) ** 2)), error_sq + float(np.sum(error ** 2))
    print(f"int8 round trip of an update of {label} (N(0, 1e-3) per weight): max |err| of the delta "
          f"{codec:.4f} of its tensor's step (bound 0.5), of the decoded weights {model:.4f} (plus float32 "
          f"rounding of weight + delta); relative L2 error of the update {np.sqrt(error_sq / delta_sq):.3g}")


def dice_effect(model_dir: Path, volumes: int, step: float) -> None:
    import SimpleITK as sitk
    import torch

    from common.metrics import dice
    from common.model_dir import load_model_dir
    from common.inference import predict_image
    from common.phases import PHASES, image_filename, mask_filename
    from common.weights import flatten, to_torch, unflatten
    from simulations.phantoms import PhantomConfig, generate_liqa_tree

    torch.set_num_threads(1)
    bundle = load_model_dir(model_dir)
    flat = flatten({name: bundle.branches[name] for name in BRANCHES})
    print_roundtrip_error(flat, f"{model_dir} (trained pair)")
    nets32 = bundle.build_nets()
    bundle.branches = to_torch(unflatten(roundtrip(flat)))
    nets16 = bundle.build_nets()
    with tempfile.TemporaryDirectory(prefix="bench-transport-") as tmp:
        # A held-out-style case: every phase has a mask, unseen by any training.
        generate_liqa_tree(Path(tmp), PhantomConfig(centers=("C",), cases=1, heldout=("C",), seed=7))
        case_dir = next((Path(tmp) / "Vendor_C").iterdir())
        print(f"\nDice on {volumes} phantom volumes ({case_dir.name}), sliding-window step {step}:")
        print(f"{'phase':<9}{'Dice fp32':>10}{'Dice fp16':>10}{'fp32 vs fp16':>14}{'voxels differing':>18}")
        for phase in [p for p in PHASES if (case_dir / image_filename(p)).is_file()][:volumes]:
            truth = sitk.GetArrayFromImage(sitk.ReadImage(str(case_dir / mask_filename(phase))))
            started = time.perf_counter()
            p32 = sitk.GetArrayFromImage(predict_image(nets32, case_dir / image_filename(phase), bundle.plans, step=step))
            p16 = sitk.GetArrayFromImage(predict_image(nets16, case_dir / image_filename(phase), bundle.plans, step=step))
            print(f"{phase:<9}{dice(p32, truth):>10.4f}{dice(p16, truth):>10.4f}{dice(p32, p16):>14.4f}"
                  f"{int((p32 != p16).sum()):>18}   ({time.perf_counter() - started:.0f}s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.benchmarks.bench_transport",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="T:4,B",
                        help="STU-Net sizes, SIZE or SIZE:WIDTH, comma separated (default T:4,B)")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR,
                        help=f"trained MODEL_DIR for the Dice check (default {DEFAULT_MODEL_DIR})")
    parser.add_argument("--volumes", type=int, default=3, help="phantom volumes for the Dice check")
    parser.add_argument("--step", type=float, default=0.5, help="sliding-window step for the Dice check")
    parser.add_argument("--json", type=Path, help="also write the byte table as JSON here")
    args = parser.parse_args(argv)

    rows = []
    for spec in filter(None, (s.strip() for s in args.sizes.split(","))):
        size, _, width = spec.partition(":")
        rows += transport_rows(size, int(width) if width else None)
    print_transport(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))

    print()
    print_int8_error(pair_of("T", 4), "a T w4 pair")
    if (args.model_dir / "model.safetensors").is_file():
        dice_effect(args.model_dir, args.volumes, args.step)
    else:
        print(f"no trained MODEL_DIR at {args.model_dir}: weight round trip of a fresh T w4 pair only "
              "(train one with `python -m simulations.demo`, or pass --model-dir)")
        print_roundtrip_error(pair_of("T", 4), "a freshly initialised T w4 pair")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
