"""How a transcript review answer becomes the dataset's transcript (voice_lib/pipelines/review.py), without Airflow:
the form it builds, edits and drops applied to a stored QC report, held clips released by approval, and answers
that cannot be applied refused with the clip named. The same code runs in voice_onboarding's apply_review task
(tests/test_transcript_review.py answers it through a real Airflow)."""

from __future__ import annotations

import json

import pytest

from voice_lib.core.config import Settings
from voice_lib.core.storage import artifact_store
from voice_lib.data.qc import ClipResult, QCReport
from voice_lib.pipelines import review

PREFIX = "voices/alice/datasets/0123456789abcdef/qc-test"


def _clip(cid: str, text: str, review_reason: str | None, seconds: float = 5.0) -> ClipResult:
    return ClipResult(clip_id=cid, file=f"{cid}.wav", start=0.0, end=seconds, duration=seconds, speech_seconds=seconds,
                      snr_db=30.0, clipped=False, clipped_fraction=0.0, loudness_lufs=-23.0, denoised=False, text=text,
                      text_source="auto_transcribed" if review_reason == "auto_transcribed" else "provided",
                      language="en", phones_per_second=12.0, pcm_sha256=cid * 8, asr_text=text, asr_logprob=-0.3,
                      alignment_score=0.25 if review_reason == "low_alignment" else None, review=review_reason)


@pytest.fixture
def qc(settings: Settings) -> dict:
    report = QCReport(voice_id="alice", passed=True, speech_seconds=20.0, min_speech_seconds=10.0, reasons=[],
                      warnings=[], clips=[_clip("a", "hello there", "auto_transcribed"),
                                          _clip("b", "the birch canoe", "auto_transcribed"),
                                          _clip("c", "a sentence not read", "low_alignment"),
                                          _clip("d", "what the user wrote", None)])
    artifact_store(settings).write_bytes(f"{PREFIX}/report.json", json.dumps(report.to_json()).encode())
    return {"qc_prefix": PREFIX, "mlflow_run_id": None}


def _settings(settings: Settings, min_speech: float = 10.0) -> Settings:
    return settings.model_copy(update={"qc": settings.qc.model_copy(update={"min_speech_seconds": min_speech})})


def test_the_form_has_a_prefilled_text_per_clip_to_review_and_a_drop_list(qc: dict, settings: Settings) -> None:
    items = review.review_items(qc, settings)
    assert [i.clip_id for i in items] == ["a", "b", "c"]  # "d" came with the user's own text
    fields = review.form_fields(items)
    assert fields["a"]["default"] == "hello there" and "log-prob -0.30" in fields["a"]["description"]
    assert "held out of training" in fields["c"]["description"] and "Listen: " in fields["c"]["description"]
    assert fields[review.DROP_FIELD]["items"]["enum"] == ["a", "b", "c"]
    assert "| `b` | the birch canoe |" in review.form_body(items, qc)
    assert [i.clip_id for i in review.review_items(qc, settings, everything=True)] == ["a", "b", "c", "d"]


def test_edits_and_drops_become_the_transcript_and_approval_releases_held_clips(qc: dict, settings: Settings) -> None:
    held = review.load_report(qc, settings)
    assert [c.clip_id for c in held.trainable] == ["a", "b", "d"]  # "c" waits for a person
    answer = {"params_input": {"a": "Hello there, Alice.", "b": "", "c": "a sentence not read"},
              "responded_by_user": {"id": "admin", "name": "admin"}, "responded_at": "2026-01-01T00:00:00Z"}
    settings = _settings(settings)
    out = review.apply_review(qc, answer, settings, ["a", "b", "c"])
    report = review.load_report(out, settings)
    by_id = {c.clip_id: c for c in report.clips}
    assert by_id["a"].text == "Hello there, Alice." and by_id["a"].text_source == "reviewed"
    assert by_id["b"].status == "rejected" and "dropped in the transcript review by admin" in by_id["b"].reasons[0]
    assert by_id["c"].reviewed == "approved" and not by_id["c"].held_for_review
    assert [c.clip_id for c in report.trainable] == ["a", "c", "d"]
    assert out["review"] == {"by": "admin", "at": "2026-01-01T00:00:00Z", "asked": ["a", "b", "c"],
                             "edited": ["a"], "dropped": ["b"]}
    assert review.apply_review(qc, answer, settings, ["a", "b", "c"])["report_key"] == out["report_key"]  # idempotent
    # The original QC report is untouched: another answer starts from the same texts.
    assert review.load_report(qc, settings).clips[0].text == "hello there"


def test_a_skipped_review_changes_nothing_and_keeps_held_clips_out(qc: dict, settings: Settings) -> None:
    out = review.apply_review(qc, None, settings, [])
    assert "report_key" not in out and out["review"] is None
    assert [c.clip_id for c in review.load_report(out, settings).trainable] == ["a", "b", "d"]


def test_an_answer_naming_other_clips_is_refused(qc: dict, settings: Settings) -> None:
    with pytest.raises(review.ReviewError, match=r"not under review: d, zz"):
        review.apply_review(qc, {"params_input": {"d": "x", review.DROP_FIELD: ["zz"]}}, settings, ["a", "b", "c"])


def test_dropping_below_the_minimum_speech_is_refused_with_the_figures(qc: dict, settings: Settings) -> None:
    answer = {"params_input": {review.DROP_FIELD: ["a", "b", "c"]}, "responded_by_user": {"name": "admin"}}
    with pytest.raises(review.ReviewError, match=r"only 5.0 s of speech is left for training; at least 10 s"):
        review.apply_review(qc, answer, _settings(settings), ["a", "b", "c"])
