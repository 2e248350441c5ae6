"""What the verifier and the reward see of a response (RLVRLoop._text / stopped), with the tiny
tokenizer: eos dropped, the text cut after a stop string, stopped rows spared no_eos_penalty."""

from __future__ import annotations

from pathlib import Path

import pytest

from tulu3.rewards import VerifyResult, rlvr_reward
from tulu3.rollout.decode import GenerationResult
from tulu3.rollout.stop import StopStrings
from tulu3.stages.rlvr.loop import RLVRLoop


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> RLVRLoop:
    from tulu3.data.synthetic import tokenizer_corpus
    from tulu3.data.tokenizer import build_tiny_tiktoken, load_tokenizer
    from tulu3.demo.data import MERGES

    path = Path(tmp_path_factory.mktemp("tok")) / "tokenizer.model"
    build_tiny_tiktoken(str(path), tokenizer_corpus(seed=0), MERGES)
    loop = object.__new__(RLVRLoop)  # only the tokenizer and the stop strings are needed
    loop.tok = load_tokenizer(str(path))
    loop.stop = StopStrings(loop.tok.decode, ["</answer>"])
    return loop


def test_text_cut_after_stop_string(loop: RLVRLoop) -> None:
    ids = loop.tok.encode("The answer is 7.</answer> and more")
    end = next(n for n in range(1, len(ids) + 1) if loop.stop(ids[:n]))
    stopped = GenerationResult(ids[:end], False, [0.0] * end, True)
    assert loop._text(stopped) == "The answer is 7.</answer>"
    eos = GenerationResult([*ids[:3], loop.tok.eos_id], True, [0.0] * 4, True)
    assert loop._text(eos) == loop.tok.decode(ids[:3])
    # A stopped row is not penalised as "no eos"; one cut at max_new_tokens is.
    assert rlvr_reward(VerifyResult(False), stopped.stopped, 10.0, -10.0) == 0.0
    cut = GenerationResult(ids[:end - 1], False, [0.0] * (end - 1), False)
    assert rlvr_reward(VerifyResult(False), cut.stopped, 10.0, -10.0) == -10.0
