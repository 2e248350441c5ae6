"""GSM8K verifier: the last number in the response equals the ground-truth number.

This is the Tülu 3 / open-instruct rule ("last number of the answer"), made robust where the
original was not: a leading minus sign is kept (open-instruct dropped it, so "-5" matched "5"),
thousands (and Indian lakh) separators, "$", units and a trailing period are handled, and numbers
compare by value (``5.0 == 5``, ``1,000 == 1000``, ``1,23,456 == 123456``). The ground truth
may be the bare answer ("72") or a full GSM8K solution ending with ``#### 72``.
"""

from __future__ import annotations

import re
from collections import deque
from decimal import Decimal, InvalidOperation

from tulu3.rewards.base import VerifyResult, register_verifier

__all__ = ["extract_last_number", "parse_ground_truth", "verify_gsm8k"]

# An unsigned number: 1,234,567 or the Indian 1,23,456 / 12,34,56,789 (two-digit groups before the
# last three; any other grouping, like "1,2", is two numbers) or 1234, with an optional decimal
# part, or a bare decimal like .5. A sign and "$" are looked at separately below.
_NUMBER = re.compile(r"(?:\d{1,2}(?:,\d{2})+,\d{3}(?!\d)|\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
                     r"(?:\.\d+)?|\.\d+")
_MINUS = "-\u2212"  # ASCII hyphen-minus and the Unicode minus sign (en dash means a range: no).
# A minus right before a number is a sign unless it follows an operand ("10-5", "x-5", "(2)-5").
_OPERAND_END = re.compile(r"[\w)\]}]")
# The last number almost always sits near the end; scanning a tail first keeps 1 MB responses
# cheap, and the full scan is the fallback when the tail has no digits.
_TAIL = 4096


def _signed(text: str, match: re.Match) -> str:
    """The number of ``match`` with its sign when a minus (optionally before a "$") precedes it."""
    digits = match.group().replace(",", "")
    i = match.start()
    if i > 0 and text[i - 1] == "$":
        i -= 1
    if i > 0 and text[i - 1] in _MINUS:
        before = text[i - 2] if i >= 2 else ""
        if not (before and _OPERAND_END.match(before)):
            return "-" + digits
    return digits


def extract_last_number(text: str) -> str | None:
    """The last number in ``text`` as a plain string ("-1234.5"), or None when there is none."""
    start = max(0, len(text) - _TAIL)
    for lo in (start, 0) if start else (0,):
        last = deque(_NUMBER.finditer(text, lo), maxlen=1)  # the last match, in O(1) memory
        if last:
            return _signed(text, last[0])
    return None


def _to_decimal(number: str) -> Decimal | None:
    try:
        return Decimal(number)
    except InvalidOperation:
        return None


def parse_ground_truth(ground_truth: str) -> Decimal:
    """The answer of a GSM8K ground truth: "72", "1,000", "-3" or a solution ending "#### 72"."""
    text = ground_truth.rsplit("####", 1)[-1].strip()
    value = _to_decimal(text.replace(",", "").replace("$", "").rstrip("."))
    if value is None:
        number = extract_last_number(text)
        value = _to_decimal(number) if number is not None else None
    if value is None:
        raise ValueError(f"GSM8K ground truth has no number: {ground_truth[:80]!r}")
    return value


@register_verifier("gsm8k")
def verify_gsm8k(response: str, ground_truth: str) -> VerifyResult:
    """Correct when the last number of ``response`` equals the ground truth's number by value."""
    target = parse_ground_truth(ground_truth)
    number = extract_last_number(response)
    if number is None:
        return VerifyResult(False, None, "no number in response")
    value = _to_decimal(number)
    correct = value is not None and value == target
    return VerifyResult(correct, number, "match" if correct else f"mismatch: expected {target}")
