"""Ensembles side by side per dataset (paper Figure 10): grouped bars of ensemble accuracy with
each member's accuracy as a dot on its ensemble's bar."""

from __future__ import annotations

from divfast.errors import DivfastError
from divfast.report.figure import check_figure_path, save_figure


def comparison_plot(rows: list[dict], path: str, rule: str = "average",
                    title: str | None = None) -> None:
    """Draws :func:`divfast.ensembles.compare_ensembles` rows of one ``rule`` into ``path``.

    Raises:
        DivfastError: no row for ``rule``, or a path that is not .png/.svg/.pdf/.jpg.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    check_figure_path(path)
    rows = [r for r in rows if r["rule"] == rule]
    if not rows:
        raise DivfastError(f"rule: no comparison rows for rule {rule!r}")
    names = list(dict.fromkeys(r["ensemble"] for r in rows))
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    by_key = {(r["ensemble"], r["dataset"]): r for r in rows}
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(1.2 + 1.3 * len(datasets) * max(1, len(names) / 2), 3.6))
    colours = plt.get_cmap("tab10")
    for e, name in enumerate(names):
        xs, heights, dots_x, dots_y = [], [], [], []
        for d, spec in enumerate(datasets):
            row = by_key.get((name, spec))
            if row is None:
                continue
            x = d - 0.4 + width * (e + 0.5)
            xs.append(x)
            heights.append(100 * row["accuracy"])
            dots_x += [x] * len(row["member_accuracy"])
            dots_y += [100 * a for a in row["member_accuracy"]]
        ax.bar(xs, heights, width * 0.9, label=name, color=colours(e % 10))
        ax.scatter(dots_x, dots_y, s=10, color="black", zorder=3,
                   label="members" if e == len(names) - 1 else None)
        for x, h in zip(xs, heights):
            ax.text(x, h + 0.5, f"{h:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(datasets)))
    ax.set_xticklabels(datasets, fontsize=8)
    ax.set_ylabel(f"top-1 accuracy % ({rule} consensus)")
    low = min(100 * min([r["accuracy"]] + r["member_accuracy"]) for r in rows)
    ax.set_ylim(max(0.0, low - 10), 101)
    ax.legend(fontsize=7, loc="lower left", ncol=len(names) + 1)
    ax.set_title(title or "ensemble accuracy per dataset (dots: members)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
