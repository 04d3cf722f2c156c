"""The sweep's bubble plots (paper Figures 5-6), trend lines (Figure 7) and correlation table,
against scipy.stats and numpy on synthetic sweep rows."""

import itertools
import math
import os
import subprocess
import sys

import matplotlib
import numpy as np
import pytest
import scipy.stats

from divfast.errors import DivfastError
from divfast.report import bubble_plot, correlation_table, trend_plot
from divfast.report.sweep_plots import (MAX_AREA, bubble_figure, numeric_keys, pearson,
                                        size_references, spearman, trend_figure)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DATASETS = ("clean", "lines1.6", "plasma4.0", "checkerboard4.0", "waterdrop7.0")


def sweep_rows(num_models=6, k=3, datasets=DATASETS[:2], rules=("average", "vote"), seed=0,
               attribution_missing=0.0):
    """Rows shaped like the ensemble sweep's: every k-subset of a pool, per dataset and rule.

    Gain grows with disagreement and attribution diversity plus noise; vote is shifted down (the
    paper's Figure 6). ``attribution_missing`` is the share of rows whose attribution is None.
    """
    rng = np.random.default_rng(seed)
    names = [f"{arch}_s{i}" for i, arch in
             zip(range(num_models), itertools.cycle(["resnet18", "vit", "deit", "squeezenet"]))]
    params = rng.uniform(1e6, 9e7, num_models)
    rows = []
    for dataset in datasets:
        acc = rng.uniform(0.3, 0.8, num_models)
        for members in itertools.combinations(range(num_models), k):
            dis = float(rng.uniform(0.05, 0.5))  # prediction and attribution measures do
            attr = float(rng.uniform(0.0, 2e-3))  # not depend on the rule
            q, kappa = float(rng.uniform(-0.5, 1)), float(rng.uniform(-0.2, 0.8))
            missing = rng.random() < attribution_missing
            for rule in rules:
                gain = 0.1 * dis + 20 * attr - 0.04 - (0.03 if rule == "vote" else 0.0)
                gain += float(rng.normal(0, 0.01))
                best = float(acc[list(members)].max())
                rows.append({
                    "dataset": dataset, "rule": rule, "members": [names[m] for m in members],
                    "k": k, "accuracy": best + gain, "top5": min(1.0, best + 0.15),
                    "best_member_accuracy": best, "gain": gain,
                    "mean_member_accuracy": float(acc[list(members)].mean()),
                    "parameters": int(params[list(members)].sum()), "disagreement": dis,
                    "double_fault": 0.5 - dis / 2, "q_statistic": q,
                    "kappa": kappa, "attribution_diversity": None if missing else attr,
                })
    return rows


@pytest.fixture
def figures():
    made = []
    yield made
    for fig in made:
        plt.close(fig)


def _select(rows, rule, dataset, metric, y="gain"):
    pairs = [(r[metric], r[y]) for r in rows if r["rule"] == rule and r["dataset"] == dataset
             and r[metric] is not None and r[y] is not None
             and math.isfinite(r[metric]) and math.isfinite(r[y])]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


# --- correlations ------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["average", "vote"])
def test_correlation_table_matches_scipy(rule):
    rows = sweep_rows(num_models=7, attribution_missing=0.2)
    metrics = ["attribution_diversity", "disagreement", "kappa", "mean_member_accuracy"]
    table = correlation_table(rows, metrics, rule=rule)
    assert [(t["dataset"], t["metric"]) for t in table] == [(d, m) for d in DATASETS[:2]
                                                            for m in metrics]
    for t in table:
        x, y = _select(rows, rule, t["dataset"], t["metric"])
        assert t["n"] == len(x) and set(t) == {"dataset", "metric", "pearson", "spearman", "n"}
        assert t["pearson"] == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-12)
        assert t["spearman"] == pytest.approx(scipy.stats.spearmanr(x, y)[0], abs=1e-12)
    by_metric = {t["metric"]: t["n"] for t in table if t["dataset"] == "clean"}
    assert by_metric["attribution_diversity"] < by_metric["disagreement"] == 35  # Nones skipped


def test_spearman_with_ties_matches_scipy():
    rng = np.random.default_rng(3)
    for n in (2, 3, 10, 57):
        x = rng.integers(0, 4, n).astype(float)  # many ties
        y = np.round(x + rng.normal(0, 1, n))  # ties too
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            continue
        assert spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y)[0], abs=1e-12)
        assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)


def test_undefined_correlations_are_none():
    assert pearson([], []) is None and spearman([], []) is None
    assert pearson([1.0], [2.0]) is None and spearman([1.0], [2.0]) is None
    assert pearson([0.3, 0.3, 0.3], [1, 2, 3]) is None
    assert spearman([1, 2, 3], [7, 7, 7]) is None
    assert pearson([1, 2], [3, 1]) == pytest.approx(-1.0)
    rows = sweep_rows(num_models=5)
    for row in rows:
        row["double_fault"] = 0.25  # a constant column
    rows[0]["kappa"] = None
    table = correlation_table(rows, ["double_fault", "kappa"], datasets=["clean"])
    assert table[0] == {"dataset": "clean", "metric": "double_fault", "pearson": None,
                        "spearman": None, "n": 10}
    assert table[1]["n"] == 9 and table[1]["pearson"] is not None


def test_nan_and_missing_keys_count_as_none():
    rows = sweep_rows(num_models=5, datasets=["clean"], rules=["average"])
    rows[0]["disagreement"] = float("nan")
    del rows[1]["disagreement"]
    rows[2]["gain"] = None
    (t,) = correlation_table(rows, ["disagreement"])
    x, y = _select(rows[3:], "average", "clean", "disagreement")
    assert t["n"] == 7 == len(x)
    assert t["pearson"] == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-12)


def test_correlation_table_rule_and_dataset_selection():
    rows = sweep_rows(num_models=5, datasets=DATASETS[:3])
    rows += [dict(r, rule="median") for r in rows
             if r["dataset"] == "clean" and r["rule"] == "average"]
    assert [t["dataset"] for t in correlation_table(rows, ["kappa"], rule="median")] == ["clean"]
    table = correlation_table(rows, ["kappa"], rule="median", datasets=["plasma4.0", "clean"])
    assert [(t["dataset"], t["n"]) for t in table] == [("plasma4.0", 0), ("clean", 10)]
    assert table[0]["pearson"] is None


def test_correlation_table_does_not_import_matplotlib():
    code = ("import sys; from divfast.report import correlation_table; "
            "rows = [{'dataset': 'clean', 'rule': 'average', 'gain': i % 3, 'kappa': i / 7} "
            "for i in range(9)]; "
            "assert correlation_table(rows, ['kappa'])[0]['n'] == 9; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_numeric_keys():
    rows = sweep_rows(num_models=4, attribution_missing=1.0)
    keys = numeric_keys(rows)
    assert "attribution_diversity" in keys and "gain" in keys and "k" in keys
    assert "members" not in keys and "dataset" not in keys and "rule" not in keys


# --- bubble plots ------------------------------------------------------------------------------


def _panels(fig):
    return [ax for ax in fig.axes if ax.get_title()]


def _note_text(ax):
    return " ".join(t.get_text() for t in ax.texts)


def test_bubble_single_panel(figures):
    rows = sweep_rows(num_models=6, datasets=["clean"], rules=["average"])
    fig = bubble_figure(rows, rules=["average"])
    figures.append(fig)
    (ax,) = _panels(fig)
    assert ax.get_title() == "average consensus, clean"
    (points,) = ax.collections
    offsets = np.asarray(points.get_offsets())
    assert len(offsets) == 20
    by_x = {round(r["disagreement"] / max(q["disagreement"] for q in rows), 12): r for r in rows}
    assert offsets[:, 0].max() == pytest.approx(1.0) and offsets[:, 0].min() > 0
    largest = max(r["parameters"] for r in rows)
    for (x, y), size, colour in zip(offsets, points.get_sizes(), points.get_array()):
        row = by_x[round(x, 12)]
        assert y == pytest.approx(100 * row["gain"])
        assert colour == pytest.approx(100 * row["accuracy"])
        assert size == pytest.approx(MAX_AREA * row["parameters"] / largest)
    assert any(list(line.get_ydata()) == [0, 0] for line in ax.lines)  # the zero line
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "ensemble accuracy (%)"
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == [f"{ref:g}M parameters" for ref in size_references(largest)]
    assert 2 <= len(labels) <= 3


def test_bubble_grid_rules_by_datasets(figures, tmp_path):
    rows = sweep_rows(num_models=5, datasets=DATASETS[:3])
    fig = bubble_figure(rows, metric="kappa", datasets=["plasma4.0", "clean"])
    figures.append(fig)
    assert [ax.get_title() for ax in _panels(fig)] == [
        "average consensus, plasma4.0", "average consensus, clean",
        "vote consensus, plasma4.0", "vote consensus, clean"]
    xs = [np.asarray(ax.collections[0].get_offsets())[:, 0] for ax in _panels(fig)]
    assert np.abs(np.concatenate(xs)).max() == pytest.approx(1.0)  # signed: within [-1, 1]
    assert np.concatenate(xs).min() < 0
    np.testing.assert_allclose(np.sort(xs[0]), np.sort(xs[2]))  # one scale per dataset
    colours = [ax.collections[0].norm for ax in _panels(fig)]
    assert all(n is colours[0] for n in colours)  # one colour scale for every panel
    for ext in ("png", "svg", "pdf"):
        path = tmp_path / f"bubbles.{ext}"
        assert bubble_plot(rows, path, rules=None) == path and path.stat().st_size > 0


def test_bubble_skips_missing_and_all_zero(figures):
    rows = sweep_rows(num_models=5, datasets=["clean", "lines1.6"], rules=["average"])
    for i, row in enumerate(rows):
        if row["dataset"] == "clean" and i % 3 == 0:
            row["attribution_diversity"] = None
        if row["dataset"] == "lines1.6":
            row["attribution_diversity"] = 0.0
    fig = bubble_figure(rows, "attribution_diversity", rules=["average"])
    figures.append(fig)
    clean, lines = _panels(fig)
    skipped = sum(r["attribution_diversity"] is None for r in rows)
    assert len(clean.collections[0].get_offsets()) == 10 - skipped
    assert f"{skipped} without attribution_diversity" in _note_text(clean)
    assert len(lines.collections[0].get_offsets()) == 0
    assert "0 for every ensemble" in _note_text(lines)


def test_bubble_metric_none_everywhere(figures, tmp_path):
    rows = sweep_rows(num_models=4, datasets=["clean"], attribution_missing=1.0)
    path = tmp_path / "none.png"
    bubble_plot(rows, path, "attribution_diversity")
    assert path.stat().st_size > 0
    fig = bubble_figure(rows, "attribution_diversity")
    figures.append(fig)
    assert all("4 without attribution_diversity" in _note_text(ax) for ax in _panels(fig))


# --- trend lines -------------------------------------------------------------------------------


def test_trend_plot_panels_lines_and_table(figures, tmp_path):
    rows = sweep_rows(num_models=6, datasets=DATASETS[:3], attribution_missing=0.1)
    metrics = ("attribution_diversity", "disagreement", "mean_member_accuracy")
    path = tmp_path / "trend.png"
    table = trend_plot(rows, path, metrics)
    assert path.stat().st_size > 0
    assert table == correlation_table(rows, metrics)
    fig, again = trend_figure(rows, metrics)
    figures.append(fig)
    assert again == table
    panels = _panels(fig)
    assert [ax.get_title() for ax in panels] == [f"{m}, {d}" for m in metrics
                                                 for d in DATASETS[:3]]
    for ax in panels:
        metric, dataset = ax.get_title().split(", ")
        t = next(t for t in table if (t["metric"], t["dataset"]) == (metric, dataset))
        assert (f"r = {t['pearson']:+.2f}, \u03c1 = {t['spearman']:+.2f}, n = {t['n']}"
                in _note_text(ax))
        x, y = _select(rows, "average", dataset, metric)
        scale = max(abs(r[metric]) for r in rows if r["dataset"] == dataset
                    and r[metric] is not None)
        (fit,) = [line for line in ax.lines if list(line.get_ydata()) != [0, 0]]
        slope, intercept = np.polyfit(x / scale, 100 * y, 1)
        xd, yd = fit.get_xdata(), fit.get_ydata()
        np.testing.assert_allclose(yd, slope * np.asarray(xd) + intercept, atol=1e-9)
        assert xd[0] == pytest.approx((x / scale).min()) and xd[1] == pytest.approx(1.0)


def test_trend_constant_column_says_na(figures):
    rows = sweep_rows(num_models=4, datasets=["clean"], rules=["average"])
    for row in rows:
        row["double_fault"] = 0.1
    fig, table = trend_figure(rows, ["double_fault"], y="accuracy")
    figures.append(fig)
    (ax,) = _panels(fig)
    assert table[0]["pearson"] is None and "r = n/a, \u03c1 = n/a, n = 4" in _note_text(ax)
    assert ax.lines == [] or all(len(set(line.get_xdata())) == 1 for line in ax.lines)
    assert ax.get_ylabel() == "accuracy (%)"


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("call, match", [
    (lambda p: bubble_plot([], p), "rows: expected a non-empty list"),
    (lambda p: trend_plot({"dataset": "x"}, p), "rows: expected a non-empty list"),
    (lambda p: correlation_table([{"rule": "average"}], ["gain"]), r"rows\[0\]: missing key"),
    (lambda p: bubble_plot(sweep_rows(4), p, metric="disagrement"),
     r"metric: unknown measure 'disagrement'; the rows' numeric keys are accuracy, "
     r"attribution_diversity, best_member_accuracy, disagreement, double_fault, gain, k, kappa"),
    (lambda p: bubble_plot(sweep_rows(4), p, metric="members"), "metric: unknown measure"),
    (lambda p: trend_plot(sweep_rows(4), p, ["kappa", "nope"]), "metrics: unknown measure 'nope'"),
    (lambda p: trend_plot(sweep_rows(4), p, "kappa"), "metrics: expected a non-empty list"),
    (lambda p: correlation_table(sweep_rows(4), [], y="gain"), "metrics: expected a non-empty"),
    (lambda p: correlation_table(sweep_rows(4), ["kappa"], y="gian"), "y: unknown measure"),
    (lambda p: trend_plot(sweep_rows(4), p, rule="geometric"),
     "rule: unknown rule 'geometric'; the rows have average, vote"),
    (lambda p: bubble_plot(sweep_rows(4), p, rules=["average", "median"]), "rules: unknown rule"),
    (lambda p: bubble_plot(sweep_rows(4), p, datasets=["imagenet"]),
     "datasets: unknown dataset 'imagenet'; the rows have clean, lines1.6"),
    (lambda p: trend_plot(sweep_rows(4), p, datasets="clean"), "datasets: expected a non-empty"),
    (lambda p: bubble_plot([{k: v for k, v in r.items() if k != "parameters"}
                            for r in sweep_rows(4)], p), r"rows\[0\]\['parameters'\]"),
    (lambda p: bubble_plot([dict(r, accuracy="0.8" if i == 5 else r["accuracy"])
                            for i, r in enumerate(sweep_rows(4))], p), r"rows\[5\]\['accuracy'\]"),
    (lambda p: bubble_plot([{k: v for k, v in r.items() if k != "gain"}
                            for r in sweep_rows(4)], p), "rows: bubble_plot needs"),
])
def test_errors_name_the_argument_and_write_nothing(tmp_path, call, match):
    path = tmp_path / "figure.png"
    with pytest.raises(DivfastError, match=match):
        call(path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("draw", [bubble_plot, trend_plot])
def test_bad_path(tmp_path, draw):
    with pytest.raises(DivfastError, match="path: expected a .png"):
        draw(sweep_rows(4), tmp_path / "figure.txt")
    assert os.listdir(tmp_path) == []
