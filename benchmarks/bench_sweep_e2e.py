"""End to end: ``run_sweep`` (what ``divfast sweep`` runs) over a pool, against the bare forward passes
of its members on the same data.

    python -m benchmarks.bench_sweep_e2e            # CPU: ~2.5 min

A pool of six random-weight timm members (two each of resnet18, convnext_atto, efficientvit_m0) at
64 px, the embedded digits test split (360 images) clean and under two of the paper's corruptions,
every triple, rules average and vote, a fresh logits cache. ``bare`` is one DataLoader pass per
dataset feeding every member under ``no_grad`` (the least any tool must do); ``sweep`` is the whole
``run_sweep`` (loading and hashing the checkpoints, the passes, the cache writes, the kernel, the
measures of all 20 triples, the difficulty analysis); ``rerun`` is ``run_sweep`` again with the
cache warm. The two are timed in turns, ``--reps`` times, and compared by their medians. Target:
sweep <= 1.10x bare.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch
from torch.utils.data import DataLoader

from benchmarks.common import machine_info, timed
from divfast.data import build_dataset, load_members, save_member
from divfast.data.members import create_member
from divfast.ensembles.sweep import run_sweep
from divfast.io import write_json_atomic

ARCHS = ("resnet18", "convnext_atto", "efficientvit_m0")
DATASETS = ("clean", "lines1.6", "plasma4.0")
TARGET = 1.10


def make_pool(folder: str, size: int) -> list[str]:
    paths = []
    for i, arch in enumerate(ARCHS * 2):
        torch.manual_seed(i)
        path = os.path.join(folder, f"m{i}-{arch}.safetensors")
        save_member(create_member(arch, 10, (3, size, size), name=f"m{i}-{arch}"), path)
        paths.append(path)
    return paths


@torch.no_grad()
def bare(paths, size, device, batch_size):
    members = load_members(paths, device)
    for spec in DATASETS:
        for x, _ in DataLoader(build_dataset(spec, image_size=size), batch_size=batch_size):
            x = x.to(device)
            for member in members:
                member(x)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    info = machine_info(args.device, ("timm",))
    print(f"machine: {info}")
    with tempfile.TemporaryDirectory() as folder:
        paths = make_pool(folder, args.size)
        bare(paths, args.size, device, args.batch_size)  # warm-up: page cache, thread pools
        bares, sweeps = [], []
        for rep in range(args.reps):  # in turns, so drifts of this shared machine hit both
            bares.append(timed(lambda: bare(paths, args.size, device, args.batch_size), sync))
            cache = os.path.join(folder, f"cache{rep}")  # fresh: every pass is done
            sweeps.append(timed(lambda: run_sweep(paths, list(DATASETS), k=3, device=device,
                                                  cache_dir=cache, batch_size=args.batch_size), sync))
        t_rerun = timed(lambda: run_sweep(paths, list(DATASETS), k=3, device=device, cache_dir=cache,
                                          batch_size=args.batch_size), sync)
        t_bare, t_sweep = statistics.median(bares), statistics.median(sweeps)
    ratio = t_sweep / t_bare
    print(f"pool of {len(paths)} at {args.size} px, datasets {', '.join(DATASETS)}: bare forward passes "
          f"{t_bare:.2f} s; run_sweep {t_sweep:.2f} s ({ratio:.2f}x); rerun from the cache {t_rerun:.2f} s")
    print(f"target <= {TARGET:.2f}x: {'PASS' if ratio <= TARGET else 'FAIL'}")
    if args.json:
        write_json_atomic(args.json, {"machine": info, "bare_s": t_bare, "sweep_s": t_sweep,
                                      "rerun_s": t_rerun, "ratio": ratio, "bare_runs_s": bares,
                                      "sweep_runs_s": sweeps})


if __name__ == "__main__":
    main()
