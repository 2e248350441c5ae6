"""Stop strings with the tiny tiktoken tokenizer: the check on the decoded tail agrees with
searching the fully decoded prefix, and the verifier's text is cut after the string."""

from __future__ import annotations

from pathlib import Path

import pytest

from tulu3.rollout.stop import StopStrings

TEXT = "We add 3 and 4.</answer> The answer is 7.</answer> trailing words"
STOPS = ["</answer>", "is 7"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from tulu3.data.synthetic import tokenizer_corpus
    from tulu3.data.tokenizer import build_tiny_tiktoken, load_tokenizer
    from tulu3.demo.data import MERGES

    path = Path(tmp_path_factory.mktemp("tok")) / "tokenizer.model"
    build_tiny_tiktoken(str(path), tokenizer_corpus(seed=0), MERGES)
    return load_tokenizer(str(path))


def test_stops_on_the_token_completing_the_string(tokenizer) -> None:
    ids = tokenizer.encode(TEXT)
    stop = StopStrings(tokenizer.decode, STOPS)
    # Oracle: the first prefix whose full decode contains a stop string.
    first = next(n for n in range(1, len(ids) + 1)
                 if any(s in tokenizer.decode(ids[:n]) for s in STOPS))
    hits = [n for n in range(1, len(ids) + 1) if stop(ids[:n])]
    assert hits and hits[0] == first
    assert "</answer>" in tokenizer.decode(ids[:first])
    assert "</answer>" not in tokenizer.decode(ids[:first - 1])
    # The verifier's text ends at the first stop string, whatever the stopping token carried.
    assert stop.truncate(tokenizer.decode(ids[:first])) == "We add 3 and 4.</answer>"
    assert stop.truncate("no stop here") == "no stop here"
    assert stop.truncate("x is 7</answer>") == "x is 7"  # the earliest end wins


def test_rejects_empty_and_is_falsy_without_strings(tokenizer) -> None:
    with pytest.raises(ValueError, match="empty stop string"):
        StopStrings(tokenizer.decode, [""])
    assert not StopStrings(tokenizer.decode, [])
