"""Local training cost: seconds per iteration and peak memory, supervised vs CPS, at the demo configuration.

    python -m simulations.benchmarks.bench_trainer [--size T] [--width 4] [--patch 32,64,64] [--batch 2] [--unlabeled-batch 1]
    python -m simulations.benchmarks.bench_trainer --device cuda --size B --patch 128,128,128   # a GPU site

One iteration = the whole `CPSTrainer` step: both nets forward + backward + SGD step, with nnU-Net
augmentation prepared by the background prefetcher (its waiting time is reported separately).
Supervised: both nets on the labeled batch. CPS: both nets on labeled + unlabeled batch plus the
cross terms. Bare: the same two nets (as the trainer builds them) on one fixed random batch of
CPS's samples, forward + a cross-entropy per deep-supervision head + backward + SGD step, with no
data loading, augmentation, Dice, cross terms, schedules or clipping: CPS / bare is what the
trainer adds. Each mode runs in its own subprocess, so its peak RSS is its own.
On CUDA (`--device auto` finds it) the trainer runs as a GPU site does, fp16 autocast with a
GradScaler (`--autocast`), and the peak is torch.cuda.max_memory_allocated over the timed iterations.
Timings are only meaningful on an otherwise idle machine: the load average is printed with them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common.names import CONFIGURATION

MODES = ("supervised", "cps", "bare")


def _volumes(root: Path, plans: dict, shape: tuple[int, int, int], cases: int = 2):
    """Preprocessed GED4 (labeled) and T2 (unlabeled) volumes of synthetic liver-like images,
    written on the plans' spacing (no resampling), `shape` (z, y, x) voxels each."""
    import numpy as np
    import SimpleITK as sitk

    from common.discovery import Case
    from common.preprocessing import PreprocessingCache

    cache = PreprocessingCache(root / "cache", plans)
    spacing = [float(v) for v in plans["configurations"][CONFIGURATION]["spacing"]]
    labeled, unlabeled = [], []
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:shape[0], :shape[1], :shape[2]]
    for i in range(cases):
        mask = (((z - shape[0] / 2) / (shape[0] / 3)) ** 2 + ((y - shape[1] / 2) / (shape[1] / 3)) ** 2
                + ((x - shape[2] / 2.2) / (shape[2] / 3)) ** 2 < 1).astype(np.uint8)
        folder = root / f"{i:04d}-A"
        folder.mkdir(parents=True, exist_ok=True)
        files = {}
        for name, arr in (("GED4", 60 + 100 * mask + rng.normal(0, 10, shape)),
                          ("T2", 200 - 90 * mask + rng.normal(0, 10, shape)), ("mask_GED4", mask)):
            img = sitk.GetImageFromArray(arr.astype(np.uint8 if name.startswith("mask") else np.float32))
            img.SetSpacing(tuple(reversed(spacing)))  # SimpleITK: (x, y, z)
            sitk.WriteImage(img, str(folder / f"{name}.nii.gz"))
            files[name] = folder / f"{name}.nii.gz"
        case = Case(folder.name, "A", None, {"GED4": files["GED4"], "T2": files["T2"]}, {"GED4": files["mask_GED4"]})
        labeled.append(cache.get(case, "GED4", with_mask=True))
        unlabeled.append(cache.get(case, "T2", with_mask=False))
    return labeled, unlabeled


def measure(mode: str, size: str, width: int | None, patch: tuple[int, int, int], batch: int, threads: int, iterations: int,
            prefetch: int, spacing: tuple[float, float, float], channels_last: bool | None,
            unlabeled_batch: int | None, device: str = "auto", autocast: str = "auto") -> dict:
    import torch

    from client.trainer import CPSTrainer, TrainerConfig, peak_rss_mib
    from common.device import describe, resolve_device
    from common.planning import default_test_plans

    torch.set_num_threads(threads)
    resolved = resolve_device(device)
    plans = default_test_plans(patch, spacing=spacing, size=size, base_width=width)
    shape = tuple(2 * p for p in patch)
    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as tmp:
        labeled, unlabeled = _volumes(Path(tmp), plans, shape)
        # bare: the CPS trainer's nets (seeds, channels-last, device, autocast); its data goes unused
        config = TrainerConfig(mode="cps" if mode == "bare" else mode, batch_size=batch, seed=0, prefetch=prefetch,
                               log_every=0, channels_last_convs=channels_last, unlabeled_batch_size=unlabeled_batch,
                               device=str(resolved), autocast=autocast)
        trainer = CPSTrainer(plans, labeled, unlabeled, config, log=lambda _: None)
        if mode == "bare":
            s_per_iter, data_wait = bare_step_seconds(trainer, batch + (unlabeled_batch or batch), iterations), 0.0
        else:
            trainer.train(1)  # warm-up: allocator, oneDNN kernels, first volume loads
            stats = trainer.train(iterations, start_iteration=1, total_iterations=iterations + 1)
            s_per_iter, data_wait = stats.seconds_per_iteration, stats.data_wait_per_iteration
    conf = plans["configurations"][CONFIGURATION]
    return {"mode": mode, "size": size, "widths": conf["architecture"]["arch_kwargs"]["features_per_stage"],
            "strides": conf["architecture"]["arch_kwargs"]["strides"][1:],
            "patch": "x".join(map(str, conf["patch_size"])), "batch": batch,
            "unlabeled_batch": (unlabeled_batch or batch) if mode in ("cps", "bare") else 0, "threads": threads,
            "s_per_iter": round(s_per_iter, 3), "data_wait_s": round(data_wait, 3),
            "peak_rss_MiB": round(peak_rss_mib()), "device": describe(resolved),
            "autocast": str(trainer.amp_dtype).removeprefix("torch.") if trainer.amp_dtype else "off",
            "peak_gpu_MiB": round(trainer.peak_gpu_memory_mib()) if resolved.type == "cuda" else None}


def bare_step_seconds(trainer, samples: int, iterations: int) -> float:
    """Seconds per step of the trainer's two nets alone on one fixed random batch of `samples`:
    forward, a cross-entropy per deep-supervision head, backward, SGD step (a warm-up step first)."""
    import contextlib

    import torch
    from torch.nn import functional as F

    device, nets = trainer.device, list(trainer.nets.values())
    patch = trainer.params.patch_size
    x = torch.randn(samples, 1, *patch, device=device)
    with torch.no_grad():
        heads = [o.shape[2:] for o in nets[0](x)]
    targets = [torch.randint(0, 2, (samples, *shape), device=device) for shape in heads]
    scaler = trainer.grad_scaler
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for net in nets:
        net.train()
    for i in range(iterations + 1):
        if i == 1:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
        amp = (torch.autocast(device.type, dtype=trainer.amp_dtype) if trainer.amp_dtype is not None
               else contextlib.nullcontext())
        with amp:
            loss = sum(F.cross_entropy(o, t) / 2**level
                       for net in nets for level, (o, t) in enumerate(zip(net(x), targets)))
        for optimizer in trainer.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        for optimizer in trainer.optimizers.values():
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
        if scaler is not None:
            scaler.update()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / iterations


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="T", help="STU-Net size (T, S, B, L, H)")
    parser.add_argument("--width", type=int, default=None,
                        help="base width (channels of the first stage; default: the demo's 4 for T, the size's "
                             "own for S/B/L/H; 0: the size's own)")
    parser.add_argument("--patch", default="32,64,64", help="z,y,x")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--unlabeled-batch", type=int, default=1, help="CPS unlabeled samples (the demo's: 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--prefetch", type=int, default=2, help="background batches (0: load inline)")
    parser.add_argument("--modes", default="supervised,cps,bare", help=f"comma separated, of {', '.join(MODES)}")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here (for run_all)")
    parser.add_argument("--spacing", default="6.9,3.8,3.8",
                        help="plan spacing z,y,x in mm (default: what `fedliver phantoms --profile demo` plans to; "
                             "it decides the strides, hence the cost)")
    parser.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                        help="channels-last 3x3x3 convs (auto: on for CPU)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N")
    parser.add_argument("--autocast", default="auto", choices=("auto", "off", "fp16", "bf16"),
                        help="mixed precision (auto: fp16 on CUDA, off on the CPU)")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.width is None:
        args.width = 4 if args.size == "T" else 0
    from common.device import resolve_device

    try:  # a missing GPU: one line here, not a traceback per child
        resolve_device(args.device)
    except ValueError as e:
        print(f"--device: {e}", file=sys.stderr)
        return 2
    patch = tuple(int(v) for v in args.patch.split(","))
    spacing = tuple(float(v) for v in args.spacing.split(","))
    channels_last = {"auto": None, "on": True, "off": False}[args.channels_last]
    modes = [m for m in args.modes.split(",") if m]
    if unknown := [m for m in modes if m not in MODES]:
        print(f"--modes: unknown {', '.join(unknown)} (known: {', '.join(MODES)})", file=sys.stderr)
        return 2

    if args.single:  # child process: one mode, one JSON line
        print(json.dumps(measure(modes[0], args.size, args.width or None, patch, args.batch, args.threads, args.iterations,
                                 args.prefetch, spacing, channels_last, args.unlabeled_batch, args.device,
                                 args.autocast)))
        return 0
    # Busy-waiting OpenMP threads collapse when other processes share the cores (seen: 23 s/it
    # instead of 3); the children inherit this unless the caller chose otherwise.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    load_before = os.getloadavg()[0]
    print(f"load average before: {load_before:.2f} on {os.cpu_count()} CPUs "
          f"(timings are only meaningful on an idle machine); OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    results = {}
    for mode in modes:
        cmd = [sys.executable, "-m", "simulations.benchmarks.bench_trainer", "--single", "--modes", mode,
               "--size", args.size, "--width", str(args.width), "--patch", args.patch, "--batch", str(args.batch),
               "--threads", str(args.threads), "--iterations", str(args.iterations), "--prefetch", str(args.prefetch),
               "--spacing", args.spacing, "--channels-last", args.channels_last, "--device", args.device,
               "--autocast", args.autocast]
        if args.unlabeled_batch:
            cmd += ["--unlabeled-batch", str(args.unlabeled_batch)]
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{mode}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            return 1
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        r = results[mode]
        peak = (f"peak GPU {r['peak_gpu_MiB']} MiB (torch.cuda.max_memory_allocated), RSS {r['peak_rss_MiB']} MiB"
                if r["peak_gpu_MiB"] is not None else f"peak {r['peak_rss_MiB']} MiB")
        print(f"{mode:>10}: {r['s_per_iter']:.3f} s/it (data wait {r['data_wait_s']:.3f}), {peak} "
              f"| {r['device']}, autocast {r['autocast']} | STU-Net {r['size']} {r['widths']} strides {r['strides']}, patch {r['patch']}, batch {r['batch']}+{r['unlabeled_batch']}, {r['threads']} threads "
              f"| {time.perf_counter() - started:.0f} s wall")
    if "supervised" in results and "cps" in results:
        ratio = results["cps"]["s_per_iter"] / results["supervised"]["s_per_iter"]
        print(f"CPS / supervised time per iteration: {ratio:.2f}x")
    if "cps" in results and "bare" in results:
        overhead = results["cps"]["s_per_iter"] / results["bare"]["s_per_iter"]
        print(f"trainer overhead, CPS iteration / bare step of the two nets on the same samples: {overhead:.2f}x")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"modes": results, "load_before": load_before,
                                         "load_after": os.getloadavg()[0]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
