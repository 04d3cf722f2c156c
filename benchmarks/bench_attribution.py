"""Benchmark of ``divfast::attribution_stats`` and of attribution diversity end to end.

    python -m benchmarks.bench_attribution                # CPU: ~1.5 min
    python -m benchmarks.bench_attribution --device cuda  # a GPU's rows

1. The op on M = 3 and M = 14 members' maps, B = 64, 3 x 224 x 224 float32, against:
   - the floor: one read of the maps at the best measured read bandwidth (``x.sum()``, ``x.amax()``,
     timed in turns with the kernel);
   - the good torch composition (the variance written out elementwise, the Gram as a batched
     GEMM), and the float64 reference (divfast/_ops/reference.py); ``torch.var`` over the member
     axis is printed too, for the record.
   Target: within 1.5x of the floor (the kernel's median time over the floor's best, a
   conservative ratio).
2. End to end: three timm members (random weights, no download) on a batch of 224 px images: their
   Saliency maps (our batched path, the bare backward passes) alone, then plus the reduction.
   Target: the reduction adds at most 5 %.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import machine_info, timed
from divfast._ops import reference
from divfast._ops.attribution_stats import attribution_stats
from divfast.io import write_json_atomic

TARGET_FLOOR = 1.5
TARGET_OVERHEAD = 0.05
MEMBERS = ("resnet10t", "convnext_atto", "efficientvit_m0")


def composition(x: torch.Tensor):
    """The good torch composition: variance written out elementwise, Gram as a batched GEMM."""
    m, b = x.shape[:2]
    flat = x.abs().reshape(m, b, -1)
    centred = flat - flat.mean(dim=0, keepdim=True)
    variance = (centred * centred).sum(dim=(0, 2), dtype=torch.float64) / m
    per_sample = centred.transpose(0, 1)  # (B, M, D): the op's Gram is of the centred maps
    gram = torch.bmm(per_sample, per_sample.transpose(1, 2)).sum(0, dtype=torch.float64)
    return variance, gram


def op_rows(device, reps: int) -> list[dict]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for m in (3, 14):
        x = torch.randn(m, 64, 3, 224, 224, device=device)
        gbytes = x.numel() * x.element_size() / 1e9
        attribution_stats(x)  # warm-up
        kernel, floor = [], []
        for _ in range(reps):  # interleaved: a shared machine's bandwidth drifts
            kernel.append(timed(lambda: attribution_stats(x), sync, 1))
            floor.append(min(timed(lambda: x.sum(), sync, 1), timed(lambda: x.amax(), sync, 1)))
        k, f = statistics.median(kernel), min(floor)
        comp = timed(lambda: composition(x), sync, max(2, reps // 2))
        var = timed(lambda: x.abs().var(dim=0, correction=0).sum(dim=(1, 2, 3)), sync, 2)
        ref = timed(lambda: reference.attribution_stats(x), sync, 1) if m == 3 else float("nan")
        rows.append({"members": m, "gbytes": gbytes, "kernel_ms": 1e3 * k, "floor_ms": 1e3 * f,
                     "x_floor": k / f, "composition_ms": 1e3 * comp, "torch_var_ms": 1e3 * var,
                     "reference_ms": 1e3 * ref, "vs_composition": comp / k,
                     "meets_target": k / f <= TARGET_FLOOR})
    return rows


def end_to_end(device, batch: int, reps: int) -> dict:
    from divfast.attribution import member_attributions
    from divfast.data.members import create_member

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    members = [create_member(arch, 1000, (3, 224, 224)).to(device).eval() for arch in MEMBERS]
    images = torch.rand(batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    maps = member_attributions(members, images, labels=labels)  # warm-up, and the maps we reduce
    bare = timed(lambda: member_attributions(members, images, labels=labels), sync, reps)
    reduce = timed(lambda: attribution_stats(maps), sync, reps)
    return {"members": list(MEMBERS), "batch": batch, "saliency_ms": 1e3 * bare,
            "reduction_ms": 1e3 * reduce, "overhead": reduce / bare,
            "meets_target": reduce / bare <= TARGET_OVERHEAD}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16, help="end-to-end batch size")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    info = machine_info(args.device)
    print(f"# divfast attribution_stats on {device}, {info['torch_threads']} threads; {info['cpu']}"
          + (f"; {info['gpu']}" if "gpu" in info else ""), flush=True)
    print(f"{'M':>3s} {'GB':>6s} {'kernel ms':>10s} {'floor ms':>9s} {'x floor':>8s} "
          f"{'composition ms':>15s} {'torch.var ms':>13s} {'reference ms':>13s} {'target':>7s}")
    rows = op_rows(device, args.reps)
    for r in rows:
        print(f"{r['members']:3d} {r['gbytes']:6.2f} {r['kernel_ms']:10.1f} {r['floor_ms']:9.1f} "
              f"{r['x_floor']:8.2f} {r['composition_ms']:15.1f} {r['torch_var_ms']:13.1f} "
              f"{r['reference_ms']:13.1f} {'PASS' if r['meets_target'] else 'FAIL':>7s}", flush=True)
    e2e = end_to_end(device, args.batch, max(2, args.reps // 2))
    print(f"end to end, {', '.join(e2e['members'])}, batch {e2e['batch']} at 224 px: Saliency maps "
          f"{e2e['saliency_ms']:.1f} ms, reduction {e2e['reduction_ms']:.2f} ms = "
          f"{100 * e2e['overhead']:.2f} % (target <= {100 * TARGET_OVERHEAD:.0f} %): "
          f"{'PASS' if e2e['meets_target'] else 'FAIL'}")
    result = {"machine": info, "device": str(device), "op": rows, "end_to_end": e2e}
    if args.json:
        write_json_atomic(args.json, result)  # NaN (no reference time) becomes null
    return result


if __name__ == "__main__":
    main()
