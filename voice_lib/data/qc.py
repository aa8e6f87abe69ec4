"""Data quality check: recordings in, accepted clips and a report out.

Two stages, so Airflow can map the first over shards of files:
``analyze_files`` decodes, slices, measures and cleans each file's clips on its own;
``summarize`` makes the decisions that need the whole set (speaker consistency, duplicates,
total speech) and the verdict.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from voice_lib.core.config import Settings
from voice_lib.data import audio as audio_mod
from voice_lib.data.transcripts import Transcript

ClipStatus = Literal["accepted", "rejected"]
ReviewReason = Literal["auto_transcribed", "low_alignment"]
ReviewOutcome = Literal["approved", "edited", "dropped", "timed_out"]
EDGE_PAD_SECONDS = 0.15  # silence kept around speech so onsets and releases are not cut
# Clips cut from a long transcribed recording join sentences up to this length: Whisper tiny.en, which checks
# each clip, drops words more often in longer ones (measured on flite slt: 1 of 7 clips of 12-15 s).
ALIGNED_CLIP_SECONDS = 10.0


@dataclass
class ClipResult:
    clip_id: str
    file: str
    start: float
    end: float
    duration: float
    speech_seconds: float
    snr_db: float
    clipped: bool
    clipped_fraction: float
    loudness_lufs: float
    denoised: bool
    text: str | None
    text_source: Literal["provided", "auto_transcribed", "reviewed", "none"]
    language: str
    phones_per_second: float | None
    pcm_sha256: str
    speaker_similarity: float | None = None
    status: ClipStatus = "accepted"
    reasons: list[str] = field(default_factory=list)
    asr_text: str | None = None  # what Whisper heard in the clip (English only)
    asr_logprob: float | None = None  # Whisper's average token log-probability there (0 = certain)
    alignment_score: float | None = None  # a clip cut from a long transcribed file: share of its words heard
    review: ReviewReason | None = None  # why a person should check its text before training uses it
    reviewed: ReviewOutcome | None = None  # what the transcript review decided (voice_lib/pipelines/review.py)

    def reject(self, reason: str) -> None:
        self.status = "rejected"
        self.reasons.append(reason)

    @property
    def held_for_review(self) -> bool:
        """Its text may not match its audio: training waits for a person's word on it."""
        return self.review == "low_alignment" and self.reviewed is None


@dataclass
class QCReport:
    voice_id: str
    passed: bool
    speech_seconds: float
    min_speech_seconds: float
    reasons: list[str]
    warnings: list[str]
    clips: list[ClipResult]
    data_sha256: str = ""
    language: str = "en"
    thresholds: dict = field(default_factory=dict)

    @property
    def accepted(self) -> list[ClipResult]:
        return [c for c in self.clips if c.status == "accepted"]

    @property
    def trainable(self) -> list[ClipResult]:
        """The clips training uses: accepted, and not waiting for the transcript review."""
        return [c for c in self.accepted if not c.held_for_review]

    @property
    def to_review(self) -> list[ClipResult]:
        """Accepted clips whose text a person should check: auto-labelled, or aligned with low confidence."""
        return [c for c in self.accepted if c.review is not None and c.reviewed is None]

    def to_json(self) -> dict:
        return {
            **{k: v for k, v in asdict(self).items() if k != "clips"},
            "counts": {
                "clips": len(self.clips),
                "accepted": len(self.accepted),
                "rejected": len(self.clips) - len(self.accepted),
            },
            "clips": [asdict(c) for c in self.clips],
        }

    @classmethod
    def from_json(cls, data: dict) -> "QCReport":
        fields_ = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "clips"}
        return cls(**fields_, clips=[ClipResult(**c) for c in data["clips"]])


@dataclass
class FileFailure:
    file: str
    reason: str


def clip_id_for(rel: str, index: int) -> str:
    stem = re.sub(r"[^a-z0-9]+", "-", rel.rsplit(".", 1)[0].lower()).strip("-")[-48:] or "clip"
    return f"{stem}-{index:03d}"


def detect_language(text: str) -> str:
    return "zh" if re.search(r"[\u4e00-\u9fff]", text) else "en"


def _group_at_pauses(segments, sample_rate: int, settings: Settings, seconds: float | None = None) -> list[tuple[int, int]]:
    """Group VAD speech segments into spans of up to ``seconds`` (default: the clip maximum), joining only across
    pauses."""
    max_len = int((seconds or settings.qc.max_clip_seconds) * sample_rate)
    pad = int(EDGE_PAD_SECONDS * sample_rate)
    groups: list[list[int]] = []
    for seg in segments:
        if groups and seg.end - groups[-1][0] <= max_len - 2 * pad:
            groups[-1][1] = seg.end
        else:
            groups.append([seg.start, seg.end])
    return [(a, b) for a, b in groups]


@dataclass
class _Span:
    """One clip-to-be of a file: samples [start, end), its text, and what Whisper made of it."""

    start: int
    end: int
    text: str | None
    asr_text: str | None = None
    asr_logprob: float | None = None
    alignment_score: float | None = None


def _finite(x: float) -> float | None:
    return round(x, 3) if np.isfinite(x) else None  # NaN is no JSON


def _word_cuts(start: int, end: int, words, sample_rate: int, max_len: int, min_len: int) -> list[tuple[int, int, int, int]]:
    """Cut one span (a VAD region or a whole file longer than a clip may be) into clips at word boundaries:
    (clip start, clip end, first word, last word + 1).

    ``words`` are timed from ``start``. Each cut falls in the middle of a gap between two words: the widest gap in
    the second half of what fits (a sentence end, usually), leaving at least ``min_len`` for the rest, so no word
    is split and each clip's text is exactly the words inside it."""
    def at(seconds: float) -> int:
        return start + int(seconds * sample_rate)

    def cut_after(k: int) -> int:
        return at((words[k].end + words[k + 1].start) / 2)

    cuts: list[tuple[int, int, int, int]] = []
    clip_start, first = start, 0
    while first < len(words) - 1 and end - clip_start > max_len:
        fits = [k for k in range(first, len(words) - 1) if cut_after(k) - clip_start <= max_len] or [first]
        roomy = [k for k in fits if end - cut_after(k) >= min_len] or fits
        late = [k for k in roomy if cut_after(k) - clip_start >= max_len // 2] or roomy
        k = max(late, key=lambda i: words[i + 1].start - words[i].end)
        cuts.append((clip_start, cut_after(k), first, k + 1))
        clip_start, first = cut_after(k), k + 1
    cuts.append((clip_start, end, first, len(words)))
    return cuts


def _clip_limits(sample_rate: int, settings: Settings) -> tuple[int, int]:
    """(max, min) samples of speech in one clip, before the edge padding is added."""
    pad = int(EDGE_PAD_SECONDS * sample_rate)
    return int(settings.qc.max_clip_seconds * sample_rate) - 2 * pad, int(settings.qc.min_clip_seconds * sample_rate)


def _slice_untranscribed(wav: np.ndarray, segments, sample_rate: int, settings: Settings, english: bool) -> list[_Span]:
    """Clips of an untranscribed file: grouped at pauses; for English, labelled by Whisper, and a span still too
    long for one clip is cut between words. Other languages get equal parts and no text."""
    from voice_lib.data.asr import transcribe

    max_len, min_len = _clip_limits(sample_rate, settings)
    out: list[_Span] = []
    for start, end in _group_at_pauses(segments, sample_rate, settings):
        heard = transcribe(wav[start:end], sample_rate, settings) if english else None
        if heard is not None and end - start > max_len and len(heard.words) > 1:
            for a, b, first, last in _word_cuts(start, end, heard.words, sample_rate, max_len, min_len):
                text = " ".join(w.text for w in heard.words[first:last])
                logprob = heard.avg_logprob_between((a - start) / sample_rate, (b - start) / sample_rate)
                out.append(_Span(a, b, text, text, _finite(logprob)))
        elif end - start > max_len:  # no words to cut between: equal parts, each labelled on its own
            bounds = np.linspace(start, end, int(np.ceil((end - start) / max_len)) + 1).astype(int)
            for a, b in zip(bounds[:-1], bounds[1:]):
                part = transcribe(wav[a:b], sample_rate, settings) if english else None
                out.append(_Span(int(a), int(b), part and part.text, part and part.text, part and _finite(part.avg_logprob)))
        else:
            out.append(_Span(start, end, heard and heard.text, heard and heard.text, heard and _finite(heard.avg_logprob)))
    return out


def _align_long_transcript(wav: np.ndarray, segments, transcript: Transcript, rel: str, sample_rate: int,
                           settings: Settings) -> list[_Span]:
    """Clips of a file longer than one clip with one transcript. Whisper hears it in the same pause-bounded groups
    an untranscribed file is cut into (each within one 30 s Whisper window: across a window's edge it may drop
    words); the user's words are placed by the word timestamps (voice_lib.data.transcript_alignment), each
    group is a clip with the user's words inside it, and a group too long for one clip is cut between words."""
    from voice_lib.data.asr import Word, transcribe
    from voice_lib.data.transcript_alignment import AlignedWord, align_words, alignment_score, check_alignment

    sr = sample_rate
    groups, heard_words = [], []
    for a, b in _group_at_pauses(segments, sr, settings, min(ALIGNED_CLIP_SECONDS, settings.qc.max_clip_seconds)):
        heard = transcribe(wav[a:b], sr, settings)
        groups.append((a, b, heard))
        heard_words += [Word(w.text, a / sr + w.start, a / sr + w.end, w.probability) for w in heard.words]
    words = align_words(transcript.text, heard_words)  # seconds from the start of the file
    check_alignment(words, rel, transcript.source)
    edges = [(groups[i][1] + groups[i + 1][0]) / 2 / sr for i in range(len(groups) - 1)]
    owner = [int(np.searchsorted(edges, (w.start + w.end) / 2)) for w in words]
    max_len, min_len = _clip_limits(sr, settings)
    spans = []
    for g, (a, b, heard) in enumerate(groups):
        mine = [AlignedWord(w.text, w.start - a / sr, w.end - a / sr, w.matched) for w, o in zip(words, owner) if o == g]
        if not mine:  # speech the transcript has no words for (a cough, an aside): not part of the reading
            continue
        for ca, cb, first, last in _word_cuts(a, b, mine, sr, max_len, min_len):
            t0, t1 = (ca - a) / sr, (cb - a) / sr
            asr = " ".join(w.text for w in heard.words if t0 <= (w.start + w.end) / 2 < t1)
            spans.append(_Span(ca, cb, " ".join(w.text for w in mine[first:last]), asr,
                               _finite(heard.avg_logprob_between(t0, t1)), round(alignment_score(mine[first:last]), 3)))
    return spans


def _hear_aligned_clip(span: _Span, clip: np.ndarray, sample_rate: int, settings: Settings) -> None:
    """Whisper hears the finished clip on its own: its words, log-probability and alignment score are of the clip
    as training gets it, so a cut in the wrong place, or a stretch Whisper did not hear, shows as low confidence."""
    from voice_lib.data.asr import transcribe
    from voice_lib.data.transcript_alignment import AlignmentError, align_words, alignment_score

    heard = transcribe(clip, sample_rate, settings)
    try:
        score = alignment_score(align_words(span.text or "", heard.words))
    except AlignmentError:  # Whisper heard nothing in it
        score = 0.0
    span.asr_text, span.asr_logprob, span.alignment_score = heard.text, _finite(heard.avg_logprob), round(score, 3)


def _spans_of(wav: np.ndarray, segments, transcript: Transcript | None, rel: str, sample_rate: int,
              settings: Settings, language: str) -> list[_Span]:
    """How one file becomes clips. Raises AlignmentError when a long file's transcript does not match it."""
    english = language in ("en", "auto")
    if transcript is None:
        return _slice_untranscribed(wav, segments, sample_rate, settings, english)
    start, end = segments[0].start, segments[-1].end
    transcript_english = transcript.language in (None, "en", "auto") and detect_language(transcript.text) == "en"
    if end - start > _clip_limits(sample_rate, settings)[0] and english and transcript_english:
        return _align_long_transcript(wav, segments, transcript, rel, sample_rate, settings)
    return [_Span(start, end, transcript.text)]  # the transcript covers the whole file: trim only


def _measure_clip(
    wav: np.ndarray, sample_rate: int, settings: Settings
) -> tuple[np.ndarray, float, float, bool]:
    """Returns (cleaned audio, snr_db of the recording as uploaded, speech_seconds, denoised).

    The SNR reported (and judged against ``reject_snr_db``) is the recording's, measured before
    denoising: spectral gating empties the pauses the estimator takes its noise floor from, so an
    SNR re-measured after it says how well the gate worked (+10-20 dB even on a 0 dB recording),
    not how much of the speech is left under the noise.
    """
    from voice_lib.data.speech import detect_speech, speech_mask

    segments = detect_speech(wav, sample_rate)
    mask = speech_mask(segments, len(wav))
    snr = audio_mod.estimate_snr_db(wav, sample_rate, mask)
    denoised = False
    if snr < settings.qc.min_snr_db:
        import noisereduce

        # Denoising smears speech a little: keep it only when it buys a clear SNR gain.
        cleaned = noisereduce.reduce_noise(y=wav, sr=sample_rate, stationary=True).astype(np.float32)
        cleaned_snr = audio_mod.estimate_snr_db(cleaned, sample_rate, mask)
        if cleaned_snr >= snr + 3.0:
            wav, denoised = cleaned, True
    return wav, snr, float(mask.sum()) / sample_rate, denoised


def analyze_file(
    root: Path,
    rel: str,
    transcript: Transcript | None,
    settings: Settings,
    language: str,
    out_dir: Path,
) -> list[ClipResult] | FileFailure:
    """Decode one file and produce its clips (wav + GE2E embedding written under ``out_dir``)."""
    from voice_lib.data.speech import detect_speech, speaker_embedding

    sr = settings.sample_rate
    try:
        decoded = audio_mod.decode_audio(root / rel, sr, name=rel)
    except audio_mod.AudioError as exc:
        return FileFailure(rel, str(exc))
    if decoded.source_sample_rate < sr:
        # Upsampling adds samples, not the frequencies the recording never had: the voice would be muffled.
        return FileFailure(
            rel,
            f"{rel}: recorded at {decoded.source_sample_rate} Hz, below the {sr} Hz the voice model works at, "
            f"so it lacks the high frequencies the voice needs; export the original recording at {sr} Hz or "
            "higher (44.1 or 48 kHz is ideal), or remove the file.",
        )
    wav = decoded.audio
    if decoded.duration > settings.limits.max_total_audio_seconds:
        return FileFailure(rel, f"{rel}: {decoded.duration:.0f} s long, over the {settings.limits.max_total_audio_seconds:.0f} s limit; split it.")
    segments = detect_speech(wav, sr)
    if not segments:
        return FileFailure(rel, f"{rel}: no speech detected (silence or noise only); remove it or check the recording.")
    from voice_lib.data.transcript_alignment import AlignmentError

    pad = int(EDGE_PAD_SECONDS * sr)
    try:
        spans = _spans_of(wav, segments, transcript, rel, sr, settings, language)
    except AlignmentError as exc:
        return FileFailure(rel, str(exc))
    results: list[ClipResult] = []
    for k, span in enumerate(spans):
        a, b, text = max(0, span.start - pad), min(len(wav), span.end + pad), span.text
        clip = wav[a:b]
        cid = clip_id_for(rel, k)
        clipped_fraction = float(np.mean(np.abs(clip) >= audio_mod.CLIP_LEVEL))
        clipped_fraction = max(clipped_fraction, decoded.clipped_fraction if len(spans) == 1 else 0.0)
        clean, snr, speech_s, denoised = _measure_clip(clip, sr, settings)
        clean, lufs = audio_mod.normalize_loudness(clean, sr, settings.qc.target_lufs)
        if span.alignment_score is not None:
            _hear_aligned_clip(span, clean, sr, settings)
        source = "provided" if transcript else ("auto_transcribed" if text else "none")
        text = text or None  # Whisper heard nothing: no transcript (the clip is rejected below, saying why)
        clip_lang = (transcript.language if transcript and transcript.language not in (None, "auto") else None)
        clip_lang = clip_lang or (detect_language(text) if transcript and language == "auto" else language)
        if clip_lang == "auto":
            clip_lang = "en"
        result = ClipResult(
            clip_id=cid, file=rel, start=round(a / sr, 3), end=round(b / sr, 3),
            duration=round((b - a) / sr, 3), speech_seconds=round(speech_s, 3), snr_db=round(snr, 2),
            clipped=clipped_fraction > settings.qc.clipping_fraction, clipped_fraction=round(clipped_fraction, 5),
            loudness_lufs=round(lufs, 2), denoised=denoised, text=text, text_source=source,
            language=clip_lang, phones_per_second=None, pcm_sha256=audio_mod.pcm_sha256(clean),
            asr_text=span.asr_text, asr_logprob=span.asr_logprob, alignment_score=span.alignment_score,
            review=_review_reason(source, span.alignment_score, settings),
        )
        _check_clip(result, settings)
        audio_mod.write_wav(out_dir / "clips" / f"{cid}.wav", clean, sr)
        np.save(out_dir / "embeddings" / f"{cid}.npy", speaker_embedding(clean, sr))
        results.append(result)
    return results


def _review_reason(text_source: str, alignment: float | None, settings: Settings) -> ReviewReason | None:
    if text_source == "auto_transcribed":
        return "auto_transcribed"
    return "low_alignment" if alignment is not None and alignment < settings.qc.min_alignment_score else None


def _check_clip(clip: ClipResult, settings: Settings) -> None:
    qc = settings.qc
    where = f"{clip.file} [{clip.start:.1f}-{clip.end:.1f} s]"
    if clip.duration < qc.min_clip_seconds:
        clip.reject(f"{where}: only {clip.duration:.2f} s long (minimum {qc.min_clip_seconds} s).")
    if clip.duration > qc.max_clip_seconds + 2 * EDGE_PAD_SECONDS:
        clip.reject(f"{where}: {clip.duration:.1f} s under one transcript (maximum {qc.max_clip_seconds} s); split the file and its text.")
    if clip.clipped:
        clip.reject(f"{where}: clipped ({clip.clipped_fraction:.2%} of samples at full scale); re-record with lower input gain.")
    if clip.snr_db < qc.reject_snr_db:
        clip.reject(f"{where}: too noisy (SNR {clip.snr_db:.1f} dB < {qc.reject_snr_db} dB, too low for denoising to rescue); re-record in a quieter room.")
    if clip.text is None:
        why = ("Whisper (VOICEOPS_ASR__MODEL) heard no words in it" if clip.language == "en"
               else "the speech recogniser only reads English")
        clip.reject(f"{where}: no transcript, and {why}; add a .txt beside the file or a metadata.csv line.")
    elif clip.speech_seconds > 0.3:
        from voice_lib.data.text import TextError, count_phones

        try:
            rate = count_phones(clip.text, clip.language) / clip.speech_seconds
        except TextError as exc:
            clip.reject(f"{where}: transcript unusable ({exc}).")
            return
        clip.phones_per_second = round(rate, 2)
        if not qc.min_phones_per_second <= rate <= qc.max_phones_per_second:
            clip.reject(
                f"{where}: speaking rate {rate:.1f} phones/s is outside {qc.min_phones_per_second:g}-{qc.max_phones_per_second:g}; "
                "the transcript probably does not match the audio."
            )


def summarize(
    voice_id: str,
    clips: list[ClipResult],
    embeddings: dict[str, np.ndarray],
    failures: list[FileFailure],
    transcript_problems: list[str],
    settings: Settings,
    language: str = "en",
    data_sha256: str = "",
    skipped: list[dict] | None = None,
    transcript_warnings: list[str] | None = None,
) -> QCReport:
    """Whole-set decisions: speaker consistency, duplicates, total speech, the verdict."""
    from voice_lib.data.speech import centroid, cosine

    qc = settings.qc
    reasons: list[str] = list(transcript_problems)
    warnings = [f.reason for f in failures] + [f"{s['file']}: skipped ({s['reason']})." for s in skipped or []]
    warnings += transcript_warnings or []
    clips = sorted(clips, key=lambda c: (c.file, c.start))

    usable = [c for c in clips if c.status == "accepted" and c.clip_id in embeddings]
    if usable:
        ref = centroid(np.stack([embeddings[c.clip_id] for c in usable]))
        # A second speaker with ~40% of the clips drags the element-wise median toward itself, lifting
        # some of its clips over the threshold: re-centre once on the clips that match the first estimate.
        inliers = [c for c in usable if cosine(embeddings[c.clip_id], ref) >= qc.min_speaker_similarity]
        if inliers and len(inliers) < len(usable):
            ref = centroid(np.stack([embeddings[c.clip_id] for c in inliers]))
        for c in clips:
            if c.clip_id in embeddings:
                c.speaker_similarity = round(cosine(embeddings[c.clip_id], ref), 4)
        foreign = [c for c in usable if c.speaker_similarity < qc.min_speaker_similarity]
        for c in foreign:
            c.reject(
                f"{c.file} [{c.start:.1f}-{c.end:.1f} s]: speaker similarity {c.speaker_similarity:.2f} < "
                f"{qc.min_speaker_similarity} to the rest: a different speaker, music or a wrong file; remove it."
                + (f" Its SNR is only {c.snr_db:.0f} dB, and background noise also lowers this score: "
                   "if it is the same speaker, re-record it somewhere quieter." if c.snr_db < qc.min_snr_db else "")
            )
        total = sum(c.speech_seconds for c in usable)
        share = sum(c.speech_seconds for c in foreign) / total if total else 0.0
        if share > qc.max_foreign_speech_fraction:
            files = sorted({c.file for c in foreign})
            reasons.append(
                f"mixed speakers: {share:.0%} of the speech ({', '.join(files[:8])}{' ...' if len(files) > 8 else ''}) "
                f"does not match the main voice (limit {qc.max_foreign_speech_fraction:.0%}); "
                "upload one speaker per voice."
            )

    seen: dict[str, ClipResult] = {}
    for c in clips:
        if c.status != "accepted":
            continue
        key_text = re.sub(r"\W+", " ", (c.text or "").lower()).strip()
        twin = seen.get(c.pcm_sha256) or next(
            (o for o in seen.values() if key_text and re.sub(r"\W+", " ", (o.text or "").lower()).strip() == key_text
             and abs(o.duration - c.duration) <= qc.duplicate_duration_tolerance * max(o.duration, c.duration)), None)
        if twin is not None:
            c.reject(f"{c.file}: duplicate of {twin.file}; keep one copy.")
        else:
            seen[c.pcm_sha256] = c

    speech = round(sum(c.speech_seconds for c in clips if c.status == "accepted"), 2)
    if speech < qc.min_speech_seconds:
        reasons.append(
            f"only {speech:.1f} s of usable speech; at least {qc.min_speech_seconds:g} s are needed. "
            "Add recordings (see the rejected clips for what was dropped)."
        )
    if not clips and not failures:
        reasons.append("no audio could be read from the dataset.")
    return QCReport(
        voice_id=voice_id, passed=not reasons, speech_seconds=speech, min_speech_seconds=qc.min_speech_seconds,
        reasons=reasons, warnings=warnings, clips=clips, data_sha256=data_sha256, language=language,
        thresholds=qc.model_dump(),
    )


def shard(files: list[str], shards: int) -> list[list[str]]:
    """Split audio files into at most ``shards`` balanced groups (by file size order, round robin)."""
    groups = [files[i::shards] for i in range(max(1, shards))]
    return [g for g in groups if g]


def analyze_shard(
    root: Path,
    rels: list[str],
    transcripts: dict[str, Transcript],
    settings: Settings,
    language: str,
    out_dir: Path,
    on_file: Callable[[str], None] | None = None,
) -> tuple[list[ClipResult], list[FileFailure]]:
    (out_dir / "clips").mkdir(parents=True, exist_ok=True)
    (out_dir / "embeddings").mkdir(parents=True, exist_ok=True)
    clips: list[ClipResult] = []
    failures: list[FileFailure] = []
    for rel in rels:
        outcome = analyze_file(root, rel, transcripts.get(rel), settings, language, out_dir)
        if isinstance(outcome, FileFailure):
            failures.append(outcome)
        else:
            clips.extend(outcome)
        if on_file:
            on_file(rel)
    return clips, failures


def save_shard_result(path: Path, clips: list[ClipResult], failures: list[FileFailure]) -> None:
    path.write_text(json.dumps({"clips": [asdict(c) for c in clips], "failures": [asdict(f) for f in failures]}))


def load_shard_result(data: dict) -> tuple[list[ClipResult], list[FileFailure]]:
    return [ClipResult(**c) for c in data["clips"]], [FileFailure(**f) for f in data["failures"]]
