"""From a routed request to audio: text frontend, batched synthesis, canary fallback, encoding, streaming.

Canary fallback: when the canary version's output for a request is unusable (an exception, non-finite
features) or bad (silent or clipped), the breaker records it and the same request is synthesised again
with production; the response then says ``X-Voice-Variant: production`` and carries ``X-Voice-Fallback``.
So a failing canary costs its users latency, never a broken answer, while the breaker counts the
failures and stops canary traffic. The canary attempt gets its own audit row (status 500 or the bad
audio noted) with the same request id, so canary analysis over the audit log still sees it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from serving.batcher import BatcherClosed, MicroBatcher
from serving.encoding import MEDIA_TYPES, encode_audio, pcm16, wav_header
from serving.engine import SynthesisError, SynthesisOutput, bad_audio_kind
from serving.routing import CANARY, PRODUCTION, Decision
from serving.snapshot import LoadedVersion, Snapshot, VoiceRoute
from voice_lib.data.text import (
    FrontendUnavailable,
    Lexicon,
    SpeechChunk,
    TextError,
    Unpronounceable,
    phonemes_to_ids,
    plan_speech,
)
from voice_lib.infer.core import END_TO_END

CHUNK_CHARS = 200  # sentences longer than this are split at clauses (text.split_sentences)
# format -> (soundfile container, subtype, media type), as /openapi.json and the fuzz oracle read it; the encoding
# itself is serving/encoding.py's. "pcm16"/"pcm" are raw 16-bit little-endian mono.
FORMATS: dict[str, tuple[str | None, str | None, str]] = {
    "wav": ("WAV", "PCM_16", MEDIA_TYPES["wav"]), "pcm16": (None, None, MEDIA_TYPES["pcm16"]),
    "pcm": (None, None, MEDIA_TYPES["pcm"]), "mp3": ("MP3", "MPEG_LAYER_III", MEDIA_TYPES["mp3"]),
    "ogg": ("OGG", "VORBIS", MEDIA_TYPES["ogg"]), "opus": ("OGG", "OPUS", MEDIA_TYPES["opus"]),
    "flac": ("FLAC", "PCM_16", MEDIA_TYPES["flac"]), "aac": (None, None, MEDIA_TYPES["aac"]),
}
STREAM_FORMATS = ("wav", "pcm16", "pcm")  # what /v1/tts streams; the OpenAI endpoint streams every format
__all__ = ["CHUNK_CHARS", "FORMATS", "STREAM_FORMATS", "ServingError", "PlannedChunk", "plan_chunks", "phoneme_chunks",
           "pcm16", "encode_audio", "wav_header", "Served", "RequestContext", "Synthesis"]


class ServingError(Exception):
    """An error with an HTTP status and a stable code; rendered as {"error": {"code", "message"}}."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


@dataclass(frozen=True)
class PlannedChunk:
    """One sentence to synthesise: its model inputs, the silence after it, and which phones say which word."""

    ids: list[int]
    pause_after: float
    speech: SpeechChunk

    @property
    def spoken_text(self) -> str:
        """The sentence as the frontend reads it (numbers, dates, overrides resolved): what a two-stage voice's
        reference synthesizer is given."""
        return " ".join(w.word for w in self.speech.words) or self.speech.text


async def version_inputs(snap: Snapshot, version: LoadedVersion, chunks: Sequence[PlannedChunk]) -> list:
    """The model inputs of ``chunks`` for ``version``'s backend: the phoneme ids (end-to-end), or the voice's
    reference rendering of each sentence (two-stage; off the event loop, one thread per sentence)."""
    if version.backend == END_TO_END:
        return [c.ids for c in chunks]
    backend = snap.bases[version.base_sha256]
    return list(await asyncio.gather(*(asyncio.to_thread(backend.model_inputs, c.spoken_text, "en", version.frontend)
                                       for c in chunks)))


def plan_chunks(text: str, language: str, lexicon: Lexicon | None = None,
                sentence_pause: float = 0.0) -> list[PlannedChunk]:
    """The request's text as sentences to synthesise (SSML-lite, lexicon, pauses: voice_lib.data.text.chunks).

    Raises ServingError 422 ``invalid_text`` for text with nothing to say or bad markup (the message names it),
    503 when the text frontend itself is broken.
    """
    try:
        chunks = plan_speech(text, language, lexicon=lexicon, sentence_pause=sentence_pause,  # type: ignore[arg-type]
                             max_chars=CHUNK_CHARS)
    except FrontendUnavailable as exc:  # the server is broken, not the text: never answer as if it were silence
        raise ServingError(503, "frontend_unavailable", f"the text frontend is unavailable: {exc}",
                           {"Retry-After": "30"}) from exc
    except Unpronounceable:
        raise ServingError(422, "invalid_text", f"text has nothing pronounceable: {text[:80]!r}") from None
    except TextError as exc:  # bad markup or a bad inline override: the message names it and the fix
        raise ServingError(422, "invalid_text", f"the text cannot be read: {exc}") from None
    return [PlannedChunk(phonemes_to_ids(list(c.phonemes)), c.pause_after, c) for c in chunks]


def phoneme_chunks(text: str, language: str) -> list[list[int]]:
    """Sentence chunks as phoneme ids (``plan_chunks`` without lexicon or pauses)."""
    return [c.ids for c in plan_chunks(text, language)]


@dataclass
class Served:
    """What was synthesised for one request (or one streamed chunk)."""

    outputs: list[SynthesisOutput]
    decision: Decision
    fallback: str | None = None

    @property
    def audio(self) -> np.ndarray:
        return np.concatenate([o.audio for o in self.outputs]) if self.outputs else np.zeros(0, np.float32)

    @property
    def sample_rate(self) -> int:
        return self.outputs[0].sample_rate

    @property
    def compute_seconds(self) -> float:
        return sum(o.compute_seconds for o in self.outputs)

    @property
    def audio_seconds(self) -> float:
        return sum(len(o.audio) / o.sample_rate for o in self.outputs)

    @property
    def rtf(self) -> float | None:
        """Synthesis compute seconds per second of audio (queue wait excluded); None for no audio."""
        audio = self.audio_seconds
        return self.compute_seconds / audio if audio else None

    @property
    def bad(self) -> str | None:
        return next((o.bad for o in self.outputs if o.bad), None)


@dataclass
class RequestContext:
    """Per-request facts the synthesis path needs for recording (audit/metrics/breaker)."""

    request_id: str
    tenant: str
    characters: int
    started: float = field(default_factory=time.perf_counter)


class Synthesis:
    """Runs routed requests through the batcher; owns canary fallback and breaker/audit/metric recording."""

    def __init__(self, batcher: MicroBatcher, breaker: Any, audit: Any, metrics: Any, timeout: float) -> None:
        self.batcher, self.breaker, self.audit, self.metrics, self.timeout = batcher, breaker, audit, metrics, timeout

    async def _run(self, snap: Snapshot, version: LoadedVersion, chunks: Sequence[PlannedChunk],
                   speed: float) -> list[SynthesisOutput]:
        started = time.perf_counter()
        inputs = await version_inputs(snap, version, chunks)  # per version: canary and production may differ
        try:
            futures = [self.batcher.submit(snap.job(version, item, speed)) for item in inputs]
        except BatcherClosed:
            raise ServingError(503, "shutting_down", "the server is shutting down; retry on another replica") from None
        outputs = list(await asyncio.wait_for(asyncio.gather(*futures), self.timeout))
        return await _inject_fault(version, outputs, time.perf_counter() - started) if version.fault else outputs

    async def synthesize(self, snap: Snapshot, route: VoiceRoute, decision: Decision, chunks: Sequence[PlannedChunk],
                         speed: float, ctx: RequestContext) -> Served:
        """Every chunk with the decided version; a failing canary falls back to production (module docstring)."""
        started = time.perf_counter()
        try:
            outputs = await self._run(snap, decision.version, chunks, speed)
        except ServingError:
            raise
        except TimeoutError:
            if decision.variant == CANARY:
                self._canary_failed(decision, ctx, started, f"timed out after {self.timeout:g} s", bad=None)
            raise ServingError(504, "timeout", f"synthesis did not finish within {self.timeout:g} s; "
                                              "send shorter text or retry") from None
        except Exception as exc:
            if decision.variant != CANARY:
                raise ServingError(500, "synthesis_failed", f"synthesis failed: {exc}") from exc
            self._canary_failed(decision, ctx, started, f"{type(exc).__name__}: {exc}", bad=None)
            return await self._fallback(snap, route, decision, chunks, speed, f"canary version {decision.version.version} failed")
        served = Served(outputs, decision)
        if decision.variant == CANARY:
            if served.bad:
                self._canary_failed(decision, ctx, started, f"canary produced {served.bad} audio", bad=served.bad,
                                    compute_ms=served.compute_seconds * 1000)
                return await self._fallback(snap, route, decision, chunks, speed,
                                            f"canary version {decision.version.version} produced {served.bad} audio")
            # Compute time, not wall time: the queue wait every variant shares (a flood by another tenant) is
            # no property of the canary and must never trip it.
            self.breaker.record(route.voice_id, decision.version.version, served.compute_seconds * 1000,
                                rtf=served.rtf)
        elif route.canary is not None:
            self.breaker.observe_production(route.voice_id, served.rtf)
        return served

    async def _fallback(self, snap: Snapshot, route: VoiceRoute, decision: Decision, chunks: Sequence[PlannedChunk],
                        speed: float, why: str) -> Served:
        production = Decision(PRODUCTION, route.production, decision.effective_weight, decision.bucket)
        try:
            outputs = await self._run(snap, route.production, chunks, speed)
        except ServingError:
            raise
        except TimeoutError:
            raise ServingError(504, "timeout", f"synthesis did not finish within {self.timeout:g} s") from None
        except Exception as exc:
            raise ServingError(500, "synthesis_failed", f"synthesis failed: {exc}") from exc
        return Served(outputs, production, fallback=f"{why}; served by production")

    def _canary_failed(self, decision: Decision, ctx: RequestContext, started: float, error: str, bad: str | None,
                       compute_ms: float | None = None) -> None:
        """The canary attempt's own audit row and breaker sample; ``compute_ms`` when it produced (bad) audio."""
        v = decision.version
        latency_ms = (time.perf_counter() - started) * 1000
        self.breaker.record(v.voice_id, v.version, latency_ms if compute_ms is None else compute_ms,
                            error=bad is None, bad_audio=bad is not None)
        status = 200 if bad else 500  # bad audio was produced (a 200 had there been no fallback), errors are 500
        if bad:
            self.metrics.observe_bad_audio(v.voice_id, v.version, CANARY, bad)
        self.metrics.observe_request(v.voice_id, v.version, CANARY, status, latency_ms / 1000, compute_ms=compute_ms)
        self.audit.record(request_id=ctx.request_id, tenant=ctx.tenant, voice_id=v.voice_id, version=v.version,
                          variant=CANARY, characters=ctx.characters, latency_ms=latency_ms, compute_ms=compute_ms,
                          status=status, error=f"{error}; fell back to production")

    async def stream(self, snap: Snapshot, route: VoiceRoute, decision: Decision, chunks: Sequence[PlannedChunk],
                     speed: float, ctx: RequestContext) -> tuple[Served, AsyncIterator[Served]]:
        """The first chunk now (errors still become a proper status), the rest as an async iterator.

        Chunks are synthesised one ahead of the one being sent, so sentence i+1 is computed while the
        client receives sentence i. A canary chunk that fails falls back to production for that chunk.
        """
        first = await self.synthesize(snap, route, decision, chunks[:1], speed, ctx)
        # Once the canary failed for this request, keep the rest on production: one voice per answer.
        decision = first.decision

        async def rest() -> AsyncIterator[Served]:
            pending: asyncio.Task | None = None
            for i in range(1, len(chunks)):
                task = pending or asyncio.ensure_future(self.synthesize(snap, route, decision, chunks[i:i + 1], speed, ctx))
                pending = (asyncio.ensure_future(self.synthesize(snap, route, decision, chunks[i + 1:i + 2], speed, ctx))
                           if i + 1 < len(chunks) else None)
                try:
                    yield await task
                except BaseException:
                    if pending is not None:
                        pending.cancel()
                    raise

        return first, rest()


async def _inject_fault(version: LoadedVersion, outputs: list[SynthesisOutput], took: float) -> list[SynthesisOutput]:
    """Game-day faults (serving.fault_injection): the version fails, goes silent, or answers ``factor`` x slower.

    Silence goes through the same bad-audio check as real output; slowness waits without using the CPU, so
    the other versions on this server keep their speed, as on a replica where only the canary is slow, and
    reports ``factor`` x the compute time (the real-time factor the breaker and /metrics see).
    """
    kind, _, arg = (version.fault or "").partition(":")
    if kind == "raise":
        raise SynthesisError(f"fault injection on version {version.version}: raise")
    if kind == "silence":
        return [replace(o, audio=np.zeros_like(o.audio), bad=bad_audio_kind(np.zeros_like(o.audio), -50.0, 1.0))
                for o in outputs]
    if kind == "slow":  # what a version `factor` x slower at synthesis looks like, to clients and to the engine
        await asyncio.sleep((float(arg) - 1) * took)
        return [replace(o, compute_seconds=o.compute_seconds * float(arg)) for o in outputs]
    return outputs
