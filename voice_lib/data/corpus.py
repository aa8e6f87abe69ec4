"""A multi-speaker synthetic speech corpus with exact transcripts, made by offline TTS engines.

Speakers come from flite, festival, espeak-ng and SVOX Pico (Debian packages), so tests, demos and the
pretraining set need no downloads and no real people's voices. Sample rates default to 16000 to
match ``Settings.sample_rate``; callers pass ``settings.sample_rate`` to override.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile as sf
import soxr

from voice_lib.core.storage import atomic_write


class CorpusError(RuntimeError):
    """A TTS engine is missing, failed, or produced no audio."""


@dataclass(frozen=True)
class CorpusVoice:
    name: str  # speaker id, also a valid VoiceOps voice_id
    engine: Literal["flite", "festival", "espeak-ng", "pico"]
    engine_voice: str
    language: str  # GPT-SoVITS language code: "en" or "zh"


_REGISTRY = [
    CorpusVoice("flite-slt", "flite", "slt", "en"),
    CorpusVoice("flite-awb", "flite", "awb", "en"),
    CorpusVoice("flite-rms", "flite", "rms", "en"),
    CorpusVoice("flite-kal16", "flite", "kal16", "en"),
    CorpusVoice("festival-kal", "festival", "kal_diphone", "en"),
    CorpusVoice("festival-ked", "festival", "ked_diphone", "en"),
    CorpusVoice("festival-slt-hts", "festival", "cmu_us_slt_arctic_hts", "en"),
    CorpusVoice("espeak-en-m3", "espeak-ng", "en+m3", "en"),
    CorpusVoice("espeak-en-f2", "espeak-ng", "en+f2", "en"),
    CorpusVoice("espeak-en-us-m1", "espeak-ng", "en-us+m1", "en"),
    CorpusVoice("espeak-en-us-f3", "espeak-ng", "en-us+f3", "en"),
    CorpusVoice("espeak-en-scotland-m4", "espeak-ng", "en-gb-scotland+m4", "en"),
    CorpusVoice("espeak-en-rp-f4", "espeak-ng", "en-gb-x-rp+f4", "en"),
    # Debian's plain "cmn" voice spells Hanzi out as English-read pinyin ("hen three");
    # "cmn-latn-pinyin" reads Hanzi as real Mandarin with tones and tone sandhi.
    CorpusVoice("espeak-cmn-m1", "espeak-ng", "cmn-latn-pinyin+m1", "zh"),
    CorpusVoice("espeak-cmn-f2", "espeak-ng", "cmn-latn-pinyin+f2", "zh"),
    CorpusVoice("espeak-cmn-m3", "espeak-ng", "cmn-latn-pinyin+m3", "zh"),
    # SVOX Pico (Debian non-free `libttspico-utils`; Apache-2.0 code, redistributable language data): the only
    # offline female English voices that Whisper reads as well as flite's best (measured on ten everyday
    # sentences: en-US WER 0.00, DNSMOS P.808 3.64), so female targets need no octave-wide re-pitch of a man.
    CorpusVoice("pico-en-us", "pico", "en-US", "en"),
    CorpusVoice("pico-en-gb", "pico", "en-GB", "en"),
]
VOICES: dict[str, CorpusVoice] = {v.name: v for v in _REGISTRY}

# Speakers never used for pretraining, so cloning can be measured on unseen voices. flite-slt is
# read well by the offline ASR; festival-slt-hts is the same recorded speaker (CMU ARCTIC SLT), so
# it must be held out too or the "unseen" speaker would leak into pretraining.
PRETRAIN_HOLDOUT: tuple[str, ...] = ("flite-slt", "festival-slt-hts", "flite-rms")

# binary to call, and the Debian package that provides it
_ENGINE_BINARY = {"flite": ("flite", "flite"), "festival": ("text2wave", "festival"), "espeak-ng": ("espeak-ng", "espeak-ng"),
                  "pico": ("pico2wave", "libttspico-utils")}
_FESTIVAL_VOICE_PACKAGE = {
    "kal_diphone": "festvox-kallpc16k",
    "ked_diphone": "festvox-kdlpc16k",
    "cmu_us_slt_arctic_hts": "festvox-us-slt-hts",
}
_FESTIVAL_VOICE_DIRS = (Path("/usr/share/festival/voices"), Path("/usr/local/share/festival/voices"))
Layout = Literal["metadata", "list", "txt", "none"]


def _packages(voice: CorpusVoice) -> str:
    pkg = _ENGINE_BINARY[voice.engine][1]
    extra = _FESTIVAL_VOICE_PACKAGE.get(voice.engine_voice) if voice.engine == "festival" else None
    return f"{pkg} {extra}" if extra else pkg


def get_voice(name: str) -> CorpusVoice:
    """Look a speaker id up in ``VOICES``."""
    try:
        return VOICES[name]
    except KeyError:
        raise ValueError(f"unknown corpus voice {name!r}; known: {', '.join(VOICES)}") from None


@lru_cache(maxsize=4)
def _flite_voices(binary: str) -> frozenset[str]:
    out = subprocess.run([binary, "-lv"], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    return frozenset(out.stdout.split(":", 1)[-1].split())


def _voice_installed(voice: CorpusVoice) -> bool:
    binary = shutil.which(_ENGINE_BINARY[voice.engine][0])
    if binary is None:
        return False
    if voice.engine == "flite":
        return voice.engine_voice in _flite_voices(binary)
    if voice.engine == "festival":
        return any(d.is_dir() and any(d.glob(f"*/{voice.engine_voice}")) for d in _FESTIVAL_VOICE_DIRS)
    return True  # espeak-ng variants ship with espeak-ng-data; pico2wave with all its languages


def available_voices(language: str | None = None) -> list[str]:
    """Speaker ids whose engine (and festival voice data) is installed, optionally of one language."""
    return [v.name for v in _REGISTRY if (language is None or v.language == language) and _voice_installed(v)]


def pretrain_voices(language: str | None = None) -> list[str]:
    """Available speaker ids minus ``PRETRAIN_HOLDOUT``."""
    return [name for name in available_voices(language) if name not in PRETRAIN_HOLDOUT]


@lru_cache(maxsize=4)
def _sentences(language: str) -> tuple[str, ...]:
    path = resources.files("voice_lib.data") / f"sentences_{language}.txt"
    if not path.is_file():
        raise ValueError(f"no sentence list for language {language!r} (expected {path})")
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return tuple(dict.fromkeys(line for line in lines if line))  # de-duplicated, file order


def load_sentences(language: str = "en") -> list[str]:
    """The bundled prompt sentences for a language ("en" or "zh")."""
    return list(_sentences(language))


LISTENING_TEXTS = 3


def listening_texts(language: str = "en") -> list[str]:
    """The sentences every evaluated version speaks (the release page plays them side by side for production,
    canary and candidate) and canary_promotion's quality probe sends through the server."""
    return load_sentences(language if language in ("en", "zh") else "en")[:LISTENING_TEXTS]


def _sentence_stream(language: str, seed: int, speaker: str) -> Iterator[str]:
    # Seeded per speaker, so adding a speaker or asking for more clips keeps earlier choices stable.
    rng = random.Random(f"{seed}:{speaker}")
    pool = load_sentences(language)
    while True:
        yield from rng.sample(pool, len(pool))


def _command(voice: CorpusVoice, binary: str, text_file: Path, wav: Path) -> list[str]:
    if voice.engine == "flite":
        return [binary, "-voice", voice.engine_voice, "-f", str(text_file), "-o", str(wav)]
    if voice.engine == "festival":
        return [binary, "-eval", f"(voice_{voice.engine_voice})", str(text_file), "-o", str(wav)]
    if voice.engine == "pico":  # pico2wave reads its text only as an argument; "--" ends its options
        return [binary, "-l", voice.engine_voice, "-w", str(wav), "--", text_file.read_text(encoding="utf-8").strip()]
    return [binary, "-v", voice.engine_voice, "-b", "1", "-f", str(text_file), "-w", str(wav)]


def synthesize(text: str, voice: CorpusVoice | str, sample_rate: int = 16000) -> np.ndarray:
    """Speak ``text`` with an offline engine; returns mono float32 at ``sample_rate``."""
    voice = get_voice(voice) if isinstance(voice, str) else voice
    text = " ".join(text.split())
    if not text:
        raise ValueError("text is empty")
    exe, _ = _ENGINE_BINARY[voice.engine]
    binary = shutil.which(exe)
    if binary is None:
        raise CorpusError(f"{voice.engine}: '{exe}' not found on PATH; install it with: apt-get install {_packages(voice)}")
    with tempfile.TemporaryDirectory(prefix="voiceops-tts-") as tmp:
        # Text goes through a file, never the command line, so no quoting or option injection issues.
        text_file, wav = Path(tmp) / "text.txt", Path(tmp) / "out.wav"
        text_file.write_text(text + "\n", encoding="utf-8")
        proc = subprocess.run(
            _command(voice, binary, text_file, wav), capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
        )
        if proc.returncode != 0 or not wav.is_file() or wav.stat().st_size <= 44:
            detail = (proc.stderr or proc.stdout).strip()[-300:]
            raise CorpusError(
                f"{voice.engine} voice {voice.engine_voice!r} produced no audio (exit {proc.returncode}): {detail}; "
                f"check that these Debian packages are installed: {_packages(voice)}"
            )
        audio, rate = sf.read(wav, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if audio.size == 0 or float(np.max(np.abs(audio))) < 1e-4:
        raise CorpusError(f"{voice.engine} voice {voice.engine_voice!r} produced silent audio for {text[:40]!r}")
    if rate != sample_rate:
        audio = soxr.resample(audio, rate, sample_rate, quality="HQ")
    peak = float(np.max(np.abs(audio)))
    if peak > 0.99:  # resampling can overshoot; keep 16-bit PCM from clipping
        audio = audio * (0.99 / peak)
    return np.ascontiguousarray(audio, dtype=np.float32)


def _write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    # Atomic, so an interrupted run never leaves a truncated clip that looks finished.
    with atomic_write(path) as fh:
        sf.write(fh, audio, sample_rate, subtype="PCM_16", format="WAV")


def _clean(text: str) -> str:
    return " ".join(text.replace("|", ",").split())  # "|" is the field separator of every layout


@dataclass(frozen=True)
class CorpusClip:
    file: str  # posix path relative to the corpus root
    speaker: str
    language: str
    text: str
    seconds: float
    hash: str


@dataclass
class CorpusManifest:
    out_dir: Path
    sample_rate: int
    clips: list[CorpusClip]
    synthesized: int  # clips rendered by this run; 0 when everything was already there
    speakers: list[str] = field(default_factory=list)

    @property
    def list_path(self) -> Path:
        return self.out_dir / "corpus.list"

    @property
    def json_path(self) -> Path:
        return self.out_dir / "corpus.json"

    def seconds_per_speaker(self) -> dict[str, float]:
        totals = dict.fromkeys(self.speakers, 0.0)
        for clip in self.clips:
            totals[clip.speaker] += clip.seconds
        return totals


def _clip_hash(voice: CorpusVoice, text: str, sample_rate: int) -> str:
    key = f"{voice.engine}|{voice.engine_voice}|{sample_rate}|{text}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def _render(voice: CorpusVoice, text: str, path: Path, sample_rate: int) -> float:
    audio = synthesize(text, voice, sample_rate)
    _write_wav(path, audio, sample_rate)
    return len(audio) / sample_rate


def generate_corpus(
    out_dir: Path,
    voices: list[str] | None,
    sentences_per_voice: int,
    language: str = "en",
    sample_rate: int = 16000,
    seed: int = 0,
    progress: bool = True,
    workers: int = 2,
    parallel: bool = False,
) -> CorpusManifest:
    """Render ``sentences_per_voice`` clips per speaker (default: every available speaker of
    ``language``) into ``out_dir/<speaker>/``; clips already there with the same text are reused.
    ``parallel``: every speaker reads the same sentences in the same order (clip ``_NNNN`` is sentence NNNN
    for all), the paired data the two-stage converter is pretrained on."""
    out_dir = Path(out_dir)
    names = available_voices(language) if voices is None else list(dict.fromkeys(voices))
    chosen = [get_voice(n) for n in names]
    wrong = [v.name for v in chosen if v.language != language]
    if wrong:
        raise ValueError(f"voices {wrong} do not speak {language!r}")
    if not chosen:
        raise CorpusError(f"no {language!r} voices available; install flite, festival or espeak-ng")
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "corpus.json"
    previous: dict[str, dict] = {}
    try:
        previous = {c["file"]: c for c in json.loads(json_path.read_text(encoding="utf-8"))["clips"]}
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no or unreadable manifest: every clip is rendered again, which is only slower

    planned: list[tuple[CorpusVoice, str, str, str]] = []  # voice, relative file, text, hash
    for voice in chosen:
        (out_dir / voice.name).mkdir(exist_ok=True)
        stream = _sentence_stream(language, seed, "parallel" if parallel else voice.name)
        for i in range(sentences_per_voice):
            text = _clean(next(stream))
            planned.append((voice, f"{voice.name}/{voice.name}_{i:04d}.wav", text, _clip_hash(voice, text, sample_rate)))

    seconds: dict[str, float] = {}
    todo = []
    for voice, rel, text, digest in planned:
        old = previous.get(rel)
        if old and old.get("hash") == digest and (out_dir / rel).is_file():
            seconds[rel] = float(old["seconds"])
        else:
            todo.append((voice, rel, text))

    if todo:
        # Each job runs its engine in a child process, so threads keep both cores busy without
        # the start-up and pickling cost of a process pool.
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = {pool.submit(_render, v, text, out_dir / rel, sample_rate): rel for v, rel, text in todo}
            done = as_completed(futures)
            if progress:
                from rich.progress import track

                done = track(done, total=len(futures), description=f"Synthesising {len(futures)} clips")
            for future in done:
                seconds[futures[future]] = future.result()

    clips = [CorpusClip(rel, v.name, v.language, text, round(seconds[rel], 3), h) for v, rel, text, h in planned]
    planned_files = {c.file for c in clips}
    for rel in previous:  # clips an earlier, larger run wrote for these speakers
        if rel not in planned_files and rel.split("/", 1)[0] in names:
            (out_dir / rel).unlink(missing_ok=True)

    for voice in chosen:
        rows = [f"{Path(c.file).name}|{c.text}\n" for c in clips if c.speaker == voice.name]
        (out_dir / voice.name / "metadata.csv").write_text("".join(rows), encoding="utf-8")
    manifest = CorpusManifest(out_dir, sample_rate, clips, len(todo), [v.name for v in chosen])
    manifest.list_path.write_text("".join(f"{c.file}|{c.speaker}|{c.language}|{c.text}\n" for c in clips), encoding="utf-8")
    _write_summary(json_path, manifest, language, sample_rate, seed, parallel)
    return manifest


def _write_summary(json_path: Path, manifest: CorpusManifest, language: str, sample_rate: int, seed: int,
                   parallel: bool) -> None:
    """corpus.json: per-speaker totals, the sentences and every clip (what a re-run compares against)."""
    clips = manifest.clips
    summary = {
        "version": 1, "language": language, "sample_rate": sample_rate, "seed": seed, "parallel": parallel,
        "speakers": {
            name: {"engine": VOICES[name].engine, "clips": sum(c.speaker == name for c in clips), "seconds": round(s, 3)}
            for name, s in manifest.seconds_per_speaker().items()
        },
        "sentences": sorted({c.text for c in clips}),
        "clips": [c.__dict__ for c in clips],
    }
    json_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_voice_dataset(
    out_dir: Path,
    voice: str,
    seconds: float,
    seed: int = 0,
    layout: Layout = "metadata",
    sample_rate: int = 16000,
) -> Path:
    """Write one speaker's clips into ``out_dir`` until they total >= ``seconds``, with transcripts
    as metadata.csv, a GPT-SoVITS ``<voice>.list``, per-clip ``.txt`` files, or none. Returns out_dir."""
    if layout not in ("metadata", "list", "txt", "none"):
        raise ValueError(f"layout must be metadata, list, txt or none, not {layout!r}")
    spec = get_voice(voice)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stream = _sentence_stream(spec.language, seed, spec.name)
    rows: list[tuple[str, str]] = []
    total = 0.0
    while total < seconds:
        text = _clean(next(stream))
        name = f"{spec.name}_{len(rows):04d}.wav"
        total += _render(spec, text, out_dir / name, sample_rate)
        rows.append((name, text))
        if layout == "txt":
            (out_dir / name).with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
    if layout == "metadata":
        (out_dir / "metadata.csv").write_text("".join(f"{f}|{t}\n" for f, t in rows), encoding="utf-8")
    elif layout == "list":
        # Paths relative to the list's folder, so the dataset can be moved or uploaded as a unit.
        lines = "".join(f"{f}|{spec.name}|{spec.language}|{t}\n" for f, t in rows)
        (out_dir / f"{spec.name}.list").write_text(lines, encoding="utf-8")
    return out_dir


@dataclass(frozen=True)
class LongRecording:
    path: Path
    texts: list[str]
    segments: list[tuple[float, float]]  # (start, end) seconds of each sentence in the file
    seconds: float


def _trim(audio: np.ndarray, sample_rate: int, margin: float = 0.03) -> np.ndarray:
    # Engines pad clips with uneven silence; trimming makes the inserted pauses the real gaps.
    loud = np.flatnonzero(np.abs(audio) > 0.02 * float(np.max(np.abs(audio))))
    pad = int(margin * sample_rate)
    return audio[max(0, loud[0] - pad) : loud[-1] + pad + 1]


def concat_long_recording(
    out_path: Path,
    voice: str,
    n_sentences: int = 8,
    seed: int = 0,
    sample_rate: int = 16000,
    pause_range: tuple[float, float] = (0.5, 0.8),
    edge_silence: float = 0.3,
) -> LongRecording:
    """One untranscribed-style long wav: ``n_sentences`` sentences separated by random pauses."""
    spec = get_voice(voice)
    rng = np.random.default_rng(seed)
    stream = _sentence_stream(spec.language, seed, spec.name)
    texts = [_clean(next(stream)) for _ in range(n_sentences)]
    pieces: list[np.ndarray] = [np.zeros(int(edge_silence * sample_rate), np.float32)]
    segments: list[tuple[float, float]] = []
    cursor = len(pieces[0])
    for i, text in enumerate(texts):
        speech = _trim(synthesize(text, spec, sample_rate), sample_rate)
        segments.append((cursor / sample_rate, (cursor + len(speech)) / sample_rate))
        gap = edge_silence if i == len(texts) - 1 else float(rng.uniform(*pause_range))
        pieces += [speech, np.zeros(int(gap * sample_rate), np.float32)]
        cursor += len(speech) + len(pieces[-1])
    audio = np.concatenate(pieces)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _write_wav(out_path, audio, sample_rate)
    return LongRecording(out_path, texts, segments, len(audio) / sample_rate)
