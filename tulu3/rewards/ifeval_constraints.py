"""The 25 IFEval constraint checkers, each ``check_*(text, **params) -> bool``.

Semantics follow Google's IFEval (``instruction_following_eval/instructions.py``), the benchmark
Tülu 3 reports, with these deliberate choices (each where the reference is loose or buggy):

- counts compare through one :func:`compare` that knows IFEval's relations ("less than",
  "at least") and Tülu 3's ("at most", "around": within max(1, 10%)) plus "exactly";
- keyword frequency counts whole words (IFEval counted substrings: "cat" in "category");
- placeholders must be non-empty (``[name]``); open-instruct's release returned a tuple here, so its
  check always passed; this one can fail;
- bullets need a space after ``*``/``-``, so ``**bold**`` lines and ``* * *`` dividers are not
  bullets;
- a postscript needs text after its marker; JSON must be an object or array;
- all-caps / all-lowercase check the case only: langdetect misreads short texts ("HELLO" -> "vi"),
  which would fail correct answers; the language itself is response_language's job;
- response_language fails when langdetect finds no language (IFEval passed it).
"""

from __future__ import annotations

import ast
import functools
import json
import re
from collections.abc import Sequence
from typing import Any

__all__ = ["CHECKS", "compare", "count_sentences", "count_words"]

DEFAULT_CHOICES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def compare(count: int, n: Any, relation: str | None) -> bool:
    """``count`` against the target ``n`` under ``relation`` (None means exactly)."""
    n = int(n)
    rel = (relation or "exactly").strip().lower()
    if rel in ("at least", "more than or equal to"):
        return count >= n
    if rel in ("at most", "less than or equal to"):
        return count <= n
    if rel == "less than":
        return count < n
    if rel == "more than":
        return count > n
    if rel == "around":
        return abs(count - n) <= max(1, round(0.1 * n))
    if rel in ("exactly", "exact", "equal to", "equal"):
        return count == n
    raise ValueError(f"unknown relation {relation!r}")


def _word_pattern(word: str) -> re.Pattern:
    """Whole-word, case-insensitive, literal (keywords are data, never regexes)."""
    if not word.strip():
        raise ValueError("empty keyword in the ground truth")
    return re.compile(r"(?<!\w)" + re.escape(word.strip()) + r"(?!\w)", re.IGNORECASE)


def count_words(text: str) -> int:
    """Whitespace-separated tokens holding at least one letter or digit ("-" and "***" are not)."""
    return sum(1 for token in text.split() if any(ch.isalnum() for ch in token))


_ABBREVIATIONS = re.compile(
    r"\b(?:Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|Inc|Ltd|Co|vs|etc|e\.g|i\.e|Ph\.D|U\.S|a\.m|p\.m)\.",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]\u201d]*\s+|\n\s*\n")


def count_sentences(text: str) -> int:
    """Sentences end at . ! ? followed by whitespace, or at a blank line; abbreviations and
    decimals ("Dr.", "3.5") do not end one. A fragment counts when it holds a word character."""
    protected = _ABBREVIATIONS.sub(lambda m: m.group().replace(".", "\0"), text)
    return sum(1 for part in _SENTENCE_END.split(protected) if re.search(r"\w", part))


def _paragraphs(text: str, divider: re.Pattern) -> list[str] | None:
    """Paragraphs split by ``divider``; empty ones at the ends are dropped, one in the middle
    makes the split invalid (None), as in IFEval."""
    parts = [p.strip() for p in divider.split(text)]
    filled = [i for i, p in enumerate(parts) if p]
    if not filled:
        return []
    parts = parts[filled[0]:filled[-1] + 1]
    return None if len(parts) != len(filled) else parts


# --- keywords ------------------------------------------------------------------------------------

def check_keywords_existence(text: str, keywords: Sequence[str]) -> bool:
    """Every keyword appears (case-insensitive substring, as in IFEval)."""
    lowered = text.lower()
    return all(k.strip().lower() in lowered for k in _as_list(keywords))


def check_keyword_frequency(text: str, keyword: str, n: int, relation: str | None = None) -> bool:
    return compare(len(_word_pattern(keyword).findall(text)), n, relation)


def check_forbidden_words(text: str, forbidden_words: Sequence[str]) -> bool:
    return not any(_word_pattern(w).search(text) for w in _as_list(forbidden_words))


def check_letter_frequency(text: str, letter: str, n: int, relation: str | None = None) -> bool:
    """Case-insensitive count of one letter."""
    letter = letter.strip().lower()
    if len(letter) != 1:
        raise ValueError(f"letter must be one character, got {letter!r}")
    return compare(text.lower().count(letter), n, relation)


# --- language ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _langdetect() -> Any:
    """Import langdetect on first use (it loads ~50 language profiles) and seed it: its detector
    is randomized, and a reward must not change between two calls on the same text."""
    import langdetect

    langdetect.DetectorFactory.seed = 0
    return langdetect


_LANG_SAMPLE = 5000


def check_response_language(text: str, language: str) -> bool:
    """langdetect's language equals ``language`` (ISO 639-1; "zh" matches "zh-cn").

    langdetect reads at most 10,000 characters but cleans the whole text first (seconds on a
    megabyte); a long response is judged on its first and last 5,000 characters, both of which
    must be in the language, so switching language halfway still fails."""
    samples = [text] if len(text) <= 2 * _LANG_SAMPLE else [text[:_LANG_SAMPLE],
                                                           text[-_LANG_SAMPLE:]]
    return all(_detected_language(s) == language.strip().lower().split("-")[0] for s in samples)


def _detected_language(text: str) -> str | None:
    ld = _langdetect()
    try:
        return ld.detect(text).lower().split("-")[0]
    except ld.LangDetectException:
        return None


# --- length --------------------------------------------------------------------------------------

# No \s* around the divider: a leading \s* makes re.split quadratic on long whitespace runs;
# _paragraphs strips the parts instead.
_DIVIDER = re.compile(r"\*\*\*|\* \* \*")
_BLANK_LINE = re.compile(r"\n\s*\n")


def check_number_paragraphs(text: str, n: int) -> bool:
    """Paragraphs separated by the markdown divider ``***`` (or ``* * *``)."""
    parts = _paragraphs(text, _DIVIDER)
    return parts is not None and compare(len(parts), n, None)


def check_number_words(text: str, n: int, relation: str) -> bool:
    return compare(count_words(text), n, relation)


def check_number_sentences(text: str, n: int, relation: str) -> bool:
    return compare(count_sentences(text), n, relation)


def check_nth_paragraph_first_word(text: str, n: int, nth: int, first_word: str) -> bool:
    """``n`` paragraphs separated by blank lines, and paragraph ``nth`` (1-based) starts with the
    word ``first_word`` (the whole word, case-insensitive, leading quotes/markup ignored)."""
    parts = _paragraphs(text, _BLANK_LINE)
    nth = int(nth)
    if parts is None or len(parts) != int(n) or not 1 <= nth <= len(parts):
        return False
    m = re.match(r"[\W_]*(\w+)", parts[nth - 1])
    return bool(m) and m.group(1).lower() == first_word.strip().lower()


# --- detectable content and format ---------------------------------------------------------------

def check_postscript(text: str, marker: str) -> bool:
    """A postscript: ``marker`` at a word start (line start, space or markdown before), then text.
    Spaces inside the marker are optional ("P.S." matches "P. S.")."""
    body = r"\.\s?".join(re.escape(part) for part in marker.strip().split("."))
    pattern = r"(?<![^\s*_>#])" + body + r"[^\S\n]*(?::[^\S\n]*)?\S"
    return re.search(pattern, text, re.IGNORECASE) is not None


def check_number_placeholders(text: str, n: int) -> bool:
    found = re.findall(r"\[([^\[\]\n]+)\]", text)  # no \w inside the pattern: that backtracks
    return compare(sum(1 for p in found if re.search(r"\w", p)), n, "at least")


def check_number_bullet_lists(text: str, n: int) -> bool:
    """Markdown bullets: a line starting with ``*`` or ``-`` and a space, not a divider line."""
    bullets = re.findall(r"^[ \t]*[*-][ \t]+(\S.*)$", text, re.MULTILINE)
    return compare(sum(1 for b in bullets if b.strip(" *-\t")), n, None)


def check_title(text: str) -> bool:
    return any(t.strip() for t in re.findall(r"<<([^\n<>]+)>>", text))


def check_constrained_response(text: str, options: Sequence[str] | str | None = None) -> bool:
    """The response contains one of the options (as a whole phrase, not inside a longer word)."""
    choices = _as_list(options) if options else list(DEFAULT_CHOICES)
    stripped = text.strip()
    return any(re.search(r"(?<!\w)" + re.escape(str(o).strip()) + r"(?!\w)", stripped)
               for o in choices if str(o).strip())


def check_number_highlighted_sections(text: str, n: int) -> bool:
    """Markdown highlights ``*like this*`` or ``**like this**`` on one line, non-empty."""
    singles = [h for h in re.findall(r"\*([^\n*]*)\*", text) if h.strip()]
    doubles = [h for h in re.findall(r"\*\*([^\n*]*)\*\*", text) if h.strip()]
    return compare(len(singles) + len(doubles), n, "at least")


def check_multiple_sections(text: str, n: int, splitter: str, relation: str | None = None) -> bool:
    """Sections marked ``SPLITTER X`` with X a number ("SECTION 1", "Section 2")."""
    marks = re.findall(r"(?<!\w)" + re.escape(splitter.strip()) + r"\s*\d+", text)
    return compare(len(marks), n, relation)


def check_json_format(text: str) -> bool:
    """The whole response is a JSON object or array (markdown code fences allowed around it)."""
    body = text.strip()
    if body.startswith("```"):
        body = body[3:]
        body = body[4:] if body[:4].lower() == "json" else body
    body = body.removesuffix("```").strip()
    try:
        return isinstance(json.loads(body), (dict, list))
    except (ValueError, RecursionError):
        return False


# --- combination, case, start/end, punctuation ---------------------------------------------------

def check_repeat_prompt(text: str, prompt: str) -> bool:
    return text.strip().lower().startswith(prompt.strip().lower())


def check_two_responses(text: str) -> bool:
    """Exactly two different non-empty responses separated by ``******``."""
    parts = text.split("******")
    kept = []
    for i, part in enumerate(parts):
        if part.strip():
            kept.append(part.strip())
        elif 0 < i < len(parts) - 1:
            return False
    return len(kept) == 2 and kept[0] != kept[1]


def check_english_capital(text: str) -> bool:
    return text.isupper()


def check_english_lowercase(text: str) -> bool:
    return text.islower()


def check_capital_word_frequency(text: str, n: int, relation: str) -> bool:
    words = re.findall(r"\w+", text)
    return compare(sum(1 for w in words if w.isupper()), n, relation)


def check_end_checker(text: str, end_phrase: str) -> bool:
    """Ends with the phrase (case-insensitive, surrounding whitespace and quotes ignored)."""
    return text.strip().strip('"').strip().lower().endswith(end_phrase.strip().lower())


def check_quotation(text: str) -> bool:
    body = text.strip()
    return len(body) > 1 and body[0] in '"\u201c' and body[-1] in '"\u201d'


def check_no_comma(text: str) -> bool:
    return "," not in text and "\uff0c" not in text  # the full-width comma is a comma too


def _as_list(value: Any) -> list[str]:
    """Keyword/option lists arrive as lists or as strings ("('a', 'b')", "a, b", "a")."""
    if isinstance(value, str):
        s = value.strip()
        if s[:1] in "([":
            try:
                parsed = ast.literal_eval(s)  # literals only: no names, calls or attributes
                if isinstance(parsed, (list, tuple)):
                    return [str(x) for x in parsed]
            except (ValueError, SyntaxError):
                pass
        return [p.strip() for p in s.split(",") if p.strip()]
    return [str(x) for x in value]


CHECKS = {
    "keywords:existence": check_keywords_existence,
    "keywords:frequency": check_keyword_frequency,
    "keywords:forbidden_words": check_forbidden_words,
    "keywords:letter_frequency": check_letter_frequency,
    "language:response_language": check_response_language,
    "length_constraints:number_paragraphs": check_number_paragraphs,
    "length_constraints:number_words": check_number_words,
    "length_constraints:number_sentences": check_number_sentences,
    "length_constraints:nth_paragraph_first_word": check_nth_paragraph_first_word,
    "detectable_content:postscript": check_postscript,
    "detectable_content:number_placeholders": check_number_placeholders,
    "detectable_format:number_bullet_lists": check_number_bullet_lists,
    "detectable_format:title": check_title,
    "detectable_format:constrained_response": check_constrained_response,
    "detectable_format:number_highlighted_sections": check_number_highlighted_sections,
    "detectable_format:multiple_sections": check_multiple_sections,
    "detectable_format:json_format": check_json_format,
    "combination:repeat_prompt": check_repeat_prompt,
    "combination:two_responses": check_two_responses,
    "change_case:english_capital": check_english_capital,
    "change_case:english_lowercase": check_english_lowercase,
    "change_case:capital_word_frequency": check_capital_word_frequency,
    "startend:end_checker": check_end_checker,
    "startend:quotation": check_quotation,
    "punctuation:no_comma": check_no_comma,
}
"""IFEval instruction id -> checker; the 25 kinds Tülu 3 trains on."""
