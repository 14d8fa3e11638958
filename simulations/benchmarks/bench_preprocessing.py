"""Preprocessing of one volume: `common.preprocessing.preprocess_image` vs nnunetv2's
`DefaultPreprocessor.run_case` alone, and the site cache's hit vs miss, in the same run.

    python -m simulations.benchmarks.bench_preprocessing [--shape 64,320,380 --spacing 2.5,1,1]

Both read the same NIfTI image and mask and crop, z-score and resample to the same plans (the
plans' spacing is the volume's unless --target-spacing says otherwise). The cache miss is
`PreprocessingCache.get` in an empty cache folder (hash the files, preprocess, write the .npy
files); the hit is the same call again (hash the files, read the entry's JSON). Repeats are
interleaved so that all see the same load; medians are printed, then the ratios:
`preprocessing ours / DefaultPreprocessor: R` (target <= 1.1) and `cache hit / miss: R` (<= 0.05).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path


def _parse(text: str, cast=int) -> tuple:
    return tuple(cast(v) for v in text.replace("x", ",").split(","))


def write_case(folder: Path, shape_zyx: tuple[int, int, int], spacing_zyx: tuple[float, float, float]) -> tuple[Path, Path]:
    """An image (a bright ellipsoid over noise, zero border) and its 0/1 mask, as NIfTI files."""
    import numpy as np
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape_zyx], indexing="ij")
    mask = (x**2 / 0.4 + y**2 / 0.3 + z**2 / 0.6 < 1).astype(np.uint8)
    image = 80 + 120 * mask + rng.normal(0, 10, shape_zyx).astype(np.float32)
    image[:, :2] = 0
    paths = folder / "GED4.nii.gz", folder / "mask_GED4.nii.gz"
    for array, path in zip((image.astype(np.float32), mask), paths):
        itk = sitk.GetImageFromArray(array)
        itk.SetSpacing(tuple(reversed(spacing_zyx)))
        sitk.WriteImage(itk, str(path))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="30,80,96", help="volume z,y,x (default: the demo phantom size)")
    parser.add_argument("--spacing", default="6,3.8,3.8", help="volume spacing z,y,x in mm")
    parser.add_argument("--target-spacing", default=None, help="plans spacing z,y,x (default: the volume's)")
    parser.add_argument("--patch", default="32,64,64", help="plans patch z,y,x")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here (for run_all)")
    args = parser.parse_args(argv)

    import torch
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from common.discovery import Case
    from common.planning import CONFIGURATION, DATASET_JSON, default_test_plans
    from common.preprocessing import PreprocessingCache, preprocess_image

    torch.set_num_threads(args.threads)
    shape, spacing = _parse(args.shape), _parse(args.spacing, float)
    target = _parse(args.target_spacing, float) if args.target_spacing else spacing
    plans = default_test_plans(_parse(args.patch), spacing=target)
    manager = PlansManager(plans)
    configuration = manager.get_configuration(CONFIGURATION)
    with tempfile.TemporaryDirectory(prefix="bench_preprocessing_") as tmp:
        root = Path(tmp)
        image, mask = write_case(root, shape, spacing)
        case = Case("0001", "A", None, {"GED4": image}, {"GED4": mask})

        def ours() -> None:
            preprocess_image(image, plans, mask)

        def nnunet() -> None:
            DefaultPreprocessor(verbose=False).run_case([str(image)], str(mask), manager, configuration, dict(DATASET_JSON))

        caches = iter(range(10**6))

        def miss() -> None:
            PreprocessingCache(root / f"cache{next(caches)}", plans).get(case, "GED4", with_mask=True)

        def hit() -> None:
            cache = PreprocessingCache(root / "cache_hit", plans)
            cache.get(case, "GED4", with_mask=True)
            assert cache.computed == 0, "the cache recomputed an unchanged volume"

        PreprocessingCache(root / "cache_hit", plans).get(case, "GED4", with_mask=True)  # the entry hits read
        ours(), nnunet()  # warm-up: imports, first allocations
        seconds: dict[str, list[float]] = {name: [] for name in ("ours", "nnunet", "miss", "hit")}
        for _ in range(args.repeats):
            for name, run in (("ours", ours), ("nnunet", nnunet), ("miss", miss), ("hit", hit)):
                started = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - started)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"volume {'x'.join(map(str, shape))} at {spacing} mm -> plans spacing {target}, {args.threads} threads, "
          f"median of {args.repeats}")
    print(f"ours (preprocess_image):           {median['ours']:.3f} s")
    print(f"nnunetv2 DefaultPreprocessor.run_case: {median['nnunet']:.3f} s")
    print(f"cache miss: {median['miss']:.3f} s, cache hit: {median['hit']:.4f} s")
    print(f"preprocessing ours / DefaultPreprocessor: {median['ours'] / median['nnunet']:.2f}")
    print(f"cache hit / miss: {median['hit'] / median['miss']:.3f}")
    if args.json:  # one process runs all four: its peak RSS is the largest of them, not each one's
        args.json.write_text(json.dumps({
            "shape": list(shape), "spacing": list(spacing), "target_spacing": list(target), "threads": args.threads,
            "repeats": args.repeats, "ours_s": median["ours"], "baseline_s": median["nnunet"],
            "ratio": median["ours"] / median["nnunet"], "cache_miss_s": median["miss"], "cache_hit_s": median["hit"],
            "cache_ratio": median["hit"] / median["miss"],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
