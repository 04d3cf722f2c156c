"""Reports: JSON documents and their renderings (tables; figures such as the attribution grid and
the CKA heat maps, the sweep's bubble plots and trend lines)."""

from divfast.report.attribution_grid import draw_attribution_grid, saliency_masked
from divfast.report.cka_maps import draw_cka_maps
from divfast.report.compare_plots import comparison_plot
from divfast.report.sweep_plots import bubble_plot, correlation_table, trend_plot
from divfast.report.table import render_accuracy_by_dataset, render_comparison, render_eval

__all__ = ["bubble_plot", "comparison_plot", "correlation_table", "draw_attribution_grid",
           "draw_cka_maps", "render_accuracy_by_dataset", "render_comparison", "render_eval",
           "saliency_masked", "trend_plot"]
