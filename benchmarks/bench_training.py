"""Benchmark of the training losses: one ensemble training step per loss; the GNCL penalty's form.

    python -m benchmarks.bench_training                   # CPU, 3 x resnet18 at 64 px, batch 64
    python -m benchmarks.bench_training --device cuda
    python -m benchmarks.bench_training --quick           # smoke run: resnet10t, 32 px, batch 8

(a) One step of :func:`divfast.training.trainer.training_step` (forward of every member, the loss,
backward, timm's AdaBelief update) for each loss, on an :class:`Ensemble` of ``--members`` timm
``--arch`` members (random init, ``--num-classes`` outputs, no download) and one fixed random batch.
Each loss starts from the same weights; one warm-up step (which also allocates the optimizer state),
then the median of ``--repeats`` steps. Losses with options take the defaults (lambda 0.2; the
attribution loss l2-normalised, no warm-up). Peak memory is the step's own: the peak above what was
held just before the warm-up step (weights and the batch excluded; gradients, optimizer state,
activations and the loss's graph included):

- CUDA: ``torch.cuda.max_memory_allocated`` (reset before each loss) minus ``memory_allocated``
  before the warm-up; every loss runs in this process;
- CPU: each loss runs in a fresh subprocess (this script with a hidden flag), and the peak is
  ``ru_maxrss`` after the measured steps minus the resident set (``/proc/self/statm``) just before
  the warm-up. RSS counts what the allocator keeps as well as live tensors; a row whose steps never
  raised ``ru_maxrss`` above its earlier peak (import, model creation) is flagged: its number is
  then an upper bound.

Gradients and the optimizer state (three floats per parameter) are the same for every loss and
usually dominate that peak; ``held_mb`` (JSON, console) is what is still held after the steps, so
``peak - held`` is the step's transient part: activations and the loss's graph.

Ratios are against ``independent``.

(b) The GNCL penalty ``sum_i d_i^T D d_i`` with ``D = diag(p) - p p^T`` at C = 1000 classes, B = 128
samples, M = 3 members (float32): the O(C) form ``sum p d^2 - (p . d)^2``
(:func:`divfast.training.losses.hessian_quadratic_form`, what the loss uses) against the explicit
``(B, C, C)`` Hessian and an einsum; forward plus backward to the logits, the median of
``--repeats``, and the largest absolute difference of the per-sample penalties and of the gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

from benchmarks.common import machine_info, timed_with_result
from divfast.io import write_json_atomic

LOSSES = (("independent", {}),
          ("gncl", {"consensus": "average"}),
          ("gncl", {"consensus": "median"}),
          ("gncl", {"consensus": "geometric"}),
          ("gncl", {"consensus": "vote"}),
          ("gncl-masked", {}),
          ("balanced", {}),
          ("attribution", {}))
FULL = {"arch": "resnet18", "image_size": 64, "batch_size": 64, "repeats": 5,
        "penalty_batch": 128, "penalty_classes": 1000}
QUICK = {"arch": "resnet10t", "image_size": 32, "batch_size": 8, "repeats": 1,
         "penalty_batch": 16, "penalty_classes": 100}
_CHILD_MARK = "BENCH_TRAINING_ROW "
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loss_label(name: str, options: dict) -> str:
    return f"{name} ({options['consensus']})" if "consensus" in options else name


def _rss_bytes() -> int:
    """The resident set size now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure_step(name: str, options: dict, arch: str, num_classes: int, image_size: int,
                 batch_size: int, members: int, repeats: int, device: str) -> dict:
    """Time and peak memory of one training step with loss ``name`` (see the module docstring)."""
    import timm.optim

    from divfast.data.members import create_member
    from divfast.training import build_loss
    from divfast.training.trainer import Ensemble, training_step

    device = torch.device(device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    size = (3, image_size, image_size)
    parts = []
    for i in range(members):
        torch.manual_seed(i)  # the same weights for every loss
        parts.append(create_member(arch, num_classes, input_size=size))
    ensemble = Ensemble(parts).to(device).train()
    optimizer = timm.optim.AdaBelief(ensemble.parameters(), lr=1e-3, eps=1e-8, betas=(0.9, 0.999))
    loss_fn = build_loss(name, **options)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, *size, generator=gen).to(device)  # (B, 3, H, W)
    y = torch.randint(0, num_classes, (batch_size,), generator=gen).to(device)

    def step():
        return training_step(ensemble, loss_fn, optimizer, x, y)

    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base, max_before = _rss_bytes(), _max_rss_bytes()
    step()  # warm-up: allocates the optimizer state, the allocator's pools, the kernels' plans
    seconds, (value, _, _) = timed_with_result(step, sync, repeats)
    row = {"loss": loss_label(name, options), "name": name, "options": options,
           "ms": 1e3 * seconds, "final_loss": value}
    if cuda:
        row["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
        row["held_mb"] = (torch.cuda.memory_allocated(device) - base) / 2 ** 20
        row["upper_bound"] = False
    else:
        max_after = _max_rss_bytes()
        row["peak_mb"] = (max_after - base) / 2 ** 20
        row["held_mb"] = (_rss_bytes() - base) / 2 ** 20
        row["upper_bound"] = max_after <= max_before  # the steps never set a new peak
    return row


def _measure_in_subprocess(name: str, options: dict, settings: dict) -> dict:
    """:func:`measure_step` in a fresh interpreter, so ``ru_maxrss`` sees this loss alone."""
    spec = json.dumps({"name": name, "options": options, **settings})
    path = os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "benchmarks.bench_training", "--measure-one", spec]
    done = subprocess.run(command, cwd=_ROOT, env=dict(os.environ, PYTHONPATH=path),
                          capture_output=True, text=True, check=False)
    rows = [ln[len(_CHILD_MARK):] for ln in done.stdout.splitlines() if ln.startswith(_CHILD_MARK)]
    if done.returncode != 0 or not rows:
        raise RuntimeError(f"the measurement of {loss_label(name, options)} failed "
                           f"(exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(rows[-1])


def step_rows(settings: dict) -> list[dict]:
    rows = []
    for name, options in LOSSES:
        if torch.device(settings["device"]).type == "cuda":
            row = measure_step(name, options, **settings)
            torch.cuda.empty_cache()
        else:
            row = _measure_in_subprocess(name, options, settings)
        rows.append(row)
        print(f"  {row['loss']:22s} {row['ms']:9.1f} ms  peak {row['peak_mb']:8.1f} MB"
              f"{' (upper bound)' if row['upper_bound'] else ''}  held {row['held_mb']:8.1f} MB",
              flush=True)
    base = rows[0]
    for row in rows:
        row["time_ratio"] = row["ms"] / base["ms"]
        row["memory_ratio"] = (row["peak_mb"] / base["peak_mb"] if base["peak_mb"] > 0
                               else float("nan"))
    return rows


def penalty_forms(batch: int, classes: int, members: int, device: torch.device,
                  repeats: int) -> dict:
    """The GNCL penalty in O(C) against the explicit ``(B, C, C)`` Hessian, forward + backward."""
    from divfast.training.losses import hessian_quadratic_form

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    logits = (2.0 * torch.randn(members, batch, classes, generator=gen)).to(device)
    logits.requires_grad_(True)  # (M, B, C) float32

    def linear():
        f = logits.mean(dim=0)  # (B, C)
        p = torch.softmax(f.detach(), dim=-1)
        quad = hessian_quadratic_form(logits - f, p)  # (M, B)
        (grad,) = torch.autograd.grad(quad.sum(dim=0).mean(), logits)
        return quad.detach(), grad

    def explicit():
        f = logits.mean(dim=0)  # (B, C)
        p = torch.softmax(f.detach(), dim=-1)
        hessian = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (B, C, C)
        d = logits - f  # (M, B, C)
        quad = torch.einsum("mbc,bcd,mbd->mb", d, hessian, d)  # (M, B)
        (grad,) = torch.autograd.grad(quad.sum(dim=0).mean(), logits)
        return quad.detach(), grad

    linear(), explicit()  # warm-up
    t_linear, (q_linear, g_linear) = timed_with_result(linear, sync, repeats)
    t_explicit, (q_explicit, g_explicit) = timed_with_result(explicit, sync, repeats)
    return {"members": members, "batch": batch, "classes": classes,
            "hessian_mb": batch * classes * classes * 4 / 2 ** 20,
            "linear_ms": 1e3 * t_linear, "explicit_ms": 1e3 * t_explicit,
            "speedup": t_explicit / t_linear,
            "max_abs_diff_penalty": float((q_linear - q_explicit).abs().max()),
            "max_abs_penalty": float(q_explicit.abs().max()),
            "max_abs_diff_grad": float((g_linear - g_explicit).abs().max()),
            "max_abs_grad": float(g_explicit.abs().max())}


def markdown(info: dict, settings: dict, rows: list[dict], penalty: dict, argv: list[str]) -> str:
    device = torch.device(settings["device"])
    where = info.get("gpu", info["cpu"]) if device.type == "cuda" else info["cpu"]
    method = ("`torch.cuda.max_memory_allocated` above the allocation before the warm-up step"
              if device.type == "cuda" else
              "peak RSS (`ru_maxrss`) of a fresh process per loss above its RSS before the "
              "warm-up step")
    method += "; gradients and AdaBelief state, the same for every loss, are part of it"
    lines = [f"## training losses: one step ({device.type.upper()})", "",
             "```", "python -m benchmarks.bench_training " + " ".join(argv), "```", "",
             f"**Date:** {info['date']}. **Machine:** {where}, {info['torch_threads']} torch "
             f"threads, torch {info['torch']}, timm {info.get('timm')}. {settings['members']} x "
             f"{settings['arch']} (random init, {settings['num_classes']} classes) at "
             f"{settings['image_size']} px, batch {settings['batch_size']}, AdaBelief; median of "
             f"{settings['repeats']} steps after one warm-up. Peak memory: {method}.", "",
             "| loss | ms / step | × independent | peak MB | × independent |",
             "|:-----|----------:|--------------:|--------:|--------------:|"]
    for r in rows:
        bound = " (≤)" if r["upper_bound"] else ""
        lines.append(f"| {r['loss']} | {r['ms']:,.1f} | {r['time_ratio']:.2f} | "
                     f"{r['peak_mb']:,.1f}{bound} | {r['memory_ratio']:.2f} |")
    p = penalty
    lines += ["", f"GNCL penalty, M = {p['members']}, B = {p['batch']}, C = {p['classes']}, "
              f"float32, forward + backward (explicit Hessian {p['hessian_mb']:,.0f} MB):", "",
              "| form | ms | × O(C) | max abs diff (penalty) | max abs diff (gradient) |",
              "|:-----|---:|-------:|-----------------------:|------------------------:|",
              f"| O(C): `sum p d² - (p·d)²` | {p['linear_ms']:,.2f} | 1.00 | – | – |",
              f"| explicit (B, C, C) + einsum | {p['explicit_ms']:,.2f} | {p['speedup']:.1f} | "
              f"{p['max_abs_diff_penalty']:.2e} (of {p['max_abs_penalty']:.2e}) | "
              f"{p['max_abs_diff_grad']:.2e} (of {p['max_abs_grad']:.2e}) |"]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--arch", default=None, help=f"timm architecture (default {FULL['arch']})")
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=None,
                        help=f"default {FULL['image_size']}")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"default {FULL['batch_size']}")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"measured steps after the warm-up (default {FULL['repeats']})")
    parser.add_argument("--penalty-batch", type=int, default=None,
                        help=f"B of part (b) (default {FULL['penalty_batch']})")
    parser.add_argument("--penalty-classes", type=int, default=None,
                        help=f"C of part (b) (default {FULL['penalty_classes']})")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: " + ", ".join(f"{k} {v}" for k, v in QUICK.items())
                        + " (explicit options still win)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--measure-one", default=None, help=argparse.SUPPRESS)  # CPU child
    args = parser.parse_args(argv)
    if args.measure_one is not None:
        spec = json.loads(args.measure_one)
        print(_CHILD_MARK + json.dumps(measure_step(**spec)), flush=True)
        return {}

    preset = QUICK if args.quick else FULL
    chosen = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in preset.items()}
    settings = {"arch": chosen["arch"], "num_classes": args.num_classes,
                "image_size": chosen["image_size"], "batch_size": chosen["batch_size"],
                "members": args.members, "repeats": chosen["repeats"], "device": args.device}
    device = torch.device(args.device)
    info = machine_info(args.device, packages=("timm",))
    print(f"# divfast training losses on {device}: {settings['members']} x {settings['arch']}, "
          f"{settings['image_size']} px, batch {settings['batch_size']}, "
          f"{settings['num_classes']} classes, median of {settings['repeats']} steps; "
          f"{info['torch_threads']} threads; {info['cpu']}"
          + (f"; {info['gpu']}" if "gpu" in info else ""), flush=True)
    print("(a) one training step per loss:", flush=True)
    rows = step_rows(settings)
    penalty = penalty_forms(chosen["penalty_batch"], chosen["penalty_classes"], args.members,
                            device, chosen["repeats"])
    print(f"(b) GNCL penalty, M = {penalty['members']}, B = {penalty['batch']}, "
          f"C = {penalty['classes']}: O(C) {penalty['linear_ms']:.2f} ms, explicit Hessian "
          f"{penalty['explicit_ms']:.2f} ms ({penalty['speedup']:.1f}x); max abs diff "
          f"{penalty['max_abs_diff_penalty']:.2e} (penalty), {penalty['max_abs_diff_grad']:.2e} "
          f"(gradient)", flush=True)
    print()
    print(markdown(info, settings, rows, penalty, list(argv if argv is not None else sys.argv[1:])))
    result = {"machine": info, "settings": settings, "steps": rows, "penalty": penalty}
    if args.json:
        write_json_atomic(args.json, result)
    return result


if __name__ == "__main__":
    main()
