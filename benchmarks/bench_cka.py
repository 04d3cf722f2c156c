"""Benchmark of representation similarity: layer x layer minibatch CKA of two members.

    pip install torch-cka==0.21          # the peer tool, for this benchmark only
    python -m benchmarks.bench_cka       # CPU: ~1.5 min (torch-cka alone takes most of it)
    python -m benchmarks.bench_cka --device cuda

Two timm resnet18 members with random weights (``zero_init_last=False``: otherwise every residual
block starts as an identity and the layers look alike), 256 images 3 x 64 x 64 in batches of 64, on
(a) their 10 top-level blocks and (b) all 93 named modules (torch-cka's default adds the root,
i.e. the logits). For each set:

- ``forward``: the two members' forward passes alone (the cost any tool pays);
- ``divfast``: the forward passes with :class:`GramCapture` (each layer's Gram formed inside the
  forward from features centred over the batch, float32 products summed in float64; layers of
  2,048 features or more through the ``divfast::attribution_stats`` kernel) and ``divfast::hsic`` over every
  (member, layer) pair (the full 2L x 2L map, self maps included); ``CKA work`` is its excess over
  ``forward``. Target: at most 10 % of ``forward``;
- ``per-pair loop``: the same Grams, then the unbiased HSIC of each pair on its own (the textbook
  loop, in float64 torch ops);
- ``torch-cka``: ``torch_cka.CKA(...).compare(loader)`` on the same members, layers and loader.
  Target: divfast at least 20x faster on (b);
- accuracy: every tool's cross-member map against a float64 reference that captures the same
  float32 features (copied at once, so later in-place ops cannot touch them) and applies the
  U-centred HSIC composition of divfast/_ops/reference.py. Target: divfast within 1e-6.

Then the kernel on its own: the batch's Grams (G = 186, n = 64) through ``divfast::hsic`` against
the torch compositions (explicit U-centring, flatten, one matmul; and the expansion of
reference.py). Target: at least as fast as the composition.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import machine_info, timed_with_result as timed
from divfast._ops import reference
from divfast._ops.hsic import hsic
from divfast.ensembles.features import GramCapture, list_layers
from divfast.functional.representation import cka_from_hsic
from divfast.io import write_json_atomic
from divfast.metrics import RepresentationSimilarity

TARGET_SPEEDUP = 20.0
TARGET_OVERHEAD = 0.10
TARGET_ERROR = 1e-6
IMAGES, BATCH, SIZE = 256, 64, 64


def members(device):
    import timm

    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        out.append(timm.create_model("resnet18", pretrained=False, zero_init_last=False).to(device).eval())
    return out


def loader():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(IMAGES, 3, SIZE, SIZE, generator=gen)
    return DataLoader(TensorDataset(images, torch.zeros(IMAGES, dtype=torch.long)), batch_size=BATCH)


@torch.no_grad()
def forward_only(models, data, device):
    for x, _ in data:
        x = x.to(device)
        for model in models:
            model(x)


def batch_grams(capture, models, data, device):
    """Yields each batch's Grams (G, n, n), formed by ``capture`` inside the members' forward."""
    with capture:
        for x, _ in data:
            x = x.to(device)
            with capture.recording():
                for model in models:
                    model(x)
            yield capture.pop()


@torch.no_grad()
def divfast_cka(models, data, device, layers):
    capture = GramCapture(models, [layers, layers])
    metric = RepresentationSimilarity(capture.names)
    for grams in batch_grams(capture, models, data, device):
        metric.update_grams(grams)
    return torch.tensor(metric.compute()["cka"], dtype=torch.float64)


def pair_hsic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """The unbiased HSIC of one pair of Grams (float64 torch ops), Song et al. (2012)."""
    n = k.shape[0]
    eye = torch.eye(n, dtype=k.dtype, device=k.device)
    k, l = k * (1 - eye), l * (1 - eye)
    ones = torch.ones(n, dtype=k.dtype, device=k.device)
    return ((k * l).sum() + (k.sum() * l.sum()) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * ((k @ ones) @ (l @ ones))) / (n * (n - 3))


@torch.no_grad()
def per_pair_cka(models, data, device, layers):
    capture = GramCapture(models, [layers, layers])
    g = capture.num_grams
    total = None
    for grams in batch_grams(capture, models, data, device):
        batch = torch.zeros(g, g, dtype=torch.float64, device=grams.device)
        for a in range(g):
            for b in range(a, g):
                batch[a, b] = batch[b, a] = pair_hsic(grams[a], grams[b])
        total = batch if total is None else total + batch
    return cka_from_hsic(total)


@torch.no_grad()
def reference_cka(models, data, device, layers):
    """float64 reference on the same float32 features, each copied the moment its layer runs."""
    total = None
    for x, _ in data:
        x = x.to(device)
        grams = {}
        handles = []
        for i, model in enumerate(models):
            found = dict(model.named_modules())
            for name in layers:
                def hook(mod, args, out, key=(i, name)):
                    f = out.detach().flatten(1).to(torch.float64)
                    grams[key] = f @ f.T

                handles.append(found[name].register_forward_hook(hook))
        try:
            for model in models:
                model(x)
        finally:
            for h in handles:
                h.remove()
        stacked = torch.stack([grams[(i, name)] for i in range(len(models)) for name in layers])
        batch = reference.hsic(stacked)
        total = batch if total is None else total + batch
    return cka_from_hsic(total)


def torch_cka_map(models, data, device, layers):
    """torch-cka's cross map, its rows and columns put back in layer order (it stores features in
    the order the hooks fire, but labels them in module order)."""
    from torch_cka import CKA

    tool = CKA(models[0], models[1], "m0", "m1", model1_layers=layers, model2_layers=layers,
               device=str(device))
    with contextlib.redirect_stderr(io.StringIO()):
        tool.compare(data)
    fired = []
    handles = [mod.register_forward_hook(lambda m, a, o, name=name: fired.append(name))
               for name, mod in models[0].named_modules() if name in layers]
    with torch.no_grad():
        models[0](next(iter(data))[0][:4].to(device))
    for h in handles:
        h.remove()
    for model in models:  # torch-cka leaves its hooks in place
        for mod in model.modules():
            mod._forward_hooks.clear()
    order = [fired.index(name) for name in layers]
    return tool.export()["CKA"].to(torch.float64)[order][:, order]


def u_centred_composition(grams: torch.Tensor) -> torch.Tensor:
    """Centre (explicit U-centring of every Gram), flatten, one matmul: the plain torch route."""
    g, n = grams.shape[0], grams.shape[-1]
    k = grams.to(torch.float64)
    k = (k + k.transpose(1, 2)) / 2
    k = k * (1.0 - torch.eye(n, dtype=k.dtype, device=k.device))
    rows = k.sum(dim=2, keepdim=True)
    total = rows.sum(dim=1, keepdim=True)
    u = k - rows / (n - 2) - rows.transpose(1, 2) / (n - 2) + total / ((n - 1) * (n - 2))
    u = u * (1.0 - torch.eye(n, dtype=k.dtype, device=k.device))
    flat = u.reshape(g, -1)
    return flat @ flat.T / (n * (n - 3))


def run_set(label, layers, models, data, device, reps, with_peer, sync):
    l_count = len(layers)
    t_fwd, _ = timed(lambda: forward_only(models, data, device), sync, reps)
    t_ours, ours = timed(lambda: divfast_cka(models, data, device, layers), sync, reps)
    t_loop, loop = timed(lambda: per_pair_cka(models, data, device, layers), sync, 1)
    ref = reference_cka(models, data, device, layers)
    cross = slice(0, l_count), slice(l_count, 2 * l_count)
    row = {"set": label, "layers": l_count, "forward_s": t_fwd, "divfast_s": t_ours,
           "cka_work_fraction": (t_ours - t_fwd) / t_fwd, "per_pair_loop_s": t_loop,
           "divfast_max_error": float((ours - ref).abs().max()),
           "per_pair_max_error": float((loop - ref).abs().max())}
    if with_peer:
        start = time.perf_counter()
        peer = torch_cka_map(models, data, device, layers)
        sync()
        row["torch_cka_s"] = time.perf_counter() - start
        row["torch_cka_max_error"] = float((peer - ref[cross].cpu()).abs().max())
        row["speedup_vs_torch_cka"] = row["torch_cka_s"] / t_ours
    return row


def kernel_rows(models, data, device, reps, sync):
    layers = list_layers(models[0])
    capture = GramCapture(models, [layers, layers])
    x = next(iter(data))[0].to(device)
    with capture, capture.recording(), torch.no_grad():
        for model in models:
            model(x)
        grams = capture.pop()
    rows = []
    for dtype in (torch.float64, torch.float32):
        k = grams.to(dtype)
        t_op, h = timed(lambda: hsic(k), sync, reps)
        t_comp, c = timed(lambda: u_centred_composition(k), sync, reps)
        t_ref, _ = timed(lambda: reference.hsic(k), sync, reps)
        rows.append({"grams": list(k.shape), "dtype": str(dtype).replace("torch.", ""), "hsic_ms": t_op * 1e3,
                     "composition_ms": t_comp * 1e3, "expansion_ms": t_ref * 1e3,
                     "max_rel_diff": float((h - c).abs().max() / c.abs().max())})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", default=None, help="Also write the results here.")
    parser.add_argument("--no-peer", action="store_true", help="Skip torch-cka.")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        import torch_cka  # noqa: F401

        with_peer = not args.no_peer
    except ImportError:
        with_peer = False
        print("torch-cka is not installed (pip install torch-cka==0.21): its columns are skipped")
    models, data = members(device), loader()
    info = machine_info(args.device, ("timm", "torch_cka"))
    print(f"machine: {info}")
    blocks = [name for name, _ in models[0].named_children()]
    sets = [("(a) top-level blocks", blocks), ("(b) all modules", list_layers(models[0]))]
    results = {"machine": info, "sets": [], "kernel": []}
    for label, layers in sets:
        row = run_set(label, layers, models, data, device, args.reps, with_peer, sync)
        results["sets"].append(row)
        peer = (f"torch-cka {row['torch_cka_s']:7.2f} s ({row['speedup_vs_torch_cka']:5.1f}x slower, "
                f"max error {row['torch_cka_max_error']:.3g})" if "torch_cka_s" in row else "")
        print(f"{label:22s} L={row['layers']:3d}  forward {row['forward_s']:6.3f} s  divfast "
              f"{row['divfast_s']:6.3f} s (CKA work {100 * row['cka_work_fraction']:5.1f} % of forward, "
              f"max error {row['divfast_max_error']:.2g})  per-pair loop {row['per_pair_loop_s']:6.2f} s  {peer}")
    for row in kernel_rows(models, data, device, max(args.reps, 5), sync):
        results["kernel"].append(row)
        print(f"hsic kernel on Grams {row['grams']} {row['dtype']}: {row['hsic_ms']:.2f} ms; U-centred "
              f"composition {row['composition_ms']:.2f} ms ({row['composition_ms'] / row['hsic_ms']:.1f}x); "
              f"expansion {row['expansion_ms']:.2f} ms ({row['expansion_ms'] / row['hsic_ms']:.1f}x); "
              f"max rel diff {row['max_rel_diff']:.2g}")
    b = results["sets"][-1]
    verdicts = [f"CKA work <= {100 * TARGET_OVERHEAD:.0f} % of forward: "
                + ", ".join(f"{r['set'][:3]} {100 * r['cka_work_fraction']:.1f} %" for r in results["sets"]),
                f"agreement with float64 <= {TARGET_ERROR:g}: "
                + ", ".join(f"{r['set'][:3]} {r['divfast_max_error']:.2g}" for r in results["sets"])]
    if "speedup_vs_torch_cka" in b:
        verdicts.append(f">= {TARGET_SPEEDUP:.0f}x torch-cka on (b): {b['speedup_vs_torch_cka']:.1f}x")
    print("targets: " + "; ".join(verdicts))
    if args.json:
        write_json_atomic(args.json, results)


if __name__ == "__main__":
    main()
