""""I read this script": one long recording with one transcript for the whole file, onboarded into clips.

A ~90 s recording of festival's slt HTS voice (the one Whisper tiny.en hears best: WER 0.017, docs/model.md) reading 30 prompt sentences with pauses, and one .txt, go through the onboarding
steps (ingest → qc → features manifest) with the real models. Whisper's word timestamps place the user's words;
the file is cut between words into 0.6–15 s clips, each with its own part of the user's text. A spot check hears
every clip again with Whisper: its transcript matches the text assigned to it within WER 0.15. One sentence of the
transcript is not what was read: its clip is held for the transcript review and kept out of training.
"""

from __future__ import annotations

import io
import json

import pytest
import soundfile as sf

from voice_lib.core.config import Settings
from voice_lib.core.storage import artifact_store
from voice_lib.data import corpus
from voice_lib.data.asr import transcribe, word_error_rate
from voice_lib.data.qc import QCReport
from voice_lib.pipelines import onboarding

SWAPPED = 12  # the sentence whose text in the transcript is another sentence


def _onboard_qc(settings: Settings, voice_id: str, data) -> tuple[dict, dict]:
    dataset = onboarding.ingest(voice_id, str(data), settings, shards=1)
    onboarding.qc_shard(dataset, 0, settings, "en")
    return dataset, onboarding.qc_report(dataset, settings, "en", log_to_mlflow=False)


@pytest.mark.slow
def test_a_90_second_reading_with_one_transcript_becomes_aligned_clips(settings: Settings, tmp_path) -> None:
    data = tmp_path / "script"
    rec = corpus.concat_long_recording(data / "script.wav", "festival-slt-hts", n_sentences=30, seed=7, pause_range=(0.3, 0.7))
    assert 80 <= rec.seconds <= 110
    other = next(s for s in corpus.load_sentences("en") if s not in rec.texts and len(s.split()) >= len(rec.texts[SWAPPED].split()))
    script = [other if i == SWAPPED else t for i, t in enumerate(rec.texts)]
    (data / "script.txt").write_text(" ".join(script) + "\n", encoding="utf-8")
    settings = settings.model_copy(update={"qc": settings.qc.model_copy(update={"min_speech_seconds": 30})})

    dataset, qc = _onboard_qc(settings, "long-read", data)
    store = artifact_store(settings)
    report = QCReport.from_json(json.loads(store.read_bytes(f"{qc['qc_prefix']}/report.json")))
    clips = sorted(report.clips, key=lambda c: c.start)
    assert len(clips) >= 6, [(c.start, c.end) for c in clips]
    for c in clips:
        assert c.file == "script.wav" and c.text_source == "provided"
        assert 0.6 <= c.duration <= 15.0, c
        assert c.status == "accepted", c.reasons
    for a, b in zip(clips, clips[1:]):
        assert a.end <= b.start + 0.31  # only the edge padding of each clip may overlap the next
    # The user's text, every word once, in order: cut between words, never through one.
    assert " ".join(c.text for c in clips).split() == " ".join(script).split()

    # The swapped sentence's clip is held for review; every other clip is confidently aligned.
    held = [c for c in clips if c.held_for_review]
    assert len(held) == 1 and other in held[0].text, "\n".join(f"{c.alignment_score} {c.duration} {c.text}" for c in clips)
    assert held[0].review == "low_alignment" and held[0].alignment_score < settings.qc.min_alignment_score
    assert held[0].asr_text and held[0].asr_logprob < 0
    confident = [c for c in clips if not c.held_for_review]

    # Spot check: Whisper hears each confidently aligned clip as the text it was given.
    wers = {}
    for c in confident:
        audio, sr = sf.read(io.BytesIO(store.read_bytes(f"{qc['qc_prefix']}/clips/{c.clip_id}.wav")), dtype="float32")
        heard = transcribe(audio, sr, settings).text
        wers[c.clip_id] = (round(word_error_rate(c.text, heard), 3), c.text, heard, c.asr_text)
    assert max(w[0] for w in wers.values()) <= 0.15, "\n".join(map(str, wers.values()))
    print(f"{rec.seconds:.1f} s, {len(clips)} clips of {min(c.duration for c in clips):.1f}-"
          f"{max(c.duration for c in clips):.1f} s, spot-check WER per clip {[w[0] for w in wers.values()]}")

    # Training sees the confident clips only.
    for i in range(len(dataset["shards"])):
        onboarding.features_shard(dataset, qc, i, len(dataset["shards"]), settings, "en")
    manifest = json.loads(store.read_bytes(onboarding.features_manifest(dataset, qc, settings)["manifest_key"]))
    assert [e["clip_id"] for e in manifest["clips"]] == [c.clip_id for c in confident]
    assert {e["text"] for e in manifest["clips"]} == {c.text for c in confident}


def test_a_long_recording_with_another_files_transcript_is_named(settings: Settings, tmp_path) -> None:
    data = tmp_path / "wrong"
    rec = corpus.concat_long_recording(data / "take.wav", "flite-slt", n_sentences=6, seed=2)
    assert rec.seconds > 15
    unrelated = [s for s in corpus.load_sentences("en") if s not in rec.texts][:6]
    (data / "take.txt").write_text(" ".join(unrelated), encoding="utf-8")
    settings = settings.model_copy(update={"qc": settings.qc.model_copy(update={"min_speech_seconds": 1})})
    with pytest.raises(onboarding.QCRejected):
        _onboard_qc(settings, "wrong-text", data)
    dataset = onboarding.ingest("wrong-text", str(data), settings, shards=1)
    report = onboarding.load_qc_report(dataset, settings, "en")
    assert report["clips"] == []
    [warning] = [w for w in report["warnings"] if w.startswith("take.wav:")]
    assert "the text does not match this audio" in warning and "take.txt" in warning
