"""A gallery of one image under every corruption at a few severities (``divfast corrupt --gallery``)."""

from __future__ import annotations

import torch

from divfast.errors import DivfastError
from divfast.report.figure import check_figure_path, image_grid

DEFAULT_SEVERITIES = (2.0, 4.0, 6.0, 8.0, 10.0)


def sample_photo(size: int = 224) -> torch.Tensor:
    """A real photograph shipped with scikit-learn (``china.jpg``), Resize/CenterCrop'd to ``size``:
    uint8 (3, size, size). Offline, so the gallery works without any data."""
    from sklearn.datasets import load_sample_image
    from torchvision.transforms import functional as TF

    photo = torch.from_numpy(load_sample_image("china.jpg").copy()).permute(2, 0, 1)  # (3, 427, 640)
    photo = TF.resize(photo, int(round(size * 256 / 224)), antialias=True)
    return TF.center_crop(photo, size)


def draw_gallery(image: torch.Tensor, path: str, severities=DEFAULT_SEVERITIES, seed: int = 0,
                 corruptions: list[str] | None = None, key: int | str = 0) -> None:
    """Draws ``image`` (3, H, W) uint8 clean and under each corruption (rows) at each severity
    (columns) into ``path`` (.png, .svg, .pdf or .jpg), written atomically."""
    from divfast.corruptions import check_severity, corrupt, list_corruptions

    severities = [check_severity(s, option="--severities") for s in severities]
    if not severities:
        raise DivfastError("--severities: expected at least one severity")
    names = corruptions or list_corruptions()
    check_figure_path(path, "--gallery")
    batch = image.unsqueeze(0)
    cells = [[image] + [corrupt(batch, name, s, seed=seed, keys=[key])[0] for s in severities]
             for name in names]
    image_grid(cells, path, ["clean", *(f"severity {s:g}" for s in severities)],
               [name.replace("_", " ") for name in names], f"divfast corruptions (seed {seed})",
               option="--gallery", title_inches=0.0)
