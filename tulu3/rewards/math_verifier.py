r"""MATH verifier: extract the final answer, normalize it, compare with the ground truth.

Extraction order (the first that finds something wins, as in Tülu 3's "flex" matching):
1. the last complete ``\boxed{...}`` / ``\fbox{...}`` (nested braces), or ``\boxed 5``;
2. the text after the last "final answer is" (Minerva's format), inside its ``$...$`` if any;
3. the content of the last ``$...$`` (also ``$$...$$``, ``\(...\)``, ``\[...\]``);
4. the whole response when it is short (a bare answer).

Comparison, cheapest first: normalized strings (:mod:`tulu3.rewards.math_normalize`); then
structure: unions (``\cup``), matrices, intervals/tuples (ordered, bracket types must agree), sets
and bare lists (unordered); then each scalar as an exact rational (``0.5 == \frac{1}{2}``, mixed
numbers) and finally sympy equivalence (:mod:`tulu3.rewards.math_sympy`). Only one answer is taken
from a response, so listing several candidates cannot game the reward.
"""

from __future__ import annotations

import re
from collections import deque
from fractions import Fraction

from tulu3.rewards.base import VerifyResult, register_verifier
from tulu3.rewards.math_normalize import (
    matching_brace,
    normalize_answer,
    split_top_level,
)
from tulu3.rewards.math_sympy import symbolic_equal

__all__ = ["answers_match", "extract_answer", "verify_math"]

_BOX = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_BOX_TRIES = 8  # unclosed \boxed{ candidates tried from the end (bounds work on "\boxed{" * 10**4)
_FINAL = re.compile(r"final answer(?:\s+is)?\s*[:：]?\s*", re.IGNORECASE)
_HOPE = re.compile(r"\.?\s*I hope it is correct", re.IGNORECASE)
_DELIM = re.compile(r"(?<!\\)\$\$|(?<!\\)\$|\\\(|\\\)|\\\[|\\\]")
_CLOSER = {"$$": "$$", "$": "$", "\\(": "\\)", "\\[": "\\]"}
_MAX_RAW = 500  # a whole response is taken as the answer only when it is this short
_MAX_ANSWER = 1000
_MAX_ITEMS = 32  # list/tuple elements compared one by one (each may cost a sympy call)

_INT_OR_DEC = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_FRAC = re.compile(r"([+-]?)\\frac\{([+-]?\d+)\}\{([+-]?\d+)\}")
_MIXED = re.compile(r"(\d+)\\frac\{(\d+)\}\{(\d+)\}")
_MATRIX = re.compile(r"\\begin\{([pbvB]?matrix)\}(.*)\\end\{\1\}", re.DOTALL)


def _last_boxed(text: str) -> str | None:
    matches = list(_BOX.finditer(text))
    for m in reversed(matches[-_BOX_TRIES:]):
        rest = text[m.end():m.end() + 1]
        if rest == "{":
            close = matching_brace(text, m.end())
            if close >= 0:
                return text[m.end() + 1:close].strip()
        elif rest == " ":  # "\boxed 5": one token, up to whitespace or "$"
            token = re.match(r"\s*([^\s$]+)", text[m.end():m.end() + _MAX_ANSWER])
            if token:
                return token.group(1)
    return None


def _last_math_span(text: str) -> str | None:
    """The content of the last complete $...$ / $$...$$ / \\(...\\) / \\[...\\] pair."""
    last, opener, start = None, None, 0
    for m in _DELIM.finditer(text):
        token = m.group()
        if opener is None:
            if token in _CLOSER:
                opener, start = token, m.end()
        elif token == _CLOSER[opener]:
            content = text[start:m.start()].strip()
            last = content or last
            opener = None
    return last


def _final_answer(text: str) -> str | None:
    matches = deque(_FINAL.finditer(text), maxlen=1)  # keeps only the last
    if not matches:
        return None
    end = matches[0].end()
    rest = text[end:end + _MAX_ANSWER]
    rest = _HOPE.split(rest, maxsplit=1)[0].split("\n", 1)[0].strip()
    span = _last_math_span(rest)
    answer = (span if span is not None else rest).strip().rstrip(".").strip()
    return answer or None


def extract_answer(response: str) -> tuple[str | None, str]:
    """``(answer, method)``; method is "boxed", "final answer", "math span", "raw" or "none"."""
    for method, finder in (("boxed", _last_boxed), ("final answer", _final_answer),
                           ("math span", _last_math_span)):
        answer = finder(response)
        if answer:
            return answer[:_MAX_ANSWER], method
    raw = response.strip()
    if raw and len(raw) <= _MAX_RAW:
        return raw, "raw"
    return None, "none"


def _as_fraction(s: str) -> Fraction | None:
    """Exact value of a number, \\frac{a}{b} of integers, or a mixed number like 2\\frac{1}{2}."""
    if len(s) > 200:  # Python refuses int() of over 4300 digits; no MATH answer is this long
        return None
    if _INT_OR_DEC.fullmatch(s):
        return Fraction(s)
    m = _FRAC.fullmatch(s)
    if m and int(m.group(3)) != 0:
        value = Fraction(int(m.group(2)), int(m.group(3)))
        return -value if m.group(1) == "-" else value
    m = _MIXED.fullmatch(s)
    if m and 0 < int(m.group(2)) < int(m.group(3)):
        return int(m.group(1)) + Fraction(int(m.group(2)), int(m.group(3)))
    return None


def _scalar_equal(a: str, b: str) -> bool:
    if a == b:
        return True
    fa, fb = _as_fraction(a), _as_fraction(b)
    if fa is not None and fb is not None:
        return fa == fb
    return symbolic_equal(a, b)


def _unordered_equal(xs: list[str], ys: list[str]) -> bool:
    """Multiset equality, each pair compared by value (so "\\frac12, 1" equals "1, 0.5")."""
    if len(xs) != len(ys):
        return False
    if len(xs) > _MAX_ITEMS:  # too many for pairwise sympy: compare the strings only
        return sorted(xs) == sorted(ys)
    unused = list(ys)
    for x in xs:
        hit = next((i for i, y in enumerate(unused) if _equal(x, y)), None)
        if hit is None:
            return False
        unused.pop(hit)
    return True


def _matrix(s: str) -> list[list[str]] | None:
    m = _MATRIX.fullmatch(s)
    if not m:
        return None
    rows = [r for r in m.group(2).split("\\\\") if r.strip()]
    return [[c.strip() for c in r.split("&")] for r in rows]


def _sequence(s: str) -> tuple[str, list[str]] | None:
    r"""``(brackets, items)`` for "(1,2)", "[0,\infty)", "\{1,2\}" or a bare "1,2"; else None.
    brackets is the opening+closing pair ("()", "[)", "{}", "" for a bare list)."""
    if s.startswith("\\{") and s.endswith("\\}"):
        return "{}", split_top_level(s[2:-2])
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]":
        inner = s[1:-1]
        items = split_top_level(inner)
        if len(items) >= 2 and len(split_top_level(s)) == 1 and _balanced(inner):
            return s[0] + s[-1], items
    items = split_top_level(s)
    return ("", items) if len(items) >= 2 else None


def _balanced(s: str) -> bool:
    depth = 0
    for c in s:
        depth += (c in "([{") - (c in ")]}")
        if depth < 0:
            return False
    return depth == 0


def _equal(a: str, b: str) -> bool:
    """Structural equality of two normalized answers, recursing into their parts."""
    if a == b:
        return True
    ua, ub = split_top_level(a, "\\cup"), split_top_level(b, "\\cup")
    if len(ua) > 1 or len(ub) > 1:
        return _unordered_equal(ua, ub)
    ma, mb = _matrix(a), _matrix(b)
    if ma is not None or mb is not None:
        return (ma is not None and mb is not None and [len(r) for r in ma] == [len(r) for r in mb]
                and all(_equal(x, y) for ra, rb in zip(ma, mb) for x, y in zip(ra, rb)))
    sa, sb = _sequence(a), _sequence(b)
    if sa is not None or sb is not None:
        if sa is None or sb is None:
            return False
        (ka, xs), (kb, ys) = sa, sb
        if ka in ("", "{}") and kb in ("", "{}"):
            return _unordered_equal(xs, ys)
        return ka == kb and len(xs) == len(ys) and all(_equal(x, y) for x, y in zip(xs, ys))
    return _scalar_equal(a, b)


def answers_match(answer: str, ground_truth: str) -> tuple[bool, str]:
    """``(equal, how)`` for a raw extracted answer and a raw ground-truth answer."""
    a, b = normalize_answer(answer), normalize_answer(ground_truth)
    if not a or not b:
        return False, "empty answer"
    if a == b:
        return True, "string"
    if _equal(a, b):
        return True, "equivalent"
    rhs = _right_hand_side(a) if "=" not in b else None
    if rhs and (rhs == b or _equal(rhs, b)):
        return True, "right-hand side"
    return False, "different"


def _right_hand_side(answer: str) -> str | None:
    """``a+b=5`` -> ``5``: the value after the last top-level ``=`` (a bare ground truth asks for
    the value, whatever the response wrote to its left); None without one."""
    if "=" not in answer or len(split_top_level(answer)) != 1:
        return None
    rhs = answer.rsplit("=", 1)[1]
    return rhs if rhs and _balanced(rhs) else None


def _ground_truth_answer(ground_truth: str) -> str:
    """A MATH ground truth is the answer itself, or a full solution holding a \\boxed{} answer."""
    boxed = _last_boxed(ground_truth) if "\\boxed" in ground_truth or "\\fbox" in ground_truth \
        else None
    return boxed if boxed else ground_truth


@register_verifier("math")
def verify_math(response: str, ground_truth: str) -> VerifyResult:
    """Correct when the response's final answer is equivalent to the ground truth's."""
    answer, method = extract_answer(response)
    if answer is None:
        return VerifyResult(False, None, "no answer found")
    ok, how = answers_match(answer, _ground_truth_answer(ground_truth))
    return VerifyResult(ok, answer, f"{'match' if ok else 'mismatch'} ({method}, {how})")
