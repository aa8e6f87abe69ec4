"""Pronunciation lexicons: how a tenant or a voice wants particular words said.

An entry maps a word to exactly one of
- ``{"ipa": "t ə m ˈɑː t oʊ"}``: phones of the inventory's espeak-ng IPA, separated by spaces (a stress mark may
  lead its vowel, ``|`` separates words);
- ``{"pinyin": "chong2 qing4"}``: tone-numbered pinyin syllables (5 = neutral tone, ü as v or ü);
- ``{"alias": "sequel"}``: other text, read in the word's place.

The same three forms are the inline override syntax of SSML-lite (``<phoneme alphabet="ipa" ph="...">``,
``<phoneme alphabet="pinyin" ph="...">``, ``<sub alias="...">``; see chunks.py). A bad entry raises
LexiconError naming the word and what to change (a server answers 422 with it).

Lexicons are stored through the artifact store, immutable and numbered: ``lexicons/voices/<voice_id>/v000001.json``
or ``lexicons/tenants/<tenant>/v000001.json``; saving again writes the next version (docs/text.md).
"""
from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from voice_lib.data.text.phonemes import PINYIN_SYLLABLE_RE, pinyin_syllable_phones
from voice_lib.data.text.symbols import (
    EN_PHONES,
    NOT_PHONES,
    STRESS_MARKS,
    WORD_BOUNDARY,
    TextError,
    is_han,
    symbol_to_id,
)

MAX_ENTRIES = 5000
MAX_WORD_CHARS = 64
MAX_ALIAS_CHARS = 200
_KINDS = ("ipa", "pinyin", "alias")
_WORD_FORBIDDEN_RE = re.compile(r"[<>{}\[\]\"|]")
_IPA_PHONES = frozenset(EN_PHONES)
_SCOPE_RE = re.compile(r"[a-z0-9][a-z0-9-]{1,62}")
_HINT = "see docs/text.md#pronunciation"


class LexiconError(TextError):
    """A lexicon entry (or an inline override) that cannot be used; the message names it and the fix."""


@dataclass(frozen=True)
class Pronunciation:
    """Fixed phones for a word, or an alias to read instead (exactly one of the two)."""

    phones: tuple[str, ...] = ()
    alias: str | None = None


def ipa_phones(ph: str, where: str) -> tuple[str, ...]:
    """Space-separated inventory IPA ("t ə m ˈɑː t oʊ") as phone symbols, stress marks split off."""
    phones: list[str] = []
    for token in ph.split():
        while token and token[0] in STRESS_MARKS:
            phones.append(token[0])
            token = token[1:]
        if not token:
            continue
        if token != WORD_BOUNDARY and token not in _IPA_PHONES:
            raise LexiconError(f"{where}: {token!r} is not a phone of the inventory; write espeak-ng en-us IPA "
                               f"phones separated by spaces, e.g. \"t ə m ˈeɪ t oʊ\" ({_HINT})")
        phones.append(token)
    if not any(p not in NOT_PHONES for p in phones):
        raise LexiconError(f"{where}: no phones given; write e.g. \"t ə m ˈeɪ t oʊ\" ({_HINT})")
    return tuple(phones)


def pinyin_phones(ph: str, where: str) -> tuple[str, ...]:
    """Tone-numbered pinyin syllables ("chong2 qing4") as initial + tonal final symbols."""
    phones: list[str] = []
    for syllable in ph.lower().replace("u:", "v").split():
        parts = pinyin_syllable_phones(syllable) if PINYIN_SYLLABLE_RE.fullmatch(syllable) else []
        if not parts or any(p not in symbol_to_id for p in parts):
            raise LexiconError(f"{where}: {syllable!r} is not a tone-numbered pinyin syllable; write e.g. "
                               f"\"chong2 qing4\" (tones 1-5, 5 = neutral) ({_HINT})")
        phones += parts
    if not phones:
        raise LexiconError(f"{where}: no syllables given; write e.g. \"chong2 qing4\" ({_HINT})")
    return tuple(phones)


def _check_word(word: Any) -> str:
    if not isinstance(word, str) or not word.strip():
        raise LexiconError(f"lexicon word {word!r}: must be a non-empty string ({_HINT})")
    if len(word) > MAX_WORD_CHARS or word != word.strip() or _WORD_FORBIDDEN_RE.search(word) or any(
            unicodedata.category(c)[0] == "C" for c in word):
        raise LexiconError(f"lexicon word {word[:80]!r}: at most {MAX_WORD_CHARS} characters, no surrounding "
                           f"spaces, control characters or any of <>{{}}[]\"| ({_HINT})")
    return word


def parse_entry(word: str, value: Any) -> Pronunciation:
    where = f"lexicon entry {word!r}"
    if not isinstance(value, Mapping) or len(value) != 1 or next(iter(value)) not in _KINDS:
        raise LexiconError(f"{where}: must be an object with exactly one of {list(_KINDS)}, e.g. "
                           f"{{\"ipa\": \"t ə m ˈeɪ t oʊ\"}}, got {str(value)[:80]!r} ({_HINT})")
    kind, text = next(iter(value.items()))
    if not isinstance(text, str) or not text.strip():
        raise LexiconError(f"{where}: {kind!r} must be a non-empty string ({_HINT})")
    if kind == "alias":
        if len(text) > MAX_ALIAS_CHARS or "<" in text or ">" in text:
            raise LexiconError(f"{where}: an alias is plain text of at most {MAX_ALIAS_CHARS} characters ({_HINT})")
        return Pronunciation(alias=text.strip())
    return Pronunciation(phones=ipa_phones(text, where) if kind == "ipa" else pinyin_phones(text, where))


class Lexicon:
    """Validated entries and the matcher that finds their words in text (longest match first)."""

    def __init__(self, entries: Mapping[str, Any] | None = None) -> None:
        entries = dict(entries or {})
        if len(entries) > MAX_ENTRIES:
            raise LexiconError(f"a lexicon holds at most {MAX_ENTRIES} entries, got {len(entries)}")
        self.raw = {_check_word(w): dict(v) if isinstance(v, Mapping) else v for w, v in entries.items()}
        self.entries = {w: parse_entry(w, v) for w, v in self.raw.items()}
        self._lookup = {(w if _case_sensitive(w) else w.casefold()): p for w, p in self.entries.items()}
        self._pattern = _matcher(self.entries) if self.entries else None

    @classmethod
    def from_json(cls, data: bytes | str) -> Lexicon:
        try:
            parsed = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LexiconError(f"the lexicon is not valid JSON: {exc}; send an object such as "
                               f"{{\"tomato\": {{\"ipa\": \"t ə m ˈeɪ t oʊ\"}}}} ({_HINT})") from None
        if not isinstance(parsed, dict):
            raise LexiconError(f"the lexicon must be a JSON object of word -> entry ({_HINT})")
        return cls(parsed)

    def to_json(self) -> bytes:
        return json.dumps(self.raw, ensure_ascii=False, sort_keys=True, indent=1).encode()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_json()).hexdigest()

    def merged(self, over: Lexicon | None) -> Lexicon:
        """This lexicon with ``over``'s entries winning (a voice's over its tenant's)."""
        return self if over is None or not over.entries else Lexicon({**self.raw, **over.raw})

    def __len__(self) -> int:
        return len(self.entries)

    def find(self, text: str) -> list[tuple[int, int, Pronunciation]]:
        """Non-overlapping (start, end, pronunciation) of every entry's word in ``text``, left to right."""
        if self._pattern is None:
            return []
        found = []
        for match in self._pattern.finditer(text):
            word = match.group()
            entry = self._lookup.get(word) or self._lookup.get(word.casefold())
            if entry is not None:
                found.append((match.start(), match.end(), entry))
        return found


def _case_sensitive(word: str) -> bool:
    return word != word.lower()  # "US" is not "us"; "tomato" matches "Tomato" too


def _matcher(entries: Mapping[str, Pronunciation]) -> re.Pattern[str]:
    alternatives = []
    for word in sorted(entries, key=len, reverse=True):
        body = re.escape(word)
        # Latin words match whole words only; Han words have no spaces around them, so anywhere.
        if not is_han(word[0]):
            body = rf"(?<!\w){body}(?!\w)"
        alternatives.append(body if _case_sensitive(word) else f"(?i:{body})")
    return re.compile("|".join(alternatives))


# --- storage: immutable, numbered versions in the artifact store -------------------------------------------

def lexicon_prefix(voice_id: str | None = None, tenant: str | None = None) -> str:
    if (voice_id is None) == (tenant is None):
        raise ValueError("a lexicon belongs to exactly one voice or one tenant")
    scope = voice_id if voice_id is not None else tenant
    if not _SCOPE_RE.fullmatch(scope or ""):
        raise LexiconError(f"{'voice_id' if voice_id is not None else 'tenant'} {scope!r} must match "
                           f"{_SCOPE_RE.pattern}")
    return f"lexicons/voices/{voice_id}/" if voice_id is not None else f"lexicons/tenants/{tenant}/"


def lexicon_versions(store: Any, prefix: str) -> list[int]:
    return sorted(int(k.rsplit("/v", 1)[1].split(".")[0]) for k in store.list(prefix)
                  if re.search(r"/v\d{6}\.json$", k))


def save_lexicon(store: Any, prefix: str, lexicon: Lexicon) -> int:
    """Store ``lexicon`` as the next version under ``prefix``; returns the version number."""
    versions = lexicon_versions(store, prefix)
    version = (versions[-1] + 1) if versions else 1
    store.write_bytes(f"{prefix}v{version:06d}.json", lexicon.to_json())
    return version


def load_lexicon(store: Any, prefix: str, version: int | None = None) -> tuple[int, Lexicon] | None:
    """The given (default: the latest) version under ``prefix``, or None when there is none."""
    versions = lexicon_versions(store, prefix)
    if not versions:
        return None
    version = versions[-1] if version is None else version
    if version not in versions:
        raise LexiconError(f"there is no lexicon version {version} under {prefix} (versions: {versions})")
    return version, Lexicon.from_json(store.read_bytes(f"{prefix}v{version:06d}.json"))
