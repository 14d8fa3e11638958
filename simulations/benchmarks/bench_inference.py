"""Seconds per volume of `common.inference.predict_image` vs nnunetv2's own predictor, same run.

Both start from the same NIfTI file and end with a segmentation on its raw grid, with the same
STU-Net weights, plans, step 0.5, Gaussian weighting and no mirroring (unless --mirror):
  ours:     predict_image([net], file, plans)
  baseline: SimpleITKIO().read_images + nnUNetPredictor(device=cpu).manual_initialization(...)
            + predict_single_npy_array (nnU-Net averages logits and accumulates in fp16)
Prints the median seconds of each, the ratio, and how well the two segmentations agree (Dice).
Meant to be run alone on an idle machine; the default volume is the demo phantom size:

    python -m simulations.benchmarks.bench_inference --threads 1 --repeats 3
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path


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
    args = parser.parse_args(argv)

    import numpy as np
    import SimpleITK as sitk
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from common.inference import predict_image
    from common.metrics import dice
    from common.planning import CONFIGURATION, DATASET_JSON, default_test_plans
    from common.stunet import build_stunet_from_plans

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    spacing = _parse(args.spacing, float)
    plans = default_test_plans(patch_size=_parse(args.patch), spacing=spacing, size=args.size)
    torch.manual_seed(0)
    net = build_stunet_from_plans(plans, deep_supervision=False).to(device).eval()

    plans_manager = PlansManager(plans)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=args.mirror,
                                perform_everything_on_device=device.type == "cuda", device=device,
                                allow_tqdm=False)
    predictor.manual_initialization(net, plans_manager, plans_manager.get_configuration(CONFIGURATION),
                                    [{k: v for k, v in net.state_dict().items()}], dict(DATASET_JSON),
                                    "nnUNetTrainer", (0, 1, 2))

    def baseline(file: Path):
        data, props = SimpleITKIO().read_images([str(file)])
        with contextlib.redirect_stdout(io.StringIO()):
            return predictor.predict_single_npy_array(data, props)

    def ours(file: Path):
        return sitk.GetArrayFromImage(predict_image([net], file, plans, mirror=args.mirror))

    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "volume.nii.gz"
        _volume(_parse(args.shape), spacing, file)
        results = {}
        for name, fn in (("ours", ours), ("nnunetv2", baseline)):
            seg = fn(file)  # warm-up (allocator, lru caches, imports)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                seg = fn(file)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            results[name] = (statistics.median(times), np.asarray(seg))
    (t_ours, s_ours), (t_base, s_base) = results["ours"], results["nnunetv2"]
    print(f"volume {args.shape} (z,y,x) at {args.spacing} mm, patch {plans['configurations'][CONFIGURATION]['patch_size']}, "
          f"STU-Net {args.size} ({sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params), "
          f"{args.threads} thread(s), {device}, mirror={args.mirror}, median of {args.repeats}")
    print(f"ours      {t_ours:8.3f} s/volume")
    print(f"nnunetv2  {t_base:8.3f} s/volume")
    print(f"ratio nnunetv2/ours {t_base / t_ours:.2f}x; segmentations agree: Dice {dice(s_ours, s_base):.4f}, "
          f"{(s_ours == s_base).mean() * 100:.2f}% of voxels equal")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
