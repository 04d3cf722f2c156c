"""CKA heat maps (paper Figure 12): the minibatch CKA of every layer of one member with every layer
of another, one panel per member pair, from the eval report's ``"representation"`` block.

Panel ``(i, j)`` has member ``i``'s layers as rows (the first layer on top) and member ``j``'s as
columns. The colour scale is fixed to [0, 1] so panels and figures compare at a glance; a value
outside it (float rounding, a biased estimate) takes the end colour, and a missing value (NaN, or
null once the report went through JSON) is drawn grey. With many layers (a ResNet-50 has ~90) the
tick labels are thinned to at most ``max_ticks`` per axis, every k-th layer from the first
(:func:`tick_positions`); panels grow so that labels do not overlap.
"""

from __future__ import annotations

import math
import os

from divfast.errors import DivfastError
from divfast.report.figure import check_figure_path, save_figure

PAIRS = ("cross", "all")  # "cross": i < j; "all": i <= j (adds each member's self map)
PANEL_INCHES = 3.0  # each heat map's least side, before its tick labels
TICK_INCHES = 0.14  # least room per tick label: a panel with more labels grows
COLORBAR_INCHES = 0.9
TITLE_INCHES = 0.4
TICK_FONT = 7  # points; the longest tick label sets the room beside each panel
LABEL_FONT = 9
TITLE_FONT = 10
MAX_LABEL_CHARS = 28  # longer layer names are shortened in the middle ("layer4...conv3")
CMAP = "magma"
DPI = 100


def tick_positions(n: int, max_ticks: int) -> list[int]:
    """At most ``max_ticks`` of the indices ``0..n-1``: every ``k``-th from 0, ``k`` the smallest
    step by which ``max_ticks`` labels reach the last index (every index when ``n <= max_ticks``).
    One step for the whole axis keeps the labels evenly spaced.

    Example:
        >>> tick_positions(5, 24)
        [0, 1, 2, 3, 4]
        >>> tick_positions(93, 5)
        [0, 23, 46, 69, 92]
        >>> len(tick_positions(93, 24)), len(tick_positions(40, 24))
        (24, 20)
    """
    step = max(1, math.ceil((n - 1) / (max_ticks - 1))) if max_ticks > 1 else max(n, 1)
    return list(range(0, n, step))


def _short(name: str) -> str:
    if len(name) <= MAX_LABEL_CHARS:
        return name
    keep = MAX_LABEL_CHARS - 3
    return name[:keep - keep // 2] + "..." + name[len(name) - keep // 2:]


def _is_number(x) -> bool:
    return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))


def check_block(block) -> tuple[list[str], list[list[str]], list[list[float]]]:
    """``(members, layers, cka)`` of a report's ``"representation"`` block after checking its
    shape: ``cka`` is G x G with G the total number of layers (None read as NaN).

    Raises:
        DivfastError: naming ``block`` and the key that is missing or malformed.
    """
    if block is None:
        raise DivfastError("block: the report has no representation block (None)")
    if not isinstance(block, dict):
        raise DivfastError(f"block: expected the report's 'representation' dict, got "
                           f"{type(block).__name__}")
    for key in ("members", "layers", "cka"):
        if key not in block:
            raise DivfastError(f"block: missing key {key!r}")
    members, layers, cka = block["members"], block["layers"], block["cka"]
    if not isinstance(members, list) or not members:
        raise DivfastError("block['members']: expected a non-empty list of member names")
    if (not isinstance(layers, list) or len(layers) != len(members)
            or not all(isinstance(names, list) and names for names in layers)):
        raise DivfastError(f"block['layers']: expected {len(members)} non-empty lists of layer "
                           "names (one per member)")
    g = sum(len(names) for names in layers)
    if "names" in block and block["names"] is not None and len(block["names"]) != g:
        raise DivfastError(f"block['names']: expected {g} names (the layers of every member), "
                           f"got {len(block['names'])}")
    if (not isinstance(cka, list) or len(cka) != g
            or not all(isinstance(row, list) and len(row) == g for row in cka)):
        got = (f"{len(cka)} x {len(cka[0]) if cka and isinstance(cka[0], list) else '?'}"
               if isinstance(cka, list) else type(cka).__name__)
        raise DivfastError(f"block['cka']: expected {g} x {g} (G = the layers of every member), "
                           f"got {got}")
    if not all(_is_number(x) for row in cka for x in row):
        raise DivfastError("block['cka']: expected numbers (or null)")
    cka = [[math.nan if x is None else float(x) for x in row] for row in cka]
    return [str(m) for m in members], [[str(n) for n in names] for names in layers], cka


def _panels(num_members: int, pairs: str) -> list[tuple[int, int]]:
    return [(i, j) for i in range(num_members) for j in range(num_members)
            if i < j or (i == j and pairs == "all")]


def cka_figure(block: dict, pairs: str = "cross", max_ticks: int = 24):
    """The figure :func:`draw_cka_maps` saves (a matplotlib ``Figure``; the caller closes it).
    Its heat-map axes come first in ``fig.axes``, in panel order, then the colorbar's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if pairs not in PAIRS:
        raise DivfastError(f"pairs: expected 'cross' or 'all', got {pairs!r}")
    if isinstance(max_ticks, bool) or not isinstance(max_ticks, int) or max_ticks < 1:
        raise DivfastError(f"max_ticks: expected an integer >= 1, got {max_ticks!r}")
    members, layers, cka = check_block(block)
    if pairs == "cross" and len(members) < 2:
        raise DivfastError(f"pairs: 'cross' needs at least 2 members, the block has "
                           f"{len(members)} ({members[0]}); pass pairs='all' for its self map")
    panels = _panels(len(members), pairs)
    cka = np.asarray(cka, dtype=np.float64)  # (G, G)
    start = np.cumsum([0] + [len(names) for names in layers])  # member m: start[m]:start[m + 1]

    ticks = [tick_positions(len(names), max_ticks) for names in layers]
    side = max(PANEL_INCHES, TICK_INCHES * max(len(t) for t in ticks))
    ncols = min(len(panels), max(3, math.ceil(math.sqrt(len(panels)))))
    nrows = math.ceil(len(panels) / ncols)
    longest = max(len(_short(name)) for names in layers for name in names)
    label_inches = 0.35 + longest * TICK_FONT * 0.6 / 72  # tick labels plus the axis label
    width = ncols * (side + label_inches) + COLORBAR_INCHES
    height = nrows * (side + label_inches + TITLE_INCHES) + TITLE_INCHES
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, figsize=(width, height),
                             layout="constrained")
    axes = axes.ravel()
    cmap = plt.get_cmap(CMAP).with_extremes(bad="0.8")  # NaN: grey
    for ax, (i, j) in zip(axes, panels):
        values = cka[start[i]:start[i + 1], start[j]:start[j + 1]]  # (L_i, L_j)
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=1.0,
                          aspect="auto", interpolation="nearest")
        rows, cols = ticks[i], ticks[j]
        ax.set_yticks(rows, [_short(layers[i][r]) for r in rows], fontsize=TICK_FONT)
        ax.set_xticks(cols, [_short(layers[j][c]) for c in cols], fontsize=TICK_FONT, rotation=90)
        ax.set_ylabel(members[i], fontsize=LABEL_FONT)
        ax.set_xlabel(members[j], fontsize=LABEL_FONT)
        ax.set_title(f"{members[i]} vs {members[j]}", fontsize=TITLE_FONT)
    for ax in axes[len(panels):]:
        fig.delaxes(ax)
    bar = fig.colorbar(image, ax=list(axes[:len(panels)]), shrink=0.9 if nrows > 1 else 1.0)
    bar.set_label("CKA", fontsize=LABEL_FONT)
    bar.ax.tick_params(labelsize=TICK_FONT)
    kernel = f"{block.get('kernel') or 'linear'} kernel"
    if block.get("kernel") == "rbf" and block.get("bandwidth") is not None:
        kernel += f", bandwidth {block['bandwidth']:g}"
    fig.suptitle(f"minibatch CKA ({kernel})", fontsize=TITLE_FONT)
    return fig


def draw_cka_maps(block: dict, path: str | os.PathLike, pairs: str = "cross",
                  max_ticks: int = 24) -> str | os.PathLike:
    """Draws the CKA heat maps of a report's ``"representation"`` block into ``path`` (.png, .svg,
    .pdf or .jpg), written atomically.

    One panel per member pair ``(i, j)``, titled "<member i> vs <member j>": rows are member
    ``i``'s layers (the first on top), columns member ``j``'s, coloured on a fixed [0, 1] scale
    with one colorbar "CKA" for all panels. Up to three panels sit in a row; more wrap into a
    near-square grid. Each panel is ``PANEL_INCHES`` square (more past 21 tick labels) plus room
    for its tick labels.

    Args:
        block: ``report["representation"]``: ``members`` (M names), ``layers`` (M lists of layer
            names), ``cka`` (G x G, G the total number of layers, member-major), ``kernel``.
        path: where to write; the extension picks the format.
        pairs: ``"cross"`` (default): the pairs ``i < j``, which needs at least 2 members;
            ``"all"``: also each member against itself (``i == j``).
        max_ticks: most tick labels per axis; more layers are labelled at evenly spaced ones.

    Returns:
        ``path``.

    Raises:
        DivfastError: an unknown extension, a malformed block (naming the key), a bad ``pairs``
            (or ``"cross"`` with one member) or ``max_ticks``. Nothing is written then.

    Example:
        >>> import os, tempfile
        >>> block = {"kernel": "linear", "members": ["a", "b"], "layers": [["x", "y"], ["z"]],
        ...          "cka": [[1.0, 0.4, 0.7], [0.4, 1.0, 0.5], [0.7, 0.5, 1.0]]}
        >>> path = draw_cka_maps(block, os.path.join(tempfile.mkdtemp(), "cka.png"))
        >>> os.path.getsize(path) > 0
        True
    """
    check_figure_path(path)
    fig = cka_figure(block, pairs, max_ticks)
    save_figure(fig, path, dpi=DPI)
    return path
