"""The attribution grid (paper Figure 11): each sample's input, then every member's saliency-masked
image, so one sees where each member looks and how far the members disagree.

The masking rule (:func:`saliency_masked`): member ``m``'s mask of image ``n`` is the largest
absolute attribution over the colour channels at each pixel, divided by that map's largest value,
so every mask spans [0, 1] on its own (a mask of all zeros stays zero); the masked image is the
image times its mask, pixel by pixel, in every channel. Scaling each map by its own maximum makes
the figure the same under every per-map normalisation (``--attribution-normalize``): it shows
where a member looks, not how strongly.
"""

from __future__ import annotations

import torch

from divfast.errors import DivfastError
from divfast.report.figure import check_figure_path, image_grid

CELL_INCHES = 1.6  # each image's cell; the figure is CELL_INCHES x (M + 1) wide
TITLE_INCHES = 0.3  # room for the figure title above the rows
DPI = 100


def saliency_masked(images: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Every member's saliency-masked copy of every image (the rule in the module docstring).

    Args:
        images: ``(N, 3, H, W)`` in [0, 1] (values outside are clamped).
        maps: ``(M, N, C, H, W)`` attributions of those images (any sign; ``|.|`` is taken).

    Returns:
        ``(M, N, 3, H, W)`` float32 in [0, 1].
    """
    mask = maps.detach().float().abs().amax(dim=2, keepdim=True)  # (M, N, 1, H, W)
    peak = mask.amax(dim=(3, 4), keepdim=True)  # (M, N, 1, 1, 1)
    mask = torch.where(peak > 0, mask / peak.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    return images.detach().float().clamp(0, 1)[None] * mask  # (M, N, 3, H, W)


def _check_shapes(images: torch.Tensor, maps: torch.Tensor, member_names) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise DivfastError(f"images: expected (N, 3, H, W), got {shape}")
    n, _, h, w = images.shape
    if n == 0:
        raise DivfastError("images: expected at least one image")
    if (not isinstance(maps, torch.Tensor) or maps.ndim != 5 or maps.shape[1] != n
            or tuple(maps.shape[3:]) != (h, w)):
        shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise DivfastError(f"maps: expected (M, {n}, C, {h}, {w}) for images {tuple(images.shape)},"
                           f" got {shape}")
    if maps.shape[0] == 0:
        raise DivfastError("maps: expected at least one member")
    if len(member_names) != maps.shape[0]:
        raise DivfastError(f"member_names: expected {maps.shape[0]} names (one per member), got "
                           f"{len(member_names)}")
    if not bool(torch.isfinite(maps).all()):
        raise DivfastError("maps: contains NaN or infinite values")


def draw_attribution_grid(images: torch.Tensor, maps: torch.Tensor, member_names: list[str],
                          path: str, row_labels: list[str] | None = None,
                          title: str | None = None) -> None:
    """Draws the grid into ``path`` (.png, .svg or .pdf), written atomically.

    One row per sample: the input image, then one column per member with its saliency-masked
    image (:func:`saliency_masked`); columns are titled "input" and the member names. A PNG is
    ``DPI * CELL_INCHES * (M + 1)`` pixels wide and ``DPI * (CELL_INCHES * N + TITLE_INCHES)`` high.

    Args:
        images: ``(N, 3, H, W)`` in [0, 1].
        maps: ``(M, N, C, H, W)``: member ``m``'s map of image ``n`` is ``maps[m, n]``.
        member_names: M column titles.
        path: where to write; the extension picks the format.
        row_labels: optional N labels beside the rows (e.g. the true classes).
        title: optional figure title.

    Raises:
        DivfastError: shapes that disagree, non-finite maps, an unknown extension.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "grid.png")
        >>> images, maps = torch.rand(2, 3, 8, 8), torch.rand(3, 2, 3, 8, 8)  # N = 2, M = 3
        >>> draw_attribution_grid(images, maps, ["a", "b", "c"], path)
        >>> os.path.getsize(path) > 0
        True
    """
    check_figure_path(path)
    _check_shapes(images, maps, member_names)
    if row_labels is not None and len(row_labels) != images.shape[0]:
        raise DivfastError(f"row_labels: expected {images.shape[0]} labels (one per image), got "
                           f"{len(row_labels)}")
    masked = saliency_masked(images.cpu(), maps.cpu())  # (M, N, 3, H, W)
    cells = [[images[r].detach().float().cpu().clamp(0, 1)] + [masked[m, r] for m in range(maps.shape[0])]
             for r in range(images.shape[0])]
    image_grid(cells, path, ["input", *member_names], row_labels,
               title or "attribution maps (saliency-masked inputs)", cell_inches=CELL_INCHES,
               title_inches=TITLE_INCHES, dpi=DPI)
