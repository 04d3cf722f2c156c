"""Benchmark of ``divfast::ensemble_sweep``: every 3-member subset of a 14-model pool, four rules.

    python -m benchmarks.bench_sweep                  # CPU, N = 10,000: ~3 min (the loops dominate)
    python -m benchmarks.bench_sweep --samples 50000 --loop-subsets 40
    python -m benchmarks.bench_sweep --device cuda

Logits (K = 14, N, C = 1000) float32: random, with the target raised by U(0, margin) per sample and
member (margin 4: members right about a quarter of the time, with many targets near the top five,
the hardest case for pruning). All 364 triples, for each rule:

- ``kernel``: the op (top-1, top-5 and the correct-member histogram of every subset);
- ``per-combo loop``: for each subset, its consensus with torch ops and ``topk(5)`` (what one would
  write first); ``--loop-subsets`` runs it on that many subsets and scales up (exact count printed);
- ``vectorised``: the best straightforward torch version: subsets in chunks, the consensus of a chunk
  at once, ``topk(5)``;
- ``floor``: one read of the logits (``x.sum()``).

``--margin`` sets how often members are right (0: pure noise, where a random target is far from the
top and pruning is easiest). The kernel's counts are compared with the float64 brute-force reference (divfast/_ops/reference.py)
on the subsets the loop ran; the float32 loop itself can differ by a count where its float32 mean
rounds two classes together. Target: the kernel at least 50x faster than the per-combo loop, with
exact results.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from benchmarks.common import machine_info, timed_with_result as timed
from divfast._ops import reference
from divfast._ops.ensemble_sweep import ensemble_sweep
from divfast.io import write_json_atomic

RULES = ("average", "vote", "median", "geometric")
TARGET_SPEEDUP = 50.0


def make_logits(k, n, c, device, seed=0, margin=4.0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(k, n, c, generator=gen)
    target = torch.randint(0, c, (n,), generator=gen)
    raise_by = margin * torch.rand(k, n, generator=gen)  # per member and sample
    logits[:, torch.arange(n), target] += raise_by
    return logits.to(device), target.to(device)


def consensus_scores(z, rule):
    """The consensus of one subset's logits (k, N, C) with plain torch ops."""
    if rule == "average":
        return z.mean(dim=0)
    if rule == "geometric":
        return torch.log_softmax(z, dim=-1).mean(dim=0)
    if rule == "median":
        return z.median(dim=0).values if z.shape[0] % 2 else z.sort(dim=0).values[
            z.shape[0] // 2 - 1: z.shape[0] // 2 + 1].mean(dim=0)
    total = z.double().sum(dim=0)
    votes = torch.zeros_like(total)
    votes.scatter_add_(1, z.argmax(dim=-1).T, torch.ones(z.shape[1], z.shape[0], dtype=torch.float64,
                                                          device=z.device))
    return votes * (2 * total.abs().max() + 1) + total  # (votes, summed logits) lexicographically


def per_combo_loop(logits, target, subsets, rule):
    top1, top5 = [], []
    for row in subsets.tolist():
        scores = consensus_scores(logits[row], rule)
        top = scores.topk(5, dim=-1).indices
        top1.append(int((top[:, 0] == target).sum()))
        top5.append(int((top == target[:, None]).any(dim=1).sum()))
    return torch.tensor(top1), torch.tensor(top5)


def vectorised(logits, target, subsets, rule, chunk=8):
    top1, top5 = [], []
    for rows in subsets.split(chunk):
        z = logits[rows]  # (chunk, k, N, C)
        if rule == "average":
            scores = z.mean(dim=1)
        elif rule == "geometric":
            scores = torch.log_softmax(z, dim=-1).mean(dim=1)
        elif rule == "median":
            scores = z.median(dim=1).values
        else:
            total = z.double().sum(dim=1)
            votes = torch.zeros_like(total)
            votes.scatter_add_(2, z.argmax(dim=-1).transpose(1, 2),
                               torch.ones(z.shape[0], z.shape[2], z.shape[1], dtype=torch.float64,
                                          device=z.device))
            scores = votes * (2 * total.abs().max() + 1) + total
        top = scores.topk(5, dim=-1).indices  # (chunk, N, 5)
        top1.append((top[..., 0] == target).sum(dim=1))
        top5.append((top == target[:, None]).any(dim=-1).sum(dim=1))
    return torch.cat(top1), torch.cat(top5)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--members", type=int, default=14)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--loop-subsets", type=int, default=364,
                        help="Subsets the per-combo loop runs (its time is scaled to all of them).")
    parser.add_argument("--vectorised-subsets", type=int, default=364,
                        help="Subsets the vectorised version runs (its time is scaled to all).")
    parser.add_argument("--margin", type=float, default=4.0,
                        help="The target's logit is raised by U(0, margin) per member and sample: 4 "
                             "gives members right about a quarter of the time, 0 pure noise.")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    logits, target = make_logits(args.members, args.samples, args.classes, device, margin=args.margin)
    subsets = torch.tensor(list(itertools.combinations(range(args.members), 3)), device=device)
    s = subsets.shape[0]
    info = machine_info(args.device)
    print(f"machine: {info}; margin {args.margin}")
    t_floor = min(timed(lambda: logits.sum(), sync)[0] for _ in range(5))
    print(f"logits {tuple(logits.shape)} float32, {s} subsets; floor (one read) {t_floor * 1e3:.1f} ms; "
          f"members right {100 * float((logits.argmax(-1) == target).float().mean()):.1f} % of the time")
    rows = []
    for rule in RULES:
        t_kernel, (top1, top5, hist) = timed(lambda: ensemble_sweep(logits, target, subsets, rule), sync,
                                              args.reps)
        few = subsets[: args.loop_subsets]
        t_loop, (l1, l5) = timed(lambda: per_combo_loop(logits, target, few, rule), sync)
        t_loop *= s / few.shape[0]
        some = subsets[: args.vectorised_subsets]
        t_vec, (v1, v5) = timed(lambda: vectorised(logits, target, some, rule), sync)
        t_vec *= s / some.shape[0]
        ref = reference.ensemble_sweep(logits, target, few, rule)  # brute force, float64
        exact = all(torch.equal(a.cpu(), b[: few.shape[0]].cpu()) for a, b in zip(ref, (top1, top5, hist)))
        loop_agrees = torch.equal(l1, top1[: few.shape[0]].cpu()) and torch.equal(l5, top5[: few.shape[0]].cpu())
        row = {"rule": rule, "kernel_s": t_kernel, "loop_s": t_loop, "loop_subsets": int(few.shape[0]),
               "vectorised_s": t_vec, "floor_s": t_floor, "speedup_vs_loop": t_loop / t_kernel,
               "speedup_vs_vectorised": t_vec / t_kernel, "exact_vs_reference": exact,
               "loop_agrees": loop_agrees,
               "vectorised_agrees": bool(torch.equal(v1.cpu(), top1[: some.shape[0]].cpu())
                                         and torch.equal(v5.cpu(), top5[: some.shape[0]].cpu())),
               "mean_top1": float(top1.double().mean()) / args.samples}
        rows.append(row)
        print(f"{rule:9s} kernel {t_kernel:7.3f} s ({t_kernel / t_floor:5.1f}x floor)  per-combo loop "
              f"{t_loop:7.2f} s ({row['speedup_vs_loop']:6.1f}x, {row['loop_subsets']} subsets run, "
              f"same counts: {loop_agrees})  vectorised {t_vec:6.2f} s ({row['speedup_vs_vectorised']:5.1f}x)  "
              f"ensemble top-1 {100 * row['mean_top1']:.1f} %")
    worst = min(r["speedup_vs_loop"] for r in rows)
    print(f"target >= {TARGET_SPEEDUP:.0f}x the per-combo loop with exact counts: worst {worst:.1f}x; "
          f"equal to the float64 brute-force reference: {all(r['exact_vs_reference'] for r in rows)}")
    if args.json:
        write_json_atomic(args.json, {"machine": info, "samples": args.samples, "rows": rows})


if __name__ == "__main__":
    main()
