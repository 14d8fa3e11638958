"""STU-Net training cost on CPU: forward + backward + SGD step per iteration, and peak RSS.

Meant to be run ALONE on an idle machine (timings are meaningless while other jobs share the cores):

    python -m simulations.benchmarks.bench_stunet --widths 8,6,4 --patches 32x64x64,48x96x96

Each (size, width, patch) runs in its own subprocess, so its peak RSS is its own. The children get
OMP_WAIT_POLICY=PASSIVE (unless --omp-wait-policy says otherwise): with OpenMP's default spinning,
2 threads on cores that other processes also use ran 10-25x slower here (40 s instead of 1.6 s). The loss is a
deep-supervision cross-entropy over the 5 heads, as in training; one CPS iteration costs about two
of these (two nets), plus the pseudo-label cross terms (no extra backward).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def measure(size: str, width: int | None, patch: tuple[int, int, int], batch: int, threads: int,
            iterations: int) -> dict:
    import torch
    from torch.nn import functional as F

    from common.stunet import build_stunet

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = build_stunet(size, base_width=width)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    x = torch.randn(batch, 1, *patch)
    target = (torch.rand(batch, 1, *patch) > 0.5).float()
    timings = []
    for i in range(iterations + 1):  # the first iteration warms up the allocator and kernels
        start = time.perf_counter()
        outputs = net(x)
        loss = 0.0
        for level, out in enumerate(outputs):
            t = F.interpolate(target, size=out.shape[2:], mode="nearest")[:, 0].long()
            loss = loss + F.cross_entropy(out, t) / 2 ** level
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i:
            timings.append(time.perf_counter() - start)
    return {"size": size, "width": width or net.conv_blocks_context[0][0].conv1.out_channels,
            "params_M": round(sum(p.numel() for p in net.parameters()) / 1e6, 3),
            "patch": "x".join(map(str, patch)), "batch": batch, "threads": threads,
            "s_per_iter": round(statistics.median(timings), 3), "min_s": round(min(timings), 3),
            "peak_rss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="T", help="STU-Net size (T, S, B, L, H)")
    parser.add_argument("--widths", default="8,6,4", help="base widths to try; 'default' = the size's own")
    parser.add_argument("--patches", default="32x64x64,48x96x96", help="z x y x x patches, comma separated")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--omp-wait-policy", default="PASSIVE",
                        help="OMP_WAIT_POLICY for the children ('' leaves the environment as it is)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here (for run_all)")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    widths = [None if w == "default" else int(w) for w in args.widths.split(",")]
    patches = [tuple(int(v) for v in p.split("x")) for p in args.patches.split(",")]

    if args.single:  # child process: one configuration, one JSON line
        print(json.dumps(measure(args.size, widths[0], patches[0], args.batch, args.threads, args.iterations)))
        return 0
    env = dict(os.environ)
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    print("run alone on an idle machine; fwd+bwd+step of ONE net (a CPS iteration is about 2x); "
          f"OMP_WAIT_POLICY={env.get('OMP_WAIT_POLICY', '(unset)')}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'size':>4} {'width':>5} {'params(M)':>9} {'patch':>10} {'batch':>5} {'s/iter':>7} "
          f"{'min s':>6} {'peak RSS MiB':>12}")
    rows = []
    for patch in patches:
        for width in widths:
            cmd = [sys.executable, "-m", "simulations.benchmarks.bench_stunet", "--single",
                   "--size", args.size, "--widths", "default" if width is None else str(width),
                   "--patches", "x".join(map(str, patch)), "--batch", str(args.batch),
                   "--threads", str(args.threads), "--iterations", str(args.iterations)]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode:
                print(f"{args.size} width {width} patch {patch}: failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"{r['size']:>4} {r['width']:>5} {r['params_M']:>9} {r['patch']:>10} {r['batch']:>5} "
                  f"{r['s_per_iter']:>7} {r['min_s']:>6} {r['peak_rss_MiB']:>12}", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f} (more than the thread count: numbers are inflated)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if len(rows) == len(patches) * len(widths) else 1


if __name__ == "__main__":
    raise SystemExit(main())
