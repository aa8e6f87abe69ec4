"""Release gates of the held-out evaluation: every gate applied to the gated system, passed, failed or skipped.

``evaluate`` computes them once and the result carries them (``EvalResult.gates``); callers read that instead of
checking again. Each check names its metric, value, threshold and the ``VOICEOPS_EVAL__*`` setting that sets it.
The defaults (voice_lib/core/config.py EvalSettings) are issue 13's Done-when: Whisper WER ≤ the real recordings'
+ 0.10; GE2E similarity ≥ 0.80 and ≥ the unadapted base + 0.15; DNSMOS P.808 ≥ the real recordings' − 0.3,
above an absolute floor, and for a new version of a voice at most 0.2 below its production version.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from voice_lib.core.config import EvalSettings, Settings
from voice_lib.eval.metrics import NAN, REAL, eval_settings, fmt


@dataclass(frozen=True)
class ProductionReference:
    """What the gates compare a new version of an existing voice with: its production version's registered metrics."""

    version: str
    p808_mos: float | None  # the production version's gate-metric tag eval_<gated system>_p808_mos


@dataclass
class GateCheck:
    """One gate applied to one system; ``passed`` is None when it could not apply (e.g. no English clips)."""

    gate: str  # EvalSettings field name
    system: str
    metric: str
    value: float | None
    threshold: float
    passed: bool | None
    message: str

    @property
    def env_var(self) -> str:
        return f"VOICEOPS_EVAL__{self.gate.upper()}"

    def __str__(self) -> str:
        return self.message


GateFailure = GateCheck  # a GateCheck with passed == False


def _check(gate: str, system: str, metric: str, value: float | None, threshold: float, minimum: bool, extra: str = "",
           optional: bool = False) -> GateCheck:  # a missing value fails (n/a), unless the gate is optional: skipped
    env = f"VOICEOPS_EVAL__{gate.upper()}"
    if value is None and optional:
        return GateCheck(gate, system, metric, None, threshold, None, f"{metric} not measured{extra}: gate {env} skipped")
    value = NAN if value is None else float(value)
    ok = math.isfinite(value) and (value >= threshold if minimum else value <= threshold)
    op = (">=" if ok else "<") if minimum else ("<=" if ok else ">")
    return GateCheck(gate, system, metric, value, threshold, ok, f"{metric} {fmt(value)} {op} {threshold:g} ({env}){extra}")


def _skipped(gate: str, system: str, metric: str, threshold: float, why: str) -> GateCheck:
    return GateCheck(gate, system, metric, None, threshold, None, f"{why}: gate VOICEOPS_EVAL__{gate.upper()} skipped")


def _production_check(agg: Mapping[str, float | None], ev: EvalSettings, system: str,
                      production: ProductionReference | None) -> GateCheck:
    gate, metric = "max_p808_drop_below_production", "p808_drop_below_production"
    if production is None:
        return _skipped(gate, system, metric, ev.max_p808_drop_below_production, "no production version of this voice")
    if production.p808_mos is None:
        return _skipped(gate, system, metric, ev.max_p808_drop_below_production,
                        f"production version {production.version} has no registered P.808 (evaluated before DNSMOS)")
    p808 = agg.get("p808_mos")
    drop = production.p808_mos - p808 if p808 is not None and math.isfinite(p808) else None
    return _check(gate, system, metric, drop, ev.max_p808_drop_below_production, False,
                  f": {system} P.808 {fmt(p808)} vs production v{production.version} {fmt(production.p808_mos)}")


def gate_checks(aggregates: Mapping[str, Mapping[str, float | None]], settings: Settings | EvalSettings,
                system: str | None = None, baseline: str | None = None,
                production: ProductionReference | None = None) -> list[GateCheck]:
    """Every gate applied to ``system`` (default ``settings.gated_system``), passed or not."""
    ev = eval_settings(settings)
    system = system or ev.gated_system
    baseline = ev.baseline_system if baseline is None else baseline
    agg = aggregates.get(system)
    if agg is None:
        return [GateCheck("gated_system", system, "system", None, 0.0, False,
                          f"system {system!r} was not evaluated (VOICEOPS_EVAL__GATED_SYSTEM); have {sorted(aggregates)}")]
    checks = [_check(f"{bound}_{metric}", system, metric, agg.get(metric), getattr(ev, f"{bound}_{metric}"), bound == "min")
              for bound, metric in (("min", "speaker_similarity"), ("min", "pesq"), ("min", "stoi"), ("min", "p808_mos"),
                                    ("max", "bad_output_rate"), ("max", "rtf"))]
    real = aggregates.get(REAL, {})
    gap = agg.get("wer_gap_over_real")
    checks.append(_check("max_wer_gap_over_real", system, "wer_gap_over_real", gap, ev.max_wer_gap_over_real, False,
                         f": {system} WER {fmt(agg.get('wer'))} vs real recordings {fmt(real.get('wer'))}" if gap is not None else "",
                         optional=True))
    checks.append(_check("max_p808_gap_below_real", system, "p808_gap_below_real", agg.get("p808_gap_below_real"),
                         ev.max_p808_gap_below_real, False,
                         f": {system} P.808 {fmt(agg.get('p808_mos'))} vs real recordings {fmt(real.get('p808_mos'))}"))
    checks.append(_production_check(agg, ev, system, production))
    if baseline and baseline != system and baseline in aggregates:
        base_sim = aggregates[baseline].get("speaker_similarity")
        gain = agg["speaker_similarity"] - base_sim if agg.get("speaker_similarity") is not None and base_sim is not None else None
        checks.append(_check("min_similarity_gain_over_base", system, f"similarity_gain_over_{baseline}", gain,
                             ev.min_similarity_gain_over_base, True,
                             f": {system} {fmt(agg.get('speaker_similarity'))} vs {baseline} {fmt(base_sim)}"))
    return checks


def check_gates(aggregates: Mapping[str, Mapping[str, float | None]], settings: Settings | EvalSettings,
                system: str | None = None, baseline: str | None = None,
                production: ProductionReference | None = None) -> list[GateFailure]:
    """The failed gates; each message names the metric, its value, the threshold and the setting that sets it."""
    return [g for g in gate_checks(aggregates, settings, system, baseline, production) if g.passed is False]


def display_thresholds(ev: EvalSettings, real: Mapping[str, float | None]) -> dict[str, float]:
    """Gate value per displayed metric (WER and P.808: relative to the real recordings)."""
    th = {"pesq": ev.min_pesq, "stoi": ev.min_stoi, "speaker_similarity": ev.min_speaker_similarity,
          "rtf": ev.max_rtf, "bad_output_rate": ev.max_bad_output_rate, "wer_gap_over_real": ev.max_wer_gap_over_real,
          "p808_mos": ev.min_p808_mos, "p808_gap_below_real": ev.max_p808_gap_below_real,
          f"similarity_gain_over_{ev.baseline_system}": ev.min_similarity_gain_over_base}
    real_wer, real_p808 = real.get("wer"), real.get("p808_mos")
    if real_wer is not None and math.isfinite(real_wer):
        th["wer"] = real_wer + ev.max_wer_gap_over_real
    if real_p808 is not None and math.isfinite(real_p808):
        th["p808_mos"] = max(ev.min_p808_mos, real_p808 - ev.max_p808_gap_below_real)
    return th
