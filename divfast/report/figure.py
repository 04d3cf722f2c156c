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
