"""What quality control adds to `fedliver predict`: each volume predicted the plain way (baseline) and
with QC (the first branch's probabilities kept, then `client.quality_control.measure`), alternating.

    python -m simulations.benchmarks.bench_qc --data runs/demo/data/Vendor_C --model runs/demo/final_model [--volumes 12]

Prints seconds per volume for both and the ratio (target <= 1.10: QC adds at most 10%).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import SimpleITK as sitk
    import torch

    from client.prediction import find_jobs
    from client.quality_control import measure
    from common.inference import predict_image
    from common.model_dir import load_model_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--volumes", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="one JSON line instead of text")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    bundle = load_model_dir(args.model)
    nets = bundle.build_nets(sorted(bundle.branches))
    jobs = find_jobs(args.data)[0][: args.volumes]
    plain, with_qc = 0.0, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        def run_plain(job) -> float:
            t0 = time.perf_counter()
            seg = predict_image(nets, job.image, bundle.plans, postprocessing="largest-component")
            sitk.WriteImage(seg, str(Path(tmp) / "plain.nii.gz"))  # predict writes every mask
            return time.perf_counter() - t0

        def run_qc(job) -> float:
            t0 = time.perf_counter()
            seg, probabilities = predict_image(nets, job.image, bundle.plans, postprocessing="largest-component",
                                               with_probabilities=True)
            out = Path(tmp) / f"{job.case_id}_{job.phase}.nii.gz"
            sitk.WriteImage(seg, str(out))
            measure(job.case_id, job.phase, job.image, out, seg, probabilities)
            return time.perf_counter() - t0

        for k, job in enumerate(jobs):
            run_plain(job)  # warm-up: the file in the page cache, the allocator's arenas grown, for both
            first, second = (run_plain, run_qc) if k % 2 == 0 else (run_qc, run_plain)  # order alternates
            times = {first: first(job), second: second(job)}
            plain, with_qc = plain + times[run_plain], with_qc + times[run_qc]
    ratio = with_qc / plain
    result = {"volumes": len(jobs), "plain_s_per_volume": plain / len(jobs), "qc_s_per_volume": with_qc / len(jobs),
              "ratio": ratio, "target": 1.10, "held": ratio <= 1.10}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{len(jobs)} volumes: plain {result['plain_s_per_volume']:.2f} s, with QC {result['qc_s_per_volume']:.2f} s "
              f"per volume (each with its NIfTI write)")
        print(f"qc overhead ratio {ratio:.3f} (target <= 1.10: {'held' if result['held'] else 'missed'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
