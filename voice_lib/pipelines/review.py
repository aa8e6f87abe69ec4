"""The transcript review: a person checks the texts QC could not vouch for before training uses them.

QC marks the clips a person should look at (voice_lib.data.qc: ``review``): clips Whisper labelled (no transcript
came with them) and clips of a long recording whose text aligned with low confidence (held out of training until
reviewed). ``voice_onboarding``'s ``review_transcripts`` task asks through Airflow's Human-in-the-loop form: one
text field per clip, prefilled with the text QC would use, and a list of clips to drop. This module builds that
form (as plain JSON-schema specs: it never imports Airflow) and applies the answer: edited texts replace the
clip's text, dropped clips are rejected, and the result is a reviewed copy of the QC report, stored under a key
derived from the answer, that the feature and training steps read instead of the original. A changed text
changes the clip's feature cache key and the manifest hash, so everything downstream is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from urllib.parse import quote

from voice_lib.core.config import Settings
from voice_lib.core.storage import artifact_store

log = logging.getLogger(__name__)
DROP_FIELD = "drop"  # the form field listing clip ids to leave out; a clip whose text is emptied is dropped too
WHY = {"auto_transcribed": "labelled by Whisper (no transcript came with it)",
       "low_alignment": "its part of your transcript aligned with low confidence: held out of training until reviewed"}


class ReviewError(ValueError):
    """A review answer names clips that are not under review, or leaves too little speech; the message says which."""


@dataclass(frozen=True)
class ReviewItem:
    clip_id: str
    text: str  # what training would use: Whisper's label, or the user's aligned words
    asr_text: str | None
    asr_logprob: float | None
    why: str
    listen_url: str


def _report_key(qc: dict) -> str:
    return qc.get("report_key") or f"{qc['qc_prefix']}/report.json"


def load_report(qc: dict, settings: Settings):
    """The QC report the next steps use: the reviewed copy once there is one, else QC's own."""
    from voice_lib.data.qc import QCReport

    return QCReport.from_json(json.loads(artifact_store(settings).read_bytes(_report_key(qc))))


def listen_url(qc: dict, clip_id: str, settings: Settings) -> str:
    """Where a person can play the clip: the QC report's audio in MLflow's run (served over HTTP), else the store."""
    path = f"qc_report/audio/{clip_id}.wav"
    if qc.get("mlflow_run_id") and settings.mlflow_tracking_uri.startswith(("http://", "https://")):
        return f"{settings.mlflow_tracking_uri.rstrip('/')}/get-artifact?path={quote(path)}&run_uuid={qc['mlflow_run_id']}"
    return f"{artifact_store(settings).uri}/{qc['qc_prefix']}/report/audio/{clip_id}.wav"


def review_items(qc: dict, settings: Settings, everything: bool = False) -> list[ReviewItem]:
    """The clips to show the reviewer: those QC marked, or with ``everything`` every accepted clip."""
    report = load_report(qc, settings)
    clips = report.accepted if everything else report.to_review
    return [ReviewItem(c.clip_id, c.text or "", c.asr_text, c.asr_logprob,
                       WHY.get(c.review or "", "asked for (review_transcripts=always)"), listen_url(qc, c.clip_id, settings))
            for c in clips]


def form_fields(items: list[ReviewItem]) -> dict[str, dict]:
    """The Human-in-the-loop form as Param specs (``Param(**spec)``): a text per clip, and the clips to drop."""
    fields: dict[str, dict] = {}
    for item in items:
        confidence = "" if item.asr_logprob is None else f"Whisper avg log-prob {item.asr_logprob:.2f}; "
        fields[item.clip_id] = {
            "default": item.text, "type": ["string", "null"], "title": item.clip_id,
            "description": f"{confidence}{item.why}. Listen: {item.listen_url} . Edit the text to what is said; "
                           "empty it to drop the clip.",
        }
    fields[DROP_FIELD] = {
        "default": [], "type": "array", "items": {"type": "string", "enum": [i.clip_id for i in items]},
        "title": "Drop these clips", "description": "Clips to leave out of training (wrong speaker, noise, unclear).",
    }
    return fields


def form_body(items: list[ReviewItem], qc: dict) -> str:
    """The Markdown shown above the form."""
    def cell(text: str | None) -> str:
        return (text or "").replace("|", "\\|").replace("\n", " ")

    rows = "\n".join(
        f"| `{i.clip_id}` | {cell(i.text)} | {cell(i.asr_text)} | "
        f"{'' if i.asr_logprob is None else f'{i.asr_logprob:.2f}'} | {cell(i.why)} | [listen]({i.listen_url}) |"
        for i in items)
    report = qc.get("mlflow_run_url") or qc.get("report_html") or ""
    return (f"{len(items)} clip(s) need a look before training uses them. Submit unchanged to approve all; edit a "
            f"text to correct it; empty it, or list the clip under *Drop these clips*, to leave it out. "
            f"Whisper's average log-probability is 0 when it is certain; below about -1 it is guessing.\n\n"
            f"| clip | text training will use | Whisper heard | log-prob | why | audio |\n|---|---|---|---|---|---|\n"
            f"{rows}\n\nThe whole QC report: {report}")


def _decisions(items: dict[str, str], answer: dict | None) -> dict[str, str | None]:
    """{clip id: new text, or None to drop} from a Human-in-the-loop answer (None: nothing was asked)."""
    if not answer:
        return {}
    given = dict(answer.get("params_input") or {})
    dropped = set(given.pop(DROP_FIELD, None) or [])
    unknown = sorted((dropped | set(given)) - set(items))
    if unknown:
        raise ReviewError(f"the review answer names clips that were not under review: {', '.join(unknown)}; "
                          f"the clips under review are {', '.join(sorted(items)) or 'none'}.")
    out: dict[str, str | None] = {cid: " ".join(str(text or "").split()) or None for cid, text in given.items()}
    out.update({cid: None for cid in dropped})
    return out


def apply_review(qc: dict, answer: dict | None, settings: Settings, asked: list[str]) -> dict:
    """Apply a reviewer's answer to the QC report; returns the ``qc`` hand-off the feature steps read.

    ``asked`` are the clip ids the form showed; ``answer`` is the HITL task's result (``params_input``,
    ``responded_by_user``), None when the review was skipped. Idempotent: the same answer gives the same key."""
    if answer is None:
        return {**qc, "review": None}
    report = load_report(qc, settings)
    by_id = {c.clip_id: c for c in report.clips}
    missing = sorted(set(asked) - set(by_id))
    if missing:
        raise ReviewError(f"clips {', '.join(missing)} were under review but are not in {_report_key(qc)}.")
    decisions = _decisions({cid: by_id[cid].text or "" for cid in asked}, answer)
    reviewer = (answer.get("responded_by_user") or {}).get("name") if answer.get("responded_by_user") else None
    for cid in asked:
        clip = by_id[cid]
        text = decisions.get(cid, clip.text)
        if text is None:
            clip.reviewed = "dropped"
            clip.reject(f"{clip.file} [{clip.start:.1f}-{clip.end:.1f} s]: dropped in the transcript review"
                        f"{f' by {reviewer}' if reviewer else ''}.")
        elif text != clip.text:
            clip.text, clip.text_source, clip.reviewed = text, "reviewed", "edited"
        else:
            clip.reviewed = "approved" if reviewer else "timed_out"
    summary = {"by": reviewer, "at": str(answer.get("responded_at") or ""), "asked": sorted(asked),
               "edited": sorted(c for c in asked if by_id[c].reviewed == "edited"),
               "dropped": sorted(c for c in asked if by_id[c].reviewed == "dropped")}
    _check_enough_speech(report, settings)
    digest = hashlib.sha256(json.dumps([qc["qc_prefix"], {c: decisions.get(c, "") for c in sorted(asked)}, reviewer],
                                       sort_keys=True).encode()).hexdigest()[:12]
    key = f"{qc['qc_prefix']}/reviews/{digest}/report.json"
    store = artifact_store(settings)
    if not store.exists(key):
        store.write_bytes(key, json.dumps({**report.to_json(), "review": summary}, indent=2, default=str).encode())
    log.info("transcript review by %s: %d clip(s) asked, %d edited, %d dropped -> %s", reviewer or "nobody (timed out)",
             len(asked), len(summary["edited"]), len(summary["dropped"]), key)
    return {**qc, "report_key": key, "review": summary, "review_digest": digest}


def _check_enough_speech(report, settings: Settings) -> None:
    speech = sum(c.speech_seconds for c in report.trainable)
    if speech < settings.qc.min_speech_seconds:
        raise ReviewError(f"after the transcript review only {speech:.1f} s of speech is left for training; at least "
                          f"{settings.qc.min_speech_seconds:g} s are needed. Add recordings, or drop fewer clips.")
