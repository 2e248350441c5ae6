"""Tokenizers: a Llama 3 tiktoken file, a sentencepiece model, or an HF directory holding either.

Every backend exposes the same small surface (:class:`Tokenizer`): ``encode`` (plain text, no
special tokens), ``decode``, ``bos_id`` / ``eos_id`` / ``pad_id``, ``vocab_size`` (specials
included) and a stable ``name`` for cache keys. ``encode_with_offsets`` also returns the UTF-8 byte
offset where each token starts: the chat template uses it to tokenize a whole conversation at once
(exactly as the released Tülu 3 models saw it) and still know which tokens came from assistant text.

Llama 3's ``tokenizer.model`` is a text file of ``base64(token_bytes) rank`` lines (128000 of them);
Meta's tokenizer numbers 256 special tokens after them. The special-token names below are the
Llama 3.1 ones (as in its HF ``tokenizer.json``); the ids that matter (begin/end of text, header
ids, eot) are at the same offsets in every Llama 3 release.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import regex

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_LLAMA3_SPECIAL = 256
BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"


def llama3_special_tokens() -> list[str]:
    """The 256 Llama 3.1 special tokens in id order (id = number of base tokens + position)."""
    named = [
        BEGIN_OF_TEXT, END_OF_TEXT, "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>",
        "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
    ]
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + NUM_LLAMA3_SPECIAL - 11)]
    return named + reserved


class Tokenizer:
    """The interface every backend implements; ``name`` changes whenever the ids could change."""

    name: str
    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids. Special-token strings in ``text`` stay text (no injection)."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """int64 [n] ids as :meth:`encode`, and int64 [n] UTF-8 byte offset where each starts."""
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        """Id of a special token or single vocabulary entry, or None."""
        raise NotImplementedError

    def id_to_token(self, token_id: int) -> str:
        """Printable form of one id (special tokens by name)."""
        raise NotImplementedError

    def _resolve(self, token: str | None, defaults: Sequence[str], fallback: int) -> int:
        if token is not None:
            token_id = self.token_to_id(token)
            if token_id is None:
                raise ValueError(f"token {token!r} is not in the tokenizer's vocabulary")
            return token_id
        for candidate in defaults:
            token_id = self.token_to_id(candidate)
            if token_id is not None:
                return token_id
        return fallback


class TiktokenTokenizer(Tokenizer):
    """Byte-level BPE via tiktoken: ``ranks`` maps token bytes -> id, ``specials`` name -> id."""

    def __init__(self, ranks: dict[bytes, int], specials: dict[str, int], digest: str,
                 pattern: str = LLAMA3_PATTERN, bos: str | None = None, eos: str | None = None,
                 pad: str | None = None):
        import tiktoken

        self._enc = tiktoken.Encoding(f"tulu3-{digest}", pat_str=pattern, mergeable_ranks=ranks,
                                      special_tokens=specials)
        self._specials = specials
        self._id_to_special = {i: s for s, i in specials.items()}
        self.vocab_size = max([*ranks.values(), *specials.values()]) + 1
        # Byte length of every base token, so offsets are a cumsum (no per-token Python work).
        self._byte_len = np.zeros(self.vocab_size, dtype=np.int64)
        for token, rank in ranks.items():
            self._byte_len[rank] = len(token)
        self._ranks = ranks
        self.bos_id = self._resolve(bos, [BEGIN_OF_TEXT, "<s>"], -1)
        self.eos_id = self._resolve(eos, [END_OF_TEXT, "</s>"], -1)
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError("tokenizer has no begin/end-of-text token: pass bos= and eos=")
        self.pad_id = self._resolve(pad, ["<pad>", "<|finetune_right_pad_id|>"], self.eos_id)
        self.name = f"tiktoken-{digest}-b{self.bos_id}-e{self.eos_id}-p{self.pad_id}"

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        try:  # straight into numpy: no Python list of ints on the hot path
            ids = self._enc.encode_to_numpy(text, disallowed_special=()).astype(np.int64)
        except UnicodeEncodeError:  # lone surrogates: encode_ordinary repairs them
            ids = np.asarray(self._enc.encode_ordinary(text), dtype=np.int64)
        lengths = self._byte_len[ids]
        return ids, np.cumsum(lengths) - lengths

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode([int(i) for i in ids])

    def token_to_id(self, token: str) -> int | None:
        if token in self._specials:
            return self._specials[token]
        return self._ranks.get(token.encode("utf-8"))

    def id_to_token(self, token_id: int) -> str:
        if token_id in self._id_to_special:
            return self._id_to_special[token_id]
        return self._enc.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model`` (Llama 2 style). Offsets come from sentencepiece's own spans."""

    def __init__(self, path: str, digest: str, bos: str | None = None, eos: str | None = None,
                 pad: str | None = None):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._resolve(bos, [], self._sp.bos_id())
        self.eos_id = self._resolve(eos, [], self._sp.eos_id())
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{path}: sentencepiece model has no bos/eos: pass bos= and eos=")
        self.pad_id = self._resolve(pad, [], self._sp.pad_id() if self._sp.pad_id() >= 0
                                    else self.eos_id)
        self.name = f"sentencepiece-{digest}-b{self.bos_id}-e{self.eos_id}-p{self.pad_id}"

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        try:  # sentencepiece >= 0.2.3
            out = self._sp.encode(text, return_type="offset_mapping", return_bytes=True)
            ids, starts = out["ids"], [b for b, _ in out["offsets"]]
        except (TypeError, ValueError):  # older releases: spans (in UTF-8 bytes) via the proto
            pieces = self._sp.encode(text, out_type="immutable_proto").pieces
            ids, starts = [p.id for p in pieces], [p.begin for p in pieces]
        return np.asarray(ids, dtype=np.int64), np.asarray(starts, dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_to_id(self, token: str) -> int | None:
        token_id = self._sp.piece_to_id(token)
        return token_id if self._sp.id_to_piece(token_id) == token else None

    def id_to_token(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))


def load_tokenizer(path: str, bos: str | None = None, eos: str | None = None,
                   pad: str | None = None) -> Tokenizer:
    """Load a Llama 3 tiktoken file, a sentencepiece model, an HF byte-level ``tokenizer.json``,
    or a directory holding one of them (``tokenizer.model``, ``original/tokenizer.model``,
    ``tokenizer.json``). ``bos``/``eos``/``pad`` name tokens that override the defaults
    (Llama 3: ``<|begin_of_text|>``, ``<|end_of_text|>`` as Tülu 3 chose, pad ``<pad>`` if present,
    else ``<|finetune_right_pad_id|>``, else eos). ``tokenizer_config.json`` is not consulted, so an
    Instruct checkpoint's ``<|eot_id|>`` eos does not silently replace Tülu 3's choice."""
    file = _find_tokenizer_file(Path(path))
    data = file.read_bytes()
    if not data.strip():
        from tulu3.config import UserError

        raise UserError(f"{file}: the tokenizer file is empty (an interrupted download or "
                        "copy?): copy it again")
    digest = hashlib.sha256(data).hexdigest()[:16]
    if file.suffix == ".json":
        ranks, specials, pattern = _read_hf_tokenizer_json(data, file)
        return TiktokenTokenizer(ranks, specials, digest, pattern, bos, eos, pad)
    if _looks_like_tiktoken(data):
        ranks = _read_tiktoken_ranks(data, file)
        specials = {s: len(ranks) + i for i, s in enumerate(llama3_special_tokens())}
        return TiktokenTokenizer(ranks, specials, digest, LLAMA3_PATTERN, bos, eos, pad)
    return SentencePieceTokenizer(str(file), digest, bos, eos, pad)


def _find_tokenizer_file(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        for name in ("tokenizer.model", "original/tokenizer.model", "tokenizer.json"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: no tokenizer.model, original/tokenizer.model or "
                                "tokenizer.json in this directory")
    raise FileNotFoundError(f"tokenizer not found: {path}")


def _looks_like_tiktoken(data: bytes) -> bool:
    first = data[:200].split(b"\n", 1)[0].split()
    if len(first) != 2 or not first[1].isdigit():
        return False
    try:
        base64.b64decode(first[0], validate=True)
    except ValueError:
        return False
    return True


def _read_tiktoken_ranks(data: bytes, file: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as err:
            raise ValueError(f"{file}:{lineno}: not a 'base64 rank' line ({err})") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{file}: ranks are not 0..{len(ranks) - 1} without gaps")
    return ranks


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by HF byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _read_hf_tokenizer_json(data: bytes, file: Path
                            ) -> tuple[dict[bytes, int], dict[str, int], str]:
    """Byte-level BPE ``tokenizer.json`` (Llama 3 style: ids are merge ranks) -> tiktoken tables."""
    spec = json.loads(data)
    model = spec.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ValueError(f"{file}: only byte-level BPE tokenizer.json files are supported")
    decoder = {c: b for b, c in _bytes_to_unicode().items()}
    ranks = {bytes(decoder[c] for c in piece): i for piece, i in model["vocab"].items()}
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    for name in specials:
        ranks.pop(name.encode("utf-8"), None)
    pattern = LLAMA3_PATTERN
    for pre in spec["pre_tokenizer"].get("pretokenizers", [spec["pre_tokenizer"]]):
        if pre.get("type") == "Split" and "Regex" in pre.get("pattern", {}):
            pattern = pre["pattern"]["Regex"]
    return ranks, specials, pattern


def train_bpe(texts: Sequence[str], num_merges: int, pattern: str = LLAMA3_PATTERN) -> list[bytes]:
    """Greedy byte-level BPE: the ``num_merges`` merged tokens in the order they were learned.

    Each step merges the most frequent adjacent pair (ties -> smallest bytes: deterministic)
    within the regex pre-tokens, as GPT-2/Llama 3 tokenizers were trained. Sized for test corpora.
    """
    words = Counter(chunk.encode("utf-8") for text in texts
                    for chunk in regex.findall(pattern, text))
    pieces = [[bytes([b]) for b in word] for word in words]
    freqs = list(words.values())
    known = {bytes([b]) for b in range(256)}
    merged: list[bytes] = []
    while len(merged) < num_merges:
        pairs: Counter = Counter()
        for word, freq in zip(pieces, freqs):
            for pair in itertools.pairwise(word):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p[0] + p[1], p[0]))
        pieces = [_merge_pair(word, best) for word in pieces]
        if best[0] + best[1] not in known:
            known.add(best[0] + best[1])
            merged.append(best[0] + best[1])
    return merged


def _merge_pair(word: list[bytes], pair: tuple[bytes, bytes]) -> list[bytes]:
    if len(word) < 2:
        return word
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def build_tiny_tiktoken(path: str, texts: list[str], num_merges: int) -> str:
    """Write a small Llama-3-format tiktoken file learned from ``texts``; returns ``path``.

    Ranks 0..255 are the single bytes, then the merges in learned order; :func:`load_tokenizer` then
    numbers the 256 Llama 3 special tokens after them (vocab = 256 + merges + 256).
    """
    tokens = [bytes([b]) for b in range(256)] + train_bpe(texts, num_merges)
    lines = [f"{base64.b64encode(t).decode('ascii')} {rank}" for rank, t in enumerate(tokens)]
    from tulu3.data.loading import atomic_output

    with atomic_output(path) as f:
        f.write("\n".join(lines) + "\n")
    return path
