"""Compare whole ensembles (e.g. trained with different losses) on clean and corrupted data: the
numbers behind the paper's Figure 10.

Each dataset is built once and every member of every ensemble is fed from ONE pass over it
(:func:`divfast.ensembles.cache.pool_logits`, optionally through the logits cache); the ensembles'
consensus, accuracy, gain over their best member and disagreement follow from the logits.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch

from divfast.errors import DivfastError


def _check_ensembles(ensembles) -> dict[str, list[str]]:
    from divfast.ensembles.sweep import resolve_pool

    if not isinstance(ensembles, Mapping) or not ensembles:
        raise DivfastError("ensembles (--ensemble): expected at least one NAME=MEMBERS entry "
                           "(a training run directory or comma-separated checkpoint files)")
    out = {}
    for name, members in ensembles.items():
        if not isinstance(name, str) or not name:
            raise DivfastError(f"ensembles (--ensemble): {name!r} is not a name")
        try:
            out[name] = resolve_pool(members)
        except DivfastError as exc:
            raise DivfastError(f"ensembles (--ensemble {name}=...): "
                               f"{str(exc).split(': ', 1)[-1]}") from None
    return out


def compare_ensembles(ensembles: Mapping[str, str | Sequence[str]],
                      datasets: str | Sequence[str] = ("clean",),
                      rules: Sequence[str] = ("average",), data: str | None = None, seed: int = 0,
                      batch_size: int = 128, device: str | torch.device = "cpu",
                      cache_dir: str | None = None, num_samples: int | None = None,
                      progress: bool = False) -> dict:
    """Accuracy of each named ensemble on each dataset under each consensus rule.

    Args:
        ensembles: ``{name: members}``; members as :func:`divfast.ensembles.sweep.resolve_pool`
            takes them (a run directory, a comma-separated string or a list of checkpoint files).
        datasets: dataset specs (``"clean"``, ``"lines1.6"``, ...) or a comma-separated string.
        rules: consensus rules (:data:`divfast.ensembles.consensus.CONSENSUS_RULES`).
        data: an ImageFolder root; None: the embedded digits test split.
        seed: the corruption seed.
        batch_size, device: for the forward passes.
        cache_dir: a :class:`divfast.ensembles.LogitsCache` directory (None: no cache).
        num_samples: only the first ``num_samples`` images of each dataset.
        progress: progress bars on stderr.

    Returns:
        ``{"schema": "divfast.compare/1", "ensembles": {name: [paths]}, "rules", "datasets",
        "rows": [{"ensemble", "dataset", "rule", "accuracy", "member_accuracy": [...],
        "best_member_accuracy", "gain", "disagreement"}]}``, ensemble-major.

    Raises:
        DivfastError: naming the argument and CLI option: no ensembles, a bad member list,
            dataset spec or rule, ensembles whose members disagree in class count.
    """
    from torch.utils.data import Subset

    from divfast.data import build_dataset
    from divfast.data.members import read_member_info
    from divfast.ensembles.cache import LogitsCache, dataset_description, pool_logits
    from divfast.ensembles.consensus import consensus_predictions
    from divfast.ensembles.sweep import _check_datasets, _check_rules, _is_int
    from divfast.functional.prediction import prediction_diversity

    groups = _check_ensembles(ensembles)
    specs = _check_datasets(datasets)
    rules = _check_rules(rules)
    if num_samples is not None and (not _is_int(num_samples) or num_samples < 1):
        raise DivfastError(f"num_samples (--num-samples): expected an int >= 1, got {num_samples!r}")
    index: dict[str, int] = {}  # real path -> position in `paths`, each member file once
    paths: list[str] = []
    for members in groups.values():
        for p in members:
            if index.setdefault(os.path.realpath(p), len(paths)) == len(paths):
                paths.append(p)
    infos = [read_member_info(p) for p in paths]
    classes = {info.num_classes for info in infos}
    if len(classes) > 1:
        counts = ", ".join(f"{os.path.basename(p)}: {info.num_classes}"
                           for p, info in zip(paths, infos))
        raise DivfastError(f"ensembles (--ensemble): the members predict different numbers of "
                           f"classes ({counts}); compare ensembles of one task")
    image_size = infos[0].input_size[-1]
    cache = LogitsCache(cache_dir) if cache_dir is not None else None
    loaded: dict = {}
    rows = []
    per_dataset = {}
    for spec in specs:
        dataset = build_dataset(spec, data=data, image_size=image_size, seed=seed)
        if num_samples is not None and num_samples < len(dataset):
            dataset = Subset(dataset, range(num_samples))
        desc = dataset_description(spec, len(dataset), data, "test", image_size, seed)
        per_dataset[spec] = pool_logits(paths, dataset, desc, cache=cache, batch_size=batch_size,
                                        device=device, progress=progress, loaded=loaded)
    for name, members in groups.items():
        idx = torch.tensor([index[os.path.realpath(p)] for p in members])
        for spec in specs:
            logits, target = per_dataset[spec]
            sub = logits[idx]  # (M, N, C)
            member_acc = (sub.argmax(dim=-1) == target).double().mean(dim=1).tolist()
            disagreement = (prediction_diversity(sub, target)["disagreement"]
                            if len(members) > 1 else 0.0)
            for rule in rules:
                acc = float((consensus_predictions(sub, rule) == target).double().mean())
                rows.append({"ensemble": name, "dataset": spec, "rule": rule, "accuracy": acc,
                             "member_accuracy": member_acc,
                             "best_member_accuracy": max(member_acc),
                             "gain": acc - max(member_acc), "disagreement": disagreement})
    return {"schema": "divfast.compare/1",
            "ensembles": {k: [os.path.abspath(p) for p in v] for k, v in groups.items()},
            "rules": rules, "data": data, "seed": seed,
            "datasets": [{"spec": s, "num_samples": int(per_dataset[s][1].numel())} for s in specs],
            "rows": rows}
