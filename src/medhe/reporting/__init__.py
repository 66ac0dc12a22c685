"""``medhe report``: evaluation JSON (docs/reports.md) -> Markdown with PNG plots. Needs matplotlib (Agg)."""

from medhe.reporting.markdown import write_report

__all__ = ["write_report"]
