"""The ensemble sweep: every k-member subset of a pool, evaluated from one pass per member.

A study of a pool of K members (the paper: 14 models, all 364 three-member ensembles) needs each
member's logits on each dataset once. Everything about a subset then follows from the pool's
outputs without another pass:

* accuracy and top-5 of its consensus (each rule of :data:`divfast.ensembles.CONSENSUS_RULES`)
  and its histogram of correct members, from :func:`divfast._ops.ensemble_sweep.ensemble_sweep`;
* its pairwise prediction measures (disagreement, Q, correlation, double fault, label
  disagreement, KL, cosine): the mean over the subset's ordered pairs i != j of the pool's K x K
  matrices (:func:`divfast.functional.prediction.prediction_measures`), NaN pairs left out and NaN
  when no pair is defined, which is what :func:`divfast.functional.prediction_diversity` gives on
  the subset's own logits (a pair's value depends on that pair alone);
* its non-pairwise measures (entropy, Kohavi-Wolpert, kappa, difficulty, generalized diversity,
  coincident failure) from its histogram
  (:func:`divfast.functional.prediction.non_pairwise_measures`);
* its attribution diversity (paper Eq. 7, population variance) from the pool's Gram of attribution
  maps (:func:`divfast.functional.attribution.subset_diversity`), when one is given.

The gain of an ensemble is the paper's Y = A_ens - A_top: its top-1 accuracy minus that of its
best member. :func:`sweep` is the pure function over logits; :func:`run_sweep` computes the logits
of checkpoint files on datasets (through the logits cache, so a rerun costs no pass), sweeps each
dataset and adds the difficulty analysis (:func:`divfast.ensembles.difficulty_analysis`) and the
correlations between gain and each measure (:func:`divfast.report.sweep_plots.correlation_table`).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence

import torch

from divfast.ensembles.consensus import CONSENSUS_RULES
from divfast.errors import DivfastError
from divfast.functional.prediction import NON_PAIRWISE, PAIRWISE

SCHEMA = "divfast.sweep/1"
ATTRIBUTION_CHOICES = ("none", "saliency")
ROW_KEYS = (("rule", "members", "indices", "k", "accuracy", "top5", "best_member_accuracy", "gain",
             "mean_member_accuracy", "parameters") + PAIRWISE + NON_PAIRWISE
            + ("attribution_diversity",))
# What run_sweep correlates with the gain (attribution_diversity only when computed).
CORRELATION_METRICS = PAIRWISE + NON_PAIRWISE + ("mean_member_accuracy", "best_member_accuracy")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_pool(logits, target) -> tuple[int, int, int]:
    from divfast.ensembles.consensus import _check_logits, check_target

    _check_logits(logits)
    k, n, c = logits.shape
    if n < 1:
        raise DivfastError(f"logits: expected at least one sample (N >= 1), got shape "
                           f"{list(logits.shape)}")
    check_target(target, n, c)
    return k, n, c


def _check_rules(rules) -> list[str]:
    if isinstance(rules, str) or not isinstance(rules, Sequence) or not rules:
        raise DivfastError(f"rules (--rules): expected a non-empty list of "
                           f"{', '.join(CONSENSUS_RULES)}, got {rules!r}")
    for rule in rules:
        if rule not in CONSENSUS_RULES:
            raise DivfastError(f"rules (--rules): unknown rule {rule!r}; expected "
                               f"{', '.join(CONSENSUS_RULES)}")
    if len(set(rules)) != len(rules):
        raise DivfastError(f"rules (--rules): a rule is listed twice in {list(rules)}")
    return list(rules)


def _check_k(k, num_members: int) -> int:
    if not _is_int(k) or not 1 <= k <= num_members:
        raise DivfastError(f"k (--k): expected an int in [1, {num_members}] (the pool has "
                           f"{num_members} members), got {k!r}")
    return k


def _check_per_member(values, num_members: int, name: str) -> list:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise DivfastError(f"{name}: expected a list of {num_members} values (one per member), "
                           f"got {type(values).__name__}")
    if len(values) != num_members:
        raise DivfastError(f"{name}: expected {num_members} values (one per member), got "
                           f"{len(values)}")
    return list(values)


def _check_subsets(subsets, num_members: int, k: int) -> torch.Tensor:
    """``(S, k)`` int64 on the CPU: each row k distinct indices in [0, K)."""
    try:
        sub = torch.as_tensor(subsets)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DivfastError(f"subsets: expected an (S, {k}) array of member indices "
                           f"({exc})") from exc
    if sub.dim() != 2 or sub.shape[0] < 1 or sub.shape[1] != k:
        raise DivfastError(f"subsets: expected shape (S, {k}) with S >= 1 (k = {k}), got "
                           f"{list(sub.shape)}")
    if sub.dtype.is_floating_point or sub.dtype.is_complex or sub.dtype == torch.bool:
        raise DivfastError(f"subsets: expected integer member indices, got {sub.dtype}")
    sub = sub.to("cpu", torch.int64)
    if bool(((sub < 0) | (sub >= num_members)).any()):
        raise DivfastError(f"subsets: expected member indices in [0, {num_members})")
    ordered = sub.sort(dim=1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        row = int((ordered[:, 1:] == ordered[:, :-1]).any(dim=1).nonzero()[0])
        raise DivfastError(f"subsets: row {row} repeats a member: {sub[row].tolist()}")
    return sub.contiguous()


def all_subsets(num_members: int, k: int) -> torch.Tensor:
    """Every k-subset of ``range(num_members)`` in lexicographic order, ``(C(K, k), k)`` int64.

    Example:
        >>> all_subsets(4, 3)
        tensor([[0, 1, 2],
                [0, 1, 3],
                [0, 2, 3],
                [1, 2, 3]])
    """
    rows = list(itertools.combinations(range(num_members), k))
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), k)


def _subset_pair_means(matrix: torch.Tensor, subsets: torch.Tensor) -> torch.Tensor:
    """``(S,)`` float64: per subset, the mean of ``matrix`` (K, K) over its ordered pairs i != j,
    NaN entries left out, NaN when none is left (as prediction_measures averages)."""
    k = subsets.shape[1]
    vals = matrix[subsets[:, :, None], subsets[:, None, :]]  # (S, k, k)
    valid = ~torch.isnan(vals) & ~torch.eye(k, dtype=torch.bool)
    total = torch.where(valid, vals, torch.zeros_like(vals)).sum(dim=(1, 2))  # (S,)
    count = valid.sum(dim=(1, 2))  # (S,)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))


def sweep(logits: torch.Tensor, target: torch.Tensor, k: int = 3,
          rules: Sequence[str] = ("average", "vote"), names: Sequence[str] | None = None,
          parameters: Sequence[int | None] | None = None, pool_gram: torch.Tensor | None = None,
          gram_samples: int | None = None, subsets=None) -> list[dict]:
    """Accuracy, gain and every prediction-diversity measure of every k-member subset of a pool.

    Args:
        logits: ``(K, N, C)`` the pool's logits (float16, bfloat16, float32 or float64, finite).
        target: ``(N,)`` integer labels in ``[0, C)``.
        k: members per ensemble, in ``[1, K]``.
        rules: consensus rules (:data:`divfast.ensembles.CONSENSUS_RULES`), one row per subset
            each.
        names: K member names (default ``"m0", "m1", ...``).
        parameters: K parameter counts (an entry may be None: unknown); a row's ``parameters``
            is its members' sum, None when any is unknown or ``parameters`` is None.
        pool_gram: ``(K, K)`` Gram of the pool's attribution maps
            (:class:`divfast.metrics.AttributionDiversity`, ``ddof=0``) over ``gram_samples``
            samples; None: ``attribution_diversity`` is None.
        gram_samples: the samples ``pool_gram`` sums over (required with it).
        subsets: ``(S, k)`` member indices, each row distinct members; default: every k-subset
            in lexicographic order (:func:`all_subsets`).

    Returns:
        One dict per (rule, subset), rule-major and subsets in order, with the keys
        :data:`ROW_KEYS`: ``rule``, ``members`` (names), ``indices``, ``k``, ``accuracy`` and
        ``top5`` of the consensus, ``best_member_accuracy``, ``gain`` (accuracy minus the best
        member's), ``mean_member_accuracy``, ``parameters``, the pairwise measures
        (``disagreement, q_statistic, correlation, double_fault, label_disagreement, kl,
        cosine``), the non-pairwise ones (``entropy, kohavi_wolpert, kappa, difficulty,
        generalized_diversity, coincident_failure``) and ``attribution_diversity``. Undefined
        measures are NaN (e.g. every pairwise measure for k = 1).

    Raises:
        DivfastError: naming the argument: bad logits or target, k outside ``[1, K]``, an unknown
            or repeated rule, ``names`` or ``parameters`` not of length K, a ``pool_gram`` not
            ``(K, K)`` or without ``gram_samples``, malformed ``subsets``.

    Example:
        >>> logits, target = torch.randn(4, 50, 10), torch.randint(0, 10, (50,))
        >>> rows = sweep(logits, target, k=3, rules=["average"])
        >>> len(rows), rows[0]["indices"], rows[0]["members"]
        (4, [0, 1, 2], ['m0', 'm1', 'm2'])
        >>> row = rows[0]
        >>> abs(row["gain"] - (row["accuracy"] - row["best_member_accuracy"])) < 1e-12
        True
    """
    from divfast._ops.ensemble_sweep import ensemble_sweep
    from divfast.functional.attribution import subset_diversity
    from divfast.functional.prediction import (
        non_pairwise_measures,
        prediction_measures,
        prediction_stats,
    )

    num_members, n, c = _check_pool(logits, target)
    k = _check_k(k, num_members)
    rules = _check_rules(rules)
    names = ([f"m{i}" for i in range(num_members)] if names is None
             else [str(x) for x in _check_per_member(names, num_members, "names")])
    if parameters is not None:
        parameters = _check_per_member(parameters, num_members, "parameters")
        for i, p in enumerate(parameters):
            if p is not None and (not _is_int(p) or p < 0):
                raise DivfastError(f"parameters: parameters[{i}] is {p!r}, expected an int >= 0 "
                                   "or None")
    if pool_gram is not None:
        if not isinstance(pool_gram, torch.Tensor) or pool_gram.shape != (num_members,
                                                                          num_members):
            shape = (list(pool_gram.shape) if isinstance(pool_gram, torch.Tensor)
                     else type(pool_gram).__name__)
            raise DivfastError(f"pool_gram: expected a ({num_members}, {num_members}) tensor, "
                               f"got {shape}")
        if not _is_int(gram_samples) or gram_samples < 0:
            raise DivfastError(f"gram_samples: expected an int >= 0 with pool_gram, got "
                               f"{gram_samples!r}")
        pool_gram = pool_gram.detach().to("cpu", torch.float64)
    subsets = (all_subsets(num_members, k) if subsets is None
               else _check_subsets(subsets, num_members, k))  # (S, k)

    target = target.to(device=logits.device, dtype=torch.long)
    measures = prediction_measures(prediction_stats(logits, target), c)
    member_accuracy = torch.tensor(measures["member_accuracy"], dtype=torch.float64)  # (K,)
    pair_means = {name: _subset_pair_means(measures["pairwise"][name].to(torch.float64), subsets)
                  for name in PAIRWISE}  # each (S,)
    counts = {rule: ensemble_sweep(logits, target, subsets.to(logits.device), rule)
              for rule in rules}  # top1 (S,), top5 (S,), histogram (S, k + 1)
    histogram = counts[rules[0]][2].cpu()  # the same for every rule: members, not consensus

    per_subset = []
    for s, idx in enumerate(subsets.tolist()):
        accs = [float(member_accuracy[i]) for i in idx]
        params = (None if parameters is None or any(parameters[i] is None for i in idx)
                  else sum(parameters[i] for i in idx))
        common = {"members": [names[i] for i in idx], "indices": idx, "k": k,
                  "best_member_accuracy": max(accs), "mean_member_accuracy": sum(accs) / k,
                  "parameters": params}
        common.update({name: float(pair_means[name][s]) for name in PAIRWISE})
        common.update(non_pairwise_measures(histogram[s], k, n))
        common["attribution_diversity"] = (None if pool_gram is None
                                           else subset_diversity(pool_gram, gram_samples, idx))
        per_subset.append(common)

    rows = []
    for rule in rules:
        top1, top5 = counts[rule][0].tolist(), counts[rule][1].tolist()
        for s, common in enumerate(per_subset):
            accuracy = top1[s] / n
            row = {"rule": rule, **common, "accuracy": accuracy, "top5": top5[s] / n,
                   "gain": accuracy - common["best_member_accuracy"]}
            rows.append({key: row[key] for key in ROW_KEYS})
    return rows


# --- from checkpoint files -------------------------------------------------------------------


def resolve_pool(pool: str | Sequence[str]) -> list[str]:
    """The checkpoint files of ``--pool``: a directory (its ``*.safetensors``, sorted by name), a
    comma-separated list of files, or a list of files.

    Raises:
        DivfastError: naming ``--pool``: nothing given, a missing path, a directory without
            checkpoints, a listed path that is not a file, a file listed twice.
    """
    if isinstance(pool, (str, os.PathLike)):
        text = os.fspath(pool)
        if os.path.isdir(text):
            paths = sorted(os.path.join(text, f) for f in os.listdir(text)
                           if f.endswith(".safetensors")
                           and os.path.isfile(os.path.join(text, f)))
            if not paths:
                raise DivfastError(f"member_paths (--pool): directory {text!r} holds no "
                                   "*.safetensors checkpoint")
            return paths
        paths = [s.strip() for s in text.split(",") if s.strip()]
    elif isinstance(pool, Sequence):
        paths = [os.fspath(p) for p in pool]
    else:
        raise DivfastError(f"member_paths (--pool): expected a directory or a list of checkpoint "
                           f"files, got {type(pool).__name__}")
    if not paths:
        raise DivfastError("member_paths (--pool): expected a directory or a comma-separated list "
                           "of checkpoint files, got nothing")
    seen = set()
    for path in paths:
        if not os.path.exists(path):
            raise DivfastError(f"member_paths (--pool): {path!r} does not exist")
        if not os.path.isfile(path):
            raise DivfastError(f"member_paths (--pool): {path!r} is not a checkpoint file")
        real = os.path.realpath(path)
        if real in seen:
            raise DivfastError(f"member_paths (--pool): {path!r} is listed twice")
        seen.add(real)
    return paths


def member_parameters(path: str) -> int:
    """The parameter count of a checkpoint's model (as :meth:`divfast.data.Member.num_parameters`),
    from its metadata alone: the model is built on the ``meta`` device (no memory, no weights).
    Buffers such as BatchNorm statistics are not parameters, so the sizes of the file's tensors
    would overcount."""
    from divfast.data.members import create_member, read_member_info

    info = read_member_info(path)
    args = (info.architecture, info.num_classes, info.input_size, info.mean, info.std,
            info.model_kwargs)
    try:
        with torch.device("meta"):
            return create_member(*args).num_parameters()
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        # an architecture whose constructor reads tensor values (``.item()``) cannot be built on
        # meta: build it on the CPU, randomly initialised (still no weights read)
        return create_member(*args).num_parameters()


def _pool_infos(paths: list[str]) -> list:
    from divfast.data.members import read_member_info

    infos = []
    for path in paths:
        try:
            infos.append(read_member_info(path))
        except DivfastError as exc:
            raise DivfastError(str(exc).replace("--members", "member_paths (--pool)", 1)) from exc
    first = infos[0].num_classes
    for path, info in zip(paths, infos):
        if info.num_classes != first:
            raise DivfastError(f"member_paths (--pool): {path!r} predicts {info.num_classes} "
                               f"classes but {paths[0]!r} predicts {first}; every member must "
                               "share the class count")
    return infos


def _check_datasets(datasets) -> list[str]:
    from divfast.corruptions import format_dataset_spec, parse_dataset_spec

    if isinstance(datasets, str):
        datasets = [s.strip() for s in datasets.split(",") if s.strip()]
    if not isinstance(datasets, Sequence) or not datasets:
        raise DivfastError(f"datasets (--datasets): expected a non-empty list of dataset specs "
                           f"such as clean,lines1.6, got {datasets!r}")
    specs = []
    for spec in datasets:
        try:
            specs.append(format_dataset_spec(*parse_dataset_spec(spec)))
        except DivfastError as exc:
            raise DivfastError("datasets (--datasets): "
                               + str(exc).removeprefix("--dataset: ")) from exc
    if len(set(specs)) != len(specs):
        raise DivfastError(f"datasets (--datasets): a dataset is listed twice in {specs}")
    return specs


SALIENCY_GRAM = {"method": "saliency", "target": "label", "abs": True, "normalize": "none",
                 "ddof": 0}  # how the sweep's attribution maps are made (the Gram cache key)


def _pool_gram(paths, dataset, batch_size, device, progress, loaded: dict, cache=None,
               desc: dict | None = None) -> tuple[torch.Tensor, int]:
    """The pool's Saliency Gram (label targets, absolute maps, ddof 0) over ``dataset``: one
    backward pass per member and batch, or none when ``cache`` holds it for this pool and ``desc``.
    Members come from (and go into) ``loaded``, by path."""
    import sys

    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from divfast.attribution import member_attributions
    from divfast.data.members import load_member
    from divfast.metrics import AttributionDiversity

    if cache is not None:
        shas = [cache.member_hash(p) for p in paths]
        hit = cache.get_gram(paths, desc, SALIENCY_GRAM)
        if hit is not None:
            return hit
    for path in paths:
        if path not in loaded:
            loaded[path] = load_member(path, device).eval()
    members = [loaded[path] for path in paths]
    metric = AttributionDiversity(num_members=len(members))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for x, y in tqdm(loader, desc="saliency", file=sys.stderr, disable=not progress, leave=False):
        x = x.to(device)
        maps = member_attributions(members, x, "label", labels=torch.as_tensor(y).to(device))
        metric.update(maps)  # (K, B, 3, H, W)
    gram, n = metric.state["gram"].cpu(), int(metric.state["n_samples"])
    if cache is not None:
        for path, sha in zip(paths, shas):
            if cache.member_hash(path) != sha:
                raise DivfastError(f"member_paths (--pool): {path!r} changed while its Saliency "
                                   "maps were computed; nothing was cached, run again")
        cache.put_gram(paths, desc, SALIENCY_GRAM, gram, n)
    return gram, n


def run_sweep(member_paths: str | Sequence[str], datasets: str | Sequence[str], k: int = 3,
              rules: Sequence[str] = ("average", "vote"), data: str | None = None, seed: int = 0,
              batch_size: int = 128, device: str | torch.device = "cpu",
              cache_dir: str | None = None, groups: Sequence[str] | None = None,
              attribution: str = "none", num_samples: int | None = None,
              progress: bool = False) -> dict:
    """Sweeps every k-member subset of a pool of checkpoints on every dataset.

    For each dataset, the members' logits come from :func:`divfast.ensembles.cache.pool_logits`:
    one data pass feeds every member the :class:`divfast.ensembles.LogitsCache` at ``cache_dir``
    lacks (so a corruption is computed once per dataset, and a rerun does no forward pass); :func:`sweep` then gives the rows, tagged with ``"dataset"``, and
    :func:`divfast.ensembles.difficulty_analysis` the difficulty functions of the groups. With
    ``attribution="saliency"`` each member also runs one Saliency backward pass per batch (label
    targets, absolute maps), unless the cache holds this pool's Saliency Gram on the dataset, and
    the rows get ``attribution_diversity``.

    Args:
        member_paths: checkpoint files, or what :func:`resolve_pool` accepts (a directory, a
            comma-separated list).
        datasets: dataset specs (``"clean"``, ``"lines1.6"``, ...), or a comma-separated string.
        k: members per ensemble, in ``[1, K]``.
        rules: consensus rules.
        data: an ImageFolder root; None: the embedded digits test split.
        seed: the corruption seed.
        batch_size: images per batch.
        device: where the members run.
        cache_dir: the logits cache directory; None: no cache (every call does the passes).
        groups: K methodology names for the difficulty analysis; None: each member's
            architecture.
        attribution: ``"none"`` or ``"saliency"``.
        num_samples: use only the first ``num_samples`` images of each dataset; None: all.
        progress: progress bars on stderr.

    Returns:
        ``{"schema": "divfast.sweep/1", "k", "rules", "data", "seed", "attribution",
        "members": [{"name", "path", "architecture", "num_classes", "parameters", "group",
        "accuracy": {dataset: top-1}}], "datasets": [{"spec", "num_samples"}], "rows": [...],
        "difficulty": {dataset: difficulty_analysis(...)}, "correlations": [...]}``; ``rows`` are
        :func:`sweep`'s with ``"dataset"`` first, dataset-major; ``correlations`` is
        :func:`divfast.report.sweep_plots.correlation_table` of the gain against
        :data:`CORRELATION_METRICS` (and ``attribution_diversity`` when computed) for each rule,
        each entry with its ``"rule"``.

    Raises:
        DivfastError: naming the argument (and the CLI option): a bad pool (missing files,
            members disagreeing in class count), dataset spec, k, rule, ``groups``,
            ``attribution`` or ``num_samples``, and whatever :func:`pool_logits` raises.
    """
    from torch.utils.data import Subset

    from divfast.data import build_dataset
    from divfast.ensembles.cache import LogitsCache, dataset_description, pool_logits
    from divfast.ensembles.difficulty import difficulty_analysis
    from divfast.report.sweep_plots import correlation_table

    paths = resolve_pool(member_paths)
    specs = _check_datasets(datasets)
    k = _check_k(k, len(paths))
    rules = _check_rules(rules)
    if attribution not in ATTRIBUTION_CHOICES:
        raise DivfastError(f"attribution (--attribution): expected one of "
                           f"{', '.join(ATTRIBUTION_CHOICES)}, got {attribution!r}")
    if num_samples is not None and (not _is_int(num_samples) or num_samples < 1):
        raise DivfastError(f"num_samples (--num-samples): expected an int >= 1, got "
                           f"{num_samples!r}")
    infos = _pool_infos(paths)
    if groups is None:
        groups = [info.architecture for info in infos]
    else:
        groups = _check_per_member(groups, len(paths), "groups (--group)")
        for i, g in enumerate(groups):
            if not isinstance(g, str) or not g:
                raise DivfastError(f"groups (--group): groups[{i}] is {g!r}, expected a "
                                   "non-empty name")
    cache = None
    if cache_dir is not None:
        try:
            cache = LogitsCache(cache_dir)
        except DivfastError as exc:
            raise DivfastError(f"cache_dir (--cache): {exc}") from exc
    device = torch.device(device)
    names = [info.name for info in infos]
    parameters = [member_parameters(p) for p in paths]
    image_size = infos[0].input_size[-1]

    members = [{"name": name, "path": os.path.abspath(path), "architecture": info.architecture,
                "num_classes": info.num_classes, "parameters": params, "group": group,
                "accuracy": {}}
               for name, path, info, params, group in zip(names, paths, infos, parameters, groups)]
    rows, difficulty, described = [], {}, []
    loaded: dict = {}  # members loaded on a cache miss, kept for the next datasets
    for spec in specs:
        dataset = build_dataset(spec, data=data, image_size=image_size, seed=seed)
        if num_samples is not None and num_samples < len(dataset):
            dataset = Subset(dataset, range(num_samples))
        desc = dataset_description(spec, len(dataset), data, "test", image_size, seed)
        logits, target = pool_logits(paths, dataset, desc, cache=cache, batch_size=batch_size,
                                     device=device, progress=progress,
                                     loaded=loaded)  # (K, N, C), (N,)
        pool_gram = gram_samples = None
        if attribution == "saliency":
            pool_gram, gram_samples = _pool_gram(paths, dataset, batch_size, device, progress,
                                                  loaded, cache, desc)
        for row in sweep(logits.to(device), target.to(device), k, rules, names, parameters,
                         pool_gram, gram_samples):
            rows.append({"dataset": spec, **row})
        correct = logits.argmax(dim=-1) == target  # (K, N)
        for member, acc in zip(members, correct.double().mean(dim=1).tolist()):
            member["accuracy"][spec] = acc
        difficulty[spec] = difficulty_analysis(correct, groups)
        described.append({"spec": spec, "num_samples": len(dataset)})

    metrics = list(CORRELATION_METRICS) + (["attribution_diversity"]
                                           if attribution != "none" else [])
    correlations = [{"rule": rule, **entry} for rule in rules
                    for entry in correlation_table(rows, metrics, y="gain", rule=rule,
                                                   datasets=specs)]
    return {"schema": SCHEMA, "k": k, "rules": rules, "data": data, "seed": seed,
            "attribution": attribution, "members": members, "datasets": described, "rows": rows,
            "difficulty": difficulty, "correlations": correlations}
