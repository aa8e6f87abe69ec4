"""voice_intake finds each complete dataset once; nightly_reevaluation flags regressions."""

from __future__ import annotations

from voice_lib.pipelines.intake import claim, find_ready_datasets
from voice_lib.pipelines.nightly import regressions


def test_intake_hands_each_complete_dataset_over_once(settings, tmp_path):
    incoming = tmp_path / "incoming"
    settings = settings.model_copy(update={"intake_uri": incoming.as_uri()})
    (incoming / "alice").mkdir(parents=True)
    (incoming / "alice" / "a.wav").write_bytes(b"RIFF")
    (incoming / "bob").mkdir()
    (incoming / "bob" / "b.wav").write_bytes(b"RIFF")
    (incoming / "Bad_Name").mkdir()
    (incoming / "Bad_Name" / "_READY").write_text("")
    assert find_ready_datasets(settings) == []  # nothing marked complete yet; a bad voice id never qualifies
    (incoming / "alice" / "_READY").write_text("")
    found = find_ready_datasets(settings)
    assert [d["voice_id"] for d in found] == ["alice"] and found[0]["data_uri"].endswith("/incoming/alice")
    claim(settings, found[0], "run-1")
    assert find_ready_datasets(settings) == []  # claimed: not triggered twice
    (incoming / "alice" / "c.wav").write_bytes(b"RIFF")  # a changed upload is a new dataset
    assert [d["voice_id"] for d in find_ready_datasets(settings)] == ["alice"]


def test_nightly_regressions_respect_direction_and_tolerance():
    registered = {"speaker_similarity": 0.80, "wer": 0.30, "pesq": 1.5, "stoi": 0.80}
    assert regressions({"speaker_similarity": 0.78, "wer": 0.35, "pesq": 1.4, "stoi": 0.79}, registered, "x") == []
    found = regressions({"speaker_similarity": 0.70, "wer": 0.45, "pesq": 1.5, "stoi": 0.80}, registered, "at registration")
    assert len(found) == 2 and found[0].startswith("speaker_similarity 0.700 vs 0.800 at registration")
    assert regressions({"speaker_similarity": None, "wer": float("nan")}, registered, "x") == []  # unmeasured: no verdict


def test_nightly_flags_a_dnsmos_drop_beyond_the_release_rule():
    registered = {"p808_mos": 3.40, "ovrl_mos": 3.00}
    assert regressions({"p808_mos": 3.25, "ovrl_mos": 2.85}, registered, "last night") == []  # within 0.2
    found = regressions({"p808_mos": 3.10, "ovrl_mos": 3.05}, registered, "last night")
    assert found == ["p808_mos 3.100 vs 3.400 last night (tolerance 0.2)"]
    assert regressions({"p808_mos": 3.9}, registered, "x") == []  # better is no regression
