"""The OpenAI drop-in through the real server (tests/serving_stack.py), with the official ``openai`` client for
every format, streaming mode and SSE, and a second client nobody here wrote: ffmpeg/ffprobe decoding the bytes,
fed to ffmpeg's stdin as they arrive for the streams."""
from __future__ import annotations

import base64
import json
import subprocess
import time

import httpx
import numpy as np
import openai
import pytest
from serving_stack import ServerStack, running_stack

from voice_lib.core.storage import artifact_store
from voice_lib.data.text import Lexicon, save_lexicon
from voice_lib.data.text.lexicon import lexicon_prefix

THREE = "This is the first sentence. Here comes a second one! And a third, to finish?"
RATE = 24000


@pytest.fixture(scope="module")
def stack(mlflow_server: str, tmp_path_factory) -> ServerStack:
    with running_stack(mlflow_server, tmp_path_factory.mktemp("openai-home"), canary_weight=0) as s:
        yield s


@pytest.fixture(scope="module")
def aliased(mlflow_server: str, tmp_path_factory) -> ServerStack:
    """A second server whose alias map names the real voices: alloy is b for globex, nova is a for everyone."""
    stack = ServerStack(mlflow_server, tmp_path_factory.mktemp("alias-home"))
    stack.env["VOICEOPS_SERVING__VOICE_ALIASES"] = json.dumps({"globex": {"alloy": stack.b}, "*": {"nova": stack.a}})
    try:
        stack.publish_default_voices(0)
        stack.start(need_canary=False)
        yield stack
    finally:
        stack.stop()


def client(stack: ServerStack, key: str = "globex") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.keys[key], max_retries=0, timeout=120)


def ffprobe(data: bytes) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_streams", "-of", "json", "-"], input=data,
                         capture_output=True, check=True, timeout=60)
    return json.loads(out.stdout)["streams"][0]


def decode(data: bytes, fmt: str | None = None) -> np.ndarray:
    """ffmpeg's reading of the bytes as 24 kHz mono float (raw pcm needs its format named)."""
    source = ["-f", "s16le", "-ar", str(RATE), "-ac", "1"] if fmt == "pcm" else []
    out = subprocess.run(["ffmpeg", "-v", "error", *source, "-i", "-", "-f", "f32le", "-ac", "1", "-ar", str(RATE), "-"],
                         input=data, capture_output=True, check=True, timeout=60)
    return np.frombuffer(out.stdout, dtype="<f4")


CODECS = {"mp3": "mp3", "opus": "opus", "aac": "aac", "flac": "flac", "wav": "pcm_s16le"}


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
def test_every_format_through_the_openai_client_at_24_khz(stack: ServerStack, fmt: str) -> None:
    speech = client(stack).audio.speech.create(model="tts-1", voice=stack.b, input="Hello from the OpenAI client.",
                                               response_format=fmt, instructions="Speak cheerfully.")
    assert speech.response.headers["x-sample-rate"] == str(RATE)
    if fmt != "pcm":
        stream = ffprobe(speech.content)
        assert stream["codec_name"] == CODECS[fmt] and stream["channels"] == 1
        assert int(stream["sample_rate"]) == (48000 if fmt == "opus" else RATE)  # Ogg Opus always says 48 kHz
    else:
        assert len(speech.content) % 2 == 0
    audio = decode(speech.content, fmt)
    assert len(audio) > 0.3 * RATE and np.abs(audio).max() > 0.01  # real, audible (buzzy) speech


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "wav", "pcm"])
def test_streams_arrive_sentence_by_sentence_and_ffmpeg_plays_them_as_they_come(stack: ServerStack, fmt: str) -> None:
    """Chunks reach the openai client before synthesis ends; ffmpeg decodes them fed one by one to its stdin."""
    source = ["-f", "s16le", "-ar", str(RATE), "-ac", "1"] if fmt == "pcm" else []
    ffmpeg = subprocess.Popen(["ffmpeg", "-v", "error", *source, "-i", "pipe:0", "-f", "f32le", "-ar", str(RATE),
                               "-ac", "1", "pipe:1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    arrivals = []
    started = time.perf_counter()
    with client(stack).audio.speech.with_streaming_response.create(
            model="tts-1", voice=stack.b, input=THREE, response_format=fmt) as response:
        assert response.headers.get("transfer-encoding") == "chunked" and "content-length" not in response.headers
        for chunk in response.iter_bytes():
            arrivals.append(time.perf_counter() - started)
            ffmpeg.stdin.write(chunk)
    ffmpeg.stdin.close()
    decoded = np.frombuffer(ffmpeg.stdout.read(), "<f4")
    assert ffmpeg.wait(60) == 0
    assert len(arrivals) >= 3 and arrivals[0] < arrivals[-1]  # sentences leave as they are made
    whole = decode(client(stack).audio.speech.create(model="tts-1", voice=stack.b, input=THREE,
                                                     response_format=fmt).content, fmt)
    assert abs(len(decoded) - len(whole)) < 0.1 * RATE and len(decoded) > RATE


def test_sse_events_as_openai_documents_them(stack: ServerStack) -> None:
    events = []
    with client(stack).audio.speech.with_streaming_response.create(
            model="gpt-4o-mini-tts", voice=stack.b, input=THREE, response_format="pcm", stream_format="sse") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    *deltas, done = events
    assert len(deltas) >= 3 and {e["type"] for e in deltas} == {"speech.audio.delta"}
    pcm = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    assert done["type"] == "speech.audio.done"
    usage = done["usage"]
    assert usage["input_tokens"] == len(THREE) and usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert abs(usage["output_tokens"] - len(pcm) / 2 / RATE / 0.02) <= 1  # 20 ms of audio per output token
    direct = client(stack).audio.speech.create(model="tts-1", voice=stack.b, input=THREE, response_format="pcm").content
    assert abs(len(pcm) - len(direct)) <= 4  # the same audio, framed as events


def test_speed_range_and_input_length_are_openai_s(stack: ServerStack) -> None:
    c = client(stack)
    lengths = {s: len(c.audio.speech.create(model="tts-1", voice=stack.b, input="Speed test sentence.",
                                            response_format="pcm", speed=s).content) for s in (0.25, 1.0, 4.0)}
    # The tiny test model already predicts the 1-step floor for most phones, so 4x cannot shorten it much.
    assert lengths[4.0] <= lengths[1.0] < lengths[0.25]
    for bad in (0.2, 4.5):
        with pytest.raises(openai.UnprocessableEntityError):
            c.audio.speech.create(model="tts-1", voice=stack.b, input="Too fast.", speed=bad)
    sentence = "A sentence of about sixty characters, said again and again. "
    long_text = (sentence * 80)[:4096]
    with c.audio.speech.with_streaming_response.create(model="tts-1", voice=stack.b, input=long_text,
                                                       response_format="pcm") as r:
        total = sum(len(chunk) for chunk in r.iter_bytes())
    assert total / 2 / RATE > 30  # 68 sentences, streamed
    with pytest.raises(openai.APIStatusError) as err:
        c.audio.speech.create(model="tts-1", voice=stack.b, input="x" * 4097)
    assert err.value.status_code == 413 and "limit is 4096" in err.value.response.text


def test_ssml_breaks_and_sentence_pause_are_silence_and_tags_are_not_spoken(stack: ServerStack) -> None:
    c = client(stack)

    def seconds(text: str, **extra) -> float:
        pcm = c.audio.speech.create(model="tts-1", voice=stack.b, input=text, response_format="pcm",
                                    extra_body=extra).content
        return len(pcm) / 2 / RATE

    plain = seconds("Hello there. General Kenobi.")
    assert seconds('Hello there. <break time="1500ms"/> General Kenobi.') == pytest.approx(plain + 1.5, abs=0.05)
    assert seconds("<speak><emphasis>Hello there.</emphasis> <foo>General Kenobi.</foo></speak>") == pytest.approx(plain, abs=0.01)
    assert seconds("Hello there. General Kenobi.", sentence_pause=0.5) == pytest.approx(plain + 0.5, abs=0.05)
    with pytest.raises(openai.UnprocessableEntityError) as err:
        c.audio.speech.create(model="tts-1", voice=stack.b, input='Hi <break time="soon"/> there')
    assert 'time="soon"' in err.value.response.json()["error"]["message"]
    with pytest.raises(openai.UnprocessableEntityError) as err:
        c.audio.speech.create(model="tts-1", voice=stack.b, input='A <phoneme ph="k Q t">cat</phoneme>.')
    assert "'Q' is not a phone of the inventory" in err.value.response.json()["error"]["message"]


def test_a_voice_lexicon_changes_how_a_word_is_said(stack: ServerStack) -> None:
    c = client(stack)
    before = len(c.audio.speech.create(model="tts-1", voice=stack.b, input="Tomato.", response_format="pcm").content)
    save_lexicon(artifact_store(stack.settings), lexicon_prefix(voice_id=stack.b),
                 Lexicon({"tomato": {"alias": "one two three four five six seven"}}))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the server re-reads lexicons every poll (1 s here)
        after = len(c.audio.speech.create(model="tts-1", voice=stack.b, input="Tomato.", response_format="pcm").content)
        if after > 2 * before:
            break
        time.sleep(0.5)
    assert after > 2 * before


def test_models_and_voices_discovery(stack: ServerStack) -> None:
    models = [m.id for m in client(stack).models.list()]
    assert {"tts-1", "tts-1-hd", "gpt-4o-mini-tts"} <= set(models)
    voices = httpx.get(f"{stack.url}/v1/audio/voices", headers=stack.auth("globex"), timeout=30).json()["voices"]
    assert [v["id"] for v in voices] == [stack.b] and voices[0]["name"] == stack.b  # tenant-scoped
    assert httpx.get(f"{stack.url}/v1/models", timeout=30).status_code == 401


def test_alias_map_is_per_tenant(aliased: ServerStack) -> None:
    glob, acme = client(aliased, "globex"), client(aliased, "acme")
    assert glob.audio.speech.create(model="tts-1", voice="alloy", input="Hi.").response.headers["x-voice-version"] == "1"
    assert acme.audio.speech.create(model="tts-1", voice="nova", input="Hi.").content  # "*" alias for everyone
    with pytest.raises(openai.NotFoundError):
        acme.audio.speech.create(model="tts-1", voice="alloy", input="Hi.")  # globex's alias, not acme's
    with pytest.raises(openai.NotFoundError):
        glob.audio.speech.create(model="tts-1", voice="nova", input="Hi.")  # nova is voice a: not globex's
    listed = httpx.get(f"{aliased.url}/v1/audio/voices", headers=aliased.auth("globex"), timeout=30).json()["voices"]
    assert {v["id"]: v["voice_id"] for v in listed} == {aliased.b: aliased.b, "alloy": aliased.b}


def test_word_timestamps_come_from_the_model_s_durations(stack: ServerStack) -> None:
    text = 'Hello big world. <break time="1s"/> It costs $3.'
    r = httpx.post(f"{stack.url}/v1/tts", json={"text": text, "voice_id": stack.b, "format": "wav", "timestamps": True},
                   headers=stack.auth("globex"), timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json"), r.text
    body = r.json()
    audio = base64.b64decode(body["audio"])
    seconds = (len(audio) - 44) / 2 / body["sample_rate"]
    words = body["words"]
    assert [w["word"] for w in words] == ["Hello", "big", "world", "It", "costs", "three", "dollars"]
    assert all(0 <= w["start"] < w["end"] for w in words)
    assert all(a["end"] <= b["start"] for a, b in zip(words, words[1:]))
    assert words[3]["start"] >= words[2]["end"] + 1.0  # the break's second of silence lies between
    assert words[-1]["end"] <= seconds + 0.01 and words[-1]["end"] > seconds - 0.2  # times match the audio
    stream = httpx.post(f"{stack.url}/v1/tts", json={"text": "Hi.", "voice_id": stack.b, "stream": True,
                                                    "timestamps": True}, headers=stack.auth("globex"), timeout=60)
    assert stream.status_code == 422 and "timestamps" in stream.json()["error"]["message"]
