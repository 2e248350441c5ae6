"""Rows (Tülu 3's JSON formats) -> token-level examples for SFT, DPO and RLVR.

Row formats (DESIGN.md): SFT ``{"messages": [...]}``; DPO ``{"chosen": [...], "rejected": [...]}``
whose shared prefix is the prompt; RLVR ``{"messages": [...], "ground_truth": str,
"dataset": str}``.
A malformed row raises :class:`RowError` naming where it came from (``file:line``); the loader turns
that into skip-and-count when ``skip_bad_rows`` is set. An example that loses every trained token to
truncation is not an error: the tokenize functions return None and count the reason in ``stats``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tulu3.config import UserError
from tulu3.data.chat_template import (
    ROLES,
    generation_prompt_ids,
    tokenize_conversation,
    tokenize_conversation_arrays,
)
from tulu3.data.tokenizer import Tokenizer

IGNORE = -100


class RowError(UserError):
    """A malformed input row; the message starts with ``file:line``."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


@dataclass
class SFTExample:
    """``input_ids`` and ``labels``, aligned (labels[t] is input_ids[t] or IGNORE; NOT shifted)."""

    input_ids: list[int]
    labels: list[int]
    index: int = -1  # position in the dataset (example_ids in a micro-batch)


@dataclass
class DPOExample:
    """Prompt ids (template up to and including ``<|assistant|>\\n``) and the two response ids."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    index: int = -1


@dataclass
class RLVRPrompt:
    """A generation prompt with what the verifier needs."""

    prompt_ids: list[int]
    ground_truth: str
    dataset: str
    messages: list[dict] = field(default_factory=list)
    index: int = -1


def validate_messages(messages: object, where: str, key: str = "messages") -> list[dict]:
    """Check a message list: non-empty list of {role in ROLES, content: non-empty str}."""
    if not isinstance(messages, list) or not messages:
        raise RowError(where, f"'{key}' must be a non-empty list of messages, got "
                              f"{type(messages).__name__ if messages is not None else 'nothing'}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RowError(where, f"{key}[{i}] is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RowError(where, f"{key}[{i}] has role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise RowError(where, f"{key}[{i}] content must be a string, got "
                                  f"{type(content).__name__}")
        if not content.strip():
            raise RowError(where, f"{key}[{i}] ({role}) has empty content")
    return messages


def _require_dict(row: object, where: str) -> dict:
    if not isinstance(row, dict):
        raise RowError(where, f"row must be a JSON object, got {type(row).__name__}")
    return row


def tokenize_sft(row: dict, tok: Tokenizer, max_len: int, add_bos: bool = True,
                 where: str = "<row>", stats: Counter | None = None) -> SFTExample | None:
    """Template + mask, truncated to ``max_len`` tokens (keeping the start, as open-instruct).

    Returns None (counted as ``stats["dropped_no_trained_tokens"]``) when no trained token is left
    that the model could predict (position 0 is never a target).
    """
    arrays = sft_arrays(row, tok, max_len, add_bos, where, stats)
    if arrays is None:
        return None
    ids, mask = arrays
    return SFTExample(ids.tolist(), np.where(mask, ids, IGNORE).tolist())


def sft_arrays(row: dict, tok: Tokenizer, max_len: int, add_bos: bool = True,
               where: str = "<row>", stats: Counter | None = None
               ) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`tokenize_sft` as (int64 [n] ids, bool [n] trained): the dataset builder's path."""
    messages = sft_messages(row, where)
    ids, mask = tokenize_conversation_arrays(messages, tok, add_bos)
    ids, mask = ids[:max_len], mask[:max_len]
    if not mask[1:].any():
        _count(stats, "dropped_no_trained_tokens")
        return None
    return ids, mask


def sft_messages(row: object, where: str) -> list[dict]:
    """The checked messages of an SFT row (at least one assistant message to train on)."""
    messages = validate_messages(_require_dict(row, where).get("messages"), where)
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError(where, "no assistant message: nothing to train on")
    return messages


def dpo_prompt(row: dict, where: str) -> tuple[list[dict], dict, dict]:
    """Split a DPO row into (shared prompt messages, chosen reply, rejected reply)."""
    row = _require_dict(row, where)
    chosen = validate_messages(row.get("chosen"), where, "chosen")
    rejected = validate_messages(row.get("rejected"), where, "rejected")
    for key, conv in (("chosen", chosen), ("rejected", rejected)):
        if conv[-1]["role"] != "assistant":
            raise RowError(where, f"'{key}' must end with an assistant message")
        if len(conv) < 2:
            raise RowError(where, f"'{key}' has no prompt before its assistant message")
    prompt = [(m["role"], m["content"]) for m in chosen[:-1]]
    if prompt != [(m["role"], m["content"]) for m in rejected[:-1]]:
        differ = next((i for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1]))
                       if (a["role"], a["content"]) != (b["role"], b["content"])),
                      min(len(chosen), len(rejected)) - 1)
        raise RowError(where, f"chosen and rejected have different prompts (they differ at "
                              f"message {differ})")
    return chosen[:-1], chosen[-1], rejected[-1]


def _response_ids(prompt_ids: list[int], messages: list[dict], tok: Tokenizer,
                  add_bos: bool) -> list[int]:
    """Reply ids after the prompt, from tokenizing the whole conversation (exact ids). If the
    reply's first token merged across the boundary (a reply starting with a newline), fall back to
    the reply tokenized alone so both replies share the same prompt ids."""
    full, _ = tokenize_conversation(messages, tok, add_bos)
    if full[:len(prompt_ids)] == prompt_ids:
        return full[len(prompt_ids):]
    return tok.encode(messages[-1]["content"]) + [tok.eos_id]


def tokenize_dpo(row: dict, tok: Tokenizer, max_len: int, add_bos: bool = True,
                 where: str = "<row>", stats: Counter | None = None) -> DPOExample | None:
    """Prompt tokenized once; each reply truncated so prompt + reply <= ``max_len``.

    Returns None (``stats["dropped_prompt_too_long"]``) when the prompt leaves no room for a reply.
    """
    prompt, chosen, rejected = dpo_prompt(row, where)
    prompt_ids = generation_prompt_ids(prompt, tok, add_bos)
    room = max_len - len(prompt_ids)
    if room < 1:
        _count(stats, "dropped_prompt_too_long")
        return None
    replies = [_response_ids(prompt_ids, prompt + [reply], tok, add_bos)[:room]
               for reply in (chosen, rejected)]
    return DPOExample(prompt_ids, replies[0], replies[1])


def tokenize_rlvr(row: dict, tok: Tokenizer, max_len: int, add_bos: bool = True,
                  where: str = "<row>", stats: Counter | None = None) -> RLVRPrompt | None:
    """Prompt messages -> generation prompt ids; None (``stats["dropped_prompt_too_long"]``) when
    longer than ``max_len`` (the prompt budget; open-instruct filters such prompts too)."""
    messages, truth, dataset = rlvr_fields(row, where)
    prompt_ids = generation_prompt_ids(messages, tok, add_bos)
    if len(prompt_ids) > max_len:
        _count(stats, "dropped_prompt_too_long")
        return None
    return RLVRPrompt(prompt_ids, truth, dataset, messages)


def rlvr_fields(row: object, where: str) -> tuple[list[dict], str, str]:
    """(prompt messages, ground truth as a string, dataset name) of a checked RLVR row."""
    row = _require_dict(row, where)
    messages = validate_messages(row.get("messages"), where)
    if messages[-1]["role"] != "user":
        raise RowError(where, "an RLVR prompt must end with a user message")
    truth = _ground_truth(row)
    if truth is None:
        raise RowError(where, "RLVR row needs a non-empty 'ground_truth' (or IFEval's "
                              "'instruction_id_list' + 'kwargs')")
    dataset = row.get("dataset")
    if not isinstance(dataset, str) or not dataset.strip():
        raise RowError(where, "RLVR row needs a 'dataset' name (gsm8k, MATH, ifeval)")
    return messages, truth, dataset


def check_row(kind: str, row: object, where: str) -> str | None:
    """Check a row's schema for ``kind`` (sft | dpo | rlvr) without tokenizing; returns the RLVR
    row's dataset name (None for the other kinds). Raises :class:`RowError`."""
    if kind == "sft":
        sft_messages(row, where)
    elif kind == "dpo":
        dpo_prompt(row, where)  # type: ignore[arg-type]
    else:
        return rlvr_fields(row, where)[2]
    return None


def _ground_truth(row: dict) -> str | None:
    """The verifier's reference as a string: numbers are formatted, JSON values (IFEval's
    constraint dicts) are dumped, and IFEval's original columns are packed into one JSON object."""
    truth = row.get("ground_truth")
    if truth is None and "instruction_id_list" in row and "kwargs" in row:
        truth = {"instruction_id_list": row["instruction_id_list"], "kwargs": row["kwargs"]}
    if isinstance(truth, bool):
        return None
    if isinstance(truth, (int, float)):
        return str(truth)
    if isinstance(truth, (dict, list)) and truth:
        return json.dumps(truth)
    return truth if isinstance(truth, str) and truth.strip() else None


def _count(stats: Counter | None, key: str) -> None:
    if stats is not None:
        stats[key] += 1


def num_trained(example: SFTExample) -> int:
    """Tokens the loss will see (targets after the shift: positions 1..n-1)."""
    return sum(1 for label in example.labels[1:] if label != IGNORE)


def messages_text(messages: Sequence[dict], roles: Sequence[str] = ROLES) -> str:
    """Contents of the given roles joined by newlines (for curation and stats)."""
    return "\n".join(m["content"] for m in messages if m.get("role") in roles
                     and isinstance(m.get("content"), str))
