"""Tokenising very long texts in bounded memory: each is cut to a prefix that keeps every token ``encode`` keeps.

A fast tokenizer holds, for every token of a text, its id, string, offsets and word, and keeps what truncation cuts
off as "overflowing" encodings: one 30 MB single-line text made ``encode`` peak at about 5 GB of memory although only
its first ``max_length`` tokens are kept. ``cap_long_texts`` hands ``encode`` prefixes of the long texts instead,
chosen so that the truncated tokenisation is identical to that of the whole texts.

Why a prefix keeps the tokens: it ends right before a run of whitespace of the text. The tokenizers accepted
(``cut_characters``) normalise character by character and pre-tokenise into pieces that never cross whitespace
(BERT's pre-tokenizer, ``Whitespace``, ``WhitespaceSplit``, ``ByteLevel`` with its regex), and none of their added
tokens holds whitespace, so a prefix's tokens are the first tokens of the whole text. This is checked, not assumed, as
far as it matters: a prefix is taken only once it tokenises (no special tokens, no truncation) to at least
``max_length + PREFIX_MARGIN_TOKENS`` tokens, so that the tokens at the cut lie beyond the truncation point; a shorter
one is replaced by the prefix of a window four times larger, up to the whole text. A prefix taken is trimmed to end
at the first whitespace after its token ``max_length + PREFIX_MARGIN_TOKENS`` (counted again), so that what is
tokenised holds about that many tokens in any script. Other tokenizers get their texts whole, as before: with a
``Metaspace`` pre-tokenizer (it splits at spaces only) or a ``Split`` one, a ``Replace``, ``Prepend`` or
``Precompiled`` normaliser, or no fast backend.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CHARS_PER_TOKEN_BOUND = 64
"""A text longer than ``max_length * CHARS_PER_TOKEN_BOUND`` characters is cut to a prefix before tokenising.

A token covers at least one character (CJK, punctuation) and about four to five of English text, so a window of 64
characters per kept token nearly always holds enough tokens at the first try, even with long words or whitespace
runs, while it bounds what is tokenised to 32 K characters for ``max_length`` 512 (a few MB of tokenizer memory).
Ordinary texts are far below it and are tokenised whole, with no extra work."""

PREFIX_MARGIN_TOKENS = 16
"""Tokens a prefix must hold beyond ``max_length``, so that the tokens at its cut are never among those kept."""

COUNT_CHUNK_CHARS = 1 << 18
"""Characters per piece (cut before whitespace) when counting a whole long text's tokens (``count_tokens``)."""

WHITESPACE = " \t\n\r"
"""The characters a cut goes before: whitespace to every tokenizer accepted, which no normaliser removes or joins."""

_SAFE_NORMALIZERS = frozenset({"BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents"})
_SAFE_PRE_TOKENIZERS = frozenset({"BertPreTokenizer", "Whitespace", "WhitespaceSplit"})


@dataclass(frozen=True)
class _Prefix:
    """A prefix ``text`` of a longer text, its token count ``tokens``, and the ``window`` it was cut from."""

    text: str
    tokens: int
    window: int


def cap_long_texts(
    tokenizer: PreTrainedTokenizerBase, texts: list[Any], text_pairs: list[Any] | None, max_length: int
) -> tuple[list[Any], list[Any] | None]:
    """``texts`` and ``text_pairs`` with every string longer than ``max_length * CHARS_PER_TOKEN_BOUND`` characters
    cut to a prefix, such that tokenising them with ``truncation=True, max_length=max_length`` gives exactly the ids
    of the whole texts, in memory bounded by the prefixes (see the module's docstring for how and for which
    tokenizers). Anything but a string is passed on untouched, for the tokenizer to reject.

    Pairs are truncated longest segment first on their full token counts; with an odd budget (``max_length`` less a
    pair's special tokens) the segment longer in full (the second on a tie) keeps the extra token when both are
    truncated. ``cap_pair`` keeps that order: its cost is counting both long segments' tokens in pieces
    (``count_tokens``) when both are long and the budget is odd; a segment long in characters but without whitespace
    to cut at is tokenised whole.
    """
    threshold = max_length * CHARS_PER_TOKEN_BOUND
    if not any(isinstance(text, str) and len(text) > threshold for text in [*texts, *(text_pairs or [])]):
        return texts, text_pairs
    whitespace = cut_characters(tokenizer)
    if whitespace is None:
        return texts, text_pairs
    if text_pairs is None:
        return [
            cap_single(tokenizer, text, max_length, whitespace) if isinstance(text, str) else text for text in texts
        ], None
    capped = [
        cap_pair(tokenizer, text, pair, max_length, whitespace)
        if isinstance(text, str) and isinstance(pair, str)
        else (text, pair)
        for text, pair in zip(texts, text_pairs, strict=True)
    ]
    return [first for first, _ in capped], [second for _, second in capped]


def cap_single(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int, whitespace: str) -> str:
    """The shortest prefix of ``text`` cut before ``whitespace`` from windows of ``max_length *
    CHARS_PER_TOKEN_BOUND`` characters, four times larger each try, that holds ``max_length +
    PREFIX_MARGIN_TOKENS`` tokens; ``text`` itself when none does."""
    prefix = _prefix(tokenizer, text, max_length + PREFIX_MARGIN_TOKENS, max_length * CHARS_PER_TOKEN_BOUND, whitespace)
    return text if prefix is None else prefix.text


def cap_pair(
    tokenizer: PreTrainedTokenizerBase, text: str, text_pair: str, max_length: int, whitespace: str
) -> tuple[str, str]:
    """``(text, text_pair)`` with each long segment cut as ``cap_single`` cuts it and, when the budget is odd, the
    cut of the segment that keeps the extra token grown until its token count beats the other's (more for the first
    segment, at least as many for the second), so the tokenizer picks the same segment as on the whole texts.

    The segments' counts decide the truncation (``tokenizers``' ``longest_first``): with ``s`` the smaller count and
    budget ``B``, ``2 s <= B`` keeps the shorter whole and gives the longer ``B - s``; otherwise each keeps ``B // 2``
    and the longer in full (the second on a tie) one more when ``B`` is odd. A cut segment holds more than ``B``
    tokens, as its whole does, so only the order of the counts can change the result, and only for an odd ``B``.
    """
    need = max_length + PREFIX_MARGIN_TOKENS
    window = max_length * CHARS_PER_TOKEN_BOUND
    first = _prefix(tokenizer, text, need, window, whitespace)
    second = _prefix(tokenizer, text_pair, need, window, whitespace)
    budget = max_length - tokenizer.num_special_tokens_to_add(pair=True)
    if budget % 2 == 1 and (first is not None or second is not None):
        if first is not None and (
            second is None or count_tokens(tokenizer, text, whitespace) > count_tokens(tokenizer, text_pair, whitespace)
        ):
            other = count_tokens(tokenizer, text_pair, whitespace) if second is None else second.tokens
            first = _outgrow(tokenizer, text, first, other + 1, whitespace)
        elif second is not None:
            other = count_tokens(tokenizer, text, whitespace) if first is None else first.tokens
            second = _outgrow(tokenizer, text_pair, second, other, whitespace)
    return (text if first is None else first.text), (text_pair if second is None else second.text)


def count_tokens(tokenizer: PreTrainedTokenizerBase, text: str, whitespace: str) -> int:
    """The number of tokens of ``text`` (no special tokens, no truncation), counted piece by piece: pieces of about
    ``COUNT_CHUNK_CHARS`` characters cut before ``whitespace`` (larger where whitespace is rarer), so that memory
    stays bounded by a piece and no token id is stored."""
    total = 0
    start = 0
    while start < len(text):
        end = _piece_end(text, start, COUNT_CHUNK_CHARS, whitespace)
        total += _count(tokenizer, text[start:end])
        start = end
    return total


def cut_characters(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """``WHITESPACE`` when a cut before it keeps ``tokenizer``'s tokens (see the module's docstring), else ``None``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    normalizer = _state(backend.normalizer)
    pre_tokenizer = _state(backend.pre_tokenizer)
    if not (
        _safe(normalizer, _SAFE_NORMALIZERS, "normalizers")
        and _safe(pre_tokenizer, _SAFE_PRE_TOKENIZERS, "pretokenizers")
    ):
        return None
    added = backend.get_added_tokens_decoder().values()
    if any(char in token.content for token in added for char in WHITESPACE):
        return None
    return WHITESPACE


def _state(component: Any) -> dict[str, Any] | None:
    """The JSON description of a ``tokenizers`` normaliser or pre-tokenizer, ``None`` for none."""
    return None if component is None else json.loads(component.__getstate__())


def _safe(state: dict[str, Any] | None, safe: frozenset[str], members: str) -> bool:
    """Whether the component described by ``state`` (a ``Sequence`` lists its parts under ``members``) is all of
    types in ``safe``, or a ``ByteLevel`` pre-tokenizer that splits with its regex."""
    if state is None:
        return True
    if state["type"] == "Sequence":
        return all(_safe(part, safe, members) for part in state[members])
    if state["type"] == "ByteLevel" and members == "pretokenizers":
        return bool(state.get("use_regex", True))
    return state["type"] in safe


def _prefix(tokenizer: PreTrainedTokenizerBase, text: str, need: int, window: int, whitespace: str) -> _Prefix | None:
    """The first prefix cut by ``_piece_end`` from windows ``window``, ``4 * window``, ... that holds ``need``
    tokens, trimmed by ``_trim``; ``None`` when the window reaches the whole text first."""
    while window < len(text):
        end = _piece_end(text, 0, window, whitespace)
        if end == len(text):
            return None
        offsets = _offsets(tokenizer, text[:end])
        if len(offsets) >= need:
            return _trim(
                tokenizer, text, _Prefix(text[:end], len(offsets), window), offsets[need - 1][1], need, whitespace
            )
        window = 4 * max(window, end)
    return None


def _trim(
    tokenizer: PreTrainedTokenizerBase, text: str, prefix: _Prefix, stop: int, need: int, whitespace: str
) -> _Prefix:
    """``prefix`` cut before the first run of ``whitespace`` at or after character ``stop`` (where its ``need``-th
    token ends) if that still holds ``need`` tokens, so that a prefix holds about ``need`` tokens whatever the
    script (a pair's truncation keeps every combination of the two segments' overflowing windows, which grows with
    the square of the tokens beyond ``max_length``); ``prefix`` itself otherwise."""
    found = [position for char in whitespace if (position := text.find(char, stop, len(prefix.text) + 1)) >= 0]
    end = len(text[: min(found)].rstrip(whitespace))
    if end >= len(prefix.text):
        return prefix
    tokens = _count(tokenizer, text[:end])
    return _Prefix(text[:end], tokens, prefix.window) if tokens >= need else prefix


def _outgrow(
    tokenizer: PreTrainedTokenizerBase, text: str, prefix: _Prefix, need: int, whitespace: str
) -> _Prefix | None:
    """``prefix`` if it holds ``need`` tokens, else the first longer prefix of ``text`` that does (``_prefix`` from
    a window four times ``prefix``'s), ``None`` for the whole text."""
    return prefix if prefix.tokens >= need else _prefix(tokenizer, text, need, 4 * prefix.window, whitespace)


def _piece_end(text: str, start: int, window: int, whitespace: str) -> int:
    """The end of the longest non-empty piece ``text[start:end]`` inside ``text[start:start + window]`` that is
    followed by a run of ``whitespace`` and does not end with it; the window grows four times until one is found,
    else ``len(text)``."""
    while start + window < len(text):
        position = max(text.rfind(char, start, start + window) for char in whitespace)
        if position > start:
            end = start + len(text[start:position].rstrip(whitespace))
            if end > start:
                return end
        window *= 4
    return len(text)


def _count(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """The number of tokens of ``text``, without special tokens or truncation."""
    return len(_encoding(tokenizer, text, offsets=False)["input_ids"])


def _offsets(tokenizer: PreTrainedTokenizerBase, text: str) -> list[tuple[int, int]]:
    """The character span of each token of ``text``, without special tokens or truncation."""
    return _encoding(tokenizer, text, offsets=True)["offset_mapping"]


def _encoding(tokenizer: PreTrainedTokenizerBase, text: str, *, offsets: bool) -> Any:
    """``tokenizer``'s encoding of ``text`` alone: ids, with their character spans when ``offsets``."""
    return tokenizer(
        text,
        add_special_tokens=False,
        truncation=False,
        return_attention_mask=False,
        return_token_type_ids=False,
        return_offsets_mapping=offsets,
        verbose=False,
    )
