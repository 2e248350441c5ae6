"""Stop strings: end a response when its decoded text reaches one (open-instruct's
``stop_strings``, which vLLM checks on the detokenized output after every token).

    stop = StopStrings(tokenizer.decode, ["</answer>"])
    generate(..., stop=stop)            # a row ends on the token that completes "</answer>"
    text = stop.truncate(tokenizer.decode(response))   # the text up to the string's end

Only the tail of the response is decoded at each step: the last ``window`` tokens, enough to
hold the longest stop string (every token decodes to at least one character, except special
ones) plus one token that may carry extra characters after it. A stop string that appears in
that tail ends the row; it is checked after every token, so it ends on the token completing it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class StopStrings:
    """``stop(tokens) -> bool``: does the decoded response end a stop string (see module doc)?"""

    def __init__(self, decode: Callable[[list[int]], str], strings: Sequence[str]) -> None:
        if any(not s for s in strings):
            raise ValueError("rlvr.stop_strings: an empty stop string would stop at once")
        self.decode, self.strings = decode, list(strings)
        self.window = max((len(s) for s in self.strings), default=0) + 1

    def __bool__(self) -> bool:
        return bool(self.strings)

    def __call__(self, tokens: list[int]) -> bool:
        tail = self.decode(tokens[-self.window:])
        return any(s in tail for s in self.strings)

    def truncate(self, text: str) -> str:
        """``text`` up to the end of its first stop string (unchanged when it has none)."""
        ends = [text.find(s) + len(s) for s in self.strings if s in text]
        return text[:min(ends)] if ends else text
