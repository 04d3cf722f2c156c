"""Reports: JSON documents and their renderings (tables; figures such as the attribution grid and
the CKA heat maps)."""

from divfast.report.attribution_grid import draw_attribution_grid, saliency_masked
from divfast.report.cka_maps import draw_cka_maps
from divfast.report.table import render_accuracy_by_dataset, render_eval

__all__ = ["draw_attribution_grid", "draw_cka_maps", "render_accuracy_by_dataset", "render_eval",
           "saliency_masked"]
