"""The files every `grace bench` writes: JSON (the record), a Markdown table (the README's), a PNG (a glance)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def write_json(path: Path, data: Any, indent: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent))
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_markdown(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Writes the table (with a final newline) and returns it, for printing."""
    table = markdown_table(header, rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table + "\n")
    return table


def save_figure(path: Path, draw: Callable[[Any], None], figsize: tuple[float, float] = (6, 3.5)) -> bool:
    """``draw(ax)`` on one Agg figure saved at 120 dpi. The plot is a convenience: a failure is logged, not
    raised, so it never loses the JSON and the table already written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=figsize)
        try:
            draw(ax)
            fig.tight_layout()
            fig.savefig(path, dpi=120)
        finally:
            plt.close(fig)
        return True
    except Exception as exc:
        log.warning("event=bench_plot_failed path=%s error=%s", path, exc)
        return False
