"""Text frontend shared by training, evaluation, the server and QC.

Turns raw text into a flat list of phone symbols and then into integer ids
from a fixed, versioned inventory (``SYMBOLS``).  English goes through
espeak-ng (via phonemizer), Mandarin through pypinyin (initial + tonal final);
mixed text is split per script.

Importing this module is cheap on purpose (it is reached from Airflow DAG
parsing): phonemizer, pypinyin and the espeak backend are loaded on first use.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import re
import threading
import unicodedata
from typing import Any, Literal

__all__ = [
    "TextError", "Language", "SYMBOLS_VERSION", "SYMBOLS", "PAD", "UNK", "WORD_BOUNDARY",
    "PAUSE_TOKENS", "STRESS_MARKS", "symbol_to_id", "normalize_text", "split_by_script",
    "phonemize", "phonemes_to_ids", "count_phones", "split_sentences",
    "frontend_cache_info", "configure_frontend_cache",
]

Language = Literal["en", "zh", "auto"]
_LANGUAGES = ("en", "zh", "auto")


class TextError(ValueError):
    """Text that cannot be turned into phones (empty, unpronounceable, no backend)."""


class FrontendUnavailable(TextError):
    """The G2P backend itself is missing or broken: no fault of the text (a server answers 5xx, not 422)."""


# ---------------------------------------------------------------------------
# Symbol inventory.  Model checkpoints store ids, so this list must only ever
# grow at the end, and any change must bump SYMBOLS_VERSION.
# ---------------------------------------------------------------------------
SYMBOLS_VERSION = 1
PAD, UNK, WORD_BOUNDARY = "<pad>", "<unk>", "|"
PAUSE_TOKENS = (",", ".", "?", "!")
STRESS_MARKS = ("ˈ", "ˌ")  # espeak prefixes stressed vowels; we emit them as separate tokens

# Union of every phone espeak-ng 1.51 (en-us, stress split off) produced over the
# ~125k words of the CMU dictionary (lower, upper and capitalised), random
# acronyms, ASCII characters and sentences.  Hard-coded so the ids never depend
# on the espeak build installed on a machine.
_EN_PHONES = (
    "aɪ", "aɪə", "aɪɚ", "aʊ", "b", "d", "dʒ", "eɪ", "f", "h", "i", "iə", "iː", "iːː",
    "j", "k", "l", "m", "n", "nʲ", "n̩", "o", "oʊ", "oː", "oːɹ", "p", "r", "s", "t",
    "tʃ", "uː", "v", "w", "x", "z", "æ", "ææ", "ð", "ŋ", "ɐ", "ɑː", "ɑːɹ", "ɑ̃", "ɔ",
    "ɔɪ", "ɔː", "ɔːɹ", "ɔ̃", "ə", "əl", "ɚ", "ɛ", "ɛɹ", "ɜː", "ɡ", "ɡʲ", "ɪ", "ɪɹ",
    "ɬ", "ɹ", "ɾ", "ʃ", "ʊ", "ʊɹ", "ʌ", "ʒ", "ʔ", "θ", "ᵻ",
)
# pypinyin with strict=False: y/w count as initials and ü after j/q/x/y is
# written "u", so initial + final always identifies the syllable.
_ZH_INITIALS = (
    "b", "p", "m", "f", "d", "t", "n", "l", "g", "k", "h", "j", "q", "x",
    "zh", "ch", "sh", "r", "z", "c", "s", "y", "w",
)
_ZH_FINALS = (
    "a", "ai", "an", "ang", "ao", "e", "ei", "en", "eng", "er", "i", "ia", "ian", "iang",
    "iao", "ie", "in", "ing", "iong", "iu", "o", "ong", "ou", "u", "ua", "uai", "uan",
    "uang", "ue", "ui", "un", "uo", "v", "ve", "m", "n", "ng", "ê",
)
_ZH_TONES = ("1", "2", "3", "4", "5")  # 5 = neutral tone

# dict.fromkeys de-duplicates while keeping first-seen order: pinyin initials
# spelled like an IPA phone (b, d, m, ...) share that phone's id.
SYMBOLS: tuple[str, ...] = tuple(dict.fromkeys((
    PAD, UNK, WORD_BOUNDARY, *PAUSE_TOKENS, *STRESS_MARKS, *_EN_PHONES, *_ZH_INITIALS,
    *(final + tone for final in _ZH_FINALS for tone in _ZH_TONES),
)))
symbol_to_id: dict[str, int] = {s: i for i, s in enumerate(SYMBOLS)}
_UNK_ID = symbol_to_id[UNK]
_NOT_PHONES = frozenset((PAD, WORD_BOUNDARY, *PAUSE_TOKENS, *STRESS_MARKS))


def phonemes_to_ids(phonemes: list[str]) -> list[int]:
    """Map phone symbols to ids; anything outside the inventory becomes the unk id."""
    return [symbol_to_id.get(p, _UNK_ID) for p in phonemes]


# ---------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------
_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
         "fourteen fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**9, "billion"), (10**6, "million"), (1000, "thousand"))
_ORDINAL_IRREGULAR = {"one": "first", "two": "second", "three": "third", "five": "fifth",
                      "eight": "eighth", "nine": "ninth", "twelve": "twelfth"}
_ABBREVIATIONS = {"mr": "mister", "mrs": "missus", "dr": "doctor", "st": "saint",
                  "vs": "versus", "etc": "et cetera", "e.g": "for example", "i.e": "that is"}

_ABBREV_RE = re.compile(r"\b(mrs|mr|dr|st|vs|etc|e\.g|i\.e)\.", re.IGNORECASE)
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_ORDINAL_RE = re.compile(r"\b(\d+)(st|nd|rd|th)\b", re.IGNORECASE)
_CURRENCY_RE = re.compile(r"\$(\d+(?:\.\d+)?)")
_PERCENT_RE = re.compile(r"(\d)\s?%")
_NUMBER_RE = re.compile(r"(?:(?<=\s)|^)-(?=\d)|\d+(?:\.\d+)?")
_WHITESPACE_RE = re.compile(r"\s+")


def _int_to_words(n: int) -> str:
    """English cardinal for 0 <= n < 10**12."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, rest = divmod(n, 10)
        return _TENS[tens] + (f" {_ONES[rest]}" if rest else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{_ONES[hundreds]} hundred" + (f" {_int_to_words(rest)}" if rest else "")
    for scale, name in _SCALES:
        if n >= scale:
            head, rest = divmod(n, scale)
            return f"{_int_to_words(head)} {name}" + (f" {_int_to_words(rest)}" if rest else "")
    raise AssertionError("unreachable")


def _digits_to_words(digits: str) -> str:
    return " ".join(_ONES[int(d)] for d in digits)


def _number_to_words(token: str) -> str:
    whole, _, frac = token.partition(".")
    # Very long numbers and zero-padded ones (codes, phone numbers) read best digit by digit.
    if len(whole) > 12 or (len(whole) > 1 and whole.startswith("0")):
        words = _digits_to_words(whole)
    else:
        words = _int_to_words(int(whole))
    return f"{words} point {_digits_to_words(frac)}" if frac else words


def _ordinal_to_words(match: re.Match[str]) -> str:
    *head, last = _number_to_words(match.group(1)).split(" ")
    if last in _ORDINAL_IRREGULAR:
        last = _ORDINAL_IRREGULAR[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return " ".join([*head, last])


def _expand_english(text: str) -> str:
    text = _ABBREV_RE.sub(lambda m: _ABBREVIATIONS[m.group(1).lower()], text)
    text = _THOUSANDS_RE.sub("", text)
    text = _ORDINAL_RE.sub(_ordinal_to_words, text)
    text = _CURRENCY_RE.sub(r"\1 dollars", text)
    text = _PERCENT_RE.sub(r"\1 percent", text)
    text = _NUMBER_RE.sub(lambda m: "minus " if m.group() == "-" else _number_to_words(m.group()), text)
    return text


def _expand_mandarin(text: str) -> str:
    # Thousands separators first, as in English: cn2an reads "1,000" as 一,零 (one, pause, zero).
    text = _THOUSANDS_RE.sub("", text)
    # cn2an is optional: without it digits stay and phonemize() reads them digit by digit.
    if re.search(r"\d", text) and importlib.util.find_spec("cn2an") is not None:
        text = importlib.import_module("cn2an").transform(text, "an2cn")
    return text


def _check_language(language: str) -> str:
    if language not in _LANGUAGES:
        raise TextError(f"unsupported language {language!r}; expected one of {_LANGUAGES}")
    return language


def _clean_char(ch: str) -> str:
    category = unicodedata.category(ch)
    if category in ("Zs", "Zl", "Zp") or ch in "\t\n\r\v\f\x85":
        return " "  # line breaks separate words, so they become spaces, not nothing
    if category[0] == "C":  # Cc control, Cf format (zero-width, BOM), Cs, Co, Cn
        return ""
    return ch


def normalize_text(text: str, language: Language) -> str:
    """NFKC, drop control/format characters, collapse whitespace, spell out numbers.

    English numbers become words; Mandarin numbers become Chinese numerals only
    when ``cn2an`` is installed.  ``language="auto"`` normalises each script run
    on its own.  Raises TextError when nothing is left.
    """
    _check_language(language)
    text = unicodedata.normalize("NFKC", text)
    text = "".join(_clean_char(ch) for ch in text).replace("‘", "'").replace("’", "'")
    text = _WHITESPACE_RE.sub(" ", text).strip()
    if language == "en":
        text = _expand_english(text)
    elif language == "zh":
        text = _expand_mandarin(text)
    else:
        text = "".join(_expand_english(run) if script == "en" else _expand_mandarin(run)
                       for script, run in split_by_script(text))
    text = _WHITESPACE_RE.sub(" ", text).strip()
    if not text:
        raise TextError("text is empty after normalisation (only whitespace/control characters?)")
    return text


# ---------------------------------------------------------------------------
# Script splitting
# ---------------------------------------------------------------------------
_HAN_RANGES = ((0x3007, 0x3007), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF),
               (0x20000, 0x2FA1F))
_HAN_CLASS = "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in _HAN_RANGES)  # same, for regexes


def _is_han(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _HAN_RANGES)


def split_by_script(text: str) -> list[tuple[str, str]]:
    """Split text into ("zh", ...) and ("en", ...) runs that concatenate back to ``text``.

    Han characters are "zh", every other letter is "en" (espeak is the only
    engine that can attempt it).  Digits, spaces and punctuation attach to the
    preceding run, or to the first run when they lead the text.
    """
    runs: list[tuple[str, list[str]]] = []
    leading: list[str] = []
    for ch in text:
        script = "zh" if _is_han(ch) else "en" if ch.isalpha() else None
        if script is None:
            (runs[-1][1] if runs else leading).append(ch)
        elif runs and runs[-1][0] == script:
            runs[-1][1].append(ch)
        else:
            runs.append((script, [*leading, ch]) if not runs else (script, [ch]))
            leading = []
    if not runs:
        return [("en", text)] if text else []
    return [(script, "".join(chars)) for script, chars in runs]


# ---------------------------------------------------------------------------
# Phonemisation
# ---------------------------------------------------------------------------
_PAUSE_MAP = {",": ",", ";": ",", ":": ",", "、": ",", "—": ",", "–": ",", "，": ",",
              "；": ",", "：": ",", ".": ".", "。": ".", "…": ".", "?": "?", "？": "?",
              "!": "!", "！": "!"}
# Dots only pause at the end of a word, so "U.S.A" and "node.js" reach espeak whole.
_PAUSE_RE = re.compile(r"\.{2,}|\.(?=\s|$)|[,;:!?、。！？，；：…—–]")
_SILENT_RE = re.compile(r"[\"()\[\]{}«»“”„「」『』《》〈〉¿¡*_~`]")  # espeak would read some aloud
# Any one character of these blocks (Cherokee; U+A700-ABFF: Latin Extended-D/E, Syloti Nagri, Phags-pa,
# Saurashtra, Javanese, Cham, Meetei Mayek, ...; Hangul Jamo Extended-B) leaves espeak-ng 1.51 in a broken state:
# every later word gets wrong vowels ("hello world" -> h ˈʌ l ʌ | w ˈʌ l d), in the same text and, until _espeak
# repairs it, in every later one. It cannot read those scripts anyway, so they are silent. Found by
# tests/test_fuzz.py, then a scan of every code point.
_ESPEAK_UNSAFE_RE = re.compile("[\u13a0-\u13ff\ua700-\uabff\ud7b0-\ud7ff]")
_ZH_TOKEN_RE = re.compile(
    rf"(?P<han>[{_HAN_CLASS}]+)"
    r"|(?P<num>\d+(?:\.\d+)?)|(?P<pause>" + _PAUSE_RE.pattern + r")")
_ZH_DIGITS = "零一二三四五六七八九"
_SYLLABIC_NASALS = ("m", "n", "ng")

_backend: Any = None  # created on first English text: loading espeak costs ~0.2 s
_separator: Any = None
_backend_lock = threading.Lock()  # espeak keeps global C state: one caller at a time
log = logging.getLogger(__name__)
_espeak_logger = logging.getLogger(__name__ + ".espeak")
_espeak_logger.setLevel(logging.ERROR)  # language-switch warnings are expected for foreign names


# A text can leave espeak-ng in another language's state (seen: a Latin letter right before a Hangul jamo,
# "xᄝ"), and it then reads every later text wrongly ("hello" -> h ə l ˈəʊ), in every later request. So this
# sentence is read after every call (~0.2 ms), and if it reads differently the en-us voice is selected again.
# Only then: selecting it before every call made espeak-ng 1.51 segfault after a few dozen language switches
# (tests/test_fuzz.py), and a fresh backend per incident leaks ~5 MB (phonemizer loads a private copy of the
# library that is never unloaded), so that is only the last resort.
_CANARY = "The quick brown fox jumps over the lazy dog, hello world."
_canary_phones: str | None = None


def _canary_ok() -> bool:
    return _backend.phonemize([_CANARY], separator=_separator, strip=True)[0] == _canary_phones


def _repair_espeak() -> None:
    """Back to a clean en-us state after a text left espeak-ng in another one (caller holds the lock)."""
    global _backend
    wrapper = getattr(_backend, "_espeak", None)  # phonemizer's EspeakWrapper: no public API for this
    if wrapper is not None:
        wrapper.set_voice("en-us")
        if _canary_ok():
            return
    log.warning("espeak-ng could not be reset to en-us; starting a fresh instance")
    _backend = _new_espeak_backend()


def _new_espeak_backend() -> Any:
    from phonemizer.backend import EspeakBackend

    return EspeakBackend("en-us", with_stress=True, language_switch="remove-flags", words_mismatch="ignore",
                         logger=_espeak_logger)


def _espeak(pieces: list[str]) -> list[str]:
    """Phonemise non-empty text pieces with the shared en-us backend (one output per piece)."""
    global _backend, _separator, _canary_phones
    with _backend_lock:
        try:
            if _backend is None:
                from phonemizer.separator import Separator
                _separator = Separator(phone=" ", word=" | ")
                _backend = _new_espeak_backend()
                _canary_phones = _backend.phonemize([_CANARY], separator=_separator, strip=True)[0]
            spoken = list(_backend.phonemize(pieces, separator=_separator, strip=True))
            if not _canary_ok():
                log.info("espeak-ng was left in another language by a text of %d characters; resetting it",
                         sum(map(len, pieces)))
                _repair_espeak()
            return spoken
        except (ImportError, OSError) as exc:
            raise FrontendUnavailable(f"espeak-ng is not installed: apt-get install espeak-ng ({exc})") from exc
        except RuntimeError as exc:
            if _backend is None:  # phonemizer reports a missing library/voice as RuntimeError
                raise FrontendUnavailable(f"espeak-ng is not installed: apt-get install espeak-ng ({exc})") from exc
            raise FrontendUnavailable(f"espeak-ng failed to phonemise the text: {exc}") from exc


def _english_items(text: str) -> list[list[str] | str]:
    """Words (lists of phones) and pause tokens for an English run."""
    parts: list[str] = []  # alternating text piece / pause token
    pos = 0
    for match in _PAUSE_RE.finditer(text):
        parts += [text[pos:match.start()], _PAUSE_MAP[match.group()[0]]]
        pos = match.end()
    parts.append(text[pos:])
    pieces = [_SILENT_RE.sub(" ", _ESPEAK_UNSAFE_RE.sub(" ", p)).strip() if i % 2 == 0 else p
              for i, p in enumerate(parts)]
    to_speak = [p for i, p in enumerate(pieces) if i % 2 == 0 and p]
    spoken = iter(_espeak(to_speak) if to_speak else [])
    items: list[list[str] | str] = []
    for i, piece in enumerate(pieces):
        if i % 2:
            items.append(piece)
            continue
        if not piece:
            continue
        word: list[str] = []
        for token in next(spoken).split() + [WORD_BOUNDARY]:
            if token == WORD_BOUNDARY:
                items += [word] if word else []
                word = []
            elif token[0] in STRESS_MARKS:
                word += [token[0], token[1:]] if len(token) > 1 else [token]
            else:
                word.append(token)
    return items


def _pinyin_phones(han: str) -> list[str]:
    """Initial + tonal final for every syllable of a run of Han characters."""
    from pypinyin import Style, lazy_pinyin
    from pypinyin.contrib.tone_convert import to_finals_tone3, to_initials

    phones: list[str] = []
    # One call on the whole run so pypinyin's phrase dictionary can pick readings of polyphones.
    for syllable in lazy_pinyin(han, style=Style.TONE3, neutral_tone_with_five=True):
        if not re.fullmatch(r"[a-zêü]+[1-5]", syllable):
            phones.append(UNK)  # character pypinyin has no reading for
        elif syllable[:-1] in _SYLLABIC_NASALS:
            phones.append(syllable)  # 嗯 "ng2": to_initials would wrongly report "n"
        else:
            initial = to_initials(syllable, strict=False)
            phones += [initial] if initial else []
            phones.append(to_finals_tone3(syllable, strict=False, neutral_tone_with_five=True))
    return phones


def _mandarin_items(text: str) -> list[list[str] | str]:
    """Words and pause tokens for a Mandarin run (other symbols are dropped)."""
    items: list[list[str] | str] = []
    for match in _ZH_TOKEN_RE.finditer(text):
        kind, value = match.lastgroup, match.group()
        if kind == "han":
            items.append(_pinyin_phones(value))
        elif kind == "num":  # only reached without cn2an: read digit by digit
            whole, _, frac = value.partition(".")
            spelled = "".join(_ZH_DIGITS[int(d)] for d in whole)
            items.append(_pinyin_phones(spelled + ("点" + "".join(_ZH_DIGITS[int(d)] for d in frac)
                                                   if frac else "")))
        elif kind == "pause":
            items.append(_PAUSE_MAP[value[0]])
    return items


def _phonemize_normalized(text: str, language: str) -> tuple[str, ...]:
    """Uncached phonemisation of already-normalised text (``language`` is part of the cache key)."""
    items: list[list[str] | str] = []
    # Han always goes to pypinyin, even for language="en": espeak en-us can only say
    # "Chinese letter" for it.  The language only changes how numbers are normalised.
    for script, run in split_by_script(text):
        items += _english_items(run) if script == "en" else _mandarin_items(run)
    tokens: list[str] = []
    for item in items:
        if isinstance(item, str):  # pause: never leading, never repeated
            if tokens and tokens[-1] != item:
                tokens.append(item)
        elif item:
            if tokens and tokens[-1] not in PAUSE_TOKENS:
                tokens.append(WORD_BOUNDARY)  # a pause already separates words
            tokens += item
    if not any(t not in _NOT_PHONES for t in tokens):
        raise TextError(f"text has nothing pronounceable: {text[:80]!r}")
    return tuple(tokens)


_DEFAULT_CACHE_SIZE = 4096
_cached_phonemize = functools.lru_cache(maxsize=_DEFAULT_CACHE_SIZE)(_phonemize_normalized)


def configure_frontend_cache(maxsize: int = _DEFAULT_CACHE_SIZE) -> None:
    """Replace the phonemisation LRU cache with an empty one of ``maxsize`` entries."""
    global _cached_phonemize
    _cached_phonemize = functools.lru_cache(maxsize=maxsize)(_phonemize_normalized)


def frontend_cache_info() -> dict[str, int | float]:
    """Hits, misses, size and hit rate of the phonemisation cache (for server metrics)."""
    info = _cached_phonemize.cache_info()
    total = info.hits + info.misses
    return {"hits": info.hits, "misses": info.misses, "currsize": info.currsize,
            "maxsize": info.maxsize or 0, "hit_rate": info.hits / total if total else 0.0}


def phonemize(text: str, language: Language = "auto") -> list[str]:
    """Flat phone list with ``|`` word boundaries and , . ? ! pause tokens.

    English: espeak-ng en-us IPA with stress marks as separate tokens.
    Mandarin: pypinyin initial + final with tone digit (5 = neutral), e.g.
    你好 -> ["n", "i3", "h", "ao3"].  The engine is picked per script run for
    every language; ``language`` decides number normalisation ("auto": per run).
    Raises TextError for empty or unpronounceable text or a missing espeak-ng.
    """
    normalized = normalize_text(text, language)
    return list(_cached_phonemize(normalized, language))


def count_phones(text: str, language: Language = "auto") -> int:
    """Number of phones (no boundaries, pauses or stress marks) for speaking-rate QC."""
    return sum(1 for p in phonemize(text, language) if p not in _NOT_PHONES)


# ---------------------------------------------------------------------------
# Chunking for streaming synthesis
# ---------------------------------------------------------------------------
_CLOSERS = re.escape("\"')]}’”」』》")  # closing quotes/brackets stay with their sentence
_SENTENCE_END_RE = re.compile(rf"[.!?…]+[{_CLOSERS}]*(?=\s|$)|[。！？]+[{_CLOSERS}]*")
_CLAUSE_END_RE = re.compile(rf"[,;:]+[{_CLOSERS}]*(?=\s|$)|[，；：、]+[{_CLOSERS}]*")
# "Dr." or "e.g." ends with a dot but rarely ends a sentence.
_ABBREV_TAIL_RE = re.compile(r"(?:^|\s)(?:mrs?|dr|st|vs|e\.g|i\.e|[a-z])\.$", re.IGNORECASE)
# A "word" is a run of non-space characters, except that each Han character is
# its own word (Chinese has no spaces, so any character boundary is acceptable).
_WORD_RE = re.compile(rf"[{_HAN_CLASS}]|[^\s{_HAN_CLASS}]+")

Span = tuple[int, int]


def _cut_after(text: str, span: Span, pattern: re.Pattern[str]) -> list[Span]:
    """Cut ``span`` right after every match of ``pattern``."""
    start, end = span
    spans, pos = [], start
    for match in pattern.finditer(text, start, end):
        spans.append((pos, match.end()))
        pos = match.end()
    if pos < end:
        spans.append((pos, end))
    return spans


def _sentences(text: str) -> list[Span]:
    spans: list[Span] = []
    for span in _cut_after(text, (0, len(text)), _SENTENCE_END_RE):
        if spans and _ABBREV_TAIL_RE.search(text[spans[-1][0]:spans[-1][1]].rstrip()):
            spans[-1] = (spans[-1][0], span[1])
        else:
            spans.append(span)
    return spans


def _words(text: str, span: Span) -> list[Span]:
    starts = [m.start() for m in _WORD_RE.finditer(text, *span)]
    return [(s, e) for s, e in zip(starts, starts[1:] + [span[1]])]


def split_sentences(text: str, max_chars: int = 200) -> list[str]:
    """Split text into stripped chunks of at most ``max_chars`` characters.

    Each sentence is its own chunk; a longer sentence is packed greedily from its
    clauses (, ; : and Chinese punctuation), a longer clause from its words, and
    only a single word longer than ``max_chars`` is cut inside.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")

    def size(span: Span) -> int:
        return len(text[span[0]:span[1]].strip())

    def emit(span: Span) -> None:
        chunk = text[span[0]:span[1]].strip()
        # Only a single word longer than max_chars can still exceed the limit here.
        chunks.extend(chunk[i:i + max_chars] for i in range(0, len(chunk), max_chars))

    chunks: list[str] = []
    for sentence in _sentences(text):
        if size(sentence) <= max_chars:
            emit(sentence)
            continue
        pieces: list[Span] = []
        for clause in _cut_after(text, sentence, _CLAUSE_END_RE):
            pieces += [clause] if size(clause) <= max_chars else _words(text, clause)
        current = pieces[0]
        for piece in pieces[1:]:  # greedy packing: extend the chunk while it still fits
            if size((current[0], piece[1])) <= max_chars:
                current = (current[0], piece[1])
            else:
                emit(current)
                current = piece
        emit(current)
    return [c for c in chunks if c]
