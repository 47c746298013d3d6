"""The audit report: the paper's tables and figures from the fairness views, as one HTML file and a Markdown folder.

``build_report(store, out_dir, ...)`` is the entry point (the ``embedkit report`` command, the demo and studies call
it); matplotlib is imported only when figures are drawn.
"""

from embedkit.report.build import build_report

__all__ = ["build_report"]
