"""The divfast command line: thin Click commands that parse, call one library function, print.

Results go to stdout (a table, or JSON with --json), logs and progress bars to stderr, files under
--out. Bad input exits non-zero with a one-line reason and no traceback. Heavy modules are imported
inside commands so ``divfast --help`` is instant.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import click

from divfast.errors import DivfastError  # light: no torch

DEFAULT_DEMO_MEMBERS = "resnet10t,convnext_atto,efficientvit_m0"
DEMO_DATASETS = ("lines1.6", "plasma4.0", "checkerboard4.0", "waterdrop7.0")  # the paper's four
# divfast.ensembles.evaluate's ATTRIBUTION_* choices, repeated here so `--help` imports no torch
# (tests/test_eval_attribution.py keeps the two in step).
ATTRIBUTION_METHODS = ("saliency", "ig", "none")
ATTRIBUTION_TARGETS = ("label", "member", "ensemble")
ATTRIBUTION_NORMALIZATIONS = ("none", "l1", "l2", "max")
GRID_SAMPLES = 4  # rows of attributions.png


def _user_errors(fn):
    """Turns user mistakes into a one-line error and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (DivfastError, FileNotFoundError, PermissionError) as exc:  # bugs keep tracebacks
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            click.echo(f"Error: {msg}", err=True)
            sys.exit(2)

    return wrapper


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DivfastError(f"--device: {name!r} is not a device (expected cpu, cuda, cuda:N or auto)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DivfastError(f"--device: {name!r} requested but no CUDA device is visible")
    if device.type not in ("cpu", "cuda"):
        raise DivfastError(f"--device: {name!r} is not supported (expected cpu, cuda, cuda:N or auto)")
    return device


def _split(csv: str) -> list[str]:
    return [s.strip() for s in csv.split(",") if s.strip()]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="divfast")
def cli():
    """Measure and train diversity in deep-learning ensembles."""


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def info(as_json):
    """Build and runtime facts: torch, CUDA, which kernels are compiled, the device seen."""
    from divfast.info import collect_info

    facts = collect_info()
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    for key, value in facts.items():
        if isinstance(value, dict):
            click.echo(f"{key}:")
            for k, v in value.items():
                click.echo(f"  {k}: {v}")
        else:
            click.echo(f"{key}: {value}")


METRICS = ("prediction", "attribution", "representation")


def _parse_metrics(text: str) -> set[str]:
    """``--metrics``: a comma-separated subset of METRICS, or ``all``."""
    names = _split(text)
    if names == ["all"]:
        return set(METRICS)
    bad = [n for n in names if n not in METRICS]
    if bad or not names:
        raise DivfastError(f"--metrics: expected a comma-separated list of {', '.join(METRICS)} or "
                           f"'all', got {text!r}")
    return set(names)


def _run_eval(paths, dataset, data, batch_size, device, as_json, out, progress, workers=0, seed=0,
              **options):
    """Loads the members at ``paths`` and evaluates them (see :func:`_eval_loaded`)."""
    from divfast.corruptions import parse_dataset_spec
    from divfast.data import load_members
    from divfast.ensembles.evaluate import check_attribution_options, check_representation_options

    attribution = {k: v for k, v in options.items() if k.startswith(("attribution", "ig_"))}
    defaults = {"attribution": "saliency", "ig_steps": 10, "attribution_target": "label",
                "attribution_normalize": "none"}
    check_attribution_options(**{**defaults, **attribution})  # before a slow member load
    check_representation_options(options.get("cka_kernel", "linear"), options.get("rbf_bandwidth", 0.5))
    parse_dataset_spec(dataset)
    loaded = load_members(paths, _device(device))
    return _eval_loaded(loaded, paths, dataset, data, batch_size, device, as_json, out, progress,
                        workers, seed, **options)


def _eval_loaded(loaded, paths, dataset, data, batch_size, device, as_json, out, progress, workers=0,
                 seed=0, quiet=False, attribution="saliency", ig_steps=10,
                 attribution_target="label", attribution_normalize="none", representation=False,
                 layers=None, cka_kernel="linear", rbf_bandwidth=0.5, gram_dtype="float32"):
    """Evaluates loaded members on ``dataset``; writes ``out/report.json``, unless ``attribution``
    is "none" the attribution grid ``out/attributions.png``, and with ``representation`` the CKA
    maps ``out/cka_maps.png``; prints unless ``quiet``."""
    import torch

    from divfast.corruptions import format_dataset_spec, parse_dataset_spec
    from divfast.data import build_dataset
    from divfast.ensembles import evaluate
    from divfast.ensembles.evaluate import check_attribution_options
    from divfast.io import ensure_dir, json_safe, write_json_atomic
    from divfast.report import render_eval

    check_attribution_options(attribution, ig_steps, attribution_target, attribution_normalize)
    spec = format_dataset_spec(*parse_dataset_spec(dataset))
    ds = build_dataset(spec, data=data, image_size=loaded[0].info.input_size[-1], seed=seed)
    if representation:  # resolves --layers (no hooks yet): a bad glob fails before --out is made
        from divfast.ensembles.features import GramCapture

        GramCapture(loaded, layers, kernel=cka_kernel, bandwidth=rbf_bandwidth)
    if out:
        ensure_dir(out)  # before the pass: a bad --out fails fast
    report = evaluate(loaded, ds, spec, batch_size=batch_size, device=_device(device),
                      progress=progress, num_workers=workers, attribution=attribution,
                      ig_steps=ig_steps, attribution_target=attribution_target,
                      attribution_normalize=attribution_normalize, representation=representation,
                      layers=layers, cka_kernel=cka_kernel, rbf_bandwidth=rbf_bandwidth,
                      gram_dtype=getattr(torch, gram_dtype))
    report["member_files"] = list(paths)
    if spec != "clean":
        report["corruption_seed"] = seed
    written = []
    if out:
        written.append(os.path.join(out, "report.json"))
        write_json_atomic(written[-1], report)
        if attribution != "none":
            written.append(os.path.join(out, "attributions.png"))
            _attribution_grid(loaded, ds, spec, report, written[-1], device, attribution, ig_steps,
                              attribution_target)
        if report.get("representation"):
            from divfast.report import draw_cka_maps

            written.append(os.path.join(out, "cka_maps.png"))  # one member: its own layer map
            draw_cka_maps(report["representation"], written[-1],
                          pairs="cross" if len(loaded) > 1 else "all")
    if quiet:
        return report
    if as_json:
        click.echo(json.dumps(json_safe(report), indent=2, allow_nan=False))
    else:
        render_eval(report)
        for path in written:
            click.echo(f"wrote {path}")
    return report


def _attribution_grid(loaded, ds, spec, report, path, device, attribution, ig_steps, target):
    """Draws the first GRID_SAMPLES images' maps (paper Figure 11) into ``path``."""
    from divfast.ensembles.evaluate import attribution_examples
    from divfast.report import draw_attribution_grid

    examples = attribution_examples(loaded, ds, GRID_SAMPLES, attribution, ig_steps, target,
                                    device=_device(device))
    classes = getattr(ds, "classes", None)
    labels = [f"label {classes[int(y)] if classes else int(y)}" for y in examples.labels]
    method = "Saliency" if attribution == "saliency" else f"Integrated Gradients ({ig_steps} steps)"
    draw_attribution_grid(examples.images, examples.maps,
                          [row["name"] for row in report["members"]], path, row_labels=labels,
                          title=f"{method} of each member, target {target}, dataset {spec}")


@cli.command("eval")
@click.option("--members", required=True, help="Comma-separated checkpoint files or timm:NAME.")
@click.option("--dataset", default="clean", show_default=True,
              help="clean, or <corruption><severity> such as lines1.6, plasma4.0, checkerboard4.0, "
                   "waterdrop7.0 (see `divfast corrupt --list`).")
@click.option("--data", type=click.Path(), default=None,
              help="ImageFolder root; default: the embedded digits test split.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Corruption seed: with each image's path or index it fixes the image's corruption.")
@click.option("--batch-size", default=128, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--out", type=click.Path(), default=None,
              help="Directory for report.json, attributions.png (the first "
                   f"{GRID_SAMPLES} images and each member's saliency-masked copy) and, with "
                   "representation metrics, cka_maps.png (layer x layer CKA of each member pair).")
@click.option("--workers", default=0, show_default=True, type=int, help="Data-loader processes.")
@click.option("--attribution", default="saliency", show_default=True,
              type=click.Choice(ATTRIBUTION_METHODS),
              help="Attribution maps for the attribution diversity (paper Eq. 7): Saliency, "
                   "Integrated Gradients, or none (no backward passes).")
@click.option("--ig-steps", default=10, show_default=True, type=int,
              help="Integration points of --attribution ig (>= 1).")
@click.option("--attribution-target", default="label", show_default=True,
              type=click.Choice(ATTRIBUTION_TARGETS),
              help="The class each map explains: the true label, each member's prediction, or "
                   "the ensemble's.")
@click.option("--attribution-normalize", default="none", show_default=True,
              type=click.Choice(ATTRIBUTION_NORMALIZATIONS),
              help="Scale each map by its l1 norm, l2 norm or maximum before the variance.")
@click.option("--metrics", default="prediction,attribution", show_default=True,
              help="Diversity to measure: a comma-separated list of prediction, attribution, "
                   "representation (minibatch CKA between layers, paper Eq. 6), or all. Accuracy "
                   "and prediction diversity are always reported.")
@click.option("--layers", default=None,
              help="Layers compared by the representation metric: comma-separated globs over "
                   "each member's module names, e.g. 'layer*' or '*'; default: timm's feature "
                   "stages, else every top-level block.")
@click.option("--cka-kernel", default="linear", show_default=True,
              type=click.Choice(("linear", "rbf")), help="CKA kernel.")
@click.option("--rbf-bandwidth", default=0.5, show_default=True, type=float,
              help="RBF width as a fraction of the median pairwise distance (per batch).")
@click.option("--gram-dtype", default="float32", show_default=True,
              type=click.Choice(("float32", "float64")),
              help="Precision of the layer Gram products (the features are centred first; the "
                   "HSIC sums are float64 either way).")
@click.option("--progress/--no-progress", default=True, help="Progress bar on stderr.")
@_user_errors
def eval_cmd(members, dataset, data, seed, batch_size, device, as_json, out, workers, attribution,
             ig_steps, attribution_target, attribution_normalize, metrics, layers, cka_kernel,
             rbf_bandwidth, gram_dtype, progress):
    """Evaluate an ensemble: member and ensemble accuracy, gain, prediction, attribution and
    representation diversity."""
    chosen = _parse_metrics(metrics)
    _run_eval(_split(members), dataset, data, batch_size, device, as_json, out, progress, workers,
              seed=seed, attribution=attribution if "attribution" in chosen else "none",
              ig_steps=ig_steps, attribution_target=attribution_target,
              attribution_normalize=attribution_normalize,
              representation="representation" in chosen,
              layers=_split(layers) if layers is not None else None, cka_kernel=cka_kernel,
              rbf_bandwidth=rbf_bandwidth, gram_dtype=gram_dtype)


@cli.command()
@click.option("--members", default=None,
              help=f"Comma-separated timm architectures [default: {DEFAULT_DEMO_MEMBERS}].")
@click.option("--arch", default=None, help="One architecture for every member (with --num-members).")
@click.option("--num-members", default=3, show_default=True, type=int)
@click.option("--loss", default="independent", show_default=True,
              help="Training loss: independent, gncl, gncl-masked, balanced, attribution.")
@click.option("--lambda", "lam", default=0.2, show_default=True, type=float,
              help="The loss weight lambda (gncl, gncl-masked, balanced, attribution).")
@click.option("--consensus", default="average", show_default=True,
              type=click.Choice(["average", "median", "geometric", "vote"]),
              help="Ensemble consensus f for gncl, gncl-masked and balanced.")
@click.option("--attribution-normalize", default="l2", show_default=True,
              type=click.Choice(["none", "l1", "l2", "max"]),
              help="attribution loss: scale each Saliency map before the variance (none = paper Eq. 8).")
@click.option("--warmup-epochs", default=0, show_default=True, type=int,
              help="attribution loss: ramp lambda from 0 over this many epochs.")
@click.option("--clip-grad", default=None, type=float, help="Clip the global gradient norm.")
@click.option("--epochs", default=8, show_default=True, type=int)
@click.option("--batch-size", default=64, show_default=True, type=int,
              help="Global batch (split across torchrun processes).")
@click.option("--lr", default=1e-3, show_default=True, type=float)
@click.option("--decay-every", default=30, show_default=True, type=int,
              help="Multiply the learning rate by --decay-factor every this many epochs.")
@click.option("--decay-factor", default=0.9, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", default="runs/train", show_default=True, type=click.Path())
@click.option("--overwrite", is_flag=True, help="Replace a different run in --out.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--keep-checkpoints", default=2, show_default=True, type=int,
              help="Epoch checkpoints to keep (0: all).")
@click.option("--amp/--no-amp", default=True, show_default=True,
              help="bfloat16 autocast on CUDA (ignored on CPU).")
@click.option("--data", type=click.Path(), default=None,
              help="ImageFolder root to train on; default: the embedded digits train split.")
@click.option("--val-data", type=click.Path(), default=None,
              help="ImageFolder root for per-epoch accuracy (default: --data itself).")
@click.option("--image-size", default=224, show_default=True, type=int,
              help="Crop size for --data images.")
@click.option("--workers", default=0, show_default=True, type=int, help="Data-loader processes.")
@click.option("--device", default="auto", show_default=True)
@click.option("--progress/--no-progress", default=True)
@_user_errors
def train(members, arch, num_members, loss, lam, consensus, attribution_normalize, warmup_epochs,
          clip_grad, epochs, batch_size, lr, decay_every, decay_factor, seed, out, overwrite, resume,
          keep_checkpoints, amp, data, val_data, image_size, workers, device, progress):
    """Train an ensemble (default: on the embedded digits) and write member checkpoints.

    Multi-GPU / multi-process: torchrun --nproc_per_node 2 -m divfast.cli train ...
    """
    from divfast.data import build_train_datasets
    from divfast.training import TrainConfig, loss_options, train_ensemble

    if members and arch:
        raise DivfastError("--members and --arch are exclusive: give a list, or one architecture")
    if arch:
        if num_members < 1:
            raise DivfastError(f"--num-members: expected >= 1, got {num_members}")
        archs = [arch] * num_members
    else:
        archs = _split(members or DEFAULT_DEMO_MEMBERS)
    if workers < 0:
        raise DivfastError(f"--workers: expected >= 0, got {workers}")
    if resume and overwrite:
        raise DivfastError("--resume and --overwrite are exclusive")
    options = loss_options(loss, lam=lam, consensus=consensus, normalize=attribution_normalize,
                           warmup_epochs=warmup_epochs)
    train_set, val_set = build_train_datasets(data, val_data, image_size)
    cfg = TrainConfig(architectures=archs, loss=loss, epochs=epochs, batch_size=batch_size, lr=lr,
                      decay_every=decay_every, decay_factor=decay_factor, seed=seed,
                      dataset=os.path.abspath(data) if data else "digits",
                      val_dataset=os.path.abspath(val_data) if val_data else None,
                      image_size=image_size if data else None, loss_options=options,
                      clip_grad=clip_grad, amp=amp)
    paths = train_ensemble(cfg, out, device=_device(device), overwrite=overwrite, progress=progress,
                           train_set=train_set, test_set=val_set,
                           num_classes=len(train_set.classes), num_workers=workers, resume=resume,
                           keep_checkpoints=keep_checkpoints)
    if int(os.environ.get("RANK", "0")) == 0:
        for p in paths:
            click.echo(p)


@cli.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path())
@click.option("--epochs", default=8, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True)
@_user_errors
def demo(out, epochs, device):
    """Train three small, different members on the embedded digits, then evaluate them on the clean
    test split and under the paper's four corruptions (accuracy, prediction and Saliency
    diversity; each dataset's report and attribution grid under --out)."""
    from divfast.data import load_members
    from divfast.report import render_accuracy_by_dataset
    from divfast.training import TrainConfig, train_ensemble

    from divfast.ensembles.sweep import run_sweep

    archs = _split(DEFAULT_DEMO_MEMBERS)
    click.echo(f"divfast demo: training a pool of {2 * len(archs)} members (two each of "
               f"{DEFAULT_DEMO_MEMBERS}) on the embedded digits ({epochs} epochs; the whole demo "
               "takes about 4 minutes on 2 CPU cores)", err=True)
    cfg = TrainConfig(architectures=archs * 2, epochs=epochs)
    paths = train_ensemble(cfg, out, device=_device(device), overwrite=True)
    ensemble = paths[:len(archs)]  # one of each architecture: the ensemble looked at closely
    members = load_members(ensemble, _device(device))
    reports = [_eval_loaded(members, ensemble, "clean", None, 256, device, False, out, True)]
    for spec in DEMO_DATASETS:
        reports.append(_eval_loaded(members, ensemble, spec, None, 256, device, False,
                                    os.path.join(out, spec), True, quiet=True))
    render_accuracy_by_dataset(reports)
    sweep_out = os.path.join(out, "sweep")
    result = run_sweep(paths, ["clean", *DEMO_DATASETS], k=len(archs), rules=("average", "vote"),
                       device=_device(device), cache_dir=os.path.join(sweep_out, "cache"))
    written = _write_sweep(result, sweep_out)
    click.echo(f"every {len(archs)}-member ensemble of the pool of {len(paths)} "
               f"({len(result['rows']) // (2 * (1 + len(DEMO_DATASETS)))} per dataset), "
               "gain over its best member vs disagreement (Pearson r, average consensus):")
    for row in result["correlations"]:
        if row["metric"] == "disagreement" and row.get("rule", "average") == "average":
            r = row["pearson"]
            click.echo(f"  {row['dataset']:16s} r = {'n/a' if r is None else f'{r:+.2f}'}")
    for path in written:
        click.echo(f"wrote {path}")

    # paper Figure 10: the same three architectures trained jointly with the balanced loss (Eq. 3)
    # against the independently trained trio above (members 0-2 of the pool: an independent member
    # does not depend on the others, so they are exactly the trio trained alone)
    click.echo(f"divfast demo: training the same {len(archs)} architectures with the balanced loss "
               "(lambda 0.2) to compare with independent training", err=True)
    balanced_cfg = TrainConfig(architectures=archs, epochs=epochs, loss="balanced",
                               loss_options={"lam": 0.2, "consensus": "average"})
    balanced = train_ensemble(balanced_cfg, os.path.join(out, "balanced"), device=_device(device),
                              overwrite=True)
    from divfast.ensembles.compare import compare_ensembles

    comparison = compare_ensembles({"independent": ensemble, "balanced": balanced},
                                   ["clean", *DEMO_DATASETS], device=_device(device),
                                   cache_dir=os.path.join(sweep_out, "cache"))
    _emit_comparison(comparison, os.path.join(out, "compare"))


@cli.command("compare")
@click.option("--ensemble", "ensembles", multiple=True, required=True,
              help="NAME=MEMBERS: a training run directory or comma-separated checkpoint files "
                   "(repeat for each ensemble).")
@click.option("--datasets", default="clean," + ",".join(DEMO_DATASETS), show_default=True,
              help="Comma-separated dataset specs.")
@click.option("--rules", default="average", show_default=True, help="Consensus rules.")
@click.option("--out", type=click.Path(), default=None,
              help="Directory for comparison.json and comparison_<rule>.png.")
@click.option("--data", type=click.Path(), default=None,
              help="ImageFolder root; default: the embedded digits test split.")
@click.option("--seed", default=0, show_default=True, type=int, help="Corruption seed.")
@click.option("--batch-size", default=128, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True)
@click.option("--cache", "cache_dir", type=click.Path(), default=None,
              help="Logits cache directory (reruns do no forward pass).")
@click.option("--num-samples", default=None, type=int, help="Only the first N images per dataset.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--progress/--no-progress", default=True)
@_user_errors
def compare_cmd(ensembles, datasets, rules, out, data, seed, batch_size, device, cache_dir,
                num_samples, as_json, progress):
    """Compare ensembles (e.g. trained with different losses) on clean and corrupted data
    (paper Figure 10): accuracy, gain over the best member, disagreement."""
    from divfast.ensembles.compare import compare_ensembles

    groups = {}
    for entry in ensembles:
        name, sep, members = entry.partition("=")
        if not sep or not name.strip() or not members.strip():
            raise DivfastError(f"--ensemble: expected NAME=MEMBERS, got {entry!r}")
        if name.strip() in groups:
            raise DivfastError(f"--ensemble: the name {name.strip()!r} is given twice")
        groups[name.strip()] = members.strip()
    result = compare_ensembles(groups, datasets, _split(rules), data=data, seed=seed,
                               batch_size=batch_size, device=_device(device), cache_dir=cache_dir,
                               num_samples=num_samples, progress=progress)
    _emit_comparison(result, out, as_json)


def _emit_comparison(result: dict, out: str | None, as_json: bool = False) -> None:
    """Prints the comparison (table or JSON) and writes comparison.json and one figure per rule."""
    from divfast.io import ensure_dir, json_safe, write_json_atomic
    from divfast.report import comparison_plot, render_comparison

    if as_json:
        click.echo(json.dumps(json_safe(result), indent=2))
    else:
        render_comparison(result)
    if out:
        ensure_dir(out)
        write_json_atomic(os.path.join(out, "comparison.json"), result)
        written = [os.path.join(out, "comparison.json")]
        for rule in result["rules"]:
            written.append(os.path.join(out, f"comparison_{rule}.png"))
            comparison_plot(result["rows"], written[-1], rule=rule)
        for path in written:
            click.echo(f"wrote {path}", err=as_json)


@cli.command("corrupt")
@click.option("--dataset", default=None, help="<corruption><severity>, e.g. plasma4.0 (see --list).")
@click.option("--data", type=click.Path(), default=None,
              help="ImageFolder root to corrupt; default: the embedded digits test split.")
@click.option("--out", type=click.Path(), default=None,
              help="Directory for the corrupted ImageFolder tree (resumable).")
@click.option("--seed", default=0, show_default=True, type=int,
              help="With each image's relative path (or index) it fixes the image's corruption.")
@click.option("--image-size", default=224, show_default=True, type=int,
              help="Crop size for --data images (Resize(size*256/224), CenterCrop(size)).")
@click.option("--quality", default=85, show_default=True, type=int, help="JPEG quality.")
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option("--workers", default=0, show_default=True, type=int, help="Data-loader processes.")
@click.option("--device", default="cpu", show_default=True, help="Where to corrupt: cpu, cuda, auto.")
@click.option("--gallery", type=click.Path(), default=None,
              help="Also draw one image under every corruption into this .png/.svg/.pdf.")
@click.option("--severities", default="2,4,6,8,10", show_default=True,
              help="Gallery columns.")
@click.option("--index", default=0, show_default=True, type=int,
              help="Gallery image: its index in --data (default image: a photo shipped with "
                   "scikit-learn).")
@click.option("--list", "list_only", is_flag=True, help="List the corruptions and exit.")
@click.option("--progress/--no-progress", default=True)
@_user_errors
def corrupt_cmd(dataset, data, out, seed, image_size, quality, batch_size, workers, device, gallery,
                severities, index, list_only, progress):
    """Write a corrupted copy of a dataset (JPEG ImageFolder tree) and/or a gallery of corruptions."""
    import warnings

    from divfast.corruptions import corruption_aliases, list_corruptions

    if list_only:
        aliases = corruption_aliases()
        for name in list_corruptions():
            other = sorted(a for a, n in aliases.items() if n == name and a != name)
            click.echo(name + (f"  (alias: {', '.join(other)})" if other else ""))
        return
    if not gallery and not out:
        raise DivfastError("--out (with --dataset) or --gallery: give at least one")
    if out and not dataset:
        raise DivfastError("--dataset: required with --out (e.g. --dataset plasma4.0)")
    sevs = None
    if gallery:  # check the gallery's options before a long --out run, draw it after
        try:
            sevs = [float(s) for s in _split(severities)]
        except ValueError:
            raise DivfastError(f"--severities: expected numbers such as 2,4,6, got {severities!r}") from None
        from divfast.report.figure import check_figure_path

        check_figure_path(gallery, "--gallery")
    if out:
        from divfast.data.export import write_corrupted_folder

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = write_corrupted_folder(dataset, out, data=data, seed=seed, image_size=image_size,
                                             batch_size=batch_size, workers=workers, quality=quality,
                                             device=_device(device), progress=progress)
        for w in caught:
            click.echo(f"warning: {w.message}", err=True)
        click.echo(f"wrote {summary['written']} images of {summary['dataset']} to {out} "
                   f"({summary['already_present']} already there, {summary['non_image_skipped']} "
                   f"non-image and {summary['unreadable_skipped']} unreadable files skipped)")
    if gallery:
        from divfast.report.gallery import draw_gallery, sample_photo

        if data is None:
            image, key = sample_photo(), "sample-photo"
        else:
            from divfast.data.export import folder_image

            image, key = folder_image(data, index, image_size)
        draw_gallery(image, gallery, sevs, seed=seed, key=key)
        click.echo(f"wrote {gallery}")


SWEEP_ATTRIBUTION = ("none", "saliency")  # divfast.ensembles.sweep.ATTRIBUTION_CHOICES
SWEEP_TOP = 10  # ensembles listed per dataset and rule


def _csv_cell(value) -> str:
    import math

    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""  # undefined or not computed, as null in results.json
    if isinstance(value, (list, tuple)):
        return "+".join(str(v) for v in value)
    return repr(value) if isinstance(value, float) else str(value)


def _sweep_csv(rows: list[dict]) -> str:
    import csv
    import io

    columns = list(rows[0])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_cell(row[c]) for c in columns])
    return buffer.getvalue()


def _write_sweep(result: dict, out: str) -> list[str]:
    """results.csv, results.json and the figures of a run_sweep result under ``out``; returns the
    paths written."""
    from divfast.io import ensure_dir, write_json_atomic, write_text_atomic

    ensure_dir(out)
    written = [os.path.join(out, "results.csv"), os.path.join(out, "results.json")]
    write_text_atomic(written[0], _sweep_csv(result["rows"]))
    write_json_atomic(written[1], result)
    return written + _sweep_figures(result, out)


def _sweep_figures(result: dict, out: str) -> list[str]:
    """bubble_<rule>.png per rule and trends.png (measures never computed are left out)."""
    from divfast.report.sweep_plots import bubble_plot, trend_plot

    rows, written = result["rows"], []
    for rule in result["rules"]:
        written.append(os.path.join(out, f"bubble_{rule}.png"))
        bubble_plot(rows, written[-1], metric="disagreement", rules=[rule])
    metrics = [m for m in ("attribution_diversity", "disagreement", "mean_member_accuracy")
               if any(row[m] is not None for row in rows)]
    written.append(os.path.join(out, "trends.png"))
    trend_plot(rows, written[-1], metrics=metrics, rule=result["rules"][0])
    return written


def _render_sweep(result: dict) -> None:
    """Top ensembles by gain per dataset and rule, the correlations, the difficulty summary."""
    from rich.console import Console
    from rich.table import Table

    def num(x, scale=1.0, fmt="{:.4f}"):
        return "n/a" if x is None or x != x else fmt.format(scale * x)

    console = Console(file=sys.stdout, width=120)
    specs = [d["spec"] for d in result["datasets"]]
    for spec in specs:
        for rule in result["rules"]:
            rows = [r for r in result["rows"] if r["dataset"] == spec and r["rule"] == rule]
            best = sorted(rows, key=lambda r: -r["gain"])[:SWEEP_TOP]
            table = Table(title=f"top {len(best)} of {len(rows)} ensembles by gain — {spec}, "
                                f"{rule} consensus", title_justify="left")
            for name, justify in (("members", "left"), ("acc %", "right"), ("gain pp", "right"),
                                  ("best member %", "right"), ("disagreement", "right"),
                                  ("params", "right")):
                table.add_column(name, justify=justify)
            if result["attribution"] != "none":
                table.add_column("attribution", justify="right")
            for r in best:
                cells = ["+".join(r["members"]), num(r["accuracy"], 100, "{:.2f}"),
                         num(r["gain"], 100, "{:+.2f}"), num(r["best_member_accuracy"], 100,
                                                             "{:.2f}"),
                         num(r["disagreement"]), num(r["parameters"], 1e-6, "{:.2f}M")]
                if result["attribution"] != "none":
                    cells.append(num(r["attribution_diversity"]))
                table.add_row(*cells)
            console.print(table)
    for rule in result["rules"]:
        table = Table(title=f"correlation of gain with each measure ({rule} consensus): "
                            "Pearson r / Spearman rho", title_justify="left")
        table.add_column("measure")
        for spec in specs:
            table.add_column(spec, justify="right")
        entries = [c for c in result["correlations"] if c["rule"] == rule]
        for metric in dict.fromkeys(c["metric"] for c in entries):
            cells = [next(c for c in entries if c["metric"] == metric and c["dataset"] == spec)
                     for spec in specs]
            table.add_row(metric, *[f"{num(c['pearson'], fmt='{:+.2f}')} / "
                                    f"{num(c['spearman'], fmt='{:+.2f}')}" for c in cells])
        console.print(table)
    for spec in specs:
        block = result["difficulty"][spec]
        table = Table(title=f"difficulty functions — {spec} ({block['n_samples']} inputs)",
                      title_justify="left")
        table.add_column("group or pair")
        table.add_column("members", justify="right")
        table.add_column("mean θ", justify="right")
        table.add_column("var θ / cov", justify="right")
        for name, g in block["groups"].items():
            table.add_row(name, str(len(g["members"])), num(g["mean_difficulty"]),
                          num(g["var_difficulty"]))
        for pair in block["pairs"]:
            table.add_row(f"{pair['a']} × {pair['b']}", str(pair["member_pairs"]), "",
                          num(pair["covariance"], fmt="{:+.4f}"))
        console.print(table)


@cli.command("sweep")
@click.option("--pool", required=True,
              help="A directory (every *.safetensors in it, sorted) or comma-separated checkpoint "
                   "files.")
@click.option("--k", "k", default=3, show_default=True, type=int, help="Members per ensemble.")
@click.option("--datasets", default="clean", show_default=True,
              help="Comma-separated dataset specs: clean, lines1.6, plasma4.0, ...")
@click.option("--rules", default="average,vote", show_default=True,
              help="Comma-separated consensus rules: average, vote, median, geometric.")
@click.option("--out", required=True, type=click.Path(),
              help="Directory for results.csv, results.json, bubble_<rule>.png and trends.png.")
@click.option("--data", type=click.Path(), default=None,
              help="ImageFolder root; default: the embedded digits test split.")
@click.option("--seed", default=0, show_default=True, type=int, help="Corruption seed.")
@click.option("--batch-size", default=128, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--cache", "cache_dir", type=click.Path(), default=None,
              help="Logits cache directory (a rerun does no forward pass) [default: OUT/cache].")
@click.option("--group", "group", default=None,
              help="Comma-separated methodology names, one per member, for the difficulty "
                   "analysis [default: each member's architecture].")
@click.option("--attribution", default="none", show_default=True,
              type=click.Choice(SWEEP_ATTRIBUTION),
              help="Attribution diversity of every ensemble from Saliency maps (one backward "
                   "pass per member and dataset; the pool's Gram is cached), or none.")
@click.option("--num-samples", default=None, type=int,
              help="Only the first N images of each dataset [default: all].")
@click.option("--json", "as_json", is_flag=True, help="Print results.json instead of tables.")
@click.option("--progress/--no-progress", default=True, help="Progress bars on stderr.")
@_user_errors
def sweep_cmd(pool, k, datasets, rules, out, data, seed, batch_size, device, cache_dir, group,
              attribution, num_samples, as_json, progress):
    """Evaluate every k-member ensemble of a pool from one pass per member: accuracy, gain over
    the best member, prediction (and attribution) diversity, difficulty functions."""
    from divfast.ensembles.sweep import run_sweep
    from divfast.io import ensure_dir, json_safe

    dev = _device(device)
    ensure_dir(out)
    result = run_sweep(pool, _split(datasets), k=k, rules=_split(rules), data=data, seed=seed,
                       batch_size=batch_size, device=dev,
                       cache_dir=cache_dir if cache_dir is not None else os.path.join(out, "cache"),
                       groups=_split(group) if group is not None else None,
                       attribution=attribution, num_samples=num_samples, progress=progress)
    written = _write_sweep(result, out)
    if as_json:
        click.echo(json.dumps(json_safe(result), indent=2, allow_nan=False))
        return
    _render_sweep(result)
    for path in written:
        click.echo(f"wrote {path}")


def main():
    cli(prog_name="divfast")


if __name__ == "__main__":
    main()
