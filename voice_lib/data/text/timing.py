"""Word timestamps: which phones of a chunk say which word, and when, from the model's phone durations.

A chunk's phones are grouped into words at ``|`` and pause tokens, as the phonemiser wrote them. Each group is
labelled with the spoken word it came from: the normalised text's words (numbers read as words, so ``$3`` gives
"three" and "dollars"), split by script as the phonemiser splits them. When espeak-ng joined or split words so
that the counts differ, the piece gets one span labelled with all its words, never a wrong pairing. A Mandarin
run is one phone group; it is split per character when it has one tonal final per character. A word with
fixed phones (an inline override or a lexicon entry) is one span labelled as written.

Times: each phone id is held for its predicted duration in decoder steps, so a word starts at the sum of the
durations before its first phone and ends after its last (``word_timings``).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from voice_lib.data.text.symbols import (
    PAUSE_TOKENS,
    WORD_BOUNDARY,
    is_han,
    split_by_script,
)

_LABEL_STRIP_RE = re.compile(r"[^\w']+")
_TONAL_RE = re.compile(r".*[1-5]$")


@dataclass(frozen=True)
class WordSpan:
    """A word and the phones that say it: ``phonemes[start:end]`` of its chunk."""

    word: str
    start: int
    end: int


def phone_groups(phones: Sequence[str], offset: int = 0) -> list[tuple[int, int]]:
    """[start, end) of every word's phones (boundaries and pause tokens separate words, belong to none)."""
    groups, start = [], None
    for i, phone in enumerate(phones):
        if phone == WORD_BOUNDARY or phone in PAUSE_TOKENS:
            if start is not None:
                groups.append((offset + start, offset + i))
            start = None
        elif start is None:
            start = i
    if start is not None:
        groups.append((offset + start, offset + len(phones)))
    return groups


def spoken_words(normalized: str) -> list[str]:
    """Words of normalised text as the phonemiser groups them: by whitespace, then by script run."""
    words = []
    for token in normalized.split():
        for _, run in split_by_script(token):
            word = _LABEL_STRIP_RE.sub("", run).strip("'")
            if word:
                words.append(word)
    return words


def _split_han(word: str, start: int, end: int, phones: Sequence[str], offset: int) -> list[WordSpan]:
    finals = [i for i in range(start, end) if _TONAL_RE.match(phones[i - offset])]
    if not all(is_han(c) for c in word) or len(finals) != len(word):
        return [WordSpan(word, start, end)]
    spans, begin = [], start
    for char, final in zip(word, finals):
        spans.append(WordSpan(char, begin, final + 1))
        begin = final + 1
    return spans


def label_piece(normalized: str, phones: Sequence[str], offset: int) -> list[WordSpan]:
    """Spans of one text piece whose phones start at ``offset`` in the chunk (module docstring)."""
    groups = phone_groups(phones, offset)
    if not groups:
        return []
    words = spoken_words(normalized)
    if len(words) != len(groups):
        return [WordSpan(" ".join(words) or normalized, groups[0][0], groups[-1][1])]
    spans: list[WordSpan] = []
    for word, (start, end) in zip(words, groups):
        spans += _split_han(word, start, end, phones, offset)
    return spans


def word_timings(words: Sequence[WordSpan], durations: Sequence[int], seconds_per_step: float,
                 offset_seconds: float = 0.0) -> list[dict]:
    """[{"word", "start", "end"}] in seconds from the start of the response (``offset_seconds`` is where the
    chunk starts); ``durations`` are the model's decoder steps per phone id, one per phone of the chunk."""
    ends = [0]
    for steps in durations:
        ends.append(ends[-1] + int(steps))
    out = []
    for span in words:
        if span.end > len(durations):
            raise ValueError(f"word {span.word!r} ends at phone {span.end}, past the {len(durations)} durations")
        out.append({"word": span.word, "start": round(offset_seconds + ends[span.start] * seconds_per_step, 3),
                    "end": round(offset_seconds + ends[span.end] * seconds_per_step, 3)})
    return out
