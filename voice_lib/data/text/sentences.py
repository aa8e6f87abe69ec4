"""Chunking for streaming synthesis: text into sentences, long sentences into clauses, then words."""
from __future__ import annotations

import re

from voice_lib.data.text.symbols import HAN_CLASS

_CLOSERS = re.escape("\"')]}’”」』》")  # closing quotes/brackets stay with their sentence
_SENTENCE_END_RE = re.compile(rf"[.!?…]+[{_CLOSERS}]*(?=\s|$)|[。！？]+[{_CLOSERS}]*")
_CLAUSE_END_RE = re.compile(rf"[,;:]+[{_CLOSERS}]*(?=\s|$)|[，；：、]+[{_CLOSERS}]*")
# "Dr." or "e.g." ends with a dot but rarely ends a sentence.
_ABBREV_TAIL_RE = re.compile(r"(?:^|\s)(?:mrs?|dr|st|vs|e\.g|i\.e|[a-z])\.$", re.IGNORECASE)
# A "word" is a run of non-space characters, except that each Han character is
# its own word (Chinese has no spaces, so any character boundary is acceptable).
_WORD_RE = re.compile(rf"[{HAN_CLASS}]|[^\s{HAN_CLASS}]+")

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
