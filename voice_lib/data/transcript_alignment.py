"""A long recording with one transcript ("I read this script"), aligned to its text word by word.

Whisper (voice_lib/data/asr.py) hears the recording with word timestamps; the user's words are matched to
Whisper's by sequence alignment (difflib's SequenceMatcher over normalised words), so each of the user's words
gets a time: a matched word takes the time Whisper heard it at, and words Whisper heard differently or not at
all share the time between their matched neighbours. The text kept is always the user's; Whisper only says
where each word is. A clip's alignment score is the share of its words Whisper heard as written: a low score
means the text and the audio may disagree there, and the clip waits for a person (the transcript review).
"""

from __future__ import annotations

from dataclasses import dataclass
from difflib import SequenceMatcher

from voice_lib.data.asr import Word, normalize_words


class AlignmentError(ValueError):
    """The transcript cannot be aligned to the recording; the message says why and what to check."""


@dataclass(frozen=True)
class AlignedWord:
    text: str  # the user's word, as written (case and punctuation kept)
    start: float  # seconds, on the timeline of the Whisper words it was aligned to
    end: float
    matched: bool  # Whisper heard this word as written


def _key(word: str) -> str:
    return "".join(normalize_words(word))


def _spread(texts: list[str], start: float, end: float) -> list[AlignedWord]:
    """Words with no timing of their own: equal shares of [start, end]."""
    step = max(end - start, 0.0) / max(len(texts), 1)
    return [AlignedWord(t, start + i * step, start + (i + 1) * step, False) for i, t in enumerate(texts)]


def align_words(transcript: str, heard: list[Word]) -> list[AlignedWord]:
    """Every word of ``transcript`` with a time taken from ``heard`` (Whisper's words of the same audio)."""
    tokens = [t for t in transcript.split() if _key(t)] or transcript.split()
    if not tokens:
        raise AlignmentError("the transcript has no words")
    if not heard:
        raise AlignmentError("Whisper heard no words in the recording")
    matcher = SequenceMatcher(None, [_key(t) for t in tokens], [_key(w.text) for w in heard], autojunk=False)
    out: list[AlignedWord] = []
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "insert":  # words Whisper heard that the text lacks: no word of the user's to time
            continue
        if op == "delete":  # the user's words Whisper did not hear: in the time between the neighbours
            before = out[-1].end if out else heard[0].start
            after = heard[j1].start if j1 < len(heard) else heard[-1].end
            out += _spread(tokens[i1:i2], before, max(before, after))
        elif i2 - i1 == j2 - j1:  # "equal", or heard differently word for word: Whisper's times
            out += [AlignedWord(tokens[i], heard[j].start, heard[j].end, op == "equal")
                    for i, j in zip(range(i1, i2), range(j1, j2))]
        else:  # a run heard as a different number of words: it shares their time
            out += _spread(tokens[i1:i2], heard[j1].start, heard[j2 - 1].end)
    return out


WINDOW_WORDS = 8  # about one sentence: a wrong sentence in a long clip shows instead of being averaged away


def matched_share(words: list[AlignedWord]) -> float:
    """Share of ``words`` Whisper heard as written (1.0 for no words)."""
    return sum(w.matched for w in words) / len(words) if words else 1.0


def alignment_score(words: list[AlignedWord], window: int = WINDOW_WORDS) -> float:
    """A clip's alignment confidence: the share of words heard as written in its worst stretch of ``window``
    consecutive words. Whisper tiny.en mishears a word or two per sentence of clear speech (0.6-1.0 here); a
    sentence the recording does not contain scores about 0.3."""
    if len(words) <= window:
        return matched_share(words)
    return min(matched_share(words[i:i + window]) for i in range(len(words) - window + 1))


def check_alignment(words: list[AlignedWord], file: str, transcript_source: str, min_share: float = 0.5) -> None:
    """Refuse a transcript that is mostly not what the recording says (another file's text, another language)."""
    share = matched_share(words)
    if share < min_share:
        raise AlignmentError(
            f"{file}: only {share:.0%} of the words of its transcript ({transcript_source}) were heard in the "
            f"recording; the text does not match this audio. Check that {transcript_source} is this file's text."
        )
