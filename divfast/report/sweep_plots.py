"""The ensemble sweep's figures (paper Figures 5-7) and the correlations behind them.

The input is the sweep's rows, one per (dataset, rule, member subset), each a dict with at least
``"dataset"``, ``"rule"`` and numbers such as ``"gain"`` (ensemble accuracy minus its best
member's, a fraction), ``"accuracy"``, ``"parameters"`` and the diversity measures
(``"disagreement"``, ``"attribution_diversity"``, ...). A measure may be None (not computed); such
rows are left out of that measure's panels and correlations, and the panel says how many.

Rules shared by the figures and :func:`correlation_table`:

- x is the measure divided by its largest absolute value over every row of that dataset (all
  rules), so the same ensemble sits at the same x in every rule's panel: [0, 1] for non-negative
  measures (disagreement, double fault, attribution diversity), [-1, 1] for signed ones (Q
  statistic, kappa). A dataset whose values are all 0 cannot be normalised: its panel draws
  nothing and says so. NaN or infinite values count as missing, like None.
- Accuracies and gains (:data:`PERCENT_KEYS`) are drawn in percent (gains in percentage points).
- Pearson r and Spearman rho (ties get their average rank) are those of scipy.stats; with fewer
  than 2 ensembles or an exactly constant column they are undefined, returned as None and printed
  "n/a". Neither depends on the scaling above.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from divfast.errors import DivfastError
from divfast.report.figure import check_figure_path, save_figure

PERCENT_KEYS = ("gain", "accuracy", "top5", "best_member_accuracy", "mean_member_accuracy")
PANEL_WIDTH, PANEL_HEIGHT = 3.4, 2.7  # inches per panel
MAX_AREA = 300.0  # points^2 of the bubble of the largest ensemble (by parameters)
CMAP = "viridis"  # bright = accurate: the paper's ideal ensemble is bright, small and above 0
TREND_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
TICK_FONT, LABEL_FONT, NOTE_FONT, TITLE_FONT = 7, 8, 7, 9
DPI = 100


# --- checking and selecting rows ---------------------------------------------------------------


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _check_rows(rows) -> list[dict]:
    if isinstance(rows, (str, bytes, dict)) or not isinstance(rows, Sequence) or not rows:
        got = f"{len(rows)} rows" if isinstance(rows, Sequence) else type(rows).__name__
        raise DivfastError(f"rows: expected a non-empty list of sweep rows (dicts), got {got}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DivfastError(f"rows[{i}]: expected a dict, got {type(row).__name__}")
        for key in ("dataset", "rule"):
            if key not in row:
                raise DivfastError(f"rows[{i}]: missing key {key!r}")
    return list(rows)


def numeric_keys(rows: list[dict]) -> list[str]:
    """The keys whose every value in ``rows`` is a number or None (sorted): the measures one can
    plot. A key that is None in every row counts (a measure the sweep did not compute).

    Example:
        >>> numeric_keys([{"dataset": "a", "rule": "vote", "gain": 0.1, "kappa": None},
        ...               {"dataset": "a", "rule": "vote", "gain": -0.02, "members": ["x"]}])
        ['gain', 'kappa']
    """
    keys: dict[str, bool] = {}
    for row in rows:
        for key, value in row.items():
            keys[key] = keys.get(key, True) and (value is None or _is_number(value))
    return sorted(key for key, ok in keys.items() if ok)


def _check_key(rows: list[dict], key, option: str) -> str:
    available = numeric_keys(rows)
    if not isinstance(key, str) or key not in available:
        raise DivfastError(f"{option}: unknown measure {key!r}; the rows' numeric keys are "
                           f"{', '.join(available) or '(none)'}")
    return key


def _check_names(rows: list[dict], field: str, wanted, option: str) -> list[str]:
    """``wanted`` (a list of names) checked against ``rows[*][field]``; None: every name present,
    in order of first appearance."""
    present = list(dict.fromkeys(str(row[field]) for row in rows))
    if wanted is None:
        return present
    if isinstance(wanted, (str, bytes)) or not isinstance(wanted, Sequence) or not wanted:
        raise DivfastError(f"{option}: expected a non-empty list of names, got {wanted!r}")
    for name in wanted:
        if name not in present:
            raise DivfastError(f"{option}: unknown {field} {name!r}; the rows have "
                               f"{', '.join(present)}")
    return list(wanted)


def _check_metrics(rows: list[dict], metrics) -> list[str]:
    if isinstance(metrics, (str, bytes)) or not isinstance(metrics, Sequence) or not metrics:
        raise DivfastError(f"metrics: expected a non-empty list of measure names, got {metrics!r}")
    return [_check_key(rows, m, "metrics") for m in metrics]


def _value(row: dict, key: str) -> float | None:
    """``row[key]`` as a float; None when missing, None, NaN, infinite or not a number."""
    value = row.get(key)
    if not _is_number(value) or not math.isfinite(float(value)):
        return None
    return float(value)


def _scale(rows: list[dict], dataset: str, metric: str) -> float:
    """Largest ``|metric|`` over every row of ``dataset`` (0.0 when none has a value)."""
    values = [_value(row, metric) for row in rows if row["dataset"] == dataset]
    return max((abs(v) for v in values if v is not None), default=0.0)


def _panel_rows(rows, rule, dataset, metric, y) -> tuple[list[dict], int]:
    """The rows of ``(rule, dataset)`` with both ``metric`` and ``y``, and how many lacked one."""
    panel = [row for row in rows if row["rule"] == rule and row["dataset"] == dataset]
    kept = [row for row in panel if _value(row, metric) is not None and _value(row, y) is not None]
    return kept, len(panel) - len(kept)


# --- correlations --------------------------------------------------------------------------------


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of their ranks (scipy's ``rankdata`` default)."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]  # run [start, end) of equal values
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # mean of start+1..end
    return ranks


def pearson(x, y) -> float | None:
    """Pearson's r of two equal-length sequences; None with fewer than 2 values or an exactly
    constant one.

    Example:
        >>> round(pearson([1, 2, 3, 4], [1, 3, 2, 5]), 6)
        0.831522
        >>> pearson([1, 2, 3], [5, 5, 5]) is None
        True
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)  # (n,), (n,)
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return None
    dx, dy = x - x.mean(), y - y.mean()
    r = float(np.dot(dx, dy) / math.sqrt(np.dot(dx, dx) * np.dot(dy, dy)))
    return min(1.0, max(-1.0, r))


def spearman(x, y) -> float | None:
    """Spearman's rho: Pearson's r of the average ranks (ties share the mean rank); None like
    :func:`pearson`.

    Example:
        >>> round(spearman([1, 2, 2, 3], [10, 20, 30, 40]), 6)  # ranks 1, 2.5, 2.5, 4
        0.948683
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2:
        return None
    return pearson(_average_ranks(x), _average_ranks(y))


def correlation_table(rows: list[dict], metrics: Sequence[str], y: str = "gain",
                      rule: str = "average", datasets: Sequence[str] | None = None) -> list[dict]:
    """How ``y`` correlates with each measure, per dataset, over the ensembles of one rule; no
    drawing (matplotlib is not imported).

    Args:
        rows: the sweep's rows (dicts with ``"dataset"``, ``"rule"`` and numbers).
        metrics: measures to correlate (numeric keys of the rows), in the order wanted.
        y: the quantity they are correlated with; ``"gain"`` by default.
        rule: the consensus rule whose rows are used.
        datasets: datasets in the order wanted; None: every dataset of the rows, in order of
            first appearance.

    Returns:
        One dict per (dataset, metric), dataset-major: ``{"dataset", "metric", "pearson",
        "spearman", "n"}``, ``n`` the ensembles with both values (None ones left out), the
        correlations floats or None (undefined: see the module docstring).

    Raises:
        DivfastError: empty or malformed ``rows``, an unknown metric or ``y`` (the message lists
            the numeric keys), an unknown ``rule`` or dataset.

    Example:
        >>> rows = [{"dataset": "clean", "rule": "average", "gain": g, "disagreement": d}
        ...         for g, d in [(0.01, 0.2), (0.04, 0.3), (0.00, 0.1), (0.03, None)]]
        >>> (row,) = correlation_table(rows, ["disagreement"])
        >>> row["dataset"], row["metric"], round(row["pearson"], 4), row["spearman"], row["n"]
        ('clean', 'disagreement', 0.9608, 1.0, 3)
    """
    rows, metrics, y, rule, datasets = _check_common(rows, metrics, y, rule, datasets)
    return [_correlation(rows, rule, dataset, metric, y) for dataset in datasets
            for metric in metrics]


def _check_common(rows, metrics, y, rule, datasets):
    rows = _check_rows(rows)
    metrics = _check_metrics(rows, metrics)
    y = _check_key(rows, y, "y")
    (rule,) = _check_names(rows, "rule", [rule], "rule")
    datasets = _check_names([r for r in rows if r["rule"] == rule] if datasets is None else rows,
                            "dataset", datasets, "datasets")
    return rows, metrics, y, rule, datasets


def _correlation(rows, rule, dataset, metric, y) -> dict:
    kept, _ = _panel_rows(rows, rule, dataset, metric, y)
    xs, ys = [_value(r, metric) for r in kept], [_value(r, y) for r in kept]
    return {"dataset": dataset, "metric": metric, "pearson": pearson(xs, ys),
            "spearman": spearman(xs, ys), "n": len(kept)}


# --- drawing -----------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _percent(key: str) -> float:
    return 100.0 if key in PERCENT_KEYS else 1.0


def _y_label(y: str) -> str:
    if y == "gain":
        return "gain over best member (pp)"
    return f"{y} (%)" if y in PERCENT_KEYS else y


def _note(ax, lines: list[str]) -> None:
    if lines:
        ax.text(0.02, 0.98, "\n".join(lines), transform=ax.transAxes, fontsize=NOTE_FONT,
                va="top", ha="left", color="0.3",
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1})


def _panel_points(rows, rule, dataset, metric, y, scale) -> tuple[list[dict], list[str]]:
    """The rows drawn in one panel and the notes saying what was left out."""
    kept, missing = _panel_rows(rows, rule, dataset, metric, y)
    notes = [f"{missing} without {metric} or {y}: not shown"] if missing else []
    if kept and scale == 0.0:
        notes.append(f"{metric} is 0 for every ensemble: nothing to normalise")
        kept = []
    elif not kept and not missing:
        notes.append("no ensembles")
    return kept, notes


def _fmt_corr(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f}"


def _nice_floor(value: float) -> float:
    """The largest 1, 2 or 5 times a power of ten that is at most ``value`` (> 0)."""
    power = 10.0 ** math.floor(math.log10(value))
    return max(step * power for step in (1, 2, 5) if step * power <= value * (1 + 1e-12))


def size_references(max_parameters: float) -> list[float]:
    """Two or three round parameter counts (in millions) for the bubble-size legend: the round
    numbers at or below the largest ensemble, a third of it and a tenth of it.

    Example:
        >>> size_references(263_000_000)
        [20.0, 50.0, 200.0]
        >>> size_references(4_000_000)
        [0.2, 1.0, 2.0]
    """
    millions = max_parameters / 1e6
    refs = {float(f"{_nice_floor(millions * f):.3g}") for f in (1.0, 1 / 3, 0.1)}
    return sorted(refs)


def _bubble_checks(rows: list[dict], drawn: list[dict]) -> float:
    """The largest parameter count of the ``drawn`` rows, after checking their accuracy and
    parameters (errors give the index in ``rows``)."""
    drawn_ids = {id(row) for row in drawn}
    for i, row in enumerate(rows):
        if id(row) not in drawn_ids:
            continue
        for key in ("accuracy", "parameters"):
            value = _value(row, key)
            if value is None or (key == "parameters" and value <= 0):
                raise DivfastError(f"rows[{i}]['{key}']: bubble_plot needs a "
                                   f"{'positive ' if key == 'parameters' else ''}number in every "
                                   f"drawn row, got {row.get(key)!r}")
    return max(float(row["parameters"]) for row in drawn)


def bubble_figure(rows: list[dict], metric: str = "disagreement",
                  rules: Sequence[str] | None = ("average", "vote"),
                  datasets: Sequence[str] | None = None):
    """The figure :func:`bubble_plot` saves (a matplotlib ``Figure``; the caller closes it). Its
    panel axes come first in ``fig.axes``, rule-major, then the colorbar's."""
    rows = _check_rows(rows)
    metric = _check_key(rows, metric, "metric")
    if "gain" not in numeric_keys(rows):
        raise DivfastError("rows: bubble_plot needs the numeric key 'gain' (ensemble accuracy "
                           "minus its best member's)")
    rules = _check_names(rows, "rule", rules, "rules")
    datasets = _check_names(rows, "dataset", datasets, "datasets")
    scales = {d: _scale(rows, d, metric) for d in datasets}
    panels = {(r, d): _panel_points(rows, r, d, metric, "gain", scales[d])
              for r in rules for d in datasets}
    drawn = [row for kept, _ in panels.values() for row in kept]
    max_parameters = _bubble_checks(rows, drawn) if drawn else 1.0
    accuracies = [100 * float(row["accuracy"]) for row in drawn] or [0.0, 100.0]

    plt = _pyplot()
    from matplotlib.colors import Normalize

    norm = Normalize(min(accuracies), max(accuracies))
    fig, axes = plt.subplots(len(rules), len(datasets), squeeze=False, layout="constrained",
                             figsize=(PANEL_WIDTH * len(datasets) + 1.0,
                                      PANEL_HEIGHT * len(rules) + 0.9))
    signed = False
    for r, rule in enumerate(rules):
        for c, dataset in enumerate(datasets):
            ax = axes[r][c]
            kept, notes = panels[(rule, dataset)]
            kept = sorted(kept, key=lambda row: -float(row["parameters"]))  # small ones on top
            x = np.array([_value(row, metric) for row in kept]) / (scales[dataset] or 1.0)
            signed = signed or bool(np.any(x < 0))
            ax.scatter(x, [100 * _value(row, "gain") for row in kept],
                       s=[MAX_AREA * float(row["parameters"]) / max_parameters for row in kept],
                       c=[100 * float(row["accuracy"]) for row in kept], cmap=CMAP, norm=norm,
                       alpha=0.8, edgecolors="0.2", linewidths=0.3)
            ax.axhline(0.0, color="0.3", linestyle="--", linewidth=0.8)
            ax.set_title(f"{rule} consensus, {dataset}", fontsize=TITLE_FONT)
            ax.set_xlabel(f"{metric} / max over {dataset}", fontsize=LABEL_FONT)
            if c == 0:
                ax.set_ylabel(_y_label("gain"), fontsize=LABEL_FONT)
            ax.tick_params(labelsize=TICK_FONT)
            _note(ax, notes)
    for ax in axes.ravel():
        ax.set_xlim(-1.05 if signed else -0.05, 1.05)
    mappable = plt.cm.ScalarMappable(norm=norm, cmap=CMAP)
    bar = fig.colorbar(mappable, ax=list(axes.ravel()), shrink=0.9 if len(rules) > 1 else 1.0)
    bar.set_label("ensemble accuracy (%)", fontsize=LABEL_FONT)
    bar.ax.tick_params(labelsize=TICK_FONT)
    if drawn:
        from matplotlib.lines import Line2D

        refs = size_references(max_parameters)
        handles = [Line2D([], [], linestyle="", marker="o", color="0.6", markeredgecolor="0.2",
                          markeredgewidth=0.3,  # scatter's area s is markersize squared
                          markersize=math.sqrt(MAX_AREA * ref * 1e6 / max_parameters))
                   for ref in refs]
        labels = [f"{ref:g}M parameters" for ref in refs]
        fig.legend(handles, labels, loc="outside lower center", ncols=len(handles),
                   fontsize=LABEL_FONT, frameon=False)
    fig.suptitle(f"ensemble gain vs {metric}", fontsize=TITLE_FONT + 1)
    return fig


def bubble_plot(rows: list[dict], path: str | os.PathLike, metric: str = "disagreement",
                rules: Sequence[str] | None = ("average", "vote"),
                datasets: Sequence[str] | None = None) -> str | os.PathLike:
    """Draws the paper's bubble plots (Figures 5 and 6) into ``path`` (.png, .svg, .pdf or .jpg),
    written atomically.

    One panel per (rule, dataset), rules as rows and datasets as columns, titled "<rule>
    consensus, <dataset>". Each ensemble is a bubble: x its ``metric`` divided by the largest
    absolute value of that dataset (module docstring), y its gain over its best member in
    percentage points (a dashed line marks 0: above it the ensemble beats its best member),
    colour its accuracy (one colorbar for all panels), area proportional to its parameters (the
    largest ensemble of the figure gets ``MAX_AREA``; the legend shows round sizes in millions).
    Rows whose ``metric`` or gain is None are left out and the panel says how many.

    Args:
        rows: the sweep's rows; drawn rows need ``"gain"``, ``"accuracy"`` and ``"parameters"``.
        path: where to write; the extension picks the format.
        metric: the diversity measure on x (a numeric key of the rows).
        rules: consensus rules, one row of panels each; None: every rule of the rows.
        datasets: one column each; None: every dataset of the rows, in order of appearance.

    Returns:
        ``path``.

    Raises:
        DivfastError: a bad ``path`` extension, empty or malformed ``rows``, an unknown ``metric``
            (the message lists the numeric keys), rule or dataset, a drawn row without accuracy
            or positive parameters. Nothing is written then.

    Example:
        >>> import os, tempfile
        >>> rows = [{"dataset": "clean", "rule": "average", "gain": g, "accuracy": a,
        ...          "parameters": p, "disagreement": d}
        ...         for g, a, p, d in [(0.01, 0.80, 3e7, 0.2), (-0.02, 0.70, 9e7, 0.3)]]
        >>> path = bubble_plot(rows, os.path.join(tempfile.mkdtemp(), "bubbles.png"),
        ...                    rules=["average"])
        >>> os.path.getsize(path) > 0
        True
    """
    check_figure_path(path)
    save_figure(bubble_figure(rows, metric, rules, datasets), path, dpi=DPI)
    return path


def trend_figure(rows: list[dict], metrics: Sequence[str] = ("attribution_diversity",
                 "disagreement", "mean_member_accuracy"), y: str = "gain",
                 rule: str = "average", datasets: Sequence[str] | None = None):
    """``(figure, correlations)`` of :func:`trend_plot` (the caller closes the figure). Its axes
    are the panels, metric-major."""
    rows, metrics, y, rule, datasets = _check_common(rows, metrics, y, rule, datasets)
    plt = _pyplot()
    fig, axes = plt.subplots(len(metrics), len(datasets), squeeze=False, layout="constrained",
                             figsize=(PANEL_WIDTH * len(datasets), PANEL_HEIGHT * len(metrics)
                                      + 0.4))
    table = []
    for c, dataset in enumerate(datasets):
        for r, metric in enumerate(metrics):
            ax = axes[r][c]
            scale = _scale(rows, dataset, metric)
            kept, notes = _panel_points(rows, rule, dataset, metric, y, scale)
            corr = _correlation(rows, rule, dataset, metric, y)
            table.append(corr)
            x = np.array([_value(row, metric) for row in kept]) / (scale or 1.0)  # (n,)
            ys = np.array([_percent(y) * _value(row, y) for row in kept])  # (n,)
            color = TREND_COLORS[r % len(TREND_COLORS)]
            ax.scatter(x, ys, s=8, color=color, alpha=0.6, linewidths=0)
            if len(x) >= 2 and np.ptp(x) > 0:
                slope, intercept = np.polyfit(x, ys, 1)
                line = np.array([x.min(), x.max()])
                ax.plot(line, slope * line + intercept, color="k", linewidth=1.2)
            if y == "gain":
                ax.axhline(0.0, color="0.3", linestyle="--", linewidth=0.8)
            ax.text(0.98, 0.02, f"r = {_fmt_corr(corr['pearson'])}, "
                    f"\u03c1 = {_fmt_corr(corr['spearman'])}, n = {corr['n']}",
                    transform=ax.transAxes, fontsize=NOTE_FONT, ha="right", va="bottom",
                    bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1})
            _note(ax, notes)
            ax.set_title(f"{metric}, {dataset}", fontsize=TITLE_FONT)
            ax.set_xlabel(f"{metric} / max over {dataset}", fontsize=LABEL_FONT)
            if c == 0:
                ax.set_ylabel(_y_label(y), fontsize=LABEL_FONT)
            ax.tick_params(labelsize=TICK_FONT)
    fig.suptitle(f"trend lines of {y} ({rule} consensus); r: Pearson, \u03c1: Spearman",
                 fontsize=TITLE_FONT + 1)
    return fig, table  # dataset-major, as correlation_table


def trend_plot(rows: list[dict], path: str | os.PathLike,
               metrics: Sequence[str] = ("attribution_diversity", "disagreement",
                                         "mean_member_accuracy"),
               y: str = "gain", rule: str = "average",
               datasets: Sequence[str] | None = None) -> list[dict]:
    """Draws trend lines like the paper's Figure 7 into ``path`` (.png, .svg, .pdf or .jpg),
    written atomically, and returns the correlations they show.

    One panel per (metric, dataset), metrics as rows and datasets as columns (the paper's
    layout), titled "<metric>, <dataset>": every ensemble of ``rule`` as a dot (x normalised as in
    the module docstring, y in percent for :data:`PERCENT_KEYS`), its least-squares line, and
    Pearson r, Spearman rho and the number of ensembles n in the corner ("n/a" when undefined).

    Args:
        rows: the sweep's rows.
        path: where to write; the extension picks the format.
        metrics: one row of panels each (numeric keys of the rows).
        y: on the y axis, ``"gain"`` by default (dashed line at 0).
        rule: the consensus rule whose ensembles are drawn.
        datasets: one column each; None: every dataset of ``rule``'s rows.

    Returns:
        :func:`correlation_table` of the same arguments.

    Raises:
        DivfastError: as :func:`correlation_table`, or a bad ``path`` extension. Nothing is
            written then.

    Example:
        >>> import os, tempfile
        >>> rows = [{"dataset": "clean", "rule": "average", "gain": g, "disagreement": d}
        ...         for g, d in [(0.01, 0.2), (0.04, 0.3), (0.00, 0.1), (0.02, 0.2)]]
        >>> table = trend_plot(rows, os.path.join(tempfile.mkdtemp(), "trend.png"),
        ...                    ["disagreement"])
        >>> [(t["dataset"], t["metric"], round(t["pearson"], 4), t["n"]) for t in table]
        [('clean', 'disagreement', 0.9562, 4)]
    """
    check_figure_path(path)
    fig, table = trend_figure(rows, metrics, y, rule, datasets)
    save_figure(fig, path, dpi=DPI)
    return table
