"""Benchmark of divfast's corruptions: images per second at 224x224, batch 64, beside the reference.

    python -m benchmarks.bench_corruptions                      # all threads and 1 thread, ~2 min
    python -m benchmarks.bench_corruptions --reference PATH     # also time the reference, same run
    python -m benchmarks.bench_corruptions --device cuda        # a GPU's rows (target 5,000 img/s)

``--reference`` takes a checkout of facebookresearch/augmentation-corruption (its ``imagenet_c_bar``
folder is imported from there, never copied here; it needs scikit-image, see requirements/bench.txt)
and times its per-image transforms on one core, one image each, the way it generates ImageNet-C-bar.
Without it, the per-image times recorded in issue #3 (the reference on this machine, one core) are
printed, marked as such. Images are random uint8 content; timings include drawing every image's
parameters (the CPU part of a batch) and, on a GPU, the synchronisation that ends the batch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

from benchmarks.common import machine_info
from divfast.corruptions import corrupt, get_corruption, list_corruptions
from divfast.io import write_json_atomic

# The reference on this machine, one core, ms per 224 px image (issue #3); None where not given.
RECORDED_REFERENCE_MS = {"plasma": 1040.0, "waterdrop": 600.0, "caustic_refraction": 2700.0,
                         "sparkles": 2200.0, "perlin_noise": 900.0, "checkerboard": 71.0, "lines": 8.0}
TARGET_IMG_S = {"cpu": 100.0, "cuda": 5000.0}
SEVERITY = 5.0


def time_batch(images: torch.Tensor, name: str, reps: int) -> float:
    """Median seconds of one ``corrupt`` call on the batch (after a warm-up call)."""
    sync = torch.cuda.synchronize if images.is_cuda else (lambda: None)
    corrupt(images, name, SEVERITY, keys=range(len(images)))
    sync()
    times = []
    for rep in range(reps):
        keys = range(rep * len(images), (rep + 1) * len(images))  # fresh parameters every batch
        start = time.perf_counter()
        corrupt(images, name, SEVERITY, keys=keys)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load_reference(path: str):
    """The reference's transform classes by name, imported from a checkout at ``path``."""
    folder = os.path.join(path, "imagenet_c_bar")
    if not os.path.isfile(os.path.join(folder, "corrupt.py")):
        raise SystemExit(f"--reference: no imagenet_c_bar/corrupt.py under {path!r}")
    if not hasattr(np, "int"):
        np.int = int  # the reference's Lines uses np.int, removed in NumPy 1.24
    sys.path.insert(0, folder)
    import corrupt as reference  # noqa: PLC0415  (the checkout's module)

    return {cls.name: cls for cls in vars(reference).values()
            if isinstance(cls, type) and getattr(cls, "name", None) not in (None, "abstract_transform")}


def time_reference(classes: dict, name: str, image: np.ndarray, reps: int) -> float | None:
    """Median seconds of the reference's transform on one (224, 224, 3) uint8 image, one core."""
    cls = classes.get(get_corruption(name).reference)
    if cls is None:
        return None
    transform = cls(SEVERITY, image.shape[0])
    times = []
    for rep in range(reps):
        np.random.seed(rep)
        start = time.perf_counter()
        transform(image)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--reference", default=os.environ.get("DIVFAST_REFERENCE_REPO"),
                        help="checkout of facebookresearch/augmentation-corruption to time beside")
    parser.add_argument("--reference-reps", type=int, default=1)
    parser.add_argument("--only", default=None, help="comma-separated corruptions")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    names = args.only.split(",") if args.only else list_corruptions()
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, args.size, args.size), generator=gen,
                           dtype=torch.uint8).to(device)
    classes = load_reference(args.reference) if args.reference else None
    threads = torch.get_num_threads()
    info = machine_info(str(device), packages=("skimage",))
    print(f"# divfast corruptions, batch {args.batch} x 3 x {args.size} x {args.size} uint8, "
          f"severity {SEVERITY}, {device}, {threads} threads; {info['cpu']}", flush=True)
    header = (f"{'corruption':28s} {'img/s':>9s} {'ms/img':>8s} {'1-thread img/s':>15s} "
              f"{'reference ms/img':>17s} {'x reference':>12s} {'target':>7s}")
    print(header)
    rows = []
    target = TARGET_IMG_S["cuda" if device.type == "cuda" else "cpu"]
    for name in names:
        seconds = time_batch(images, name, args.reps)
        row = {"corruption": name, "img_s": args.batch / seconds, "ms_per_img": 1000 * seconds / args.batch}
        if device.type == "cpu" and threads > 1:
            torch.set_num_threads(1)
            row["img_s_1thread"] = args.batch / time_batch(images, name, max(2, args.reps // 2))
            torch.set_num_threads(threads)
        ref_ms, source = None, "-"
        if classes is not None:
            torch.set_num_threads(1)
            ref_s = time_reference(classes, name, images[0].permute(1, 2, 0).cpu().numpy(),
                                   args.reference_reps)
            torch.set_num_threads(threads)
            ref_ms, source = (None, "-") if ref_s is None else (1000 * ref_s, "measured")
        elif args.size == 224 and name in RECORDED_REFERENCE_MS:
            ref_ms, source = RECORDED_REFERENCE_MS[name], "issue #3"
        row.update(reference_ms_per_img=ref_ms, reference_source=source,
                   speedup_vs_reference=None if ref_ms is None else ref_ms / row["ms_per_img"],
                   meets_target=row["img_s"] >= target)
        rows.append(row)
        one = f"{row['img_s_1thread']:15.1f}" if "img_s_1thread" in row else f"{'-':>15s}"
        ref = f"{ref_ms:10.1f} ({source[:8]})" if ref_ms is not None else f"{'-':>17s}"
        speed = f"{row['speedup_vs_reference']:11.0f}x" if ref_ms is not None else f"{'-':>12s}"
        print(f"{name:28s} {row['img_s']:9.1f} {row['ms_per_img']:8.2f} {one} {ref:>17s} {speed} "
              f"{'PASS' if row['meets_target'] else 'FAIL':>7s}", flush=True)
    slowest = min(rows, key=lambda r: r["img_s"])
    print(f"slowest: {slowest['corruption']} at {slowest['img_s']:.1f} img/s "
          f"(target >= {target:,.0f} img/s on {device.type}): "
          f"{'PASS' if all(r['meets_target'] for r in rows) else 'FAIL'}")
    result = {"machine": info, "device": str(device), "batch": args.batch, "size": args.size,
              "severity": SEVERITY, "target_img_s": target, "rows": rows}
    if args.json:
        write_json_atomic(args.json, result)  # NaN (no reference time) becomes null
    return result


if __name__ == "__main__":
    main()
