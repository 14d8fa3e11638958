"""What one round's aggregation costs the server: N sites' CPS pairs through `PairAggregator`
(screening, Flower's FedAvg per branch, the update norms) vs the memory-bandwidth bound, a numpy
weighted sum of the same float32 arrays, in the same run.

    python -m simulations.benchmarks.bench_aggregation [--size B] [--sites 10] [--repeats 3]

The pairs are the real parameter shapes of STU-Net SIZE (both branches, `a.*` / `b.*`), filled
with random values near one global model. Timed: screening the replies and aggregating them;
not timed: `configure` (the round's message to the sites, paid once per round whatever N).
Prints the median seconds of each, the ratio, and the process's peak RSS; the last line is
`aggregation / numpy bound: R` (target <= 1.5).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

from common.names import BRANCHES


def pair_shapes(size: str, width: int | None) -> dict[str, tuple[int, ...]]:
    """{"a.<param>": shape, "b.<param>": shape} of a CPS pair of STU-Net `size`."""
    from common.stunet import build_stunet

    net = build_stunet(size, base_width=width, device="meta")  # shapes only, no memory
    return {f"{branch}.{name}": tuple(p.shape) for branch in BRANCHES for name, p in net.state_dict().items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="B", help="STU-Net size (T, S, B, L, H)")
    parser.add_argument("--width", type=int, default=None, help="first-stage width (default: the size's own)")
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here (for run_all)")
    args = parser.parse_args(argv)

    import numpy as np
    from flwr.app import ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    from common.federation_config import FederationConfig
    from server.strategy import NodeUpdate, PairAggregator

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0  # as inside a ServerApp
    shapes = pair_shapes(args.size, args.width)
    values = sum(int(np.prod(s)) for s in shapes.values())
    rng = np.random.default_rng(0)
    current = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
    updates = [NodeUpdate(i + 1, f"S{i + 1}", {k: v + np.float32(1e-3) * (i + 1) for k, v in current.items()},
                          {"num-labeled": float(i + 1)}) for i in range(args.sites)]
    weights = np.array([u.metrics["num-labeled"] for u in updates], np.float32)
    weights /= weights.sum()
    print(f"STU-Net {args.size} pair: {values / 1e6:.1f} M values ({values * 4 / 2**30:.2f} GiB float32) x "
          f"{args.sites} sites")

    config = FederationConfig.from_run_config({"sites": ",".join(f"{u.site}:train" for u in updates)})

    def configured() -> PairAggregator:
        aggregator = PairAggregator(config, args.sites, log=lambda _: None)
        aggregator.configure(1, current, ConfigRecord({"server-round": 1}), [u.node_id for u in updates])
        return aggregator

    def ours(aggregator: PairAggregator) -> dict:
        accepted, _ = aggregator.screen(updates, current)
        return aggregator.aggregate(1, current, accepted)

    def numpy_bound(_: None) -> dict:
        return {k: sum(w * u.arrays[k] for w, u in zip(weights, updates)) for k in current}

    seconds: dict[str, list[float]] = {"ours": [], "numpy": []}
    for _ in range(args.repeats):  # interleaved, so both see the same load
        for name, run, setup in (("ours", ours, configured), ("numpy", numpy_bound, lambda: None)):
            state = setup()
            started = time.perf_counter()
            result = run(state)
            seconds[name].append(time.perf_counter() - started)
            del result, state
    ours_s, bound_s = statistics.median(seconds["ours"]), statistics.median(seconds["numpy"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"PairAggregator (Flower FedAvg, screening, norms): {ours_s:.2f} s")
    print(f"numpy weighted sum (memory-bandwidth bound):     {bound_s:.2f} s")
    print(f"peak RSS of the process: {peak:.0f} MiB")
    print(f"aggregation / numpy bound: {ours_s / bound_s:.2f}")
    if args.json:
        args.json.write_text(json.dumps({
            "size": args.size, "width": args.width, "sites": args.sites, "repeats": args.repeats,
            "values": values, "ours_s": ours_s, "baseline_s": bound_s, "ratio": ours_s / bound_s,
            "peak_rss_mib": peak}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
