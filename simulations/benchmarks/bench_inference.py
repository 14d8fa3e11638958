"""Seconds per volume of `common.inference.predict_image` vs nnunetv2's own predictor, same run.

Both start from the same NIfTI file and end with a segmentation on its raw grid, with the same
STU-Net weights, plans, step 0.5, Gaussian weighting and no mirroring (unless --mirror):
  ours:     predict_image([net], file, plans)
  baseline: the plans' reader (SimpleITKIOWithReorient) + nnUNetPredictor(device=cpu).manual_initialization(...)
            + predict_single_npy_array (nnU-Net averages logits and accumulates in fp16)
Both are warmed up on a one-patch volume (imports, caches, oneDNN kernels for the patch shape), then
timed in turns, ours and the baseline alternating which goes first, so a busy machine slows both
alike. Prints per side the median seconds, CPU (user + system) and system seconds per volume, and
the peak resident memory of one prediction in a fresh process of its own (`--memory`, on by
default: the two sides cannot mask each other); then how well the segmentations agree, and last
the ratio. The default volume is the demo phantom's size; LiQA's geometry:

    python -m simulations.benchmarks.bench_inference --threads 2 --repeats 1 \\
        --shape 64,320,380 --spacing 2.5,1,1 --patch 48,128,128
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIDES = ("ours", "nnunetv2")


def _parse(text: str, cast=int) -> tuple:
    return tuple(cast(v) for v in text.replace("x", ",").split(","))


def _volume(shape_zyx: tuple[int, int, int], spacing_zyx: tuple[float, float, float], path: Path) -> None:
    """A smooth blob over noise inside a zero border: something a random net gives structure on."""
    import numpy as np
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_zyx], indexing="ij")
    img = 80 + 120 * (x**2 / 0.4 + y**2 / 0.3 + z**2 / 0.6 < 1) + rng.normal(0, 10, shape_zyx)
    img[:, :2] = 0
    image = sitk.GetImageFromArray(img.astype(np.float32))
    image.SetSpacing(tuple(reversed(spacing_zyx)))
    sitk.WriteImage(image, str(path))


def _usage() -> tuple[float, float]:
    """(user + system, system) CPU seconds of this process so far, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_stime


def _status_mb(field: str) -> float:
    """A memory line of /proc/self/status in MB: VmRSS (now) or VmHWM (peak of this process's own
    memory; unlike getrusage's ru_maxrss it does not start from the parent's size at the fork)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _predictors(args):
    """{"ours": fn(file) -> (z, y, x) array, "nnunetv2": ...} on the same net, plans and settings."""
    import numpy as np
    import SimpleITK as sitk
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from common.image_io import image_reader, reader_name, to_file_order
    from common.inference import predict_image
    from common.planning import CONFIGURATION, DATASET_JSON, default_test_plans
    from common.stunet import build_stunet_from_plans

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    plans = default_test_plans(patch_size=_parse(args.patch), spacing=_parse(args.spacing, float), size=args.size)
    torch.manual_seed(0)
    net = build_stunet_from_plans(plans, deep_supervision=False).to(device).eval()

    plans_manager = PlansManager(plans)
    reader = image_reader(reader_name(plans))  # the plans' reader, as nnU-Net's predictor would pick
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=args.mirror,
                                perform_everything_on_device=device.type == "cuda", device=device,
                                allow_tqdm=False)
    predictor.manual_initialization(net, plans_manager, plans_manager.get_configuration(CONFIGURATION),
                                    [{k: v for k, v in net.state_dict().items()}], dict(DATASET_JSON),
                                    "nnUNetTrainer", (0, 1, 2))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def baseline(file: Path):
        data, props = reader.read_images([str(file)])
        with contextlib.redirect_stdout(io.StringIO()):
            seg = predictor.predict_single_npy_array(data, props)
        sync()
        return to_file_order(np.asarray(seg), props)  # as nnU-Net's write_seg puts it back

    def ours(file: Path):
        seg = sitk.GetArrayFromImage(predict_image([net], file, plans, mirror=args.mirror))
        sync()
        return seg

    return {"ours": ours, "nnunetv2": baseline}, plans, net


def _peak_memory(args) -> int:
    """Child mode: one prediction by one side; prints JSON with the peak RSS (MB) of this process."""
    fns, _, _ = _predictors(args)
    start = _status_mb("VmRSS")
    fns[args.measure_memory](Path(args.volume))
    print(json.dumps({"peak_mb": _status_mb("VmHWM"), "start_mb": start}))
    return 0


def _memory_in_fresh_process(side: str, file: Path, argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "simulations.benchmarks.bench_inference", *argv,
                          "--measure-memory", side, "--volume", str(file)],
                         capture_output=True, text=True, encoding="utf-8", cwd=Path(__file__).resolve().parents[2])
    if out.returncode != 0:
        raise RuntimeError(f"memory measurement of {side} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="30,80,96", help="volume z,y,x (default: demo phantom size)")
    parser.add_argument("--spacing", default="6,3.8,3.8", help="volume spacing z,y,x in mm")
    parser.add_argument("--patch", default="32,64,64", help="plans patch z,y,x (default: the demo's)")
    parser.add_argument("--size", default="T", help="STU-Net size of the plans")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mirror", action="store_true", help="test-time mirroring in both")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both predictors run there)")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                        help="peak memory of each side, one prediction in a fresh process (default: on)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here (for run_all)")
    parser.add_argument("--measure-memory", choices=SIDES, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--volume", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_memory:
        return _peak_memory(args)
    shared = ["--spacing", args.spacing, "--patch", args.patch, "--size", args.size, "--threads", str(args.threads),
              "--device", args.device] + (["--mirror"] if args.mirror else [])

    import numpy as np

    from common.metrics import dice
    from common.planning import CONFIGURATION

    fns, plans, net = _predictors(args)
    spacing = _parse(args.spacing, float)
    patch = plans["configurations"][CONFIGURATION]["patch_size"]
    times = {s: [] for s in SIDES}
    cpu = {s: [] for s in SIDES}
    system = {s: [] for s in SIDES}
    segs = {}
    with tempfile.TemporaryDirectory() as tmp:
        file, warm = Path(tmp) / "volume.nii.gz", Path(tmp) / "warmup.nii.gz"
        _volume(_parse(args.shape), spacing, file)
        _volume(tuple(patch), spacing, warm)
        for side in SIDES:
            fns[side](warm)  # imports, lru caches, kernels for the patch shape
        for r in range(args.repeats):
            for side in (SIDES if r % 2 == 0 else SIDES[::-1]):
                c0, s0 = _usage()
                start = time.perf_counter()
                segs[side] = fns[side](file)
                times[side].append(time.perf_counter() - start)
                c1, s1 = _usage()
                cpu[side].append(c1 - c0)
                system[side].append(s1 - s0)
        memory = {s: _memory_in_fresh_process(s, file, shared) for s in SIDES} if args.memory else {}
    t_ours, t_base = statistics.median(times["ours"]), statistics.median(times["nnunetv2"])
    s_ours, s_base = segs["ours"], segs["nnunetv2"]
    print(f"volume {args.shape} (z,y,x) at {args.spacing} mm, patch {patch}, "
          f"STU-Net {args.size} ({sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params), "
          f"{args.threads} thread(s), {args.device}, mirror={args.mirror}, median of {args.repeats}, turns alternating")
    for side in SIDES:
        mem = (f"; peak RSS {memory[side]['peak_mb']:.0f} MB (fresh process, {memory[side]['start_mb']:.0f} MB "
               f"before the prediction)") if memory else ""
        print(f"{side:9s} cpu {statistics.median(cpu[side]):8.2f} s/volume (user+system), "
              f"system {statistics.median(system[side]):6.2f} s{mem}")
    print(f"ours      {t_ours:8.3f} s/volume")
    print(f"nnunetv2  {t_base:8.3f} s/volume")
    if memory:
        print(f"peak memory ours/nnunetv2 {memory['ours']['peak_mb'] / memory['nnunetv2']['peak_mb']:.2f}x")
    print(f"ratio nnunetv2/ours {t_base / t_ours:.2f}x; segmentations agree: Dice {dice(s_ours, s_base):.4f}, "
          f"{(s_ours == s_base).mean() * 100:.2f}% of voxels equal")
    if args.json:
        args.json.write_text(json.dumps({
            "shape": args.shape, "spacing": args.spacing, "patch": list(patch), "size": args.size,
            "threads": args.threads, "device": args.device, "mirror": args.mirror, "repeats": args.repeats,
            "ours_s": t_ours, "baseline_s": t_base, "ratio": t_ours / t_base,
            "cpu_s": {s: statistics.median(cpu[s]) for s in SIDES},
            "system_s": {s: statistics.median(system[s]) for s in SIDES},
            "peak_mb": {s: memory[s]["peak_mb"] for s in SIDES} if memory else None,
            "dice": float(dice(s_ours, s_base)), "equal_pct": float((s_ours == s_base).mean() * 100)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
