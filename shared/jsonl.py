"""JSON Lines files: the project's one reader and writer.

Query files (seed, held-out, SFT prompts) are JSONL with a non-empty
``query`` per line; run files (samples, metrics) are JSONL records.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every non-empty line as a JSON object; an error names the file and line."""
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: not JSON: {exc}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: each line must be a JSON object")
        rows.append(row)
    return rows


def read_queries(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """A query file: each line needs a non-empty ``query``; ``id`` defaults to ``q<line>``, ``lang`` to ``en``."""
    rows = read_jsonl(path)
    for number, row in enumerate(rows, 1):
        if not isinstance(row.get("query"), str) or not row["query"].strip():
            raise ValueError(f"{path}: record {number}: each line needs a non-empty 'query'")
        row.setdefault("id", f"q{number}")
        row.setdefault("lang", "en")
    return rows[:limit] if limit else rows


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Writes the file whole: a temporary name, then a rename, so a reader never sees half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
