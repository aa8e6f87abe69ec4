"""Read the transcripts that come with a dataset.

Three layouts are understood, in order of precedence:
GPT-SoVITS ``.list`` files (``path|speaker|lang|text``), ``metadata.csv`` (``file|text``, LJSpeech's
``id|text|normalized`` too) and per-file ``.txt``/``.lab`` beside the audio.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from voice_lib.audio import AUDIO_EXTENSIONS

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


def _clean(text: str) -> str:
    # Control characters (including stray \r and zero-width marks) break G2P and hide in reports.
    text = "".join(" " if unicodedata.category(c).startswith("C") else c for c in text)
    return " ".join(text.split())


def _resolve(name: str, base_dir: str, audio_files: set[str], by_basename: dict[str, list[str]]) -> str | None:
    name = name.strip().replace("\\", "/")
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
    audio_files = {f for f in files if f.lower().endswith(AUDIO_EXTENSIONS)}
    by_basename: dict[str, list[str]] = {}
    for f in audio_files:
        by_basename.setdefault(PurePosixPath(f).name, []).append(f)
    index: dict[str, Transcript] = {}
    problems: list[str] = []

    def read_lines(rel: str) -> list[str]:
        try:
            return (root / rel).read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError:
            problems.append(f"{rel}: not UTF-8 text; save it as UTF-8.")
            return []

    def add(rel_audio: str | None, name: str, text: str, lang: str | None, where: str) -> None:
        text = _clean(text)
        if rel_audio is None:
            problems.append(f"{where}: names {name.strip()!r}, which is not in the dataset; fix the path or remove the line.")
        elif not text:
            problems.append(f"{where}: the transcript for {rel_audio} is empty; write the text or remove the line.")
        else:
            index.setdefault(rel_audio, Transcript(text, lang, where))

    for rel in sorted(f for f in files if f.lower().endswith(".list")):
        base = str(PurePosixPath(rel).parent).replace(".", "")
        for n, line in enumerate(read_lines(rel), 1):
            if not line.strip():
                continue
            fields = line.split("|")
            if len(fields) < 4:
                problems.append(f"{rel}:{n}: expected 'path|speaker|lang|text', got {len(fields)} field(s); fix the line.")
                continue
            lang = LANGUAGE_CODES.get(fields[2].strip().lower())
            add(_resolve(fields[0], base, audio_files, by_basename), fields[0], "|".join(fields[3:]), lang, f"{rel}:{n}")

    for rel in sorted(f for f in files if PurePosixPath(f).name == "metadata.csv"):
        base = str(PurePosixPath(rel).parent).replace(".", "")
        for n, line in enumerate(read_lines(rel), 1):
            if not line.strip():
                continue
            fields = line.split("|")
            if len(fields) < 2:
                problems.append(f"{rel}:{n}: expected 'file|text'; fix the line.")
                continue
            # LJSpeech: id|raw text|normalized text; the normalized column is what was spoken.
            text = fields[2] if len(fields) >= 3 and fields[2].strip() else fields[1]
            add(_resolve(fields[0], base, audio_files, by_basename), fields[0], text, None, f"{rel}:{n}")

    for rel_audio in sorted(audio_files):
        if rel_audio in index:
            continue
        stem = rel_audio.rsplit(".", 1)[0]
        for ext in (".txt", ".lab"):
            if f"{stem}{ext}" in files:
                lines = read_lines(f"{stem}{ext}")
                add(rel_audio, rel_audio, " ".join(lines), None, f"{stem}{ext}")
                break
    return TranscriptIndex(index, problems)
