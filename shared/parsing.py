"""Response extraction (paper 3.3) and parsing of generated query lists (3.2).

Nothing here evaluates model output as code: lists are read with
``ast.literal_eval`` (literals only) or ``json``.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass

TAGS = ("summary", "outline", "answer")
_TAG_RE = {t: re.compile(rf"<\s*{t}\s*>(.*?)<\s*/\s*{t}\s*>", re.IGNORECASE | re.DOTALL) for t in TAGS}


@dataclass(frozen=True)
class StructuredResponse:
    summary: str
    outline: str
    answer: str


def extract_structured(text: str | None) -> StructuredResponse | None:
    """The three tagged parts, stripped; None (unparsed) if any is missing or empty."""
    if not text:
        return None
    parts = {}
    for tag, pattern in _TAG_RE.items():
        match = pattern.search(text)
        if match is None or not match.group(1).strip():
            return None
        parts[tag] = match.group(1).strip()
    return StructuredResponse(**parts)


_LIST_RE = re.compile(r"\[.*\]", re.DOTALL)
_NUMBERED_RE = re.compile(r"^\s*(?:query\s*#?\s*\d+\s*[:：]|\d+\s*[.)、:：]|[-*•])\s*(.+?)\s*$", re.IGNORECASE)


def _strings(value: object) -> list[str] | None:
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def parse_query_list(text: str) -> list[str]:
    """Queries from a generator's answer: a Python list literal, a JSON list, or numbered lines.

    Tries, in order: every bracketed span (outermost first) as a Python literal
    then as JSON; then ``1. ...`` / ``- ...`` / ``query #1: ...`` lines.
    Returns stripped, non-empty strings with exact duplicates removed (order kept).
    """
    text = text or ""
    candidates: list[str] = []
    for fence in re.findall(r"```(?:python|json|py)?\s*(.*?)```", text, re.DOTALL):
        candidates.append(fence)
    candidates.append(text)
    for candidate in candidates:
        start = candidate.find("[")
        while start != -1:
            end = candidate.rfind("]")
            while end > start:
                snippet = candidate[start : end + 1]
                for loader in (ast.literal_eval, json.loads):
                    try:
                        found = _strings(loader(snippet))
                    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                        found = None
                    if found is not None and found:
                        return _dedupe(found)
                end = candidate.rfind("]", start, end)
            start = candidate.find("[", start + 1)
    lines = [m.group(1) for line in text.splitlines() if (m := _NUMBERED_RE.match(line))]
    lines = [line.strip().strip("\"'“”‘’,，") for line in lines]
    return _dedupe(lines)


def _dedupe(items: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for item in items:
        item = item.strip()
        if item and item not in seen:
            seen.add(item)
            out.append(item)
    return out


def normalize_query(query: str) -> str:
    """Key for dedupe against earlier queries: case- and whitespace-insensitive."""
    return re.sub(r"\s+", " ", query).strip().lower()
