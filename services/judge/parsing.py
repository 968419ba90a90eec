"""Judge answers (appendix E format) -> ``JudgeResult``; pairwise answers -> ``PairwiseVerdict``. Pure: no I/O.

The prompt asks for ``{"Analysis": ..., "Content Accuracy and Relevance": n, ...}``.
Real judges wrap it in a Markdown fence, add prose before or after it, emit
several objects (a draft, then the final one), use single quotes or trailing
commas, or answer in plain lines (``**Tone and Formality**: 8/10``). We try, in
order: every JSON-like object in the text, last first (the final answer wins);
then one "<criterion>: <score>" line per criterion, last occurrence each.
A score outside 1-10 is an error, never clamped. A pairwise answer is read the same way: its
``{"Analysis", "Winner"}`` object, else FastChat's ``[[A]]`` / ``[[B]]`` / ``[[C]]`` (tie) verdict.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Iterator, Mapping

from services.judge.protocol import JudgeResult, PairwiseVerdict
from shared.prompts import JUDGE_CRITERIA_KEYS
from shared.schemas import CRITERIA, JudgeCriteria

MAX_TEXT_CHARS = 200_000  # longer answers are cut before scanning (the JSON sits near the end: keep the tail)
MAX_ANALYSIS_CHARS = 8_000

ABBREVIATIONS = {  # the paper's Table 2 column names
    "CAR": "content_accuracy_relevance",
    "TF": "tone_formality",
    "IDA": "idea_development_argumentation",
    "SC": "structure_clarity",
    "PE": "persuasiveness_effectiveness",
}
_ANALYSIS_KEYS = {"analysis", "overallanalysis", "evaluation", "reasoning", "explanation", "comment", "comments"}


class JudgeParseError(ValueError):
    """The answer holds no usable judgement; the message says why."""


def _norm(key: str) -> str:
    return re.sub(r"[^a-z0-9]", "", key.lower().replace("&", "and"))


# normalized key -> criterion field: display names ("Tone and Formality", "Tone & Formality"),
# field names ("tone_formality"), display names without "and", abbreviations.
_KEY_TO_FIELD: dict[str, str] = {}
for _display, _field in JUDGE_CRITERIA_KEYS.items():
    _KEY_TO_FIELD[_norm(_display)] = _field
    _KEY_TO_FIELD[_norm(_display.replace(" and ", " "))] = _field
    _KEY_TO_FIELD[_norm(_field)] = _field
for _abbr, _field in ABBREVIATIONS.items():
    _KEY_TO_FIELD[_norm(_abbr)] = _field


def judgement_json_schema(analysis_max_chars: int = 0) -> dict:
    """JSON schema of the appendix E answer, for ``response_format`` (keys in the prompt's order).

    Scores are an ``enum`` of 1..10 (integer ranges are not supported by every
    structured-output backend); ``maxLength`` bounds the analysis so a
    constrained decoder cannot run out of tokens inside the string.
    """
    analysis: dict = {"type": "string"}
    if analysis_max_chars:
        analysis["maxLength"] = analysis_max_chars
    properties = {"Analysis": analysis}
    for display in JUDGE_CRITERIA_KEYS:
        properties[display] = {"type": "integer", "enum": list(range(1, 11))}
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def pairwise_json_schema(analysis_max_chars: int = 0) -> dict:
    """JSON schema of the pairwise answer, for ``response_format``."""
    analysis: dict = {"type": "string"}
    if analysis_max_chars:
        analysis["maxLength"] = analysis_max_chars
    properties = {"Analysis": analysis, "Winner": {"type": "string", "enum": ["A", "B", "tie"]}}
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


_WINNER_KEYS = {"winner", "verdict", "better", "betterresponse", "choice"}
_WINNER_VALUES = {"a": "A", "responsea": "A", "b": "B", "responseb": "B", "c": "tie", "tie": "tie", "draw": "tie"}
_BRACKET_VERDICT = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)


def parse_pairwise(text: str | None, max_analysis_chars: int = MAX_ANALYSIS_CHARS) -> PairwiseVerdict:
    """The verdict in ``text`` (the last one wins, as for scores); raises JudgeParseError saying why not."""
    if not text or not text.strip():
        raise JudgeParseError("empty answer")
    text = strip_reasoning(text)[-MAX_TEXT_CHARS:]
    problems = []
    for obj in reversed(list(json_objects(text))):
        fields = {_norm(str(k)): v for k, v in obj.items()}
        given = next((fields[k] for k in fields if k in _WINNER_KEYS), None)
        if given is None:
            problems.append("JSON object has no Winner")
            continue
        winner = _WINNER_VALUES.get(_norm(str(given)))
        if winner is None:
            problems.append(f"Winner = {str(given)[:40]!r} is not A, B or tie")
            continue
        analysis = next((v for k, v in fields.items() if k in _ANALYSIS_KEYS and isinstance(v, str)), "")
        return PairwiseVerdict(winner=winner, analysis=analysis.strip()[:max_analysis_chars])
    verdicts = list(_BRACKET_VERDICT.finditer(text))
    if verdicts:
        last = verdicts[-1]
        winner = _WINNER_VALUES[_norm(last.group(1))]
        return PairwiseVerdict(winner=winner, analysis=text[: last.start()].strip()[:max_analysis_chars])
    problems.append("no JSON object with a Winner and no [[A]], [[B]] or [[C]] verdict")
    raise JudgeParseError("; ".join(dict.fromkeys(problems))[:500])


def parse_judgement(text: str | None, max_analysis_chars: int = MAX_ANALYSIS_CHARS) -> JudgeResult:
    """The judgement in ``text``; raises JudgeParseError naming what is missing or wrong."""
    if not text or not text.strip():
        raise JudgeParseError("empty answer")
    text = strip_reasoning(text)[-MAX_TEXT_CHARS:]
    problems: list[str] = []
    for obj in reversed(list(json_objects(text))):
        try:
            return _from_mapping(obj, max_analysis_chars)
        except JudgeParseError as exc:
            problems.append(str(exc))
    try:
        return _from_lines(text, max_analysis_chars)
    except JudgeParseError as exc:
        problems.append(str(exc))
    raise JudgeParseError("; ".join(dict.fromkeys(problems))[:500])


def strip_reasoning(text: str) -> str:
    """Drops ``<think>...</think>`` blocks of reasoning models (their drafts are not the answer)."""
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL | re.IGNORECASE)
    if re.search(r"</think>", text, re.IGNORECASE):  # template opened the block in the prompt
        text = re.split(r"</think>", text, flags=re.IGNORECASE)[-1]
    return text


def json_objects(text: str) -> Iterator[dict]:
    """Every outermost ``{...}`` span that reads as a mapping, in text order.

    Each span is tried as JSON (control characters allowed inside strings),
    then as JSON without trailing commas, then as a Python literal (single quotes).
    An unbalanced ``{`` is skipped, so a stray brace in prose does not hide the answer.
    """
    start = text.find("{")
    while start != -1:
        end = _matching_brace(text, start)
        if end is None:
            start = text.find("{", start + 1)
            continue
        obj = _load_mapping(text[start : end + 1])
        if obj is not None:
            yield obj
            start = text.find("{", end + 1)
        else:
            start = text.find("{", start + 1)


def _matching_brace(text: str, start: int) -> int | None:
    depth, quote, escaped = 0, "", False
    for i in range(start, len(text)):
        ch = text[i]
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            # an apostrophe inside a word (don't, SOE's) is prose, not a quote
            if ch == "'" and 0 < i < len(text) - 1 and text[i - 1].isalnum() and text[i + 1].isalnum():
                continue
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def _load_mapping(snippet: str) -> dict | None:
    attempts = (
        lambda s: json.loads(s, strict=False),
        lambda s: json.loads(re.sub(r",\s*([}\]])", r"\1", s), strict=False),
        ast.literal_eval,
    )
    for load in attempts:
        try:
            value = load(snippet)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, dict):
            return value
    return None


def _from_mapping(obj: Mapping, max_analysis_chars: int) -> JudgeResult:
    flat: dict = {}
    for key, value in obj.items():  # one level of nesting: {"scores": {...}, "analysis": ...}
        if isinstance(value, Mapping) and not _is_score_object(value):
            flat.update(value)
        else:
            flat[key] = value
    scores, analysis = {}, ""
    for key, value in flat.items():
        norm = _norm(str(key))
        if norm in _KEY_TO_FIELD:
            scores[_KEY_TO_FIELD[norm]] = value
        elif norm in _ANALYSIS_KEYS and isinstance(value, str):
            analysis = value
    if not scores:
        raise JudgeParseError("JSON object has none of the five criteria")
    missing = [f for f in CRITERIA if f not in scores]
    if missing:
        raise JudgeParseError(f"JSON object lacks criteria: {', '.join(missing)}")
    return _result({f: score_value(f, scores[f]) for f in CRITERIA}, analysis, max_analysis_chars)


def _is_score_object(value: Mapping) -> bool:
    return any(_norm(str(k)) == "score" for k in value)


_NUMBER_RE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*10|out\s+of\s+10)?\s*$", re.IGNORECASE)


def score_value(field: str, value: object) -> int:
    """One criterion's score as an int in 1-10: numbers, "8", "8/10", {"score": 8}; .5 rounds up."""
    if isinstance(value, Mapping):
        inner = [v for k, v in value.items() if _norm(str(k)) == "score"]
        if inner:
            return score_value(field, inner[0])
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str) and (match := _NUMBER_RE.match(value)):
        number = float(match.group(1))
    if number is None or not math.isfinite(number):
        raise JudgeParseError(f"{field} is not a number: {str(value)[:40]!r}")
    if not 1 <= number <= 10:
        raise JudgeParseError(f"{field} = {number:g} is outside 1-10")
    return int(math.floor(number + 0.5))


def _name_regex(name: str) -> str:
    """Regex for a criterion name: "Tone and Formality" also matches "Tone & Formality", "tone_formality"."""
    words = [w for w in re.split(r"[\s_]+", name) if w]
    out = ""
    for i, word in enumerate(words):
        if word.lower() == "and":
            out += r"(?:(?:and|&)[\s_]*)?"
        else:
            out += re.escape(word) + (r"[\s_]*" if i < len(words) - 1 else "")
    return out


def _criterion_pattern(field: str) -> re.Pattern:
    names = [d for d, f in JUDGE_CRITERIA_KEYS.items() if f == field] + [field]
    names += [a for a, f in ABBREVIATIONS.items() if f == field]
    names_re = "|".join(_name_regex(n) for n in names)
    return re.compile(
        rf"\b(?:{names_re})\b[\s*\"'`]*(?:\([^)\n]{{0,20}}\))?[\s*\"'`]*(?:score)?\s*(?:[:：=\-–—]|is)\s*[*\"'`]*\s*"
        r"(-?\d+(?:\.\d+)?)\s*(?:/\s*10|out\s+of\s+10)?",
        re.IGNORECASE,
    )


_PATTERNS = {field: _criterion_pattern(field) for field in CRITERIA}


def _from_lines(text: str, max_analysis_chars: int) -> JudgeResult:
    found: dict[str, re.Match] = {}
    for field, pattern in _PATTERNS.items():
        matches = list(pattern.finditer(text))
        if matches:
            found[field] = matches[-1]
    if not found:
        raise JudgeParseError("no JSON object and no '<criterion>: <score>' lines")
    missing = [f for f in CRITERIA if f not in found]
    if missing:
        raise JudgeParseError(f"no score found for: {', '.join(missing)}")
    scores = {f: score_value(f, m.group(1)) for f, m in found.items()}
    first = min(m.start() for m in found.values())
    analysis = re.sub(r"^\W*analysis\W*", "", text[:first].strip(), flags=re.IGNORECASE)
    analysis = analysis.rstrip(" \t\n*#>-(")  # markdown that opened the first criterion line
    return _result(scores, analysis, max_analysis_chars)


def _result(scores: dict[str, int], analysis: str, max_analysis_chars: int) -> JudgeResult:
    # paper 4.1: the final score is the mean of the five criteria x 10 (0-100 scale)
    score = sum(scores[f] for f in CRITERIA) / len(CRITERIA) * 10
    return JudgeResult(criteria=JudgeCriteria(**scores), analysis=analysis.strip()[:max_analysis_chars], score=score)
