"""Written text to the words a person reads aloud: numbers, dates, times, years, money, units, ordinals,
phone numbers, URLs, e-mail addresses and abbreviations, for English and Mandarin.

The grammars are WeTextProcessing's (the ``wetext`` runtime: compiled FSTs shipped inside its wheel, read with
kaldifst; no pynini, no download). It was picked by measurement on the table shipped beside this module
(benchmarks/normalizers.py, docs/text.md): 58 of 75 cases alone, ahead of the regex rules it replaces (29) and
of NeMo's grammars (61 of 75, but 10x slower per sentence and a 63 s grammar compilation per fresh cache).
A few rewrites around it cover what its grammars read wrongly on that table (money with cents, decades,
"St." and Latin abbreviations, "oh" in years and times, "+" phone numbers, Mandarin URLs); each is named
below with the case it fixes. Importing this module is cheap: the FSTs load on first use (~1 s).
"""
from __future__ import annotations

import functools
import re
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from voice_lib.data.text.symbols import (
    Language,
    Unpronounceable,
    check_language,
    split_by_script,
)

_WHITESPACE_RE = re.compile(r"\s+")
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_engines: dict[str, Any] = {}
_engine_lock = threading.Lock()  # one FST composition at a time: wetext's graphs are shared C++ objects

# --- before the grammars (English) -----------------------------------------------------------------------
_MONEY_UNITS = {"$": ("dollar", "cent"), "€": ("euro", "cent"), "£": ("pound", "penny")}
# "$3.25" -> "3 dollars 25 cents" (wetext: "three point two five dollars"); "$1.5 million" stays for wetext.
_MONEY_CENTS_RE = re.compile(r"([$€£])(\d+)\.(\d\d)(?!\d|\s*(?:thousand|million|billion|trillion)\b)")
# "the 1990s" -> "1990's", read "nineteen ninety's" and then "nineteen nineties" (wetext: "... ninety seconds").
_DECADE_RE = re.compile(r"\b(\d{2,3}0)s\b")
_ABBREVIATIONS = (  # what wetext leaves as written (it already reads Mr., Mrs., Dr., Jan., ...)
    (re.compile(r"\bSt\.(?=\s+[A-Z])"), "Saint"),  # "St. Louis"
    (re.compile(r"\bSt\.(?=\s*$)"), "Street."),  # "on Main St." at the end of a sentence
    (re.compile(r"\bSt\.(?=[\s,;:])"), "Street"),
    (re.compile(r"\bvs\.", re.IGNORECASE), "versus"),
    (re.compile(r"\betc\.(?=\s*$|\s+[A-Z])"), "et cetera."),  # the dot also ended the sentence
    (re.compile(r"\betc\.", re.IGNORECASE), "et cetera"),
    (re.compile(r"\be\.g\.", re.IGNORECASE), "for example"),
    (re.compile(r"\bi\.e\.", re.IGNORECASE), "that is"),
    (re.compile(r"(?<=\d)\s*L\b"), " liters"),  # wetext knows "l" only spelled out
    (re.compile(r"(?<=\d)\s+(AD|BC|BCE|CE)\b"), lambda m: " " + " ".join(m.group(1))),  # espeak says "ad"
)
# "+1 212 555 0199": wetext's parser fails on "+" (AssertionError); read digit by digit, groups as pauses.
_INTERNATIONAL_PHONE_RE = re.compile(r"\+(\d{1,3})((?:[\s-]\d{2,4}){2,5})\b")
_MONTH_DAY_RE = re.compile(  # "May 1, 2024" -> "May 1st, 2024" (wetext: "May one, twenty twenty four")
    r"\b(Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?"
    r"|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)(\.?\s+)(\d{1,2})(?=,?\s|$|[.!?])(?!\s*:)")

# --- after the grammars (English) ------------------------------------------------------------------------
_UNITS_WORDS = "one|two|three|four|five|six|seven|eight|nine"
_TEENS_WORDS = "eleven|twelve|thirteen|fourteen|fifteen|sixteen|seventeen|eighteen|nineteen|twenty"
_YEAR_OH_RE = re.compile(rf"\b({_TEENS_WORDS}) zero ({_UNITS_WORDS})\b")  # 1905: "nineteen zero five"
_TIME_OH_RE = re.compile(rf"\b({_UNITS_WORDS}|ten|eleven|twelve) o ({_UNITS_WORDS})\b")  # 7:05: "seven o five"
_DECADE_WORD_RE = re.compile(r"\b(\w+?)(ty|thousand|hundred)'s\b")

# --- Mandarin --------------------------------------------------------------------------------------------
# wetext's Mandarin grammar leaves addresses as written; they are read with 点 for the dots (and "at").
_ZH_ADDRESS_RE = re.compile(r"(?:https?://)?[A-Za-z][\w-]*(?:\.[A-Za-z][\w-]*)+(?:/[\w./-]*)?"
                            r"|[\w.+-]+@[A-Za-z][\w-]*(?:\.[A-Za-z][\w-]*)+")


def _engine(lang: str) -> Any:
    if lang not in _engines:
        from wetext import Normalizer

        _engines[lang] = Normalizer(lang=lang, operator="tn")
    return _engines[lang]


# wetext's token parser asserts on some symbol runs ("#1", "π≈3"), and the tagger may find no path.
_WETEXT_ERRORS = (AssertionError, RuntimeError, IndexError, ValueError)
_SYMBOL_RE = re.compile(r"([^\w\s.,:/-])")


def _grammar(text: str, lang: str) -> str:
    """The grammar's reading of ``text``; a piece it cannot read is read token by token, then left as written."""
    core = text.strip()
    if not core:
        return text
    # The grammars strip the text; the spaces around a script run keep it apart from its neighbours.
    lead, trail = text[:text.index(core[0])], text[len(text.rstrip()):]
    return lead + _grammar_core(core, lang) + trail


def _grammar_core(text: str, lang: str) -> str:
    with _engine_lock:
        engine = _engine(lang)
        try:
            return engine.normalize(text)
        except _WETEXT_ERRORS:
            pass
        out = []
        for token in text.split(" "):
            try:
                out.append(engine.normalize(token) if token else token)
            except _WETEXT_ERRORS:
                # Symbols apart from the rest ("π≈3.14" -> "π", "≈", "3.14"), keeping the marks numbers and
                # dates are written with; what still fails stays as written.
                pieces = [p for p in _SYMBOL_RE.split(token) if p]
                out.append(" ".join(_safe_normalize(engine, p) for p in pieces))
        return " ".join(out)


def _safe_normalize(engine: Any, piece: str) -> str:
    try:
        return engine.normalize(piece)
    except _WETEXT_ERRORS:
        return piece


def _ordinal(day: str) -> str:
    n = int(day)
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{day}{suffix}"


def _money(match: re.Match[str]) -> str:
    major, minor = _MONEY_UNITS[match.group(1)]
    whole, cents = int(match.group(2)), int(match.group(3))
    minor_words = f"{cents} {'pence' if minor == 'penny' and cents != 1 else minor + ('s' if cents != 1 else '')}"
    if whole == 0:
        return minor_words
    major_words = f"{whole} {major}{'s' if whole != 1 else ''}"
    return f"{major_words} {minor_words}" if cents else major_words


def _phone(match: re.Match[str]) -> str:
    groups = [g for g in re.split(r"[\s-]", match.group(2)) if g]
    return "plus " + ", ".join(" ".join(digits) for digits in [match.group(1), *groups])


def _english(text: str) -> str:
    text = _MONEY_CENTS_RE.sub(_money, text)
    text = _DECADE_RE.sub(r"\1's", text)
    for pattern, replacement in _ABBREVIATIONS:
        text = pattern.sub(replacement, text)
    text = _INTERNATIONAL_PHONE_RE.sub(_phone, text)
    text = _MONTH_DAY_RE.sub(lambda m: m.group(1) + m.group(2) + _ordinal(m.group(3)), text)
    text = _grammar(text, "en")
    text = _YEAR_OH_RE.sub(r"\1 oh \2", text)
    text = _TIME_OH_RE.sub(r"\1 oh \2", text)
    return _DECADE_WORD_RE.sub(lambda m: m.group(1) + ("ties" if m.group(2) == "ty" else m.group(2) + "s"), text)


def _mandarin(text: str) -> str:
    # Thousands separators first: the grammar reads "1,000" as 一,零零零 (one, pause, zero zero zero).
    text = _THOUSANDS_RE.sub("", text)
    text = _ZH_ADDRESS_RE.sub(lambda m: m.group().replace("@", " at ").replace(".", "点"), text)
    return _grammar(text, "zh")


def _clean_char(ch: str) -> str:
    category = unicodedata.category(ch)
    if category in ("Zs", "Zl", "Zp") or ch in "\t\n\r\v\f\x85":
        return " "  # line breaks separate words, so they become spaces, not nothing
    if category[0] == "C":  # Cc control, Cf format (zero-width, BOM), Cs, Co, Cn
        return ""
    return ch


def clean_text(text: str) -> str:
    """NFKC, control/format characters dropped, typographic apostrophes straightened, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(_clean_char(ch) for ch in text).replace("‘", "'").replace("’", "'")
    return _WHITESPACE_RE.sub(" ", text).strip()


@functools.lru_cache(maxsize=4096)
def _normalize_cleaned(text: str, language: str) -> str:
    if language == "en":
        text = _english(text)
    elif language == "zh":
        text = _mandarin(text)
    else:
        text = "".join(_english(run) if script == "en" else _mandarin(run) for script, run in split_by_script(text))
    return _WHITESPACE_RE.sub(" ", text).strip()


def normalize_text(text: str, language: Language) -> str:
    """Clean the text (``clean_text``) and read its written forms as words (module docstring).

    English numbers, dates, money, units... become English words; Mandarin ones become Chinese numerals
    (二零二四年五月一日, 十点三十分, 百分之五十). ``language="auto"`` normalises each script run on its own.
    Raises Unpronounceable (a TextError) when nothing is left.
    """
    check_language(language)
    text = _normalize_cleaned(clean_text(text), language)
    if not text:
        raise Unpronounceable("text is empty after normalisation (only whitespace/control characters?)")
    return text


# --- the normalisation table (benchmarks/normalizers.py picks by it, tests/test_text.py keeps it passing) ---
CASES_PATH = Path(__file__).with_name("normalization_cases.tsv")
_PUNCT_RE = re.compile(r"[^\w\s']")
_SPACE_RE = re.compile(r"\s+")


def canonical(text: str, language: str) -> str:
    """What is compared: lower case, hyphens as spaces, punctuation dropped (Mandarin: spaces too)."""
    text = unicodedata.normalize("NFKC", text).lower().replace("-", " ").replace("’", "'")
    text = _SPACE_RE.sub(" ", _PUNCT_RE.sub(" ", text)).strip()
    return text.replace(" ", "") if language == "zh" else text


@dataclass(frozen=True)
class NormalizationCase:
    language: str
    category: str
    written: str
    spoken: tuple[str, ...]  # every acceptable reading

    def accepts(self, output: str) -> bool:
        return canonical(output, self.language) in {canonical(s, self.language) for s in self.spoken}


def load_cases(path: Path = CASES_PATH) -> list[NormalizationCase]:
    cases = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 4:
            raise ValueError(f"{path}:{number}: expected 4 tab-separated fields "
                             f"(language, category, written, spoken), got {len(fields)}")
        language, category, written, spoken = fields
        cases.append(NormalizationCase(language, category, written, tuple(s.strip() for s in spoken.split(" | "))))
    return cases
