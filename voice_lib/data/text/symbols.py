"""The phone inventory, the frontend's errors and script splitting: what every other text module builds on.

Model checkpoints store phone ids, so ``SYMBOLS`` is fixed and versioned (``SYMBOLS_VERSION``).
"""
from __future__ import annotations

import re
from typing import Literal

Language = Literal["en", "zh", "auto"]
LANGUAGES = ("en", "zh", "auto")


class TextError(ValueError):
    """Text that cannot be turned into phones (empty, unpronounceable, no backend)."""


class Unpronounceable(TextError):
    """Text with nothing to say (empty, or only punctuation and symbols): silence, where a caller allows it."""


class FrontendUnavailable(TextError):
    """The G2P backend itself is missing or broken: no fault of the text (a server answers 5xx, not 422)."""


def check_language(language: str) -> str:
    if language not in LANGUAGES:
        raise TextError(f"unsupported language {language!r}; expected one of {LANGUAGES}")
    return language


# ---------------------------------------------------------------------------
# Symbol inventory.  Model checkpoints store ids, so this list must only ever
# grow at the end, and any change must bump SYMBOLS_VERSION.
# ---------------------------------------------------------------------------
SYMBOLS_VERSION = 1
# How a text becomes phones (normalisation, G2P): part of the feature cache key, so features computed from an
# older reading of the same transcript are not reused. 2: WeTextProcessing grammars replaced the regex rules.
FRONTEND_VERSION = 2
PAD, UNK, WORD_BOUNDARY = "<pad>", "<unk>", "|"
PAUSE_TOKENS = (",", ".", "?", "!")
STRESS_MARKS = ("ˈ", "ˌ")  # espeak prefixes stressed vowels; we emit them as separate tokens

# Union of every phone espeak-ng 1.51 (en-us, stress split off) produced over the
# ~125k words of the CMU dictionary (lower, upper and capitalised), random
# acronyms, ASCII characters and sentences.  Hard-coded so the ids never depend
# on the espeak build installed on a machine.
EN_PHONES = (
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
    PAD, UNK, WORD_BOUNDARY, *PAUSE_TOKENS, *STRESS_MARKS, *EN_PHONES, *_ZH_INITIALS,
    *(final + tone for final in _ZH_FINALS for tone in _ZH_TONES),
)))
symbol_to_id: dict[str, int] = {s: i for i, s in enumerate(SYMBOLS)}
_UNK_ID = symbol_to_id[UNK]
NOT_PHONES = frozenset((PAD, WORD_BOUNDARY, *PAUSE_TOKENS, *STRESS_MARKS))


def phonemes_to_ids(phonemes: list[str]) -> list[int]:
    """Map phone symbols to ids; anything outside the inventory becomes the unk id."""
    return [symbol_to_id.get(p, _UNK_ID) for p in phonemes]


# ---------------------------------------------------------------------------
# Script splitting
# ---------------------------------------------------------------------------
_HAN_RANGES = ((0x3007, 0x3007), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF),
               (0x20000, 0x2FA1F))
HAN_CLASS = "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in _HAN_RANGES)  # same, for regexes


_HAN = re.compile(f"[{HAN_CLASS}]")


def is_han(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _HAN_RANGES)


def split_by_script(text: str) -> list[tuple[str, str]]:
    """Split text into ("zh", ...) and ("en", ...) runs that concatenate back to ``text``.

    Han characters are "zh", every other letter is "en" (espeak is the only
    engine that can attempt it).  Digits, spaces and punctuation attach to the
    preceding run, or to the first run when they lead the text.
    """
    if not _HAN.search(text):  # the common case, one regex scan: every letter is "en", so it is one run
        return [("en", text)] if text else []
    runs: list[tuple[str, list[str]]] = []
    leading: list[str] = []
    for ch in text:
        script = "zh" if is_han(ch) else "en" if ch.isalpha() else None
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

