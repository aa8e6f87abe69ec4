"""Tests for voice_lib.data.text against the real espeak-ng and pypinyin (no mocks)."""
from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voice_lib.data.text import phonemes as T
from voice_lib.data.text.normalize import load_cases
from voice_lib.data.text import (
    PAUSE_TOKENS,
    SYMBOLS,
    SYMBOLS_VERSION,
    UNK,
    WORD_BOUNDARY,
    TextError,
    count_phones,
    frontend_cache_info,
    normalize_text,
    phonemes_to_ids,
    phonemize,
    split_by_script,
    split_sentences,
    symbol_to_id,
)

BOUNDED = settings(max_examples=200, deadline=None)


# --- inventory ---------------------------------------------------------------

def test_inventory_is_pinned():
    # Checkpoints store ids: any change to SYMBOLS must bump SYMBOLS_VERSION and this pin.
    digest = hashlib.sha256("\n".join(SYMBOLS).encode()).hexdigest()
    assert (SYMBOLS_VERSION, len(SYMBOLS)) == (1, 275)
    assert digest == "08405408c631646c2907201b904e6fad77c5bde0109e025dbd2e234be8a5c63c"
    assert SYMBOLS[:3] == ("<pad>", "<unk>", "|")
    assert len(set(SYMBOLS)) == len(SYMBOLS)
    assert all(symbol_to_id[s] == i for i, s in enumerate(SYMBOLS))


def test_phonemes_to_ids_never_fails():
    ids = phonemes_to_ids(["k", "æ", "t", "no-such-phone", "", "ao3", "🙂"])
    unk = symbol_to_id[UNK]
    assert ids[0] == symbol_to_id["k"] and ids[5] == symbol_to_id["ao3"]
    assert ids[3] == ids[4] == ids[6] == unk
    assert phonemes_to_ids([]) == []


def test_import_is_lazy():
    code = "import sys, voice_lib.data.text; print('phonemizer' in sys.modules, 'pypinyin' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# --- normalisation -----------------------------------------------------------

def test_digits_expanded_in_english():
    assert normalize_text("I have 3 cats", "en") == "I have three cats"
    assert normalize_text("It costs 1,250,000.", "en") == "It costs one million two hundred fifty thousand."
    assert normalize_text("pi is 3.14", "en") == "pi is three point one four"
    assert normalize_text("the 21st and 3rd, 50% off", "en") == "the twenty first and third, fifty percent off"
    assert not re.search(r"\d", normalize_text("Call 0044 or 12345678901234 at -5", "en"))


def test_mandarin_digits_read_as_numerals():
    assert normalize_text("我有3个苹果", "zh") == "我有三个苹果"


def test_auto_normalises_per_script():
    # Mandarin runs are read by the Mandarin grammar: 3 → 三
    assert normalize_text("I have 2 cats 和3只狗", "auto") == "I have two cats 和三只狗"


CASES = load_cases()


def test_normalisation_table_covers_every_category_in_both_languages():
    assert len(CASES) >= 60
    categories = {"date", "time", "year", "currency", "unit", "ordinal", "phone", "url", "email", "number"}
    assert {c.category for c in CASES if c.language == "en"} >= categories | {"abbreviation"}
    assert {c.category for c in CASES if c.language == "zh"} >= categories


@pytest.mark.parametrize("case", CASES, ids=[f"{c.language}-{c.category}-{c.written[:24]}" for c in CASES])
def test_normalisation_table(case):
    """The shipped table (docs/text.md shows it): every written form is read as a person would."""
    spoken = normalize_text(case.written, case.language)
    assert case.accepts(spoken), f"{case.written!r} read as {spoken!r}; expected one of {case.spoken}"


def test_normalisation_reads_what_the_issue_reported():
    # Each of these was misread by the regex normaliser ("ten:thirty", "threekg", "Main saint", ...).
    assert normalize_text("10:30", "en") == "ten thirty"
    assert normalize_text("2024-05-01", "en") == "the first of may twenty twenty four"
    assert normalize_text("$3.25", "en") == "three dollars twenty five cents"
    assert normalize_text("1999", "en") == "nineteen ninety nine"
    assert normalize_text("3kg", "en") == "three kilograms"
    assert normalize_text("Main St.", "en") == "Main Street."


def test_grammar_failures_fall_back_to_the_written_token():
    # wetext's parser raises on some symbol runs; the text is still read, token by token.
    assert normalize_text("#1 and π≈3.14", "en") == "number one and pi ≈ three point one four"
    assert normalize_text("a  b   c", "en") == "a b c"


def test_control_characters_stripped_and_whitespace_collapsed():
    assert normalize_text("he\x00llo\u200b\x07  \t\nworld\r\n", "en") == "hello world"
    assert normalize_text("ｆｕｌｌ　ｗｉｄｔｈ，", "en") == "full width,"  # NFKC


@pytest.mark.parametrize("bad", ["", "   ", "\x00\x01\u200b", "\n\t"])
def test_empty_text_raises_text_error(bad):
    with pytest.raises(TextError, match="empty after normalisation"):
        normalize_text(bad, "en")
    with pytest.raises(TextError, match="empty"):
        phonemize(bad, "auto")
    assert issubclass(TextError, ValueError)


def test_unpronounceable_text_raises_text_error():
    with pytest.raises(TextError, match="nothing pronounceable"):
        phonemize("... !!! ,,,", "en")


def test_unknown_language_raises_text_error():
    with pytest.raises(TextError, match="unsupported language"):
        phonemize("hello", "fr")


# --- script splitting ----------------------------------------------------------

def test_split_by_script_mixed():
    assert split_by_script("我喜欢 Python 编程，really!") == [
        ("zh", "我喜欢 "), ("en", "Python "), ("zh", "编程，"), ("en", "really!")]
    assert split_by_script("2024年 ok") == [("zh", "2024年 "), ("en", "ok")]
    assert split_by_script("123 !") == [("en", "123 !")]
    assert split_by_script("") == []


# --- phonemisation -------------------------------------------------------------

def test_english_phonemes():
    phones = phonemize("cat", "en")
    assert {"k", "æ", "t"} <= set(phones)
    assert phones == ["k", "ˈ", "æ", "t"]  # stress marks are separate tokens
    sentence = phonemize("Hello, world! How are you?", "en")
    assert sentence[-1] == "?" and "," in sentence and "!" in sentence
    assert WORD_BOUNDARY in sentence
    assert all(p in symbol_to_id for p in sentence)


def test_mandarin_phonemes():
    assert phonemize("你好", "zh") == ["n", "i3", "h", "ao3"]
    assert phonemize("我的。", "zh") == ["w", "o3", "d", "e5", "."]  # neutral tone is 5
    assert phonemize("嗯", "zh") == ["n2"]  # syllabic nasal is a final, not n + g2
    assert all(p in symbol_to_id for p in phonemize("中华人民共和国，绿色的女孩儿！", "zh"))


def test_auto_mixed_text():
    phones = phonemize("我喜欢Python。", "auto")
    assert phones[:6] == ["w", "o3", "x", "i3", "h", "uan1"]
    assert phones[-1] == "."
    assert "aɪ" in phones and WORD_BOUNDARY in phones


def test_count_phones_excludes_boundaries_and_pauses():
    assert count_phones("cat", "en") == 3
    assert count_phones("你好！", "zh") == 4
    assert count_phones("cat, cat.", "en") == 6


def test_cache_hit_is_counted():
    text = "The cache should remember this exact sentence."
    phonemize(text, "en")
    before = frontend_cache_info()
    again = phonemize(text, "en")
    after = frontend_cache_info()
    assert after["hits"] == before["hits"] + 1 and after["misses"] == before["misses"]
    assert 0.0 < after["hit_rate"] <= 1.0
    again.append("mutated")  # callers get a copy, the cached value is immutable
    assert phonemize(text, "en")[-1] == "."


def test_configure_cache_size():
    try:
        T.configure_frontend_cache(maxsize=2)
        for word in ("one", "two", "three", "one"):
            phonemize(word, "en")
        info = frontend_cache_info()
        assert info["maxsize"] == 2 and info["currsize"] == 2 and info["misses"] == 4
    finally:
        T.configure_frontend_cache()


def test_phonemize_is_thread_safe():
    texts = [f"Sentence number {i} for thread safety." for i in range(40)]
    expected = {t: phonemize(t, "en") for t in texts}
    T.configure_frontend_cache()  # empty the cache so threads really hit espeak
    errors: list[Exception] = []

    def work(chunk: list[str]) -> None:
        try:
            for t in chunk:
                assert phonemize(t, "en") == expected[t]
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(texts[i::4],)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors


@BOUNDED
@given(st.text(max_size=80))
def test_phonemize_arbitrary_unicode_gives_ids_or_text_error(text):
    for language in ("auto", "en", "zh"):
        try:
            phones = phonemize(text, language)
        except TextError:
            continue
        ids = phonemes_to_ids(phones)
        assert ids and all(0 <= i < len(SYMBOLS) for i in ids)
        assert phones[0] not in PAUSE_TOKENS and phones[0] != WORD_BOUNDARY


# --- sentence splitting ----------------------------------------------------------

def test_split_sentences_examples():
    assert split_sentences("Hello world. This is a test! Is it? Yes.") == [
        "Hello world.", "This is a test!", "Is it?", "Yes."]
    assert split_sentences("Hello world. This is a test!", max_chars=20) == [
        "Hello world.", "This is a test!"]
    assert split_sentences("第一句。第二句！", max_chars=5) == ["第一句。", "第二句！"]
    assert split_sentences("Dr. Smith came. He left.", max_chars=16) == ["Dr. Smith came.", "He left."]
    assert split_sentences("one, two, three, four", max_chars=10) == ["one, two,", "three,", "four"]
    assert split_sentences("x" * 25, max_chars=10) == ["x" * 10, "x" * 10, "x" * 5]
    assert split_sentences("   ") == []
    with pytest.raises(ValueError):
        split_sentences("abc", max_chars=0)


_words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz.,;:!?'你好。，！", min_size=1, max_size=15)
_separators = st.sampled_from([" ", "  ", "\n", " \t"])


@BOUNDED
@given(st.lists(st.tuples(_words, _separators), max_size=40), st.integers(min_value=15, max_value=120))
def test_split_sentences_properties(parts, max_chars):
    text = "".join(word + sep for word, sep in parts)
    chunks = split_sentences(text, max_chars=max_chars)
    assert all(0 < len(c) <= max_chars for c in chunks)
    assert "".join("".join(chunks).split()) == "".join(text.split())
    # No split inside a whitespace-delimited word that has no internal break point.
    breakable = re.compile(r"[.!?,;:。！，你好]")
    for word, _ in parts:
        if not breakable.search(word):
            assert any(word in c for c in chunks)


def test_missing_espeak_gives_clear_text_error(tmp_path):
    # A real process pointed at a library path that does not exist, as on a box without espeak-ng.
    code = (
        "from voice_lib.data.text import phonemize, TextError\n"
        "try:\n    phonemize('hello', 'en')\nexcept TextError as e:\n    print(e)\n"
        "print(phonemize('你好', 'zh'))\n"
    )
    env = {"PHONEMIZER_ESPEAK_LIBRARY": str(tmp_path / "libespeak-ng.so"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.startswith("espeak-ng is not installed: apt-get install espeak-ng")
    assert "['n', 'i3', 'h', 'ao3']" in out.stdout  # Mandarin does not need espeak


def test_han_is_read_as_mandarin_even_for_english():
    assert phonemize("你好 hello", "en")[:5] == ["n", "i3", "h", "ao3", WORD_BOUNDARY]
