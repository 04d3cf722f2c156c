"""Writing figures: one format check and one atomic save for every plot divfast draws."""

from __future__ import annotations

from divfast.errors import DivfastError

FIGURE_FORMATS = {"png": "png", "svg": "svg", "pdf": "pdf", "jpg": "jpeg", "jpeg": "jpeg"}


def check_figure_path(path: str, option: str = "path") -> str:
    """The matplotlib format for ``path`` from its extension (.png, .svg, .pdf, .jpg), or an error
    naming ``option``."""
    ext = str(path).rsplit(".", 1)[-1].lower() if "." in str(path) else ""
    if ext not in FIGURE_FORMATS:
        raise DivfastError(f"{option}: expected a .png, .svg, .pdf or .jpg path, got {str(path)!r}")
    return FIGURE_FORMATS[ext]


def save_figure(fig, path: str, option: str = "path", dpi: int = 100) -> None:
    """Saves ``fig`` to ``path`` atomically (a failed run leaves no half-written file), then closes it."""
    import matplotlib.pyplot as plt

    from divfast.io import atomic_path

    fmt = check_figure_path(path, option)
    try:
        with atomic_path(str(path)) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi)
    finally:
        plt.close(fig)


def image_grid(cells, path: str, col_titles: list[str], row_labels: list[str] | None = None,
               title: str | None = None, option: str = "path", cell_inches: float = 1.6,
               title_inches: float = 0.3, dpi: int = 100) -> None:
    """Draws rows of images into ``path``: ``cells[r][c]`` a ``(3, H, W)`` tensor (uint8, or float
    in [0, 1]); columns titled ``col_titles`` on the first row, rows labelled ``row_labels``. The
    figure is ``cell_inches`` per image plus ``title_inches`` for the title, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    check_figure_path(path, option)
    rows, cols = len(cells), len(cells[0])
    height = cell_inches * rows + title_inches
    fig, axes = plt.subplots(rows, cols, squeeze=False, figsize=(cell_inches * cols, height))
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            ax = axes[r][c]
            ax.imshow(cell.detach().cpu().permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col_titles[c], fontsize=8)
        if row_labels is not None:
            axes[r][0].set_ylabel(row_labels[r], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - max(title_inches, 0.35) / height))
    save_figure(fig, path, option, dpi=dpi)
