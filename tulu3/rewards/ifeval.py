"""IFEval verifier: read the constraints of a ground truth, check every one on the response.

Two ground-truth forms map onto the same 25 checkers (:mod:`tulu3.rewards.ifeval_constraints`):

- Tülu 3 RLVR (open-instruct ``if_functions``): a JSON object with ``func_name`` and the shared keys
  ``N, quantifier, end_phrase, keyword_list, word, forbidden_words, letter, i, first_word,
  postscript_marker, options, section_splitter, original_prompt, language`` (unused ones null);
- IFEval's own: ``{"instruction_id_list": [...], "kwargs": [{...}, ...]}`` (also ``instruction_id``,
  and a list of such objects, open-instruct's later format, as JSON or as a Python literal).

Each form keeps its own counting convention where they differ: Tülu 3's "N times"/"N sections"
are exact, IFEval's section count is "at least". The reward is 1 only when every constraint holds.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tulu3.rewards.base import VerifyResult, register_verifier
from tulu3.rewards.ifeval_constraints import CHECKS

__all__ = ["KINDS", "Constraint", "parse_constraints", "verify_ifeval"]

_MAX_GROUND_TRUTH = 200_000  # characters; ground truths are data, but bound the literal parser too


@dataclass(frozen=True)
class Kind:
    """One constraint kind: its IFEval id, its Tülu 3 func_name and how each form's arguments map
    onto the checker's parameters (``fixed`` holds parameters a form implies)."""

    ifeval_id: str
    func_name: str
    tulu_args: dict[str, str] = field(default_factory=dict)
    ifeval_args: dict[str, str] = field(default_factory=dict)
    tulu_fixed: dict[str, Any] = field(default_factory=dict)
    ifeval_fixed: dict[str, Any] = field(default_factory=dict)

    @property
    def check(self) -> Callable[..., bool]:
        return CHECKS[self.ifeval_id]


_EXACT = {"relation": "exactly"}
KINDS: list[Kind] = [
    Kind("keywords:existence", "verify_keywords", {"keyword_list": "keywords"},
         {"keywords": "keywords"}),
    Kind("keywords:frequency", "verify_keyword_frequency", {"word": "keyword", "N": "n"},
         {"keyword": "keyword", "frequency": "n", "relation": "relation"}, _EXACT),
    Kind("keywords:forbidden_words", "validate_forbidden_words",
         {"forbidden_words": "forbidden_words"}, {"forbidden_words": "forbidden_words"}),
    Kind("keywords:letter_frequency", "verify_letter_frequency", {"letter": "letter", "N": "n"},
         {"letter": "letter", "let_frequency": "n", "let_relation": "relation"}, _EXACT),
    Kind("language:response_language", "validate_response_language", {"language": "language"},
         {"language": "language"}),
    Kind("length_constraints:number_paragraphs", "verify_paragraph_count", {"N": "n"},
         {"num_paragraphs": "n"}),
    Kind("length_constraints:number_words", "validate_word_constraint",
         {"N": "n", "quantifier": "relation"}, {"num_words": "n", "relation": "relation"}),
    Kind("length_constraints:number_sentences", "verify_sentence_constraint",
         {"N": "n", "quantifier": "relation"}, {"num_sentences": "n", "relation": "relation"}),
    Kind("length_constraints:nth_paragraph_first_word", "validate_paragraphs",
         {"N": "n", "i": "nth", "first_word": "first_word"},
         {"num_paragraphs": "n", "nth_paragraph": "nth", "first_word": "first_word"}),
    Kind("detectable_content:postscript", "verify_postscript", {"postscript_marker": "marker"},
         {"postscript_marker": "marker"}),
    Kind("detectable_content:number_placeholders", "validate_placeholders", {"N": "n"},
         {"num_placeholders": "n"}),
    Kind("detectable_format:number_bullet_lists", "verify_bullet_points", {"N": "n"},
         {"num_bullets": "n"}),
    Kind("detectable_format:title", "validate_title"),
    Kind("detectable_format:constrained_response", "validate_choice", {"options": "options"}),
    Kind("detectable_format:number_highlighted_sections", "validate_highlighted_sections",
         {"N": "n"}, {"num_highlights": "n"}),
    Kind("detectable_format:multiple_sections", "validate_sections",
         {"N": "n", "section_splitter": "splitter"},
         {"num_sections": "n", "section_spliter": "splitter", "section_splitter": "splitter"},
         _EXACT, {"relation": "at least"}),
    Kind("detectable_format:json_format", "validate_json_format"),
    Kind("combination:repeat_prompt", "validate_repeat_prompt", {"original_prompt": "prompt"},
         {"prompt_to_repeat": "prompt"}),
    Kind("combination:two_responses", "validate_two_responses"),
    Kind("change_case:english_capital", "validate_uppercase"),
    Kind("change_case:english_lowercase", "validate_lowercase"),
    Kind("change_case:capital_word_frequency", "validate_frequency_capital_words",
         {"N": "n", "quantifier": "relation"},
         {"capital_frequency": "n", "capital_relation": "relation"}),
    Kind("startend:end_checker", "validate_end", {"end_phrase": "end_phrase"},
         {"end_phrase": "end_phrase"}),
    Kind("startend:quotation", "validate_quotation"),
    Kind("punctuation:no_comma", "validate_no_commas"),
]
_BY_ID = {k.ifeval_id: k for k in KINDS}
_BY_FUNC = {k.func_name: k for k in KINDS}


@dataclass(frozen=True)
class Constraint:
    """One constraint to check: its kind and the checker's keyword arguments."""

    kind: Kind
    params: dict[str, Any]

    def holds(self, text: str) -> bool:
        try:
            return bool(self.kind.check(text, **self.params))
        except TypeError as e:  # a required argument missing from the ground truth
            raise ValueError(f"{self.kind.ifeval_id}: bad arguments {self.params}: {e}") from e


def _map_args(raw: dict[str, Any] | None, mapping: dict[str, str], fixed: dict[str, Any]
              ) -> dict[str, Any]:
    """Checker kwargs from a ground truth's arguments: nulls dropped, unknown keys ignored (the
    Tülu 3 rows carry every key of every kind)."""
    params = dict(fixed)
    for key, value in (raw or {}).items():
        if value is not None and key in mapping:
            params[mapping[key]] = value
    return params


def _from_tulu(obj: dict[str, Any]) -> list[Constraint]:
    kind = _BY_FUNC.get(obj["func_name"])
    if kind is None:
        raise ValueError(f"unknown IFEval func_name {obj['func_name']!r}")
    return [Constraint(kind, _map_args(obj, kind.tulu_args, kind.tulu_fixed))]


def _from_ifeval(obj: dict[str, Any]) -> list[Constraint]:
    ids = obj.get("instruction_id_list", obj.get("instruction_id"))
    ids = [ids] if isinstance(ids, str) else list(ids or [])
    kwargs = obj.get("kwargs") or [None] * len(ids)
    kwargs = [kwargs] if isinstance(kwargs, dict) else list(kwargs)
    if len(kwargs) != len(ids):
        raise ValueError(f"{len(ids)} instruction ids but {len(kwargs)} kwargs")
    out = []
    for iid, raw in zip(ids, kwargs):
        kind = _BY_ID.get(iid)
        if kind is None:
            raise ValueError(f"unknown IFEval instruction id {iid!r}")
        out.append(Constraint(kind, _map_args(raw, kind.ifeval_args, kind.ifeval_fixed)))
    return out


def _load(ground_truth: str) -> Any:
    """JSON first; then a Python literal (open-instruct stores lists of dicts with repr)."""
    if len(ground_truth) > _MAX_GROUND_TRUTH:
        raise ValueError(f"IFEval ground truth longer than {_MAX_GROUND_TRUTH} characters")
    try:
        return json.loads(ground_truth)
    except ValueError:
        pass
    try:
        return ast.literal_eval(ground_truth)  # literals only: never evaluates names or calls
    except (ValueError, SyntaxError) as e:
        raise ValueError(f"IFEval ground truth is neither JSON nor a literal: {e}") from e


def parse_constraints(ground_truth: str | dict | list) -> list[Constraint]:
    """All constraints of a ground truth in either form (see the module docstring)."""
    obj = _load(ground_truth) if isinstance(ground_truth, str) else ground_truth
    if isinstance(obj, str):  # a JSON string holding JSON, as some dumps double-encode
        obj = _load(obj)
    items = obj if isinstance(obj, list) else [obj]
    constraints: list[Constraint] = []
    for item in items:
        if isinstance(item, str):
            item = _load(item)
        if not isinstance(item, dict):
            raise TypeError(f"IFEval constraint must be an object, got {type(item).__name__}")
        if "func_name" in item:
            constraints += _from_tulu(item)
        elif "instruction_id_list" in item or "instruction_id" in item:
            constraints += _from_ifeval(item)
        else:
            raise ValueError(f"IFEval ground truth has neither func_name nor instruction ids: "
                             f"{sorted(item)}")
    if not constraints:
        raise ValueError("IFEval ground truth holds no constraint")
    return constraints


@register_verifier("ifeval")
def verify_ifeval(response: str, ground_truth: str) -> VerifyResult:
    """Correct when every constraint of ``ground_truth`` holds for ``response``."""
    constraints = parse_constraints(ground_truth)
    if not response.strip():
        return VerifyResult(False, None, "empty response")
    failed = [c.kind.ifeval_id for c in constraints if not c.holds(response)]
    if failed:
        return VerifyResult(False, None, "failed: " + ", ".join(failed))
    return VerifyResult(True, None, f"all {len(constraints)} constraints hold")
