"""Request text to speech chunks: SSML-lite, pronunciation overrides, then sentences.

``plan_speech`` is what a synthesiser runs on a request's text:

1. SSML-lite (``parse_ssml``): ``<break time="500ms"/>`` / ``<break strength="strong"/>`` become silence;
   ``<sub alias="sequel">SQL</sub>`` reads the alias; ``<phoneme alphabet="ipa" ph="t ə m ˈɑː t oʊ">tomato
   </phoneme>`` (or ``alphabet="pinyin" ph="chong2 qing4"``) fixes a word's phones; every other tag (``<speak>``,
   ``<emphasis>``, ``<prosody>``, anything unknown) is dropped and its text kept, so a tag is never read aloud.
2. The lexicon's words (lexicon.py) get their phones or aliases.
3. Each piece is split into sentences (``split_sentences``); ``sentence_pause`` seconds of silence follow each
   sentence, a break's silence replaces it.

A word with fixed phones travels through sentence splitting as one private-use character, so neither the
normaliser nor espeak-ng ever sees it; such characters in the request text itself are dropped first (they are
silent anyway).
"""
from __future__ import annotations

import html
import re
from dataclasses import dataclass, field, replace

from voice_lib.data.text.lexicon import Lexicon, LexiconError, ipa_phones, pinyin_phones
from voice_lib.data.text.normalize import normalize_text
from voice_lib.data.text.phonemes import pause_token, phonemize
from voice_lib.data.text.symbols import (
    HAN_CLASS,
    NOT_PHONES,
    PAUSE_TOKENS,
    WORD_BOUNDARY,
    Language,
    TextError,
    Unpronounceable,
)
from voice_lib.data.text.timing import WordSpan, label_piece

MAX_BREAK_SECONDS = 10.0
MAX_SENTENCE_PAUSE_SECONDS = 5.0
# SSML's named strengths, with the durations Azure's speech service documents for them.
BREAK_STRENGTHS = {"none": 0.0, "x-weak": 0.25, "weak": 0.5, "medium": 0.75, "strong": 1.0, "x-strong": 1.25}
_TAG_RE = re.compile(r"<\s*(/?)\s*([A-Za-z][\w:.-]*)([^<>]*)>")
_ATTR_RE = re.compile(r"""([\w:.-]+)\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>/]+))""")
_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s)\s*", re.IGNORECASE)
_PRIVATE_RE = re.compile("[\ue000-\uf8ff]")
_FIRST_MARK = 0xE000
_MARK_SPLIT_RE = re.compile("([\ue000-\uf8ff])")


@dataclass
class Marks:
    """Words with fixed phones, each standing in the text as one private-use character."""

    phones: dict[str, tuple[str, ...]] = field(default_factory=dict)
    words: dict[str, str] = field(default_factory=dict)

    def add(self, word: str, phones: tuple[str, ...]) -> str:
        mark = chr(_FIRST_MARK + len(self.phones))
        if len(self.phones) >= 0x1900:
            raise TextError("too many pronunciation overrides in one text (at most 6400)")
        self.phones[mark], self.words[mark] = phones, word
        return mark

    def written(self, text: str) -> str:
        """The text as written, each mark back to its word."""
        return "".join(self.words.get(ch, ch) for ch in text)


@dataclass(frozen=True)
class Piece:
    """Text between breaks, and the silence after it."""

    text: str
    pause_after: float = 0.0
    explicit_pause: bool = False  # a <break> set the pause (it replaces sentence_pause there)


@dataclass(frozen=True)
class SpeechChunk:
    """One unit of synthesis: a sentence (or part of a long one) and the silence after it."""

    text: str  # as written
    phonemes: tuple[str, ...]
    pause_after: float
    words: tuple[WordSpan, ...] = ()  # which phones say which word (timing.py)


def _attributes(raw: str) -> dict[str, str]:
    return {m.group(1).lower(): next(g for g in m.groups()[1:] if g is not None) for m in _ATTR_RE.finditer(raw)}


def break_seconds(attrs: dict[str, str]) -> float:
    """The silence of one <break>: its time, else its strength, else medium (SSML's default)."""
    if "time" in attrs:
        match = _DURATION_RE.fullmatch(attrs["time"])
        if not match:
            raise TextError(f'<break time="{attrs["time"][:40]}"/>: write a duration such as "500ms" or "1.5s"')
        seconds = float(match.group(1)) / (1000 if match.group(2).lower() == "ms" else 1)
        if seconds > MAX_BREAK_SECONDS:
            raise TextError(f'<break time="{attrs["time"]}"/> is longer than {MAX_BREAK_SECONDS:g} s; '
                            "use several shorter breaks")
        return seconds
    strength = attrs.get("strength", "medium").lower()
    if strength not in BREAK_STRENGTHS:
        raise TextError(f'<break strength="{strength[:40]}"/>: expected one of {", ".join(BREAK_STRENGTHS)}')
    return BREAK_STRENGTHS[strength]


def _override(attrs: dict[str, str], word: str) -> tuple[str, ...]:
    where = f'<phoneme ph="{attrs.get("ph", "")[:60]}">{word[:40]}</phoneme>'
    alphabet = attrs.get("alphabet", "").lower()
    ph = attrs.get("ph", "")
    if alphabet not in ("", "ipa", "pinyin"):
        raise LexiconError(f'{where}: alphabet "{alphabet}" is not supported; use "ipa" or "pinyin" '
                           "(see docs/text.md#pronunciation)")
    if alphabet == "pinyin" or (not alphabet and re.fullmatch(r"(?:\s*[a-zü:]+[1-5])+\s*", ph.lower())):
        return pinyin_phones(ph, where)
    return ipa_phones(ph, where)


def parse_ssml(text: str, marks: Marks) -> list[Piece]:
    """Pieces of text between breaks (module docstring); tags other than break, sub and phoneme are dropped."""
    pieces: list[Piece] = []
    buffer: list[str] = []
    inner: tuple[str, dict[str, str], list[str]] | None = None  # an open <sub> or <phoneme> and its text
    pos = 0
    text = _PRIVATE_RE.sub("", text)
    for match in [*_TAG_RE.finditer(text), None]:
        chunk = _PRIVATE_RE.sub("", html.unescape(text[pos:match.start() if match else len(text)]))  # &#xE000;
        (inner[2] if inner else buffer).append(chunk)
        if match is None:
            break
        pos = match.end()
        closing, name, attrs = match.group(1) == "/", match.group(2).lower(), _attributes(match.group(3))
        if name == "break" and not closing:
            pieces.append(Piece("".join(buffer), break_seconds(attrs), explicit_pause=True))
            buffer = []
        elif name in ("sub", "phoneme") and not closing and inner is None:
            inner = (name, attrs, [])
        elif name in ("sub", "phoneme") and closing and inner is not None and inner[0] == name:
            kind, open_attrs, words = inner
            word = "".join(words).strip()
            if kind == "sub":
                buffer.append(open_attrs.get("alias", word))
            elif word or open_attrs.get("ph"):
                buffer.append(marks.add(word, _override(open_attrs, word)))
            inner = None
        # any other tag: dropped, its text kept
    if inner is not None:  # an unclosed <sub>/<phoneme>: its text is read as written
        buffer.extend(inner[2])
    pieces.append(Piece("".join(buffer)))
    return pieces


def apply_lexicon(text: str, lexicon: Lexicon | None, marks: Marks) -> str:
    if lexicon is None or not len(lexicon):
        return text
    out, pos = [], 0
    for start, end, entry in lexicon.find(text):
        out.append(text[pos:start])
        out.append(entry.alias if entry.alias is not None else marks.add(text[start:end], entry.phones))
        pos = end
    return "".join(out) + text[pos:]


def phonemize_marked(text: str, language: Language, marks: Marks) -> tuple[tuple[str, ...], tuple[WordSpan, ...]]:
    """Phones of a chunk whose marks carry fixed phones, and the word each group of them says.

    Raises Unpronounceable when there is nothing to say.
    """
    tokens: list[str] = []
    words: list[WordSpan] = []
    for piece in _MARK_SPLIT_RE.split(text):
        if piece in marks.phones:
            phones: list[str] | tuple[str, ...] = marks.phones[piece]
        else:
            try:
                phones = phonemize(piece, language) if piece.strip() else []
            except Unpronounceable:  # bare punctuation next to an override: keep its pause
                pause = pause_token(piece)
                if pause and tokens and tokens[-1] not in PAUSE_TOKENS:
                    tokens.append(pause)
                continue
        if phones:
            if tokens and tokens[-1] not in PAUSE_TOKENS and phones[0] not in PAUSE_TOKENS:
                tokens.append(WORD_BOUNDARY)
            start = len(tokens)
            tokens += phones
            if piece in marks.phones:
                words.append(WordSpan(marks.words[piece] or "", start, len(tokens)))
            else:
                words += label_piece(normalize_text(piece, language), phones, start)
    if not any(t not in NOT_PHONES for t in tokens):
        raise Unpronounceable(f"text has nothing pronounceable: {marks.written(text)[:80]!r}")
    return tuple(tokens), tuple(words)


def _chunk(text: str, marked: tuple[tuple[str, ...], tuple[WordSpan, ...]], pause: float) -> SpeechChunk:
    return SpeechChunk(text, marked[0], pause, marked[1])


def plan_speech(text: str, language: Language = "auto", *, lexicon: Lexicon | None = None,
                sentence_pause: float = 0.0, max_chars: int = 200) -> list[SpeechChunk]:
    """Speech chunks of a request's text (module docstring).

    Raises TextError (a 422) for bad markup or a bad override (LexiconError), Unpronounceable when nothing is
    pronounceable, FrontendUnavailable when the G2P backend is broken. Chunks with nothing to say (bare
    punctuation) add their silence to the chunk before them; no silence follows the last sentence unless a
    <break> asks for it.
    """
    if not 0.0 <= sentence_pause <= MAX_SENTENCE_PAUSE_SECONDS:
        raise TextError(f"sentence_pause must be between 0 and {MAX_SENTENCE_PAUSE_SECONDS:g} seconds, "
                        f"got {sentence_pause}")
    marks = Marks()
    chunks: list[SpeechChunk] = []
    pieces = parse_ssml(text, marks)
    for p, piece in enumerate(pieces):
        sentences = split_sentences(apply_lexicon(piece.text, lexicon, marks), max_chars)
        for i, sentence in enumerate(sentences):
            if i < len(sentences) - 1:
                pause = sentence_pause if _SENTENCE_END_RE.search(sentence) else 0.0
            elif piece.explicit_pause:
                pause = piece.pause_after
            else:
                pause = sentence_pause if p < len(pieces) - 1 else 0.0
            try:
                chunks.append(_chunk(marks.written(sentence), phonemize_marked(sentence, language, marks), pause))
            except Unpronounceable:
                if chunks:
                    chunks[-1] = replace(chunks[-1], pause_after=chunks[-1].pause_after + pause)
        if not sentences and piece.explicit_pause and chunks:
            chunks[-1] = replace(chunks[-1], pause_after=chunks[-1].pause_after + piece.pause_after)
    if not chunks:
        raise Unpronounceable(f"text has nothing pronounceable: {_TAG_RE.sub('', text)[:80]!r}")
    return chunks


# --- sentences -------------------------------------------------------------------------------------------
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
