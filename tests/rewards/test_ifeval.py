"""IFEval verifier: all 25 constraint kinds pass and fail, in both ground-truth forms."""

import json

import pytest

from tulu3.rewards import verify
from tulu3.rewards.ifeval import KINDS, parse_constraints
from tulu3.rewards.ifeval_constraints import (
    CHECKS,
    compare,
    count_sentences,
    count_words,
)

# Every key of a Tülu 3 RLVR IFEval row; unused ones are null in the public data.
TULU_KEYS = ["N", "quantifier", "end_phrase", "keyword_list", "word", "forbidden_words", "letter",
             "i", "first_word", "postscript_marker", "options", "section_splitter",
             "original_prompt"]


def tulu(func_name: str, **args) -> str:
    row = {"func_name": func_name, **{k: None for k in TULU_KEYS}, **args}
    return json.dumps(row)


def ifeval(instruction_id: str, **kwargs) -> str:
    return json.dumps({"instruction_id_list": [instruction_id], "kwargs": [kwargs]})


PROMPT = "Write a haiku about rain."
# (instruction id, Tülu 3 ground truth or None, IFEval ground truth or None, passing, failing)
KIND_CASES = [
    ("keywords:existence",
     tulu("verify_keywords", keyword_list=["apple", "river"]),
     ifeval("keywords:existence", keywords=["apple", "river"]),
     "An Apple fell into the river.", "An apple fell into the lake."),
    ("keywords:frequency",
     tulu("verify_keyword_frequency", word="cat", N=2),
     ifeval("keywords:frequency", keyword="cat", frequency=2, relation="at least"),
     "The cat saw another cat in a category.", "The cat sat in a category."),
    ("keywords:forbidden_words",
     tulu("validate_forbidden_words", forbidden_words=["bad", "evil"]),
     ifeval("keywords:forbidden_words", forbidden_words=["bad", "evil"]),
     "A badge is no problem.", "That was a Bad idea."),
    ("keywords:letter_frequency",
     tulu("verify_letter_frequency", letter="z", N=2),
     ifeval("keywords:letter_frequency", letter="z", let_frequency=2, let_relation="at least"),
     "Zoe saw a zebra.", "Zoe saw a horse."),
    ("language:response_language",
     tulu("validate_response_language", language="de"),
     ifeval("language:response_language", language="de"),
     "Das ist ein kurzer deutscher Satz über das Wetter und die Katze.",
     "This is a short English sentence about the weather and the cat."),
    ("length_constraints:number_paragraphs",
     tulu("verify_paragraph_count", N=3),
     ifeval("length_constraints:number_paragraphs", num_paragraphs=3),
     "One.\n* * *\nTwo.\n***\nThree.", "One.\n***\n\n***\nThree."),
    ("length_constraints:number_words",
     tulu("validate_word_constraint", N=5, quantifier="at most"),
     ifeval("length_constraints:number_words", num_words=6, relation="less than"),
     "This has exactly five words.", "This sentence has quite a few more words than five."),
    ("length_constraints:number_sentences",
     tulu("verify_sentence_constraint", N=2, quantifier="at least"),
     ifeval("length_constraints:number_sentences", num_sentences=2, relation="at least"),
     "Dr. Smith arrived. He sat down!", "Dr. Smith arrived at 3.5 p.m. today."),
    ("length_constraints:nth_paragraph_first_word",
     tulu("validate_paragraphs", N=2, i=2, first_word="Then"),
     ifeval("length_constraints:nth_paragraph_first_word", num_paragraphs=2, nth_paragraph=2,
            first_word="then"),
     'First part.\n\n"Then, the second part.', "First part.\n\nThereafter the second."),
    ("detectable_content:postscript",
     tulu("verify_postscript", postscript_marker="P.S."),
     ifeval("detectable_content:postscript", postscript_marker="P.S."),
     "Main text.\n\nP.S. Call me later.", "Main text.\n\nPS call me later."),
    ("detectable_content:number_placeholders",
     tulu("validate_placeholders", N=2),
     ifeval("detectable_content:number_placeholders", num_placeholders=2),
     "Dear [name], meet me at [address].", "Dear [name], meet me at [ ]."),
    ("detectable_format:number_bullet_lists",
     tulu("verify_bullet_points", N=2),
     ifeval("detectable_format:number_bullet_lists", num_bullets=2),
     "* First point\n- Second point\n**Bold line**\n* * *", "* Only one point\n**Bold**"),
    ("detectable_format:title",
     tulu("validate_title"), ifeval("detectable_format:title"),
     "<<Rain Song>>\nRoses are red.", "<<   >>\nRoses are red."),
    ("detectable_format:constrained_response",
     tulu("validate_choice",
          options="('My answer is yes.', 'My answer is no.', 'My answer is maybe.')"),
     ifeval("detectable_format:constrained_response"),
     "My answer is no.", "Maybe, I am not sure."),
    ("detectable_format:number_highlighted_sections",
     tulu("validate_highlighted_sections", N=2),
     ifeval("detectable_format:number_highlighted_sections", num_highlights=2),
     "This is *important* and **also this**.", "Only *one* highlight and ** ** empty."),
    ("detectable_format:multiple_sections",
     tulu("validate_sections", N=2, section_splitter="SECTION"),
     ifeval("detectable_format:multiple_sections", num_sections=2, section_spliter="SECTION"),
     "SECTION 1\nIntro\nSECTION 2\nBody", "SECTION 1\nIntro only"),
    ("detectable_format:json_format",
     tulu("validate_json_format"), ifeval("detectable_format:json_format"),
     '```json\n{"a": 1}\n```', "{'a': 1}"),
    ("combination:repeat_prompt",
     tulu("validate_repeat_prompt", original_prompt=PROMPT),
     ifeval("combination:repeat_prompt", prompt_to_repeat=PROMPT),
     PROMPT + "\nRain on the roof", "Sure! " + PROMPT),
    ("combination:two_responses",
     tulu("validate_two_responses"), ifeval("combination:two_responses"),
     "Answer one.\n******\nAnswer two.", "Same.\n******\nSame."),
    ("change_case:english_capital",
     tulu("validate_uppercase"), ifeval("change_case:english_capital"),
     "HELLO WORLD 123", "HELLO World"),
    ("change_case:english_lowercase",
     tulu("validate_lowercase"), ifeval("change_case:english_lowercase"),
     "hello world.", "hello World."),
    ("change_case:capital_word_frequency",
     tulu("validate_frequency_capital_words", N=2, quantifier="at least"),
     ifeval("change_case:capital_word_frequency", capital_frequency=2,
            capital_relation="at least"),
     "The NASA and ESA teams met.", "The NASA team met."),
    ("startend:end_checker",
     tulu("validate_end", end_phrase="Any other questions?"),
     ifeval("startend:end_checker", end_phrase="Any other questions?"),
     "Here it is. Any other questions?\n", "Any other questions? Thanks."),
    ("startend:quotation",
     tulu("validate_quotation"), ifeval("startend:quotation"),
     '"Wrapped in quotes."', 'Not "wrapped".'),
    ("punctuation:no_comma",
     tulu("validate_no_commas"), ifeval("punctuation:no_comma"),
     "No commas here.", "Yes, commas."),
]

# Hand-checked rows beyond one pass/fail per kind: traps and the differences between the forms.
EXTRA_CASES = [
    # open-instruct's release passed every placeholder check (it returned a truthy tuple)
    ("No placeholders at all.", tulu("validate_placeholders", N=1), False),
    # Tülu 3 counts keywords exactly, IFEval "at least"
    ("cat cat cat", tulu("verify_keyword_frequency", word="cat", N=2), False),
    ("cat cat cat", ifeval("keywords:frequency", keyword="cat", frequency=2, relation="at least"),
     True),
    ("cat cat cat", ifeval("keywords:frequency", keyword="cat", frequency=3, relation="less than"),
     False),
    # Tülu 3 sections are exact, IFEval's "at least"
    ("SECTION 1 a SECTION 2 b SECTION 3 c", tulu("validate_sections", N=2,
                                                 section_splitter="SECTION"), False),
    ("SECTION 1 a SECTION 2 b SECTION 3 c",
     ifeval("detectable_format:multiple_sections", num_sections=2, section_spliter="SECTION"),
     True),
    # "around" is within max(1, 10%)
    ("one two three four five six seven eight nine ten eleven",
     tulu("validate_word_constraint", N=10, quantifier="around"), True),
    ("one two three four five six seven eight",
     tulu("validate_word_constraint", N=10, quantifier="around"), False),
    # options must match as a phrase, not inside a word ("A" is not in "Apple")
    ("Apple", tulu("validate_choice", options=["A", "B"]), False),
    ("I pick B.", tulu("validate_choice", options=["A", "B"]), True),
    # a P.P.S. is not a P.S.
    ("Text.\nP.P.S. later", tulu("verify_postscript", postscript_marker="P.S."), False),
    ("Text.\nP.P.S. later", tulu("verify_postscript", postscript_marker="P.P.S"), True),
    # bold text is not a bullet, a "-" line is
    ("**Note**\n- item", tulu("verify_bullet_points", N=1), True),
    # several constraints: all must hold
    ("hello world", json.dumps({"instruction_id_list": ["change_case:english_lowercase",
                                                        "punctuation:no_comma"],
                                "kwargs": [{}, {}]}), True),
    ("hello, world", json.dumps({"instruction_id_list": ["change_case:english_lowercase",
                                                         "punctuation:no_comma"],
                                 "kwargs": [{}, {}]}), False),
    # open-instruct's later form: a Python-literal list of {instruction_id, kwargs}
    ("hello world", str([{"instruction_id": ["change_case:english_lowercase"],
                          "kwargs": [None]}]), True),
    # an empty response satisfies nothing (not even "no commas")
    ("   ", tulu("validate_no_commas"), False),
    # a JSON string holding a JSON object (double-encoded dumps)
    ("no commas", json.dumps(tulu("validate_no_commas")), True),
    # JSON must be an object or an array
    ('"just a string"', tulu("validate_json_format"), False),
    ("[1, 2, 3]", tulu("validate_json_format"), True),
    # end phrase with trailing quote, as IFEval strips it
    ('"Thanks. Is there anything else I can help with?"',
     tulu("validate_end", end_phrase="Is there anything else I can help with?"), True),
]


def _all_rows():
    for iid, tulu_gt, ifeval_gt, good, bad in KIND_CASES:
        for form, gt in (("tulu", tulu_gt), ("ifeval", ifeval_gt)):
            if gt is not None:
                yield pytest.param(good, gt, True, id=f"{iid}-{form}-pass")
                yield pytest.param(bad, gt, False, id=f"{iid}-{form}-fail")
    for k, (response, gt, expected) in enumerate(EXTRA_CASES):
        yield pytest.param(response, gt, expected, id=f"extra-{k}")


ROWS = list(_all_rows())


@pytest.mark.parametrize("response,ground_truth,expected", ROWS)
def test_table(response: str, ground_truth: str, expected: bool) -> None:
    result = verify("ifeval", response, ground_truth)
    assert result.correct is expected, result


def test_every_kind_has_cases_in_both_forms() -> None:
    covered = {c[0] for c in KIND_CASES}
    assert covered == set(CHECKS) and len(CHECKS) == 25
    assert {k.ifeval_id for k in KINDS} == set(CHECKS)
    both = [c for c in KIND_CASES if c[1] is not None and c[2] is not None]
    assert len(both) == 25
    assert len(ROWS) >= 40


def test_failed_constraints_are_named() -> None:
    gt = json.dumps({"instruction_id_list": ["change_case:english_lowercase",
                                             "punctuation:no_comma"], "kwargs": [{}, {}]})
    result = verify("ifeval", "Hello, world", gt)
    assert result.reason == "failed: change_case:english_lowercase, punctuation:no_comma"


@pytest.mark.parametrize("gt", [
    "not json at all {",
    json.dumps({"func_name": "verify_nothing"}),
    json.dumps({"instruction_id_list": ["made:up"], "kwargs": [{}]}),
    json.dumps({"something": 1}),
    json.dumps({"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}, {}]}),
    tulu("verify_postscript"),  # the marker is missing
])
def test_bad_ground_truth_raises(gt: str) -> None:
    with pytest.raises(ValueError):
        verify("ifeval", "some response", gt)


def test_literal_parser_never_evaluates_code() -> None:
    with pytest.raises(ValueError):
        parse_constraints("__import__('os').system('echo pwned')")


def test_language_detection_is_deterministic() -> None:
    gt = tulu("validate_response_language", language="en")
    text = "Short text here"
    assert len({verify("ifeval", text, gt).correct for _ in range(5)}) == 1


def test_helpers() -> None:
    assert count_words("Hello - world *** ok") == 3
    assert count_sentences("Mr. Brown left. Did he? Yes!\n\nNew paragraph without a stop") == 4
    assert compare(9, 10, "around") and not compare(8, 10, "around")
    assert compare(4, 5, "less than") and not compare(5, 5, "less than")
    with pytest.raises(ValueError):
        compare(1, 1, "roughly")
