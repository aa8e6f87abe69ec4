"""The two-stage acoustic backend: a reference synthesizer says the text, the converter gives it the voice.

Text frontend (``model_inputs``, per voice): the voice's reference synthesizer (``two_stage.json``:
flite, festival or espeak-ng) renders the sentence, a fast WORLD analysis gives its frames, and the
log-F0 contour is moved to the voice's pitch statistics (``voice_lib.data.reference``). Those frames are
the row's model inputs. Prediction (``predict``): the converter (voice_lib/model/converter.py), its LoRA
target layers wrapped for multi-adapter inference like the end-to-end model's, maps a padded batch of
mixed voices in one pass to each voice's envelope and aperiodicity; timing and voicing stay the
source's, so no duration guard is needed, and a row's output is the same alone or in a batch. Rendering
(``render``, on the vocoder threads) follows the voice's ``synthesis``: the core's guarded WORLD vocoder
(voice_lib/infer/core.py), or the source filter (voice_lib/infer/source_filter.py), which re-pitches the
reference rendering itself and filters it by the converter's envelope change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from voice_lib.data.features import FeatureConfig
from voice_lib.data.psola import psola
from voice_lib.data.reference import (
    TWO_STAGE_FEATURES,
    TwoStageVoice,
    analyze_frames,
    apply_envelope_scale,
    map_f0,
    render_source,
)
from voice_lib.infer.core import AcousticRow, SynthesisError, guarded_features, vocode
from voice_lib.infer.multilora import LoraBank, activate, install
from voice_lib.infer.source_filter import envelope_change, envelope_filter
from voice_lib.model.converter import ENVELOPE, Converter

TWO_STAGE = "two_stage"


def change_rate(frames: np.ndarray, speed: float) -> np.ndarray:
    """Frames re-timed for ``speed`` (2.0 = twice as fast) by linear interpolation; voicing by nearest."""
    if abs(speed - 1.0) < 1e-6 or len(frames) < 2:
        return frames
    n = max(2, int(round(len(frames) / speed)))
    pos = np.linspace(0, len(frames) - 1, n)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, len(frames) - 1)
    frac = (pos - lo)[:, None].astype(np.float32)
    out = frames[lo] * (1 - frac) + frames[hi] * frac
    out[:, 1] = frames[np.rint(pos).astype(int), 1]
    return out.astype(np.float32)


@dataclass(frozen=True, eq=False)
class SourceFrames:
    """A row's model inputs: the reference rendering's frames (F0 already the voice's), the voice's post-filter
    and, for a voice rendered through the source filter, the rendering itself and its own log-F0 contour."""

    frames: np.ndarray
    envelope_scale: np.ndarray | None = None  # the post-filter of this rendering
    timed_scale: np.ndarray | None = None  # the post-filter of the timed WORLD reconstruction (the scale as measured)
    audio: np.ndarray | None = None  # set when the voice's synthesis is "source_filter"
    source_lf0: np.ndarray | None = None
    envelope_order: int = 30
    envelope_smoothing: int = 5


@dataclass(frozen=True, eq=False)
class TwoStageBackend:
    """A resident converter with its LoRA target layers wrapped for multi-adapter inference."""

    name: ClassVar[str] = TWO_STAGE
    sha256: str
    model: Converter
    shapes: dict[str, tuple[int, int]]
    feature_config: FeatureConfig
    source: str  # the folder it was loaded from (shown in /v1/admin/status)

    def model_inputs(self, text: str, language: str, frontend: Mapping[str, Any] | None = None) -> SourceFrames:
        """The reference voice's frames of ``text``, F0 moved to the voice's (``frontend``: its two_stage.json)."""
        if not frontend:
            raise SynthesisError("a two-stage voice needs its two_stage.json (reference voice and pitch statistics)")
        voice = TwoStageVoice.from_dict(dict(frontend))
        audio = render_source(text, voice.source_voice, self.feature_config.sample_rate)
        frames = analyze_frames(audio, self.feature_config)
        scale = None if voice.envelope_scale is None else np.asarray(voice.envelope_scale, dtype=np.float32)
        mapped = map_f0(frames, voice.source_pitch, voice.target_pitch)
        if voice.synthesis != "source_filter":
            return SourceFrames(mapped, scale, scale)
        filtered = None if scale is None else scale ** np.float32(voice.envelope_scale_power)
        return SourceFrames(mapped, filtered, scale, audio, frames[:, 0].copy(), voice.envelope_order, voice.envelope_smoothing)

    def _convert(self, sources: Sequence[np.ndarray], rows: Sequence[AcousticRow], bank: LoraBank) -> list[np.ndarray]:
        lengths = torch.tensor([len(s) for s in sources])
        src = torch.zeros(len(sources), int(lengths.max()), sources[0].shape[1])
        for i, s in enumerate(sources):
            src[i, : len(s)] = torch.from_numpy(np.ascontiguousarray(s, dtype=np.float32))
        speaker = torch.stack([r.speaker for r in rows])
        with torch.inference_mode(), activate(bank, [r.slot for r in rows]):
            out = self.model.denormalize(src, self.model(src, speaker, lengths))
        return [out[i, : int(lengths[i])].numpy() for i in range(len(sources))]

    def predict(self, rows: Sequence[AcousticRow], bank: LoraBank) -> list[np.ndarray | SynthesisError]:
        """Converted frames per row; a source-filter row's stay on the rendering's timeline (``render`` re-times)."""
        converted = self._convert([r.inputs.frames for r in rows], rows, bank)
        out = []
        for frames, row in zip(converted, rows):
            frames = apply_envelope_scale(frames, row.inputs.envelope_scale)
            out.append(frames if row.inputs.audio is not None else change_rate(frames, row.speed))
        return out

    def render(self, row: AcousticRow, features: np.ndarray) -> np.ndarray:
        """WORLD resynthesis of the converted frames, or the source filter (voice_lib/infer/source_filter.py)."""
        inputs: SourceFrames = row.inputs
        if inputs.audio is None:
            return vocode(features, self.feature_config)
        cfg = self.feature_config
        lf0, vuv, _, _ = guarded_features(features, cfg)  # the converter keeps the source's (mapped) F0 and voicing
        f0 = np.where(vuv > 0.5, np.exp(inputs.source_lf0), 0.0)
        target_f0 = np.where(vuv > 0.5, np.exp(lf0), 0.0)
        audio = psola(inputs.audio, cfg.sample_rate, f0, target_f0, cfg.frame_period_ms, row.speed)
        source, converted = change_rate(inputs.frames, row.speed), change_rate(features, row.speed)
        change = envelope_change(source[:, ENVELOPE], converted[:, ENVELOPE], inputs.envelope_order, inputs.envelope_smoothing)
        return envelope_filter(audio, cfg.sample_rate, change, cfg.frame_period_ms)

    def predict_with_timing(self, row: AcousticRow, bank: LoraBank, reference: np.ndarray) -> np.ndarray:
        """The source warped onto a recording's timing by DTW (the alignment training uses), then converted.
        ``reference`` is the recording's feature matrix at any multiple of 10 ms's rate (5 ms: every other row).
        The caller vocodes these frames with WORLD whatever the voice's rendering: a source-filter voice's PESQ
        and STOI are those of its converted frames on the recording's timing, not of the filtered waveform."""
        from voice_lib.data.alignment import (
            alignment_features,
            dtw_path,
            warp_to_target,
        )

        step = max(1, int(round(self.feature_config.frame_period_ms / 5.0)))
        target = np.asarray(reference, dtype=np.float32)[::step]
        source = row.inputs.frames
        warped = warp_to_target(dtw_path(alignment_features(source), alignment_features(target)), len(target), source)
        return apply_envelope_scale(self._convert([warped], [row], bank)[0], row.inputs.timed_scale)


def load_two_stage(folder: Path, sha256: str | None = None) -> TwoStageBackend:
    """The converter in ``folder`` (voice_lib.model.checkpoints.save_converter layout), ready for adapters."""
    from voice_lib.core.hashing import sha256_file
    from voice_lib.model.checkpoints import CONVERTER_WEIGHTS, load_converter
    from voice_lib.model.converter import CONVERTER_LORA_TARGETS

    model, config = load_converter(folder)
    shapes = install(model, CONVERTER_LORA_TARGETS)
    model.eval()
    features = FeatureConfig(**config["feature_config"]) if "feature_config" in config else TWO_STAGE_FEATURES
    return TwoStageBackend(sha256 or sha256_file(folder / CONVERTER_WEIGHTS), model, shapes, features, str(folder))
