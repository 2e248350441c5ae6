"""The Tülu 3 chat template (open-instruct's "tulu"), rendered to ids with a per-token train mask.

Text form, for messages m_0 .. m_{n-1} (``eos`` is the tokenizer's eos, ``<|end_of_text|>`` for
Llama 3)::

    system:    "<|system|>\\n" + content + "\\n"
    user:      "<|user|>\\n" + content + "\\n"
    assistant: "<|assistant|>\\n" + content + eos, then "\\n" unless it is the last message
    generation prompt (after the last message): "<|assistant|>\\n"

``<|system|>`` etc. are plain text, not special tokens. A sequence starts with bos by default
(Llama 3 was pre-trained so); ``add_bos=False`` reproduces open-instruct's Tülu 3 runs.

Tokenization is of the whole text between special tokens at once, as HF's tokenizer did for the
released models: BPE pre-tokens may cross a template/content boundary (``"?\\n"`` at the end of a
user turn is one Llama 3 token), so rendering piece by piece would give different ids. Each token's
byte offset then says which piece it starts in; a token is trained when it starts inside assistant
content. Only assistant content and its eos are trained: the ``"\\n"`` after a non-final eos, bos,
system and user turns and the ``<|assistant|>\\n`` headers are masked. Special-token strings inside
content stay plain text (a user cannot inject an eos).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tulu3.data.tokenizer import Tokenizer

TEMPLATE_NAME = "tulu"
ROLES = ("system", "user", "assistant")
HEADERS = {role: f"<|{role}|>\n" for role in ROLES}


@dataclass(frozen=True)
class Piece:
    """One span of a rendered conversation: text, or a special token (``special`` = "bos"/"eos")."""

    text: str = ""
    special: str | None = None
    trainable: bool = False


def render_pieces(messages: Sequence[dict], add_bos: bool = True,
                  add_generation_prompt: bool = False) -> list[Piece]:
    """The template as a list of pieces (messages already checked by validate_messages)."""
    pieces = [Piece(special="bos")] if add_bos else []
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role != "assistant":
            pieces.append(Piece(HEADERS[role] + content + "\n"))
            continue
        pieces += [Piece(HEADERS[role]), Piece(content, trainable=True),
                   Piece(special="eos", trainable=True)]
        if i < len(messages) - 1:
            pieces.append(Piece("\n"))
    if add_generation_prompt:
        pieces.append(Piece(HEADERS["assistant"]))
    return _merge_text(pieces)


def _merge_text(pieces: list[Piece]) -> list[Piece]:
    """Join adjacent untrained text pieces (fewer, larger pieces; same ids)."""
    out: list[Piece] = []
    for piece in pieces:
        if out and piece.special is None and out[-1].special is None and not piece.trainable \
                and not out[-1].trainable:
            out[-1] = Piece(out[-1].text + piece.text)
        else:
            out.append(piece)
    return out


def render_text(messages: Sequence[dict], tok: Tokenizer, add_bos: bool = True,
                add_generation_prompt: bool = False) -> str:
    """The conversation as one string, special tokens written by name (as HF's template renders)."""
    names = {"bos": tok.id_to_token(tok.bos_id), "eos": tok.id_to_token(tok.eos_id)}
    return "".join(names[p.special] if p.special else p.text
                   for p in render_pieces(messages, add_bos, add_generation_prompt))


def tokenize_conversation(messages: Sequence[dict], tok: Tokenizer, add_bos: bool = True,
                          add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Render and tokenize: ``(ids, trainable)``, two lists of the same length."""
    ids, mask = tokenize_conversation_arrays(messages, tok, add_bos, add_generation_prompt)
    return ids.tolist(), mask.tolist()


def tokenize_conversation_arrays(messages: Sequence[dict], tok: Tokenizer, add_bos: bool = True,
                                 add_generation_prompt: bool = False
                                 ) -> tuple[np.ndarray, np.ndarray]:
    """As :func:`tokenize_conversation`, as int64 [n] ids and bool [n] mask (the fast path)."""
    ids: list[np.ndarray] = []
    mask: list[np.ndarray] = []
    run: list[Piece] = []
    for piece in render_pieces(messages, add_bos, add_generation_prompt):
        if piece.special is None:
            run.append(piece)
            continue
        _flush_text(run, tok, ids, mask)
        run = []
        ids.append(np.array([tok.bos_id if piece.special == "bos" else tok.eos_id]))
        mask.append(np.array([piece.trainable]))
    _flush_text(run, tok, ids, mask)
    if not ids:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    return np.concatenate(ids).astype(np.int64, copy=False), np.concatenate(mask)


def _flush_text(run: list[Piece], tok: Tokenizer, ids: list, mask: list) -> None:
    """Tokenize a run of text pieces as one string; a token's mask is its first byte's piece's."""
    if not run:
        return
    encoded = [p.text.encode("utf-8") for p in run]
    run_ids, starts = tok.encode_with_offsets(b"".join(encoded).decode("utf-8"))
    piece_ends = np.cumsum([len(e) for e in encoded])
    which = np.searchsorted(piece_ends, starts, side="right")
    trainable = np.array([p.trainable for p in run])
    ids.append(run_ids)
    mask.append(trainable[np.minimum(which, len(run) - 1)])


def generation_prompt_ids(messages: Sequence[dict], tok: Tokenizer, add_bos: bool = True
                          ) -> list[int]:
    """Ids of the conversation followed by ``<|assistant|>\\n``: what a policy continues from."""
    return tokenize_conversation(messages, tok, add_bos, add_generation_prompt=True)[0]
