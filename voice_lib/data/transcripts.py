"""Read the transcripts that come with a dataset.

Three layouts are understood, in order of precedence:
GPT-SoVITS ``.list`` files (``path|speaker|lang|text``), ``metadata.csv`` (``file|text``, LJSpeech's
``id|text|normalized`` too) and per-file ``.txt``/``.lab`` beside the audio.

Control and invisible characters are normalised away, never passed on, and every line that loses any
is reported (``TranscriptIndex.warnings``, file and line named) so the user can check the text:

- lines end at ``\r\n``, ``\n`` or ``\r`` only (what editors show); a leading BOM is dropped silently;
- terminal escape sequences (``ESC [ ... m``, ``ESC ] ... BEL``) are removed whole, not just their ESC;
- other control and format characters (NUL, DEL, C0/C1 controls, zero-width spaces and joiners, bidi
  overrides and isolates, stray BOMs, soft hyphens) are removed without a trace, in the text and in
  the file-name column, so ``qu\u200bick`` reads ``quick``;
- whitespace controls (tab, vertical tab, form feed, NEL, U+2028) are spaces; runs of spaces collapse.

A transcript file that holds audio (a recording saved with a ``.txt`` name) is a problem naming the
file and the name to give it.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from voice_lib.data.audio import AUDIO_EXTENSIONS

LANGUAGE_CODES = {"en": "en", "zh": "zh", "all_zh": "zh", "cmn": "zh", "auto": "auto"}


@dataclass(frozen=True)
class Transcript:
    text: str
    language: str | None
    source: str  # "file:line" it came from


@dataclass
class TranscriptIndex:
    by_audio: dict[str, Transcript]
    problems: list[str]  # each names the transcript file, the line and the fix
    warnings: list[str] = field(default_factory=list)  # lines whose control characters were removed


# Terminal escape sequences: CSI (ESC [ or 8-bit 0x9B ... final byte), OSC (ESC ] ... BEL or ESC \\),
# then any other two-byte ESC sequence. Removed whole so no "[31m" is left in the text.
_ESCAPES = re.compile(r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# Audio containers by their first bytes: a recording saved under a transcript name.
_AUDIO_MAGIC = ((b"RIFF", ".wav", "WAV"), (b"fLaC", ".flac", "FLAC"), (b"OggS", ".ogg", "Ogg"), (b"ID3", ".mp3", "MP3"))


def _strip_invisible(text: str) -> tuple[str, list[str]]:
    """Remove escape sequences and non-whitespace control/format characters; returns (text, removed)."""
    removed = [m.group(0)[:1] for m in _ESCAPES.finditer(text)]
    text = _ESCAPES.sub("", text)
    out = []
    for c in text:
        if c.isspace():
            out.append(" " if unicodedata.category(c).startswith("C") else c)
        elif unicodedata.category(c).startswith("C"):
            removed.append(c)
        else:
            out.append(c)
    return "".join(out), removed


def _clean(text: str) -> tuple[str, list[str]]:
    text, removed = _strip_invisible(text)
    return " ".join(text.split()), removed


def _describe(removed: list[str]) -> str:
    codes = sorted({f"U+{ord(c):04X}" for c in removed})
    return ", ".join(codes[:6]) + (" ..." if len(codes) > 6 else "")


def _audio_disguised_as_text(root: Path, rel: str) -> str | None:
    with open(root / rel, "rb") as fh:
        head = fh.read(12)
    found = next(((ext, kind) for magic, ext, kind in _AUDIO_MAGIC
                  if head.startswith(magic) and (magic != b"RIFF" or head[8:12] == b"WAVE")), None)
    if found is None and head[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2", b"\xff\xfa"):  # MPEG frame sync
        found = (".mp3", "MP3")
    if found is None:
        return None
    return (
        f"{rel}: holds {found[1]} audio, not transcript text; if it is a recording, rename it to "
        f"{rel.rsplit('.', 1)[0]}{found[0]}, otherwise remove it."
    )


def _resolve(name: str, base_dir: str, audio_files: set[str], by_basename: dict[str, list[str]]) -> str | None:
    name = _strip_invisible(name)[0].strip().replace("\\", "/")
    candidates = [name, f"{base_dir}/{name}" if base_dir else name]
    if not PurePosixPath(name).suffix.lower() in AUDIO_EXTENSIONS:
        candidates += [f"{c}{ext}" for c in list(candidates) for ext in AUDIO_EXTENSIONS]
    for cand in candidates:
        cand = cand.lstrip("./")
        if cand in audio_files:
            return cand
    # GPT-SoVITS lists often hold absolute paths from the machine they were made on: match by file name.
    base = PurePosixPath(name).name
    matches = by_basename.get(base, []) or [
        m for ext in AUDIO_EXTENSIONS for m in by_basename.get(base + ext, [])
    ]
    return matches[0] if len(matches) == 1 else None


def read_transcripts(root: Path, files: list[str]) -> TranscriptIndex:
    """Every transcript of a staged dataset: GPT-SoVITS ``.list`` files, LJSpeech ``metadata.csv`` and per-clip
    ``.txt``/``.lab`` sidecars, in that order of precedence, with a problem or warning for each bad line."""
    reader = _TranscriptReader(root, files)
    reader.read_lists()
    reader.read_metadata_csv()
    reader.read_sidecars()
    return TranscriptIndex(reader.index, reader.problems, reader.warnings)


class _TranscriptReader:
    """The state of one read_transcripts call: the dataset's files, and what was found so far."""

    def __init__(self, root: Path, files: list[str]) -> None:
        self.root, self.files = root, files
        self.audio_files = {f for f in files if f.lower().endswith(AUDIO_EXTENSIONS)}
        self.by_basename: dict[str, list[str]] = {}
        for f in self.audio_files:
            self.by_basename.setdefault(PurePosixPath(f).name, []).append(f)
        self.index: dict[str, Transcript] = {}
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self.unreadable: set[str] = set()
        for rel in sorted(f for f in files if f not in self.audio_files and (root / f).is_file()):
            disguised = _audio_disguised_as_text(root, rel)
            if disguised:
                self.problems.append(disguised)
                self.unreadable.add(rel)

    def read_lines(self, rel: str) -> list[str] | None:
        """The file's lines, or None when it cannot be read (the problem is recorded once)."""
        if rel in self.unreadable:
            return None
        try:
            # Universal newlines only: str.splitlines() would also break at \v, \f, \x1c-\x1e, \x85 and
            # U+2028 inside a line, shifting every later line number away from what an editor shows.
            content = (self.root / rel).read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            self.problems.append(f"{rel}: not UTF-8 text; save it as UTF-8.")
            return None
        return _LINE_BREAK.split(content)

    @staticmethod
    def blank(line: str) -> bool:
        return not _clean(line)[0]

    def add(self, rel_audio: str | None, name: str, raw_text: str, lang: str | None, where: str) -> None:
        text, removed = _clean(raw_text)
        removed += _strip_invisible(name)[1]
        if removed and text:
            self.warnings.append(
                f"{where}: removed {len(removed)} control or invisible character(s) ({_describe(removed)}); "
                f"the text used is {text!r}: if that is not what was spoken, fix the line."
            )
        if rel_audio is None:
            shown = _strip_invisible(name)[0].strip()
            self.problems.append(f"{where}: names {shown!r}, which is not in the dataset; fix the path or remove the line.")
        elif not text:
            self.problems.append(f"{where}: the transcript for {rel_audio} is empty; write the text or remove the line.")
        else:
            self.index.setdefault(rel_audio, Transcript(text, lang, where))

    def _rows(self, rel: str) -> Iterator[tuple[int, list[str]]]:
        """(line number, '|'-separated fields) of each non-blank line of ``rel``."""
        for n, line in enumerate(self.read_lines(rel) or [], 1):
            if not self.blank(line):
                yield n, line.split("|")

    def _resolve(self, name: str, rel: str) -> str | None:
        return _resolve(name, str(PurePosixPath(rel).parent).replace(".", ""), self.audio_files, self.by_basename)

    def read_lists(self) -> None:
        for rel in sorted(f for f in self.files if f.lower().endswith(".list")):
            for n, fields in self._rows(rel):
                if len(fields) < 4:
                    self.problems.append(f"{rel}:{n}: expected 'path|speaker|lang|text', got {len(fields)} field(s); fix the line.")
                    continue
                lang = LANGUAGE_CODES.get(_clean(fields[2])[0].lower())
                self.add(self._resolve(fields[0], rel), fields[0], "|".join(fields[3:]), lang, f"{rel}:{n}")

    def read_metadata_csv(self) -> None:
        for rel in sorted(f for f in self.files if PurePosixPath(f).name == "metadata.csv"):
            for n, fields in self._rows(rel):
                if len(fields) < 2:
                    self.problems.append(f"{rel}:{n}: expected 'file|text'; fix the line.")
                    continue
                # LJSpeech: id|raw text|normalized text; the normalized column is what was spoken.
                text = fields[2] if len(fields) >= 3 and not self.blank(fields[2]) else fields[1]
                self.add(self._resolve(fields[0], rel), fields[0], text, None, f"{rel}:{n}")

    def read_sidecars(self) -> None:
        for rel_audio in sorted(self.audio_files):
            if rel_audio in self.index:
                continue
            stem = rel_audio.rsplit(".", 1)[0]
            for ext in (".txt", ".lab"):
                if f"{stem}{ext}" in self.files:
                    lines = self.read_lines(f"{stem}{ext}")
                    if lines is not None:
                        self.add(rel_audio, rel_audio, " ".join(lines), None, f"{stem}{ext}")
                    break
