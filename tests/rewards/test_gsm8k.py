"""GSM8K verifier: a hand-checked table of (response, ground truth, expected)."""

import pytest

from tulu3.rewards import verify
from tulu3.rewards.gsm8k import extract_last_number, parse_ground_truth

SOLUTION = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
            "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")

# (response, ground_truth, expected correct)
CASES = [
    ("She sold 72 clips.", "72", True),
    ("The answer is 72", "72", True),
    ("72", "72", True),
    ("So the total is 72.", "72", True),                      # trailing period
    ("So the total is 72.0", "72", True),                     # decimal equal by value
    ("Total: 72.00 clips", "72", True),
    ("She sold 71 clips.", "72", False),
    ("She sold 720 clips.", "72", False),
    ("72 clips in May, 24 in June, so 96.", "72", False),      # the LAST number counts
    ("First 24, then 48, so 72 in all.", "72", True),
    ("She sold 72 clips.", SOLUTION, True),                    # full GSM8K solution as truth
    ("She sold 24 clips.", SOLUTION, False),
    ("The answer is 1,000.", "1000", True),                    # thousands separator in response
    ("The answer is 1000.", "1,000", True),                    # ... and in the ground truth
    ("It costs 1,234,567 dollars", "1234567", True),
    ("It costs 1,23,456 rupees", "123456", True),              # Indian (lakh) grouping
    ("It costs 12,34,56,789 rupees", "123456789", True),
    ("It costs 1,23,456 rupees", "23456", False),              # not read as "23,456"
    ("Pick 1,2", "2", True),                                   # no grouping: two numbers
    ("It costs $1,234.50 in total.", "1234.5", True),          # $ and cents
    ("He pays $18.", "18", True),
    ("He pays $ 18", "18", True),
    ("That is 18 dollars per week.", "18", True),              # unit after the number
    ("The tank holds 25 liters", "25", True),
    ("The temperature is -5 degrees.", "-5", True),            # negative kept
    ("The temperature is -5 degrees.", "5", False),            # open-instruct dropped the sign
    ("The temperature is 5 degrees.", "-5", False),
    ("The change is \u22123.", "-3", True),                    # Unicode minus sign
    ("He lost -$20 today.", "-20", True),
    ("He owes $-20.", "-20", True),
    ("10-5 = 5", "5", True),                                   # binary minus is not a sign
    ("x-5", "5", True),
    ("The difference is (10)-4", "4", True),
    ("The answer is 0.5", ".5", True),
    ("The answer is .5", "0.5", True),
    ("The answer is 50%", "50", True),                         # percent sign
    ("Answer: 3.75", "3.75", True),
    ("Answer: 3.7", "3.75", False),
    ("I do not know.", "72", False),                           # no number at all
    ("", "72", False),
    ("Between 3–5 apples", "5", True),                         # en dash is a range, not a sign
    ("The year was 2024, and 12 eggs were left.", "12", True),
    ("Final answer: 1, 2", "2", True),                         # "1, 2" is two numbers
    ("#### 42", "42", True),
    ("The answer is 42.\n\nI hope this helps!", "42", True),
    ("She has 5 apples.", "5.0", True),
    ("She has 007 apples.", "7", True),
    ("Answer: 1,0000", "10000", False),                        # not a thousands group: 1 and 0000
]


@pytest.mark.parametrize("response,ground_truth,expected", CASES)
def test_table(response: str, ground_truth: str, expected: bool) -> None:
    result = verify("gsm8k", response, ground_truth)
    assert result.correct is expected, result


def test_table_is_big_enough() -> None:
    assert len(CASES) >= 40


def test_extracted_is_reported() -> None:
    result = verify("gsm8k", "It costs $1,234.50.", "1234.5")
    assert result.extracted == "1234.50" and result.reason == "match"
    assert verify("gsm8k", "none here", "3").reason == "no number in response"


def test_extract_last_number_scans_long_text_quickly() -> None:
    text = "7 " + "word " * 200_000  # ~1 MB without a number in the tail
    assert extract_last_number(text) == "7"
    assert extract_last_number("x" * 1_000_000) is None


def test_ground_truth_without_number_is_an_error() -> None:
    with pytest.raises(ValueError):
        parse_ground_truth("#### none")


def test_dataset_name_is_case_insensitive() -> None:
    assert verify("GSM8K", "72", "72").correct
