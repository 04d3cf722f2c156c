"""Render evaluation reports as tables for a terminal (rich) or plain text."""

from __future__ import annotations

import math
import sys

# name, what it measures, which direction means more diverse
MEASURE_DOCS = {
    "disagreement": ("pairs where exactly one member is right (Eq. 4)", "up"),
    "q_statistic": ("Yule's Q of the correct/incorrect table", "down"),
    "correlation": ("correlation of the members' correctness", "down"),
    "double_fault": ("pairs both wrong", "down"),
    "entropy": ("Kuncheva-Whitaker entropy E", "up"),
    "kohavi_wolpert": ("Kohavi-Wolpert variance", "up"),
    "kappa": ("interrater agreement kappa", "down"),
    "difficulty": ("difficulty theta (variance of the share correct)", "down"),
    "generalized_diversity": ("generalized diversity GD", "up"),
    "coincident_failure": ("coincident failure diversity CFD", "up"),
    "label_disagreement": ("pairs predicting different labels", "up"),
    "kl": ("mean KL(p_i || p_k) of softmax outputs, nats", "up"),
    "cosine": ("mean cosine similarity of softmax outputs", "down"),
    "equitability_correct": ("Shannon equitability, ensemble-correct samples (Eq. 5)", "up"),
    "equitability_incorrect": ("Shannon equitability, ensemble-wrong samples (Eq. 5)", "up"),
}

# The attribution row: the report's "attribution" block names the method.
ATTRIBUTION_METHOD_NAMES = {"saliency": "Saliency", "ig": "IG"}  # IG: Integrated Gradients
ATTRIBUTION_DOC = ("variance of members' {method} maps (Eq. 7)", "up")


# The representation table: one column per member's layer up to this many members, else one
# column of the names joined with " / ".
REPRESENTATION_MEMBER_COLUMNS = 4


def _fmt(x: float, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    return f"{100 * x:.2f}" if pct else f"{x:.4f}"


def _fmt_g(x: float) -> str:
    """Four significant digits: attribution diversity has no natural scale (gradients' units)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    return f"{x:.4g}"


def _fmt3(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    return f"{x:.3f}"


def attribution_row(report: dict) -> tuple[str, str, str] | None:
    """``(name, value, meaning)`` of the report's attribution diversity, or None without one
    (``--attribution none``, or a report older than the block)."""
    block = report.get("attribution")
    if not block:
        return None
    method = ATTRIBUTION_METHOD_NAMES.get(block["method"], block["method"])
    if block["method"] == "ig":
        method += f" ({block['ig_steps']} steps)"
    meaning = ATTRIBUTION_DOC[0].format(method=method)
    details = []  # only what differs from the defaults (true-label maps, not normalised)
    if block["target"] != "label":
        details.append(f"{block['target']}'s prediction")
    if block["normalize"] != "none":
        details.append(f"{block['normalize']}-normalised")
    if details:
        meaning += f"; {', '.join(details)}"
    return "attribution", _fmt_g(block["diversity"]), meaning


def representation_table(block: dict):
    """The report's representation block as ``(table, summary line)``: one row per depth with
    the layer each member has there and their mean cross-member CKA, then the overall mean, the
    batches and the skipped samples (only when some were)."""
    from rich.markup import escape
    from rich.table import Table

    kernel = block.get("kernel") or "linear"
    if kernel == "rbf" and block.get("bandwidth") is not None:
        kernel += f", bandwidth {block['bandwidth']:g}"
    members = [escape(str(name)) for name in block["members"]]
    title = f"representation similarity (minibatch CKA, {kernel})"
    table = Table(title=title, title_justify="left", min_width=len(title))  # the title never wraps
    table.add_column("depth", justify="right")
    per_member = len(members) <= REPRESENTATION_MEMBER_COLUMNS
    for name in members if per_member else [f"layers ({' / '.join(members)})"]:
        table.add_column(name)
    table.add_column("mean cross-member CKA", justify="right")
    for row in block.get("by_depth") or []:
        layers = [escape(str(name)) for name in row["layers"]]
        table.add_row(str(row["depth"]), *(layers if per_member else [" / ".join(layers)]),
                      _fmt3(row["mean_cross_member_cka"]))
    summary = (f"mean cross-member CKA over depths: {_fmt3(block['mean_cross_member_cka'])} "
               f"({block['batches']} batches")
    if block.get("skipped_samples"):  # batches under 4 samples: the unbiased HSIC needs n >= 4
        summary += f"; {block['skipped_samples']} samples skipped in batches under 4 samples"
    return table, summary + ")"


def render_eval(report: dict, file=None) -> None:
    """Prints the members/ensemble accuracy table and the diversity table of one eval report,
    then its representation similarity when it has one (:func:`representation_table`)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout, width=110)
    acc = Table(title=f"divfast eval — dataset {report['dataset']} ({report['n_samples']} samples)",
                title_justify="left")
    acc.add_column("model")
    acc.add_column("architecture")
    acc.add_column("params", justify="right")
    acc.add_column("top-1 %", justify="right")
    acc.add_column("top-5 %", justify="right")
    for row in report["members"]:
        acc.add_row(row["name"], row["architecture"], f"{row['parameters'] / 1e6:.2f}M",
                    _fmt(row["top1"], True), _fmt(row["top5"], True))
    ens = report["ensemble"]
    gain = 100 * ens["gain_top1"]
    acc.add_row(f"ensemble ({ens['consensus']})", "", "", _fmt(ens["top1"], True),
                _fmt(ens["top5"], True), style="bold")
    console.print(acc)
    console.print(f"gain over best member ({ens['best_member']}): {gain:+.2f} points top-1")

    attribution = attribution_row(report)
    div = Table(title="prediction diversity" if attribution is None
                else "prediction and attribution diversity", title_justify="left")
    div.add_column("measure")
    div.add_column("value", justify="right")
    div.add_column("more diverse", justify="center")
    div.add_column("meaning")
    for name, (meaning, direction) in MEASURE_DOCS.items():
        div.add_row(name, _fmt(report["diversity"][name]), "↑" if direction == "up" else "↓",
                    meaning)
    if attribution is not None:
        name, value, meaning = attribution
        div.add_row(name, value, "↑" if ATTRIBUTION_DOC[1] == "up" else "↓", meaning)
    console.print(div)
    if report.get("representation"):  # None without one, absent in reports older than the key
        table, summary = representation_table(report["representation"])
        console.print(table)
        console.print(summary, markup=False)


def render_accuracy_by_dataset(reports: list[dict], file=None) -> None:
    """One row per dataset (clean, lines1.6, ...): each member's top-1, the ensemble's, its gain,
    the prediction disagreement and, when the reports have one, the attribution diversity."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout, width=110)
    names = [row["name"] for row in reports[0]["members"]]
    archs = [row["architecture"] for row in reports[0]["members"]]
    if len(set(archs)) == len(archs):  # shorter headers when they still tell members apart
        names = archs
    table = Table(title="top-1 accuracy % per dataset", title_justify="left")
    table.add_column("dataset")
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("ensemble", justify="right")
    table.add_column("gain", justify="right")
    table.add_column("disagreement", justify="right")
    blocks = [report["attribution"] for report in reports if report.get("attribution")]
    if blocks:  # headed by the method, short enough to keep the member names whole in 110 columns
        table.add_column(ATTRIBUTION_METHOD_NAMES.get(blocks[0]["method"], "attribution"),
                         justify="right")
    for report in reports:
        ens = report["ensemble"]
        cells = [_fmt(ens["top1"], True), f"{100 * ens['gain_top1']:+.2f}",
                 _fmt(report["diversity"]["disagreement"])]
        if blocks:
            block = report.get("attribution")
            cells.append(_fmt_g(block["diversity"]) if block else "-")
        table.add_row(report["dataset"], *[_fmt(r["top1"], True) for r in report["members"]],
                      *cells)
    console.print(table)
    if blocks:
        header = table.columns[-1].header
        console.print(f"{header}: attribution diversity, "
                      f"{attribution_row({'attribution': blocks[0]})[2]}, ↑ more diverse")


def render_comparison(result: dict, file=None) -> None:
    """One row per dataset, one column per ensemble (and rule): top-1 accuracy % and the gain over
    the ensemble's best member (:func:`divfast.ensembles.compare_ensembles`)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout, width=110)
    rows = result["rows"]
    columns = list(dict.fromkeys((r["ensemble"], r["rule"]) for r in rows))
    single_rule = len(result["rules"]) == 1
    table = Table(title="ensemble top-1 % (gain over its best member)",
                  title_justify="left")
    table.add_column("dataset")
    for name, rule in columns:
        table.add_column(name if single_rule else f"{name} ({rule})", justify="right")
    by_key = {(r["ensemble"], r["rule"], r["dataset"]): r for r in rows}
    for spec in dict.fromkeys(r["dataset"] for r in rows):
        cells = []
        for name, rule in columns:
            r = by_key[(name, rule, spec)]
            cells.append(f"{100 * r['accuracy']:.2f} ({100 * r['gain']:+.2f})")
        table.add_row(spec, *cells)
    console.print(table)
