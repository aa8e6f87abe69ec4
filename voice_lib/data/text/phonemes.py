"""Phonemisation: normalised text to a flat list of phone symbols from the fixed inventory.

English goes through espeak-ng (via phonemizer), Mandarin through pypinyin (initial + tonal final); mixed
text is split per script. Importing this module is cheap on purpose (it is reached from Airflow DAG
parsing): phonemizer, pypinyin and the espeak backend are loaded on first use.
"""
from __future__ import annotations

import functools
import logging
import re
import threading
from typing import Any

from voice_lib.data.text.normalize import normalize_text
from voice_lib.data.text.symbols import (
    HAN_CLASS,
    NOT_PHONES,
    PAUSE_TOKENS,
    STRESS_MARKS,
    UNK,
    WORD_BOUNDARY,
    FrontendUnavailable,
    Language,
    Unpronounceable,
    phonemes_to_ids,
    split_by_script,
)

__all__ = ["phonemize", "count_phones", "frontend_cache_info", "configure_frontend_cache", "phonemes_to_ids",
           "pinyin_syllable_phones", "pause_token"]
_NOT_PHONES = NOT_PHONES  # the name the frontend's property tests read

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
    rf"(?P<han>[{HAN_CLASS}]+)"
    r"|(?P<num>\d+(?:\.\d+)?)|(?P<pause>" + _PAUSE_RE.pattern + r")")
_ZH_DIGITS = "零一二三四五六七八九"
_SYLLABIC_NASALS = ("m", "n", "ng")
PINYIN_SYLLABLE_RE = re.compile(r"[a-zêü]+[1-5]")  # what a character's reading (and a lexicon's pinyin) looks like

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


def pause_token(text: str) -> str | None:
    """The pause token of the first pausing punctuation in ``text`` (for text that has nothing else)."""
    match = _PAUSE_RE.search(text)
    return _PAUSE_MAP[match.group()[0]] if match else None


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

    phones: list[str] = []
    # One call on the whole run so pypinyin's phrase dictionary can pick readings of polyphones.
    for syllable in lazy_pinyin(han, style=Style.TONE3, neutral_tone_with_five=True):
        phones += pinyin_syllable_phones(syllable) if PINYIN_SYLLABLE_RE.fullmatch(syllable) else [UNK]
    return phones


def pinyin_syllable_phones(syllable: str) -> list[str]:
    """Initial and tonal final of one tone-numbered pinyin syllable ("zhong1" -> ["zh", "ong1"])."""
    from pypinyin.contrib.tone_convert import to_finals_tone3, to_initials

    if syllable[:-1] in _SYLLABIC_NASALS:
        return [syllable]  # 嗯 "ng2": to_initials would wrongly report "n"
    initial = to_initials(syllable, strict=False)
    return [initial, to_finals_tone3(syllable, strict=False, neutral_tone_with_five=True)] if initial else \
        [to_finals_tone3(syllable, strict=False, neutral_tone_with_five=True)]


def _mandarin_items(text: str) -> list[list[str] | str]:
    """Words and pause tokens for a Mandarin run (other symbols are dropped)."""
    items: list[list[str] | str] = []
    for match in _ZH_TOKEN_RE.finditer(text):
        kind, value = match.lastgroup, match.group()
        if kind == "han":
            items.append(_pinyin_phones(value))
        elif kind == "num":  # digits the grammar left as written (a piece it could not read): digit by digit
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
        raise Unpronounceable(f"text has nothing pronounceable: {text[:80]!r}")
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

