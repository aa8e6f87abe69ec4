"""Voices over HTTP through the real server: POST/GET/DELETE /v1/voices, tenant isolation, hostile uploads,
rate limits and the audit table (tests/serving_stack.py: a real MLflow, `voiceops serve` in a subprocess)."""
from __future__ import annotations

import io
import json
import sqlite3
import time
import zipfile

import httpx
import numpy as np
import pytest
import soundfile as sf
from serving_stack import ServerStack, running_stack

from serving.tenants import TenantDirectory
from voice_lib.pipelines.intake import find_ready_datasets

NEW = "upload-voice-1"


def wav_bytes(seconds: float = 0.5) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, 0.1 * np.sin(np.linspace(0, 400 * seconds, int(16000 * seconds))), 16000, format="WAV")
    return buf.getvalue()


@pytest.fixture(scope="module")
def stack(mlflow_server: str, tmp_path_factory) -> ServerStack:
    with running_stack(mlflow_server, tmp_path_factory.mktemp("voices-home"), canary_weight=0) as s:
        tenants = TenantDirectory(s.settings.resolved_tenants_file)
        s.keys["initech"] = tenants.create_key("initech", [NEW, "upload-voice-2"], rate_per_minute=1_000_000)[0]
        s.keys["umbrella"] = tenants.create_key("umbrella", [NEW], rate_per_minute=1_000_000)[0]
        yield s


def upload(stack: ServerStack, key: str, voice_id: str = NEW, files=None, **fields) -> httpx.Response:
    files = files or [("files", ("a.wav", wav_bytes(), "audio/wav")),
                      ("transcript", ("metadata.csv", b"a.wav|Hello there.\n", "text/csv"))]
    data = {"voice_id": voice_id, "language": "zh", "description": "Calm and clear", **fields}
    return httpx.post(f"{stack.url}/v1/voices", files=files, data=data, headers=stack.auth(key), timeout=60)


def test_upload_goes_to_intake_and_answers_202_with_a_status_url(stack: ServerStack) -> None:
    lexicon = json.dumps({"tomato": {"ipa": "t ə m ˈɑː t oʊ"}}).encode()
    files = [("files", ("a.wav", wav_bytes(), "audio/wav")), ("files", ("b.wav", wav_bytes(), "audio/wav")),
             ("transcript", ("metadata.csv", b"a.wav|Hello.\nb.wav|Bye.\n", "text/csv")),
             ("lexicon", ("lexicon.json", lexicon, "application/json"))]
    r = upload(stack, "initech", files=files)
    assert r.status_code == 202, r.text
    body = r.json()
    assert r.headers["location"] == body["status_url"] == f"/v1/voices/{NEW}"
    assert body["files"] == ["a.wav", "b.wav", "metadata.csv"] and body["lexicon_version"] == 1
    incoming = stack.home / "incoming" / NEW
    assert sorted(p.name for p in incoming.iterdir()) == ["_READY", "a.wav", "b.wav", "manifest.json", "metadata.csv"]
    (found,) = [d for d in find_ready_datasets(stack.settings) if d["voice_id"] == NEW]
    assert found["language"] == "zh"  # voice_intake hands the upload's language to voice_onboarding
    status = httpx.get(f"{stack.url}{body['status_url']}", headers=stack.auth("initech"), timeout=30).json()
    assert status["state"] == "queued" and status["upload"]["tenant"] == "initech"
    assert status["upload"]["description"] == "Calm and clear" and status["registry"] is None


def test_another_tenant_cannot_see_replace_or_delete_it(stack: ServerStack) -> None:
    for r in (httpx.get(f"{stack.url}/v1/voices/{NEW}", headers=stack.auth("umbrella"), timeout=30),
              httpx.delete(f"{stack.url}/v1/voices/{NEW}", headers=stack.auth("umbrella"), timeout=30),
              upload(stack, "umbrella"),  # umbrella's key names the id too: the uploader owns it
              upload(stack, "globex")):  # globex's key does not name it at all
        assert r.status_code == 404 and r.json()["error"]["code"] == "voice_not_found", r.text
    assert httpx.get(f"{stack.url}/v1/voices/{NEW}", headers=stack.auth("ops"), timeout=30).status_code == 200


def zipped(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in entries.items():
            zf.writestr(name, content)
    return buf.getvalue()


@pytest.mark.parametrize("files, fields, names", [
    ([("files", ("v.zip", zipped({"../../evil.wav": wav_bytes()}), "application/zip"))], {}, "points outside the dataset"),
    ([("files", ("v.zip", zipped({"a.wav": b"\0" * 5_000_000}), "application/zip"))], {}, "looks like a zip bomb"),
    ([("files", ("take\u202ewav.exe", wav_bytes(), "audio/wav"))], {}, "control or invisible characters"),
    ([("files", ("notes.txt", b"hi", "text/plain"))], {}, "no audio files found"),
    (None, {"language": "fr"}, "language 'fr' is not supported"),
    ([("files", ("a.wav", wav_bytes(), "audio/wav")), ("lexicon", ("l.json", b'{"cat": {"ipa": "k Q t"}}', "a/j"))], {},
     "lexicon entry 'cat': 'Q' is not a phone"),
])
def test_hostile_uploads_are_refused_like_ingest_refuses_them(stack: ServerStack, files, fields, names) -> None:
    before = sorted(p.name for p in (stack.home / "incoming").rglob("*"))
    r = upload(stack, "initech", "upload-voice-2", files=files, **fields)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_upload", r.text
    assert names in r.json()["error"]["message"]
    assert sorted(p.name for p in (stack.home / "incoming").rglob("*")) == before  # nothing written


def test_bad_voice_id_is_a_422_naming_the_field(stack: ServerStack) -> None:
    r = upload(stack, "ops", "Bad_Name")
    assert r.status_code == 422 and "voice_id 'Bad_Name' is invalid" in r.json()["error"]["message"]


def test_owner_deletes_a_pending_upload(stack: ServerStack) -> None:
    r = httpx.delete(f"{stack.url}/v1/voices/{NEW}", headers=stack.auth("initech"), timeout=30)
    assert r.status_code == 200 and r.json() == {"voice_id": NEW, "archived": False, "aliases_removed": {},
                                                 "pending_upload_removed": True}
    assert not [p for p in (stack.home / "incoming" / NEW).rglob("*") if p.is_file()]
    assert httpx.get(f"{stack.url}/v1/voices/{NEW}", headers=stack.auth("initech"), timeout=30).status_code == 404


def test_listing_shows_the_serving_version_language_and_description(stack: ServerStack) -> None:
    voices = httpx.get(f"{stack.url}/v1/voices", headers=stack.auth("globex"), timeout=30).json()["voices"]
    assert [v["voice_id"] for v in voices] == [stack.b]
    assert voices[0]["version"] == "1" and {"language", "description", "sample_rate"} <= voices[0].keys()


def test_new_routes_are_audited_and_rate_limited(stack: ServerStack) -> None:
    rid = httpx.get(f"{stack.url}/v1/voices/{stack.a}", headers=stack.auth("acme"), timeout=30).headers["x-request-id"]
    deadline = time.monotonic() + 20
    rows = []
    while not rows and time.monotonic() < deadline:
        with sqlite3.connect(f"file:{stack.home / 'audit.db'}?mode=ro", uri=True) as db:
            rows = db.execute("select tenant, status from audit_log where request_id = ?", (rid,)).fetchall()
        time.sleep(0.3)
    assert rows == [("acme", 200)]
    codes = [httpx.get(f"{stack.url}/v1/voices/{stack.a}", headers=stack.auth("slow"), timeout=30).status_code
             for _ in range(3)]
    assert codes == [200, 200, 429]


def test_admin_delete_takes_a_served_voice_out_of_serving_and_keeps_its_history(stack: ServerStack) -> None:
    r = httpx.get(f"{stack.url}/v1/voices/{stack.b}", headers=stack.auth("globex"), timeout=30).json()
    assert r["state"] == "serving" and r["registry"]["versions"][0]["lineage"]["lora_rank"] == "4"
    deleted = httpx.delete(f"{stack.url}/v1/voices/{stack.b}", headers=stack.auth("globex"), timeout=30)
    assert deleted.status_code == 404  # globex may use b but did not upload it: only an admin may delete it
    deleted = httpx.delete(f"{stack.url}/v1/voices/{stack.b}", headers=stack.auth("ops"), timeout=30)
    assert deleted.status_code == 200 and deleted.json()["aliases_removed"] == {"production": "1"}
    stack.wait("b to leave serving", lambda: stack.tts("globex", voice_id=stack.b).status_code == 404)
    status = httpx.get(f"{stack.url}/v1/voices/{stack.b}", headers=stack.auth("ops"), timeout=30).json()
    assert status["state"] == "archived" and [v["version"] for v in status["registry"]["versions"]] == ["1"]
