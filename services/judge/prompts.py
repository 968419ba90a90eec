"""The judge's prompts: appendix E with an optional reference answer, and its pairwise form. Pure.

Both are built from ``shared.prompts.JUDGE_PROMPT``, so the five criteria are worded once. The pairwise
prompt follows FastChat's MT-bench pairwise judge: two responses, a verdict A, B or tie, and an explicit
warning against position and length bias; the caller asks it in both orders.
"""

from __future__ import annotations

from shared.prompts import JUDGE_PROMPT

# The template split where the request ends and the instructions begin (on the template, not on filled-in
# text, so a response that happens to contain "Instructions:" changes nothing).
_SINGLE_HEAD, _INSTRUCTIONS, _SINGLE_TAIL = JUDGE_PROMPT.partition("Instructions: ")
_CRITERIA = JUDGE_PROMPT[JUDGE_PROMPT.index("Evaluation Criteria:") : JUDGE_PROMPT.index("<User Request>")]
assert _INSTRUCTIONS and "{" not in _CRITERIA, "shared.prompts.JUDGE_PROMPT changed shape"

REFERENCE_NOTE = (
    "A reference answer written for this request is given above. Use it to check the content, accuracy and "
    "coverage of what is judged; do not require the same wording or structure.\n"
)

PAIRWISE_INTRO = (
    "You are an expert evaluator of written responses on the topic of Chinese state-owned assets and "
    "enterprises (SOEs). Compare two candidate responses to the same writing prompt and decide which one "
    "addresses the task better. Judge them on the following criteria:\n"
)
PAIRWISE_INSTRUCTIONS = (
    "Instructions: Avoid any position bias: the order in which the responses appear must not influence your "
    "decision, and neither must their length. First, provide a concise analysis comparing the two responses on "
    'the criteria. Then, deliver your verdict in strict JSON format as follows: {"Analysis": "Your analysis '
    'here.", "Winner": "A" if Response A is better, "B" if Response B is better, or "tie"}'
)


def _reference_block(reference: str | None) -> str:
    return f"<Reference Answer>{reference}</Reference Answer>\n{REFERENCE_NOTE}" if reference else ""


def judge_prompt(instruction: str, response: str, reference: str | None = None) -> str:
    """The appendix E prompt; with a reference answer between the response and the instructions."""
    head = _SINGLE_HEAD.format(instruction=instruction, response=response)
    return head + _reference_block(reference) + (_INSTRUCTIONS + _SINGLE_TAIL).format()


def pairwise_prompt(instruction: str, first: str, second: str, reference: str | None = None) -> str:
    """``first`` is shown as Response A, ``second`` as Response B."""
    request = f"<User Request>{instruction}</User Request>\n<Response A>{first}</Response A>\n<Response B>{second}</Response B>\n"
    return PAIRWISE_INTRO + _CRITERIA + request + _reference_block(reference) + PAIRWISE_INSTRUCTIONS
