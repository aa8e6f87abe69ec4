"""Real synthesis with the offline engines (flite, festival, espeak-ng); no mocks of the engines."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from voice_lib.core.config import VOICE_ID_PATTERN
from voice_lib.data import corpus
from voice_lib.data.corpus import VOICES, CorpusError

SR = 16000
EN_TEXT = "The birch canoe slid on the smooth planks."
ZH_TEXT = "今天天气很好。"


def _voiced_fraction(audio: np.ndarray) -> float:
    frames = audio[: len(audio) // 320 * 320].reshape(-1, 320)
    rms = np.sqrt((frames**2).mean(axis=1))
    return float((rms > 0.01 * rms.max()).mean())


def test_sentence_lists_are_clean() -> None:
    en, zh = corpus.load_sentences("en"), corpus.load_sentences("zh")
    assert len(en) >= 140 and len(zh) >= 35
    for s in en:
        assert 5 <= len(s.split()) <= 16, s
        assert s.isascii() and not re.search(r"[0-9|]", s), s
    assert all(re.search(r"[\u4e00-\u9fff]", s) for s in zh)


def test_registry_and_holdout() -> None:
    assert all(VOICE_ID_PATTERN.fullmatch(name) for name in VOICES)
    assert "flite-slt" in corpus.PRETRAIN_HOLDOUT and 2 <= len(corpus.PRETRAIN_HOLDOUT) <= 3
    assert set(corpus.PRETRAIN_HOLDOUT) <= set(VOICES)
    pretrain = corpus.pretrain_voices()
    assert pretrain and not set(pretrain) & set(corpus.PRETRAIN_HOLDOUT)
    assert set(pretrain) <= set(corpus.available_voices())


@pytest.mark.parametrize("name", list(VOICES))
def test_every_voice_speaks(name: str) -> None:
    if name not in corpus.available_voices():
        pytest.skip(f"{name} engine not installed")
    voice = VOICES[name]
    audio = corpus.synthesize(ZH_TEXT if voice.language == "zh" else EN_TEXT, voice, SR)
    assert audio.dtype == np.float32 and audio.ndim == 1
    seconds = len(audio) / SR
    assert 1.0 < seconds < 6.0, seconds  # 8 English words or 6 Hanzi at a normal rate
    assert np.sqrt(np.mean(audio**2)) > 0.01 and np.abs(audio).max() <= 1.0
    assert _voiced_fraction(audio) > 0.4


def test_pico_speaks_text_that_looks_like_options(tmp_path: Path) -> None:
    """pico2wave takes its text on the command line: a sentence starting with "-" is spoken, never parsed."""
    if "pico-en-us" not in corpus.available_voices():
        pytest.skip("SVOX Pico (libttspico-utils) not installed")
    stray = tmp_path / "x.wav"
    audio = corpus.synthesize(f"-w {stray} minus sign first, then words.", "pico-en-us", SR)
    assert len(audio) / SR > 1.5 and not stray.exists()


def test_resampling_keeps_duration() -> None:
    a16 = corpus.synthesize(EN_TEXT, "festival-slt-hts", 16000)  # engine renders at 32 kHz
    a24 = corpus.synthesize(EN_TEXT, "festival-slt-hts", 24000)
    assert abs(len(a16) / 16000 - len(a24) / 24000) < 0.01


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*.wav")}


def test_generate_corpus_consistent_and_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    speakers = ["flite-awb", "festival-ked", "espeak-en-m3"]
    manifest = corpus.generate_corpus(tmp_path, speakers, 3, progress=False)
    assert manifest.synthesized == 9 and manifest.speakers == speakers

    list_rows = [line.split("|") for line in (tmp_path / "corpus.list").read_text().splitlines()]
    assert len(list_rows) == 9
    summary = json.loads((tmp_path / "corpus.json").read_text())
    assert set(summary["speakers"]) == set(speakers)
    for rel, speaker, lang, text in list_rows:
        wav = tmp_path / rel
        assert wav.parent.name == speaker and lang == "en" and text
        info = sf.info(wav)
        assert info.samplerate == SR and info.channels == 1 and info.subtype == "PCM_16"
        assert text in summary["sentences"]
    for speaker in speakers:
        rows = [r.split("|") for r in (tmp_path / speaker / "metadata.csv").read_text().splitlines()]
        assert len(rows) == 3 and all((tmp_path / speaker / f).is_file() for f, _ in rows)
        assert rows == [[Path(r[0]).name, r[3]] for r in list_rows if r[1] == speaker]
        real = sum(sf.info(tmp_path / speaker / f).duration for f, _ in rows)
        assert summary["speakers"][speaker]["clips"] == 3
        assert summary["speakers"][speaker]["seconds"] == pytest.approx(real, abs=0.01)

    before = _mtimes(tmp_path)

    def no_synthesis(*args: object, **kwargs: object) -> None:
        raise AssertionError("second run must not synthesise")

    monkeypatch.setattr(corpus, "synthesize", no_synthesis)
    again = corpus.generate_corpus(tmp_path, speakers, 3, progress=False)
    assert again.synthesized == 0 and again.clips == manifest.clips
    assert _mtimes(tmp_path) == before


@pytest.mark.parametrize("layout", ["metadata", "list", "txt", "none"])
def test_make_voice_dataset_layouts(tmp_path: Path, layout: str) -> None:
    out = corpus.make_voice_dataset(tmp_path / "ds", "flite-slt", seconds=12, layout=layout)
    wavs = sorted(out.glob("*.wav"))
    total = sum(sf.info(w).duration for w in wavs)
    assert total >= 12 and total - max(sf.info(w).duration for w in wavs) < 12  # stops once reached
    names = {w.name for w in wavs}
    if layout == "metadata":
        rows = [r.split("|") for r in (out / "metadata.csv").read_text().splitlines()]
        assert {f for f, _ in rows} == names and all(t for _, t in rows)
    elif layout == "list":
        rows = [r.split("|") for r in (out / "flite-slt.list").read_text().splitlines()]
        assert {r[0] for r in rows} == names and {(r[1], r[2]) for r in rows} == {("flite-slt", "en")}
    elif layout == "txt":
        assert all(w.with_suffix(".txt").read_text().strip() for w in wavs)
    else:
        assert sorted(p.name for p in out.iterdir()) == sorted(names)


def test_concat_long_recording(tmp_path: Path) -> None:
    rec = corpus.concat_long_recording(tmp_path / "long.wav", "flite-kal16", n_sentences=5, seed=3)
    audio, sr = sf.read(rec.path, dtype="float32")
    assert sr == SR and len(rec.texts) == len(rec.segments) == 5
    assert rec.seconds == pytest.approx(len(audio) / sr)
    gaps = [b[0] - a[1] for a, b in zip(rec.segments, rec.segments[1:])]
    assert all(0.5 <= g <= 0.8 for g in gaps), gaps
    for (start, end), (next_start, _) in zip(rec.segments, rec.segments[1:]):
        pause = audio[int((end + 0.05) * sr) : int((next_start - 0.05) * sr)]
        assert np.abs(pause).max() == 0.0  # the pauses are true silence


@pytest.mark.parametrize(
    ("voice", "package"),
    [("flite-slt", "flite"), ("festival-kal", "festvox-kallpc16k"), ("espeak-cmn-f2", "espeak-ng"),
     ("pico-en-us", "libttspico-utils")],
)
def test_missing_engine_names_package(monkeypatch: pytest.MonkeyPatch, voice: str, package: str) -> None:
    monkeypatch.setenv("PATH", "")
    assert corpus.available_voices() == []
    with pytest.raises(CorpusError, match=f"apt-get install .*{package}"):
        corpus.synthesize("Hello there.", voice)
