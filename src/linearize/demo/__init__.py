"""The main job (``linearize demo``): a real LLM linearized, trained back, sped up, reported."""

from linearize.demo.pipeline import DemoConfig, DemoReport, run_demo
from linearize.demo.report import render_markdown, summary_rows, write_report

__all__ = [
    "DemoConfig",
    "DemoReport",
    "render_markdown",
    "run_demo",
    "summary_rows",
    "write_report",
]
