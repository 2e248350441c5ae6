r"""Symbolic equivalence of two normalized MATH answers with sympy, guarded against hostile input.

Model text never reaches ``eval``/``exec``: answers are parsed only by sympy's LaTeX parser
(``sympy.parsing.latex.parse_latex``, an ANTLR grammar), never by ``sympify``/``parse_expr`` (which
``eval`` a transformed string). The one ``sympify`` on that path is the grammar's own: it hands a
NUMBER token (digits, "." and ",") to ``sympy.Number``. Parsing runs with evaluation off, and the
unevaluated tree is checked before anything is computed, so ``9^{9^{9^{9}}}`` or ``100000!`` are
rejected instead of computed:

- the string: at most ``MAX_CHARS`` characters, bracket nesting at most ``MAX_DEPTH`` (the parser
  and sympy recurse per level), digit runs at most ``MAX_DIGITS``;
- the tree: at most ``MAX_NODES`` nodes, no integrals, sums, limits or derivatives, every numeric
  power below 10^``MAX_LOG10`` in magnitude with an exponent of at most ``MAX_EXPONENT``, and
  factorials/binomials of at most ``MAX_FACTORIAL``.

``simplify`` can still be slow on a legal expression; the hard time limit comes from the worker pool
(:mod:`tulu3.rewards.sandbox`), which runs every verification in a killable process.
sympy is imported on first use so ``import tulu3.rewards`` stays light in the trainer process.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

__all__ = ["MAX_CHARS", "parse_guarded", "symbolic_equal"]

MAX_CHARS = 256
MAX_DEPTH = 16
MAX_DIGITS = 64
MAX_NODES = 400
MAX_EXPONENT = 1000
MAX_LOG10 = 400
MAX_FACTORIAL = 200

_DIGIT_RUN = re.compile(rf"\d{{{MAX_DIGITS + 1},}}")


@functools.lru_cache(maxsize=1)
def _sympy() -> Any:
    """Import sympy and its LaTeX parser once; parse a constant so that the parser's lazy imports
    (sympy.physics.units among them) happen outside ``evaluate(False)``, where they fail."""
    import sympy
    from sympy.parsing.latex import parse_latex

    parse_latex("1")
    return sympy


def _nesting_depth(s: str) -> int:
    depth = best = 0
    for c in s:
        if c in "([{":
            depth += 1
            best = max(best, depth)
        elif c in ")]}":
            depth -= 1
    return best


def _numeric(expr: Any) -> complex | None:
    """``expr`` as a complex number when it has no free symbols and evaluates finitely, else None.
    Only called on subtrees that already passed the checks, so evalf is cheap."""
    if expr.free_symbols:
        return None
    try:
        value = complex(expr.evalf(15))
    except (TypeError, ValueError, OverflowError, ZeroDivisionError):
        return None
    return value if math.isfinite(value.real) and math.isfinite(value.imag) else None


def _pow_ok(base: Any, exp: Any) -> bool:
    e = _numeric(exp)
    if e is None:
        return True  # symbolic exponent: nothing is computed from it
    if abs(e) > MAX_EXPONENT:
        return False
    b = _numeric(base)
    if b is None or abs(b) in (0.0, 1.0):
        return True
    return abs(e.real) * abs(math.log10(abs(b))) <= MAX_LOG10


def _tree_ok(expr: Any, sp: Any) -> bool:
    """Children before parents (postorder), so each check only evaluates checked subtrees."""
    forbidden = (sp.Integral, sp.Sum, sp.Product, sp.Limit, sp.Derivative)
    for count, node in enumerate(sp.postorder_traversal(expr)):
        if count > MAX_NODES or isinstance(node, forbidden):
            return False
        if isinstance(node, sp.Pow) and not _pow_ok(*node.args):
            return False
        if isinstance(node, (sp.factorial, sp.factorial2, sp.binomial, sp.gamma)):
            n = _numeric(node.args[0])
            if n is not None and abs(n) > MAX_FACTORIAL:
                return False
    return True


def _string_ok(s: str) -> bool:
    return 0 < len(s) <= MAX_CHARS and _nesting_depth(s) <= MAX_DEPTH and not _DIGIT_RUN.search(s)


@functools.lru_cache(maxsize=4096)
def parse_guarded(s: str) -> Any | None:
    """The sympy expression for the LaTeX string ``s``, or None when it is unparseable or breaks a
    limit. Cached: in RLVR many samples share one ground truth."""
    if not _string_ok(s):
        return None
    sp = _sympy()
    from sympy.parsing.latex import parse_latex

    try:
        with sp.evaluate(False):
            expr = parse_latex(s, strict=True)
        if not _tree_ok(expr, sp):
            return None
        # The grammar reads \pi, e and i as plain symbols; give them their mathematical meaning
        # on both sides alike.
        consts = {sp.Symbol("pi"): sp.pi, sp.Symbol("e"): sp.E, sp.Symbol("i"): sp.I}
        return expr.xreplace(consts)
    except Exception:  # noqa: BLE001 - any parser/sympy failure (RecursionError too): no value
        return None


def _difference(a: Any, b: Any, sp: Any) -> Any | None:
    """``a - b``, or for two equations the difference of their (lhs - rhs) forms."""
    a_eq, b_eq = isinstance(a, sp.Equality), isinstance(b, sp.Equality)
    if a_eq != b_eq:
        return None
    if a_eq:
        return (a.lhs - a.rhs) - (b.lhs - b.rhs)
    if isinstance(a, sp.core.relational.Relational) or isinstance(b, sp.core.relational.Relational):
        return None
    return a - b


# Points where a difference is evaluated before simplify: irrational-looking values, so that a
# wrong answer does not vanish there by accident. Fixed, so a reward never changes between runs.
_PROBES = (0.7236067977, 1.4142135623 + 0.31, 2.7182818284 - 0.5)


def _numerically_nonzero(diff: Any, sp: Any) -> bool:
    """True when ``diff`` is clearly non-zero at a probe point. ``simplify`` costs 10-1000 ms,
    and most wrong answers are told apart here in about a millisecond. False means "unknown"."""
    symbols = sorted(diff.free_symbols, key=str)
    for k, probe in enumerate(_PROBES):
        point = {s: sp.Float(probe + 0.1 * j * (k + 1)) for j, s in enumerate(symbols)}
        try:
            value = complex(diff.xreplace(point).evalf(30))
        except (TypeError, ValueError, OverflowError, ZeroDivisionError):
            continue  # undefined there (a pole, an unknown function): try another point
        if math.isfinite(abs(value)) and abs(value) > 1e-9:
            return True
    return False


def symbolic_equal(a: str, b: str) -> bool:
    """True when the normalized answers ``a`` and ``b`` parse and ``simplify(a - b) == 0``."""
    x, y = parse_guarded(a), parse_guarded(b)
    if x is None or y is None:
        return False
    sp = _sympy()
    try:
        diff = _difference(x, y, sp)
        if diff is None or _numerically_nonzero(diff, sp):
            return False
        return sp.simplify(diff) == 0
    except Exception:  # noqa: BLE001 - sympy raises many types on odd input: "not equal"
        return False
