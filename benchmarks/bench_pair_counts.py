"""Benchmark of ``divfast::pair_counts`` against DESlib, the torch reference and the read floor.

    python -m benchmarks.bench_pair_counts               # M=14, N=50,000, C=1000: ~2 min on CPU
    python -m benchmarks.bench_pair_counts --profile --json out.json
    python -m benchmarks.bench_pair_counts --device cuda # adds the CUDA kernel's rows

From logits the op is a single read of ``M*N*C`` floats, so the floor is those bytes over the
machine's measured read bandwidth: the best median of ``x.sum()`` and ``x.amax()`` over the same
tensor, with all threads and with one, timed in turns with the kernel (a shared VM's bandwidth
drifts from minute to minute; only interleaved timings give an honest ratio). DESlib computes each
pairwise measure with a Python loop over samples, so it is timed from labels, with the numpy arrays
its API documents (and, for comparison, Python lists).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time

import numpy as np
import torch

from benchmarks.common import machine_info
from divfast._ops import reference
from divfast._ops._load import has_kernel, load_error, load_extension

DESLIB_MEASURES = ("disagreement_measure", "Q_statistic", "correlation_coefficient", "double_fault")
TARGETS = {"floor": 1.5, "reference": 3.0, "deslib": 1000.0}


def cpu_seconds() -> tuple[float, float, float]:
    """(busy CPU seconds of the whole machine, of this process, wall clock) for a busy check."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]
    own = os.times()
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
    return busy, own.user + own.system, time.monotonic()


def make_inputs(m: int, n: int, c: int, accuracy: float, seed: int):
    """Random logits where each member is right on a random ``accuracy`` share of the samples."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(m, n, c, generator=g)  # (M, N, C)
    target = torch.randint(0, c, (n,), generator=g)  # (N,)
    hit = (torch.rand(m, n, generator=g) < accuracy).nonzero()  # (K, 2): member, sample
    # +10 beats the max of C standard normals, so the bumped rows are right and the rest ~1/C right
    logits.view(m * n, c)[hit[:, 0] * n + hit[:, 1], target[hit[:, 1]]] += 10.0
    return logits, target


def time_calls(fns: dict, repeats: int, cuda: bool = False) -> dict[str, list[float]]:
    """Seconds of each call, the functions taking turns so that they share the machine's moods.

    On a shared VM the memory bandwidth drifts from minute to minute; timing a kernel and the
    bandwidth probe in alternation keeps their ratio honest.
    """
    for fn in fns.values():  # warm-up: page faults, thread pool, allocator, CUDA context
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if cuda:
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3)
            else:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return times


def threaded(threads: int, fn):
    """``fn`` run under ``torch.set_num_threads(threads)``."""

    def call():
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(saved)

    return call


def read_probes(x: torch.Tensor) -> dict:
    """Full reads of ``x``; on the CPU with all threads and with one (more can be slower)."""
    if x.is_cuda:
        return {"x.sum()": lambda: x.sum(), "x.amax()": lambda: x.amax()}
    out = {}
    for threads in sorted({torch.get_num_threads(), 1}, reverse=True):
        out[f"x.sum() {threads}t"] = threaded(threads, lambda: x.sum())
        out[f"x.amax() {threads}t"] = threaded(threads, lambda: x.amax())
    return out


def check_exact(got, want, what: str) -> bool:
    names = ("counts", "agreement", "histogram", "correct")
    bad = [n for n, a, b in zip(names, got, want) if not torch.equal(a.cpu(), b.cpu())]
    print(f"  exact  {what}: {'yes' if not bad else 'NO, differs in ' + ', '.join(bad)}")
    return not bad


def deslib_run(labels: np.ndarray, target: np.ndarray, measures, as_lists: bool) -> float:
    """Seconds for DESlib's ``measures`` over every unordered member pair."""
    from deslib.util import diversity

    fns = [getattr(diversity, name) for name in measures]
    if as_lists:
        labels, target = [row.tolist() for row in labels], target.tolist()
    start = time.perf_counter()
    for fn in fns:
        for i, k in itertools.combinations(range(len(labels)), 2):
            fn(target, labels[i], labels[k])
    return time.perf_counter() - start


def check_deslib(labels: torch.Tensor, target: torch.Tensor) -> bool:
    """DESlib's four measures of a few pairs equal the ones the kernel's counts give."""
    from deslib.util import diversity

    counts = torch.ops.divfast.pair_counts(labels, target, -1)[0]  # (M, M, 2, 2)
    labels, target = labels.numpy(), target.numpy()

    share = counts.double() / len(target)  # (M, M, 2, 2) of N11, N10 / N01, N00
    n11, n10, n01, n00 = share[..., 0, 0], share[..., 0, 1], share[..., 1, 0], share[..., 1, 1]
    ours = {
        "disagreement_measure": n10 + n01,
        "Q_statistic": (n11 * n00 - n01 * n10) / (n11 * n00 + n01 * n10),
        "correlation_coefficient": (n11 * n00 - n10 * n01)
        / ((n11 + n01) * (n10 + n00) * (n11 + n10) * (n01 + n00)).sqrt(),
        "double_fault": n00,
    }
    ok = True
    for i, k in ((0, 1), (2, len(labels) - 1)):
        for name, value in ours.items():
            theirs = getattr(diversity, name)(target, labels[i], labels[k])
            ok &= bool(np.isclose(theirs, value[i, k].item(), rtol=1e-12, atol=1e-15))
    print(f"  exact  DESlib's 4 measures vs ours (2 pairs): {'yes' if ok else 'NO'}")
    return ok


def bench_deslib(labels: torch.Tensor, target: torch.Tensor, args) -> dict:
    """DESlib at ``--deslib-small`` samples and at full N (or at the largest allowed, scaled)."""
    n = labels.shape[1]
    lab, tgt = labels.numpy(), target.numpy()
    sizes = sorted({min(args.deslib_small, n), min(n, args.deslib_max_samples)})
    out = {"sizes": {}}
    for size in sizes:
        l_s, t_s = lab[:, :size], tgt[:size]
        out["sizes"][size] = {
            "4 measures, numpy": deslib_run(l_s, t_s, DESLIB_MEASURES, as_lists=False),
            "1 measure, numpy": deslib_run(l_s, t_s, DESLIB_MEASURES[:1], as_lists=False),
            "4 measures, lists": deslib_run(l_s, t_s, DESLIB_MEASURES, as_lists=True),
        }
        print(f"  DESlib at N={size:,}: " + ", ".join(
            f"{k} {v:.2f} s" for k, v in out["sizes"][size].items()), flush=True)
    largest = sizes[-1]
    out["extrapolated"] = largest < n
    out["full"] = {k: v * n / largest for k, v in out["sizes"][largest].items()}
    return out


def time_device(logits, target, labels, c: int, repeats: int):
    """Read bandwidth (GB/s per probe) and {(method, input): seconds} on the inputs' device."""
    op, cuda = torch.ops.divfast.pair_counts, logits.is_cuda
    probes = read_probes(logits)
    # the kernel from logits takes turns with the probes: its distance to the floor is a ratio
    times = time_calls({**probes, "kernel": lambda: op(logits, target, -1)}, repeats, cuda)
    gbps = {name: logits.numel() * logits.element_size() / 1e9 / statistics.median(times[name])
            for name in probes}
    out = {("torch.argmax alone", "logits"): time_calls(
        {"argmax": lambda: logits.argmax(-1)}, repeats, cuda)["argmax"]}
    out[("torch reference", "logits")] = time_calls(
        {"ref": lambda: reference.pair_counts(logits, target)}, max(3, repeats // 2), cuda)["ref"]
    out[("divfast kernel", "logits")] = times["kernel"]
    times = time_calls({"ref": lambda: reference.pair_counts(labels, target, c),
                        "kernel": lambda: op(labels, target, c)}, max(repeats, 30), cuda)
    out[("torch reference", "labels")] = times["ref"]
    out[("divfast kernel", "labels")] = times["kernel"]
    if not cuda and torch.get_num_threads() > 1:
        # one thread never waits at an OpenMP barrier for a core another process holds
        for inp, fn in (("logits", lambda: op(logits, target, -1)),
                        ("labels", lambda: op(labels, target, c))):
            out[("divfast kernel, 1 thread", inp)] = time_calls(
                {inp: threaded(1, fn)}, repeats if inp == "logits" else max(repeats, 30))[inp]
    return gbps, out


def format_table(rows: list[dict], floors: dict, deslib_base: float | None) -> str:
    """One Markdown table: the floors first, then every timed method."""

    def ratio(v):
        return "-" if v is None else format(v, ".2f" if v < 100 else ",.0f")

    header = (f"| {'method':<42} | {'input':<6} | {'dev':<4} | {'time (ms)':>10} | {'GB/s':>6} | "
              f"{'vs ref':>7} | {'x floor':>8} | {'vs DESlib':>9} |")
    lines = [header, "|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|"]
    for (inp, device), floor in floors.items():
        lines.append(f"| {'read floor (bytes / best read GB/s)':<42} | {inp:<6} | {device:<4} | "
                     f"{floor * 1e3:>10.2f} | {'-':>6} | {'-':>7} | {1.0:>8.2f} | "
                     f"{ratio(deslib_base / floor if deslib_base else None):>9} |")
    for row in rows:
        lines.append(
            f"| {row['method']:<42} | {row['input']:<6} | {row['device']:<4} | "
            f"{row['seconds'] * 1e3:>10.2f} | {row['gb_per_s']:>6.2f} | "
            f"{ratio(row['speedup_vs_reference']):>7} | {ratio(row['x_floor']):>8} | "
            f"{ratio(row['speedup_vs_deslib']):>9} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--members", type=int, default=14)
    p.add_argument("--samples", type=int, default=50_000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--accuracy", type=float, default=0.7)
    p.add_argument("--repeats", type=int, default=7, help="timed calls per measurement (median)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: also time the CUDA kernel and reference (CPU rows always run)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads first")
    p.add_argument("--deslib-small", type=int, default=10_000, help="first DESlib size")
    p.add_argument("--deslib-max-samples", type=int, default=50_000,
                   help="above this N, DESlib is timed at this size and scaled linearly")
    p.add_argument("--profile", action="store_true", help="thread sweep and in-cache throughput")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="write everything measured to OUT")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if not load_extension() or not has_kernel("pair_counts", "CPU"):
        raise SystemExit(f"divfast._C has no CPU pair_counts kernel: {load_error()}")
    if args.device == "cuda" and not (
        torch.cuda.is_available() and has_kernel("pair_counts", "CUDA")
    ):
        raise SystemExit("--device cuda: no GPU visible or divfast._C built without CUDA")
    op = torch.ops.divfast.pair_counts
    m, n, c = args.members, args.samples, args.classes
    info = machine_info(args.device, packages=("deslib",))
    print(f"pair_counts benchmark: M={m} members, N={n:,} samples, C={c} classes, "
          f"{m * (m - 1) // 2} pairs, repeats={args.repeats}")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)

    begin = cpu_seconds()
    logits, target = make_inputs(m, n, c, args.accuracy, args.seed)
    labels = logits.argmax(dim=-1)  # (M, N)
    accuracy = (labels == target).double().mean(dim=1)
    logit_bytes = logits.numel() * logits.element_size() + target.numel() * 8
    label_bytes = labels.numel() * 8 + target.numel() * 8
    print(f"inputs: logits {logit_bytes / 1e9:.2f} GB, labels {label_bytes / 1e6:.1f} MB, member "
          f"accuracy {accuracy.min():.3f}..{accuracy.max():.3f}")

    print("exactness (before timing):")
    ref_logits = reference.pair_counts(logits, target)
    exact = check_exact(op(logits, target, -1), ref_logits, "kernel vs reference, from logits")
    exact &= check_exact(op(labels, target, c), reference.pair_counts(labels, target, c),
                         "kernel vs reference, from labels")
    deslib_ok = info["deslib"] is not None
    if deslib_ok:
        exact &= check_deslib(labels[:, :2000].contiguous(), target[:2000].contiguous())
    else:
        print("  DESlib is NOT installed (pip install deslib): its rows and target are n/a")
    if not exact:
        raise SystemExit("\noutputs differ: not timing a wrong kernel")

    rows, bw, floors = [], {}, {}
    devices = ["cpu"] + (["cuda"] if args.device == "cuda" else [])
    for device in devices:
        if device == "cuda":
            x, t, lab = (v.to(torch.device("cuda")) for v in (logits, target, labels))
            same = check_exact(op(x, t, -1), ref_logits, "CUDA kernel vs CPU reference, logits")
            same &= check_exact(op(lab, t, c), ref_logits, "CUDA kernel vs CPU reference, labels")
            if not same:
                raise SystemExit("\nCUDA outputs differ: not timing a wrong kernel")
        else:
            x, t, lab = logits, target, labels
        where = (f"{torch.get_num_threads()} threads" if device == "cpu"
                 else torch.cuda.get_device_name())
        print(f"timing on {device} ({where}):", flush=True)
        probes, timings = time_device(x, t, lab, c, args.repeats)
        bw.update({f"{device} {name}": gbps for name, gbps in probes.items()})
        best = max(probes.values())
        print("  read bandwidth (GB/s): " + ", ".join(f"{k} {v:.1f}" for k, v in probes.items()))
        floors[("logits", device)] = logit_bytes / 1e9 / best
        floors[("labels", device)] = label_bytes / 1e9 / best
        for (method, inp), times in timings.items():
            rows.append({"method": method, "input": inp, "device": device,
                         "bytes": logit_bytes if inp == "logits" else label_bytes,
                         "seconds": statistics.median(times), "all_seconds": times})
            print(f"  {method} ({inp}): {rows[-1]['seconds'] * 1e3:.2f} ms", flush=True)
        del x, t, lab

    deslib = bench_deslib(labels, target, args) if deslib_ok else None
    if deslib:
        how = ", extrapolated" if deslib["extrapolated"] else ""
        for name, seconds in deslib["full"].items():
            rows.append({"method": f"DESlib {name}{how}", "input": "labels", "device": "cpu",
                         "bytes": label_bytes, "seconds": seconds, "all_seconds": [seconds]})

    def seconds_of(method, inp, device="cpu"):
        return next(x["seconds"] for x in rows
                    if x["method"] == method and x["input"] == inp and x["device"] == device)

    deslib_base = deslib["full"]["4 measures, numpy"] if deslib else None
    for row in rows:
        is_ours = not row["method"].startswith("DESlib")
        row["gb_per_s"] = row["bytes"] / 1e9 / row["seconds"]
        row["speedup_vs_reference"] = (
            seconds_of("torch reference", row["input"], row["device"]) / row["seconds"]
            if is_ours and row["method"] != "torch.argmax alone" else None)
        row["x_floor"] = row["seconds"] / floors[(row["input"], row["device"])]
        row["speedup_vs_deslib"] = deslib_base / row["seconds"] if deslib_base and is_ours else None

    table = format_table(rows, floors, deslib_base)
    print("\n" + table)
    print("vs ref = reference time / time (same input, device); x floor = time / floor; "
          "vs DESlib = DESlib's 4 measures x all pairs, numpy input / time")

    k_logits = seconds_of("divfast kernel", "logits")
    x_floor = k_logits / floors[("logits", "cpu")]
    vs_ref = seconds_of("torch reference", "logits") / k_logits
    targets = {  # name: (value, pass)
        f"from logits within {TARGETS['floor']}x of the floor":
            (x_floor, x_floor <= TARGETS["floor"]),
        f"from logits at least {TARGETS['reference']:.0f}x the torch reference":
            (vs_ref, vs_ref >= TARGETS["reference"]),
    }
    for name, seconds in (deslib["full"] if deslib else {}).items():
        speedup = seconds / seconds_of("divfast kernel", "labels")
        targets[f"from labels at least {TARGETS['deslib']:.0f}x DESlib ({name})"] = (
            speedup, speedup >= TARGETS["deslib"])
    print("\ntargets (CPU):")
    for name, (value, ok) in targets.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {value:,.2f}x")

    profile = run_profile(logits, labels, target, args) if args.profile else None
    end = cpu_seconds()
    others = ((end[0] - begin[0]) - (end[1] - begin[1])) / (end[2] - begin[2])
    info["other_processes_cores"] = others
    print(f"\nother processes used {others:.2f} cores on average meanwhile")
    if others > 0.2:
        # a busy core stalls every OpenMP barrier: multi-threaded times inflate, sometimes 10x
        print("note: the machine was busy; rerun on an idle machine to trust these numbers")
    result = {"config": vars(args), "machine": info, "accuracy": accuracy.tolist(),
              "bandwidth_gb_s": bw, "floors_s": {f"{k[0]}/{k[1]}": v for k, v in floors.items()},
              "rows": rows, "deslib": deslib, "table": table, "profile": profile,
              "targets": {k: {"value": v, "pass": ok} for k, (v, ok) in targets.items()}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return result


def run_profile(logits, labels, target, args) -> dict:
    """Where the kernel's time goes: thread sweep, labels vs logits, in-cache throughput."""
    op, r, c = torch.ops.divfast.pair_counts, args.repeats, args.classes
    out = {}
    print("\nprofile (median ms; GB/s of the logits read):")
    # 2 members x 2048 samples x 1000 classes = 16 MB sits in the L3 (32 MB here): compute speed
    small, small_t = logits[:2, :2048].contiguous(), target[:2048].contiguous()
    for threads in sorted({1, torch.get_num_threads()}):
        times = time_calls({
            "x.sum()": threaded(threads, lambda: logits.sum()),
            "kernel logits": threaded(threads, lambda: op(logits, target, -1)),
        }, r)
        times.update(time_calls({"kernel labels": threaded(threads, lambda: op(labels, target, c))},
                                max(r, 30)))
        cached = time_calls({
            "x.sum()": threaded(threads, lambda: small.sum()),
            "kernel logits": threaded(threads, lambda: op(small, small_t, -1)),
            "torch.argmax": threaded(threads, lambda: small.argmax(-1)),
        }, 30)
        ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        gb_cached = {k: small.numel() * 4 / 1e9 / statistics.median(v) for k, v in cached.items()}
        out[f"{threads}t_ms"], out[f"{threads}t_in_cache_gb_s"] = ms, gb_cached
        gb = logits.numel() * 4 / 1e6
        print(f"  {threads} thread(s): " + ", ".join(
            f"{k} {v:.2f} ms" + (f" ({gb / v:.1f} GB/s)" if "labels" not in k else "")
            for k, v in ms.items()))
        print(f"  {threads} thread(s), in cache ({small.numel() * 4 / 1e6:.0f} MB), GB/s: "
              + ", ".join(f"{k} {v:.1f}" for k, v in gb_cached.items()))
    return out


if __name__ == "__main__":
    main()
