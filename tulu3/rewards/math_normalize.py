r"""Hendrycks/Minerva-style normalization of MATH answers to a canonical LaTeX string.

Two answers that differ only in presentation (``\dfrac12`` vs ``\frac{1}{2}``, ``5\text{ cm}`` vs
``5``, ``x = 3`` vs ``3``, ``90^\circ`` vs ``90``, ``1{,}000`` vs ``1000``) normalize to the same
string; :mod:`tulu3.rewards.math_verifier` then compares structure and values. The rules follow
Hendrycks et al.'s ``strip_string`` (MATH, 2021) and Minerva's ``normalize_final_answer``
(Lewkowycz et al., 2022), rewritten to be linear in the input length and brace-aware.
"""

from __future__ import annotations

import re

__all__ = ["matching_brace", "normalize_answer", "split_top_level", "unbox"]

# Spacing and sizing commands that carry no meaning in an answer.
# (?<!\\): in a matrix row break "1 \\ 2" the second backslash and the space are not "\ ".
_NOISE = re.compile(
    r"(?<!\\)(?:\\left(?![a-zA-Z])|\\right(?![a-zA-Z])|\\big[lr]?(?![a-zA-Z])"
    r"|\\Big[lr]?(?![a-zA-Z])|\\displaystyle|\\!|\\,|\\;|\\:|\\quad|\\qquad|\\ )|~"
)
_DEGREES = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree|°")
_UNICODE = {"\u2212": "-", "\u00d7": "\\times", "\u03c0": "\\pi", "\u221e": "\\infty",
            "\u2264": "\\le", "\u2265": "\\ge", "\u00b7": "\\cdot", "\u221a": "\\sqrt"}
# Commands whose argument is kept as plain content (\text{(A)} -> (A), \mathbf{v} -> v).
_UNWRAP = ("text", "textbf", "textrm", "textnormal", "textit", "mathrm", "mathbf", "mbox",
           "boldsymbol", "mathit", "bm")
# A unit in \text{...} at the end of a quantity: "5\text{ cm}", "4\text{ cm}^2", "3 \mbox{inches}".
_TEXT_UNIT = re.compile(
    r"\\(?:text|mbox|mathrm|textrm|textnormal)\s*\{\s*[A-Za-z][A-Za-z\s.]*\}\s*(?:\^\s*\{?\d\}?)?\s*$"
)
# Unit words after a quantity: "12 square feet", "3.5 hours", "20 dollars", "5 cm^2".
_UNIT_WORDS = re.compile(
    r"(?<=[\d}).])\s+[A-Za-z]{2,}\.?(?:\^\{?\d\}?)?(?:\s+[A-Za-z]{2,}\.?(?:\^\{?\d\}?)?)*\s*$"
)
# Left-hand sides that name the answer: x, a_1, a_{12}, f(x), \theta, k.
# A short left-hand side: x, BC (two letters, as the MATH normalization drops), x_1, f(x), \theta.
_LHS = re.compile(r"\s*(?:[A-Za-z]{1,2}(?:_\{?\w+\}?)?(?:\([A-Za-z]\))?|\\[A-Za-z]+)\s*")
_IN_SET = re.compile(r"^\s*[A-Za-z]\s*\\in\s*")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_INT_SLASH = re.compile(r"(-?)(\d+)/(\d+)")
_CHOICE = re.compile(r"\(([A-Ea-e])\)")
_BRACE_TOKENS = re.compile(r"\\.|[{}]", re.DOTALL)


def matching_brace(s: str, open_idx: int) -> int:
    """Index of the ``}`` closing the ``{`` at ``open_idx`` (``\\{``/``\\}`` skipped), or -1.

    A regex walks only escapes and braces, so this stays fast on megabyte-long responses."""
    depth = 0
    for m in _BRACE_TOKENS.finditer(s, open_idx):
        token = m.group()
        if token == "{":
            depth += 1
        elif token == "}":
            depth -= 1
            if depth == 0:
                return m.start()
    return -1


def unbox(s: str) -> str:
    r"""The content of ``\boxed{...}``/``\fbox{...}`` when it wraps the whole string, else ``s``."""
    s = s.strip()
    for cmd in ("\\boxed", "\\fbox"):
        if s.startswith(cmd):
            rest = s[len(cmd):].lstrip()
            if rest.startswith("{"):
                close = matching_brace(rest, 0)
                if close == len(rest) - 1:
                    return rest[1:close].strip()
            elif rest and s[len(cmd)] == " ":
                return rest
    return s


def _unwrap_commands(s: str) -> str:
    r"""Replace ``\text{X}`` (and friends in ``_UNWRAP``) by ``X``, innermost braces respected."""
    pattern = re.compile(r"\\(?:" + "|".join(_UNWRAP) + r")\s*\{")
    out = []
    pos = 0
    for m in pattern.finditer(s):
        if m.start() < pos:  # inside an argument we already copied (nested \text): handled below
            continue
        close = matching_brace(s, m.end() - 1)
        if close < 0:
            break
        out.append(s[pos:m.start()])
        out.append(_unwrap_commands(s[m.end():close]))
        pos = close + 1
    out.append(s[pos:])
    return "".join(out)


def split_top_level(s: str, sep: str = ",") -> list[str]:
    """Split ``s`` at ``sep`` where no (), [], {} bracket is open (``\\{`` counts as a bracket)."""
    parts, depth, start, i = [], 0, 0, 0
    n, k = len(s), len(sep)
    while i < n:
        c = s[i]
        if c == "\\" and i + 1 < n and s[i + 1] in "{}":
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            i += k
            start = i
            continue
        i += 1
    parts.append(s[start:])
    return parts


def _strip_lhs(part: str) -> str:
    """ "x = 3" -> "3"; "f(x)=2x" -> "2x"; "x \\in [1,2]" -> "[1,2]"; anything else unchanged."""
    part = _IN_SET.sub("", part)
    if part.count("=") == 1:
        lhs, rhs = part.split("=")
        if _LHS.fullmatch(lhs) and rhs.strip():
            return rhs
    return part


def _fix_sqrt(s: str) -> str:
    r"""``\sqrt3`` -> ``\sqrt{3}`` (a one-character argument, as in Hendrycks' fix_sqrt)."""
    return re.sub(r"\\sqrt([0-9a-zA-Z])", r"\\sqrt{\1}", s)


def _fix_fracs(s: str) -> str:
    r"""``\frac12`` -> ``\frac{1}{2}``, ``\frac1{72}``, ``\frac{72}1`` (Hendrycks' fix_fracs)."""
    s = re.sub(r"\\frac([0-9a-zA-Z])([0-9a-zA-Z])", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac([0-9a-zA-Z])\{", r"\\frac{\1}{", s)
    return re.sub(r"\\frac\{([^{}]*)\}([0-9a-zA-Z])", r"\\frac{\1}{\2}", s)


def _remove_spaces(s: str) -> str:
    r"""Drop whitespace, except one space that ends a command before a letter (``\pi r``)."""
    s = re.sub(r"(\\(?!sqrt|frac)[a-zA-Z]+)\s+(?=[a-zA-Z])", "\\1\x00", s)
    return re.sub(r"\s+", "", s).replace("\x00", " ")


def _expand_pm(s: str) -> str:
    r"""``1\pm\sqrt{5}`` -> ``1+\sqrt{5},1-\sqrt{5}`` (one \pm, not already a list): the two
    solutions it stands for, so it equals an answer that lists them."""
    if s.count("\\pm") != 1 or len(split_top_level(s)) != 1:
        return s
    return s.replace("\\pm", "+") + "," + s.replace("\\pm", "-")


def normalize_answer(answer: str) -> str:
    """Canonical string for a MATH answer (see the module docstring for the rules)."""
    s = unbox(answer)
    for bad, good in _UNICODE.items():
        s = s.replace(bad, good)
    s = s.replace("\n", " ")
    s = _NOISE.sub(" ", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\dbinom", "\\binom")
    s = _DEGREES.sub("", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    s = s.strip().rstrip(".").strip()
    without_unit = _TEXT_UNIT.sub("", s)
    if any(ch.isdigit() for ch in without_unit):
        s = without_unit
    s = _unwrap_commands(s)
    s = re.sub(r"\s*,?\s*\b(?:and|or)\b\s*", ",", s) if re.search(r"\b(?:and|or)\b", s) else s
    s = _UNIT_WORDS.sub("", s)
    s = ",".join(_strip_lhs(p) for p in split_top_level(s))
    s = _remove_spaces(s)
    s = s.replace("{,}", "").rstrip(".")
    s = _expand_pm(_fix_sqrt(_fix_fracs(s)))
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    s = re.sub(r"(?<![\d.])\.(\d)", r"0.\1", s)
    m = _INT_SLASH.fullmatch(s)
    if m:
        s = f"{m.group(1)}\\frac{{{m.group(2)}}}{{{m.group(3)}}}"
    m = _CHOICE.fullmatch(s)
    if m:
        s = m.group(1).upper()
    return s
