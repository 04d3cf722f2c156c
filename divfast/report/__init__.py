"""Reports: JSON documents and their renderings (tables; plots in later modules)."""

from divfast.report.table import render_accuracy_by_dataset, render_eval

__all__ = ["render_accuracy_by_dataset", "render_eval"]
